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
            assigned = self.assign(list(maps), batch)
            box, cls, dfl = self.detection_terms(assigned)
            seg = self.mask_term(assigned, coefficients.float(), protos.float(), batch)
            terms = [box, seg * self.box_gain, cls, dfl]
            if semantic:
                terms.append(self.semantic_term(semantic[0].float(), batch) * self.box_gain)
            loss = torch.stack(terms)
        return loss.sum() * assigned.batch_size, loss.detach()

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
        masks = batch["masks"].to(gt_index.device)
        if masks.shape[-2:] != size:  # mask_ratio other than the prototypes' 4
            masks = F.interpolate(masks[None].float(), size, mode="nearest")[0]
        if self.overlap:
            return (masks[:, None] == (gt_index + 1)[..., None, None]).float()
        batch_idx = batch["batch_idx"].to(gt_index.device).long().view(-1)
        counts = torch.bincount(batch_idx, minlength=batch_size)
        per_image = padded_per_image(masks, batch_idx, counts, max(most_boxes_per_image(batch, counts), 1))
        index = gt_index[..., None, None].expand(-1, -1, *size)
        return per_image.gather(1, index).float()


class EndToEndSegmentationLoss(EndToEndDetectionLoss):
    """Loss of an end-to-end segmentation head (YOLO26): both branches as `EndToEndDetectionLoss` mixes them, each
    with its own masks from the shared prototypes."""

    def branch_loss(self, model, **options):
        return SegmentationLoss(model, **options)
