"""Pose loss: the detection loss plus, for every foreground anchor, its object's keypoints.

The keypoint location loss is 1 - OKS per labelled keypoint: exp(-d^2 / (2 * (2 sigma)^2 * area)) with d the
distance between prediction and label and area the object's box area, both in grid units of the anchor's level,
so it is scale free; it is averaged over the labelled keypoints of each object (an object with few labelled
keypoints weighs as much as a full one) and over the foreground anchors. With visibility (kpt_shape [K, 3]) a
BCE teaches the visibility output which keypoints are labelled. Both losses are means over the foreground anchors
of this process's batch, as the reference method computes them.

YOLO26's head (`Pose26`) adds residual log-likelihood estimation (Li et al., RLE, 2021): per labelled keypoint of a
foreground anchor it predicts a spread sigma (x and y), and the loss is the negative log-likelihood of the error
under a density learned by a normalising flow (the head's `flow_model`) scaled by sigma, plus a Laplace residual
term; its assignment ranks candidates by keypoint OKS rather than box IoU, on the pyramid levels that suit each
object's size. Shapes: B images, A anchors, M labels per image (padded), K keypoints, F foreground slots.
"""

import torch
from torch.nn import functional as F

from yolotrain.loss.assigner import TaskAlignedAssigner
from yolotrain.loss.detection import DetectionLoss, EndToEndDetectionLoss, most_boxes_per_image, padded_per_image
from yolotrain.utils.boxes import xyxy2xywh
from yolotrain.utils.metrics import OKS_AREA_FROM_BOX, keypoint_oks, keypoint_sigmas

# RLE weights of COCO's 17 person keypoints (nose, eyes, ears, shoulders, elbows, wrists, hips, knees, ankles):
# the limbs' ends, which move most, weigh more. Other keypoint sets weigh 1 each.
PERSON_RLE_WEIGHTS = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.2, 1.2, 1.5, 1.5, 1.0, 1.0, 1.2, 1.2, 1.5, 1.5)
LEVEL_RANGE = (2.0, 12.0)  # an object suits a level whose stride s has lo * s <= sqrt(box area) <= hi * s
RLE_ERROR_LIMIT = 100.0  # |error / sigma| is clamped here: a bounded loss for far-off early predictions


def pose_loss_item_names(rle=False):
    """The loss items of a pose model, in results.csv order: five, and a sixth for a head that predicts keypoint
    spreads (YOLO26)."""
    return ("box_loss", "pose_loss", "kobj_loss", "cls_loss", "dfl_loss", *(("rle_loss",) if rle else ()))


