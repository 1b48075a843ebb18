"""The generated shapes dataset: determinism, valid and tight labels, atomic cached generation."""

import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from yolotrain.data import builtin
from yolotrain.data.builtin import (
    BUILTIN_NAMES,
    builtin_data_yaml,
    generate_shapes_dataset,
    image_rng,
    render_scene,
)

TINY = dict(n_train=4, n_val=2, imgsz=96, seed=3)


def read_labels(path: Path) -> np.ndarray:
    return np.loadtxt(path, ndmin=2).reshape(-1, 5)


def label_boxes_in_pixels(labels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Normalised xywh label rows -> integer pixel xyxy (x2, y2 exclusive), checking they land on pixel edges."""
    cx, cy, w, h = labels[:, 1:].T
    xyxy = np.stack([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height], 1)
    assert np.allclose(xyxy, np.round(xyxy), atol=1e-3), "box edges must fall on pixel boundaries"
    return np.round(xyxy).astype(int)


def smooth(image: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(image.astype(np.float32), (5, 5), 0)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes_dataset(out, **TINY)
    return out


def tiny_generator(calls: list):
    """A stand-in for the full-size generator (which takes seconds) that records each call."""

    def generate(out_dir):
        calls.append(Path(out_dir))
        return generate_shapes_dataset(out_dir, n_train=2, n_val=1, imgsz=64, seed=0)

    return generate


# --- content ------------------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_files_and_other_seed_differs(tiny_dataset, tmp_path):
    generate_shapes_dataset(tmp_path / "again", **TINY)
    generate_shapes_dataset(tmp_path / "other", **{**TINY, "seed": TINY["seed"] + 1})
    files = sorted(p.relative_to(tiny_dataset) for p in tiny_dataset.rglob("*") if p.is_file())
    assert len(files) == 2 * (TINY["n_train"] + TINY["n_val"]) + 1  # images, labels, data.yaml
    for relative in files:
        assert (tmp_path / "again" / relative).read_bytes() == (tiny_dataset / relative).read_bytes(), relative
    first_image = Path("images/train/train_00000.jpg")
    assert (tmp_path / "other" / first_image).read_bytes() != (tiny_dataset / first_image).read_bytes()


def test_layout_yaml_and_labels_are_valid_yolo(tiny_dataset):
    data = yaml.safe_load((tiny_dataset / "data.yaml").read_text())
    assert data["names"] == list(BUILTIN_NAMES) and data["nc"] == len(BUILTIN_NAMES)
    for split, count in (("train", TINY["n_train"]), ("val", TINY["n_val"])):
        images = sorted((tiny_dataset / data[split]).glob("*.jpg"))
        labels = sorted((tiny_dataset / "labels" / split).glob("*.txt"))
        assert len(images) == count and [p.stem for p in images] == [p.stem for p in labels]
        for label_file in labels:
            rows = read_labels(label_file)
            assert len(rows) >= 1
            assert np.all(rows[:, 0] == np.round(rows[:, 0])) and np.all((rows[:, 0] >= 0) & (rows[:, 0] < 6))
            cx, cy, w, h = rows[:, 1:].T
            assert np.all((w > 0) & (h > 0))
            assert np.all(cx - w / 2 >= -1e-6) and np.all(cx + w / 2 <= 1 + 1e-6)
            assert np.all(cy - h / 2 >= -1e-6) and np.all(cy + h / 2 <= 1 + 1e-6)


def test_written_boxes_are_tight_around_each_drawn_shape(tiny_dataset):
    """Re-render every image: each label box must contain all of its shape's visible pixels and touch the shape on
    all four of its inner edges; the stored JPEG must be that rendering and the shape a uniformly painted region."""
    for split, count in (("train", TINY["n_train"]), ("val", TINY["n_val"])):
        for index in range(count):
            scene = render_scene(image_rng(TINY["seed"], split, index), TINY["imgsz"])
            stem = f"{split}_{index:05d}"
            stored = cv2.imread(str(tiny_dataset / "images" / split / f"{stem}.jpg"))
            assert stored.shape == scene.image.shape
            # JPEG drops the sensor noise and some chroma detail: compare smoothed images (a wrong image is ~50 off)
            assert np.abs(smooth(stored) - smooth(scene.image)).mean() < 6
            height, width = stored.shape[:2]
            labels = read_labels(tiny_dataset / "labels" / split / f"{stem}.txt")
            np.testing.assert_array_equal(labels[:, 0], scene.classes)
            boxes = label_boxes_in_pixels(labels, width, height)
            for shape_id, (x1, y1, x2, y2) in enumerate(boxes):
                mask = scene.object_ids == shape_id
                inside = mask[y1:y2, x1:x2]
                assert inside.sum() == mask.sum(), "a shape pixel lies outside its box"
                assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
                colours = scene.image[mask].astype(float)
                assert np.abs(colours - np.median(colours, 0)).mean() < 12  # one paint colour plus sensor noise


def test_scenes_cover_all_classes_and_a_range_of_sizes():
    scenes = [render_scene(image_rng(0, "train", i), 160) for i in range(40)]
    classes = np.concatenate([s.classes for s in scenes])
    assert set(classes.tolist()) == set(range(len(BUILTIN_NAMES)))
    extent = np.concatenate([np.maximum(s.boxes[:, 2] - s.boxes[:, 0], s.boxes[:, 3] - s.boxes[:, 1]) for s in scenes])
    min_side = np.concatenate([np.full(len(s.classes), min(s.image.shape[:2])) for s in scenes])
    relative_extent = extent / min_side
    assert extent.min() >= 8 and extent.min() < 20  # small objects exist, none below a few pixels
    assert relative_extent.max() > 0.3 and relative_extent.max() <= 0.55  # large ones reach about half the image


def test_square_polygon_box_follows_pixel_edge_convention():
    # A polygon through pixel centres (10, 10) .. (29, 19) fills columns 10..29 and rows 10..19.
    mask = builtin._rasterise(np.array([(10, 10), (29, 10), (29, 19), (10, 19)], float), 40, 40)
    object_ids = np.where(mask, 0, -1).astype(np.int16)
    np.testing.assert_array_equal(builtin._visible_boxes(object_ids, 1), [[10, 10, 30, 20]])


def test_occluded_shape_box_is_its_visible_extent():
    object_ids = np.full((20, 30), -1, dtype=np.int16)
    object_ids[2:12, 4:20] = 0
    object_ids[5:15, 14:26] = 1  # drawn later: hides the right part of shape 0 from column 14
    object_ids[2:5, 14:20] = 1  # and the rest of its right strip
    np.testing.assert_array_equal(builtin._visible_boxes(object_ids, 2), [[4, 2, 14, 12], [14, 2, 26, 15]])


# --- cached, atomic generation --------------------------------------------------------------------------------------


def test_builtin_yaml_generates_once_then_reuses(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(builtin, "generate_shapes_dataset", tiny_generator(calls))
    yaml_path = builtin_data_yaml(tmp_path)
    assert yaml_path == tmp_path / "shapes-v1" / "data.yaml" and yaml_path.is_file()
    assert (yaml_path.parent / builtin.COMPLETE_MARKER).is_file()
    image = next((yaml_path.parent / "images" / "train").glob("*.jpg"))
    stamps = yaml_path.stat().st_mtime_ns, image.stat().st_mtime_ns

    assert builtin_data_yaml(tmp_path) == yaml_path
    assert len(calls) == 1
    assert (yaml_path.stat().st_mtime_ns, image.stat().st_mtime_ns) == stamps
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes-v1"]  # no temp folder left behind


def test_cache_folder_comes_from_environment(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin, "generate_shapes_dataset", tiny_generator([]))
    monkeypatch.setenv("YOLOTRAIN_CACHE", str(tmp_path / "cache"))
    assert builtin_data_yaml() == tmp_path / "cache" / "shapes-v1" / "data.yaml"


def test_crash_during_generation_leaves_no_dataset(tmp_path, monkeypatch):
    def crash(out_dir):
        generate_shapes_dataset(out_dir, n_train=1, n_val=0, imgsz=64, seed=0)
        raise RuntimeError("killed mid-way")

    monkeypatch.setattr(builtin, "generate_shapes_dataset", crash)
    with pytest.raises(RuntimeError):
        builtin_data_yaml(tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither a final folder nor a temp one

    calls = []
    monkeypatch.setattr(builtin, "generate_shapes_dataset", tiny_generator(calls))
    assert builtin_data_yaml(tmp_path).is_file() and len(calls) == 1


def test_leftover_temp_folders_are_ignored_and_stale_ones_removed(tmp_path, monkeypatch):
    stale, recent = tmp_path / ".shapes-v1.tmp-crashed", tmp_path / ".shapes-v1.tmp-running"
    for leftover in (stale, recent):
        (leftover / "images" / "train").mkdir(parents=True)
        (leftover / "images" / "train" / "junk.jpg").write_bytes(b"not an image")
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    monkeypatch.setattr(builtin, "generate_shapes_dataset", tiny_generator([]))

    yaml_path = builtin_data_yaml(tmp_path)
    assert not stale.exists()
    assert recent.exists()  # may belong to a process still generating
    assert not list(yaml_path.parent.rglob("junk.jpg"))


def test_final_folder_without_marker_is_rebuilt(tmp_path, monkeypatch):
    half = tmp_path / "shapes-v1"
    (half / "images" / "train").mkdir(parents=True)
    (half / "data.yaml").write_text("train: images/train\n")  # a yaml but no completion marker
    calls = []
    monkeypatch.setattr(builtin, "generate_shapes_dataset", tiny_generator(calls))
    yaml_path = builtin_data_yaml(tmp_path)
    assert len(calls) == 1 and (half / builtin.COMPLETE_MARKER).is_file()
    assert yaml.safe_load(yaml_path.read_text())["names"] == list(BUILTIN_NAMES)


def test_concurrent_finisher_wins_and_our_copy_is_discarded(tmp_path, monkeypatch):
    def generate_while_another_process_finishes(out_dir):
        tiny_generator([])(out_dir)
        winner = tmp_path / "shapes-v1"  # the other process renames its finished copy into place first
        tiny_generator([])(winner)
        (winner / builtin.COMPLETE_MARKER).write_text("{}")
        (winner / "from_winner").write_text("")

    monkeypatch.setattr(builtin, "generate_shapes_dataset", generate_while_another_process_finishes)
    yaml_path = builtin_data_yaml(tmp_path)
    assert (yaml_path.parent / "from_winner").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes-v1"]


# --- segmentation set ---------------------------------------------------------------------------------------------


def rasterise_normalised(polygon: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bool mask of a normalised label polygon (continuous coordinates: pixel x spans [x, x + 1)), filled even-odd."""
    return builtin._rasterise(polygon * (width, height) - 0.5, height, width)


def read_polygons(path: Path) -> list:
    rows = [np.array(line.split(), float) for line in path.read_text().splitlines()]
    return [(int(row[0]), row[1:].reshape(-1, 2)) for row in rows]


def generated_tiny(tmp_path_factory, generate) -> Path:
    """A TINY set written by `generate` into a new temporary folder."""
    out = tmp_path_factory.mktemp(generate.__name__)
    generate(out, **TINY)
    return out


@pytest.fixture(scope="module")
def tiny_seg_dataset(tmp_path_factory) -> Path:
    return generated_tiny(tmp_path_factory, builtin.generate_shapes_seg_dataset)


def test_seg_set_has_the_detection_set_images_and_a_versioned_yaml(tiny_seg_dataset, tiny_dataset):
    seg_files = sorted(p.relative_to(tiny_seg_dataset) for p in tiny_seg_dataset.rglob("*") if p.is_file())
    det_files = sorted(p.relative_to(tiny_dataset) for p in tiny_dataset.rglob("*") if p.is_file())
    assert seg_files == det_files
    for relative in seg_files:
        if relative.suffix == ".jpg":
            assert (tiny_seg_dataset / relative).read_bytes() == (tiny_dataset / relative).read_bytes(), relative
    text = (tiny_seg_dataset / "data.yaml").read_text()
    assert builtin.SEG_VERSION in text.splitlines()[0]
    assert yaml.safe_load(text) == yaml.safe_load((tiny_dataset / "data.yaml").read_text())


def test_seg_generation_is_deterministic(tiny_seg_dataset, tmp_path):
    builtin.generate_shapes_seg_dataset(tmp_path / "again", **TINY)
    for path in tiny_seg_dataset.rglob("*"):
        if path.is_file():
            relative = path.relative_to(tiny_seg_dataset)
            assert (tmp_path / "again" / relative).read_bytes() == path.read_bytes(), relative


def test_every_seg_polygon_fills_its_shape_visible_pixels(tiny_seg_dataset):
    """Each written polygon, filled, covers what the image shows of its shape (IoU > 0.9), compactly."""
    for split, count in (("train", TINY["n_train"]), ("val", TINY["n_val"])):
        for index in range(count):
            scene = render_scene(image_rng(TINY["seed"], split, index), TINY["imgsz"])
            height, width = scene.object_ids.shape
            rows = read_polygons(tiny_seg_dataset / "labels" / split / f"{split}_{index:05d}.txt")
            assert [c for c, _ in rows] == scene.classes.tolist()
            for shape_id, (_, polygon) in enumerate(rows):
                assert len(polygon) >= 3 and np.all((polygon >= 0) & (polygon <= 1))
                assert len(polygon) <= 64  # simplified: a 48-gon circle does not become its pixel staircase
                filled, visible = rasterise_normalised(polygon, width, height), scene.object_ids == shape_id
                assert (filled & visible).sum() / (filled | visible).sum() > 0.9, (split, index, shape_id)


def test_seg_polygon_of_an_occluded_shape_follows_what_is_visible():
    """A square with a smaller square drawn inside it (a hole) and another over its corner: the label is the
    visible pixels, not the drawn square."""
    object_ids = np.full((40, 40), -1, dtype=np.int16)
    object_ids[5:30, 5:30] = 0
    object_ids[12:20, 12:20] = 1  # inside: a hole in shape 0
    object_ids[24:36, 24:36] = 2  # over the bottom-right corner
    drawn = [np.array([(5, 5), (30, 5), (30, 30), (5, 30)], float)]
    scene = builtin.ShapesScene(np.zeros((40, 40, 3), np.uint8), object_ids, np.array([1, 0, 4]),
                                builtin._visible_boxes(object_ids, 3), drawn * 3)
    rows = [np.array(line.split(), float) for line in builtin.yolo_seg_label_text(scene).splitlines()]
    assert [int(row[0]) for row in rows] == [1, 0, 4]
    for shape_id, row in enumerate(rows):
        filled, visible = rasterise_normalised(row[1:].reshape(-1, 2), 40, 40), object_ids == shape_id
        assert (filled & visible).sum() / (filled | visible).sum() > 0.95
    assert not rasterise_normalised(rows[0][1:].reshape(-1, 2), 40, 40)[14:18, 14:18].any()  # the hole stays open


def task_yaml_generated_once(tmp_path, monkeypatch, task: str, generator: str, version: str) -> Path:
    """`builtin_data_yaml_for(task)` asked twice, with the set's generator made tiny: it is the `version` folder's
    data.yaml, generated once."""
    calls, full_size = [], getattr(builtin, generator)

    def generate(out_dir):
        calls.append(Path(out_dir))
        return full_size(out_dir, n_train=2, n_val=1, imgsz=64, seed=0)

    monkeypatch.setattr(builtin, generator, generate)
    monkeypatch.setenv("YOLOTRAIN_CACHE", str(tmp_path))
    yaml_path = builtin.builtin_data_yaml_for(task)
    assert yaml_path == tmp_path / version / "data.yaml" and len(calls) == 1
    assert builtin.builtin_data_yaml_for(task) == yaml_path and len(calls) == 1
    return yaml_path


def test_segment_task_trains_on_the_seg_set(tmp_path, monkeypatch):
    yaml_path = task_yaml_generated_once(tmp_path, monkeypatch, "segment", "generate_shapes_seg_dataset",
                                         "shapes-seg-v1")
    label = next((yaml_path.parent / "labels" / "train").glob("*.txt"))
    assert all(len(line.split()) % 2 == 1 and len(line.split()) >= 7 for line in label.read_text().splitlines())


# --- oriented-box set ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_obb_dataset(tmp_path_factory) -> Path:
    return generated_tiny(tmp_path_factory, builtin.generate_shapes_obb_dataset)


def test_obb_set_layout_yaml_and_determinism(tiny_obb_dataset, tmp_path):
    text = (tiny_obb_dataset / "data.yaml").read_text()
    assert builtin.OBB_VERSION in text.splitlines()[0]
    data = yaml.safe_load(text)
    assert data == {"train": "images/train", "val": "images/val", "nc": 3, "names": ["square", "rectangle", "bar"]}
    builtin.generate_shapes_obb_dataset(tmp_path / "again", **TINY)
    files = sorted(p.relative_to(tiny_obb_dataset) for p in tiny_obb_dataset.rglob("*") if p.is_file())
    assert len(files) == 2 * (TINY["n_train"] + TINY["n_val"]) + 1
    for relative in files:
        assert (tmp_path / "again" / relative).read_bytes() == (tiny_obb_dataset / relative).read_bytes(), relative


def test_every_obb_label_encloses_its_rectangle_pixels(tiny_obb_dataset):
    """Each label's corners, filled, are its rectangle's pixels (IoU > 0.9), which the stored image paints in one
    colour; the corners run clockwise as seen, the first edge along the long side, in the class's aspect."""
    for split, count in (("train", TINY["n_train"]), ("val", TINY["n_val"])):
        for index in range(count):
            scene = builtin.render_obb_scene(image_rng(TINY["seed"], split, index), TINY["imgsz"])
            height, width = scene.object_ids.shape
            stored = cv2.imread(str(tiny_obb_dataset / "images" / split / f"{split}_{index:05d}.jpg"))
            rows = read_polygons(tiny_obb_dataset / "labels" / split / f"{split}_{index:05d}.txt")
            assert [c for c, _ in rows] == scene.classes.tolist() and len(rows) >= 1
            for shape_id, (class_index, corners) in enumerate(rows):
                assert corners.shape == (4, 2) and np.all((corners >= 0) & (corners <= 1))
                filled, drawn = rasterise_normalised(corners, width, height), scene.object_ids == shape_id
                assert (filled & drawn).sum() / (filled | drawn).sum() > 0.9, (split, index, shape_id)
                inner = cv2.erode(filled.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
                if inner.sum() >= 4:
                    colours = smooth(stored)[inner]
                    assert np.abs(colours - np.median(colours, 0)).mean() < 12  # one paint colour
                pixels = corners * (width, height)
                edges = np.roll(pixels, -1, 0) - pixels
                x, y = pixels[:, 0], pixels[:, 1]
                assert (x * np.roll(y, -1) - np.roll(x, -1) * y).sum() > 0  # clockwise as seen (y down)
                long_side, short_side = np.linalg.norm(edges[0]), np.linalg.norm(edges[1])
                low, high = builtin.OBB_ASPECTS[class_index]
                assert low - 1e-3 <= long_side / short_side <= high + 1e-3


def test_obb_scenes_cover_all_classes_angles_and_no_overlap():
    scenes = [builtin.render_obb_scene(image_rng(0, "train", i), 160) for i in range(40)]
    classes = np.concatenate([s.classes for s in scenes])
    assert set(classes.tolist()) == set(range(len(builtin.OBB_NAMES)))
    directions = np.concatenate([[np.arctan2(*(c[1] - c[0])[::-1]) % np.pi for c in s.outlines] for s in scenes])
    assert np.histogram(directions, bins=4, range=(0, np.pi))[0].min() > 10  # every angle occurs
    for scene in scenes:  # nothing hidden: each rectangle's pixels are all its own
        for shape_id, corners in enumerate(scene.outlines):
            filled = builtin._rasterise(corners - 0.5, *scene.object_ids.shape)
            np.testing.assert_array_equal(filled, scene.object_ids == shape_id)


def test_obb_labels_pass_the_label_scan_and_the_obb_task_trains_on_the_set(tmp_path, monkeypatch):
    from yolotrain.data.label_rows import LabelLayout
    from yolotrain.data.scan import ScanReport, read_label_file

    yaml_path = task_yaml_generated_once(tmp_path, monkeypatch, "obb", "generate_shapes_obb_dataset", "shapes-obb-v1")
    report = ScanReport()
    for label in sorted((yaml_path.parent / "labels").rglob("*.txt")):
        objects = read_label_file(str(label), 3, report, LabelLayout.for_task("obb"))
        assert len(objects["corners"]) == len(label.read_text().splitlines())
    assert not report.counts
