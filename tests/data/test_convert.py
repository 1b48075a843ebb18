"""COCO -> YOLO conversion: exact label lines for hand-computed boxes, layout, and clear errors for bad input."""

import json
import logging

import cv2
import numpy as np
import pytest
import yaml

from yolotrain.data.convert import convert_coco, convert_masks
from yolotrain.errors import CfgError, DatasetError

IMAGES = [
    {"id": 11, "file_name": "a.jpg", "width": 100, "height": 50},
    {"id": 12, "file_name": "b.jpg", "width": 200, "height": 100},
    {"id": 13, "file_name": "c.jpg", "width": 64, "height": 64},  # no annotations
]
# Out of order on purpose: classes follow ascending category id (3 -> 0 "cat", 7 -> 1 "dog").
CATEGORIES = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}]
ANNOTATIONS = [
    {"id": 1, "image_id": 11, "category_id": 3, "bbox": [10, 5, 20, 10]},
    {"id": 2, "image_id": 12, "category_id": 7, "bbox": [0, 0, 50, 50], "iscrowd": 1},
    {"id": 3, "image_id": 12, "category_id": 3, "bbox": [50, 25, 100, 50], "iscrowd": 0},
    {"id": 4, "image_id": 11, "category_id": 7, "bbox": [80, 30, 40, 30]},  # spills past the right and bottom
    {"id": 5, "image_id": 12, "category_id": 7, "bbox": [210, 10, 5, 5]},  # wholly outside: empty after clipping
    {"id": 6, "image_id": 12, "category_id": 7, "bbox": [-10, -20, 30, 40]},  # spills past the left and top
]
EXPECTED_LABELS = {
    # x 10..30 of 100, y 5..15 of 50
    "a": ["0 0.200000 0.200000 0.200000 0.200000",
          # x 80..120 -> 80..100, y 30..60 -> 30..50
          "1 0.900000 0.800000 0.200000 0.400000"],
    # crowd skipped; x 50..150 of 200, y 25..75 of 100; outside box dropped; x -10..20 -> 0..20, y -20..20 -> 0..20
    "b": ["0 0.500000 0.500000 0.500000 0.500000",
          "1 0.050000 0.100000 0.100000 0.200000"],
    "c": [],
}  # fmt: skip


def write_coco(tmp_path, name="instances_mini.json", **overrides):
    coco = {"images": IMAGES, "annotations": ANNOTATIONS, "categories": CATEGORIES, **overrides}
    path = tmp_path / name
    path.write_text(json.dumps(coco))
    return path


def write_images(folder, images=IMAGES):
    folder.mkdir(parents=True, exist_ok=True)
    for image in images:
        pixels = np.full((image["height"], image["width"], 3), image["id"], dtype=np.uint8)
        cv2.imwrite(str(folder / image["file_name"]), pixels)
    return folder


def test_labels_match_hand_computed_lines(tmp_path, caplog):
    src_images = write_images(tmp_path / "src")
    with caplog.at_level(logging.INFO, logger="yolotrain.data.convert"):
        yaml_path = convert_coco(write_coco(tmp_path), src_images, tmp_path / "out")

    assert yaml_path == tmp_path / "out" / "data.yaml"
    for stem, lines in EXPECTED_LABELS.items():
        assert (tmp_path / "out" / "labels" / "mini" / f"{stem}.txt").read_text().splitlines() == lines
    summary = caplog.records[-1].getMessage()
    assert "3 images" in summary and "4 boxes" in summary and "1 crowd" in summary and "2 classes" in summary


def test_images_yaml_and_split_name(tmp_path):
    src_images = write_images(tmp_path / "src")
    yaml_path = convert_coco(write_coco(tmp_path), src_images, tmp_path / "out")

    data = yaml.safe_load(yaml_path.read_text())
    assert data["train"] == data["val"] == "images/mini"  # "instances_" prefix dropped from the json stem
    assert data["names"] == ["cat", "dog"] and data["nc"] == 2
    for image in IMAGES:
        linked = tmp_path / "out" / "images" / "mini" / image["file_name"]
        assert linked.read_bytes() == (src_images / image["file_name"]).read_bytes()


def test_converting_again_replaces_previous_output(tmp_path):
    src_images = write_images(tmp_path / "src")
    convert_coco(write_coco(tmp_path), src_images, tmp_path / "out")
    convert_coco(write_coco(tmp_path, annotations=[]), src_images, tmp_path / "out")
    assert (tmp_path / "out" / "labels" / "mini" / "a.txt").read_text() == ""


def test_split_name_is_the_json_stem(tmp_path):
    src_images = write_images(tmp_path / "src")
    yaml_path = convert_coco(write_coco(tmp_path, name="val_subset.json"), src_images, tmp_path / "out")
    assert yaml.safe_load(yaml_path.read_text())["val"] == "images/val_subset"
    assert (tmp_path / "out" / "labels" / "val_subset" / "a.txt").is_file()


