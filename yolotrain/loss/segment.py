"""Segmentation loss: the detection loss plus, for every foreground anchor, the mask of its object.

An anchor's mask is its nm coefficients times the nm prototype maps (logits at 1/4 of the input size). Its loss is
the per-pixel BCE against its object's mask, counted only inside the object's box and averaged over the box's pixels
(the mean over the map divided by the box's share of the image), so a small object weighs as much as a large one;
then averaged over the foreground anchors of the batch. The gain is the box gain, as in the reference method.
Shapes: B images, A anchors, F foreground anchors of the image that has most (others padded), nm coefficients,
(h, w) the prototype size.
"""

import torch
from torch.nn import functional as F

from yolotrain.loss.assigner import TaskAlignedAssigner
from yolotrain.loss.detection import DetectionLoss, EndToEndDetectionLoss, most_boxes_per_image, padded_per_image
from yolotrain.utils.masks import crop_to_boxes


def segment_loss_item_names(semantic=False):
    """The loss items of a segmentation model, in results.csv order: four, and a fifth for a head with a semantic
    branch (YOLO26)."""
    return ("box_loss", "seg_loss", "cls_loss", "dfl_loss", *(("sem_loss",) if semantic else ()))


class SegmentationLoss(DetectionLoss):
    """Loss of a `SegmentationModel`: (box, seg, cls, dfl) after gains. The batch's `masks` are index masks
    (B, h, w) with `model.args.overlap_mask` (the default; pixel value = 1 + the object's place in its image),
    else object masks (N, h, w)."""

    def __init__(self, model, tal_topk=10, final_topk=None, min_box_side=0.0):
        super().__init__(model, tal_topk, final_topk, min_box_side)
        self.overlap = bool(getattr(getattr(model, "args", None), "overlap_mask", True))

    def __call__(self, preds, batch):
        """preds: the head's training output `(maps, coefficients, protos[, semantic])` or its eval output
        `(y, that tuple)`; `semantic` (B, nc, h', w') are the class logits of a head's semantic branch (YOLO26)."""
        if isinstance(preds[0], torch.Tensor):
            preds = preds[1]
        maps, coefficients, protos, *semantic = preds
        with torch.autocast(device_type=maps[0].device.type, enabled=False):
            maps = list(maps)
            assigned = self.assign(maps, batch, **self.assigner_inputs(maps, coefficients, protos, batch))
            box, cls, dfl = self.detection_terms(assigned)
            seg = self.mask_term(assigned, coefficients.float(), protos.float(), batch)
            terms = [box, seg * self.box_gain, cls, dfl]
            if semantic:
                terms.append(self.semantic_term(semantic[0].float(), batch) * self.box_gain)
            loss = torch.stack(terms)
        return loss.sum() * assigned.batch_size, loss.detach()

    def assigner_inputs(self, maps, coefficients, protos, batch):
        """What the assigner needs besides boxes: nothing here (see `MaskAlignedSegmentationLoss`)."""
        return {}

    def mask_term(self, a, coefficients, protos, batch):
        """The mean box-normalised mask BCE of the foreground anchors. coefficients (B, nm, A), protos (B, nm, h, w).

        The masks are made for foreground anchors only (all anchors would need A masks per image): each image's
        foreground anchors are gathered into F slots, F read once from the device."""
        batch_size, nm, height, width = protos.shape
        fg_counts = a.fg_mask.sum(1)  # (B,)
        slots = int(fg_counts.max()) if fg_counts.numel() else 0
        if slots == 0:  # no object in the batch: a zero that still reaches the mask branch's parameters
            return (protos * 0).sum() + (coefficients * 0).sum()
        is_fg, anchor = a.fg_mask.float().topk(slots, dim=1)  # (B, F): foreground anchors first
        coefficients = coefficients.transpose(1, 2).gather(1, anchor[..., None].expand(-1, -1, nm))  # (B, F, nm)
        logits = torch.bmm(coefficients, protos.view(batch_size, nm, -1)).view(batch_size, slots, height, width)
        target = self._target_masks(batch, a.target_gt_idx.gather(1, anchor), (height, width), batch_size)

        boxes = a.target_bboxes.gather(1, anchor[..., None].expand(-1, -1, 4))  # (B, F, 4) input pixels
        image_h, image_w = a.image_hw
        to_mask = boxes.new_tensor([width / image_w, height / image_h] * 2)
        box_share = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]) / (image_h * image_w))
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")  # (B, F, h, w)
        per_anchor = crop_to_boxes(bce, boxes * to_mask).mean((-2, -1)) / box_share.clamp(min=1e-9)  # (B, F)
        return (per_anchor * is_fg).sum() / fg_counts.sum()

    def semantic_term(self, logits, batch):
        """BCE plus Dice (half each) of the semantic branch's class logits (B, nc, h, w) against the class of each
        labelled pixel (one-hot; pixels of no object are background for every class)."""
        target = self._class_maps(batch, logits.shape[0]).to(logits.device)
        target = F.interpolate(target, logits.shape[-2:], mode="nearest")
        bce = F.binary_cross_entropy_with_logits(logits, target)
        probabilities = logits.sigmoid()
        overlap = (probabilities * target).sum((2, 3))
        dice = 1 - (2 * overlap + 1) / (probabilities.sum((2, 3)) + target.sum((2, 3)) + 1)  # (B, nc)
        return 0.5 * bce + 0.5 * dice.mean()

    def _class_maps(self, batch, batch_size):
        """(B, nc, h, w) one-hot class of each labelled pixel at the masks' resolution."""
        masks = batch["masks"]
        classes = batch["cls"].to(masks.device).long().view(-1)
        batch_idx = batch["batch_idx"].to(masks.device).long().view(-1)
        maps = torch.zeros((batch_size, self.num_classes, *masks.shape[-2:]), device=masks.device)
        if self.overlap:  # pixel value k: the image's object k - 1
            counts = torch.bincount(batch_idx, minlength=batch_size)
            slots = max(most_boxes_per_image(batch, counts), 1)
            per_image = padded_per_image(classes, batch_idx, counts, slots)  # (B, M)
            index = masks.long().flatten(1)  # (B, h * w)
            pixel_class = per_image.gather(1, (index - 1).clamp(min=0))  # (B, h * w)
            maps.view(batch_size, self.num_classes, -1).scatter_(1, pixel_class[:, None], (index > 0)[:, None].float())
            return maps
        maps.index_put_((batch_idx, classes), masks.float(), accumulate=True)
        return maps.clamp_(max=1.0)

    def _target_masks(self, batch, gt_index, size, batch_size):
        """(B, F, h, w) float masks of the objects `gt_index` (B, F) names (their slots in their images)."""
        masks = self._masks_at(batch, size).to(gt_index.device)
        if self.overlap:
            return (masks[:, None] == (gt_index + 1)[..., None, None]).float()
        batch_idx = batch["batch_idx"].to(gt_index.device).long().view(-1)
        counts = torch.bincount(batch_idx, minlength=batch_size)
        per_image = padded_per_image(masks, batch_idx, counts, max(most_boxes_per_image(batch, counts), 1))
        index = gt_index[..., None, None].expand(-1, -1, *size)
        return per_image.gather(1, index).float()

    def _masks_at(self, batch, size):
        """The batch's masks (index masks (B, h', w') or object masks (N, h', w')) at the prototypes' `size`."""
        masks = batch["masks"].to(self.device)
        if masks.shape[-2:] != size:  # mask_ratio other than the prototypes' 4
            masks = F.interpolate(masks[None].float(), size, mode="nearest")[0]
        return masks

    def padded_masks(self, batch, batch_size, size):
        """(B, M, h, w) bool: each image's object masks at `size`, in the slots of `build_targets`."""
        masks = self._masks_at(batch, size)
        batch_idx = batch["batch_idx"].to(self.device).long().view(-1)
        counts = torch.bincount(batch_idx, minlength=batch_size)
        slots = most_boxes_per_image(batch, counts)
        if self.overlap:  # pixel value k: the image's object k - 1
            return masks[:, None] == torch.arange(1, slots + 1, device=self.device)[:, None, None]
        return padded_per_image(masks, batch_idx, counts, slots) > 0.5


