"""Instance masks: polygons stacked for the transforms, polygons rasterised to masks, masks compared and encoded.

Coordinates are continuous pixels (column i covers [i, i + 1)), as everywhere in the data pipeline; a mask pixel
belongs to a polygon when its centre (i + 0.5) lies inside it. Masks are uint8 (or bool) arrays (n, h, w).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch.nn import functional as F

# Polygon points carried per object in training: enough that clipping a warped polygon at the image border (which
# moves its points onto the border one by one) keeps its shape to within a pixel.
TRAIN_POLYGON_POINTS = 1000
MASK_CHUNK = 64  # masks made or compared at once at an image's full size (bounds the float buffers)
_SUBPIXEL_BITS = 4  # cv2.fillPoly's fixed-point fraction: polygon corners placed to 1/16 pixel


# ---------------------------------------------------------------------------------------------------------------
# polygons
# ---------------------------------------------------------------------------------------------------------------


def stack_polygons(polygons: list, count: int | None = None) -> np.ndarray:
    """Polygons of varying point counts -> one (n, S, 2) float32 array with every outline kept exactly.

    Each polygon keeps all its corners; with `count`, points are added along its edges (in proportion to their
    length) to reach `count`, so a later clip at the image border follows the outline. The rest of the S slots
    repeat the last point, which leaves the outline unchanged. S = `count`, or the most corners of one polygon
    when that is more (or when `count` is None).
    """
    if not polygons:
        return np.zeros((0, count or 0, 2), np.float32)
    corners = np.array([len(p) for p in polygons])
    slots = max(int(corners.max()), count or 0)
    starts = np.concatenate([[0], np.cumsum(corners)[:-1]])
    points = np.concatenate([np.asarray(p, np.float64).reshape(-1, 2) for p in polygons])  # (P, 2)
    owner = np.repeat(np.arange(len(polygons)), corners)  # (P,) polygon of each corner
    following = np.arange(len(points)) + 1  # the next corner along the closed outline
    following[starts + corners - 1] = starts
    edges = points[following] - points  # (P, 2)

    extra = np.zeros(len(points), np.int64)  # points inserted after each corner
    if count is not None:
        lengths = np.hypot(edges[:, 0], edges[:, 1])
        perimeter = np.bincount(owner, weights=lengths, minlength=len(polygons))
        budget = np.maximum(slots - corners, 0)  # (n,)
        extra = np.floor(lengths / np.maximum(perimeter[owner], 1e-12) * budget[owner]).astype(np.int64)
    per_corner = extra + 1
    t = np.arange(per_corner.sum()) - np.repeat(np.cumsum(per_corner) - per_corner, per_corner)  # 0..extra
    fraction = t / np.repeat(per_corner, per_corner)
    corner = np.repeat(np.arange(len(points)), per_corner)
    dense = points[corner] + edges[corner] * fraction[:, None]  # (D, 2)

    dense_owner = owner[corner]
    dense_counts = np.bincount(dense_owner, minlength=len(polygons))
    position = np.arange(len(dense)) - np.repeat(np.cumsum(dense_counts) - dense_counts, dense_counts)
    stacked = np.empty((len(polygons), slots, 2), np.float64)
    last = np.cumsum(dense_counts) - 1
    stacked[:] = dense[last][:, None]  # padding: the last point again
    stacked[dense_owner, position] = dense
    return stacked.astype(np.float32)


def polygon_area(segments: np.ndarray) -> np.ndarray:
    """(n, S, 2) outlines -> (n,) their areas (shoelace formula)."""
    x, y = segments[..., 0].astype(np.float64), segments[..., 1].astype(np.float64)
    return 0.5 * np.abs((x * np.roll(y, -1, 1) - np.roll(x, -1, 1) * y).sum(1))


# ---------------------------------------------------------------------------------------------------------------
# rasterising
# ---------------------------------------------------------------------------------------------------------------


def polygons_to_masks(segments: np.ndarray, shape: tuple[int, int], downsample: int = 1) -> np.ndarray:
    """(n, S, 2) pixel outlines -> (n, h, w) uint8 masks of an image of `shape` (h, w) divided by `downsample`."""
    height, width = shape[0] // downsample, shape[1] // downsample
    masks = np.zeros((len(segments), height, width), np.uint8)
    for mask, outline in zip(masks, _fixed_point(segments, downsample)):  # one C call per object
        cv2.fillPoly(mask, [outline], 1, lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)
    return masks


def polygons_to_index_mask(segments: np.ndarray, shape: tuple[int, int], downsample: int = 1):
    """(n, S, 2) pixel outlines -> (one (h, w) mask whose pixels hold 1 + the index of their object in `order`, 0
    for background; `order`, the objects by decreasing area). Larger objects are drawn first so a small object on
    top of a large one keeps its pixels."""
    order = np.argsort(-polygon_area(segments), kind="stable")
    height, width = shape[0] // downsample, shape[1] // downsample
    dtype = np.uint8 if len(segments) < 255 else np.int16  # an image holds at most 3000 objects
    index_mask = np.zeros((height, width), dtype)
    outlines = _fixed_point(segments, downsample)
    for slot, i in enumerate(order):
        cv2.fillPoly(index_mask, [outlines[i]], slot + 1, lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)
    return index_mask, order


def _fixed_point(segments: np.ndarray, downsample: int) -> np.ndarray:
    """Outlines in cv2.fillPoly's fixed-point pixel-index coordinates (pixel centres at integers)."""
    index_coords = segments[..., :2].astype(np.float64) / downsample - 0.5
    return np.round(index_coords * (1 << _SUBPIXEL_BITS)).astype(np.int32)


