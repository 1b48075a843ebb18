"""Tiles of large oriented-box images: window placement, exact shares of rotated boxes inside rectangles, what a cut
object's label becomes, and a whole dataset tiled (labels on their objects' pixels, objects in every tile holding
enough of them)."""

import cv2
import numpy as np
import pytest
import yaml
from shapely.geometry import Polygon, box

from yolotrain.cli import main
from yolotrain.data.tiles import (
    clip_to_rectangles,
    cut_to_rectangles,
    inside_shares,
    polygon_areas,
    tile_dataset,
    tile_windows,
)
from yolotrain.errors import CfgError, DatasetError
from yolotrain.utils.obb import corners_to_xywhr, xywhr_to_corners

WIDTH, HEIGHT = 1000, 800
SIZE, GAP = 512, 100
# 512-px windows stepping by 412: x at 0, 412 and 488 (the last moved back to end at 1000), y at 0 and 288.
EXPECTED_WINDOWS = [[0, 0, 512, 512], [0, 288, 512, 800], [412, 0, 924, 512], [412, 288, 924, 800],
                    [488, 0, 1000, 512], [488, 288, 1000, 800]]  # fmt: skip
# (centre x, centre y, long side, short side, angle in degrees) of the scene's objects; class = index % 3
OBJECTS = [
    (200, 150, 80, 30, 30),  # in the first tile only
    (455, 200, 100, 40, 10),  # wholly in the top-left tile, 94% in the one at x = 412, 17% at x = 488
    (700, 400, 300, 20, 0),  # a bar wholly inside four tiles
    (520, 600, 120, 60, 45),  # across x = 512: 41% in the bottom-left tile (unlabelled there), 86% at x = 488
    (980, 780, 20, 10, 0),  # in the bottom-right corner
    (300, 490, 60, 60, 20),  # across y = 512: 88% in the top-left tile
]
TILES_OF_OBJECT = [[0], [0, 2], [2, 3, 4, 5], [3, 5], [5], [0, 1]]  # indices into EXPECTED_WINDOWS


def rectangle(cx, cy, long_side, short_side, degrees):
    """(4, 2) corners, clockwise as seen (y down), the first edge along the long side."""
    angle = np.deg2rad(degrees)
    along, across = np.array([np.cos(angle), np.sin(angle)]), np.array([-np.sin(angle), np.cos(angle)])
    signs = np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], float)
    return (cx, cy) + signs[:, :1] * long_side / 2 * along + signs[:, 1:] * short_side / 2 * across


def fill(polygon, height, width):
    """Pixels whose centres a continuous-coordinate polygon covers (pixel x spans [x, x + 1))."""
    mask = np.zeros((height, width), np.uint8)
    cv2.fillPoly(mask, [np.round((np.asarray(polygon) - 0.5) * 16).astype(np.int32)], 1, cv2.LINE_8, 4)
    return mask.astype(bool)


def colour(k):
    return np.array([40 + 30 * k, 230 - 25 * k, 90 + 20 * k], np.uint8)


def share(quad, rect):
    return Polygon(quad).intersection(box(*rect)).area / Polygon(quad).area


@pytest.fixture
def scene(tmp_path):
    """A 1000x800 PNG of coloured rotated rectangles with its oriented-box labels, as a dataset."""
    image = np.full((HEIGHT, WIDTH, 3), 30, np.uint8)
    corners = np.stack([rectangle(*spec) for spec in OBJECTS])
    for k, quad in enumerate(corners):
        image[fill(quad, HEIGHT, WIDTH)] = colour(k)
    (tmp_path / "src" / "images" / "train").mkdir(parents=True)
    (tmp_path / "src" / "labels" / "train").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "src" / "images" / "train" / "scene.png"), image)
    rows = [f"{k % 3} " + " ".join(f"{v:.6f}" for v in (quad / (WIDTH, HEIGHT)).ravel())
            for k, quad in enumerate(corners)]
    (tmp_path / "src" / "labels" / "train" / "scene.txt").write_text("\n".join(rows) + "\n")
    data = tmp_path / "src" / "data.yaml"
    data.write_text(yaml.safe_dump({"train": "images/train", "val": "images/train", "names": ["a", "b", "c"]}))
    return data, image, corners


