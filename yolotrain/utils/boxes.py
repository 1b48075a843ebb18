"""Box format conversions and IoU. Work on numpy arrays and torch tensors alike unless noted.

Formats: xyxy = (x1, y1, x2, y2) corners; xywh = (cx, cy, w, h) centre and size; a trailing `n` means normalised
to [0, 1] by the image width and height.
"""

import math

import numpy as np
import torch


def _empty_like(x):
    return x.clone() if isinstance(x, torch.Tensor) else np.copy(x)


def xywh2xyxy(x):
    """(..., 4) centre-size boxes to corners."""
    y = _empty_like(x)
    half_w, half_h = x[..., 2] / 2, x[..., 3] / 2
    y[..., 0] = x[..., 0] - half_w
    y[..., 1] = x[..., 1] - half_h
    y[..., 2] = x[..., 0] + half_w
    y[..., 3] = x[..., 1] + half_h
    return y


def xyxy2xywh(x):
    """(..., 4) corner boxes to centre-size."""
    y = _empty_like(x)
    y[..., 0] = (x[..., 0] + x[..., 2]) / 2
    y[..., 1] = (x[..., 1] + x[..., 3]) / 2
    y[..., 2] = x[..., 2] - x[..., 0]
    y[..., 3] = x[..., 3] - x[..., 1]
    return y


def xywhn2xyxy(x, w, h, padw=0.0, padh=0.0):
    """Normalised centre-size boxes to pixel corners in a (h, w) image placed at offset (padw, padh)."""
    y = xywh2xyxy(x)
    y[..., [0, 2]] = y[..., [0, 2]] * w + padw
    y[..., [1, 3]] = y[..., [1, 3]] * h + padh
    return y


def xyxy2xywhn(x, w, h):
    """Pixel corner boxes in a (h, w) image to normalised centre-size boxes."""
    y = xyxy2xywh(x)
    y[..., [0, 2]] = y[..., [0, 2]] / w
    y[..., [1, 3]] = y[..., [1, 3]] / h
    return y


def clip_boxes(boxes, shape):
    """Clip (..., 4) xyxy boxes in place to an image of shape (h, w); returns the boxes."""
    h, w = shape[:2]
    if isinstance(boxes, torch.Tensor):
        boxes[..., 0].clamp_(0, w)
        boxes[..., 1].clamp_(0, h)
        boxes[..., 2].clamp_(0, w)
        boxes[..., 3].clamp_(0, h)
    else:
        boxes[..., [0, 2]] = boxes[..., [0, 2]].clip(0, w)
        boxes[..., [1, 3]] = boxes[..., [1, 3]].clip(0, h)
    return boxes


def scale_boxes_to_original(boxes, ratio_pad, original_shape):
    """Map xyxy boxes from a letterboxed image back to the original image.

    ratio_pad is ((gain_h, gain_w), (pad_w, pad_h)) as produced by the dataset: original = (box - pad) / gain.
    Works in place on a copy; returns clipped boxes.
    """
    (gain_h, gain_w), (pad_w, pad_h) = ratio_pad
    out = _empty_like(boxes)
    out[..., [0, 2]] = (boxes[..., [0, 2]] - pad_w) / gain_w
    out[..., [1, 3]] = (boxes[..., [1, 3]] - pad_h) / gain_h
    return clip_boxes(out, original_shape)


def box_area(boxes):
    """Area of (..., 4) xyxy boxes."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(0) * (boxes[..., 3] - boxes[..., 1]).clamp(0)


def box_iou(boxes1, boxes2, eps=1e-7):
    """Pairwise IoU of xyxy tensors: (N, 4) x (M, 4) -> (N, M)."""
    return batched_box_iou(boxes1[None], boxes2[None], eps)[0]


def batched_box_iou(boxes1, boxes2, eps=1e-7):
    """Pairwise IoU within each of B sets of xyxy boxes: (B, N, 4) x (B, M, 4) -> (B, N, M).

    Coordinate by coordinate: (B, N, M, 2) corner temporaries cost about twice as much on a CPU (strided pairs)."""
    x1a, y1a, x2a, y2a = (boxes1[..., i, None] for i in range(4))  # (B, N, 1) each
    x1b, y1b, x2b, y2b = (boxes2[:, None, :, i] for i in range(4))  # (B, 1, M) each
    inter = (torch.min(x2a, x2b) - torch.max(x1a, x1b)).clamp_(min=0)
    inter *= (torch.min(y2a, y2b) - torch.max(y1a, y1b)).clamp_(min=0)  # (B, N, M)
    union = box_area(boxes1)[:, :, None] + box_area(boxes2)[:, None, :] - inter
    return inter / (union + eps)


def bbox_ciou(box1, box2, eps=1e-7):
    """Element-wise Complete IoU of broadcastable (..., 4) xyxy tensors (Zheng et al., 2020)."""
    b1_x1, b1_y1, b1_x2, b1_y2 = box1.unbind(-1)
    b2_x1, b2_y1, b2_x2, b2_y2 = box2.unbind(-1)
    w1, h1 = b1_x2 - b1_x1, (b1_y2 - b1_y1).clamp(min=eps)
    w2, h2 = b2_x2 - b2_x1, (b2_y2 - b2_y1).clamp(min=eps)
    inter = (torch.min(b1_x2, b2_x2) - torch.max(b1_x1, b2_x1)).clamp(0) * (
        torch.min(b1_y2, b2_y2) - torch.max(b1_y1, b2_y1)
    ).clamp(0)
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    enclosing_w = torch.max(b1_x2, b2_x2) - torch.min(b1_x1, b2_x1)
    enclosing_h = torch.max(b1_y2, b2_y2) - torch.min(b1_y1, b2_y1)
    diagonal_sq = enclosing_w**2 + enclosing_h**2 + eps
    centre_dist_sq = ((b2_x1 + b2_x2 - b1_x1 - b1_x2) ** 2 + (b2_y1 + b2_y2 - b1_y1 - b1_y2) ** 2) / 4
    aspect = (4 / math.pi**2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)).pow(2)
    with torch.no_grad():
        alpha = aspect / (aspect - iou + (1 + eps))
    return iou - (centre_dist_sq / diagonal_sq + aspect * alpha)