class PoseLoss(DetectionLoss):
    """Loss of a `PoseModel`: (box, pose, kobj, cls, dfl) after gains; `pose` and `kobj` gains from `model.args`
    (defaults 12.0 and 1.0), sigmas from `model.kpt_oks_sigmas` or `keypoint_sigmas`."""

    def __init__(self, model, tal_topk=10, final_topk=None, min_box_side=0.0):
        super().__init__(model, tal_topk, final_topk, min_box_side)
        self.head = model.model[-1]
        self.kpt_shape = tuple(self.head.kpt_shape)
        args = getattr(model, "args", None)
        self.pose_gain = float(getattr(args, "pose", 12.0))
        self.kobj_gain = float(getattr(args, "kobj", 1.0))
        sigmas = keypoint_sigmas(self.kpt_shape, getattr(model, "kpt_oks_sigmas", None))
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float32, device=self.device)

    def __call__(self, preds, batch):
        """preds: the head's training output `(maps, keypoints[, spreads])` or its eval output `(y, that tuple)`."""
        if isinstance(preds[0], torch.Tensor):
            preds = preds[1]
        maps, raw_keypoints, *spreads = preds
        maps = list(maps)
        with torch.autocast(device_type=maps[0].device.type, enabled=False):
            anchor_points, stride_tensor = self.anchors(maps)
            keypoints = self.decode_keypoints(raw_keypoints.float(), anchor_points)  # (B, A, K, D)
            labels = self.padded_keypoints(batch, len(raw_keypoints), batch["img"].shape[2:])  # (B, M, K, 3)
            assigned = self.assign(maps, batch, **self.assigner_inputs(keypoints, labels, stride_tensor))
            box, cls, dfl = self.detection_terms(assigned)
            targets = self.anchor_keypoints(assigned, labels)
            keypoint_terms = self.keypoint_items(assigned, keypoints, targets, [s.float() for s in spreads])
            loss = torch.stack((box, *keypoint_terms[:2], cls, dfl, *keypoint_terms[2:]))
        return loss.sum() * assigned.batch_size, loss.detach()

    def assigner_inputs(self, keypoints, labels, stride_tensor):
        """What the assigner needs besides boxes: nothing here (see `RLEPoseLoss`)."""
        return {}

    def keypoint_items(self, a, keypoints, targets, spreads):
        """The keypoint loss items after gains: (pose, kobj)."""
        location, visibility = self.keypoint_terms(a, keypoints, targets)
        return [location * self.pose_gain, visibility * self.kobj_gain]

    def decode_keypoints(self, raw_keypoints, anchor_points):
        """(B, K * D, A) raw outputs -> (B, A, K, D): x, y in grid units of each anchor's level (the head's own
        decoding), the visibility logit as it is."""
        count, dims = self.kpt_shape
        raw = raw_keypoints.permute(0, 2, 1).reshape(raw_keypoints.shape[0], -1, count, dims)
        xy = self.head.keypoints_in_grid(raw[..., :2], anchor_points[:, None])
        return torch.cat((xy, raw[..., 2:]), -1)

    def keypoint_terms(self, a, keypoints, targets):
        """(location loss, visibility loss) over the foreground anchors, computed densely over all anchors and
        weighted by the foreground mask (no boolean indexing, so no device synchronisation). keypoints (B, A, K, D)
        decoded, targets (B, A, K, 3) from `anchor_keypoints`."""
        count, dims = self.kpt_shape
        labelled = targets[..., 2] != 0  # (B, A, K)
        weight = a.fg_mask.float()  # (B, A)
        anchors = weight.sum().clamp(min=1.0)

        area = xyxy2xywh(a.target_bboxes / a.stride_tensor)[..., 2:].prod(-1, keepdim=True)  # (B, A, 1)
        squared = (keypoints[..., :2] - targets[..., :2]).pow(2).sum(-1)  # (B, A, K)
        error = squared / ((2 * self.sigmas).pow(2) * (area + 1e-9) * 2)
        per_object = count / (labelled.sum(-1, keepdim=True) + 1e-9)  # an object's labelled keypoints weigh 1 in all
        location = (per_object * (1 - torch.exp(-error)) * labelled).sum(-1)  # (B, A)
        location_loss = (location * weight).sum() / (anchors * count)
        if dims < 3:
            return location_loss, location_loss.new_zeros(())
        visibility = F.binary_cross_entropy_with_logits(keypoints[..., 2], labelled.float(), reduction="none").sum(-1)
        return location_loss, (visibility * weight).sum() / (anchors * count)

    def padded_keypoints(self, batch, batch_size, image_hw):
        """The batch's keypoints per image (B, M, K, 3): x, y in input pixels and the visibility (1 for labels that
        have none), in the slots of `build_targets`."""
        device = self.device
        keypoints = batch["keypoints"].to(device).float()  # (N, K, D) normalised
        if keypoints.shape[-1] == 2:
            keypoints = torch.cat((keypoints, torch.ones_like(keypoints[..., :1])), -1)
        height, width = image_hw
        keypoints = keypoints * torch.tensor([width, height, 1.0], device=device)
        batch_idx = batch["batch_idx"].to(device).long().view(-1)
        counts = torch.bincount(batch_idx, minlength=batch_size)
        slots = max(most_boxes_per_image(batch, counts), 1)  # one zero slot for a batch without objects
        return padded_per_image(keypoints, batch_idx, counts, slots)

    @staticmethod
    def anchor_keypoints(a, padded):
        """Each anchor's object's keypoints (B, A, K, 3): x, y in the grid units of the anchor's level, and the
        visibility; `padded` from `padded_keypoints`."""
        index = a.target_gt_idx[..., None, None].expand(-1, -1, *padded.shape[2:])
        gathered = padded.gather(1, index)  # (B, A, K, 3)
        to_grid = torch.cat((a.stride_tensor.expand(-1, 2), torch.ones_like(a.stride_tensor)), 1)  # (A, 3)
        return gathered / to_grid[:, None]


class KeypointTaskAlignedAssigner(TaskAlignedAssigner):
    """Task-aligned assignment whose overlap is the keypoint OKS of each candidate's prediction (the box IoU for
    objects without a labelled keypoint), so positives and soft class targets favour anchors with accurate
    keypoints. OKS has no scale prior, so an object is a candidate only on the levels that suit its size
    (`LEVEL_RANGE`; the finest and coarsest levels stay open below and above, and an object the gate would leave
    without candidates keeps them all).

    Task inputs: pred_keypoints (B, A, K, 2) and gt_keypoints (B, M, K, 3) in pixels, anchor_strides (A,), sigmas
    (K,).
    """

    def candidate_anchors(self, anchor_points, gt_bboxes, anchor_strides, **task_inputs):
        inside = super().candidate_anchors(anchor_points, gt_bboxes)
        side = (gt_bboxes[..., 2:] - gt_bboxes[..., :2]).prod(-1, keepdim=True).clamp(min=0).sqrt()  # (B, M, 1)
        low, high = LEVEL_RANGE
        finest, coarsest = anchor_strides == anchor_strides.min(), anchor_strides == anchor_strides.max()
        suits = ((side >= low * anchor_strides) | finest) & ((side <= high * anchor_strides) | coarsest)
        gated = inside & suits
        return torch.where(gated.any(-1, keepdim=True), gated, inside)

    def candidate_overlaps(self, gt_bboxes, pred_bboxes, candidates, pred_keypoints, gt_keypoints, sigmas,
                           **task_inputs):
        """OKS for the candidate pairs only (indexed: the keypoint distances of every pair would be (B, M, A, K));
        the box overlap (`pair_iou`) for a label without labelled keypoints."""
        image, gt, anchor = candidates.nonzero(as_tuple=True)  # indexed on every device: OKS needs the pairs
        labels = gt_keypoints[image, gt][:, None]  # (P, 1, K, 3): each pair its own batch of one label
        box = gt_bboxes[image, gt]
        area = (box[:, 2:] - box[:, :2]).prod(-1, keepdim=True) * OKS_AREA_FROM_BOX  # (P, 1)
        oks = keypoint_oks(labels, pred_keypoints[image, anchor][:, None].float(), area, sigmas)[:, 0, 0]  # (P,)
        labelled = (labels[:, 0, :, 2] > 0).any(-1)
        overlaps = torch.zeros(candidates.shape, device=candidates.device)
        overlaps[image, gt, anchor] = torch.where(labelled, oks, self.pair_iou(box, pred_bboxes[image, anchor]))
        return overlaps