def read_rows(path):
    return [(int(r[0]), np.array(r[1:], float).reshape(4, 2)) for r in (line.split() for line in
                                                                         path.read_text().splitlines())]


# --- windows ------------------------------------------------------------------------------------------------------


def test_windows_step_by_size_less_gap_and_end_at_the_image_edge():
    np.testing.assert_array_equal(tile_windows(HEIGHT, WIDTH, SIZE, GAP), EXPECTED_WINDOWS)
    np.testing.assert_array_equal(tile_windows(512, 512, SIZE, GAP), [[0, 0, 512, 512]])  # exactly one window
    np.testing.assert_array_equal(tile_windows(513, 300, SIZE, GAP), [[0, 0, 512, 512], [0, 1, 512, 513]])


def test_each_rate_adds_windows_of_size_over_rate():
    windows = tile_windows(HEIGHT, WIDTH, SIZE, GAP, rates=(0.5, 1.0))
    np.testing.assert_array_equal(windows[:1], [[0, 0, 1024, 1024]])  # 1000x800 of it is image: 76% > 60%
    np.testing.assert_array_equal(windows[1:], EXPECTED_WINDOWS)
    # 2048-px windows over a 1000x800 image hold 19% image: left out beside others, kept when they are all there is
    np.testing.assert_array_equal(tile_windows(HEIGHT, WIDTH, SIZE, GAP, rates=(0.25, 1.0)), EXPECTED_WINDOWS)
    np.testing.assert_array_equal(tile_windows(HEIGHT, WIDTH, SIZE, GAP, rates=(0.25,)), [[0, 0, 2048, 2048]])
    with pytest.raises(CfgError, match="rate 3 makes windows of 170 px overlapping by 170 px"):
        tile_windows(HEIGHT, WIDTH, 512, 511, rates=(1.0, 3.0))  # rounded down, the overlap is the window


# --- geometry -----------------------------------------------------------------------------------------------------


def test_shares_of_hand_computed_cases():
    square = np.array([[[0, 0], [10, 0], [10, 10], [0, 10]]], float)
    diamond = np.array([[[10, 0], [20, 10], [10, 20], [0, 10]]], float)  # area 200
    np.testing.assert_allclose(inside_shares(square, [[5, 5, 20, 20], [0, 0, 10, 10], [20, 20, 30, 30],
                                                      [-5, -5, 5, 15]]), [[0.25, 1, 0, 0.5]])
    np.testing.assert_allclose(inside_shares(diamond, [[0, 0, 10, 20], [0, 0, 10, 10], [5, 5, 15, 15]]),
                               [[0.5, 0.25, 0.5]])
    bow_tie = diamond[:, [0, 2, 1, 3]]  # corners written in a crossing order: the outline is still the diamond
    np.testing.assert_allclose(inside_shares(bow_tie, [[0, 0, 10, 20]]), [[0.5]])
    triangle = np.array([[[0, 0], [10, 0], [0, 10]]], float)
    clipped = clip_to_rectangles(triangle, np.array([[0, 0, 5, 10]], float))  # a trapezoid: 50 - 12.5
    np.testing.assert_allclose(polygon_areas(clipped), [37.5])
    np.testing.assert_allclose(polygon_areas(clip_to_rectangles(triangle, np.array([[20, 20, 30, 30]], float))), [0])


def test_shares_equal_shapely_for_rotated_boxes_and_any_quadrilateral():
    rng = np.random.default_rng(0)
    specs = np.column_stack([rng.uniform(0, 300, (200, 2)), rng.uniform(5, 80, 200), rng.uniform(2, 40, 200),
                             rng.uniform(0, 180, 200)])
    quads = np.stack([rectangle(*spec) for spec in specs])
    quads[::3] += rng.normal(0, 4, quads[::3].shape)  # general (possibly concave) quadrilaterals
    corners = np.sort(rng.uniform(-20, 320, (12, 2, 2)), 1)  # (12, low/high, x/y)
    rects = corners.reshape(12, 4)
    shares = inside_shares(quads, rects)
    expected = np.array([[share(q, r) if Polygon(q).is_valid else shares[i, j] for j, r in enumerate(rects)]
                         for i, q in enumerate(quads)])
    np.testing.assert_allclose(shares, expected, atol=1e-9)
    assert 0.05 < ((shares > 0) & (shares < 1)).mean()  # plenty of cut pairs were computed exactly


