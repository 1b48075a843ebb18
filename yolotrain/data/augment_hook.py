"""The `augment` argument: a user augmentation applied to every training sample after mosaic, the affine warp and
mixup, before the colour jitter and flips.

It is one of:
- a callable `fn(image, bboxes, cls) -> (image, bboxes, cls)`: `image` HxWx3 uint8 BGR (OpenCV's order), `bboxes`
  (n, 4) float32 pixel xyxy in that image, `cls` (n, 1) float32 class ids. It returns an image of the same shape
  (every image of a batch has one shape) and the boxes and classes that belong to it (any number, (m, 4) and (m,)
  or (m, 1)); boxes are clipped to the image, boxes left without area are dropped;
- an Albumentations `Compose` with `bbox_params=A.BboxParams(format="yolo", label_fields=["class_labels"])`
  (format "pascal_voc" works too; without label_fields the class ids travel as a fifth box column). It gets the
  image in RGB, Albumentations' convention, and is re-seeded from the sample's seed before each call, so the
  augmentation is reproducible like the built-in ones (needs albumentations >= 2, extra `yolotrain[albumentations]`);
- from the command line or a yaml, a `module:name` string naming either of these in a module importable from the
  current folder (`augment=my_augs:transform`).

From Python, the object itself is passed (`YOLO(...).train(augment=fn)`); it is kept out of the saved arguments
(args.yaml, checkpoints hold only plain values), so a resumed run needs it passed again, while a `module:name`
string is saved and found again on resume. Output that breaks the contract stops training with one line.
"""

from __future__ import annotations

import importlib
import logging
import os
import random
import sys

import cv2
import numpy as np

from yolotrain.errors import CfgError, YoloTrainError
from yolotrain.utils.boxes import clip_boxes, xywhn2xyxy, xyxy2xywhn

LOGGER = logging.getLogger(__name__)

ALBUMENTATIONS_BOX_FORMATS = ("yolo", "pascal_voc")
_WORKER_PREFIX = "Caught AugmentHookError"


class AugmentHookError(YoloTrainError):
    """The `augment` hook returned something other than an image and its boxes and classes.

    Raised in a DataLoader worker, torch re-raises it in the main process with the worker's traceback as its
    message; that message is cut back to the original line here, so the error stays one line.
    """

    def __init__(self, message: str = ""):
        message = str(message)
        if message.startswith(_WORKER_PREFIX):
            lines = [line for line in message.splitlines() if "AugmentHookError: " in line]
            message = lines[-1].split("AugmentHookError: ", 1)[1] if lines else message.splitlines()[0]
        super().__init__(message)


def split_augment_hook(overrides: dict | None) -> tuple[dict, object]:
    """`overrides` without an `augment` object (a callable or Compose) and that object (None when there is none
    or when `augment` is a `module:name` string, which stays an ordinary argument)."""
    overrides = dict(overrides or {})
    value = overrides.get("augment")
    if value is None or isinstance(value, str):
        return overrides, None
    if not callable(value):
        raise CfgError(f"augment={value!r} is invalid: expected a callable (image, bboxes, cls) -> "
                       "(image, bboxes, cls), an albumentations Compose, or a module:name string")
    del overrides["augment"]
    return overrides, value


