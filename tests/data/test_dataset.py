"""YOLODataset: samples per the data contract, fraction, single_cls, classes, rect shapes and image caches."""

import logging
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from yolotrain.data.data_yaml import check_det_dataset
from yolotrain.data.dataset import YOLODataset
from yolotrain.errors import CfgError, DatasetError


@pytest.fixture
def data(tiny_data):
    return check_det_dataset(tiny_data)


def make(data, split="train", **kwargs):
    kwargs.setdefault("imgsz", 32)
    return YOLODataset(data[split], data=data, prefix=split, **kwargs)


def test_sample_has_resized_image_and_pixel_xyxy_boxes(data):
    ds = make(data)
    assert len(ds) == 4 and ds.names == {0: "a", 1: "b", 2: "c"} and ds.nc == 3
    sample = ds.get_image_and_label(1)  # t1: 48x64 (h, w) with rows (0, .5 .5 .5 .5) and (2, .25 .25 .2 .3)
    assert Path(sample["im_file"]).name == "t1.jpg"
    assert sample["img"].shape == (24, 32, 3) and sample["img"].dtype == np.uint8
    assert sample["ori_shape"] == (48, 64) and sample["resized_shape"] == (24, 32)
    assert sample["ratio_pad"] == ((0.5, 0.5), (0, 0))
    np.testing.assert_allclose(sample["bboxes"], [[8, 6, 24, 18], [4.8, 2.4, 11.2, 9.6]], atol=1e-5)
    assert sample["cls"][:, 0].tolist() == [0, 2]


def test_getitem_letterboxes_and_formats(data):
    pytest.importorskip("yolotrain.data.augment")
    ds = make(data)
    sample = ds[1]
    assert sample["img"].shape == (3, 32, 32) and sample["img"].dtype == torch.uint8
    # the 24x32 image is padded by 4 px top and bottom: centre y stays 0.5, heights shrink to 3/4
    np.testing.assert_allclose(sample["bboxes"][0].numpy(), [0.5, 0.5, 0.5, 0.375], atol=1e-5)


def test_load_image_keeps_exif_orientation(tmp_path, exif_jpeg):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "r.jpg").write_bytes(exif_jpeg(np.zeros((20, 40, 3), np.uint8), orientation=6))
    ds = YOLODataset(str(folder), imgsz=40)
    img, (h0, w0), (h, w) = ds.load_image(0)
    assert (h0, w0) == ds.labels[0]["shape"] == (40, 20) and img.shape == (40, 20, 3)


