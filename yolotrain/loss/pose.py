"""Pose loss: the detection loss plus, for every foreground anchor, its object's keypoints.

The keypoint location loss is 1 - OKS per labelled keypoint: exp(-d^2 / (2 * (2 sigma)^2 * area)) with d the
distance between prediction and label and area the object's box area, both in grid units of the anchor's level,
so it is scale free; it is averaged over the labelled keypoints of each object (an object with few labelled
keypoints weighs as much as a full one) and over the foreground anchors. With visibility (kpt_shape [K, 3]) a
BCE teaches the visibility output which keypoints are labelled. Both losses are means over the foreground anchors
of this process's batch, as the reference method computes them. Shapes: B images, A anchors, K keypoints.
"""

import torch
from torch.nn import functional as F

from yolotrain.loss.detection import DetectionLoss, most_boxes_per_image, padded_per_image
from yolotrain.utils.boxes import xyxy2xywh
from yolotrain.utils.metrics import keypoint_sigmas


def pose_loss_item_names():
    """The five loss items of a pose model, in results.csv order."""
    return ("box_loss", "pose_loss", "kobj_loss", "cls_loss", "dfl_loss")


class PoseLoss(DetectionLoss):
    """Loss of a `PoseModel`: (box, pose, kobj, cls, dfl) after gains; `pose` and `kobj` gains from `model.args`
    (defaults 12.0 and 1.0), sigmas from `model.kpt_oks_sigmas` or `keypoint_sigmas`."""

    def __init__(self, model, tal_topk=10):
        super().__init__(model, tal_topk)
        self.kpt_shape = tuple(model.model[-1].kpt_shape)
        args = getattr(model, "args", None)
        self.pose_gain = float(getattr(args, "pose", 12.0))
        self.kobj_gain = float(getattr(args, "kobj", 1.0))
        sigmas = keypoint_sigmas(self.kpt_shape, getattr(model, "kpt_oks_sigmas", None))
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float32, device=self.device)

    def __call__(self, preds, batch):
        """preds: the head's training output `(maps, keypoints)` or its eval output `(y, (maps, keypoints))`."""
        if isinstance(preds[0], torch.Tensor):
            preds = preds[1]
        maps, keypoints = preds
        with torch.autocast(device_type=maps[0].device.type, enabled=False):
            assigned = self.assign(list(maps), batch)
            box, cls, dfl = self.detection_terms(assigned)
            pose, kobj = self.keypoint_terms(assigned, keypoints.float(), batch)
            loss = torch.stack((box, pose * self.pose_gain, kobj * self.kobj_gain, cls, dfl))
        return loss.sum() * assigned.batch_size, loss.detach()

    def keypoint_terms(self, a, raw_keypoints, batch):
        """(location loss, visibility loss) over the foreground anchors, computed densely over all anchors and
        weighted by the foreground mask (no boolean indexing, so no device synchronisation)."""
        count, dims = self.kpt_shape
        pred = raw_keypoints.permute(0, 2, 1).reshape(a.batch_size, -1, count, dims)  # (B, A, K, D)
        pred_xy = pred[..., :2] * 2.0 + (a.anchor_points[:, None] - 0.5)  # grid units of each anchor's level
        target = self._anchor_keypoints(a, batch)  # (B, A, K, 3): x, y in grid units, visibility
        labelled = target[..., 2] != 0  # (B, A, K)
        weight = a.fg_mask.float()  # (B, A)
        anchors = weight.sum().clamp(min=1.0)

        area = xyxy2xywh(a.target_bboxes / a.stride_tensor)[..., 2:].prod(-1, keepdim=True)  # (B, A, 1)
        squared = (pred_xy - target[..., :2]).pow(2).sum(-1)  # (B, A, K)
        error = squared / ((2 * self.sigmas).pow(2) * (area + 1e-9) * 2)
        per_object = count / (labelled.sum(-1, keepdim=True) + 1e-9)  # an object's labelled keypoints weigh 1 in all
        location = (per_object * (1 - torch.exp(-error)) * labelled).sum(-1)  # (B, A)
        location_loss = (location * weight).sum() / (anchors * count)
        if dims < 3:
            return location_loss, location_loss.new_zeros(())
        visibility = F.binary_cross_entropy_with_logits(pred[..., 2], labelled.float(), reduction="none").sum(-1)
        return location_loss, (visibility * weight).sum() / (anchors * count)

    def _anchor_keypoints(self, a, batch):
        """Each anchor's object's keypoints (B, A, K, 3): x, y in the grid units of the anchor's level, and the
        visibility (1 for labels that have none)."""
        device = a.fg_mask.device
        keypoints = batch["keypoints"].to(device).float()  # (N, K, D) normalised
        if keypoints.shape[-1] == 2:
            keypoints = torch.cat((keypoints, torch.ones_like(keypoints[..., :1])), -1)
        height, width = a.image_hw
        keypoints = keypoints * torch.tensor([width, height, 1.0], device=device)  # pixels
        batch_idx = batch["batch_idx"].to(device).long().view(-1)
        counts = torch.bincount(batch_idx, minlength=a.batch_size)
        slots = max(most_boxes_per_image(batch, counts), 1)  # one zero slot for a batch without objects
        padded = padded_per_image(keypoints, batch_idx, counts, slots)  # (B, M, K, 3)
        index = a.target_gt_idx[..., None, None].expand(-1, -1, *padded.shape[2:])
        gathered = padded.gather(1, index)  # (B, A, K, 3)
        to_grid = torch.cat((a.stride_tensor.expand(-1, 2), torch.ones_like(a.stride_tensor)), 1)  # (A, 3)
        return gathered / to_grid[:, None]
