"""Instances: the objects of one sample, every per-object array kept aligned with its box.

A sample holds its objects as `cls` (n, 1) and `bboxes` (n, 4) pixel xyxy and, when the task has them, `segments`
(n, S, 2) polygon points, `keypoints` (n, K, 2 | 3: x, y[, visibility]) or `corners` (n, 4, 2) of rotated boxes,
all in pixels of the current image.
Transforms never move these arrays by hand: they read an `Instances` from the sample, apply one of its geometric
operations (scale and offset, a 3x3 matrix, a flip, a clip), keep or drop objects with one mask, and write it
back, so an array added for a new task can never fall out of step with the boxes.

Operations return new arrays (the dataset's cached labels are never modified in place).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from yolotrain.utils.boxes import clip_boxes
from yolotrain.utils.obb import min_area_corners

# Every per-object key a sample may hold, in the order collate concatenates them; each has one row per object.
PER_OBJECT_KEYS = ("cls", "bboxes", "segments", "keypoints", "corners")
POINT_KEYS = ("segments", "keypoints", "corners")  # per-object arrays of (x, y[, ...]) points that move with the image


@dataclass
class Instances:
    """`bboxes` (n, 4) float32 pixel xyxy; `segments` (n, S, 2), `keypoints` (n, K, 2 | 3) and `corners` (n, 4, 2)
    or None."""

    bboxes: np.ndarray
    segments: Optional[np.ndarray] = None
    keypoints: Optional[np.ndarray] = None
    corners: Optional[np.ndarray] = None

    @classmethod
    def from_sample(cls, sample: dict) -> "Instances":
        return cls(np.asarray(sample["bboxes"], np.float32).reshape(-1, 4),
                   sample.get("segments"), sample.get("keypoints"), sample.get("corners"))

    def into(self, sample: dict) -> dict:
        """Write the arrays into `sample` (the point arrays only where the sample has them); returns it."""
        sample["bboxes"] = self.bboxes.astype(np.float32, copy=False)
        for key in POINT_KEYS:
            if getattr(self, key) is not None:
                sample[key] = getattr(self, key).astype(np.float32, copy=False)
        return sample

    def __len__(self):
        return len(self.bboxes)

    def _points(self):
        return {key: getattr(self, key) for key in POINT_KEYS if getattr(self, key) is not None}

    # ------------------------------------------------------------------ geometry
    def scale_and_offset(self, gain_x: float, gain_y: float, offset_x: float = 0.0, offset_y: float = 0.0):
        """x * gain_x + offset_x, y * gain_y + offset_y for boxes and points (a resize, a pad, a shift)."""
        bboxes = self.bboxes * np.array([gain_x, gain_y] * 2, np.float32) + np.array([offset_x, offset_y] * 2,
                                                                                     np.float32)
        moved = {key: _scaled_points(points, gain_x, gain_y, offset_x, offset_y) for key, points in self._points().items()}
        return Instances(bboxes.astype(np.float32), **moved)

    def transform(self, matrix: np.ndarray):
        """Apply a 3x3 matrix (affine or perspective) in continuous pixel coordinates. Rotated boxes' corners are
        refitted to the smallest rectangle around them (a shear or perspective turns a rectangle into another
        quadrilateral). Each box becomes the box around its transformed polygon or rotated corners where there are
        some (tight under rotation), else around its own 4 corners."""
        moved = {key: _transformed_points(points, matrix) for key, points in self._points().items()}
        if "corners" in moved:  # a shear or perspective makes a rotated box a quadrilateral: refit a rectangle
            moved["corners"] = min_area_corners(moved["corners"])
        outline = moved.get("segments", moved.get("corners"))
        if outline is None:
            outline = _transformed_points(_corners(self.bboxes), matrix)
        if len(outline):
            bboxes = np.concatenate([outline[..., :2].min(1), outline[..., :2].max(1)], 1)
        else:
            bboxes = np.zeros((0, 4), np.float32)
        return Instances(bboxes.astype(np.float32), **moved)

    def flip(self, direction: str, size: int, flip_idx: Optional[Sequence[int]] = None):
        """Mirror in an image of width (horizontal) or height (vertical) `size`. A horizontal flip also swaps
        each object's left and right keypoints: keypoint k takes the place of `flip_idx[k]`."""
        axis = 0 if direction == "horizontal" else 1
        bboxes = self.bboxes.copy()
        bboxes[:, [axis, axis + 2]] = size - self.bboxes[:, [axis + 2, axis]]
        moved = {}
        for key, points in self._points().items():
            points = points.copy()
            points[..., axis] = size - points[..., axis]
            if key == "keypoints" and direction == "horizontal" and flip_idx is not None:
                points = points[:, list(flip_idx)]
            moved[key] = points
        return Instances(bboxes, **moved)

    def clip(self, height: int, width: int):
        """Boxes and polygons inside the image; keypoints that left it become invisible (visibility 0); rotated
        corners stay where they are (a rotated box may reach past the border)."""
        bboxes = clip_boxes(self.bboxes.copy(), (height, width))
        moved = {}
        if self.segments is not None:
            segments = self.segments.copy()
            segments[..., 0] = segments[..., 0].clip(0, width)
            segments[..., 1] = segments[..., 1].clip(0, height)
            moved["segments"] = segments
        if self.keypoints is not None:
            keypoints = self.keypoints.copy()
            if keypoints.shape[-1] == 3:
                x, y = keypoints[..., 0], keypoints[..., 1]
                outside = (x < 0) | (x > width) | (y < 0) | (y > height)
                keypoints[..., 2] = np.where(outside, 0.0, keypoints[..., 2])
            moved["keypoints"] = keypoints
        if self.corners is not None:
            moved["corners"] = self.corners
        return Instances(bboxes, **moved)


