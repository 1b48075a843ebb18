"""Verify a split's images and YOLO label files once, in parallel, and cache the result beside the labels.

Label files follow the YOLO convention: for `.../images/.../name.jpg` the labels are `.../labels/.../name.txt`,
one object per line as `class x_center y_center width height`, coordinates normalised to [0, 1]; what a row holds
for each task (polygons, keypoints, rotated corners) and how rows are cleaned is in `data.label_rows`.

What happens to bad input (each kind is counted in the ScanReport, and every offender is kept with a reason):
- image unreadable, missing, of an unsupported format, truncated (a JPEG without its end-of-image marker),
  undecodable or smaller than 10 px: the image is skipped.
- no label file, or an empty one: the image is kept as a background (no objects).
- a label row with a wrong column count, a non-numeric or non-finite value, or a class id that is not an
  integer in [0, nc): the row is dropped.
- a coordinate outside [0, 1] by at most COORD_TOLERANCE (label_rows) is clipped into range; further out, the row
  is dropped. Boxes reaching past the image border are clipped to it; boxes left with no width or height are
  dropped.
- duplicate rows: all but the first are removed.
- a label file with rows but none usable: the image is skipped rather than kept as a background, because
  its objects exist but cannot be located, and a background would teach the model that they are not there.

The result is cached as `<labels folder>.yolotrain.cache` (an .npz without pickled objects), keyed by a hash of
every image and label path, size and modification time plus `nc`; any change re-verifies the split. The name is
our own: another trainer's `<labels folder>.cache` beside it is never read or overwritten, so both tools can share
a dataset folder without rebuilding each other's cache. Every bad entry is listed
beside it in `<labels folder>.bad.txt`, one `path<TAB>reason` line per file; a split without bad entries has none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from yolotrain.data.data_yaml import IMG_FORMATS, has_image_suffix
from yolotrain.data.label_rows import LabelLayout, clean_label_rows
from yolotrain.errors import DatasetError, one_line
from yolotrain.utils.files import write_atomic_stream
from yolotrain.utils.threads import available_cpus

LOGGER = logging.getLogger(__name__)

CACHE_VERSION = "yolotrain-labels-3"  # 2: the report keeps every offender; 3: rows per task, with their points
MIN_IMAGE_SIZE = 10
BAD_ENTRIES_SUFFIX = ".bad.txt"
LABEL_CACHE_SUFFIX = ".yolotrain.cache"
JPEG_START = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"

# Report kinds in the order the summary lists them, with the phrase that follows the count.
SUMMARY_PHRASES = {
    "backgrounds": "backgrounds",
    "corrupt": "corrupt images skipped",
    "bad_label_files": "images skipped (no usable label rows)",
    "wrong_columns": "rows dropped (wrong column count)",
    "non_numeric": "rows dropped (non-numeric)",
    "bad_class": "rows dropped (class id not an integer in [0, nc))",
    "out_of_range": "boxes dropped (out of range)",
    "zero_area": "boxes dropped (zero area)",
    "duplicates": "duplicate rows removed",
    "too_many_objects": "rows dropped (past the objects one image may hold)",
    "clipped": "boxes clipped to the image",
}


@dataclass
class ScanReport:
    """Counts of each kind of problem found in a split, plus every offender as (file, reason).

    `notes` are phrases the summary adds after the counts (e.g. what a class filter dropped after the scan);
    `bad_entries_file` is where `write_bad_entries` listed the offenders (None when it did not).
    """

    prefix: str = ""
    images: int = 0  # usable images
    boxes: int = 0  # usable boxes
    counts: Counter = field(default_factory=Counter)
    offenders: list = field(default_factory=list)
    from_cache: bool = False
    notes: list = field(default_factory=list)
    bad_entries_file: str | None = None

    def add(self, kind: str, n: int = 1, file: str | None = None, reason: str | None = None) -> None:
        """Count `n` occurrences of `kind` and remember `file: reason` when given."""
        if n <= 0:
            return
        self.counts[kind] += n
        if file is not None and reason is not None:
            self.offenders.append((file, reason))

    def merge(self, other: ScanReport) -> None:
        """Fold a per-image report into this one."""
        self.counts.update(other.counts)
        self.offenders.extend(other.offenders)

    def summary(self) -> str:
        """One line, e.g. 'train: 120 images, 340 boxes, 3 backgrounds, 2 corrupt images skipped'."""
        parts = [f"{self.images} images", f"{self.boxes} boxes"]
        parts += [f"{self.counts[k]} {phrase}" for k, phrase in SUMMARY_PHRASES.items() if self.counts[k]]
        parts += self.notes
        head = f"{self.prefix}: " if self.prefix else ""
        return head + ", ".join(parts) + (" (from cache)" if self.from_cache else "")

    def summary_with_bad_entries_file(self) -> str:
        """The summary, ending with where every bad entry is listed when there are any (the line users see)."""
        listed = f"; every bad entry is listed in {self.bad_entries_file}" if self.bad_entries_file else ""
        return self.summary() + listed

    def offender_lines(self, limit: int = 5) -> list[str]:
        """Up to `limit` lines 'path: reason' for the first offenders."""
        return [f"{file}: {reason}" for file, reason in self.offenders[:limit]]

    def bad_entries(self) -> dict[str, str]:
        """{file: its reasons joined by '; '}, one entry per offending file, in the order they were found."""
        reasons: dict[str, list[str]] = {}
        for file, reason in self.offenders:
            reasons.setdefault(file, []).append(one_line(reason))  # no tabs or newlines in the report
        return {file: "; ".join(why) for file, why in reasons.items()}

    def to_json(self) -> str:
        return json.dumps(
            {"images": self.images, "boxes": self.boxes, "counts": dict(self.counts), "offenders": self.offenders}
        )

    @classmethod
    def from_json(cls, text: str, prefix: str = "") -> ScanReport:
        d = json.loads(text)
        offenders = [tuple(o) for o in d["offenders"]]
        return cls(prefix, d["images"], d["boxes"], Counter(d["counts"]), offenders, from_cache=True)


def img2label_paths(img_paths: Sequence[str]) -> list[str]:
    """Label file for each image: the last '/images/' folder becomes '/labels/', the suffix becomes '.txt'."""
    images_dir, labels_dir = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    out = []
    for p in img_paths:
        p = str(p)
        head, sep, tail = p.rpartition(images_dir)
        swapped = head + labels_dir + tail if sep else p
        out.append(str(Path(swapped).with_suffix(".txt")))
    return out


def label_cache_path(label_files: Sequence[str]) -> Path:
    """Where a split's label cache lives: `<labels folder>.yolotrain.cache`, beside the first label file's folder."""
    folder = Path(label_files[0]).parent
    return folder.with_name(folder.name + LABEL_CACHE_SUFFIX)


def bad_entries_path(cache_path: str | Path) -> Path:
    """Where a split's bad entries are listed: `<labels folder>.bad.txt`, beside its label cache."""
    cache_path = Path(cache_path)
    folder_name = cache_path.name.removesuffix(LABEL_CACHE_SUFFIX)
    if folder_name == cache_path.name:  # a cache path of the caller's own naming: drop its one suffix
        folder_name = cache_path.stem
    return cache_path.with_name(folder_name + BAD_ENTRIES_SUFFIX)


