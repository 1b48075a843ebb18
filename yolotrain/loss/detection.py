"""Detection loss of an anchor-free YOLO head: classification BCE, CIoU box loss and distribution focal loss.

Shapes: B = images, A = anchor points over all levels, M = ground truths per image (padded), C = classes,
R = reg_max (DFL bins per box side), N = ground truths in the whole batch.
"""

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from yolotrain.errors import CfgError, DatasetError
from yolotrain.loss.assigner import TaskAlignedAssigner
from yolotrain.nn.anchors import bbox2dist, dist2bbox, make_anchors
from yolotrain.utils.boxes import bbox_ciou, xywh2xyxy

LOGGER = logging.getLogger(__name__)


class DetectionLoss:
    """Loss of a `DetectionModel`: `(box, cls, dfl)` scaled by the gains in `model.args`.

    Reads `nc`, `reg_max` and `stride` from the head (`model.model[-1]`) and the gains `box`, `cls`, `dfl` and
    `label_smoothing` from `model.args` (defaults 7.5, 0.5, 1.5, 0.0 when absent).

    Class weights (a hook for imbalanced data): the classification BCE is weighted per class by the vector returned
    from `class_weight_vector()`, called once when the loss is built. By default it returns `model.class_weights`,
    so either set `model.class_weights = torch.tensor([...])` (float, shape (nc,)) before the loss is built (the
    trainer does this with `class_weights_from_labels` when `cls_pw > 0`), or subclass `DetectionLoss` and override
    `class_weight_vector(self) -> torch.Tensor | None`. None means every class weighs 1.

    Label smoothing moves the fraction `label_smoothing` of each foreground anchor's target mass evenly over all
    classes; background anchors keep all-zero targets, so smoothing never raises the score of empty regions.
    """

    assigner_class = TaskAlignedAssigner  # a subclass's own assignment (rotated boxes, keypoints) takes its place

    def __init__(self, model, tal_topk=10, final_topk=None, min_box_side=0.0):
        self.model = model
        head = model.model[-1]
        self.device = next(model.parameters()).device
        self.num_classes = int(head.nc)
        self.reg_max = int(head.reg_max)
        self.stride = torch.as_tensor(head.stride, dtype=torch.float32)
        self.strides = [float(s) for s in self.stride]  # plain numbers: read every step without a device copy
        args = getattr(model, "args", None)
        self.box_gain = float(getattr(args, "box", 7.5))
        self.cls_gain = float(getattr(args, "cls", 0.5))
        self.dfl_gain = float(getattr(args, "dfl", 1.5))
        self.label_smoothing = float(getattr(args, "label_smoothing", 0.0))

        self.class_weights = self._checked_class_weights(self.class_weight_vector())
        self.assigner = self.assigner_class(topk=tal_topk, num_classes=self.num_classes, alpha=0.5, beta=6.0,
                                            final_topk=final_topk, min_box_side=min_box_side)
        # Bin centres 0..R-1: the DFL expectation is the softmax over bins dotted with these.
        self.bin_values = torch.arange(self.reg_max, dtype=torch.float32, device=self.device)

    def class_weight_vector(self):
        """Per-class BCE weights, float tensor (nc,), or None for uniform weights. Override to customise."""
        return getattr(self.model, "class_weights", None)

    def _checked_class_weights(self, weights):
        if weights is None:
            return None
        weights = torch.as_tensor(weights, dtype=torch.float32)
        if weights.shape != (self.num_classes,):
            raise CfgError(
                f"model.class_weights has shape {tuple(weights.shape)}; expected a float tensor of shape "
                f"({self.num_classes},), one weight per class"
            )
        LOGGER.debug("classification loss weighted per class: %s", weights.tolist())
        return weights.to(self.device)

    @staticmethod
    def _global_target_scores_sum(target_scores):
        """The loss normaliser of the whole (global) batch, per rank.

        Under DDP each rank sees a share of the batch; normalising by the global sum (clamped to 1, then split over
        the ranks) makes the averaged gradient equal to a single process's at the same global batch, also early in
        training when the clamp is active. Only inside the trainer's step (`dist.training_step_scope`), where every
        rank computes the same loss; anywhere else (validation, a callback) the loss is this rank's own.
        """
        from yolotrain.utils import dist

        total = target_scores.sum()
        if not dist.in_training_step():
            return total.clamp(min=1.0)
        total = total.detach().clone()
        torch.distributed.all_reduce(total)
        return total.clamp(min=1.0) / dist.world_size()

    def __call__(self, preds, batch):
        """Compute the loss of one batch.

        Args:
            preds: list of 3 feature maps (B, 4*R + C, H_i, W_i) from the train-mode forward, or the eval-mode
                `(y, feats)` tuple (its feats are used).
            batch: dict with `batch_idx` (N,), `cls` (N, 1), `bboxes` (N, 4) normalised xywh and `img` (B, 3, H, W).

        Returns:
            (loss.sum() * B, loss.detach()) where loss = tensor([box, cls, dfl]) after gains.
        """
        feats = _feature_maps(preds)
        device_type = feats[0].device.type
        # The loss needs float32 (DFL log-softmax, IoU ** 6 in the assigner) even when the forward ran in bf16/fp16.
        with torch.autocast(device_type=device_type, enabled=False):
            return self._loss(feats, batch)

    def _loss(self, feats, batch):
        """Assign targets and compute the three weighted losses, all in float32."""
        assigned = self.assign(feats, batch)
        loss = torch.stack(self.detection_terms(assigned))
        return loss.sum() * assigned.batch_size, loss.detach()

    def anchors(self, feats):
        """(A, 2) anchor points in grid units and (A, 1) their strides, float32, for these feature maps."""
        # Float32 shape stand-ins: anchors made in the maps' bf16 would round grid coordinates above 128.
        level_shapes = [torch.empty(f.shape[-2:], device=feats[0].device) for f in feats]
        return make_anchors(level_shapes, self.strides, 0.5)

    def assign(self, feats, batch, **assigner_inputs):
        """Decode the predictions of every anchor and assign the batch's ground truths to them (an `Assignment`);
        `assigner_inputs` go to the assigner as they are (what a subclass's assigner also needs)."""
        batch_size = feats[0].shape[0]
        device = feats[0].device
        pred_distri, pred_logits = self._flatten_predictions(feats)  # (B, A, 4R), (B, A, C)
        anchor_points, stride_tensor = self.anchors(feats)  # (A, 2), (A, 1)

        image_hw = batch["img"].shape[2:]
        gt_labels, gt_bboxes, mask_gt = self.build_targets(batch, batch_size, image_hw, device)
        pred_bboxes = self.decode_boxes(anchor_points, pred_distri)  # (B, A, 4) xyxy, grid units

        _, target_bboxes, target_scores, fg_mask, target_gt_idx = self.assigner(
            pred_logits.detach().sigmoid(),
            pred_bboxes.detach() * stride_tensor,
            anchor_points * stride_tensor,
            gt_labels,
            gt_bboxes,
            mask_gt,
            **assigner_inputs,
        )
        return Assignment(batch_size, image_hw, anchor_points, stride_tensor, pred_distri, pred_logits, pred_bboxes,
                          target_bboxes, target_scores, fg_mask, target_gt_idx,
                          self._global_target_scores_sum(target_scores))

    def detection_terms(self, a):
        """(box, cls, dfl) of an `Assignment`, each times its gain."""
        cls_targets = self._smoothed(a.target_scores, a.fg_mask)
        loss_cls = self._classification_loss(a.pred_logits, cls_targets) / a.target_scores_sum
        loss_box, loss_dfl = self._box_losses(
            a.pred_distri, a.pred_bboxes, a.anchor_points, a.target_bboxes / a.stride_tensor, a.target_scores,
            a.target_scores_sum, a.fg_mask, a.stride_tensor, a.image_hw,
        )
        return loss_box * self.box_gain, loss_cls * self.cls_gain, loss_dfl * self.dfl_gain

    def _flatten_predictions(self, feats):
        """Concatenate the levels: (B, A, 4R) box-side logits and (B, A, C) class logits, float32."""
        batch_size = feats[0].shape[0]
        outputs_per_anchor = 4 * self.reg_max + self.num_classes
        flat = torch.cat([f.reshape(batch_size, outputs_per_anchor, -1) for f in feats], 2).float()  # (B, 4R+C, A)
        pred_distri, pred_logits = flat.split((4 * self.reg_max, self.num_classes), 1)
        return pred_distri.permute(0, 2, 1).contiguous(), pred_logits.permute(0, 2, 1).contiguous()

    def build_targets(self, batch, batch_size, image_hw, device):
        """Pad the batch's ground truths per image (to the batch's `max_boxes` when it has one: code that adds boxes
        to a collated batch updates that count too).

        Returns gt_labels (B, M, 1), gt_bboxes (B, M, 4) pixel xyxy and mask_gt (B, M, 1), M = most boxes in one
        image. Boxes keep their order within each image; rows past an image's count are zero and masked out.
        """
        batch_idx = batch["batch_idx"].to(device).long().view(-1)  # (N,)
        classes = batch["cls"].to(device).float().view(-1, 1)  # (N, 1)
        boxes = batch["bboxes"].to(device).float().view(-1, 4)  # (N, 4)
        counts = torch.bincount(batch_idx, minlength=batch_size)  # (B,)
        num_max_boxes = most_boxes_per_image(batch, counts)

        height, width = image_hw
        scale = torch.tensor([width, height, width, height], device=device, dtype=torch.float32)
        targets = padded_per_image(torch.cat((classes, xywh2xyxy(boxes * scale)), 1), batch_idx, counts,
                                   num_max_boxes)  # (B, M, 5) cls, xyxy
        mask_gt = (torch.arange(num_max_boxes, device=device)[None] < counts[:, None]).unsqueeze(-1)  # (B, M, 1)
        return targets[..., :1].long(), targets[..., 1:], mask_gt

    def decode_boxes(self, anchor_points, pred_distri):
        """(B, A, 4) xyxy boxes in grid units from the DFL logits: each side is the expected bin under softmax.

        With reg_max=1 the outputs are the four side distances themselves.
        """
        return dist2bbox(self.side_distances(pred_distri), anchor_points, xywh=False)

    def side_distances(self, pred_distri):
        """(B, A, 4) distances from each anchor to its box's four sides, in grid units: each the expected bin under
        softmax of its DFL logits, or (reg_max=1) the outputs themselves."""
        if self.reg_max == 1:
            return pred_distri
        batch_size, num_anchors, _ = pred_distri.shape
        bin_probs = pred_distri.view(batch_size, num_anchors, 4, self.reg_max).softmax(-1)  # (B, A, 4, R)
        return bin_probs @ self.bin_values.to(pred_distri.device)  # (B, A, 4)

    def _classification_loss(self, pred_logits, cls_targets):
        """Summed BCE-with-logits over every anchor and class, each class scaled by its weight."""
        weight = None if self.class_weights is None else self.class_weights.to(pred_logits.device)
        return F.binary_cross_entropy_with_logits(pred_logits, cls_targets, weight=weight, reduction="sum")

    def _smoothed(self, target_scores, fg_mask):
        """Classification targets with label smoothing applied to foreground anchors only."""
        if self.label_smoothing <= 0:
            return target_scores
        mass = target_scores.sum(-1, keepdim=True)  # (B, A, 1) the anchor's soft target, 0 for background
        spread = mass * self.label_smoothing / self.num_classes
        return target_scores * (1 - self.label_smoothing) + spread * fg_mask.unsqueeze(-1)

    def _box_losses(self, pred_distri, pred_bboxes, anchor_points, target_bboxes, target_scores,
                    target_scores_sum, fg_mask, stride_tensor, image_hw):
        """CIoU and DFL losses over foreground anchors, each weighted by the anchor's target score.

        Computed for every anchor and weighted by a mask (0 for background) rather than indexed by it: boolean
        indexing would make the device report how many anchors it kept, a synchronisation every step. target_bboxes
        are in grid units, like pred_bboxes and anchor_points. With reg_max=1 the second loss is the L1 distance of
        the four sides instead of DFL (see `side_distance_l1`).
        """
        weight = target_scores.sum(-1) * fg_mask  # (B, A), zero for background anchors
        # Background anchors are compared with their own (detached) prediction: a finite CIoU that weighs zero.
        targets = torch.where(fg_mask.unsqueeze(-1), target_bboxes, pred_bboxes.detach())  # (B, A, 4)
        ciou = bbox_ciou(pred_bboxes, targets)  # (B, A)
        loss_box = ((1.0 - ciou) * weight).sum() / target_scores_sum

        batch_size, num_anchors = weight.shape
        anchors = anchor_points.unsqueeze(0).expand(batch_size, -1, -1)  # (B, A, 2)
        if self.reg_max == 1:
            strides = stride_tensor.unsqueeze(0).expand(batch_size, -1, -1)  # (B, A, 1)
            l1 = side_distance_l1(pred_distri.reshape(-1, 4), anchors.reshape(-1, 2), targets.reshape(-1, 4),
                                  strides.reshape(-1, 1), image_hw)  # (B*A, 1)
            return loss_box, (l1.view(batch_size, num_anchors) * weight).sum() / target_scores_sum
        target_distances = bbox2dist(anchors, targets, self.reg_max)  # (B, A, 4)
        side_logits = pred_distri.reshape(-1, 4, self.reg_max)  # (B*A, 4, R)
        dfl = distribution_focal_loss(side_logits, target_distances.reshape(-1, 4)).view(batch_size, num_anchors)
        return loss_box, (dfl * weight).sum() / target_scores_sum