def test_missing_images_are_skipped_with_a_warning(tmp_path, caplog):
    src_images = write_images(tmp_path / "src", IMAGES[:2])
    with caplog.at_level(logging.WARNING, logger="yolotrain.data.convert"):
        convert_coco(write_coco(tmp_path), src_images, tmp_path / "out")
    assert "c.jpg" in caplog.text
    assert not (tmp_path / "out" / "labels" / "mini" / "c.txt").exists()
    assert (tmp_path / "out" / "labels" / "mini" / "a.txt").read_text().splitlines() == EXPECTED_LABELS["a"]


def test_no_image_found_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="None of the 3 images"):
        convert_coco(write_coco(tmp_path), tmp_path / "nowhere", tmp_path / "out")


@pytest.mark.parametrize(
    "content, expected",
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        (json.dumps({"images": IMAGES, "annotations": ANNOTATIONS}), "'categories'"),
        (json.dumps({"images": IMAGES, "annotations": [{"image_id": 11, "category_id": 3}], "categories": CATEGORIES}),
         r"annotations\[0\] lacks key 'bbox'"),
        (json.dumps({"images": IMAGES, "annotations": [{**ANNOTATIONS[0], "category_id": 5}], "categories": CATEGORIES}),
         r"annotations\[0\] has category_id 5, not found in 'categories'"),
        (json.dumps({"images": IMAGES, "annotations": [{**ANNOTATIONS[0], "image_id": 99}], "categories": CATEGORIES}),
         r"annotations\[0\] has image_id 99, not found in 'images'"),
        (json.dumps({"images": IMAGES, "annotations": [{**ANNOTATIONS[0], "bbox": [1, 2]}], "categories": CATEGORIES}),
         r"'bbox' must be \[x, y, width, height\]"),
    ],
)  # fmt: skip
def test_bad_json_raises_one_line_naming_the_file(tmp_path, content, expected):
    src = tmp_path / "broken.json"
    src.write_text(content)
    with pytest.raises(DatasetError, match=expected) as raised:
        convert_coco(src, tmp_path, tmp_path / "out")
    message = str(raised.value)
    assert str(src) in message and "\n" not in message
    assert not (tmp_path / "out").exists()  # nothing written before the input is known to be good


def test_missing_json_file(tmp_path):
    with pytest.raises(DatasetError, match="not found") as raised:
        convert_coco(tmp_path / "absent.json", tmp_path, tmp_path / "out")
    assert "absent.json" in str(raised.value)


def test_keypoint_annotations_become_pose_rows_with_kpt_shape_and_flip_idx(tmp_path):
    """person_keypoints_*.json: each box row is followed by its keypoints (normalised, visibility kept, unlabelled
    as 0 0 0), and the data yaml gets kpt_shape and the left/right mirror map from the keypoint names."""
    categories = [{"id": 1, "name": "person", "keypoints": ["nose", "left_eye", "right_eye"]}]
    annotations = [
        {"id": 1, "image_id": 11, "category_id": 1, "bbox": [10, 5, 20, 10], "num_keypoints": 2,
         "keypoints": [20, 10, 2, 15, 8, 1, 0, 0, 0]},
        {"id": 2, "image_id": 12, "category_id": 1, "bbox": [50, 25, 100, 50], "num_keypoints": 0,
         "keypoints": [0, 0, 0, 0, 0, 0, 0, 0, 0]},
    ]  # fmt: skip
    src = write_coco(tmp_path, name="person_keypoints_mini.json", annotations=annotations, categories=categories)
    yaml_path = convert_coco(src, write_images(tmp_path / "src"), tmp_path / "out")
    data = yaml.safe_load(yaml_path.read_text())
    assert data["kpt_shape"] == [3, 3] and data["flip_idx"] == [0, 2, 1] and data["train"] == "images/mini"
    labels = tmp_path / "out" / "labels" / "mini"
    assert (labels / "a.txt").read_text().splitlines() == [
        "0 0.200000 0.200000 0.200000 0.200000 0.200000 0.200000 2 0.150000 0.160000 1 0.000000 0.000000 0"]
    assert (labels / "b.txt").read_text().splitlines() == [
        "0 0.500000 0.500000 0.500000 0.500000 0.000000 0.000000 0 0.000000 0.000000 0 0.000000 0.000000 0"]

    from yolotrain.data.data_yaml import check_det_dataset
    from yolotrain.data.dataset import YOLODataset

    checked = check_det_dataset(yaml_path)
    dataset = YOLODataset(checked["val"], imgsz=64, data=checked, task="pose", workers=1)
    assert sum(len(label["keypoints"]) for label in dataset.labels) == 2