def write_bad_entries(report: ScanReport, path: str | Path) -> None:
    """List every bad entry of `report` in `path` as `file<TAB>reason` lines and record `path` in the report;
    with none, remove a stale list instead. A folder that cannot be written only warns: the list is a convenience."""
    path = Path(path)
    entries = report.bad_entries()
    try:
        if not entries:
            path.unlink(missing_ok=True)
            return
        text = "".join(f"{file}\t{reason}\n" for file, reason in entries.items())
        write_atomic_stream(path, lambda f: f.write(text.encode("utf-8")))
        report.bad_entries_file = str(path)
    except OSError as e:
        LOGGER.warning("%s: cannot write the list of bad entries %s (%s)", report.prefix or "dataset", path,
                       e.strerror or e)


def scan_labels(
    img_files: Sequence[str],
    nc: int,
    cache_path: str | Path | None,
    single_cls: bool = False,
    workers: int | None = None,
    prefix: str = "",
    source: str | None = None,
    layout: LabelLayout = LabelLayout(),
) -> tuple[list[dict], ScanReport]:
    """Verify every image and label once (or reuse a valid cache) and return (records, report).

    records follow the data contract: `im_file`, `shape` (h, w) after EXIF orientation, `cls` float32 (n, 1),
    `bboxes` float32 (n, 4) normalised xywh, and the points `layout` (the task's label rows) gives each object.
    `single_cls` maps every class to 0 (the cache keeps real classes). `source` names the split's folder in
    errors. Raises DatasetError when no image is usable.
    """
    img_files = [str(f) for f in img_files]
    label_files = img2label_paths(img_files)
    cache_path = Path(cache_path) if cache_path is not None else None
    key = files_hash(img_files + label_files, extra=f"nc={nc}|rows={layout.tag}")

    cached = _load_cache(cache_path, key, prefix, layout) if cache_path is not None else None
    if cached is not None:
        records, report = cached
    else:
        records, report = _verify_all(img_files, label_files, nc, workers, prefix, layout)
        if cache_path is not None and records:
            _save_cache(cache_path, key, records, report, layout)
    if cache_path is not None:
        write_bad_entries(report, bad_entries_path(cache_path))

    if not records:
        folder = source or _common_folder(img_files)
        first = f"; first problem: {report.offender_lines(1)[0]}" if report.offenders else ""
        listed = f"; every bad entry is listed in {report.bad_entries_file}" if report.bad_entries_file else ""
        raise DatasetError(
            f"{prefix or 'dataset'}: no usable images in {folder} ({len(img_files)} listed){first}{listed}"
        )
    if single_cls:
        for r in records:
            r["cls"][:] = 0
    return records, report


