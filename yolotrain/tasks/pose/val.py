"""PoseValidator: box metrics as DetectionValidator, plus keypoint metrics (P) matched by object keypoint
similarity (OKS) instead of box IoU, as COCO's keypoint evaluation does.

Keypoints are compared in original-image pixels. A label's object area is its box area times 0.53
(`OKS_AREA_FROM_BOX`); the sigmas are the data yaml's `kpt_sigmas`, else COCO's for 17 person keypoints, else 1/K.
A label none of whose keypoints is labelled (all visibility 0) is ignored by the keypoint metrics, as pycocotools
ignores objects with `num_keypoints` 0: it is not a miss, and a detection that could only match it is neither a
true nor a false positive. The detections' keypoints are matched in descending confidence, each to the unmatched
label of its class with the highest OKS at or above each threshold (labels that count first, then ignored ones).
As pycocotools, the keypoint metrics take at most 20 detections per image and class (`KEYPOINT_MAX_DETS`, COCO's
`maxDets` for keypoints), the most confident; the box metrics take all that NMS keeps (`max_det`).

predictions.json (`save_json=True`) adds `keypoints` [x1, y1, v1, ...] in original pixels to each detection (v is
the predicted visibility, or 1 for models without one), COCO's keypoint results format.
"""

import numpy as np
import torch

from yolotrain.loss.pose import pose_loss_item_names
from yolotrain.tasks.detect.val import DetectionValidator, padded_match
from yolotrain.utils.metrics import OKS_AREA_FROM_BOX, PoseMetrics, keypoint_oks, keypoint_sigmas
from yolotrain.utils.torch_utils import de_parallel

KEYPOINT_MAX_DETS = 20  # detections per image and class that COCO's keypoint evaluation scores
TABLE_HEADER = ("Class", "Images", "Instances", "Box(P", "R", "mAP50", "mAP50-95)", "Pose(P", "R", "mAP50",
                "mAP50-95)")


