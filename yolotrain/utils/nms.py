"""Non-maximum suppression for the detection head's eval output.

torchvision is optional: when it imports, its compiled `nms` kernel is used; otherwise an exact, vectorised
pure-torch greedy kernel (`greedy_nms`) gives the same result.
"""

import functools

import torch

from yolotrain.utils.boxes import box_iou, xywh2xyxy

# Boxes are suppressed in blocks of this many so the IoU matrix stays O(block * n) in memory.
NMS_BLOCK_SIZE = 1024


@functools.lru_cache(maxsize=1)
def torchvision_nms():
    """Return `torchvision.ops.nms` if torchvision imports, else None (looked up once, then cached)."""
    try:
        from torchvision.ops import nms
    except Exception:  # ImportError, or a torchvision built against another torch
        return None
    return nms


def _suppress_within_block(iou_over):
    """Exact greedy keep-mask for boxes already sorted by descending score.

    `iou_over` (n, n) bool: IoU above the threshold. Greedy NMS keeps box i iff no *kept* box j < i overlaps it.
    We solve that recurrence by fixpoint iteration on the strictly upper-triangular suppression matrix: starting
    from "all kept", recompute keep = not(any kept earlier box overlaps). After k rounds the first k boxes are
    final (box 0 is always kept, box i only depends on boxes before it), so the iteration reaches the unique
    fixpoint, which is exactly the greedy answer. Each round is one matrix-vector product, and the number of
    rounds is the longest chain of "suppressor of a suppressor" (a handful in practice), not the number of boxes.
    """
    suppresses = torch.triu(iou_over, diagonal=1).to(torch.float32)  # (n, n): row j can suppress column i > j
    keep = torch.ones(iou_over.shape[0], dtype=torch.bool, device=iou_over.device)
    while True:
        suppressed = (keep.to(torch.float32) @ suppresses) > 0
        new_keep = ~suppressed
        if torch.equal(new_keep, keep):
            return keep
        keep = new_keep


def greedy_nms(boxes, scores, iou_thres, groups=None, max_keep=None):
    """Exact greedy NMS in pure torch; returns kept indices sorted by descending score.

    boxes (n, 4) xyxy, scores (n,), groups (n,) optional int ids: boxes only suppress boxes of the same group
    (class-aware NMS without coordinate offsets, so IoUs keep full float precision).
    Boxes are handled in blocks of NMS_BLOCK_SIZE in score order: a block is first pruned by the boxes kept from
    earlier blocks (any overlap above the threshold suppresses), then resolved internally by
    `_suppress_within_block`. Both steps are exact, so the result equals box-by-box greedy NMS.
    `max_keep`: only the first `max_keep` kept boxes are wanted (max_det), so blocks after the one that reaches
    that count are never looked at; the answer is the same prefix a full run would give.
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    boxes = boxes[order]
    groups = groups[order] if groups is not None else None
    kept_positions, num_kept = [], 0
    for start in range(0, boxes.shape[0], NMS_BLOCK_SIZE):
        if max_keep is not None and num_kept >= max_keep:
            break
        block = torch.arange(start, min(start + NMS_BLOCK_SIZE, boxes.shape[0]), device=boxes.device)
        if kept_positions:
            block = _prune_by_kept(boxes, groups, block, torch.cat(kept_positions), iou_thres)
        if block.numel():
            iou_over = _overlaps(boxes, groups, block, block, iou_thres)
            kept_positions.append(block[_suppress_within_block(iou_over)])
            num_kept += len(kept_positions[-1])
    if not kept_positions:
        return order[:0]
    return order[torch.cat(kept_positions)][:max_keep]


def _overlaps(boxes, groups, rows, cols, iou_thres):
    """(len(rows), len(cols)) bool: IoU above the threshold and, when grouped, the same group."""
    over = box_iou(boxes[rows], boxes[cols]) > iou_thres
    if groups is not None:
        over &= groups[rows, None] == groups[None, cols]
    return over


def _prune_by_kept(boxes, groups, block, kept, iou_thres):
    """Drop the block's boxes that overlap any box already kept from an earlier (higher-score) block."""
    return block[~_overlaps(boxes, groups, kept, block, iou_thres).any(0)]


