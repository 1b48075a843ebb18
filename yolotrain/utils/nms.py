"""Non-maximum suppression for the detection and OBB heads' eval output, for every image of a batch at once.

torchvision is optional: when it imports, its compiled `nms` kernel runs once over the whole batch (images and
classes kept apart by coordinate offsets); otherwise an exact, vectorised pure-torch greedy kernel
(`batched_greedy_nms`) gives the same result. Neither loops over images or boxes in Python. Rotated boxes always
take the pure-torch kernel, with the probabilistic IoU in place of the axis-aligned one
(`non_max_suppression_rotated`).
"""

import functools
import math

import torch

from yolotrain.utils.boxes import batched_box_iou, xywh2xyxy
from yolotrain.utils.obb import probiou_above
from yolotrain.utils.torch_utils import any_along

# Boxes are suppressed in blocks of at most this many per image (in score order)...
NMS_BLOCK_SIZE = 1024
# ...and a block of the whole batch holds at most this many box pairs: on a CPU the (B, S, S) IoU temporaries then
# stay in cache (3-4x faster than 8M pairs on 16 images), on a GPU larger blocks mean fewer launches and syncs.
NMS_BLOCK_PAIRS = {"cpu": 1 << 19, "other": 1 << 23}


@functools.lru_cache(maxsize=1)
def torchvision_nms():
    """Return `torchvision.ops.nms` if torchvision imports, else None (looked up once, then cached)."""
    try:
        from torchvision.ops import nms
    except Exception:  # ImportError, or a torchvision built against another torch
        return None
    return nms


def _suppress_within_block(iou_over):
    """Exact greedy keep-mask (B, S) for each image's boxes already sorted by descending score.

    `iou_over` (B, S, S) bool: IoU above the threshold (rows that may not suppress are all False). Greedy NMS keeps
    box i iff no *kept* box j < i overlaps it. We solve that recurrence by fixpoint iteration on the strictly
    upper-triangular suppression matrix: starting from "all kept", recompute keep = not(any kept earlier box
    overlaps). After k rounds the first k boxes are final (box 0 is always kept, box i only depends on boxes before
    it), so the iteration reaches the unique fixpoint, which is exactly the greedy answer. Each round is one batched
    matrix-vector product, and the number of rounds is the longest chain of "suppressor of a suppressor" (a handful
    in practice), not the number of boxes.
    """
    suppresses = torch.triu(iou_over, diagonal=1).to(torch.float32)  # (B, S, S): row j can suppress column i > j
    keep = torch.ones(iou_over.shape[:2], dtype=torch.bool, device=iou_over.device)  # (B, S)
    while True:
        suppressed = (keep.to(torch.float32).unsqueeze(1) @ suppresses).squeeze(1) > 0  # (B, S)
        new_keep = ~suppressed
        if torch.equal(new_keep, keep):
            return keep
        keep = new_keep


def box_iou_above(boxes1, boxes2, iou_thres, wanted):
    """(B, N, M) bool: axis-aligned IoU of (B, N, 4) and (B, M, 4) xyxy boxes above `iou_thres`, for the pairs
    `wanted` (B, N, M) bool marks."""
    return (batched_box_iou(boxes1, boxes2) > iou_thres) & wanted


