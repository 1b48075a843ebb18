"""save_json=True on a dataset made by `yolotrain convert coco`: predictions.json carries COCO's own image and
category ids, and pycocotools' score of it is logged and returned beside ours, and agrees."""

import json
import logging

import cv2
import numpy as np
import pytest
import torch
import yaml

from test_detection_validator import OracleModel
from yolotrain.data.convert import convert_coco
from yolotrain.tasks.detect.val import DetectionValidator

pytest.importorskip("pycocotools")

# File names that are not image ids, ids that are not positions, category ids with gaps: nothing can be guessed.
IMAGES = [
    {"id": 42, "file_name": "street.png", "width": 96, "height": 64},
    {"id": 7, "file_name": "park.png", "width": 64, "height": 80},
    {"id": 1001, "file_name": "room.png", "width": 72, "height": 72},
]
CATEGORIES = [{"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]
ANNOTATIONS = [  # (image id, category id, [x, y, w, h])
    (42, 3, [4, 6, 40, 30]), (42, 18, [50, 10, 30, 40]),
    (7, 18, [8, 8, 40, 50]),
    (1001, 3, [10, 12, 30, 24]), (1001, 3, [40, 40, 28, 26]), (1001, 18, [5, 40, 20, 25]),
]  # fmt: skip


def write_coco(folder):
    images_dir = folder / "images"
    images_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for image in IMAGES:
        pixels = rng.integers(0, 60, (image["height"], image["width"], 3), dtype=np.uint8)
        for image_id, category, (x, y, w, h) in ANNOTATIONS:
            if image_id == image["id"]:
                pixels[y : y + h, x : x + w] = (200, 80, 40) if category == 3 else (40, 200, 80)
        cv2.imwrite(str(images_dir / image["file_name"]), pixels)
    annotations = [
        {"id": i + 1, "image_id": image_id, "category_id": category, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
        for i, (image_id, category, box) in enumerate(ANNOTATIONS)
    ]
    path = folder / "instances_val.json"
    path.write_text(json.dumps({"images": IMAGES, "annotations": annotations, "categories": CATEGORIES}))
    return path, images_dir


def shift_some(boxes, slot, scores):
    """Move every second box of an image by a few pixels and lower its score, so mAP50-95 is neither 0 nor 1."""
    moved = boxes.clone()
    odd = slot % 2 == 1
    moved[odd] += torch.tensor([3.0, 2.0, 3.0, 2.0])
    return moved, torch.where(odd, scores * 0.5, scores)


def test_predictions_use_coco_ids_and_pycocotools_agrees(tmp_path, caplog):
    annotations, images_dir = write_coco(tmp_path / "coco")
    data_yaml = convert_coco(annotations, images_dir, tmp_path / "converted")
    data = yaml.safe_load(data_yaml.read_text())
    assert data["coco_category_ids"] == [3, 18] and data["coco_json"] == str(annotations.resolve())

    model = OracleModel(nc=2, edit=shift_some)
    args = {"data": str(data_yaml), "split": "val", "imgsz": 64, "batch": 2, "device": "cpu", "workers": 0,
            "plots": False, "save_json": True}  # fmt: skip
    validator = DetectionValidator(save_dir=tmp_path / "val", args=args)
    validator.add_callback("on_val_batch_start", model.watch)
    with caplog.at_level(logging.INFO, logger="yolotrain.tasks.detect.val"):
        results = validator(model=model)

    predictions = json.loads((tmp_path / "val" / "predictions.json").read_text())
    assert {p["image_id"] for p in predictions} == {42, 7, 1001}
    assert {p["category_id"] for p in predictions} == {3, 18}
    per_image = {(p["image_id"], p["category_id"]) for p in predictions}
    assert per_image == {(image_id, category) for image_id, category, _ in ANNOTATIONS}

    ours, theirs = results["metrics/mAP50-95(B)"], results["coco/mAP50-95(B)"]
    assert 0.1 < ours < 0.99  # the shifted boxes miss the strict thresholds: a real comparison
    assert theirs == pytest.approx(ours, abs=1e-6)
    assert results["coco/mAP50(B)"] == pytest.approx(results["metrics/mAP50(B)"], abs=1e-6)
    assert "pycocotools" in caplog.text and "Average Precision" in caplog.text


def test_without_conversion_ids_stay_class_indices(tmp_path, make_dataset):
    from test_detection_validator import IMAGES as YOLO_IMAGES

    data_yaml = make_dataset(tmp_path / "data", YOLO_IMAGES)
    model = OracleModel(nc=2)
    args = {"data": str(data_yaml), "imgsz": 64, "batch": 4, "device": "cpu", "workers": 0, "plots": False,
            "save_json": True}  # fmt: skip
    validator = DetectionValidator(save_dir=tmp_path / "val", args=args)
    validator.add_callback("on_val_batch_start", model.watch)
    results = validator(model=model)
    predictions = json.loads((tmp_path / "val" / "predictions.json").read_text())
    assert {p["category_id"] for p in predictions} == {0, 1}
    assert {p["image_id"] for p in predictions} == {1, 2, 3, "cat_a", 5}
    assert not any(key.startswith("coco/") for key in results)