def test_cut_object_becomes_a_box_of_its_orientation_around_its_part_inside():
    """The written corners lie in the tile; the rectangle training fits to them (their minimum-area rectangle) has
    the object's angle and bounds the object's part inside the tile tightly. The corners run the object's way round
    from the corner nearest its first."""
    tile = np.array([0.0, 0.0, 100.0, 100.0])
    bar = rectangle(90, 50, 60, 10, 20)  # its right end sticks out past x = 100
    inside = rectangle(50, 50, 30, 10, 60)
    result = cut_to_rectangles(np.stack([bar, inside, bar[::-1]]), np.stack([tile] * 3))
    np.testing.assert_array_equal(result[1], inside)  # wholly inside: as written
    written = result[0]
    assert np.all((written >= 0) & (written <= 100))
    np.testing.assert_allclose(written[[0, 3]], bar[[0, 3]])  # the end inside keeps its corners
    np.testing.assert_allclose(result[2], written[::-1])  # written the other way round: the result too

    fitted = corners_to_xywhr(written[None])[0]
    assert np.rad2deg(fitted[4]) == pytest.approx(20)
    visible = Polygon(bar).intersection(box(*tile))
    fitted_box = Polygon(xywhr_to_corners(fitted[None])[0])
    assert fitted_box.intersection(visible).area == pytest.approx(visible.area, rel=1e-9)
    assert fitted_box.area < 1.1 * visible.area


# --- the dataset --------------------------------------------------------------------------------------------------


def test_tiles_are_the_image_cut_and_every_label_lies_on_its_object(scene, tmp_path, caplog):
    data, image, corners = scene
    with caplog.at_level("INFO", logger="yolotrain.data.tiles"):
        yaml_path = tile_dataset(data, tmp_path / "out", size=SIZE, gap=GAP)
    assert "6 tiles" in caplog.text and "12 labels (3 of objects cut by the tile's edge)" in caplog.text
    out = yaml_path.parent
    assert yaml.safe_load(yaml_path.read_text()) == {"train": "images/train", "val": "images/train", "nc": 3,
                                                     "names": ["a", "b", "c"]}  # one source: tiled once
    names = sorted(f"scene__512__{x}___{y}" for x, y, _, _ in EXPECTED_WINDOWS)
    assert sorted(p.stem for p in (out / "images" / "train").iterdir()) == names
    assert sorted(p.stem for p in (out / "labels" / "train").iterdir()) == names

    tiles_of_object = [[] for _ in OBJECTS]
    for t, (x1, y1, x2, y2) in enumerate(EXPECTED_WINDOWS):
        stem = f"scene__512__{x1}___{y1}"
        tile = cv2.imread(str(out / "images" / "train" / f"{stem}.png"))
        np.testing.assert_array_equal(tile, image[y1:y2, x1:x2])  # lossless: the PNG stays a PNG
        rows = read_rows(out / "labels" / "train" / f"{stem}.txt")
        objects = [k for k, quad in enumerate(corners) if share(quad, (x1, y1, x2, y2)) >= 0.7]
        assert [c for c, _ in rows] == [k % 3 for k in objects]
        for k, (_, points) in zip(objects, rows):
            tiles_of_object[k].append(t)
            assert np.all((points >= 0) & (points <= 1))
            # what training sees: the rotated box around the label's corners (its part in the tile)
            trained = xywhr_to_corners(corners_to_xywhr(points[None] * (x2 - x1, y2 - y1)))[0]
            label = fill(trained, y2 - y1, x2 - x1)
            on_object = (tile == colour(k)).all(-1)
            assert (label & on_object).sum() >= 0.9 * label.sum(), (stem, k)  # the label lies on its object
            assert (label & on_object).sum() >= 0.97 * on_object.sum(), (stem, k)  # all of what the tile shows
            if share(corners[k], (x1, y1, x2, y2)) == 1:  # wholly inside: the corners as written, shifted
                np.testing.assert_allclose(points * (x2 - x1, y2 - y1) + (x1, y1), corners[k], atol=1e-3)
    assert tiles_of_object == TILES_OF_OBJECT