def batched_greedy_nms(boxes, valid, iou_thres, groups=None, max_keep=None, iou_fn=box_iou_above):
    """Exact greedy NMS of every image at once: keep mask (B, K) bool.

    boxes (B, K, D), each image's candidates sorted by descending score: xyxy (D = 4) for the default `iou_fn`,
    or whatever boxes `iou_fn` takes ((B, N, D) x (B, M, D), threshold, the wanted pairs (B, N, M) bool ->
    (B, N, M) bool, IoU above the threshold for the wanted pairs; e.g. `utils.obb.probiou_above` for xywhr, D = 5);
    valid (B, K) bool marks real candidates (the rest is padding); groups (B, K) optional int ids: boxes only suppress
    boxes of the same group (class-aware NMS without coordinate offsets, so IoUs keep full float precision).
    Boxes are handled in blocks in score order: a block is first pruned by the boxes each image kept from earlier
    blocks (any overlap above the threshold suppresses), then resolved internally by `_suppress_within_block`. Both
    steps are exact, so the result equals box-by-box greedy NMS of each image. `max_keep`: only the first `max_keep`
    kept boxes of each image are wanted (max_det): later ones are not marked, and an image that has them takes no
    part in the blocks after; the loop ends when every image has them or has run out of candidates.
    """
    batch_size, num_boxes = valid.shape
    max_keep = num_boxes if max_keep is None else min(max_keep, num_boxes)
    block_pairs = NMS_BLOCK_PAIRS["cpu" if boxes.device.type == "cpu" else "other"]
    block_size = max(1, min(NMS_BLOCK_SIZE, math.isqrt(block_pairs // max(batch_size, 1))))
    groups = torch.zeros_like(valid, dtype=torch.long) if groups is None else groups.long()
    keep = torch.zeros_like(valid)
    # The boxes each image has kept so far, in slots 0..max_keep-1: what prunes the next block.
    kept_boxes = boxes.new_zeros(batch_size, max_keep, boxes.shape[-1])
    kept_groups = torch.full((batch_size, max_keep), -1, dtype=torch.long, device=boxes.device)  # -1: empty slot
    num_kept = torch.zeros(batch_size, dtype=torch.long)  # on the host: it decides which images go on
    for start in range(0, num_boxes, block_size):
        active_host = (num_kept < max_keep).nonzero().squeeze(1)  # images still short of max_keep
        if not len(active_host):
            break
        filled = int(num_kept[active_host].max())  # prune by the filled slots only
        active, active_kept = active_host.to(boxes.device), num_kept[active_host].to(boxes.device)
        block = slice(start, min(start + block_size, num_boxes))
        block_boxes, block_groups, candidates = boxes[active, block], groups[active, block], valid[active, block]
        if filled:
            overlapped = _overlaps(kept_boxes[active, :filled], kept_groups[active, :filled], block_boxes,
                                   block_groups, iou_thres, iou_fn)  # (b, filled, S)
            candidates = candidates & ~any_along(overlapped, 1)
        block_keep = _resolve_block(block_boxes, block_groups, candidates, iou_thres, iou_fn)  # (b, S)
        slot = active_kept[:, None] + block_keep.cumsum(1) - 1  # (b, S): where each kept box goes
        block_keep &= slot < max_keep
        keep[active, block] = block_keep
        row, position = block_keep.nonzero(as_tuple=True)
        kept_boxes[active[row], slot[row, position]] = block_boxes[row, position]
        kept_groups[active[row], slot[row, position]] = block_groups[row, position]
        num_kept[active_host] += block_keep.sum(1).cpu()  # the block's host sync
    return keep


def _resolve_block(boxes, groups, candidates, iou_thres, iou_fn):
    """Greedy keep mask (B, S) of a block's candidates among themselves. Most of a block is usually pruned by the
    boxes kept before it, so the survivors are first packed to the front of each row (in score order) and only
    their (B, W, W) overlaps are computed."""
    packing = torch.sort((~candidates).to(torch.uint8), dim=1, stable=True).indices  # survivors first, in order
    width = int(candidates.sum(1).max())  # a host sync: the most survivors in one image
    if width == 0:
        return candidates
    packed = packing[:, :width]  # (B, W) block positions of the packed survivors
    packed_boxes = boxes.gather(1, packed[..., None].expand(-1, -1, boxes.shape[-1]))
    packed_groups, packed_candidates = groups.gather(1, packed), candidates.gather(1, packed)
    over = _overlaps(packed_boxes, packed_groups, packed_boxes, packed_groups, iou_thres, iou_fn)
    over &= packed_candidates[:, :, None]  # (B, W, W): only survivors suppress
    keep = torch.zeros_like(candidates)
    keep.scatter_(1, packed, _suppress_within_block(over) & packed_candidates)
    return keep


def _overlaps(rows, row_groups, cols, col_groups, iou_thres, iou_fn):
    """(B, N, M) bool: `iou_fn` IoU above the threshold between (B, N, D) and (B, M, D) boxes of the same group."""
    return iou_fn(rows, cols, iou_thres, row_groups[:, :, None] == col_groups[:, None, :])


def greedy_nms(boxes, scores, iou_thres, groups=None, max_keep=None):
    """Exact greedy NMS of one image's boxes (n, 4) xyxy with scores (n,): kept indices by descending score."""
    order = torch.sort(scores, descending=True, stable=True).indices
    valid = torch.ones(1, len(order), dtype=torch.bool, device=boxes.device)
    ordered_groups = groups[order][None] if groups is not None else None
    keep = batched_greedy_nms(boxes[order][None], valid, iou_thres, ordered_groups, max_keep)[0]
    return order[keep]


def _candidates(prediction, conf_thres, classes, multi_label, max_nms, num_extra=0):
    """The candidates that enter NMS, up to `max_nms` per image, laid out per image in descending score.

    prediction (B, 4 + nc + num_extra, A) -> boxes (B, K, 4) xywh as given, scores (B, K),
    cls (B, K) long, valid (B, K) bool (the rest is padding), extra (B, K, num_extra) each candidate's anchor's extra
    values, K the most candidates of any image. Single-label: each anchor is a candidate with its best class.
    Multi-label: each anchor is a candidate once for every class scoring above `conf_thres`, which is what mAP
    needs: a box whose second class is the right one still counts. Equal scores keep anchor, then class, order.
    """
    prediction = prediction.transpose(1, 2)  # (B, A, 4 + nc + num_extra)
    scores = prediction[..., 4 : prediction.shape[-1] - num_extra]  # (B, A, nc)
    num_classes = scores.shape[-1]
    if classes is not None:
        wanted = torch.zeros(num_classes, dtype=torch.bool, device=scores.device)
        wanted[torch.as_tensor(classes, device=scores.device).reshape(-1).long()] = True
        scores = scores.masked_fill(~wanted, 0.0)  # (B, A, nc) unwanted classes never pass conf (> 0)
    if multi_label:
        pair_scores, classes_per_pair = scores.flatten(1), num_classes  # (B, A * nc): pair = anchor * nc + class
    else:
        pair_scores, best_cls = scores.max(-1)  # (B, A)
        classes_per_pair = 1
    passing = pair_scores > conf_thres
    width = min(int(passing.sum(1).max()) if passing.numel() else 0, max_nms)  # a host sync: the padded width
    top = _descending_top(pair_scores, passing, width)  # (B, K)
    top_scores = pair_scores.gather(1, top)
    anchor = top // classes_per_pair
    cls = top % classes_per_pair if multi_label else best_cls.gather(1, anchor)
    boxes = prediction[..., :4].gather(1, anchor[..., None].expand(-1, -1, 4))  # (B, K, 4) xywh
    extra = prediction[..., prediction.shape[-1] - num_extra :].gather(1, anchor[..., None].expand(-1, -1, num_extra))
    return boxes, top_scores, cls, top_scores > conf_thres, extra


def _descending_top(scores, passing, width):
    """(B, width) positions of each row's best `passing` scores (B, P), by descending score, equal scores in position
    order (the rest, if a row has fewer, after them; which of several equal scores at the cut enter is not said).

    A top-k in any order, then one sort of int64 keys instead of two sorts (1.7-2.9x faster at 16 x 6,000-670,000
    candidates): a key is the score's float32 bit pattern (scores are compared as float32), mapped to an integer
    that orders as the scores do (negative ones too), above the reversed position, so keys are unique and ties fall
    in position order."""
    masked = scores.float().masked_fill(~passing, float("-inf"))
    best = masked.topk(width, dim=1, sorted=False).indices  # (B, width)
    bits = masked.gather(1, best).view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: their magnitude bits reversed
    keys = (ordered.long() << 32) | (scores.shape[1] - 1 - best)
    return best.gather(1, keys.sort(dim=1, descending=True).indices)


def _kept_torchvision(tv_nms, boxes, scores, cls, valid, num_classes, iou_thres, agnostic, max_det):
    """Keep mask (B, K) from one torchvision NMS call over the batch: each (image, class) moved into its own
    coordinate range, so no box suppresses a box of another image or class; then each image's first max_det."""
    batch_size, width = valid.shape
    image = torch.arange(batch_size, device=boxes.device)[:, None].expand(-1, width)
    group = (image if agnostic else image * num_classes + cls)[valid]
    # float64: a batch's offsets reach millions of pixels, where float32 would round coordinates to 1/8 px or worse.
    flat_boxes = boxes[valid].double()
    span = (flat_boxes.max() - flat_boxes.min()).clamp(min=0) + 1 if len(flat_boxes) else 1
    kept = torch.zeros(len(flat_boxes), dtype=torch.bool, device=boxes.device)
    kept[tv_nms(flat_boxes + (group.double() * span)[:, None], scores[valid].double(), iou_thres)] = True
    keep = torch.zeros_like(valid)
    keep[valid] = kept
    return keep & (keep.cumsum(1) <= max_det)  # each image's candidates are in descending score


def non_max_suppression(
    prediction,
    conf_thres=0.25,
    iou_thres=0.45,
    classes=None,
    agnostic=False,
    multi_label=False,
    max_det=300,
    max_nms=30000,
    num_extra=0,
):
    """Filter the model's eval output to final detections per image.

    prediction: (B, 4 + nc + num_extra, A) tensor with boxes xywh in input pixels, class scores and `num_extra`
    values per anchor that follow its boxes (a pose model's keypoints) (the model's eval output; a tuple/list
    `(y, feats)` is accepted and its first element used).
    Candidates are anchors whose best class scores above `conf_thres` (single-label), or every (anchor, class)
    pair above it (`multi_label`, what validation uses); classes not in `classes` never qualify. At most `max_nms`
    highest-scoring candidates per image enter NMS (a deterministic cap; which of several equal scores at the cap
    enter is not specified) and at most `max_det` survive.
    Returns a list of B tensors (n, 6 + num_extra): x1, y1, x2, y2, conf, cls (float), then the extra values,
    sorted by descending conf. Every image
    is processed, however long it takes: results never depend on how busy the machine is.
    """
    if isinstance(prediction, (list, tuple)):
        prediction = prediction[0]
    boxes, scores, cls, valid, extra = _candidates(prediction, conf_thres, classes, multi_label, max_nms, num_extra)
    boxes = xywh2xyxy(boxes)  # (B, K, 4): axis-aligned boxes are suppressed and returned as corners
    tv_nms = torchvision_nms()
    if tv_nms is None:
        keep = batched_greedy_nms(boxes, valid, iou_thres, None if agnostic else cls, max_det)
    else:
        num_classes = prediction.shape[1] - 4 - num_extra
        keep = _kept_torchvision(tv_nms, boxes, scores, cls, valid, num_classes, iou_thres, agnostic, max_det)
    detections = torch.cat([boxes, scores[..., None], cls[..., None].to(boxes.dtype), extra], -1)[keep]  # (n, 6+)
    return list(detections.split(keep.sum(1).tolist()))


def non_max_suppression_rotated(prediction, conf_thres=0.25, iou_thres=0.45, classes=None, agnostic=False,
                                multi_label=False, max_det=300, max_nms=30000):
    """Filter the OBB model's eval output to final rotated detections per image.

    prediction: (B, 4 + nc + 1, A) tensor with boxes cx, cy, w, h in input pixels, class scores, then the angle in
    radians (the OBB head's eval output; a tuple/list `(y, feats)` is accepted and its first element used).
    Candidates, `classes`, `multi_label`, `max_nms` and `max_det` work as in `non_max_suppression`.
    Overlap is the probabilistic IoU (`utils.obb.probiou`), not the exact polygon IoU: it is the overlap the
    reference models' NMS uses, so their `iou_thres` means the same here, and it costs a few element-wise operations
    per pair instead of a polygon intersection. The suppression is exact greedy NMS (a box is only suppressed by a
    *kept* box), like the axis-aligned path; the reference's rotated NMS is Fast-NMS (a suppressed box still
    suppresses), which drops a few more boxes where overlaps chain, so the two can differ there.
    Returns a list of B tensors (n, 7): cx, cy, w, h, conf, cls (float), angle, sorted by descending conf; boxes
    and angles as predicted (see `utils.obb.regularize_xywhr` for the reference's angle range [0, pi/2)).
    """
    if isinstance(prediction, (list, tuple)):
        prediction = prediction[0]
    boxes, scores, cls, valid, angle = _candidates(prediction, conf_thres, classes, multi_label, max_nms, num_extra=1)
    rotated = torch.cat([boxes, angle], -1)  # (B, K, 5) xywhr
    keep = batched_greedy_nms(rotated, valid, iou_thres, None if agnostic else cls, max_det, iou_fn=probiou_above)
    detections = torch.cat([boxes, scores[..., None], cls[..., None].to(boxes.dtype), angle], -1)[keep]  # (n, 7)
    return list(detections.split(keep.sum(1).tolist()))


def end_to_end_detections(prediction, conf_thres=0.25, classes=None, max_det=300):
    """Final detections from an end-to-end head, which needs no NMS.

    prediction: (B, K, 6) x1, y1, x2, y2, score, class per image, descending by score (`Detect` with end2end; a
    tuple/list `(y, preds)` is accepted and its first element used). Keeps the first `max_det` rows of each image
    whose score is above `conf_thres` and whose class is in `classes` (all when None).
    Returns a list of B tensors (n, 6), like `non_max_suppression`.
    """
    if isinstance(prediction, (list, tuple)):
        prediction = prediction[0]
    prediction = prediction[:, :max_det]
    keep = prediction[..., 4] > conf_thres  # (B, K)
    if classes is not None:
        wanted = torch.as_tensor(classes, device=prediction.device, dtype=prediction.dtype)
        keep &= (prediction[..., 5:6] == wanted).any(-1)
    counts = keep.sum(1).tolist()  # the one host sync: how to split the kept rows per image
    return list(prediction[keep].split(counts))


def is_end_to_end(model):
    """True when `model`'s eval output is already final detections (an end2end head or such an export)."""
    return bool(getattr(getattr(model, "module", model), "end2end", False))


def set_max_det(model, max_det):
    """Make an end-to-end model keep `max_det` boxes per image (an export keeps what it was exported with)."""
    head = getattr(getattr(model, "module", model), "head", None)
    if head is not None and hasattr(head, "max_det"):
        head.max_det = int(max_det)