def mask_to_polygon(mask: np.ndarray) -> np.ndarray:
    """(h, w) mask -> (P, 2) float32 outline of its largest region in continuous pixels ((0, 2) when empty)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return np.zeros((0, 2), np.float32)
    largest = max(contours, key=len).reshape(-1, 2).astype(np.float32)
    return largest + 0.5  # contour points are pixel indices; their centres are at i + 0.5


# ---------------------------------------------------------------------------------------------------------------
# predicted masks
# ---------------------------------------------------------------------------------------------------------------


def crop_to_boxes(masks: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Zero every mask (..., h, w) outside its box (..., 4) xyxy in the masks' continuous pixels (a pixel is inside
    when its centre is). Float masks are cropped in place."""
    height, width = masks.shape[-2:]
    columns = torch.arange(width, device=masks.device, dtype=boxes.dtype) + 0.5  # pixel centres
    rows = torch.arange(height, device=masks.device, dtype=boxes.dtype) + 0.5
    inside_x = (columns >= boxes[..., 0:1]) & (columns < boxes[..., 2:3])  # (..., w)
    inside_y = (rows >= boxes[..., 1:2]) & (rows < boxes[..., 3:4])  # (..., h)
    if masks.is_floating_point():  # two separable products, no (..., h, w) temporary
        masks *= inside_x[..., None, :]
        masks *= inside_y[..., :, None]
        return masks
    return masks & inside_x[..., None, :] & inside_y[..., :, None]