def resolve_augment_hook(value):
    """The hook object for an `augment` value: None (no hook), a callable, or a `module:name` import path."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = _import_hook(value)
    if not callable(value):
        raise CfgError(f"augment={value!r} is invalid: expected a callable or an albumentations Compose")
    if is_albumentations(value):
        _albumentations_box_params(value)  # checked now, not at the first sample
    return value


def _import_hook(path: str):
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise CfgError(f"augment={path!r} is invalid: expected module:name, e.g. augment=my_augs:transform")
    try:
        module = _import_module(module_name)
    except ImportError as error:
        raise CfgError(f"augment={path!r}: module '{module_name}' cannot be imported ({error})") from None
    try:
        hook = getattr(module, attribute)
    except AttributeError:
        raise CfgError(f"augment={path!r}: module '{module_name}' has no '{attribute}'") from None
    if not callable(hook):
        raise CfgError(f"augment={path!r}: '{attribute}' is a {type(hook).__name__}, expected a callable "
                       "or an albumentations Compose")
    return hook


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        # The console script does not put the current folder on sys.path, `python -m yolotrain` does.
        if error.name != name.split(".")[0] or os.getcwd() in sys.path:
            raise
        sys.path.append(os.getcwd())
        return importlib.import_module(name)


def hook_name(hook) -> str:
    """A readable name for messages: `module.function` or the class name."""
    if is_albumentations(hook):
        return "albumentations " + type(hook).__name__
    module = getattr(hook, "__module__", None) or type(hook).__module__
    name = getattr(hook, "__qualname__", None) or type(hook).__qualname__
    return f"{module}.{name}"


def is_albumentations(hook) -> bool:
    """An Albumentations composition (recognised without importing albumentations)."""
    return type(hook).__module__.startswith("albumentations") and hasattr(hook, "processors")


def _albumentations_box_params(hook) -> tuple[str, list]:
    """(box format, label fields) of an Albumentations Compose; a one-line error when it cannot take boxes."""
    processor = hook.processors.get("bboxes")
    if processor is None:
        raise CfgError("augment: the albumentations Compose has no bbox_params, so it cannot move boxes; build it "
                       "with bbox_params=A.BboxParams(format='yolo', label_fields=['class_labels'])")
    box_format = processor.params.format
    if box_format not in ALBUMENTATIONS_BOX_FORMATS:
        raise CfgError(f"augment: the albumentations Compose has bbox_params format={box_format!r}; expected "
                       f"one of {', '.join(ALBUMENTATIONS_BOX_FORMATS)}")
    return box_format, list(processor.params.label_fields or [])


class CustomAugment:
    """The pipeline step that runs the hook on a sample (see the module docstring)."""

    def __init__(self, hook):
        self.hook = hook
        self.name = hook_name(hook)
        self.albumentations = is_albumentations(hook)

    def __call__(self, sample):
        points = [key for key in ("segments", "keypoints") if key in sample]
        if points:  # the hook returns boxes and classes only: the objects' points would fall out of step
            raise CfgError(f"augment={self.name} sees boxes and classes only, but these labels also have "
                           f"{' and '.join(points)}; train without augment=")
        img = sample["img"]
        h, w = img.shape[:2]
        bboxes = clip_boxes(np.asarray(sample["bboxes"], np.float32).reshape(-1, 4).copy(), (h, w))
        cls = np.asarray(sample["cls"], np.float32).reshape(-1, 1)
        if self.albumentations:
            out_img, out_boxes, out_cls = self._albumentations(img, bboxes, cls)
        else:
            out_img, out_boxes, out_cls = self._callable(img, bboxes, cls)
        sample["img"], sample["bboxes"], sample["cls"] = self._checked(img.shape, out_img, out_boxes, out_cls)
        return sample

    def _callable(self, img, bboxes, cls):
        result = self.hook(img, bboxes, cls)
        if not isinstance(result, (tuple, list)) or len(result) != 3:
            raise AugmentHookError(f"augment hook {self.name} returned {type(result).__name__}: expected a tuple "
                                   "(image, bboxes, cls)")
        return result

    def _albumentations(self, img, bboxes, cls):
        box_format, label_fields = _albumentations_box_params(self.hook)
        h, w = img.shape[:2]
        boxes_in = xyxy2xywhn(bboxes, w, h) if box_format == "yolo" else bboxes
        labels = cls.reshape(-1)
        if not label_fields:  # class ids ride along as an extra box column
            boxes_in = np.concatenate([boxes_in, labels[:, None]], 1)
        if hasattr(self.hook, "set_random_seed"):
            self.hook.set_random_seed(random.getrandbits(32))  # `random` is seeded per sample by the dataset
        # cvtColor rather than a reversed view: numpy copies a channel-reversed image ~30x slower
        inputs = {"image": cv2.cvtColor(img, cv2.COLOR_BGR2RGB), "bboxes": boxes_in}
        inputs.update({field: labels for field in label_fields})
        out = self.hook(**inputs)
        out_img = np.asarray(out["image"])
        if out_img.ndim == 3 and out_img.shape[2] == 3 and out_img.dtype == np.uint8:
            out_img = cv2.cvtColor(out_img, cv2.COLOR_RGB2BGR)  # anything else fails the contract check below
        out_boxes = np.asarray(out["bboxes"], np.float32).reshape(-1, 4 if label_fields else 5)
        out_cls = np.asarray(out[label_fields[0]], np.float32) if label_fields else out_boxes[:, 4]
        out_boxes = out_boxes[:, :4]
        if box_format == "yolo":
            out_h, out_w = out_img.shape[:2]
            out_boxes = xywhn2xyxy(out_boxes, out_w, out_h)
        return out_img, out_boxes, out_cls

    def _checked(self, shape, img, bboxes, cls):
        """The hook's output as a valid sample's (image, (m, 4) float32 boxes, (m, 1) float32 classes)."""
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.shape != shape:
            got = f"{img.dtype} array of shape {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
            raise AugmentHookError(f"augment hook {self.name} returned an image {got}: expected uint8 of shape "
                                   f"{shape} (the shape it was given)")
        bboxes = self._array(bboxes, "bboxes")
        cls = self._array(cls, "cls")
        if bboxes.size == 0:
            bboxes = bboxes.reshape(0, 4)
        if bboxes.ndim != 2 or bboxes.shape[1] != 4:
            raise AugmentHookError(f"augment hook {self.name} returned bboxes of shape {bboxes.shape}: expected "
                                   "(n, 4) pixel xyxy boxes")
        if cls.size != len(bboxes) or (cls.ndim == 2 and cls.shape[1] != 1) or cls.ndim > 2:
            raise AugmentHookError(f"augment hook {self.name} returned {len(bboxes)} boxes but cls of shape "
                                   f"{cls.shape}: expected one class id per box, (n,) or (n, 1)")
        if not (np.isfinite(bboxes).all() and np.isfinite(cls).all()):
            raise AugmentHookError(f"augment hook {self.name} returned non-finite boxes or classes")
        inverted = (bboxes[:, 2] < bboxes[:, 0]) | (bboxes[:, 3] < bboxes[:, 1])
        if inverted.any():
            raise AugmentHookError(f"augment hook {self.name} returned box {bboxes[inverted][0].tolist()} with "
                                   "x2 < x1 or y2 < y1: expected pixel xyxy boxes")
        bboxes = clip_boxes(bboxes.copy(), shape)
        keep = (bboxes[:, 2] > bboxes[:, 0]) & (bboxes[:, 3] > bboxes[:, 1])  # those moved out of the image go
        return img, bboxes[keep], cls.reshape(-1, 1)[keep]

    def _array(self, value, name):
        try:
            return np.asarray(value, np.float32)
        except (TypeError, ValueError):
            raise AugmentHookError(f"augment hook {self.name} returned {name} that is not a numeric array "
                                   f"({type(value).__name__})") from None

    def __repr__(self):
        return f"{type(self).__name__}({self.name})"
