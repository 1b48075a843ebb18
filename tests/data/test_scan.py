"""Label scanning: each kind of bad input is counted with a reason, the cache is reused and invalidated."""

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from yolotrain.data import scan
from yolotrain.data.scan import img2label_paths, label_cache_path, scan_labels
from yolotrain.errors import DatasetError

GOOD_ROW = "0 0.5 0.5 0.4 0.4\n"


def scan_folder(images: Path, nc=3, **kwargs):
    files = sorted(str(p) for p in images.iterdir())
    return scan_labels(files, nc, cache_path=None, prefix="train", **kwargs)


def scan_one_label(yolo_split, label, nc=3):
    """Scan a split of one good image plus one image labelled `label`; return (record of that image, report)."""
    images = yolo_split({"good": (32, 32, GOOD_ROW), "probe": (32, 32, label)})
    records, report = scan_folder(images, nc)
    probe = [r for r in records if Path(r["im_file"]).stem == "probe"]
    return (probe[0] if probe else None), report


def test_img2label_paths_swaps_the_last_images_folder():
    paths = [f"{os.sep}d{os.sep}images{os.sep}x{os.sep}images{os.sep}a.b.jpg", f"{os.sep}flat{os.sep}c.png"]
    assert img2label_paths(paths) == [
        f"{os.sep}d{os.sep}images{os.sep}x{os.sep}labels{os.sep}a.b.txt",
        f"{os.sep}flat{os.sep}c.txt",
    ]


def test_good_labels_become_contract_records(yolo_split):
    images = yolo_split({"a": (30, 40, "1 0.5 0.5 0.2 0.4\n2 0.1 0.2 0.1 0.1\n")})
    (record,), report = scan_folder(images)
    assert record["im_file"] == str(images / "a.jpg") and record["shape"] == (30, 40)
    assert record["cls"].dtype == np.float32 and record["cls"].shape == (2, 1)
    np.testing.assert_allclose(record["bboxes"], [[0.5, 0.5, 0.2, 0.4], [0.1, 0.2, 0.1, 0.1]], atol=1e-6)
    assert record["cls"][:, 0].tolist() == [1, 2]
    assert report.images == 1 and report.boxes == 2 and not report.offenders


@pytest.mark.parametrize(
    "label, kind, reason",
    [
        ("5 0.5 0.5 0.2 0.2\n", "bad_class", "class 5 is not an integer in [0, 3)"),
        ("1.5 0.5 0.5 0.2 0.2\n", "bad_class", "class 1.5"),
        ("-1 0.5 0.5 0.2 0.2\n", "bad_class", "class -1"),
        ("0 0.5 0.5 0.2\n", "wrong_columns", "expected 5 values"),
        ("0 0.5 abc 0.2 0.2\n", "non_numeric", "non-numeric"),
        ("0 0.5 nan 0.2 0.2\n", "non_numeric", "non-numeric"),
        ("0 0.5 0.5 1.2 0.2\n", "out_of_range", "outside [0, 1]"),
        ("0 -0.05 0.5 0.2 0.2\n", "out_of_range", "outside [0, 1]"),
        ("0 0.5 0.5 0 0.2\n", "zero_area", "zero width or height"),
    ],
)
def test_bad_row_is_dropped_counted_and_explained(yolo_split, label, kind, reason):
    record, report = scan_one_label(yolo_split, GOOD_ROW + label)
    assert len(record["cls"]) == 1  # the good row stays
    np.testing.assert_allclose(record["bboxes"], [[0.5, 0.5, 0.4, 0.4]])
    assert report.counts[kind] == 1 and sum(report.counts.values()) == 1
    (file, why), = report.offenders
    assert file.endswith("probe.txt") and why.startswith("line 2: ") and reason in why


def test_coordinates_just_outside_range_are_clipped(yolo_split):
    record, report = scan_one_label(yolo_split, "0 0.5 0.5 1.005 0.2\n1 -0.005 0.5 0.2 0.2\n")
    # w 1.005 -> 1 (full width); x -0.005 -> 0, then the part left of the image is cut: x1=0, x2=0.1
    np.testing.assert_allclose(record["bboxes"], [[0.5, 0.5, 1.0, 0.2], [0.05, 0.5, 0.1, 0.2]], atol=1e-6)
    assert report.counts["clipped"] == 2 and report.counts["out_of_range"] == 0


def test_a_label_file_saved_with_a_byte_order_mark_keeps_its_first_row(yolo_split):
    """Editors on Windows save UTF-8 with a BOM: it is not part of the first row's class id."""
    record, report = scan_one_label(yolo_split, "\ufeff1 0.5 0.5 0.2 0.2\n0 0.3 0.3 0.1 0.1\n")
    assert record["cls"][:, 0].tolist() == [1, 0] and report.counts.get("non_numeric", 0) == 0