class PoseValidator(DetectionValidator):
    """Validator of `PoseModel`s; `metrics` is a `PoseMetrics` (`metrics.box`, `metrics.pose`)."""

    task = "pose"
    loss_names = pose_loss_item_names()
    primary_metric = "metrics/mAP50-95(P)"
    stat_keys = (*DetectionValidator.stat_keys, "tp_pose", "pose_ignored", "pose_target_cls")
    table_header = TABLE_HEADER
    coco_parts = (*DetectionValidator.coco_parts, ("keypoints", "P"))

    def __init__(self, dataloader=None, save_dir=None, args=None, _callbacks=None):
        super().__init__(dataloader, save_dir, args, _callbacks)
        self.kpt_shape = None
        self.sigmas = None
        self.metrics = PoseMetrics(names={})

    def init_metrics(self, model, dataloader):
        """Detection's set-up, then the keypoint shape (the model's, else the dataset's) and the OKS sigmas."""
        super().init_metrics(model, dataloader)
        data = getattr(getattr(dataloader, "dataset", None), "data", None) or getattr(self, "data", None) or {}
        shape = getattr(de_parallel(model), "kpt_shape", None) or data.get("kpt_shape")
        self.kpt_shape = tuple(int(v) for v in shape)
        self.sigmas = keypoint_sigmas(self.kpt_shape, data.get("kpt_sigmas"))
        self.loss_names = pose_loss_item_names()  # an eval output has no keypoint spreads to score
        self.metrics = PoseMetrics(names=self.names, plot=self.plots, save_dir=self.save_dir,
                                   confusion_matrix=self.confusion_matrix)

    def nms_extra_columns(self):
        """Each detection keeps its K * D keypoint values (batch-image pixels)."""
        return self.kpt_shape[0] * self.kpt_shape[1]

    def part_stats(self, labels, batch):
        """Keypoint matches by OKS at the 10 thresholds, in original-image pixels: `tp_pose` and `pose_ignored`
        (P, 10), and the classes of the labels that count (`pose_target_cls`)."""
        count, dims = self.kpt_shape
        detections = labels.detections
        pred_keypoints = self._to_original(detections[:, 6:].reshape(-1, count, dims), labels, labels.pred_image)
        true_keypoints = batch["keypoints"].detach().float().reshape(-1, count, dims)
        if dims == 2:  # no visibility in the labels: every keypoint is labelled
            true_keypoints = torch.cat((true_keypoints, torch.ones_like(true_keypoints[..., :1])), -1)
        height, width = batch["img"].shape[2:]
        true_keypoints = true_keypoints * torch.tensor([width, height, 1.0], device=true_keypoints.device)
        true_keypoints = self._to_original(true_keypoints, labels, labels.gt_image)
        detections[:, 6:] = pred_keypoints.flatten(1)  # original pixels from here on, as predictions.json wants
        sizes = labels.gt_boxes[:, 2:] - labels.gt_boxes[:, :2]
        area = sizes.prod(1) * OKS_AREA_FROM_BOX  # (G,)
        counted = (true_keypoints[..., 2] > 0).any(1)  # (G,) labels with at least one labelled keypoint
        gt_values = torch.cat((true_keypoints.flatten(1), area[:, None]), 1)
        pred_values = pred_keypoints[..., :2].flatten(1)
        similarity = _oks_similarity(self.sigmas, count)
        iouv = self.iouv.to(detections.device)
        scored = detections.clone()
        beyond_cap = _beyond_per_class_cap(detections, labels.pred_image, KEYPOINT_MAX_DETS)
        scored[beyond_cap, 5] = -2.0  # not scored at all: matches nothing, counts for nothing
        shared = (scored, labels.pred_image, labels.gt_boxes)
        gt_cls = labels.gt_cls
        tp = padded_match(*shared, torch.where(counted, gt_cls, -1.0), labels.gt_image, labels.num_images,
                          labels.max_preds, labels.max_boxes, iouv, pred_values, gt_values, similarity)
        ignored = torch.zeros_like(tp)
        if not bool(counted.all()):  # rare: only labels without any labelled keypoint take part in this step
            ignored = self._matched_to_ignored(tp, shared, gt_cls, counted, labels, iouv, pred_values, gt_values)
        ignored |= beyond_cap[:, None]
        return {"tp_pose": tp, "pose_ignored": ignored, "pose_target_cls": gt_cls[counted]}

    def _matched_to_ignored(self, tp, shared, gt_cls, counted, labels, iouv, pred_values, gt_values):
        """(P, T): detections that no label that counts took at a threshold but an ignored label does, matched as
        COCO does after the others (the box-distance OKS of a label without keypoints; see `_oks_similarity`)."""
        ignored = torch.zeros_like(tp)
        similarity = _oks_similarity(self.sigmas, self.kpt_shape[0], unlabelled_boxes=True)
        ignored_gt_values = torch.cat((gt_values, labels.gt_boxes), 1)
        for t in range(len(iouv)):  # per threshold: the detections still free at it differ
            free = shared[0].clone()
            free[tp[:, t], 5] = -2.0  # taken at this threshold: may not match again
            ignored[:, t] = padded_match(free, *shared[1:], torch.where(counted, -1.0, gt_cls), labels.gt_image,
                                         labels.num_images, labels.max_preds, labels.max_boxes, iouv[t : t + 1],
                                         pred_values, ignored_gt_values, similarity)[:, 0]
        return ignored

    @staticmethod
    def _to_original(keypoints, labels, image_index):
        """(n, K, D) batch-image pixels -> original-image pixels of each row's image."""
        gain, pad = labels.gain[image_index][:, None], labels.pad[image_index][:, None]  # (n, 1, 2)
        moved = keypoints.clone()
        moved[..., :2] = (keypoints[..., :2] - pad) / gain
        return moved

    def process_metrics(self, stats):
        tp = stats["tp"].reshape(-1, len(self.iouv)).astype(bool)
        tp_pose = stats["tp_pose"].reshape(-1, len(self.iouv)).astype(bool)
        ignored = stats["pose_ignored"].reshape(-1, len(self.iouv)).astype(bool)
        return self.metrics.process(tp, stats["conf"], stats["pred_cls"], stats["target_cls"].astype(np.int64),
                                    tp_pose, stats["pose_target_cls"].astype(np.int64), ignored)

    def coco_predictions(self, coco=None):
        """Detection's COCO results with each detection's `keypoints` [x, y, v, ...] in original pixels."""
        records = super().coco_predictions(coco)
        count, dims = self.kpt_shape
        rows = [d[:, 6:].cpu().reshape(-1, count, dims) for _, _, _, d in self.json_records]
        keypoints = torch.cat(rows).double() if rows else torch.zeros(0, count, dims, dtype=torch.float64)
        if dims == 2:
            keypoints = torch.cat((keypoints, torch.ones_like(keypoints[..., :1])), -1)
        for record, values in zip(records, keypoints.numpy().round(3).reshape(len(keypoints), -1).tolist()):
            record["keypoints"] = values
        return records

    def predicted_keypoints(self, detections):
        return detections[:, 6:].reshape(len(detections), *self.kpt_shape)

    def configure_coco_evaluation(self, evaluation):
        """pycocotools scores keypoints with this validator's sigmas (COCO's own for 17 person keypoints)."""
        evaluation.params.kpt_oks_sigmas = np.asarray(self.sigmas)


