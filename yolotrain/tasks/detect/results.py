"""What `predict` returns: one `Results` per image or video frame, with the containers its task fills: `Boxes` in
original-image pixels (detect, segment, pose), `Masks` (segment), `Keypoints` (pose), `Probs` (classify); the kinds
a task does not have are None."""

import copy
import json
from pathlib import Path

import cv2
import numpy as np
import torch

from yolotrain.engine.containers import TensorContainer
from yolotrain.utils.boxes import xyxy2xywh
from yolotrain.utils.masks import mask_to_polygon
from yolotrain.utils.obb import xywhr_to_corners
from yolotrain.utils.plotting import (KEYPOINT_VISIBLE, class_colour, draw_keypoints, draw_label, draw_masks,
                                      label_font_scale)


class _Detections(TensorContainer):
    """Rows of one image's detections: `shape_columns` values of their shape, a track id when a tracker numbered
    them, then conf and cls. A tensor or a NumPy array; a single row reads as one."""

    shape_columns = 4

    def __init__(self, data, orig_shape):
        super().__init__(data[None] if data.ndim == 1 else data, orig_shape)  # one row, as iteration gives

    @property
    def conf(self):
        return self.data[:, -2]

    @property
    def cls(self):
        return self.data[:, -1]

    @property
    def is_track(self):
        """Whether the rows carry track ids."""
        return self.data.shape[-1] == self.shape_columns + 3

    @property
    def id(self):
        """(n,) track ids, or None when the detections were not tracked."""
        return self.data[:, self.shape_columns] if self.is_track else None

    @property
    def xyxyn(self):
        return self.xyxy / self._image_scale(4)


class Boxes(_Detections):
    """Detections of one image: `data` (n, 6) x1, y1, x2, y2, conf, cls in original-image pixels, or (n, 7) with a
    track id before conf (x1, y1, x2, y2, id, conf, cls) when a tracker numbered them."""

    @property
    def xyxy(self):
        return self.data[:, :4]

    @property
    def xywh(self):
        """Centre x, centre y, width, height in pixels."""
        return xyxy2xywh(self.xyxy)

    @property
    def xywhn(self):
        return self.xywh / self._image_scale(4)


class OBB(_Detections):
    """Rotated boxes of one image: `data` (n, 7) cx, cy, w, h, angle (radians), conf, cls in original-image pixels,
    or (n, 8) with a track id before conf. `xyxyxyxy` gives their corners (n, 4, 2), `xyxy` their axis-aligned
    extent."""

    shape_columns = 5

    @property
    def xywhr(self):
        return self.data[:, :5]

    @property
    def xyxyxyxy(self):
        """(n, 4, 2) corner x, y in pixels."""
        return xywhr_to_corners(self.xywhr)

    @property
    def xyxyxyxyn(self):
        return self.xyxyxyxy / self._image_scale(2)

    @property
    def xyxy(self):
        """(n, 4) the axis-aligned extent x1, y1, x2, y2 of each rotated box."""
        corners = self.xyxyxyxy
        if isinstance(corners, torch.Tensor):
            return torch.cat((corners.amin(1), corners.amax(1)), 1)
        return np.concatenate((corners.min(1), corners.max(1)), 1)


class Keypoints(TensorContainer):
    """Keypoints of one image's detections: `data` (n, K, 2 | 3) x, y in original-image pixels and, when the model
    predicts it, each point's visibility in [0, 1]. `xy` and `xyn` read a point whose visibility is below 0.5 as
    (0, 0), as the YOLO family reports points it does not see; `data` keeps the predicted positions."""

    def __init__(self, data, orig_shape):
        super().__init__(data[None] if data.ndim == 2 else data, orig_shape)

    @property
    def has_visible(self):
        """Whether the points carry a visibility (kpt_shape [K, 3])."""
        return self.data.shape[-1] == 3

    @property
    def conf(self):
        """(n, K) visibility of each point, or None."""
        return self.data[..., 2] if self.has_visible else None

    @property
    def xy(self):
        """(n, K, 2) pixel x, y; unseen points (visibility < 0.5) are 0, 0."""
        xy = self.data[..., :2]
        if not self.has_visible:
            return xy
        return xy * ~(self.data[..., 2:3] < KEYPOINT_VISIBLE)

    @property
    def xyn(self):
        """`xy` divided by the image width and height."""
        return self.xy / self._image_scale(2)