def _smooth_image(h, w):
    """A smooth colour image, so that a reduced decode and a full decode resized agree to a few levels."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    planes = (127 + 100 * np.sin(x / 23.0), 127 + 100 * np.cos(y / 17.0), 127 + 60 * np.sin((x + y) / 31.0))
    return np.stack(planes, -1).astype(np.uint8)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_training_reads_a_large_jpeg_at_a_fraction_of_its_size(tmp_path, monkeypatch, suffix):
    """A 240 x 320 JPEG trained at imgsz 40 is decoded at 1/8 (30 x 40, the DCT's scaling): same sizes and ratios
    as a full read, pixels within a few levels. PNGs have no reduced decode and are read in full."""
    import cv2

    folder = tmp_path / "images"
    folder.mkdir()
    cv2.imwrite(str(folder / f"big{suffix}"), _smooth_image(240, 320), [cv2.IMWRITE_JPEG_QUALITY, 95])
    flags = []
    real_imdecode = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda data, flag: flags.append(flag) or real_imdecode(data, flag))
    training = YOLODataset(str(folder), imgsz=40, augment=True)
    img, original, resized = training.load_image(0)
    assert original == (240, 320) and resized == img.shape[:2] == (30, 40)
    assert flags[-1] == (cv2.IMREAD_REDUCED_COLOR_8 if suffix == ".jpg" else cv2.IMREAD_COLOR)
    full, full_original, full_resized = YOLODataset(str(folder), imgsz=40).load_image(0)  # validation: in full
    assert flags[-1] == cv2.IMREAD_COLOR and (full_original, full_resized) == (original, resized)
    assert np.abs(img.astype(int) - full.astype(int)).mean() < 4


def test_a_reduced_read_keeps_exif_orientation(tmp_path, monkeypatch, exif_jpeg):
    import cv2

    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "r.jpg").write_bytes(exif_jpeg(_smooth_image(20, 40), orientation=6))
    ds = YOLODataset(str(folder), imgsz=10, augment=True)  # 40 px long side: read at 1/4
    flags = []
    real_imdecode = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda data, flag: flags.append(flag) or real_imdecode(data, flag))
    img, (h0, w0), (h, w) = ds.load_image(0)
    assert flags == [cv2.IMREAD_REDUCED_COLOR_4]  # turned as the full read is, so no second read was needed
    assert (h0, w0) == (40, 20) and img.shape == (10, 5, 3) and (h, w) == (10, 5)


def test_training_serves_repeated_reads_from_memory_and_validation_does_not(data, monkeypatch):
    import cv2

    decoded = []
    real_imdecode = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda data, flag: decoded.append(flag) or real_imdecode(data, flag))
    training = make(data, augment=True)
    decoded.clear()  # the label scan's reads
    first, original, resized = training.load_image(1)
    first[:] = 0  # transforms work in place: the kept image must not change with them
    again, original_again, resized_again = training.load_image(1)
    assert len(decoded) == 1 and (original_again, resized_again) == (original, resized) and again.any()
    assert np.array_equal(again, make(data, augment=True).load_image(1)[0])  # the pixels a fresh read gives
    validation = make(data)
    decoded.clear()
    validation.load_image(1)
    validation.load_image(1)
    assert len(decoded) == 2 and not validation.recent.images


def test_recent_images_keep_the_last_used_within_their_budget():
    from yolotrain.data.dataset import RecentImages

    image = np.zeros((4, 4, 3), np.uint8)  # 48 bytes
    recent = RecentImages(max_bytes=2 * image.nbytes)
    recent.put(0, image), recent.put(1, image + 1)
    assert recent.get(0) is not None  # 0 is now the most recently used: 1 goes first
    recent.put(2, image + 2)
    assert sorted(recent.images) == [0, 2] and recent.nbytes == 2 * image.nbytes
    RecentImages(max_bytes=10).put(0, image)  # larger than the budget: not kept, no error


def test_fraction_keeps_the_first_sorted_images(data):
    ds = make(data, fraction=0.5)
    assert [Path(f).name for f in ds.im_files] == ["t0.jpg", "t1.jpg"]
    with pytest.raises(CfgError, match="fraction=0"):
        make(data, fraction=0)


def test_single_cls_and_classes_filter(data):
    ds = make(data, single_cls=True)
    assert ds.names == {0: "item"} and all((r["cls"] == 0).all() for r in ds.labels)
    ds = make(data, classes=[2])
    assert sum(len(r["cls"]) for r in ds.labels) == 2 and all((r["cls"] == 2).all() for r in ds.labels)
    assert ds.class_counts().tolist() == [0, 0, 2]
    ds = make(data, classes=[2], single_cls=True)  # the filter uses real class ids, then all become 0
    assert sum(len(r["cls"]) for r in ds.labels) == 2 and ds.class_counts().tolist() == [2]


def test_rect_sorts_by_aspect_and_gives_each_batch_its_shape(tmp_path, yolo_split):
    row = "0 0.5 0.5 0.5 0.5\n"
    images = yolo_split({"tall1": (64, 32, row), "wide1": (32, 64, row), "tall2": (60, 30, row),
                         "wide2": (30, 60, row)})
    ds = YOLODataset(str(images), imgsz=64, rect=True, batch_size=2, stride=32, pad=0.0)
    assert [Path(f).stem for f in ds.im_files] == ["wide1", "wide2", "tall1", "tall2"]
    assert ds.batch.tolist() == [0, 0, 1, 1]
    assert ds.batch_shapes.tolist() == [[32, 64], [64, 32]]  # (h, w) per batch
    assert ds.get_image_and_label(3)["rect_shape"] == (64, 32)
    assert ds[0]["img"].shape == (3, 32, 64) and ds[2]["img"].shape == (3, 64, 32)
    padded = YOLODataset(str(images), imgsz=64, rect=True, batch_size=4, stride=32, pad=0.5)
    assert padded.batch_shapes.tolist() == [[96, 96]]  # mixed batch: square, ceil(64/32 + 0.5) * 32


@pytest.mark.parametrize("mode", ["ram", True, "disk"])
def test_image_caches_return_the_same_pixels(data, mode):
    plain = make(data)
    cached = make(data, cache=mode)
    assert cached.cache == ("ram" if mode is True else mode)
    for i in range(len(plain)):
        a, b = plain.load_image(i), cached.load_image(i)
        np.testing.assert_array_equal(a[0], b[0])
        assert a[1:] == b[1:]
    if mode == "disk":
        assert all(Path(f).with_suffix(".npy").is_file() for f in plain.im_files)
    else:
        assert all(im is not None for im in cached.ims)


def test_ram_cache_refused_when_memory_is_short(data, monkeypatch, caplog):
    monkeypatch.setattr("psutil.virtual_memory", lambda: SimpleNamespace(available=1000))
    with caplog.at_level(logging.WARNING, logger="yolotrain.data.dataset"):
        ds = make(data, cache="ram")
    assert ds.cache is None and all(im is None for im in ds.ims)
    assert "cache=ram refused" in caplog.text
    assert ds.load_image(0)[0].shape[:2] == (32, 24)


def test_bad_cache_value_and_empty_folder_raise(data, tmp_path):
    with pytest.raises(CfgError, match="cache='gpu'"):
        make(data, cache="gpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images found in .*empty"):
        YOLODataset(str(tmp_path / "empty"), data=data)


def test_scan_summary_and_offenders_are_logged(yolo_split, caplog):
    images = yolo_split({"a": (32, 32, "0 0.5 0.5 0.2 0.2\n5 0.5 0.5 0.2 0.2\n")})
    with caplog.at_level(logging.INFO, logger="yolotrain.data.dataset"):
        YOLODataset(str(images), data={"nc": 2, "names": {0: "x", 1: "y"}}, prefix="train: ")
    assert "train: 1 images, 1 boxes, 1 rows dropped" in caplog.text and "train: :" not in caplog.text
    assert "a.txt: line 2: class 5 is not an integer in [0, 2)" in caplog.text


def test_close_mosaic_turns_mosaic_off(data):
    augment = pytest.importorskip("yolotrain.data.augment")
    from yolotrain.cfg import get_cfg

    ds = make(data, augment=True, hyp=get_cfg({"mosaic": 1.0, "mixup": 0.5}))
    mosaics = [t for t in ds.transforms.transforms if isinstance(t, (augment.Mosaic, augment.MixUp))]
    assert mosaics and all(t.p > 0 for t in mosaics)
    ds.close_mosaic()
    assert all(t.p == 0 for t in mosaics)
    random.seed(0), np.random.seed(0)
    assert ds[0]["img"].shape == (3, 32, 32)