def _beyond_per_class_cap(detections, image_index, cap):
    """(P,) bool: detections past the `cap` most confident of their image and class (rows sorted by image, each
    image's by descending confidence, as NMS returns them)."""
    if len(detections) == 0:
        return torch.zeros(0, dtype=torch.bool, device=detections.device)
    classes = detections[:, 5].long()
    group = image_index * (int(classes.max()) + 1) + classes  # one id per (image, class)
    order = torch.sort(group, stable=True).indices  # confidence order kept within each group
    sorted_group = group[order]
    first = torch.searchsorted(sorted_group, sorted_group)  # where each row's group starts
    rank = torch.empty_like(group)
    rank[order] = torch.arange(len(group), device=group.device) - first
    return rank >= cap


def _oks_similarity(sigmas, count, unlabelled_boxes=False):
    """A `padded_match` similarity: labels (b, M, K * 3 + 1 [+ 4]) keypoints, area [, box] against predictions
    (b, N, K * 2). With `unlabelled_boxes`, labels without labelled keypoints are scored as pycocotools scores
    them: by how far each predicted keypoint lies outside the label's box grown by its size on every side."""

    def similarity(true_values, pred_values):
        true_keypoints = true_values[..., : count * 3].unflatten(-1, (count, 3))
        area = true_values[..., count * 3]
        pred_keypoints = pred_values.unflatten(-1, (count, 2))
        if not unlabelled_boxes:
            return keypoint_oks(true_keypoints, pred_keypoints, area, sigmas)
        return _outside_box_oks(true_values[..., count * 3 + 1 :], pred_keypoints, area, sigmas)

    return similarity


def _outside_box_oks(boxes, pred_keypoints, area, sigmas):
    """pycocotools' OKS for a label without labelled keypoints: distances are how far each predicted keypoint is
    outside the label box (b, M, 4) xyxy grown by its width / height on each side. Returns (b, M, N)."""
    sizes = boxes[..., 2:] - boxes[..., :2]
    low, high = boxes[..., :2] - sizes, boxes[..., 2:] + sizes  # (b, M, 2)
    points = pred_keypoints[..., None, :, :, :]  # (b, 1, N, K, 2)
    outside = (low[..., None, None, :] - points).clamp(min=0) + (points - high[..., None, None, :]).clamp(min=0)
    sigmas = torch.as_tensor(sigmas, dtype=boxes.dtype, device=boxes.device)
    error = outside.pow(2).sum(-1) / ((2 * sigmas) ** 2 * (area[..., None, None] + np.spacing(1)) * 2)
    return torch.exp(-error).mean(-1)