def padded_per_image(rows, batch_idx, counts, slots):
    """Per-object rows (N, ...) of a batch laid out per image: (B, slots, ...), zeros after an image's own rows.
    Rows keep their order within each image (`batch_idx` (N,) names each row's image, `counts` (B,) their number)."""
    # Slot of each row within its image = its rank among that image's rows (a stable sort keeps the input order).
    order = torch.sort(batch_idx, stable=True).indices
    first_slot_of_image = torch.cumsum(counts, 0) - counts  # (B,)
    slot = torch.empty_like(batch_idx)
    slot[order] = torch.arange(batch_idx.numel(), device=batch_idx.device) - first_slot_of_image[batch_idx[order]]
    padded = rows.new_zeros((len(counts), slots, *rows.shape[1:]))
    padded[batch_idx, slot] = rows
    return padded


@dataclass
class Assignment:
    """What the assigner made of one batch: predictions decoded per anchor and the targets given to them.

    B images, A anchors; grid units are pixels / the anchor's stride. pred_distri (B, A, 4R) and pred_logits
    (B, A, C) raw; pred_bboxes (B, A, 4) xyxy grid units; target_bboxes (B, A, 4) xyxy pixels; target_scores (B, A, C);
    fg_mask (B, A) bool; target_gt_idx (B, A) the slot of each anchor's object in its image (see `padded_per_image`);
    target_scores_sum the loss normaliser.
    """

    batch_size: int
    image_hw: tuple
    anchor_points: torch.Tensor  # (A, 2) grid units
    stride_tensor: torch.Tensor  # (A, 1)
    pred_distri: torch.Tensor
    pred_logits: torch.Tensor
    pred_bboxes: torch.Tensor
    target_bboxes: torch.Tensor
    target_scores: torch.Tensor
    fg_mask: torch.Tensor
    target_gt_idx: torch.Tensor
    target_scores_sum: torch.Tensor


