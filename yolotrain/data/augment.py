"""Image and object transforms for training samples.

Every transform takes a *sample* dict (see docs/architecture.md: `img` HxWx3 uint8 BGR, `cls` (n, 1) float32,
`bboxes` (n, 4) float32 pixel xyxy in the current `img`, optionally `segments` (n, S, 2) and `keypoints`
(n, K, 2 | 3) in the same pixels, `im_file`, `ori_shape`, `resized_shape`, `ratio_pad`) and returns it with pixels
and objects moved together: every per-object array through `data.instances` (one geometric operation, one mask
that keeps or drops objects), so none falls out of step with the boxes. `Format` is the last step and produces
tensors.

Coordinates are continuous: pixel column i covers [i, i + 1), so a box (0, 0, w, h) covers the whole image.
Randomness comes from the global `random` module only, so the loader's per-worker seeding makes every
transform reproducible.
"""

from __future__ import annotations

import logging
import math
import numbers
import random

import cv2
import numpy as np
import torch

from yolotrain.data.augment_hook import CustomAugment
from yolotrain.data.instances import PER_OBJECT_KEYS, POINT_KEYS, Instances, concatenated_objects, keep_objects
from yolotrain.errors import CfgError
from yolotrain.utils.boxes import clip_boxes, xyxy2xywhn
from yolotrain.utils.masks import polygons_to_index_mask, polygons_to_masks

LOGGER = logging.getLogger(__name__)

PAD_VALUE = 114  # gray used for letterbox padding, mosaic canvas and warp borders
_PAD_BGR = (PAD_VALUE, PAD_VALUE, PAD_VALUE)


# ---------------------------------------------------------------------------------------------------------------
# helpers on labels
# ---------------------------------------------------------------------------------------------------------------


def _identity_ratio_pad():
    return (1.0, 1.0), (0.0, 0.0)


def _box_sizes(bboxes):
    return bboxes[:, 2] - bboxes[:, 0], bboxes[:, 3] - bboxes[:, 1]


def _box_ioa(boxes1, boxes2, eps=1e-7):
    """Intersection of every box1 with every box2 over the area of box2: (N, 4) x (M, 4) -> (N, M)."""
    top_left = np.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = np.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    inter = np.clip(bottom_right - top_left, 0, None).prod(2)
    widths, heights = _box_sizes(boxes2)
    return inter / (widths * heights + eps)[None]


# What a transformed box must keep to stay a label: width and height in pixels, aspect ratio, share of its area.
CANDIDATE_WH_THR, CANDIDATE_AR_THR, CANDIDATE_AREA_THR = 2.0, 100.0, 0.1


def box_candidates(before, after, wh_thr=CANDIDATE_WH_THR, ar_thr=CANDIDATE_AR_THR, area_thr=CANDIDATE_AREA_THR,
                   eps=1e-16):
    """Boolean mask (n,) of transformed boxes worth keeping.

    `before` are the boxes before the transform already multiplied by its scale, `after` the transformed, clipped
    boxes. A box survives if it is wider and taller than `wh_thr` pixels, kept more than `area_thr` of its area
    (so mostly cut-away boxes go) and its aspect ratio stays below `ar_thr`.
    """
    w1, h1 = _box_sizes(before)
    w2, h2 = _box_sizes(after)
    aspect = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + eps) > area_thr) & (aspect < ar_thr)


def _hyp_value(hyp, key):
    """Read one gain from an attribute object or a dict; a missing key is a CfgError naming it."""
    value = hyp.get(key) if isinstance(hyp, dict) else getattr(hyp, key, None)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise CfgError(f"augmentation argument '{key}'={value!r} is invalid: expected a number")
    return float(value)


def _probability(hyp, key):
    value = _hyp_value(hyp, key)
    if not 0.0 <= value <= 1.0:
        raise CfgError(f"augmentation argument '{key}'={value!r} is invalid: expected a probability in [0, 1]")
    return value


def _non_negative(hyp, key):
    value = _hyp_value(hyp, key)
    if value < 0:
        raise CfgError(f"augmentation argument '{key}'={value!r} is invalid: expected a number >= 0")
    return value


def _scale_gain(hyp):
    value = _hyp_value(hyp, "scale")
    if not 0.0 <= value < 1.0:  # 1 - scale must stay positive or the image collapses / mirrors
        raise CfgError(f"augmentation argument 'scale'={value!r} is invalid: expected a number in [0, 1)")
    return value


