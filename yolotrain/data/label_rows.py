"""Label rows per task: what one line of a YOLO label file holds, and how a file's rows are checked and cleaned.

Every row starts with a class id; what follows depends on the task (coordinates normalised to [0, 1]):
- detect:   `x y w h` (a box), or a polygon `x1 y1 x2 y2 x3 y3 ...`, whose extent becomes the box (so a
            segmentation dataset trains a detector as it is)
- segment:  a polygon of at least 3 points; the box is its extent
- pose:     `x y w h` then K keypoints of D values each (`x y` or `x y visibility`), K and D from `kpt_shape`
- obb:      the 4 corners `x1 y1 x2 y2 x3 y3 x4 y4` of a rotated box; the box is their extent

A cleaned file becomes the arrays of a scan record: `cls` (n, 1), `bboxes` (n, 4) normalised xywh and, where the
layout has points, `segments` (a list of (P_i, 2) polygons, P_i varying), `keypoints` (n, K, D) or `corners`
(n, 4, 2). Problems are counted in the scan's report with the line they were found on (see `data.scan`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from yolotrain.utils.boxes import xywh2xyxy, xyxy2xywh

COORD_TOLERANCE = 0.01
BOX_COLUMNS = 5  # class x y w h
CORNER_COLUMNS = 9  # class and 4 corners
MIN_POLYGON_COLUMNS = 7  # class and 3 points
# Objects one image may hold: dense scenes have hundreds; far more is a broken file, and the loss pairs every object
# with every anchor (50,000 objects would need gigabytes). The rows past it are dropped and reported.
MAX_OBJECTS_PER_IMAGE = 3000


@dataclass(frozen=True)
class LabelLayout:
    """What follows the class id in a task's label rows. `points` names the per-object point array the rows
    carry (None: boxes only); `kpt_shape` is (keypoints per object, values per keypoint) for pose."""

    task: str = "detect"
    points: Optional[str] = None  # None, "segments", "keypoints" or "corners"
    kpt_shape: Optional[tuple[int, int]] = None

    @classmethod
    def for_task(cls, task: str = "detect", kpt_shape=None) -> "LabelLayout":
        if task == "pose":
            if kpt_shape is None or len(kpt_shape) != 2 or int(kpt_shape[1]) not in (2, 3) or int(kpt_shape[0]) < 1:
                raise ValueError(f"pose labels need kpt_shape [keypoints, 2 or 3], got {kpt_shape}")
            return cls("pose", "keypoints", (int(kpt_shape[0]), int(kpt_shape[1])))
        points = {"detect": None, "segment": "segments", "obb": "corners"}
        if task not in points:
            raise ValueError(f"no label rows for task '{task}'")
        return cls(task, points[task])

    @property
    def tag(self) -> str:
        """Names the layout in the label cache's key: a cache scanned for one layout is never read for another."""
        return f"{self.task}{list(self.kpt_shape) if self.kpt_shape else ''}"

    def describe(self) -> str:
        """The expected row, for the report's 'expected ..., got N' lines."""
        if self.task == "pose":
            k, d = self.kpt_shape
            return f"{BOX_COLUMNS + k * d} values (class x y w h and {k} keypoints of {d})"
        return {
            "detect": "5 values (class x y w h) or a polygon (class and at least 3 x y points)",
            "segment": "a polygon (class and at least 3 x y points: an odd count of at least 7 values)",
            "obb": "9 values (class and 4 corners x y)",
        }[self.task]

    def accepts(self, column_counts: np.ndarray) -> np.ndarray:
        polygon = (column_counts >= MIN_POLYGON_COLUMNS) & (column_counts % 2 == 1)
        if self.task == "detect":
            return (column_counts == BOX_COLUMNS) | polygon
        if self.task == "segment":
            return polygon
        if self.task == "obb":
            return column_counts == CORNER_COLUMNS
        k, d = self.kpt_shape
        return column_counts == BOX_COLUMNS + k * d

    def empty(self) -> dict:
        """The arrays of a background image."""
        arrays = {"cls": np.zeros((0, 1), np.float32), "bboxes": np.zeros((0, 4), np.float32)}
        if self.points == "segments":
            arrays["segments"] = []
        elif self.points == "keypoints":
            arrays["keypoints"] = np.zeros((0, *self.kpt_shape), np.float32)
        elif self.points == "corners":
            arrays["corners"] = np.zeros((0, 4, 2), np.float32)
        return arrays