def loss_item_names(reg_max=16):
    """Names of the three loss items: box, cls, and DFL or (reg_max=1) the L1 side distance. The default is the
    head's default (DFL), for the names needed before a model is built."""
    return ("box_loss", "cls_loss", "dfl_loss" if reg_max > 1 else "l1_loss")


def side_distance_l1(pred_distances, anchor_points, target_bboxes, strides, image_hw):
    """L1 loss of the four box-side distances, each as a fraction of the image width or height.

    Args:
        pred_distances: (F, 4) predicted left, top, right, bottom distances in grid units.
        anchor_points: (F, 2) anchor centres in grid units; target_bboxes: (F, 4) xyxy in grid units.
        strides: (F, 1) stride of each anchor's level; image_hw: (height, width) of the batch images in pixels.

    Returns:
        (F, 1) loss per anchor, averaged over the four sides.
    """
    target_distances = torch.cat((anchor_points - target_bboxes[:, :2], target_bboxes[:, 2:] - anchor_points), -1)
    return normalised_side_l1(pred_distances, target_distances, strides, image_hw)


def normalised_side_l1(pred_distances, target_distances, strides, image_hw):
    """(..., 1) L1 distance of (..., 4) left, top, right, bottom side distances (grid units, strides (..., 1)), each
    as a fraction of the image width or height, averaged over the four sides."""
    height, width = image_hw
    to_image_fraction = strides / torch.tensor([width, height, width, height], device=strides.device)  # (..., 4)
    error = (pred_distances - target_distances).abs() * to_image_fraction
    return error.mean(-1, keepdim=True)