def test_a_label_file_with_more_objects_than_an_image_holds_keeps_the_first_and_says_so(yolo_split):
    """50,000 rows would make the loss pair each with every anchor (gigabytes): the first MAX_OBJECTS_PER_IMAGE stay,
    the rest are counted and named."""
    from yolotrain.data.label_rows import MAX_OBJECTS_PER_IMAGE

    rows = "".join(f"0 {0.1 + 0.8 * i / 5000:.6f} 0.5 0.01 0.01\n" for i in range(MAX_OBJECTS_PER_IMAGE + 50))
    record, report = scan_one_label(yolo_split, rows)
    assert len(record["cls"]) == MAX_OBJECTS_PER_IMAGE and report.counts["too_many_objects"] == 50
    assert "only the first" in " ".join(reason for _, reason in report.offenders)


def test_duplicate_rows_are_removed_keeping_file_order(yolo_split):
    record, report = scan_one_label(yolo_split, "2 0.3 0.3 0.1 0.1\n0 0.5 0.5 0.2 0.2\n2 0.3 0.3 0.1 0.1\n")
    assert record["cls"][:, 0].tolist() == [2, 0]
    assert report.counts["duplicates"] == 1 and "1 duplicate rows removed" in report.summary()


@pytest.mark.parametrize("label", [None, "", "\n  \n"])
def test_missing_or_empty_label_file_is_a_background(yolo_split, label):
    record, report = scan_one_label(yolo_split, label)
    assert record["cls"].shape == (0, 1) and record["bboxes"].shape == (0, 4)
    assert report.counts["backgrounds"] == 1 and report.images == 2


def test_label_file_with_no_usable_row_skips_the_image(yolo_split):
    record, report = scan_one_label(yolo_split, "7 0.5 0.5 0.2 0.2\n0 0.5\n")
    assert record is None and report.images == 1
    assert report.counts["bad_label_files"] == 1 and report.counts["bad_class"] == 1
    assert report.counts["wrong_columns"] == 1
    assert any("no usable rows among 2" in why for _, why in report.offenders)


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "corrupt, reason",
    [
        (lambda p: write_bytes(p, p.read_bytes()[:-30]), "truncated JPEG"),
        (lambda p: write_bytes(p.with_suffix(".png"), b"\x89PNG garbage"), "cannot be decoded"),
        (lambda p: write_bytes(p.with_suffix(".gif"), b"GIF89a"), "unsupported image format .gif"),
        (lambda p: p.with_name("missing.jpg"), "image file not found"),
        (lambda p: write_bytes(p, b""), "empty image file"),
    ],
)
def test_corrupt_images_are_skipped_with_a_reason(yolo_split, corrupt, reason):
    images = yolo_split({"good": (32, 32, GOOD_ROW), "bad": (32, 32, GOOD_ROW)})
    bad = corrupt(images / "bad.jpg")
    files = [str(images / "good.jpg"), str(bad)]
    records, report = scan_labels(files, 3, cache_path=None, prefix="train")
    assert [Path(r["im_file"]).name for r in records] == ["good.jpg"]
    assert report.counts["corrupt"] == 1
    assert report.offenders == [(str(bad), report.offenders[0][1])] and reason in report.offenders[0][1]
    assert "1 corrupt images skipped" in report.summary()


def test_too_small_image_is_skipped(yolo_split):
    images = yolo_split({"good": (32, 32, GOOD_ROW), "tiny": (8, 30, GOOD_ROW)})
    records, report = scan_folder(images)
    assert len(records) == 1 and "image too small (8x30 px" in report.offenders[0][1]


def test_summary_is_one_line_with_every_nonzero_count(yolo_split):
    images = yolo_split({
        "a": (32, 32, GOOD_ROW * 2 + "9 0.5 0.5 0.1 0.1\n"),
        "b": (32, 32, None),
        "c": (32, 32, "0 0.5 0.5 2 2\n0 0.2 0.2 0.1 0.1\n"),
    })
    _, report = scan_folder(images)
    assert report.summary() == (
        "train: 3 images, 2 boxes, 1 backgrounds, 1 rows dropped (class id not an integer in [0, nc)), "
        "1 boxes dropped (out of range), 1 duplicate rows removed"
    )


def test_split_without_usable_image_names_the_folder(yolo_split):
    images = yolo_split({"a": (32, 32, "5 0.5 0.5 0.1 0.1\n")})
    with pytest.raises(DatasetError) as e:
        scan_folder(images, nc=2)
    assert str(images) in str(e.value) and "a.txt" in str(e.value) and "\n" not in str(e.value)


def test_single_cls_maps_classes_to_zero_without_touching_the_cache(yolo_split):
    images = yolo_split({"a": (32, 32, "2 0.5 0.5 0.2 0.2\n1 0.2 0.2 0.1 0.1\n")})
    files = [str(images / "a.jpg")]
    cache = label_cache_path(img2label_paths(files))
    (record,), _ = scan_labels(files, 3, cache, single_cls=True)
    assert record["cls"][:, 0].tolist() == [0, 0]
    (record,), report = scan_labels(files, 3, cache)
    assert report.from_cache and record["cls"][:, 0].tolist() == [2, 1]