class Masks(TensorContainer):
    """Masks of one image's detections: `data` (n, H, W) at the original image size (bool or 0/1), `xy` each
    mask's outline (its largest region) as a (P, 2) float32 array of pixel x, y, `xyn` the same divided by the
    image width and height."""

    def __init__(self, data, orig_shape):
        super().__init__(data[None] if data.ndim == 2 else data, orig_shape)

    @property
    def xy(self):
        return [mask_to_polygon(np.asarray(torch.as_tensor(mask).cpu())) for mask in self.data]

    @property
    def xyn(self):
        height, width = self.orig_shape
        return [outline / np.array([width, height], np.float32) for outline in self.xy]


class Probs(TensorContainer):
    """Class probabilities of one image, `data` (nc,): `top1` (class id), `top5` (class ids, best first),
    `top1conf`, `top5conf` (their probabilities)."""

    def __init__(self, data, orig_shape=None):
        super().__init__(data, orig_shape or (0, 0))

    def _ranked(self):
        return torch.as_tensor(self.data).float().argsort(descending=True)

    @property
    def top1(self):
        return int(self._ranked()[0])

    @property
    def top5(self):
        return self._ranked()[:5].tolist()

    @property
    def top1conf(self):
        return self.data[self.top1]

    @property
    def top5conf(self):
        return self.data[self.top5]


CONTAINERS = ("boxes", "masks", "probs", "keypoints", "obb")  # the kinds of prediction a Results may hold