def distribution_focal_loss(side_logits, target_distances):
    """DFL (Li et al., GFL, 2020): cross entropy on the two bins around each continuous target, mixed linearly.

    Args:
        side_logits: (F, 4, R) logits over the R bins of each box side.
        target_distances: (F, 4) targets in [0, R - 1), so both neighbour bins exist.

    Returns:
        (F, 1) loss per anchor, averaged over the four sides.
    """
    num_bins = side_logits.shape[-1]
    left_bin = target_distances.long()  # (F, 4)
    right_bin = left_bin + 1
    left_weight = right_bin.float() - target_distances  # closer to the left bin -> more weight on it
    right_weight = 1.0 - left_weight
    log_probs = side_logits.float().log_softmax(-1).view(-1, num_bins)  # (F*4, R)
    left_nll = -log_probs.gather(1, left_bin.view(-1, 1)).view_as(left_weight)
    right_nll = -log_probs.gather(1, right_bin.view(-1, 1)).view_as(right_weight)
    return (left_nll * left_weight + right_nll * right_weight).mean(-1, keepdim=True)


class EndToEndDetectionLoss:
    """Loss of an end-to-end head (YOLO26): its one-to-many and one-to-one branches, mixed by training progress.

    The one-to-many branch is assigned as usual (top 10 candidates per object); the one-to-one branch keeps the top 7
    candidates and then only the best one, so it learns to give each object a single box and needs no NMS. Both
    look for candidates in boxes grown to at least the middle stride, so tiny objects get some. The one-to-many
    weight falls linearly from 0.8 in the first epoch to 0.1 in the last (`set_epoch`); the one-to-one branch gets
    the rest. Returns the one-to-one branch's loss items (what inference uses).
    """

    ONE2MANY_START, ONE2MANY_END = 0.8, 0.1

    def __init__(self, model):
        head = model.model[-1]
        middle_stride = float(head.stride[len(head.stride) // 2])
        self.one2many = self.branch_loss(model, tal_topk=10, min_box_side=middle_stride)
        self.one2one = self.branch_loss(model, tal_topk=7, final_topk=1, min_box_side=middle_stride)
        self.one2many_weight = self.ONE2MANY_START

    def branch_loss(self, model, **options):
        """The loss of one branch (`options`: the assigner's `tal_topk`, `final_topk` and `min_box_side`); a task's
        end-to-end loss returns its own."""
        return DetectionLoss(model, **options)

    def set_epoch(self, epoch, epochs):
        """Weights for epoch `epoch` (0-based) of `epochs`: a pure function of both, so a resume restores them."""
        remaining = max(1.0 - epoch / max(epochs - 1, 1), 0.0)
        self.one2many_weight = self.ONE2MANY_END + (self.ONE2MANY_START - self.ONE2MANY_END) * remaining

    def __call__(self, preds, batch):
        """preds: the head's {"one2many": maps, "one2one": maps}, or the eval-mode (detections, that dict)."""
        if isinstance(preds, tuple):
            preds = preds[1]
        loss_one2many, _ = self.one2many(preds["one2many"], batch)
        loss_one2one, items = self.one2one(preds["one2one"], batch)
        return loss_one2many * self.one2many_weight + loss_one2one * (1.0 - self.one2many_weight), items


def class_weights_from_labels(labels_cls, nc, power):
    """Inverse-frequency class weights: (1 / count) ** power, normalised to mean 1.

    Args:
        labels_cls: class indices of every ground truth in the dataset (any shape; e.g. the concatenated (n, 1)
            `cls` arrays of the label records).
        nc: number of classes.
        power: exponent; 0 gives all ones, larger values favour rare classes more.

    Classes that never appear are weighted as if seen once. Returns a float32 tensor of shape (nc,).
    """
    classes = np.asarray(labels_cls).reshape(-1).astype(np.int64)
    if classes.size and (classes.min() < 0 or classes.max() >= nc):
        bad = classes[(classes < 0) | (classes >= nc)][0]
        raise DatasetError(f"label class {bad} is outside 0..{nc - 1}; class ids must be below nc={nc}")
    counts = np.bincount(classes, minlength=nc).astype(np.float64)
    counts[counts == 0] = 1.0
    weights = (1.0 / counts) ** power
    return torch.from_numpy(weights / weights.mean()).float()


def most_boxes_per_image(batch, counts):
    """M, the padded ground-truth count: from the collated batch's `max_boxes` (counted on the CPU by the loader,
    so no device read), else from `counts` (B,)."""
    if "max_boxes" in batch:
        return int(batch["max_boxes"])
    return int(counts.max()) if counts.numel() else 0


def _feature_maps(preds):
    """The per-level feature maps, whether given directly or inside an eval-mode `(y, feats)` tuple."""
    if isinstance(preds, tuple) and len(preds) == 2 and isinstance(preds[1], (list, tuple)):
        return list(preds[1])
    return list(preds)
