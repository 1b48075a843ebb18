"""Bad dataset entries: every one is listed with its reason in `<labels folder>.bad.txt`, beside the label cache."""

from pathlib import Path

import pytest

from yolotrain.data.dataset import YOLODataset

GOOD = "0 0.5 0.5 0.4 0.4\n"
NAMES = {0: "a", 1: "b", 2: "c"}


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-30])


def make_text(path: Path) -> None:
    path.write_text("this is a text file, not an image\n")


def make_empty(path: Path) -> None:
    path.write_bytes(b"")


# stem: (image size, label text, how the image is spoilt or None, the bad file, what its reason says)
BAD_ENTRIES = {
    "truncated": (32, GOOD, truncate, "image", "truncated JPEG"),
    "text": (32, GOOD, make_text, "image", "corrupt image (cannot be decoded)"),
    "empty": (32, GOOD, make_empty, "image", "empty image file"),
    "tiny": (8, GOOD, None, "image", "image too small (8x8 px"),
    "words": (32, "0 0.5 0.5 abc 0.2\n1 x 0.5 0.2 0.2\n", None, "label", "non-numeric value in '0 0.5 0.5 abc 0.2'"),
    "columns": (32, GOOD + "0 0.5 0.5 0.2\n", None, "label", "line 2: expected 5 values (class x y w h) or a polygon"),
    "class": (32, GOOD + "9 0.5 0.5 0.2 0.2\n", None, "label", "line 2: class 9 is not an integer in [0, 3)"),
    "outside": (32, "0 1.5 0.5 0.2 0.2\n" + GOOD, None, "label", "line 1: coordinates 1.5 0.5 0.2 0.2 outside [0, 1]"),
}


@pytest.fixture
def broken_split(yolo_split):
    """Images folder with two good images and the eight bad entries of BAD_ENTRIES."""
    specs = {"good0": (32, 32, GOOD), "good1": (32, 32, GOOD)}
    specs.update({stem: (size, size, label) for stem, (size, label, *_) in BAD_ENTRIES.items()})
    images = yolo_split(specs)
    for stem, (_, _, spoil, _, _) in BAD_ENTRIES.items():
        if spoil is not None:
            spoil(images / f"{stem}.jpg")
    return images


def labels_dir(images: Path) -> Path:
    return images.parent.parent / "labels" / images.name


def report_path(images: Path) -> Path:
    return labels_dir(images).with_suffix(".bad.txt")


def load(images):
    return YOLODataset(str(images), imgsz=32, data={"nc": 3, "names": NAMES}, prefix="train", workers=0)


def read_report(images) -> dict:
    lines = report_path(images).read_text(encoding="utf-8").splitlines()
    entries = dict(line.split("\t") for line in lines)
    assert len(entries) == len(lines), "one line per file"
    return entries


def expected_file(images: Path, stem: str, kind: str) -> str:
    folder = images if kind == "image" else labels_dir(images)
    return str((folder / f"{stem}.{'jpg' if kind == 'image' else 'txt'}").resolve())


def test_every_bad_entry_is_listed_with_its_reason(broken_split):
    dataset = load(broken_split)
    assert dataset.bad_entries_file == str(report_path(broken_split))
    assert sorted(Path(f).stem for f in dataset.im_files) == ["class", "columns", "good0", "good1", "outside"]
    entries = read_report(broken_split)
    assert len(entries) == len(BAD_ENTRIES) == 8
    for stem, (_, _, _, kind, reason) in BAD_ENTRIES.items():
        file = expected_file(broken_split, stem, kind)
        assert file in entries, f"{stem} missing from the report"
        assert reason in entries[file], (stem, entries[file])


def test_a_file_with_several_problems_is_one_line_with_every_reason(broken_split):
    load(broken_split)
    reason = read_report(broken_split)[expected_file(broken_split, "words", "label")]
    assert "non-numeric" in reason and "(+1 more rows)" in reason and "no usable rows among 2" in reason


def test_the_console_summary_ends_with_the_report_path(broken_split, yolotrain_log):
    load(broken_split)
    (summary,) = [m for m in yolotrain_log if m.startswith("train: ")]
    assert summary.endswith(str(report_path(broken_split)))
    assert "4 corrupt images skipped" in summary


def test_the_report_is_written_again_when_the_scan_comes_from_the_cache(broken_split, yolotrain_log):
    load(broken_split)
    report_path(broken_split).unlink()
    load(broken_split)
    summary = [m for m in yolotrain_log if m.startswith("train: ")][-1]
    assert "(from cache)" in summary and len(read_report(broken_split)) == 8


def test_more_bad_entries_than_the_console_names_are_all_listed(yolo_split):
    images = yolo_split({f"bad{i:02d}": (32, 32, GOOD + "5 0.5 0.5 0.1 0.1\n") for i in range(25)})
    load(images)
    assert len(read_report(images)) == 25


def test_a_clean_split_has_no_report_and_a_stale_one_is_removed(broken_split, yolotrain_log):
    load(broken_split)
    assert report_path(broken_split).is_file()
    for stem, (_, _, spoil, _, _) in BAD_ENTRIES.items():
        (broken_split / f"{stem}.jpg").unlink()
        (labels_dir(broken_split) / f"{stem}.txt").unlink()
    assert load(broken_split).bad_entries_file is None
    assert not report_path(broken_split).exists()
    summary = [m for m in yolotrain_log if m.startswith("train: ")][-1]
    assert summary == "train: 2 images, 2 boxes"