def clean_label_rows(numbered: list, layout: LabelLayout, nc: int, label_file: str, report) -> dict:
    """Turn [(line_number, tokens)] into the cleaned arrays of `layout.empty()`; every dropped row is counted."""
    line_numbers, rows = _parse_numeric(numbered, layout, label_file, report)
    if not rows:
        return layout.empty()

    cls = np.array([row[0] for row in rows])
    bad_class = (cls != np.round(cls)) | (cls < 0) | (cls >= nc)
    _count_rows(report, "bad_class", bad_class, line_numbers, label_file,
                lambda i: f"class {_fmt(cls[i])} is not an integer in [0, {nc})")
    rows, line_numbers = _select(rows, ~bad_class), line_numbers[~bad_class]

    outside = _outside_unit_square(rows, layout)
    _count_rows(report, "out_of_range", outside, line_numbers, label_file,
                lambda i: f"coordinates {' '.join(_fmt(v) for v in rows[i][1:])} outside [0, 1]")
    rows, line_numbers = _select(rows, ~outside), line_numbers[~outside]
    if not rows:
        return layout.empty()

    objects, clipped = _objects(rows, layout)
    report.add("clipped", int(clipped.sum()))

    boxes = objects["bboxes"]
    zero_area = (boxes[:, 2] <= 0) | (boxes[:, 3] <= 0)
    _count_rows(report, "zero_area", zero_area, line_numbers, label_file, lambda i: "box has zero width or height")
    keep = np.flatnonzero(~zero_area)

    keep = keep[_first_occurrences([_row_key(objects, i) for i in keep])]  # file order kept
    duplicates = int((~zero_area).sum()) - len(keep)
    if duplicates:
        report.add("duplicates", duplicates, label_file, f"{duplicates} duplicate rows removed")
    if len(keep) > MAX_OBJECTS_PER_IMAGE:
        extra = len(keep) - MAX_OBJECTS_PER_IMAGE
        report.add("too_many_objects", extra, label_file, f"{len(keep)} objects: only the first "
                                                          f"{MAX_OBJECTS_PER_IMAGE} are kept ({extra} rows dropped)")
        keep = keep[:MAX_OBJECTS_PER_IMAGE]
    return _take(objects, keep)


# ---------------------------------------------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------------------------------------------


def _parse_numeric(numbered: list, layout: LabelLayout, label_file: str, report) -> tuple[np.ndarray, list]:
    """Keep rows of an accepted column count whose values are all finite numbers; returns (line numbers (m,),
    rows: a list of float64 arrays, in file order)."""
    all_lines = np.array([n for n, _ in numbered], np.int64)
    column_counts = np.array([len(t) for _, t in numbered], np.int64)
    accepted = layout.accepts(column_counts)
    _count_rows(report, "wrong_columns", ~accepted, all_lines, label_file,
                lambda i: f"expected {layout.describe()}, got {column_counts[i]}")
    line_numbers, tokens = all_lines[accepted], [numbered[i][1] for i in np.flatnonzero(accepted)]
    values, numeric = [None] * len(tokens), np.zeros(len(tokens), bool)
    # Rows of one length parse as one array (the whole file at once for boxes); polygons vary in length.
    by_length: dict[int, list[int]] = {}
    for i, t in enumerate(tokens):
        by_length.setdefault(len(t), []).append(i)
    for indices in by_length.values():
        group, group_numeric = _parse_group(np.array([tokens[i] for i in indices]))
        for i, row, ok in zip(indices, group, group_numeric):
            values[i], numeric[i] = row, ok
    _count_rows(report, "non_numeric", ~numeric, line_numbers, label_file,
                lambda i: f"non-numeric value in '{' '.join(tokens[i])}'")
    return line_numbers[numeric], _select(values, numeric)