def files_hash(files: Sequence[str], extra: str = "") -> str:
    """Hash of paths, sizes, modification and status-change times: any added, removed or changed file changes it,
    also one replaced by a copy that kept the old size and mtime (`cp -p`, `rsync -a`, `tar` set the mtime but cannot
    set the ctime)."""
    h = hashlib.sha256(f"{CACHE_VERSION}|{extra}".encode())
    for f in files:
        try:
            st = os.stat(f)
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}\n".encode())
        except OSError:
            h.update(f"{f}|-\n".encode())
    return h.hexdigest()


def _verify_all(img_files, label_files, nc, workers, prefix, layout) -> tuple[list[dict], ScanReport]:
    workers = max(1, min(workers if workers is not None else 8, available_cpus(), len(img_files) or 1))
    jobs = [(im, lb, nc, layout) for im, lb in zip(img_files, label_files)]
    # cv2 decoding releases the GIL, so threads parallelise the expensive part without pickling costs.
    with ThreadPool(workers) as pool:
        results = pool.map(_verify_pair, jobs, chunksize=max(1, len(jobs) // (workers * 8)))
    report = ScanReport(prefix)
    records = []
    for record, image_report in results:
        report.merge(image_report)
        if record is not None:
            records.append(record)
    report.images = len(records)
    report.boxes = int(sum(len(r["cls"]) for r in records))
    return records, report


def _verify_pair(job) -> tuple[dict | None, ScanReport]:
    im_file, label_file, nc, layout = job
    report = ScanReport()
    shape, problem = verify_image(im_file)
    if problem:
        report.add("corrupt", file=im_file, reason=problem)
        return None, report
    objects = read_label_file(label_file, nc, report, layout)
    if objects is None:
        return None, report
    return {"im_file": im_file, "shape": shape, **objects}, report


def verify_image(path: str) -> tuple[tuple[int, int] | None, str | None]:
    """Return ((h, w) after EXIF orientation, None) for a usable image, or (None, reason) otherwise."""
    if not has_image_suffix(path):
        suffix = Path(path).suffix or "(none)"
        return None, f"unsupported image format {suffix} (supported: {', '.join(sorted(IMG_FORMATS))})"
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        return None, "image file not found"
    except OSError as e:
        return None, f"unreadable image ({e.strerror or e})"
    if data.size == 0:
        return None, "empty image file"
    if bytes(data[:3]) == JPEG_START and not bytes(data[-64:]).rstrip(b"\x00").endswith(JPEG_END):
        return None, "truncated JPEG (no end-of-image marker FFD9)"
    # Decoding in grayscale is cheaper and applies the same EXIF orientation as the colour reads later.
    img = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)
    if img is None:
        return None, "corrupt image (cannot be decoded)"
    h, w = img.shape[:2]
    if min(h, w) < MIN_IMAGE_SIZE:
        return None, f"image too small ({h}x{w} px, minimum {MIN_IMAGE_SIZE})"
    return (int(h), int(w)), None


def read_label_file(label_file: str, nc: int, report: ScanReport, layout: LabelLayout = LabelLayout()) -> dict | None:
    """Read and clean one label file into its objects' arrays (`cls`, `bboxes` and the layout's points).

    Problems are counted in `report`. Returns no objects for a background and None when the image must be skipped
    (unreadable label file, or rows present but none usable).
    """
    try:
        text = Path(label_file).read_text(encoding="utf-8-sig")  # utf-8-sig: a byte order mark is not part of row 1
    except FileNotFoundError:
        report.add("backgrounds")
        return layout.empty()
    except (OSError, UnicodeDecodeError) as e:
        report.add("bad_label_files", file=label_file, reason=f"unreadable label file ({e})")
        return None
    numbered = [(i + 1, line.split()) for i, line in enumerate(text.splitlines()) if line.strip()]
    if not numbered:
        report.add("backgrounds")
        return layout.empty()
    objects = clean_label_rows(numbered, layout, nc, label_file, report)
    if len(objects["cls"]) == 0:
        report.add("bad_label_files", file=label_file, reason=f"no usable rows among {len(numbered)}")
        return None
    return objects


def _common_folder(files: Sequence[str]) -> str:
    if not files:
        return "(no files)"
    try:
        return os.path.commonpath([os.path.dirname(f) for f in files])
    except ValueError:  # different drives on Windows
        return os.path.dirname(files[0])


def _load_cache(cache_path: Path, key: str, prefix: str, layout: LabelLayout) -> tuple[list[dict], ScanReport] | None:
    if not cache_path.is_file():
        return None
    try:
        with np.load(cache_path, allow_pickle=False) as z:
            if str(z["version"]) != CACHE_VERSION or str(z["hash"]) != key:
                LOGGER.debug("%s: label cache %s is stale, re-scanning", prefix, cache_path)
                return None
            records = _records_from_arrays(z, layout)
            report = ScanReport.from_json(str(z["report"]), prefix)
    except Exception as e:  # a damaged cache is only a lost speed-up
        LOGGER.debug("%s: label cache %s unreadable (%s), re-scanning", prefix, cache_path, e)
        return None
    return records, report


def _records_from_arrays(z, layout: LabelLayout) -> list[dict]:
    """Records back from the cache's flat arrays: every object's label row, and its points where it has any."""
    counts = z["counts"]
    ends = np.cumsum(counts)
    labels = z["labels"]
    points = np.split(z["points"], np.cumsum(z["point_counts"])[:-1]) if layout.points else None
    records = []
    for f, shape, start, end in zip(z["im_files"].tolist(), z["shapes"].tolist(), (ends - counts).tolist(),
                                    ends.tolist()):
        rows = labels[start:end]
        record = {"im_file": f, "shape": tuple(shape), "cls": rows[:, :1].copy(), "bboxes": rows[:, 1:].copy()}
        if layout.points == "segments":
            record["segments"] = points[start:end]
        elif layout.points is not None:
            record[layout.points] = np.stack(points[start:end]) if end > start else layout.empty()[layout.points]
        records.append(record)
    return records


def _object_points(records: list[dict], layout: LabelLayout) -> list[np.ndarray]:
    """Every object's points, in record order, each as (P, D)."""
    if layout.points is None:
        return []
    return [points for r in records for points in r[layout.points]]


def _save_cache(cache_path: Path, key: str, records: list[dict], report: ScanReport, layout: LabelLayout) -> None:
    """Write the cache atomically (temp file in the same folder, then replace); no pickle, so loading a cache
    shipped with someone else's dataset cannot run code. Points (polygons of any length) are stored flat with
    each object's point count."""
    points = _object_points(records, layout)
    width = points[0].shape[-1] if points else 2
    arrays = {
        "version": np.array(CACHE_VERSION),
        "hash": np.array(key),
        "im_files": np.array([r["im_file"] for r in records]),
        "shapes": np.array([r["shape"] for r in records], np.int64).reshape(-1, 2),
        "counts": np.array([len(r["cls"]) for r in records], np.int64),
        "labels": np.concatenate([np.hstack([r["cls"], r["bboxes"]]) for r in records]).astype(np.float32),
        "points": np.concatenate(points).astype(np.float32) if points else np.zeros((0, width), np.float32),
        "point_counts": np.array([len(p) for p in points], np.int64),
        "report": np.array(report.to_json()),
    }
    try:
        write_atomic_stream(cache_path, lambda f: np.savez(f, **arrays))
        LOGGER.debug("%s: label cache saved to %s", report.prefix, cache_path)
    except OSError as e:
        LOGGER.warning("%s: cannot write label cache %s (%s); labels will be verified again next run",
                       report.prefix, cache_path, e.strerror or e)
