"""What `predict` returns: one `Results` per image or video frame, with its `Boxes` in original-image pixels."""

import json
from pathlib import Path

import cv2
import numpy as np
import torch

from yolotrain.utils.boxes import xyxy2xywh
from yolotrain.utils.plotting import class_colour


class Boxes:
    """Detections of one image: `data` (n, 6) x1, y1, x2, y2, conf, cls in original-image pixels."""

    def __init__(self, data, orig_shape):
        self.data = data
        self.orig_shape = tuple(orig_shape)  # (h, w)

    def __len__(self):
        return len(self.data)

    @property
    def xyxy(self):
        return self.data[:, :4]

    @property
    def conf(self):
        return self.data[:, 4]

    @property
    def cls(self):
        return self.data[:, 5]

    @property
    def xywh(self):
        """Centre x, centre y, width, height in pixels."""
        return xyxy2xywh(self.xyxy)

    @property
    def xyxyn(self):
        return self.xyxy / self._size_xyxy()

    @property
    def xywhn(self):
        return self.xywh / self._size_xyxy()

    def _size_xyxy(self):
        height, width = self.orig_shape
        return torch.tensor([width, height, width, height], dtype=self.data.dtype, device=self.data.device)


class Results:
    """Detections of one image or video frame.

    Attributes: `path` (file, or "image0" for an in-memory image), `orig_img` (BGR uint8), `orig_shape` (h, w),
    `names` ({class id: name}), `boxes` (`Boxes`), `speed` ({"preprocess", "inference", "postprocess"}: ms),
    `frame` (0-based frame index in its video, None for images).
    """

    def __init__(self, orig_img, path, names, boxes, speed=None, frame=None):
        self.orig_img = orig_img
        self.orig_shape = tuple(orig_img.shape[:2])
        self.path = str(path)
        self.names = dict(names)
        self.boxes = Boxes(boxes, self.orig_shape)
        self.speed = dict(speed or {})
        self.frame = frame

    def __len__(self):
        return len(self.boxes)

    # ------------------------------------------------------------------ text
    def summary(self, normalize=False, decimals=5):
        """One dict per detection: name, class, confidence and box (x1, y1, x2, y2; normalised if asked)."""
        boxes = (self.boxes.xyxyn if normalize else self.boxes.xyxy).cpu().tolist()
        rows = []
        for (x1, y1, x2, y2), conf, cls in zip(boxes, self.boxes.conf.cpu().tolist(), self.boxes.cls.cpu().tolist()):
            rows.append({
                "name": self.names.get(int(cls), str(int(cls))),
                "class": int(cls),
                "confidence": round(conf, decimals),
                "box": {k: round(v, decimals) for k, v in zip(("x1", "y1", "x2", "y2"), (x1, y1, x2, y2))},
            })
        return rows

    def to_json(self, normalize=False, decimals=5):
        return json.dumps(self.summary(normalize, decimals), indent=2)

    def verbose(self):
        """"2 circles, 1 star" (or "no detections"), for the log line."""
        if not len(self):
            return "no detections"
        counts = torch.bincount(self.boxes.cls.long().cpu())
        parts = [f"{int(n)} {self.names.get(c, str(c))}{'s' if n > 1 else ''}"
                 for c, n in enumerate(counts.tolist()) if n]
        return ", ".join(parts)

    def save_txt(self, path, save_conf=False):
        """YOLO label lines `cls cx cy w h [conf]` (normalised) to `path`; nothing is written for no detections."""
        lines = []
        for (cx, cy, w, h), conf, cls in zip(self.boxes.xywhn.cpu().tolist(), self.boxes.conf.cpu().tolist(),
                                             self.boxes.cls.cpu().tolist()):
            values = [int(cls), cx, cy, w, h] + ([conf] if save_conf else [])
            lines.append(" ".join(str(v) if isinstance(v, int) else f"{v:.6g}" for v in values))
        if lines:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text("\n".join(lines) + "\n")
        return path

    # ------------------------------------------------------------------ images
    def plot(self, line_width=None, labels=True, conf=True):
        """The original image with the boxes drawn (a new BGR array)."""
        image = self.orig_img.copy()
        line = line_width or max(round(sum(image.shape[:2]) / 2 * 0.003), 2)
        for (x1, y1, x2, y2), score, cls in zip(self.boxes.xyxy.cpu().round().int().tolist(),
                                                 self.boxes.conf.cpu().tolist(), self.boxes.cls.cpu().tolist()):
            colour = class_colour(int(cls), bgr=True)
            cv2.rectangle(image, (x1, y1), (x2, y2), colour, line, cv2.LINE_AA)
            text = " ".join(filter(None, [self.names.get(int(cls), str(int(cls))) if labels else "",
                                          f"{score:.2f}" if conf else ""]))
            if text:
                self._draw_label(image, text, (x1, y1), colour, line)
        return image

    @staticmethod
    def _draw_label(image, text, corner, colour, line):
        scale, thickness = line / 3, max(line - 1, 1)
        (width, height), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        x, y = corner
        above = y - height - 3 >= 0  # inside the box when there is no room above it
        top = y - height - 3 if above else y
        cv2.rectangle(image, (x, top), (x + width, top + height + 3), colour, -1, cv2.LINE_AA)
        cv2.putText(image, text, (x, top + height + 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                    thickness, cv2.LINE_AA)

    def save(self, path, **plot_args):
        """Write the annotated image to `path`."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(path), self.plot(**plot_args)):
            raise OSError(f"could not write {path}")
        return path

    def save_crop(self, save_dir, file_stem):
        """Each detection cut from the original image to `save_dir/<class name>/<file_stem>[_k].jpg`."""
        boxes = self.boxes.xyxy.cpu().round().int().numpy()
        height, width = self.orig_shape
        seen = {}
        for (x1, y1, x2, y2), cls in zip(boxes, self.boxes.cls.cpu().long().tolist()):
            x1, x2 = np.clip([x1, x2], 0, width)
            y1, y2 = np.clip([y1, y2], 0, height)
            if x2 <= x1 or y2 <= y1:
                continue
            name = self.names.get(cls, str(cls))
            count = seen[name] = seen.get(name, 0) + 1
            path = Path(save_dir) / name / f"{file_stem}{'' if count == 1 else f'_{count}'}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), self.orig_img[y1:y2, x1:x2])