# --- segmentation: COCO polygons and RLE, mask images -------------------------------------------------------------

SEG_IMAGE = {"id": 21, "file_name": "s.png", "width": 80, "height": 60}
SEG_CATEGORIES = [{"id": 1, "name": "blob"}, {"id": 2, "name": "bar"}]


def rasterise(polygon: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bool mask of a (k, 2) polygon in continuous pixel coordinates (pixel x spans [x, x + 1)), filled even-odd."""
    mask = np.zeros((height, width), np.uint8)
    cv2.fillPoly(mask, [np.round((polygon - 0.5) * 16).astype(np.int32)], 1, shift=4)
    return mask.astype(bool)


def label_polygons(path) -> list:
    """(class, (k, 2) normalised polygon) per line of a segmentation label file."""
    rows = [np.array(line.split(), float) for line in path.read_text().splitlines()]
    return [(int(row[0]), row[1:].reshape(-1, 2)) for row in rows]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


def star(centre, outer, inner, points=5) -> np.ndarray:
    angles = np.arange(2 * points) * np.pi / points
    radius = np.where(np.arange(2 * points) % 2, inner, outer)
    return np.stack([centre[0] + radius * np.cos(angles), centre[1] + radius * np.sin(angles)], 1)


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a mask, counted by hand: run lengths down the columns, starting with background."""
    flat = mask.T.ravel()
    changes = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return {"counts": ([0] + runs) if flat[0] else runs, "size": list(mask.shape)}


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools' decode, numpy 2
def test_compressed_rle_decodes_as_pycocotools_does():
    """Real masks (the built-in scenes' shapes, a noise field, empty and full) through pycocotools' encoder and our
    decoder, compressed and as uncompressed run lengths."""
    cocomask = pytest.importorskip("pycocotools.mask")
    from yolotrain.data.builtin import image_rng, render_scene
    from yolotrain.data.convert import rle_to_mask

    masks = []
    for index in range(6):
        scene = render_scene(image_rng(0, "train", index), 160)
        masks += [scene.object_ids == k for k in range(len(scene.classes))] + [scene.object_ids >= 0]
    noise = np.random.default_rng(0).random((37, 53)) < 0.5
    masks += [noise, np.zeros((5, 7), bool), np.ones((5, 7), bool), np.ones((1, 1), bool)]
    for mask in masks:
        rle = cocomask.encode(np.asfortranarray(mask.astype(np.uint8)))
        expected = cocomask.decode(rle).astype(bool)
        decoded = rle_to_mask({"counts": rle["counts"].decode("ascii"), "size": rle["size"]})
        np.testing.assert_array_equal(decoded, expected)
        np.testing.assert_array_equal(rle_to_mask(uncompressed_rle(mask)), expected)


@pytest.mark.parametrize(
    "rle, expected",
    [
        ({"counts": "0", "size": [2, 2]}, "add up to 0 pixels, its size 2x2 has 4"),
        ({"counts": [1, 2], "size": [2, 2]}, "add up to 3 pixels"),
        ({"counts": [2, -1, 3], "size": [2, 2]}, "negative run length -1"),
        ({"counts": "4~", "size": [2, 2]}, "characters outside '0'..'o'"),
        ({"counts": "0P", "size": [2, 2]}, "ends in the middle of a count"),
        ({"counts": [1, 3], "size": [2]}, r"'size' must be \[height, width\]"),
        ({"counts": {"a": 1}, "size": [2, 2]}, "list of whole run lengths or a compressed string"),
    ],
)  # fmt: skip
def test_malformed_rle_is_a_one_line_error_naming_its_source(rle, expected):
    from yolotrain.data.convert import rle_to_mask

    with pytest.raises(DatasetError, match=expected) as raised:
        rle_to_mask(rle, "x.json: annotation id 3")
    assert str(raised.value).startswith("x.json: annotation id 3: ") and "\n" not in str(raised.value)


def test_two_part_object_is_joined_by_its_shortest_link_walked_there_and_back():
    from yolotrain.data.convert import join_polygons

    left = np.array([(0, 0), (10, 0), (10, 10), (0, 10)], float)
    right = np.array([(20, 3), (30, 3), (30, 9), (20, 9)], float)  # closest pair: (10, 10) and (20, 9)
    joined = join_polygons([left, right])
    expected = [(10, 10), (20, 9), (20, 3), (30, 3), (30, 9), (20, 9), (10, 10), (0, 10), (0, 0), (10, 0)]
    np.testing.assert_array_equal(joined, expected)

    filled = rasterise(joined, 12, 32)
    both = rasterise(left, 12, 32) | rasterise(right, 12, 32)
    link = filled & ~both  # the link walked twice adds only its own line of pixels
    assert (both & ~filled).sum() == 0 and link.sum() <= 12


def test_a_hole_joined_into_the_outline_stays_empty_when_filled():
    from yolotrain.data.convert import mask_polygons, mask_outline

    ring = np.zeros((50, 50), np.uint8)
    cv2.circle(ring, (25, 25), 20, 1, -1)
    cv2.circle(ring, (25, 25), 9, 0, -1)
    cv2.rectangle(ring, (23, 23), (27, 27), 1, -1)  # an island inside the hole
    polygon = mask_outline(ring)
    assert iou(rasterise(polygon, 50, 50), ring.astype(bool)) > 0.95
    assert len(mask_polygons(ring)) == 2  # the ring (with its hole) and the island


def write_seg_coco(tmp_path, annotations, image=SEG_IMAGE, name="instances_seg.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"images": [image], "annotations": annotations, "categories": SEG_CATEGORIES}))
    write_images(tmp_path / "src", [image])
    return path


def polygon_annotation(annotation_id, parts, category_id=1, **extra):
    points = np.concatenate([np.reshape(part, (-1, 2)) for part in parts])
    x1, y1 = points.min(0)
    x2, y2 = points.max(0)
    return {"id": annotation_id, "image_id": SEG_IMAGE["id"], "category_id": category_id,
            "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
            "segmentation": [np.ravel(part).tolist() for part in parts], **extra}


def test_coco_polygons_become_segment_rows_and_round_trip(tmp_path):
    """polygon -> YOLO row -> mask equals polygon -> mask; a two-part object is one joined row; a polygon past the
    image is clipped into it; a keypoint-free detection file keeps its yaml keys."""
    blob = star((30, 25), 18, 8)
    left, right = np.array([(2, 40), (12, 40), (12, 55), (2, 55)]), np.array([(20, 44), (32, 44), (32, 52), (20, 52)])
    spill = np.array([(60, 40), (90, 40), (90, 70), (60, 70)])  # past the right and bottom edges
    annotations = [polygon_annotation(1, [blob]), polygon_annotation(2, [left, right], 2),
                   polygon_annotation(3, [spill], 2)]
    yaml_path = convert_coco(write_seg_coco(tmp_path, annotations), tmp_path / "src", tmp_path / "out", segments=True)

    rows = label_polygons(tmp_path / "out" / "labels" / "seg" / "s.txt")
    assert [c for c, _ in rows] == [0, 1, 1]
    size = np.array([SEG_IMAGE["width"], SEG_IMAGE["height"]])
    height, width = SEG_IMAGE["height"], SEG_IMAGE["width"]
    assert iou(rasterise(rows[0][1] * size, height, width), rasterise(blob, height, width)) > 0.99
    two_parts = rasterise(left, height, width) | rasterise(right, height, width)
    assert iou(rasterise(rows[1][1] * size, height, width), two_parts) > 0.95
    from yolotrain.data.convert import join_polygons

    np.testing.assert_allclose(rows[1][1] * size, join_polygons([left, right]), atol=1e-4)
    np.testing.assert_allclose(rows[2][1] * size, [(60, 40), (80, 40), (80, 60), (60, 60)], atol=1e-4)
    data = yaml.safe_load(yaml_path.read_text())
    assert data["names"] == ["blob", "bar"] and "kpt_shape" not in data

    from yolotrain.data.label_rows import LabelLayout

    columns = np.array([1 + 2 * len(polygon) for _, polygon in rows])
    assert LabelLayout.for_task("segment").accepts(columns).all()


def rle_annotation(annotation_id, mask, compressed=True, **extra):
    cocomask = pytest.importorskip("pycocotools.mask")
    rle = cocomask.encode(np.asfortranarray(mask.astype(np.uint8)))
    x, y, w, h = cocomask.toBbox(rle).tolist()
    if compressed:
        segmentation = {"counts": rle["counts"].decode("ascii"), "size": rle["size"]}
    else:
        segmentation = uncompressed_rle(mask)
    return {"id": annotation_id, "image_id": SEG_IMAGE["id"], "category_id": 1, "bbox": [x, y, w, h],
            "segmentation": segmentation, **extra}


@pytest.mark.parametrize("compressed", [True, False])
def test_rle_masks_round_trip_through_the_converter(tmp_path, compressed):
    """polygon -> mask -> RLE (crowd and not) -> converter -> YOLO polygon -> mask: IoU > 0.95."""
    height, width = SEG_IMAGE["height"], SEG_IMAGE["width"]
    crowd = rasterise(star((25, 30), 22, 10), height, width)
    crowd[25:35, 20:30] = False  # a hole
    ring = rasterise(np.array([(50, 5), (75, 5), (75, 30), (50, 30)], float), height, width)
    ring |= rasterise(np.array([(55, 40), (70, 40), (70, 55), (55, 55)], float), height, width)  # a second part
    annotations = [rle_annotation(1, crowd, compressed, iscrowd=1), rle_annotation(2, ring, compressed, iscrowd=0)]
    src = write_seg_coco(tmp_path, annotations)

    convert_coco(src, tmp_path / "src", tmp_path / "default", segments=True)
    assert len(label_polygons(tmp_path / "default" / "labels" / "seg" / "s.txt")) == 1  # the crowd skipped
    convert_coco(src, tmp_path / "src", tmp_path / "out", segments=True, include_crowd=True)
    rows = label_polygons(tmp_path / "out" / "labels" / "seg" / "s.txt")
    size = np.array([width, height])
    for (class_index, polygon), mask in zip(rows, (crowd, ring)):
        assert class_index == 0
        assert iou(rasterise(polygon * size, height, width), mask) > 0.95


def test_degenerate_segmentations_are_skipped_counted_and_named(tmp_path, caplog):
    annotations = [
        polygon_annotation(1, [[(5, 5), (20, 5), (20, 20)], [(30, 30), (31, 31)]]),  # the 2-point part left out
        polygon_annotation(7, [[(40, 10), (50, 10)]], bbox=[40, 5, 10, 10]),  # no part of 3 points: skipped
        {**polygon_annotation(8, [[(1, 1), (9, 1), (9, 9)]]), "segmentation": []},  # no polygon at all
        polygon_annotation(9, [[(10, 30), (20, 30), (20, 40)]]),
    ]
    with caplog.at_level(logging.WARNING, logger="yolotrain.data.convert"):
        convert_coco(write_seg_coco(tmp_path, annotations), tmp_path / "src", tmp_path / "out", segments=True)
    rows = label_polygons(tmp_path / "out" / "labels" / "seg" / "s.txt")
    assert [len(polygon) for _, polygon in rows] == [3, 3]
    assert "2 annotations of instances_seg.json" in caplog.text and "annotation id 7" in caplog.text


@pytest.mark.parametrize(
    "segmentation, expected",
    [
        ([[1, 2, 3, 4, 5, 6, 7]], "annotation id 5: a 'segmentation' polygon has 7 coordinates, an odd count"),
        ([[1, 2, "x", 4, 5, 6]], r"annotation id 5: each 'segmentation' polygon must be a list of numbers"),
        ("polygon", "annotation id 5: 'segmentation' must be a list of polygons or an RLE object, got str"),
        ({"counts": [48], "size": [6, 8]}, r"annotation id 5: its RLE 'size' \[6, 8\] is not its image's"),
        ({"counts": [10], "size": [60, 80]}, "annotation id 5: RLE 'counts' add up to 10 pixels"),
    ],
)  # fmt: skip
def test_malformed_segmentation_is_a_one_line_error_naming_file_and_annotation(tmp_path, segmentation, expected):
    annotation = {**polygon_annotation(5, [[(1, 1), (9, 1), (9, 9)]]), "segmentation": segmentation}
    src = write_seg_coco(tmp_path, [annotation])
    with pytest.raises(DatasetError, match=expected) as raised:
        convert_coco(src, tmp_path / "src", tmp_path / "out", segments=True)
    assert str(src) in str(raised.value) and "\n" not in str(raised.value)
    assert not (tmp_path / "out").exists()


def write_mask_split(root, masks: dict, suffix=".png"):
    """masks/<split> PNGs and images/<split> JPEGs of the same stems; returns (masks_dir, images_dir)."""
    masks_dir, images_dir = root / "masks" / "val", root / "images" / "val"
    masks_dir.mkdir(parents=True)
    images_dir.mkdir(parents=True)
    for stem, mask in masks.items():
        assert cv2.imwrite(str(masks_dir / f"{stem}{suffix}"), mask)
        assert cv2.imwrite(str(images_dir / f"{stem}.jpg"), np.zeros((*mask.shape[:2], 3), np.uint8))
    return masks_dir, images_dir


def test_indexed_masks_round_trip_one_object_per_region(tmp_path, caplog):
    """polygon -> indexed mask PNG -> convert_masks -> YOLO polygons -> masks: IoU > 0.95 per region; 0 is
    background, v is class v - 1, 255 (void) is ignored, regions under min_area are dropped and counted."""
    height, width = 90, 120
    shapes = {1: [star((30, 30), 25, 11)], 2: [np.array([(70, 10), (110, 10), (110, 40), (70, 40)]),
                                                np.array([(75, 55), (115, 55), (100, 85)])]}
    mask = np.zeros((height, width), np.uint8)
    for value, polygons in shapes.items():
        for polygon in polygons:
            mask[rasterise(polygon, height, width)] = value
    mask[60:64, 10:50] = 255  # a void border
    mask[80:82, 5:7] = 1  # 4 pixels of noise
    masks_dir, images_dir = write_mask_split(tmp_path, {"a": mask})
    with caplog.at_level(logging.INFO, logger="yolotrain.data.convert"):
        yaml_path = convert_masks(masks_dir, images_dir, tmp_path / "out", names=["star", "box"])

    data = yaml.safe_load(yaml_path.read_text())
    assert data["names"] == ["star", "box"] and data["train"] == data["val"] == "images/val"
    assert (tmp_path / "out" / "images" / "val" / "a.jpg").is_file()
    rows = label_polygons(tmp_path / "out" / "labels" / "val" / "a.txt")
    assert [c for c, _ in rows] == [0, 1, 1]
    drawn = [rasterise(polygon * (width, height), height, width) for _, polygon in rows]
    expected = [rasterise(p, height, width) for value in (1, 2) for p in shapes[value]]
    for i, region in enumerate(expected):
        assert max(iou(d, region) for d in drawn) > 0.95, f"region {i}"
    assert "1 regions under 16 pixels dropped" in caplog.records[-1].getMessage()

    convert_masks(masks_dir, images_dir, tmp_path / "joined", names=["star", "box"], split_regions=False)
    joined = label_polygons(tmp_path / "joined" / "labels" / "val" / "a.txt")
    assert [c for c, _ in joined] == [0, 1]
    both = rasterise(joined[1][1] * (width, height), height, width)
    assert iou(both, expected[1] | expected[2]) > 0.95


def test_binary_masks_and_pixel_classes(tmp_path):
    """One class: every non-zero pixel (a 0/255 mask) is the object. pixel_classes picks values (16-bit ones too),
    others are background. A hole stays a hole; a dotted stem keeps its dots."""
    mask = np.zeros((64, 64), np.uint8)
    cv2.circle(mask, (32, 32), 24, 255, -1)
    cv2.circle(mask, (32, 32), 8, 0, -1)
    masks_dir, images_dir = write_mask_split(tmp_path, {"b.v2": mask})
    convert_masks(masks_dir, images_dir, tmp_path / "out", names=["disc"])
    assert (tmp_path / "out" / "images" / "val" / "b.v2.jpg").is_file()
    [(class_index, polygon)] = label_polygons(tmp_path / "out" / "labels" / "val" / "b.v2.txt")
    assert class_index == 0 and iou(rasterise(polygon * 64, 64, 64), mask > 0) > 0.95

    deep = mask.astype(np.uint16)
    deep[:10, :10] = 1000
    convert_masks(write_mask_split(tmp_path / "mapped", {"b": deep})[0], tmp_path / "mapped" / "images" / "val",
                  tmp_path / "mapped_out", names=["square", "disc"], pixel_classes={1000: 0, 255: 1})
    rows = label_polygons(tmp_path / "mapped_out" / "labels" / "val" / "b.txt")
    assert [c for c, _ in rows] == [0, 1]
    assert iou(rasterise(rows[0][1] * 64, 64, 64), deep == 1000) > 0.95


def test_bad_masks_and_arguments_are_one_line_errors(tmp_path):
    mask = np.zeros((20, 20), np.uint8)
    mask[5:15, 5:15] = 9
    masks_dir, images_dir = write_mask_split(tmp_path, {"m": mask})
    with pytest.raises(DatasetError, match="has pixel value 9, not a class: with 2 names") as raised:
        convert_masks(masks_dir, images_dir, tmp_path / "out", names=["a", "b"])
    assert str(masks_dir / "m.png") in str(raised.value)
    assert not (tmp_path / "out").exists()

    colour = np.zeros((20, 20, 3), np.uint8)
    colour[5:15, 5:15] = (0, 0, 128)  # a VOC-style colour mask
    colour_dir, colour_images = write_mask_split(tmp_path / "colour", {"c": colour})
    with pytest.raises(DatasetError, match="is a colour image"):
        convert_masks(colour_dir, colour_images, tmp_path / "out", names=["a"])
    with pytest.raises(CfgError, match="pixel value 9 maps to 4, not a class 0 to 1"):
        convert_masks(masks_dir, images_dir, tmp_path / "out", names=["a", "b"], pixel_classes={9: 4})
    with pytest.raises(CfgError, match="names must list the class names"):
        convert_masks(masks_dir, images_dir, tmp_path / "out", names=[])
    with pytest.raises(DatasetError, match="None of the 1 masks"):
        convert_masks(masks_dir, tmp_path / "nowhere", tmp_path / "out", names=["a"])
    with pytest.raises(DatasetError, match="no mask images"):
        convert_masks(images_dir, images_dir, tmp_path / "out", names=["a"])


def test_command_line_converts_segments_and_masks(tmp_path, capsys):
    from yolotrain.cli import main

    annotations = [polygon_annotation(1, [star((30, 25), 18, 8)])]
    src = write_seg_coco(tmp_path, annotations)
    assert main(["convert", "coco", str(src), str(tmp_path / "src"), str(tmp_path / "out"), "segments=True"]) == 0
    assert len(label_polygons(tmp_path / "out" / "labels" / "seg" / "s.txt")[0][1]) == 10

    mask = np.zeros((40, 40), np.uint8)
    mask[10:30, 5:20] = 255
    masks_dir, images_dir = write_mask_split(tmp_path / "m", {"k": mask})
    argv = ["convert", "masks", str(masks_dir), str(images_dir), str(tmp_path / "m_out"), "names=thing,other",
            "pixel_classes=255:1", "min_area=4"]
    assert main(argv) == 0
    assert [c for c, _ in label_polygons(tmp_path / "m_out" / "labels" / "val" / "k.txt")] == [1]

    assert main(["convert", "coco", str(src), "a", "b", "segment=True"]) == 2
    assert "'segment' is not an option of this convert command (segments, include_crowd)" in capsys.readouterr().err
    assert main(["convert", "masks", str(masks_dir), str(images_dir), "out"]) == 2
    assert "needs names=" in capsys.readouterr().err
    assert main([*argv[:-2], "pixel_classes=255"]) == 2
    assert "expected pixel value:class pairs" in capsys.readouterr().err


# --- DOTA oriented boxes ----------------------------------------------------------------------------------------

DOTA_P1 = """imagesource:GoogleEarth
gsd:0.146343
10 10 50 10 50 30 10 30 plane 0
100 20 140 40 120 80 80 60 small-vehicle 1
190 50 210 50 210 70 190 70 ship 0
300 10 320 10 320 20 300 20 harbor 0
"""
EXPECTED_P1 = [
    "0 0.050000 0.100000 0.250000 0.100000 0.250000 0.300000 0.050000 0.300000",  # x / 200, y / 100
    "10 0.500000 0.200000 0.700000 0.400000 0.600000 0.800000 0.400000 0.600000",  # a rotated square, difficult
    "1 0.950000 0.500000 1.000000 0.500000 1.000000 0.700000 0.950000 0.700000",  # x 190..210 cut at 200
]  # the harbor at x 300..320 is outside its 200 px image: dropped


def write_dota_split(root, split, files):
    """root/<split>/images/<stem>.png and root/<split>/labelTxt/<stem>.txt (DOTA's layout); files: {stem: (width,
    height, label text)}."""
    images, labels = root / split / "images", root / split / "labelTxt"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for stem, (width, height, text) in files.items():
        cv2.imwrite(str(images / f"{stem}.png"), np.zeros((height, width, 3), np.uint8))
        (labels / f"{stem}.txt").write_text(text)
    return labels, images


def test_dota_labels_become_normalised_corner_rows(tmp_path, caplog):
    from yolotrain.data.convert import DOTA_CLASSES, convert_dota

    labels, images = write_dota_split(tmp_path / "DOTA", "train", {"P0001": (200, 100, DOTA_P1),
                                                                   "P0002": (64, 48, "")})
    with caplog.at_level(logging.INFO, logger="yolotrain.data.convert"):
        yaml_path = convert_dota(labels, images, tmp_path / "out")
    assert ("2 images, 3 objects (1 difficult kept, 1 cut at the image edge, 1 outside their image dropped)"
            in caplog.text)
    out = tmp_path / "out"
    assert (out / "labels" / "train" / "P0001.txt").read_text().splitlines() == EXPECTED_P1
    assert (out / "labels" / "train" / "P0002.txt").read_text() == ""
    assert (out / "images" / "train" / "P0001.png").is_file()
    data = yaml.safe_load(yaml_path.read_text())
    assert data == {"train": "images/train", "val": "images/train", "nc": 15, "names": list(DOTA_CLASSES["1.0"])}
    assert data["names"][:3] == ["plane", "ship", "storage-tank"] and len(DOTA_CLASSES["1.5"]) == 16

    # the rows are what the label scan reads for the obb task, without a complaint
    from yolotrain.data.label_rows import LabelLayout
    from yolotrain.data.scan import ScanReport, read_label_file

    report = ScanReport()
    objects = read_label_file(str(out / "labels" / "train" / "P0001.txt"), 15, report, LabelLayout.for_task("obb"))
    assert not report.counts and objects["corners"].shape == (3, 4, 2)


def test_dota_difficult_objects_versions_names_and_train_val_in_one_folder(tmp_path):
    from yolotrain.data.convert import convert_dota

    labels, images = write_dota_split(tmp_path / "DOTA", "train", {"P0001": (200, 100, DOTA_P1)})
    convert_dota(labels, images, tmp_path / "out", include_difficult=False)
    rows = (tmp_path / "out" / "labels" / "train" / "P0001.txt").read_text().splitlines()
    assert rows == [EXPECTED_P1[0], EXPECTED_P1[2]]

    crane = "0 0 20 0 20 10 0 10 container-crane\n"  # no difficulty: 0
    val_labels, val_images = write_dota_split(tmp_path / "DOTA", "val", {"P0003": (40, 20, crane)})
    with pytest.raises(DatasetError, match=r"P0003.txt, line 1: class 'container-crane' is not one of the 15 DOTA "
                                           r"v1.0 classes \(plane, ship, "):
        convert_dota(val_labels, val_images, tmp_path / "out")
    assert not (tmp_path / "out" / "labels" / "val").exists()  # nothing written before every file was read
    yaml_path = convert_dota(val_labels, val_images, tmp_path / "out", version="1.5")
    assert (tmp_path / "out" / "labels" / "val" / "P0003.txt").read_text() == (
        "15 0.000000 0.000000 0.500000 0.000000 0.500000 0.500000 0.000000 0.500000\n")
    data = yaml.safe_load(yaml_path.read_text())
    assert (data["train"], data["val"], data["nc"]) == ("images/train", "images/val", 16)

    yaml_path = convert_dota(val_labels, val_images, tmp_path / "own", names=["crane", "container-crane"],
                             split="cranes")
    assert (tmp_path / "own" / "labels" / "cranes" / "P0003.txt").read_text().startswith("1 0.000000")
    assert yaml.safe_load(yaml_path.read_text())["names"] == ["crane", "container-crane"]


@pytest.mark.parametrize("line, expected", [
    ("10 10 50 10 50 30 10 plane", "line 3: expected 'x1 y1 x2 y2 x3 y3 x4 y4 class_name difficulty', got 8"),
    ("10 10 50 10 50 30 10 x3 plane 0",
     "line 3: the corners must be 8 numbers (pixels), got '10 10 50 10 50 30 10 x3'"),
    ("10 10 50 10 50 30 10 30 plane hard", "line 3: difficulty must be a whole number (0, or 1 for a difficult "
                                           "object), got 'hard'"),
    ("10 10 50 10 50 30 10 30 aeroplane 0", "line 3: class 'aeroplane' is not one of the 15 DOTA v1.0 classes"),
])  # fmt: skip
def test_bad_dota_lines_are_one_line_errors_naming_file_and_line(tmp_path, line, expected):
    from yolotrain.data.convert import convert_dota

    text = "imagesource:GoogleEarth\ngsd:null\n" + line + "\n"
    labels, images = write_dota_split(tmp_path / "DOTA", "train", {"P0009": (200, 100, text)})
    with pytest.raises(DatasetError) as raised:
        convert_dota(labels, images, tmp_path / "out")
    assert f"DOTA label file {labels / 'P0009.txt'}, {expected}" in str(raised.value)
    assert "\n" not in str(raised.value) and not (tmp_path / "out").exists()


def test_dota_arguments_and_folders_are_checked(tmp_path):
    from yolotrain.data.convert import convert_dota

    labels, images = write_dota_split(tmp_path / "DOTA", "train", {"P0001": (200, 100, DOTA_P1)})
    with pytest.raises(CfgError, match=r"version must be a DOTA version \(1.0, 1.5, 2.0\), got '3'"):
        convert_dota(labels, images, tmp_path / "out", version="3")
    with pytest.raises(DatasetError, match="DOTA labels folder .* not found"):
        convert_dota(tmp_path / "nowhere", images, tmp_path / "out")
    with pytest.raises(DatasetError, match="None of the 1 label files in .* has an image of the same name"):
        convert_dota(labels, tmp_path, tmp_path / "out")


def test_command_line_converts_dota(tmp_path, capsys):
    from yolotrain.cli import main

    labels, images = write_dota_split(tmp_path / "DOTA", "train", {"P0001": (200, 100, DOTA_P1)})
    argv = ["convert", "dota", str(labels), str(images), str(tmp_path / "out"), "version=1.5",
            "include_difficult=False"]
    assert main(argv) == 0
    assert (tmp_path / "out" / "labels" / "train" / "P0001.txt").read_text().splitlines() == [EXPECTED_P1[0],
                                                                                               EXPECTED_P1[2]]
    assert yaml.safe_load((tmp_path / "out" / "data.yaml").read_text())["nc"] == 16
    assert main([*argv[:5], "version=3"]) == 2
    assert "version must be a DOTA version (1.0, 1.5, 2.0), got '3'" in capsys.readouterr().err
    assert main(argv[:4]) == 2
    assert "usage: yolotrain convert dota LABELS_DIR IMAGES_DIR OUT_DIR" in capsys.readouterr().err