def test_rates_add_larger_tiles_and_splits_are_tiled_once_each(scene, tmp_path):
    data, image, corners = scene
    content = yaml.safe_load(data.read_text())
    content["test"] = "images/test"  # a split without labels: tiles without label files
    (data.parent / "images" / "test").mkdir()
    cv2.imwrite(str(data.parent / "images" / "test" / "far.png"), image[:300, :400])
    data.write_text(yaml.safe_dump(content))
    yaml_path = tile_dataset(data, tmp_path / "out", size=SIZE, gap=GAP, rates=[0.5, 1.0])
    written = yaml.safe_load(yaml_path.read_text())
    assert (written["train"], written["val"], written["test"]) == ("images/train", "images/train", "images/test")
    out = yaml_path.parent
    assert len(list((out / "images" / "train").iterdir())) == 7
    whole = read_rows(out / "labels" / "train" / "scene__1024__0___0.txt")  # the 1024 window holds the image
    assert [c for c, _ in whole] == [k % 3 for k in range(len(OBJECTS))]
    np.testing.assert_allclose(np.stack([p for _, p in whole]) * (WIDTH, HEIGHT), corners, atol=1e-3)
    # a 400x300 image fills 11% of a 1024 window and 46% of a 512 one: only the window holding the most image is
    # kept, and its tile is the image itself; no labels for a split without label files
    assert [p.name for p in (out / "images" / "test").iterdir()] == ["far__512__0___0.png"]
    assert not (out / "labels" / "test").exists()


def test_refused_rows_are_reported_and_bad_settings_are_one_line_errors(scene, tmp_path, caplog):
    data, _, _ = scene
    label = data.parent / "labels" / "train" / "scene.txt"
    label.write_text(label.read_text() + "0 0.5 0.5 0.6 0.5 0.6 0.6\n")  # 7 values: not a box
    yaml_path = tile_dataset(data, tmp_path / "out", size=SIZE, gap=GAP)
    assert "expected 9 values (class and 4 corners x y), got 7" in caplog.text
    assert len(read_rows(yaml_path.parent / "labels" / "train" / "scene__512__0___0.txt")) == 3
    with pytest.raises(DatasetError, match="already holds files: tile into a new or empty folder"):
        tile_dataset(data, tmp_path / "out")
    with pytest.raises(CfgError, match="gap must be a whole number of pixels from 0 to size - 1"):
        tile_dataset(data, tmp_path / "other", size=512, gap=512)
    with pytest.raises(CfgError, match="rates must list positive numbers"):
        tile_dataset(data, tmp_path / "other", rates=[0])
    with pytest.raises(CfgError, match="min_inside must be a share"):
        tile_dataset(data, tmp_path / "other", min_inside=0)
    assert not (tmp_path / "other").exists()


def test_command_line_tiles_a_dataset(scene, tmp_path, capsys):
    data, _, _ = scene
    assert main(["convert", "tiles", str(data), str(tmp_path / "out"), "size=512", "gap=100", "rates=1,0.5"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out" / "data.yaml")
    assert len(list((tmp_path / "out" / "images" / "train").iterdir())) == 7
    assert main(["convert", "tiles", str(data), str(tmp_path / "b"), "rates=1,-2"]) == 2
    assert "rates=1,-2: expected positive numbers separated by commas" in capsys.readouterr().err
    assert main(["convert", "tiles", str(data), str(tmp_path / "b"), "min_inside=1.5"]) == 2
    assert "expected a share above 0 and at most 1" in capsys.readouterr().err
    assert main(["convert", "tiles", str(data)]) == 2
    assert "usage: yolotrain convert tiles DATA_YAML OUT_DIR" in capsys.readouterr().err
