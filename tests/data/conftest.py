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


def write_coloured_split(root, shapes, rectangles, colours) -> Path:
    """A split of black PNG images of the given (h, w) shapes, each with solid rectangles (normalised x1y1x2y2) of
    class colours, and their YOLO labels; returns the images folder. Image i's k-th rectangle is class (i + k)."""
    images, labels = Path(root) / "images" / "train", Path(root) / "labels" / "train"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for i, (h, w) in enumerate(shapes):
        img = np.zeros((h, w, 3), np.uint8)
        rows = []
        for k, (x1, y1, x2, y2) in enumerate(rectangles):
            c = (i + k) % len(colours)
            px1, py1, px2, py2 = round(x1 * w), round(y1 * h), round(x2 * w), round(y2 * h)
            img[py1:py2, px1:px2] = colours[c]
            rows.append(f"{c} {(px1 + px2) / 2 / w} {(py1 + py2) / 2 / h} {(px2 - px1) / w} {(py2 - py1) / h}")
        assert cv2.imwrite(str(images / f"im{i}.png"), img)
        (labels / f"im{i}.txt").write_text("\n".join(rows) + "\n")
    return images


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


@pytest.fixture(name="write_coloured_split")
def write_coloured_split_fixture():
    """The `write_coloured_split(root, shapes, rectangles, colours)` helper, for pixel tests of boxes."""
    return write_coloured_split
