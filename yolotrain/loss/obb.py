"""Oriented-box loss: classification BCE as in detection, the probabilistic IoU box loss and DFL on the box sides
measured along the box's own axes, and an angle loss.

Boxes are xywhr (centre x, y, width, height, angle in radians; see `utils.obb` for the angle convention). The head
predicts, per anchor, the distances from the anchor to the four sides of its box along the box's rotated axes, and
the angle; the assignment is task-aligned as in detection, with the probabilistic IoU (ProbIoU: the Bhattacharyya
distance between the boxes as Gaussians, differentiable for any rotation) in place of IoU and the anchor-in-rotated-
box test, on boxes grown to at least the middle stride so that small objects get candidates. The angle loss is
sin^2 of twice the angle error (a box is the same box turned by pi), weighted down for near-square boxes, whose
angle hardly matters. Shapes: B images, A anchors, M labels per image (padded), R DFL bins per side.
"""

import math

import torch

from yolotrain.loss.assigner import TaskAlignedAssigner
from yolotrain.loss.detection import (Assignment, DetectionLoss, EndToEndDetectionLoss, distribution_focal_loss,
                                      most_boxes_per_image, normalised_side_l1, padded_per_image)
from yolotrain.nn.anchors import dist2rbox
from yolotrain.utils.obb import corners_to_xywhr, probiou_pairs, xywhr_to_corners

MIN_TARGET_SIDE = 2.0  # pixels: thinner labelled boxes are left out of the loss (their angle is noise)
PROBIOU_FLOOR = 0.01  # added to each Gaussian's variance in the box loss: bounded gradients for sub-stride boxes
ANGLE_ASPECT_SCALE = 3.0  # the angle weight is exp(-(log(w / h) / this) ** 2): 1 for long boxes, less for squares


def obb_loss_item_names(reg_max=16):
    """The four loss items of an oriented-box model, in results.csv order."""
    return ("box_loss", "cls_loss", "dfl_loss" if reg_max > 1 else "l1_loss", "angle_loss")


class RotatedTaskAlignedAssigner(TaskAlignedAssigner):
    """Task-aligned assignment of xywhr boxes: ProbIoU for the overlap and the anchor-in-rotated-box test."""

    box_dims = 5

    @staticmethod
    def pair_iou(gt_bboxes, pred_bboxes):
        return probiou_pairs(gt_bboxes, pred_bboxes).clamp(min=0)

    def _anchors_inside_boxes(self, anchor_points, gt_bboxes):
        """(B, M, A) True where the anchor lies inside the rotated box: its projections on two adjacent sides fall
        within them."""
        corners = xywhr_to_corners(gt_bboxes)  # (B, M, 4, 2)
        origin, side_a, side_b = corners[..., 0, :], corners[..., 1, :] - corners[..., 0, :], \
            corners[..., 3, :] - corners[..., 0, :]  # (B, M, 2) each
        # (B, M, A) coordinate by coordinate: no (B, M, A, 2) temporaries
        offset_x = anchor_points[:, 0] - origin[..., 0:1]
        offset_y = anchor_points[:, 1] - origin[..., 1:2]
        along_a = offset_x * side_a[..., 0:1] + offset_y * side_a[..., 1:2]
        along_b = offset_x * side_b[..., 0:1] + offset_y * side_b[..., 1:2]
        length_a, length_b = side_a.pow(2).sum(-1)[..., None], side_b.pow(2).sum(-1)[..., None]
        return (along_a >= 0) & (along_a <= length_a) & (along_b >= 0) & (along_b <= length_b)

    def _grown_to_min_side(self, gt_bboxes):
        if self.min_box_side <= 0:
            return gt_bboxes
        sides = gt_bboxes[..., 2:4].clamp(min=self.min_box_side)
        return torch.cat((gt_bboxes[..., :2], sides, gt_bboxes[..., 4:]), -1)


