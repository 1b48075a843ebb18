"""Shared pieces of the task tests: tiny on-disk YOLO datasets and a tiny detector yaml."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

# A small YOLOv8-layout detector (strides 8/16/32, ~0.4M parameters, mostly the head): trains on one CPU core.
TINY_MODEL_YAML = {
    "nc": 2,
    "backbone": [
        [-1, 1, "Conv", [16, 3, 2]],  # 0 stride 2
        [-1, 1, "Conv", [32, 3, 2]],  # 1 stride 4
        [-1, 1, "C2f", [32, True]],  # 2
        [-1, 1, "Conv", [32, 3, 2]],  # 3 stride 8
        [-1, 1, "C2f", [32, True]],  # 4 -> P3
        [-1, 1, "Conv", [64, 3, 2]],  # 5 stride 16
        [-1, 1, "C2f", [64, True]],  # 6 -> P4
        [-1, 1, "Conv", [64, 3, 2]],  # 7 stride 32
        [-1, 1, "SPPF", [64, 5]],  # 8 -> P5
    ],
    "head": [[[4, 6, 8], 1, "Detect", ["nc"]]],
}



@pytest.fixture(scope="module")
def tiny_yaml_with_head(tmp_path_factory):
    """A function writing the tiny detector's yaml with another head row (and top-level keys) to a file; returns its
    path as a string."""

    def write(name, head, **keys):
        path = tmp_path_factory.mktemp("models") / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**TINY_MODEL_YAML, **keys, "head": [head]}, sort_keys=False))
        return str(path)

    return write


CLASS_COLOURS_BGR = ((40, 40, 230), (230, 160, 30), (40, 200, 40))


def write_yolo_dataset(root, images, names=("class0", "class1")):
    """Write PNG images and YOLO labels under root/images/val and root/labels/val plus root/data.yaml.

    images: [(stem, height, width, [(cls, x1, y1, x2, y2) in pixels, ...]), ...]. Each box is a filled rectangle
    of its class colour on a dim noisy background. Returns the data.yaml path.
    """
    root = Path(root)
    image_dir, label_dir = root / "images" / "val", root / "labels" / "val"
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for stem, height, width, boxes in images:
        img = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
        lines = []
        for cls, x1, y1, x2, y2 in boxes:
            cv2.rectangle(img, (int(x1), int(y1)), (int(x2) - 1, int(y2) - 1), CLASS_COLOURS_BGR[cls], -1)
            cx, cy, w, h = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height
            lines.append(f"{cls} {cx:.8f} {cy:.8f} {w:.8f} {h:.8f}")
        cv2.imwrite(str(image_dir / f"{stem}.png"), img)
        (label_dir / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    data_yaml = root / "data.yaml"
    data = {"path": str(root), "train": "images/val", "val": "images/val", "names": list(names)}
    data_yaml.write_text(yaml.safe_dump(data))
    return data_yaml


@pytest.fixture
def make_dataset():
    """`write_yolo_dataset` as a fixture (conftest modules are not importable by name across test folders)."""
    return write_yolo_dataset


@pytest.fixture
def tiny_model_yaml():
    """A fresh copy of TINY_MODEL_YAML."""
    return yaml.safe_load(yaml.safe_dump(TINY_MODEL_YAML))