def _parse_group(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(m, c) string tokens -> (values float64, row is all finite)."""
    try:
        values = tokens.astype(np.float64)
        return values, np.isfinite(values).all(1)
    except ValueError:  # some token is not a number: find which rows, one at a time
        values = np.zeros(tokens.shape, np.float64)
        numeric = np.zeros(len(tokens), bool)
        for i, row in enumerate(tokens):
            try:
                values[i] = row.astype(np.float64)
                numeric[i] = np.isfinite(values[i]).all()
            except ValueError:
                pass
        return values, numeric


# ---------------------------------------------------------------------------------------------------------------
# coordinates
# ---------------------------------------------------------------------------------------------------------------


def _coordinates(row: np.ndarray, layout: LabelLayout) -> np.ndarray:
    """The values of a row that are image coordinates (a keypoint's visibility is not)."""
    if layout.points == "keypoints" and layout.kpt_shape[1] == 3:
        keypoints = row[BOX_COLUMNS:].reshape(-1, 3)[:, :2].ravel()
        return np.concatenate([row[1:BOX_COLUMNS], keypoints])
    return row[1:]


def _outside_unit_square(rows: list, layout: LabelLayout) -> np.ndarray:
    """Per row: does any coordinate lie further than COORD_TOLERANCE outside [0, 1]?"""
    if not rows:
        return np.zeros(0, bool)
    coordinates = [_coordinates(row, layout) for row in rows]
    flat = np.concatenate(coordinates)
    row_of = np.repeat(np.arange(len(rows)), [len(c) for c in coordinates])
    far = (flat < -COORD_TOLERANCE) | (flat > 1 + COORD_TOLERANCE)
    return np.bincount(row_of, weights=far, minlength=len(rows)) > 0


def _objects(rows: list, layout: LabelLayout) -> tuple[dict, np.ndarray]:
    """Rows (within tolerance of the unit square) -> (arrays of `layout.empty()` with every coordinate clipped into
    the image, which rows clipping changed). A box given by its points is their extent."""
    n = len(rows)
    given_box = np.array([len(row) == BOX_COLUMNS or layout.points == "keypoints" for row in rows])
    boxes, clipped = np.zeros((n, 4)), np.zeros(n, bool)
    if given_box.any():
        boxes[given_box], clipped[given_box] = _clipped_boxes(np.array(_select([r[1:BOX_COLUMNS] for r in rows],
                                                                                given_box)))
    polygons = {}
    for i in np.flatnonzero(~given_box):  # a polygon's (or corners') extent; few rows per file, small arrays
        points = rows[i][1:].reshape(-1, 2)
        inside = points.clip(0, 1)
        clipped[i] = bool((inside != points).any())
        boxes[i] = xyxy2xywh(np.concatenate([inside.min(0), inside.max(0)])[None])[0]
        polygons[i] = inside.astype(np.float32)
    objects = {"cls": np.array([row[:1] for row in rows], np.float32), "bboxes": boxes.astype(np.float32)}
    if layout.points == "segments":
        objects["segments"] = [polygons[i] for i in range(n)]
    elif layout.points == "corners":
        objects["corners"] = np.stack([polygons[i] for i in range(n)])
    elif layout.points == "keypoints":
        keypoints = np.stack([row[BOX_COLUMNS:] for row in rows]).reshape(n, *layout.kpt_shape)
        inside = keypoints.copy()
        inside[..., :2] = keypoints[..., :2].clip(0, 1)
        clipped |= (inside != keypoints).reshape(n, -1).any(1)
        objects["keypoints"] = inside.astype(np.float32)
    return objects, clipped & (boxes[:, 2] > 0) & (boxes[:, 3] > 0)


def _clipped_boxes(xywh: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Clip xywh boxes (within tolerance of the unit square) to it as corners; returns (boxes, clipped mask)."""
    inside = xywh.clip(0, 1)
    corners = xywh2xyxy(inside)
    corners_clipped = corners.clip(0, 1)
    boxes = xyxy2xywh(corners_clipped)
    clipped = (np.abs(corners_clipped - corners) > 1e-6).any(1) | (inside != xywh).any(1)
    return boxes, clipped


# ---------------------------------------------------------------------------------------------------------------
# selecting rows
# ---------------------------------------------------------------------------------------------------------------


def _select(rows: list, mask: np.ndarray) -> list:
    return [row for row, keep in zip(rows, mask) if keep]


def _row_key(objects: dict, i: int) -> bytes:
    """Everything object i holds, as bytes: two rows are duplicates when their keys are equal."""
    return b"".join(np.ascontiguousarray(array[i]).tobytes() for array in objects.values())


def _first_occurrences(keys: list) -> np.ndarray:
    first: dict = {}
    for position, key in enumerate(keys):
        first.setdefault(key, position)
    return np.array(sorted(first.values()), np.int64)


def _take(objects: dict, keep: np.ndarray) -> dict:
    return {key: ([array[i] for i in keep] if isinstance(array, list) else array[keep])
            for key, array in objects.items()}


def _count_rows(report, kind, mask, line_numbers, label_file, describe) -> None:
    if mask.any():
        first = int(np.flatnonzero(mask)[0])
        n = int(mask.sum())
        more = f" (+{n - 1} more rows)" if n > 1 else ""
        report.add(kind, n, label_file, f"line {line_numbers[first]}: {describe(first)}{more}")


def _fmt(v: float) -> str:
    return f"{v:g}"
