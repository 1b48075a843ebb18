"""Shared fixtures: tiny YOLO datasets written with cv2 into tmp_path."""

import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml


def write_image(path, h=48, w=64, seed=0) -> Path:
    """Write a random BGR image of (h, w) with cv2; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), img)
    return path


def write_label(path, label) -> Path:
    """Write a label file from text or a list of rows (class, x, y, w, h)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not isinstance(label, str):
        label = "".join(" ".join(f"{v:g}" for v in row) + "\n" for row in label)
    path.write_text(label)
    return path


def jpeg_with_exif_orientation(img: np.ndarray, orientation: int) -> bytes:
    """JPEG bytes of `img` with a hand-made EXIF APP1 segment holding only the Orientation tag (0x0112)."""
    ok, encoded = cv2.imencode(".jpg", img)
    assert ok
    jpeg = encoded.tobytes()
    ifd_entry = struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)  # tag, SHORT, count 1, value, padding
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1) + ifd_entry + struct.pack(">I", 0)
    payload = b"Exif\x00\x00" + tiff
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return jpeg[:2] + app1 + jpeg[2:]  # right after the SOI marker


@pytest.fixture(name="write_image")
def write_image_fixture():
    """The `write_image(path, h, w, seed)` helper, for tests that need loose image files."""
    return write_image


@pytest.fixture(name="write_label")
def write_label_fixture():
    """The `write_label(path, text_or_rows)` helper."""
    return write_label


@pytest.fixture(name="exif_jpeg")
def exif_jpeg_fixture():
    """The `jpeg_with_exif_orientation(img, orientation) -> bytes` helper."""
    return jpeg_with_exif_orientation


@pytest.fixture
def yolo_split(tmp_path):
    """Factory: yolo_split({stem: (h, w, label)}, split='train', suffix='.jpg') -> images folder.

    `label` is label text, a list of rows, or None for no label file. Files go to
    <tmp>/ds/images/<split>/<stem><suffix> and <tmp>/ds/labels/<split>/<stem>.txt.
    """

    def make(specs, split="train", suffix=".jpg"):
        images = tmp_path / "ds" / "images" / split
        labels = tmp_path / "ds" / "labels" / split
        images.mkdir(parents=True, exist_ok=True)
        for seed, (stem, (h, w, label)) in enumerate(specs.items()):
            write_image(images / f"{stem}{suffix}", h, w, seed=seed)
            if label is not None:
                write_label(labels / f"{stem}.txt", label)
        return images

    return make


@pytest.fixture
def tiny_data(tmp_path, yolo_split):
    """A data dict-ready dataset: 4 train and 2 val images (64x48 and 48x64), 3 classes, with data.yaml."""
    row = [[0, 0.5, 0.5, 0.5, 0.5], [2, 0.25, 0.25, 0.2, 0.3]]
    yolo_split({f"t{i}": ((48, 64) if i % 2 else (64, 48)) + (row[: 1 + i % 2],) for i in range(4)}, "train")
    yolo_split({"v0": (48, 64, row), "v1": (64, 48, None)}, "val")
    yaml_path = tmp_path / "ds" / "data.yaml"
    yaml_path.write_text(
        yaml.safe_dump({"path": ".", "train": "images/train", "val": "images/val", "names": ["a", "b", "c"]})
    )
    return yaml_path