def _nms_indices(boxes, scores, classes, iou_thres, agnostic, max_keep):
    """Kept indices (descending score, at most `max_keep`) of class-aware or agnostic NMS, via torchvision when
    available."""
    tv_nms = torchvision_nms()
    if tv_nms is None:
        return greedy_nms(boxes, scores, iou_thres, groups=None if agnostic else classes, max_keep=max_keep)
    if not agnostic and boxes.numel():
        # Offset each class into its own disjoint coordinate range so one NMS call never mixes classes.
        span = (boxes.max() - boxes.min()).clamp(min=0) + 1
        boxes = boxes + (classes.to(boxes.dtype) * span)[:, None]
    return tv_nms(boxes, scores, iou_thres)[:max_keep]


def _candidates(prediction, conf_thres, classes, multi_label):
    """Every (anchor, class) pair that enters NMS, for the whole batch at once.

    prediction (B, 4 + nc, A) -> image (n,), boxes (n, 4) xyxy, scores (n,), cls (n,), ordered by image.
    Single-label: each anchor keeps its best class. Multi-label: each anchor is a candidate once for every class
    scoring above `conf_thres`, which is what mAP needs: a box whose second class is the right one still counts.
    """
    prediction = prediction.transpose(1, 2)  # (B, A, 4 + nc)
    boxes = xywh2xyxy(prediction[..., :4])  # (B, A, 4)
    scores = prediction[..., 4:]  # (B, A, nc)
    if classes is not None:
        wanted = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        wanted[torch.as_tensor(classes, device=scores.device).reshape(-1).long()] = True
        scores = scores.masked_fill(~wanted, 0.0)  # (B, A, nc) unwanted classes never pass conf (> 0)
    if multi_label:
        image, anchor, cls = (scores > conf_thres).nonzero(as_tuple=True)  # (n,) each, image-major order
        conf = scores[image, anchor, cls]
    else:
        best_conf, best_cls = scores.max(-1)  # (B, A)
        image, anchor = (best_conf > conf_thres).nonzero(as_tuple=True)
        conf, cls = best_conf[image, anchor], best_cls[image, anchor]
    return image, boxes[image, anchor], conf, cls


def non_max_suppression(
    prediction,
    conf_thres=0.25,
    iou_thres=0.45,
    classes=None,
    agnostic=False,
    multi_label=False,
    max_det=300,
    max_nms=30000,
):
    """Filter the model's eval output to final detections per image.

    prediction: (B, 4 + nc, A) tensor with boxes xywh in input pixels and class scores (the model's eval output;
    a tuple/list `(y, feats)` is accepted and its first element used).
    Candidates are anchors whose best class scores above `conf_thres` (single-label), or every (anchor, class)
    pair above it (`multi_label`, what validation uses); classes not in `classes` never qualify. At most `max_nms`
    highest-scoring candidates per image enter NMS (a deterministic cap) and at most `max_det` survive.
    Returns a list of B tensors (n, 6): x1, y1, x2, y2, conf, cls (float), sorted by descending conf. Every image
    is processed, however long it takes: results never depend on how busy the machine is.
    """
    if isinstance(prediction, (list, tuple)):
        prediction = prediction[0]
    batch_size = prediction.shape[0]
    image, boxes, conf, cls = _candidates(prediction, conf_thres, classes, multi_label)
    per_image = torch.bincount(image, minlength=batch_size).tolist()  # the one host sync of the call
    output = []
    # Per image, as torchvision's batched NMS does; inside, everything is vectorised over the candidates.
    for image_boxes, image_conf, image_cls in zip(*(t.split(per_image) for t in (boxes, conf, cls))):
        output.append(_nms_one_image(image_boxes, image_conf, image_cls, iou_thres, agnostic, max_det, max_nms))
    return output


def _nms_one_image(boxes, conf, cls, iou_thres, agnostic, max_det, max_nms):
    """NMS over one image's candidates -> (n, 6) x1, y1, x2, y2, conf, cls sorted by descending conf."""
    if conf.numel() > max_nms:
        top = conf.topk(max_nms).indices
        boxes, conf, cls = boxes[top], conf[top], cls[top]
    keep = _nms_indices(boxes, conf, cls, iou_thres, agnostic, max_det)
    return torch.cat([boxes[keep], conf[keep, None], cls[keep, None].to(boxes.dtype)], 1)


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