# ---------------------------------------------------------------------------------------------------------------
# selecting and joining objects: every per-object key of a sample at once
# ---------------------------------------------------------------------------------------------------------------


def keep_objects(sample: dict, keep: np.ndarray) -> dict:
    """Keep the objects selected by `keep` (a boolean mask or indices) in every per-object array of `sample` (or of
    a scan record, whose polygons are a list of arrays of varying length)."""
    keep = np.asarray(keep)
    for key in PER_OBJECT_KEYS:
        if key in sample:
            if isinstance(sample[key], list):
                indices = np.flatnonzero(keep) if keep.dtype == bool else keep
                sample[key] = [sample[key][i] for i in indices]
            else:
                sample[key] = sample[key][keep]
    return sample


def concatenated_objects(samples: Sequence[dict]) -> dict:
    """The per-object arrays of several samples joined in order (Mosaic's tiles, MixUp's pair, ...). A key some
    samples lack is an error: dropping it silently would misalign the rest."""
    joined = {}
    for key in PER_OBJECT_KEYS:
        present = [key in sample for sample in samples]
        if any(present) and not all(present):
            raise ValueError(f"samples to join disagree on '{key}': every one must have it or none")
        if all(present):
            joined[key] = np.concatenate([sample[key] for sample in samples], 0)
    return joined


# ---------------------------------------------------------------------------------------------------------------
# points
# ---------------------------------------------------------------------------------------------------------------


def _scaled_points(points, gain_x, gain_y, offset_x, offset_y):
    moved = points.astype(np.float32, copy=True)
    moved[..., 0] = points[..., 0] * gain_x + offset_x
    moved[..., 1] = points[..., 1] * gain_y + offset_y
    return moved


def _transformed_points(points, matrix):
    """(n, P, 2+) points through a 3x3 matrix; columns after x, y (visibility) are kept."""
    n, count = points.shape[:2]
    if n == 0:
        return points.astype(np.float32, copy=True)
    homogeneous = np.ones((n * count, 3))
    homogeneous[:, :2] = points[..., :2].reshape(-1, 2)
    projected = homogeneous @ matrix.T
    xy = projected[:, :2] / projected[:, 2:3] if np.any(matrix[2, :2] != 0) else projected[:, :2]
    moved = points.astype(np.float32, copy=True)
    moved[..., :2] = xy.reshape(n, count, 2)
    return moved


def _corners(bboxes):
    """(n, 4, 2) corners x1y1, x2y1, x2y2, x1y2 of xyxy boxes."""
    return bboxes[:, [0, 1, 2, 1, 2, 3, 0, 3]].reshape(-1, 4, 2)