class Results:
    """Predictions of one image or video frame.

    Attributes: `path` (file, or "image0" for an in-memory image), `orig_img` (BGR uint8), `orig_shape` (h, w),
    `names` ({class id: name}), `boxes` (`Boxes`, detect, segment and pose), `masks` (`Masks`, segment),
    `keypoints` (`Keypoints`, pose), `probs` (`Probs`, classify), `obb` (`OBB`, oriented boxes), `speed`
    ({"preprocess", "inference", "postprocess"}: ms), `frame` (0-based frame index in its video, None for images).
    """

    def __init__(self, orig_img, path, names, boxes=None, speed=None, frame=None, probs=None, keypoints=None,
                 masks=None, obb=None):
        self.orig_img = orig_img
        self.orig_shape = tuple(orig_img.shape[:2])
        self.path = str(path)
        self.names = dict(names)
        self.boxes = Boxes(boxes, self.orig_shape) if boxes is not None else None
        self.masks = Masks(masks, self.orig_shape) if masks is not None else None
        self.probs = Probs(probs, self.orig_shape) if probs is not None else None
        self.keypoints = Keypoints(keypoints, self.orig_shape) if keypoints is not None else None
        self.obb = OBB(obb, self.orig_shape) if obb is not None else None
        self.speed = dict(speed or {})
        self.frame = frame

    def __len__(self):
        """The number of objects (classify: of classes scored)."""
        return len(next(c for c in self._containers().values()))

    def _containers(self):
        return {name: getattr(self, name) for name in CONTAINERS if getattr(self, name) is not None}

    # ------------------------------------------------------------------ devices and formats
    def cpu(self):
        """A copy whose predictions are CPU tensors (the image and names are shared)."""
        return self._converted(lambda c: c.cpu())

    def numpy(self):
        """A copy whose predictions are NumPy arrays."""
        return self._converted(lambda c: c.numpy())

    def cuda(self):
        return self._converted(lambda c: c.cuda())

    def to(self, *args, **kwargs):
        """A copy whose predictions are moved or cast as `torch.Tensor.to(*args, **kwargs)` would."""
        return self._converted(lambda c: c.to(*args, **kwargs))

    def _converted(self, convert):
        result = copy.copy(self)
        for name, container in self._containers().items():
            setattr(result, name, convert(container))
        return result

    def _cpu_probs(self):
        return torch.as_tensor(self.probs.data).float().cpu()

    def _cpu_keypoints(self):
        return Keypoints(torch.as_tensor(self.keypoints.data).float().cpu(), self.orig_shape)

    def _cpu_boxes(self):
        """The boxes (or rotated boxes) as a CPU tensor, whatever their device or format: what the text and drawing
        methods read (both give `xyxy`, `conf` and `cls`)."""
        objects = self.obb if self.obb is not None else self.boxes
        return type(objects)(torch.as_tensor(objects.data).cpu(), self.orig_shape)

    # ------------------------------------------------------------------ text
    def summary(self, normalize=False, decimals=5):
        """One dict per detection: name, class, confidence and box (x1, y1, x2, y2; normalised if asked); classify:
        one per class of the top 5."""
        if self.probs is not None:
            probs = self._cpu_probs()
            return [{"name": self.names.get(c, str(c)), "class": c, "confidence": round(float(probs[c]), decimals)}
                    for c in self.probs.top5]
        detections = self._cpu_boxes()
        if self.obb is not None:  # a rotated box by its 4 corners
            corners = (detections.xyxyxyxyn if normalize else detections.xyxyxyxy).flatten(1).tolist()
            keys = ("x1", "y1", "x2", "y2", "x3", "y3", "x4", "y4")
        else:
            corners = (detections.xyxyn if normalize else detections.xyxy).tolist()
            keys = ("x1", "y1", "x2", "y2")
        rows = []
        for values, conf, cls in zip(corners, detections.conf.tolist(), detections.cls.tolist()):
            rows.append({
                "name": self.names.get(int(cls), str(int(cls))),
                "class": int(cls),
                "confidence": round(conf, decimals),
                "box": {k: round(v, decimals) for k, v in zip(keys, values)},
            })
        if self.masks is not None:
            outlines = self.masks.xyn if normalize else self.masks.xy
            for row, outline in zip(rows, outlines):
                xy = outline.astype(np.float64).round(decimals)
                row["segments"] = {"x": xy[:, 0].tolist(), "y": xy[:, 1].tolist()}
        if self.keypoints is not None:
            points = self._cpu_keypoints()
            xy = (points.xyn if normalize else points.xy).double().numpy().round(decimals)
            for i, row in enumerate(rows):
                row["keypoints"] = {"x": xy[i, :, 0].tolist(), "y": xy[i, :, 1].tolist()}
                if points.has_visible:
                    row["keypoints"]["visible"] = points.conf[i].double().numpy().round(decimals).tolist()
        return rows

    def to_json(self, normalize=False, decimals=5):
        return json.dumps(self.summary(normalize, decimals), indent=2)

    def verbose(self):
        """"2 circles, 1 star" (or "no detections"); classify: "circle 0.93, star 0.04, ..." (top 5), for the log
        line."""
        if self.probs is not None:
            return ", ".join(f"{row['name']} {row['confidence']:.2f}" for row in self.summary())
        if not len(self):
            return "no detections"
        counts = torch.bincount(self._cpu_boxes().cls.long())
        parts = [f"{int(n)} {self.names.get(c, str(c))}{'s' if n > 1 else ''}"
                 for c, n in enumerate(counts.tolist()) if n]
        return ", ".join(parts)

    def save_txt(self, path, save_conf=False):
        """YOLO label lines `cls cx cy w h [conf]` (normalised) to `path`; nothing is written for no detections.
        Segment: `cls x1 y1 x2 y2 ... [conf]`, each mask's outline (a detection whose mask is empty is left out).
        OBB: `cls x1 y1 x2 y2 x3 y3 x4 y4 [conf]`, the 4 corners.
        Classify: `probability name` lines of the top 5."""
        if self.probs is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text("".join(f"{row['confidence']:.2f} {row['name']}\n" for row in self.summary()))
            return path
        lines, detections = [], self._cpu_boxes()
        points = self._keypoint_columns()
        shapes = self._shape_columns(detections)
        for i, (conf, cls) in enumerate(zip(detections.conf.tolist(), detections.cls.tolist())):
            if not shapes[i]:
                continue
            values = [int(cls)] + shapes[i] + points[i] + ([conf] if save_conf else [])
            lines.append(" ".join(str(v) if isinstance(v, int) else f"{v:.6g}" for v in values))
        if lines:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text("\n".join(lines) + "\n")
        return path

    def _shape_columns(self, detections):
        """Per detection the YOLO label values of its shape: its mask's outline (segment), its 4 corners (obb) or
        its box, normalised."""
        if self.obb is not None:
            return detections.xyxyxyxyn.flatten(1).tolist()
        if self.masks is None:
            return detections.xywhn.tolist()
        return [outline.ravel().tolist() if len(outline) >= 3 else [] for outline in self.masks.xyn]

    def _keypoint_columns(self):
        """Per detection the YOLO pose label values of its keypoints (x y [visibility], normalised), or []."""
        if self.keypoints is None:
            return [[] for _ in range(len(self))]
        points = self._cpu_keypoints()
        columns = points.xyn if not points.has_visible else torch.cat((points.xyn, points.conf[..., None]), -1)
        return columns.flatten(1).tolist()

    # ------------------------------------------------------------------ images
    def plot(self, line_width=None, labels=True, conf=True):
        """The original image with the boxes drawn (a new BGR array); classify: the top 5 classes written in its
        top-left corner."""
        image = self.orig_img.copy()
        line = line_width or max(round(sum(image.shape[:2]) / 2 * 0.003), 1)
        scale = label_font_scale(image.shape)
        if self.probs is not None:
            (_, height), baseline = cv2.getTextSize("Ay", cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
            row_height = height + baseline + 2  # one label box: each row's sits right under the one before
            for row_index, row in enumerate(self.summary()):
                text = " ".join(filter(None, [row["name"] if labels else "", f"{row['confidence']:.2f}" if conf else ""]))
                draw_label(image, text, (0, (row_index + 1) * row_height), (56, 56, 255), scale)
            return image
        detections = self._cpu_boxes()
        if self.masks is not None:
            draw_masks(image, torch.as_tensor(self.masks.data).cpu().numpy(), detections.cls.long().tolist())
        corners = detections.xyxyxyxy.round().int().numpy() if self.obb is not None else None
        for i, ((x1, y1, x2, y2), score, cls) in enumerate(zip(detections.xyxy.round().int().tolist(),
                                                               detections.conf.tolist(), detections.cls.tolist())):
            colour = class_colour(int(cls), bgr=True)
            if corners is not None:
                cv2.polylines(image, [corners[i]], True, colour, line, cv2.LINE_AA)
            else:
                cv2.rectangle(image, (x1, y1), (x2, y2), colour, line, cv2.LINE_AA)
            text = " ".join(filter(None, [self.names.get(int(cls), str(int(cls))) if labels else "",
                                          f"{score:.2f}" if conf else ""]))
            if text:
                draw_label(image, text, (x1, y1), colour, scale)
        if self.keypoints is not None:
            draw_keypoints(image, self._cpu_keypoints().data.numpy(), line)
        return image

    def save(self, filename=None, **plot_args):
        """Write the annotated image to `filename` (default `results_<image file name>` in the working folder);
        returns the path."""
        if filename is None:
            name = Path(self.path).name
            filename = f"results_{name}" if Path(name).suffix else f"results_{name}.jpg"  # in-memory: "image0"
        path = Path(filename)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(path), self.plot(**plot_args)):
            raise OSError(f"could not write {path}")
        return str(path)

    def save_crop(self, save_dir, file_stem):
        """Each detection cut from the original image to `save_dir/<class name>/<file_stem>[_k].jpg` (classify has
        no objects to cut: nothing is written)."""
        if self.boxes is None and self.obb is None:
            return
        detections = self._cpu_boxes()  # a rotated box is cut as its axis-aligned extent
        boxes = detections.xyxy.round().int().numpy()
        height, width = self.orig_shape
        seen = {}
        for (x1, y1, x2, y2), cls in zip(boxes, detections.cls.long().tolist()):
            x1, x2 = np.clip([x1, x2], 0, width)
            y1, y2 = np.clip([y1, y2], 0, height)
            if x2 <= x1 or y2 <= y1:
                continue
            name = self.names.get(cls, str(cls))
            count = seen[name] = seen.get(name, 0) + 1
            path = Path(save_dir) / name / f"{file_stem}{'' if count == 1 else f'_{count}'}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), self.orig_img[y1:y2, x1:x2])