def mask_logits(coefficients: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """(n, nm) coefficients x (nm, h, w) prototypes -> (n, h, w) mask logits."""
    return (coefficients @ protos.flatten(1)).view(-1, *protos.shape[1:])


def masks_in_image(coefficients, protos, boxes, input_hw, ratio_pad, image_hw) -> torch.Tensor:
    """Masks of detections at an image's own size: bool (n, image_h, image_w).

    coefficients (n, nm), protos (nm, h, w) over the network input of `input_hw` (letterboxed image), boxes (n, 4)
    xyxy in the original image's pixels, `ratio_pad` ((gain_h, gain_w), (pad_w, pad_h)) the letterbox that made the
    input. A pixel is in a mask when its logit is positive (sigmoid > 0.5) and its centre lies inside the box.
    """
    return masks_from_protos(coefficients, protos_in_image(protos, input_hw, ratio_pad, image_hw), boxes)


def protos_in_image(protos, input_hw, ratio_pad, image_hw) -> torch.Tensor:
    """(nm, h, w) prototypes over a letterboxed network input -> (nm, image_h, image_w) over the original image.
    They are a linear basis, so resizing them equals resizing each mask's logits, at nm instead of n resizes."""
    return input_to_image(protos[None].float(), input_hw, ratio_pad, image_hw)[0]


def masks_from_protos(coefficients, protos, boxes) -> torch.Tensor:
    """(n, H, W) bool masks from coefficients (n, nm), prototypes (nm, H, W) and boxes (n, 4) in their pixels."""
    masks = torch.zeros((len(coefficients), *protos.shape[1:]), dtype=torch.bool, device=protos.device)
    for start in range(0, len(coefficients), MASK_CHUNK):  # float logits of a few masks at a time
        part = slice(start, start + MASK_CHUNK)
        masks[part] = crop_to_boxes(mask_logits(coefficients[part].float(), protos) > 0, boxes[part].float())
    return masks


def mask_share_in_boxes(masks, boxes) -> torch.Tensor:
    """(m, n) float: the share of each mask's pixels (m, H, W) that lie inside each box (n, 4) xyxy in the masks'
    pixels (`crop_to_boxes`' rule: a pixel is inside when its centre is), from the masks' summed-area tables.

    A mask cropped to box j shares at most this many pixels with mask i, and their union holds all of mask i, so
    the share bounds their IoU from above: pairs below a threshold need no mask made. An empty mask shares 0.
    """
    height, width = masks.shape[-2:]
    counts = masks.new_zeros((len(masks), height + 1, width + 1), dtype=torch.int32)
    counts[:, 1:, 1:] = masks.to(torch.int32).cumsum(1).cumsum(2)
    boxes = boxes.float()
    # the first pixel whose centre is at or past each edge: [start, end) is the range inside the box
    columns = torch.arange(width, device=masks.device, dtype=boxes.dtype) + 0.5
    rows = torch.arange(height, device=masks.device, dtype=boxes.dtype) + 0.5
    x1, x2 = (torch.searchsorted(columns, boxes[:, k].contiguous()) for k in (0, 2))
    y1, y2 = (torch.searchsorted(rows, boxes[:, k].contiguous()) for k in (1, 3))
    x2, y2 = torch.maximum(x1, x2), torch.maximum(y1, y2)
    inside = counts[:, y2, x2] - counts[:, y1, x2] - counts[:, y2, x1] + counts[:, y1, x1]  # (m, n)
    area = counts[:, -1, -1:]  # (m, 1)
    return inside.float() / area.clamp(min=1).float()


def mask_iou_from_protos(masks, coefficients, protos, boxes) -> torch.Tensor:
    """IoU (m, n) of masks (m, H, W) with the masks `masks_from_protos` would make, without keeping those: each chunk
    of predicted masks is compared as soon as it is made."""
    flat = masks.flatten(1).float()  # (m, HW)
    area = flat.sum(1, keepdim=True)
    columns = []
    for start in range(0, len(coefficients), MASK_CHUNK):
        part = slice(start, start + MASK_CHUNK)
        logits = mask_logits(coefficients[part].float(), protos)
        predicted = crop_to_boxes((logits > 0).float(), boxes[part].float()).flatten(1)  # (c, HW) 0/1
        inter = flat @ predicted.T  # (m, c)
        columns.append(inter / (area + predicted.sum(1) - inter).clamp(min=1e-9))
    return torch.cat(columns, 1) if columns else masks.new_zeros((len(masks), 0), dtype=torch.float32)


def input_to_image(maps: torch.Tensor, input_hw, ratio_pad, image_hw) -> torch.Tensor:
    """(B, C, h, w) maps covering a letterboxed network input of `input_hw` -> (B, C, image_h, image_w) over the
    original image: the padding cut away, the rest resized bilinearly (continuous coordinates, pixel centres)."""
    (gain_h, gain_w), (pad_w, pad_h) = ratio_pad
    input_h, input_w = input_hw
    scale_h, scale_w = maps.shape[2] / input_h, maps.shape[3] / input_w  # map pixels per input pixel
    image_h, image_w = image_hw
    # The original image spans [pad, pad + size * gain) of the input; sample each image pixel centre there.
    ys = ((torch.arange(image_h, device=maps.device) + 0.5) * gain_h + pad_h) * scale_h
    xs = ((torch.arange(image_w, device=maps.device) + 0.5) * gain_w + pad_w) * scale_w
    grid_y = ys / maps.shape[2] * 2 - 1  # grid_sample's [-1, 1] spans the map's outer edges (align_corners=False)
    grid_x = xs / maps.shape[3] * 2 - 1
    grid = torch.stack(torch.meshgrid(grid_x, grid_y, indexing="xy"), -1)  # (H, W, 2) x, y
    return F.grid_sample(maps, grid[None].expand(len(maps), -1, -1, -1).to(maps.dtype), mode="bilinear",
                         padding_mode="border", align_corners=False)


def mask_iou(masks1: torch.Tensor, masks2: torch.Tensor, chunk: int = MASK_CHUNK) -> torch.Tensor:
    """IoU of every mask of (n, h, w) with every mask of (m, h, w) -> (n, m) float32, computed as one matrix
    product per `chunk` rows of masks1 (bounded memory on large images)."""
    flat2 = masks2.flatten(1).float()  # (m, hw)
    area2 = flat2.sum(1)
    rows = []
    for start in range(0, len(masks1), chunk):
        flat1 = masks1[start:start + chunk].flatten(1).float()
        inter = flat1 @ flat2.T
        rows.append(inter / (flat1.sum(1, keepdim=True) + area2 - inter).clamp(min=1e-9))
    return torch.cat(rows) if rows else masks1.new_zeros((0, len(masks2)), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# COCO run-length encoding
# ---------------------------------------------------------------------------------------------------------------


def mask_to_rle(mask: np.ndarray) -> dict:
    """(h, w) mask -> COCO's compressed run-length encoding {"size": [h, w], "counts": str} (column-major runs,
    starting with a run of zeros)."""
    flat = np.asarray(mask, bool).ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds)
    if flat.size and flat[0]:  # the first run counts zeros
        runs = np.concatenate([[0], runs])
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": _rle_string(runs.tolist())}


def _rle_string(runs: list) -> str:
    """COCO's text form of run lengths: each run (from the third on, minus the run two before) as 5-bit groups with a
    continuation bit, offset into printable characters from '0'."""
    chars = []
    for i, run in enumerate(runs):
        value = run - runs[i - 2] if i > 2 else run
        more = True
        while more:
            group = value & 0x1F
            value >>= 5
            more = not ((value == 0 and not group & 0x10) or (value == -1 and group & 0x10))
            chars.append(chr(group + (0x20 if more else 0) + 48))
    return "".join(chars)
