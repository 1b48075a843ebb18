"""COCO -> YOLO conversion: exact label lines for hand-computed boxes, layout, and clear errors for bad input."""

import json
import logging

import cv2
import numpy as np
import pytest
import yaml

from yolotrain.data.convert import convert_coco
from yolotrain.errors import DatasetError

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