class MaskTaskAlignedAssigner(TaskAlignedAssigner):
    """Task-aligned assignment whose overlap is the mean of the box overlap (Complete IoU) and the IoU of the
    candidate's predicted mask with the object's, so positives and soft class targets favour anchors whose masks are
    right (YOLO26's segmentation). Only each object's `MASK_CANDIDATES` * topk best box-aligned candidates get their
    mask made (binarised at logit 0 and cropped to the predicted box, as validation does); the rest count mask IoU 0.

    Task inputs: coefficients (B, A, nm), protos (B, nm, h, w), gt_masks (B, M, h, w) bool, mask_scale (mask pixels
    per input pixel); `class_scores` comes from the alignment itself.
    """

    MASK_CANDIDATES = 3
    CHUNK_PIXELS = 1 << 25  # mask pixels made at once (about 128 MB of float32)

    def candidate_overlaps(self, gt_bboxes, pred_bboxes, candidates, class_scores, coefficients, protos, gt_masks,
                           mask_scale, **task_inputs):
        box = super().candidate_overlaps(gt_bboxes, pred_bboxes, candidates)  # (B, M, A)
        box_metric = torch.where(candidates, class_scores.pow(self.alpha) * box.pow(self.beta) + self.eps, 0.0)
        best = box_metric.topk(min(self.MASK_CANDIDATES * self.topk, box.shape[-1]), dim=-1).indices
        chosen = torch.zeros_like(candidates).scatter_(-1, best, True) & candidates
        image, gt, anchor = chosen.nonzero(as_tuple=True)
        mask_iou = torch.zeros_like(box)
        mask_iou[image, gt, anchor] = self._mask_ious(image, gt, anchor, pred_bboxes * mask_scale, coefficients,
                                                      protos, gt_masks)
        return (box + mask_iou) / 2

    def _mask_ious(self, image, gt, anchor, boxes, coefficients, protos, gt_masks):
        """(P,) mask IoU of each chosen (image, gt, anchor) pair. Each chosen anchor's mask is made once, in per-image
        slots (padded to the image with most), a chunk of images at a time."""
        batch_size, num_anchors = boxes.shape[:2]
        height, width = protos.shape[-2:]
        key, pair_key = torch.unique(image * num_anchors + anchor, return_inverse=True)
        key_image, key_anchor = key // num_anchors, key % num_anchors
        per_image = torch.bincount(key_image, minlength=batch_size)
        slot = torch.arange(len(key), device=key.device) - (per_image.cumsum(0) - per_image)[key_image]
        slots = int(per_image.max()) if len(key) else 0
        if slots == 0:
            return torch.zeros(len(image), device=image.device)
        chosen_coefficients = coefficients.new_zeros(batch_size, slots, coefficients.shape[-1], dtype=torch.float32)
        chosen_boxes = boxes.new_zeros(batch_size, slots, 4, dtype=torch.float32)
        chosen_coefficients[key_image, slot] = coefficients[key_image, key_anchor].float()
        chosen_boxes[key_image, slot] = boxes[key_image, key_anchor].float()
        gt_flat = gt_masks.flatten(2).float()  # (B, M, h * w)
        ious = gt_flat.new_zeros(batch_size, gt_masks.shape[1], slots)
        step = max(1, self.CHUNK_PIXELS // (slots * height * width))
        for start in range(0, batch_size, step):  # chunks of images, not a loop per mask
            part = slice(start, start + step)
            logits = torch.bmm(chosen_coefficients[part], protos[part].float().flatten(2))  # (b, S, h * w)
            masks = crop_to_boxes((logits > 0).view(-1, slots, height, width), chosen_boxes[part]).flatten(2).float()
            inter = torch.bmm(gt_flat[part], masks.transpose(1, 2))  # (b, M, S): exact pixel counts in float32
            union = gt_flat[part].sum(-1, keepdim=True) + masks.sum(-1)[:, None] - inter
            ious[part] = inter / union.clamp(min=1)
        return ious[image, gt, slot[pair_key]]


class MaskAlignedSegmentationLoss(SegmentationLoss):
    """Loss of a YOLO26 segmentation head (`Segment26`): `SegmentationLoss` with the mask-aware assignment."""

    assigner_class = MaskTaskAlignedAssigner

    def assigner_inputs(self, maps, coefficients, protos, batch):
        batch_size, _, height, width = protos.shape
        return dict(coefficients=coefficients.detach().float().transpose(1, 2), protos=protos.detach().float(),
                    gt_masks=self.padded_masks(batch, batch_size, (height, width)),
                    mask_scale=height / batch["img"].shape[2])


class EndToEndSegmentationLoss(EndToEndDetectionLoss):
    """Loss of an end-to-end segmentation head (YOLO26): both branches as `EndToEndDetectionLoss` mixes them, each
    with its own masks from the shared prototypes, assigned by box and mask for a `Segment26` head."""

    def branch_loss(self, model, **options):
        aligned_by_mask = getattr(model, "semantic_branch", False)
        return (MaskAlignedSegmentationLoss if aligned_by_mask else SegmentationLoss)(model, **options)