class OBBLoss(DetectionLoss):
    """Loss of an `OBBModel`: (box, cls, dfl, angle) after gains (`box`, `cls`, `dfl`, `angle` of `model.args`,
    defaults 7.5, 0.5, 1.5, 1.0). The batch's labels are `corners` (N, 4, 2), normalised."""

    assigner_class = RotatedTaskAlignedAssigner

    def __init__(self, model, tal_topk=10, final_topk=None, min_box_side=None):
        """min_box_side: see `TaskAlignedAssigner`; None takes the middle stride (small objects get candidates)."""
        if min_box_side is None:
            head = model.model[-1]
            min_box_side = float(head.stride[len(head.stride) // 2])
        super().__init__(model, tal_topk, final_topk, min_box_side)
        self.angle_gain = float(getattr(getattr(model, "args", None), "angle", 1.0))

    def __call__(self, preds, batch):
        """preds: the head's training output `(maps, angles)` or its eval output `(y, (maps, angles))`; angles
        (B, 1, A) in radians."""
        if isinstance(preds[0], torch.Tensor):
            preds = preds[1]
        maps, angles = preds
        with torch.autocast(device_type=maps[0].device.type, enabled=False):
            assigned = self.assign_rotated(list(maps), angles.float(), batch)
            cls = self._classification_loss(assigned.pred_logits, self._smoothed(assigned.target_scores,
                                                                                   assigned.fg_mask))
            box, dfl = self._rotated_box_losses(assigned)
            angle = self._angle_loss(assigned)
            loss = torch.stack((box * self.box_gain, cls / assigned.target_scores_sum * self.cls_gain,
                                dfl * self.dfl_gain, angle * self.angle_gain))
        return loss.sum() * assigned.batch_size, loss.detach()

    def assign_rotated(self, feats, angles, batch):
        """An `Assignment` of rotated boxes: pred_bboxes (B, A, 5) xywhr in grid units, target_bboxes (B, A, 5) in
        pixels (the angle as it is)."""
        batch_size, device = feats[0].shape[0], feats[0].device
        pred_distri, pred_logits = self._flatten_predictions(feats)  # (B, A, 4R), (B, A, C)
        anchor_points, stride_tensor = self.anchors(feats)  # (A, 2), (A, 1)
        image_hw = batch["img"].shape[2:]
        gt_labels, gt_bboxes, mask_gt = self.build_rotated_targets(batch, batch_size, image_hw, device)
        pred_angle = angles.reshape(batch_size, 1, -1).transpose(1, 2)  # (B, A, 1)
        pred_bboxes = self.decode_rotated(anchor_points, pred_distri, pred_angle)  # (B, A, 5), xywh in grid units

        for_assigner = torch.cat((pred_bboxes[..., :4].detach() * stride_tensor, pred_bboxes[..., 4:].detach()), -1)
        _, target_bboxes, target_scores, fg_mask, target_gt_idx = self.assigner(
            pred_logits.detach().sigmoid(), for_assigner, anchor_points * stride_tensor, gt_labels, gt_bboxes, mask_gt)
        return Assignment(batch_size, image_hw, anchor_points, stride_tensor, pred_distri, pred_logits, pred_bboxes,
                          target_bboxes, target_scores, fg_mask, target_gt_idx,
                          self._global_target_scores_sum(target_scores))

    def build_rotated_targets(self, batch, batch_size, image_hw, device):
        """gt_labels (B, M, 1), gt_bboxes (B, M, 5) xywhr in pixels, mask_gt (B, M, 1); labels thinner than
        MIN_TARGET_SIDE pixels are masked out."""
        batch_idx = batch["batch_idx"].to(device).long().view(-1)
        classes = batch["cls"].to(device).float().view(-1, 1)
        height, width = image_hw
        corners = batch["corners"].to(device).float().view(-1, 4, 2) * torch.tensor([width, height], device=device)
        boxes = corners_to_xywhr(corners)  # (N, 5)
        counts = torch.bincount(batch_idx, minlength=batch_size)
        slots = most_boxes_per_image(batch, counts)
        targets = padded_per_image(torch.cat((classes, boxes), 1), batch_idx, counts, slots)  # (B, M, 6)
        present = torch.arange(slots, device=device)[None] < counts[:, None]  # (B, M)
        wide_enough = (targets[..., 3:5] >= MIN_TARGET_SIDE).all(-1)
        return targets[..., :1].long(), targets[..., 1:], (present & wide_enough).unsqueeze(-1)

    def decode_rotated(self, anchor_points, pred_distri, pred_angle):
        """(B, A, 5) xywhr: centre and sides in grid units from the side distances along the rotated axes."""
        return torch.cat((dist2rbox(self.side_distances(pred_distri), pred_angle, anchor_points), pred_angle), -1)

    def _targets_in_grid_units(self, a):
        """(B, A, 5) targets with centre and sides in grid units; background anchors take their own (detached)
        prediction, so every value stays finite and weighs zero."""
        targets = torch.cat((a.target_bboxes[..., :4] / a.stride_tensor, a.target_bboxes[..., 4:]), -1)
        return torch.where(a.fg_mask.unsqueeze(-1), targets, a.pred_bboxes.detach())

    def _rotated_box_losses(self, a):
        """ProbIoU loss and DFL (or, reg_max=1, the L1 of the normalised side distances), dense over all anchors
        and weighted by the foreground anchors' target scores."""
        weight = a.target_scores.sum(-1) * a.fg_mask  # (B, A)
        targets = self._targets_in_grid_units(a)
        iou = probiou_pairs(a.pred_bboxes, targets, floor=PROBIOU_FLOOR)  # (B, A)
        loss_box = ((1.0 - iou) * weight).sum() / a.target_scores_sum
        anchors = a.anchor_points.unsqueeze(0).expand_as(targets[..., :2])
        target_distances = rbox2dist(targets[..., :4], anchors, targets[..., 4:])  # (B, A, 4) grid units
        if self.reg_max == 1:
            strides = a.stride_tensor.unsqueeze(0).expand_as(targets[..., :1])
            l1 = normalised_side_l1(a.pred_distri, target_distances, strides, a.image_hw)  # (B, A, 1)
            return loss_box, (l1[..., 0] * weight).sum() / a.target_scores_sum
        target_distances = target_distances.clamp(0, self.reg_max - 1 - 0.01)
        side_logits = a.pred_distri.reshape(-1, 4, self.reg_max)
        dfl = distribution_focal_loss(side_logits, target_distances.reshape(-1, 4)).view_as(weight)
        return loss_box, (dfl * weight).sum() / a.target_scores_sum

    def _angle_loss(self, a):
        """sin^2(2 * angle error) per foreground anchor, weighted by exp(-(log aspect / 3)^2) and its target score."""
        weight = a.target_scores.sum(-1) * a.fg_mask  # (B, A)
        targets = self._targets_in_grid_units(a)
        log_aspect = torch.log((targets[..., 2] + 1e-9) / (targets[..., 3] + 1e-9))
        aspect_weight = torch.exp(-(log_aspect / ANGLE_ASPECT_SCALE).pow(2))
        error = a.pred_bboxes[..., 4] - targets[..., 4]
        error = error - torch.round(error / math.pi) * math.pi  # the same box every pi
        return (torch.sin(2 * error).pow(2) * aspect_weight * weight).sum() / a.target_scores_sum


def rbox2dist(xywh, anchor_points, angle):
    """(..., 4) distances from each anchor to the left, top, right and bottom sides of its rotated box, measured
    along the box's own axes (the inverse of `dist2rbox`). xywh (..., 4), anchor_points (..., 2), angle (..., 1)."""
    offset = xywh[..., :2] - anchor_points
    cos, sin = torch.cos(angle), torch.sin(angle)
    along_x = offset[..., :1] * cos + offset[..., 1:2] * sin
    along_y = -offset[..., :1] * sin + offset[..., 1:2] * cos
    half_w, half_h = xywh[..., 2:3] / 2, xywh[..., 3:4] / 2
    return torch.cat((half_w - along_x, half_h - along_y, half_w + along_x, half_h + along_y), -1)


class EndToEndOBBLoss(EndToEndDetectionLoss):
    """Loss of an end-to-end oriented-box head (YOLO26): both branches as `EndToEndDetectionLoss` mixes them."""

    def branch_loss(self, model, **options):
        return OBBLoss(model, **options)