def test_exif_orientation_swaps_the_recorded_shape(tmp_path, exif_jpeg):
    img = np.zeros((20, 40, 3), np.uint8)
    path = tmp_path / "images" / "rotated.jpg"
    path.parent.mkdir()
    path.write_bytes(exif_jpeg(img, orientation=6))  # 6: rotate 90 degrees clockwise to display
    (record,), _ = scan_labels([str(path)], 1, cache_path=None)
    assert record["shape"] == (40, 20)


class TestCache:
    def scan(self, images, nc=3):
        files = sorted(str(p) for p in images.glob("*.jpg"))
        return scan_labels(files, nc, label_cache_path(img2label_paths(files)), prefix="train")

    def test_cache_is_written_beside_labels_then_reused_without_verification(self, yolo_split, monkeypatch):
        images = yolo_split({"a": (32, 32, GOOD_ROW), "b": (32, 48, "9 0.5 0.5 0.1 0.1\n" + GOOD_ROW)})
        first, first_report = self.scan(images)
        assert (images.parent.parent / "labels" / "train.yolotrain.cache").is_file()

        def must_not_run(job):
            raise AssertionError(f"verification re-run for {job[0]}")

        monkeypatch.setattr(scan, "_verify_pair", must_not_run)
        again, report = self.scan(images)
        assert report.from_cache and report.counts == first_report.counts
        assert report.offenders == first_report.offenders and report.summary().endswith("(from cache)")
        for r1, r2 in zip(first, again):
            assert r1["im_file"] == r2["im_file"] and r1["shape"] == r2["shape"]
            np.testing.assert_array_equal(r1["bboxes"], r2["bboxes"])
            np.testing.assert_array_equal(r1["cls"], r2["cls"])

    def test_changed_label_file_invalidates_the_cache(self, yolo_split):
        images = yolo_split({"a": (32, 32, GOOD_ROW)})
        self.scan(images)
        label = images.parent.parent / "labels" / "train" / "a.txt"
        label.write_text("1 0.25 0.25 0.1 0.1\n" + GOOD_ROW)
        (record,), report = self.scan(images)
        assert not report.from_cache and record["cls"][:, 0].tolist() == [1, 0]

    def test_a_label_replaced_with_the_same_size_and_mtime_invalidates_the_cache(self, yolo_split):
        """`cp -p`, `rsync -a` and `tar` keep the mtime of an edited file: its status-change time still differs."""
        import os
        import time

        images = yolo_split({"a": (32, 32, GOOD_ROW)})
        self.scan(images)
        label = images.parent.parent / "labels" / "train" / "a.txt"
        before = os.stat(label)
        time.sleep(0.01)
        label.write_text(GOOD_ROW.replace("0 ", "2 ", 1))  # same length, another class
        os.utime(label, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert os.stat(label).st_size == before.st_size and os.stat(label).st_mtime_ns == before.st_mtime_ns
        (record,), report = self.scan(images)
        assert not report.from_cache and record["cls"][:, 0].tolist() == [2]

    def test_different_nc_invalidates_the_cache(self, yolo_split):
        images = yolo_split({"a": (32, 32, GOOD_ROW + "2 0.5 0.5 0.1 0.1\n")})
        (record,), _ = self.scan(images, nc=3)
        assert len(record["cls"]) == 2
        (record,), report = self.scan(images, nc=2)
        assert not report.from_cache and len(record["cls"]) == 1

    def test_damaged_cache_is_rebuilt(self, yolo_split):
        images = yolo_split({"a": (32, 32, GOOD_ROW)})
        self.scan(images)
        (images.parent.parent / "labels" / "train.yolotrain.cache").write_bytes(b"not a cache")
        (record,), report = self.scan(images)
        assert not report.from_cache and len(record["cls"]) == 1

    def test_another_trainers_cache_beside_ours_is_neither_read_nor_touched(self, yolo_split):
        """The reference names its cache `labels/train.cache` (a pickle in its own format): ours has its own name,
        so a dataset folder shared by both tools keeps both caches."""
        images = yolo_split({"a": (32, 32, GOOD_ROW)})
        theirs = images.parent.parent / "labels" / "train.cache"
        theirs.write_bytes(b"\x80\x04another trainer's cache")
        (record,), report = self.scan(images)
        assert len(record["cls"]) == 1 and theirs.read_bytes() == b"\x80\x04another trainer's cache"
        (record,), report = self.scan(images)
        assert report.from_cache and theirs.read_bytes() == b"\x80\x04another trainer's cache"

    def test_unwritable_cache_folder_only_warns(self, yolo_split, caplog):
        images = yolo_split({"a": (32, 32, GOOD_ROW)})
        files = [str(images / "a.jpg")]
        with caplog.at_level(logging.WARNING, logger="yolotrain.data.scan"):
            records, _ = scan_labels(files, 3, images / "no" / "such" / "folder.cache")
        assert len(records) == 1 and "cannot write label cache" in caplog.text