class RLEPoseLoss(PoseLoss):
    """Loss of a `Pose26` head: `PoseLoss`'s five items with keypoint-OKS assignment, and a sixth, the residual
    log-likelihood of the labelled keypoints (`rle` gain of `model.args`, default 1.0) when the head's output has
    spreads (training; an eval output has none, and then the loss has five items)."""

    assigner_class = KeypointTaskAlignedAssigner

    def __init__(self, model, tal_topk=10, final_topk=None, min_box_side=0.0):
        super().__init__(model, tal_topk, final_topk, min_box_side)
        self.rle_gain = float(getattr(getattr(model, "args", None), "rle", 1.0))
        weights = PERSON_RLE_WEIGHTS if self.kpt_shape == (17, 3) else (1.0,) * self.kpt_shape[0]
        self.rle_weights = torch.tensor(weights, device=self.device)

    def assigner_inputs(self, keypoints, labels, stride_tensor):
        return dict(pred_keypoints=keypoints[..., :2].detach() * stride_tensor[:, None], gt_keypoints=labels,
                    anchor_strides=stride_tensor.view(-1), sigmas=self.sigmas)

    def keypoint_items(self, a, keypoints, targets, spreads):
        items = super().keypoint_items(a, keypoints, targets, spreads)
        if spreads:
            items.append(self.rle_term(a, keypoints, spreads[0], targets) * self.rle_gain)
        return items

    def rle_term(self, a, keypoints, spreads, targets):
        """The residual log-likelihood loss, averaged over the labelled keypoints of the foreground anchors.

        Per keypoint with error e = (prediction - label) / sigma in each axis: sum over x, y of log sigma -
        log p(e) + log 2 sigma + |e|, where p is the flow's density of e; weighted per keypoint (`rle_weights`)
        and floored at 0 overall. Only the labelled keypoints of the foreground anchors go through the flow (their
        count, like the foreground slots F per image, is read from the device)."""
        flow = self.head.flow_model
        batch_size, count = a.fg_mask.shape[0], self.kpt_shape[0]
        fg_counts = a.fg_mask.sum(1)
        slots = int(fg_counts.max()) if fg_counts.numel() else 0
        if slots == 0:  # a zero that still reaches the spread branch and the flow
            return (spreads * 0).sum() + sum((p * 0).sum() for p in flow.parameters())
        is_fg, anchor = a.fg_mask.float().topk(slots, dim=1)  # (B, F): foreground anchors first

        def foreground(values):  # (B, A, K, n) -> (B, F, K, n)
            return values.gather(1, anchor[..., None, None].expand(-1, -1, *values.shape[2:]))

        sigma_logits = spreads.permute(0, 2, 1).reshape(batch_size, -1, count, 2)
        sigma = foreground(sigma_logits).sigmoid().clamp(min=torch.finfo(torch.float32).tiny)  # (B, F, K, 2)
        target = foreground(targets)  # (B, F, K, 3)
        error = (foreground(keypoints[..., :2]) - target[..., :2]) / (sigma + 1e-9)
        counted = (target[..., 2] != 0) & is_fg.bool()[..., None] & error.isfinite().all(-1)  # (B, F, K)
        error, sigma = error[counted].clamp(-RLE_ERROR_LIMIT, RLE_ERROR_LIMIT), sigma[counted]  # (P, 2)
        weights = self.rle_weights.expand_as(counted)[counted]  # (P,)
        per_point = (torch.log(sigma) + torch.log(2 * sigma) + error.abs()).sum(-1) - 2 * flow.log_prob(error)
        return ((per_point * weights).sum() / max(len(weights), 1)).clamp(min=0)


class EndToEndPoseLoss(EndToEndDetectionLoss):
    """Loss of an end-to-end pose head (YOLO26): both branches as `EndToEndDetectionLoss` mixes them, each with its
    own keypoints (and spreads, for `Pose26`)."""

    def branch_loss(self, model, **options):
        return (RLEPoseLoss if getattr(model, "rle", False) else PoseLoss)(model, **options)