# ---------------------------------------------------------------------------------------------------------------
# composition
# ---------------------------------------------------------------------------------------------------------------


class Compose:
    """Apply transforms in order; each takes a sample dict and returns it."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, sample):
        for transform in self.transforms:
            sample = transform(sample)
        return sample

    def append(self, transform):
        """Add a transform at the end."""
        self.transforms.append(transform)

    def close_mosaic(self):
        """Turn off Mosaic, MixUp and CopyPaste and make RandomPerspective work on the plain letterboxed image.

        Called by the dataset for the final `close_mosaic` epochs, so training ends on images like validation's.
        """
        for transform in self.transforms:
            if isinstance(transform, (Mosaic, MixUp, CopyPaste)):
                transform.p = 0.0
            elif isinstance(transform, RandomPerspective):
                transform.border = (0, 0)

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(type(t).__name__ for t in self.transforms)})"


# ---------------------------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------------------------


class LetterBox:
    """Resize keeping the aspect ratio, then pad with gray to `new_shape` (h, w).

    `sample["rect_shape"]` (set by the dataset for rectangular validation batches) overrides `new_shape`.
    `auto` pads only up to the next multiple of `stride`; `scale_fill` stretches without padding; `scaleup=False`
    never enlarges (better validation accuracy); `center=False` pads only bottom/right.
    """

    def __init__(self, new_shape=(640, 640), auto=False, scale_fill=False, scaleup=True, center=True, stride=32):
        self.new_shape = (new_shape, new_shape) if isinstance(new_shape, int) else tuple(new_shape)
        self.auto = auto
        self.scale_fill = scale_fill
        self.scaleup = scaleup
        self.center = center
        self.stride = stride

    def __call__(self, sample):
        img = sample["img"]
        h, w = img.shape[:2]
        rect_shape = sample.pop("rect_shape", None)
        target_h, target_w = self.new_shape if rect_shape is None else rect_shape
        unpad_w, unpad_h, pad_w, pad_h = self._layout(h, w, int(target_h), int(target_w))
        if (unpad_h, unpad_w) != (h, w):
            img = cv2.resize(img, (unpad_w, unpad_h), interpolation=cv2.INTER_LINEAR)
        left, top = (int(round(pad_w / 2 - 0.1)), int(round(pad_h / 2 - 0.1))) if self.center else (0, 0)
        img = cv2.copyMakeBorder(
            img, top, pad_h - top, left, pad_w - left, cv2.BORDER_CONSTANT, value=_PAD_BGR
        )  # always a new array, so later in-place transforms never touch the dataset's cache
        gain_w, gain_h = unpad_w / w, unpad_h / h
        Instances.from_sample(sample).scale_and_offset(gain_w, gain_h, left, top).into(sample)
        sample.update(img=img, resized_shape=img.shape[:2])
        sample["ratio_pad"] = _compose_ratio_pad(sample.get("ratio_pad"), (gain_h, gain_w), (left, top))
        return sample

    def _layout(self, h, w, target_h, target_w):
        """Size of the resized image (w, h) and the total padding (w, h) in pixels."""
        ratio = min(target_h / h, target_w / w)
        if not self.scaleup:
            ratio = min(ratio, 1.0)
        if self.scale_fill:
            return target_w, target_h, 0, 0
        unpad_w, unpad_h = int(round(w * ratio)), int(round(h * ratio))
        pad_w, pad_h = target_w - unpad_w, target_h - unpad_h
        if self.auto:  # minimum rectangle the network accepts
            pad_w, pad_h = pad_w % self.stride, pad_h % self.stride
        return unpad_w, unpad_h, pad_w, pad_h


def _compose_ratio_pad(ratio_pad, gain, pad):
    """Chain a new resize+pad (gain (h, w), pad (w, h)) after an existing ratio_pad.

    With box = current * gain + pad and original = (current - pad0) / gain0 it follows that
    original = (box - (pad + gain * pad0)) / (gain * gain0).
    """
    (gain0_h, gain0_w), (pad0_w, pad0_h) = ratio_pad or _identity_ratio_pad()
    gain_h, gain_w = gain
    pad_w, pad_h = pad
    return (
        (float(gain_h * gain0_h), float(gain_w * gain0_w)),
        (float(pad_w + gain_w * pad0_w), float(pad_h + gain_h * pad0_h)),
    )


class Mosaic:
    """Tile the sample with 3 random others around a random centre of a 2*imgsz square canvas.

    The canvas keeps `mosaic_border` = (-imgsz // 2, -imgsz // 2) in the sample so RandomPerspective crops it
    back to imgsz. Boxes are shifted with their image, clipped to the canvas and dropped when less than a pixel
    wide or tall is left.
    """

    def __init__(self, dataset, imgsz, p=1.0):
        if len(dataset) < 1:
            raise ValueError("Mosaic needs a dataset with at least one image")
        self.dataset = dataset
        self.imgsz = int(imgsz)
        self.p = p
        self.border = (-self.imgsz // 2, -self.imgsz // 2)
        self.min_box_size = 1.0  # pixels; thinner slivers left by the canvas edge are not objects any more

    def __call__(self, sample):
        if self.p <= 0 or random.random() >= self.p:
            return sample
        others = [self.dataset.get_image_and_label(random.randint(0, len(self.dataset) - 1)) for _ in range(3)]
        return self._tile([sample, *others])

    def _tile(self, samples):
        size = self.imgsz
        canvas = np.full((2 * size, 2 * size, 3), PAD_VALUE, dtype=np.uint8)
        centre_x = int(random.uniform(0.5 * size, 1.5 * size))
        centre_y = int(random.uniform(0.5 * size, 1.5 * size))
        tiles = []
        for position, piece in enumerate(samples):  # 4 fixed quadrants, not a per-box loop
            canvas_box, image_box = _mosaic_slices(position, centre_x, centre_y, piece["img"].shape[:2], 2 * size)
            (cx1, cy1, cx2, cy2), (ix1, iy1, ix2, iy2) = canvas_box, image_box
            canvas[cy1:cy2, cx1:cx2] = piece["img"][iy1:iy2, ix1:ix2]
            shifted = Instances.from_sample(piece).scale_and_offset(1.0, 1.0, cx1 - ix1, cy1 - iy1)
            tiles.append(shifted.into({key: piece[key] for key in PER_OBJECT_KEYS if key in piece}))
        first = samples[0]
        sample = {
            **{k: v for k, v in first.items() if k not in ("img", "rect_shape", *PER_OBJECT_KEYS)},  # now square
            **concatenated_objects(tiles),
            "img": canvas,
            "resized_shape": canvas.shape[:2],
            "mosaic_border": self.border,
        }
        bboxes = Instances.from_sample(sample).clip(*canvas.shape[:2]).into(sample)["bboxes"]
        widths, heights = _box_sizes(bboxes)
        return keep_objects(sample, (widths >= self.min_box_size) & (heights >= self.min_box_size))


def _mosaic_slices(position, centre_x, centre_y, shape, canvas_size):
    """Canvas and image regions (x1, y1, x2, y2) for quadrant 0..3 (top-left, top-right, bottom-left, -right).

    Each image touches the centre with one corner and extends away from it, so only the canvas edge can cut it.
    """
    h, w = shape
    if position == 0:
        canvas_box = (max(centre_x - w, 0), max(centre_y - h, 0), centre_x, centre_y)
        image_box = (w - (canvas_box[2] - canvas_box[0]), h - (canvas_box[3] - canvas_box[1]), w, h)
    elif position == 1:
        canvas_box = (centre_x, max(centre_y - h, 0), min(centre_x + w, canvas_size), centre_y)
        image_box = (0, h - (canvas_box[3] - canvas_box[1]), canvas_box[2] - canvas_box[0], h)
    elif position == 2:
        canvas_box = (max(centre_x - w, 0), centre_y, centre_x, min(centre_y + h, canvas_size))
        image_box = (w - (canvas_box[2] - canvas_box[0]), 0, w, canvas_box[3] - canvas_box[1])
    else:
        canvas_box = (centre_x, centre_y, min(centre_x + w, canvas_size), min(centre_y + h, canvas_size))
        image_box = (0, 0, canvas_box[2] - canvas_box[0], canvas_box[3] - canvas_box[1])
    return canvas_box, image_box


class RandomPerspective:
    """Random rotation, scale, shear, translation and perspective as one 3x3 matrix.

    Gains: `degrees` (+/- rotation), `translate` (+/- fraction of the output size), `scale` (+/- fraction),
    `shear` (+/- degrees), `perspective` (+/- fraction, 0..0.001). The output is the input size plus
    2 * border (border is (y, x), negative crops); a sample from Mosaic brings its own `mosaic_border`, which
    wins over `border`. A sample without one first goes through `pre_transform` (e.g. a LetterBox to imgsz), so
    every output has the same size. Boxes: the 4 corners are transformed and enclosed, clipped, and boxes that
    became degenerate or mostly cut away are dropped (see `box_candidates`).
    """

    def __init__(self, degrees=0.0, translate=0.1, scale=0.5, shear=0.0, perspective=0.0, border=(0, 0),
                 pre_transform=None):
        self.degrees = degrees
        self.translate = translate
        self.scale = scale
        self.shear = shear
        self.perspective = perspective
        self.border = tuple(border)
        self.pre_transform = pre_transform

    def __call__(self, sample):
        border = sample.pop("mosaic_border", None)
        if border is None:
            if self.pre_transform is not None:
                sample = self.pre_transform(sample)
            border = self.border
        img = sample["img"]
        out_h, out_w = img.shape[0] + 2 * border[0], img.shape[1] + 2 * border[1]
        matrix, scale = self._random_matrix(img.shape[:2], (out_h, out_w))
        sample["img"] = self._warp(img, matrix, (out_h, out_w))
        before = Instances.from_sample(sample)
        after = before.transform(matrix).clip(out_h, out_w)
        after.into(sample)
        sample["resized_shape"] = (out_h, out_w)
        return keep_objects(sample, box_candidates(before.bboxes * scale, after.bboxes))

    def _random_matrix(self, in_shape, out_shape):
        """The combined matrix (continuous pixel coordinates) and the scale it applies."""
        in_h, in_w = in_shape
        out_h, out_w = out_shape
        centre = np.eye(3)
        centre[0, 2], centre[1, 2] = -in_w / 2, -in_h / 2  # origin at the input centre
        perspective = np.eye(3)
        perspective[2, 0] = random.uniform(-self.perspective, self.perspective)
        perspective[2, 1] = random.uniform(-self.perspective, self.perspective)
        rotation = np.eye(3)
        angle = random.uniform(-self.degrees, self.degrees)
        scale = random.uniform(1 - self.scale, 1 + self.scale)
        rotation[:2] = cv2.getRotationMatrix2D(center=(0, 0), angle=angle, scale=scale)
        shear = np.eye(3)
        shear[0, 1] = math.tan(math.radians(random.uniform(-self.shear, self.shear)))
        shear[1, 0] = math.tan(math.radians(random.uniform(-self.shear, self.shear)))
        translation = np.eye(3)
        translation[0, 2] = random.uniform(0.5 - self.translate, 0.5 + self.translate) * out_w
        translation[1, 2] = random.uniform(0.5 - self.translate, 0.5 + self.translate) * out_h
        return translation @ shear @ rotation @ perspective @ centre, scale  # right to left: centre first

    @staticmethod
    def _warp(img, matrix, out_shape):
        out_h, out_w = out_shape
        if img.shape[:2] == (out_h, out_w) and np.allclose(matrix, np.eye(3)):
            return img.copy()
        # OpenCV samples at pixel centres (index i is continuous i + 0.5): shift so boxes and pixels agree exactly
        to_index = np.array([[1, 0, -0.5], [0, 1, -0.5], [0, 0, 1]])
        from_index = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
        index_matrix = to_index @ matrix @ from_index
        if np.any(matrix[2, :2] != 0):
            return cv2.warpPerspective(img, index_matrix, dsize=(out_w, out_h), borderValue=_PAD_BGR)
        return cv2.warpAffine(img, index_matrix[:2], dsize=(out_w, out_h), borderValue=_PAD_BGR)


# ---------------------------------------------------------------------------------------------------------------
# mixing
# ---------------------------------------------------------------------------------------------------------------


class MixUp:
    """Blend the sample with another one (ratio ~ Beta(32, 32)) and keep the boxes of both.

    The other sample comes from `dataset.get_image_and_label` through `pre_transform` (in training the same
    Mosaic + RandomPerspective), so both images have the same size.
    """

    def __init__(self, dataset, pre_transform=None, p=0.0):
        self.dataset = dataset
        self.pre_transform = pre_transform
        self.p = p

    def __call__(self, sample):
        if self.p <= 0 or random.random() >= self.p:
            return sample
        other = self.dataset.get_image_and_label(random.randint(0, len(self.dataset) - 1))
        if self.pre_transform is not None:
            other = self.pre_transform(other)
        if other["img"].shape != sample["img"].shape:
            raise ValueError(
                f"MixUp got images of shapes {sample['img'].shape} and {other['img'].shape}: its pre_transform "
                "must produce the same size as the main pipeline"
            )
        ratio = random.betavariate(32.0, 32.0)
        sample["img"] = cv2.addWeighted(sample["img"], ratio, other["img"], 1.0 - ratio, 0.0)
        sample.update(concatenated_objects([sample, other]))
        return sample


class CopyPaste:
    """Copy-paste: paste objects of the horizontally flipped image onto free places.

    With probability `p`, every mirrored object whose box covers no existing box by more than 30% of that box's
    area (intersection over area) is pasted from the flipped image and added to the labels, its polygon and
    keypoints mirrored with it (left and right keypoints swapped by `flip_idx`). An object with an outline
    (segmentation) is pasted by its own pixels; one with a box only, as the rectangle of its box.
    """

    def __init__(self, p=0.0, max_ioa=0.3, flip_idx=None):
        self.p = p
        self.max_ioa = max_ioa
        self.flip_idx = flip_idx

    def __call__(self, sample):
        if self.p <= 0 or len(sample["bboxes"]) == 0 or random.random() >= self.p:
            return sample
        img, bboxes = sample["img"], sample["bboxes"]
        h, w = img.shape[:2]
        mirrored = Instances.from_sample(sample).flip("horizontal", w, _flip_idx_for(sample, self.flip_idx))
        free = (_box_ioa(mirrored.bboxes, bboxes) <= self.max_ioa).all(1)
        if not free.any():
            return sample
        if mirrored.segments is not None:
            mask = polygons_to_masks(mirrored.segments[free], (h, w)).any(0)
        else:
            mask = _rectangles_mask(mirrored.bboxes[free], h, w)
        img = img.copy()
        img[mask] = img[:, ::-1][mask]
        sample["img"] = img
        copies = keep_objects(mirrored.into({key: sample[key] for key in PER_OBJECT_KEYS if key in sample}), free)
        sample.update(concatenated_objects([sample, copies]))
        return sample


def _rectangles_mask(bboxes, h, w):
    """Boolean (h, w) mask of the union of xyxy boxes, rasterised without a per-box loop (2D difference array)."""
    x1, y1, x2, y2 = np.round(clip_boxes(bboxes.copy(), (h, w))).astype(np.int64).T
    diff = np.zeros((h + 1, w + 1), np.int32)
    np.add.at(diff, (y1, x1), 1)
    np.add.at(diff, (y1, x2), -1)
    np.add.at(diff, (y2, x1), -1)
    np.add.at(diff, (y2, x2), 1)
    return diff.cumsum(0).cumsum(1)[:h, :w] > 0


# ---------------------------------------------------------------------------------------------------------------
# colour and flips
# ---------------------------------------------------------------------------------------------------------------


class RandomHSV:
    """Multiply hue, saturation and value by random factors in [1 - gain, 1 + gain], in place, via lookup tables."""

    def __init__(self, hgain=0.5, sgain=0.5, vgain=0.5):
        self.gains = (hgain, sgain, vgain)

    def __call__(self, sample):
        if not any(self.gains):
            return sample
        img = sample["img"]
        hue_gain, sat_gain, val_gain = (random.uniform(-1, 1) * gain + 1 for gain in self.gains)
        levels = np.arange(256, dtype=np.float64)
        hue_lut = ((levels * hue_gain) % 180).astype(np.uint8)  # OpenCV hue is 0..179
        sat_lut = np.clip(levels * sat_gain, 0, 255).astype(np.uint8)
        val_lut = np.clip(levels * val_gain, 0, 255).astype(np.uint8)
        hue, sat, val = cv2.split(cv2.cvtColor(img, cv2.COLOR_BGR2HSV))
        hsv = cv2.merge((cv2.LUT(hue, hue_lut), cv2.LUT(sat, sat_lut), cv2.LUT(val, val_lut)))
        cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR, dst=img)
        return sample


class RandomFlip:
    """Flip the image and its objects with probability `p`, `direction` "horizontal" or "vertical". A horizontal
    flip swaps left and right keypoints by `flip_idx` (keypoint k moves to the place of `flip_idx[k]`)."""

    def __init__(self, p=0.5, direction="horizontal", flip_idx=None):
        if direction not in ("horizontal", "vertical"):
            raise ValueError(f"RandomFlip direction={direction!r}: expected 'horizontal' or 'vertical'")
        self.p = p
        self.direction = direction
        self.flip_idx = flip_idx

    def __call__(self, sample):
        if self.p <= 0 or random.random() >= self.p:
            return sample
        img = sample["img"]
        h, w = img.shape[:2]
        horizontal = self.direction == "horizontal"
        sample["img"] = np.ascontiguousarray(img[:, ::-1] if horizontal else img[::-1])
        flip_idx = _flip_idx_for(sample, self.flip_idx) if horizontal else None
        Instances.from_sample(sample).flip(self.direction, w if horizontal else h, flip_idx).into(sample)
        return sample


def _flip_idx_for(sample, flip_idx):
    """`flip_idx` for a horizontal flip of `sample`: a sample with keypoints needs one, or a mirrored left wrist
    would still be labelled left."""
    if "keypoints" in sample and flip_idx is None:
        raise CfgError("a horizontal flip of keypoints needs flip_idx (the index of each keypoint's mirror image) in "
                       "the data yaml, or fliplr=0")
    return flip_idx


# ---------------------------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------------------------


class Format:
    """Final step: RGB CHW contiguous uint8 tensor, normalised xywh float32 boxes (n, 4), float32 cls (n, 1), and
    segments / keypoints / corners as float32 tensors with x, y normalised by the image's width and height.

    With `mask_ratio` (segmentation) the polygons are also drawn as `masks` at the image size divided by it: with
    `overlap`, one (h, w) mask per sample whose pixels hold 1 + the index of their object (objects reordered by
    decreasing area, so a small object on a large one stays visible), else (n, h, w) 0/1 masks. `keep_segments`
    False drops the polygons once drawn (training needs only the masks; validation measures masks from them).
    """

    def __init__(self, mask_ratio=None, overlap=True, keep_segments=True):
        self.mask_ratio = mask_ratio
        self.overlap = overlap
        self.keep_segments = keep_segments

    def __call__(self, sample):
        img = sample["img"]
        h, w = img.shape[:2]
        if self.mask_ratio is not None and "segments" in sample:
            self._draw_masks(sample, h, w)
        chw_rgb = np.ascontiguousarray(img[..., ::-1].transpose(2, 0, 1))
        bboxes = clip_boxes(np.asarray(sample["bboxes"], np.float32).reshape(-1, 4).copy(), (h, w))
        sample["img"] = torch.from_numpy(chw_rgb)
        sample["bboxes"] = torch.from_numpy(xyxy2xywhn(bboxes, w, h).astype(np.float32))
        sample["cls"] = torch.from_numpy(np.asarray(sample["cls"], np.float32).reshape(-1, 1).copy())
        normalised = Instances.from_sample({**sample, "bboxes": bboxes}).scale_and_offset(1 / w, 1 / h)
        for key in POINT_KEYS:
            if key in sample:
                sample[key] = torch.from_numpy(getattr(normalised, key))
        sample.pop("mosaic_border", None)  # transient keys a pipeline without their consumer may leave behind
        sample.pop("rect_shape", None)
        if not self.keep_segments and "masks" in sample:
            sample.pop("segments", None)
        return sample

    def _draw_masks(self, sample, h, w):
        segments = np.asarray(sample["segments"], np.float32)
        if self.overlap:
            index_mask, order = polygons_to_index_mask(segments, (h, w), self.mask_ratio)
            keep_objects(sample, order)
            sample["masks"] = torch.from_numpy(index_mask)
        else:
            sample["masks"] = torch.from_numpy(polygons_to_masks(segments, (h, w), self.mask_ratio))


# ---------------------------------------------------------------------------------------------------------------
# batch sizes
# ---------------------------------------------------------------------------------------------------------------

MULTI_SCALE_DEFAULT_RANGE = 0.5  # multi_scale=True varies the size by +/-50%


def multi_scale_sizes(imgsz: int, stride: int, multi_scale: bool | float) -> range:
    """The square sizes multi_scale draws a batch's size from: the multiples of `stride` within
    imgsz * [1 - r, 1 + r], r = 0.5 for True or the given share; never below one stride. With `imgsz` on the
    stride, it is always among them (a range narrower than a stride leaves only it)."""
    share = MULTI_SCALE_DEFAULT_RANGE if multi_scale is True else float(multi_scale)
    # Rounded first: 640 * (1 - 0.7) is 192.00000000000003 in floating point, and 192 must stay in the range.
    smallest = max(math.ceil(round(imgsz * (1 - share) / stride, 6)), 1) * stride
    largest = max(math.floor(round(imgsz * (1 + share) / stride, 6)) * stride, smallest)
    return range(smallest, largest + 1, stride)


# ---------------------------------------------------------------------------------------------------------------
# pipelines
# ---------------------------------------------------------------------------------------------------------------


def build_transforms(dataset, imgsz, hyp, augment):
    """The training (augment=True) or validation pipeline for `dataset` at square size `imgsz`.

    `hyp` is an object with attributes or a dict holding the gains named in cfg/default.yaml.
    Training: Mosaic -> CopyPaste -> RandomPerspective (letterboxes non-mosaic samples first) -> MixUp ->
    the user's `augment` hook when `dataset.augment_hook` is set (yolotrain.data.augment_hook) -> RandomHSV ->
    vertical flip -> horizontal flip -> Format. A rect dataset (`dataset.rect`: rectangular batches) trains without
    mosaic and mixup: each batch has its own shape, which square mosaic tiles would not fit. Validation: LetterBox
    (no upscaling; the sample's `rect_shape` overrides the square) -> Format.
    """
    if not augment:
        return Compose([LetterBox((imgsz, imgsz), scaleup=False), _format_for(dataset, hyp, keep_segments=True)])
    mosaic_p, mixup_p = _probability(hyp, "mosaic"), _probability(hyp, "mixup")
    if getattr(dataset, "rect", False) and (mosaic_p > 0 or mixup_p > 0):
        LOGGER.warning("rect=True: mosaic and mixup are off (each rectangular batch has its own shape, square "
                       "mosaic tiles would not fit it)")
        mosaic_p = mixup_p = 0.0
    mosaic = Mosaic(dataset, imgsz, p=mosaic_p)
    flip_idx = (getattr(dataset, "data", None) or {}).get("flip_idx")  # a pose dataset's mirror map
    copy_paste = CopyPaste(p=_probability(hyp, "copy_paste"), flip_idx=flip_idx)
    perspective = RandomPerspective(
        degrees=_non_negative(hyp, "degrees"),
        translate=_probability(hyp, "translate"),
        scale=_scale_gain(hyp),
        shear=_non_negative(hyp, "shear"),
        perspective=_non_negative(hyp, "perspective"),
        pre_transform=LetterBox((imgsz, imgsz)),
    )
    mixup = MixUp(dataset, pre_transform=Compose([mosaic, copy_paste, perspective]), p=mixup_p)
    hook = getattr(dataset, "augment_hook", None)
    return Compose(
        [
            mosaic,
            copy_paste,
            perspective,
            mixup,
            *([CustomAugment(hook)] if hook is not None else []),
            RandomHSV(_non_negative(hyp, "hsv_h"), _non_negative(hyp, "hsv_s"), _non_negative(hyp, "hsv_v")),
            RandomFlip(p=_probability(hyp, "flipud"), direction="vertical"),
            RandomFlip(p=_probability(hyp, "fliplr"), direction="horizontal", flip_idx=flip_idx),
            _format_for(dataset, hyp, keep_segments=False),
        ]
    )


def _format_for(dataset, hyp, keep_segments):
    """The final `Format` of `dataset`'s pipeline: a segmentation dataset's also draws the masks."""
    if getattr(dataset, "task", "detect") != "segment":
        return Format()
    ratio = _hyp_value(hyp, "mask_ratio")
    if ratio < 1 or ratio != int(ratio):
        raise CfgError(f"mask_ratio={ratio:g} is invalid: expected a whole number >= 1 (training masks are the image "
                       "size divided by it)")
    overlap = hyp.get("overlap_mask", True) if isinstance(hyp, dict) else getattr(hyp, "overlap_mask", True)
    return Format(mask_ratio=int(ratio), overlap=bool(overlap), keep_segments=keep_segments)
