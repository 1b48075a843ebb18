"""Task-aligned label assignment (Feng et al., TOOD, 2021) for an anchor-free detection head.

Every ground-truth box picks as positives the `topk` anchor points that lie inside it and whose prediction is best
*aligned* with it, where alignment = class score ** alpha * IoU ** beta (the Complete IoU, floored at 0, as the YOLO
family's assigners use). The soft classification target of a positive anchor is its alignment rescaled so that, per
ground truth, the best-aligned anchor gets that ground truth's best IoU.

Images are batched with padded ground truths: M is the largest number of boxes in one image and `mask_gt` marks the
real rows. Shapes use B = images, A = anchor points, M = ground truths per image (padded), C = classes.
"""

import torch
from torch import nn

# Re-exported so the loss package offers the whole assignment toolbox from one place (see docs/architecture.md).
from yolotrain.nn.anchors import bbox2dist, dist2bbox, make_anchors  # noqa: F401
from yolotrain.utils.boxes import bbox_ciou
from yolotrain.utils.torch_utils import any_along


class TaskAlignedAssigner(nn.Module):
    """Assign ground truths to anchor points by task alignment.

    Args:
        topk: number of candidate anchors each ground truth keeps.
        num_classes: number of classes; also the label given to background anchors.
        alpha: exponent of the class score in the alignment metric.
        beta: exponent of the IoU in the alignment metric.
        eps: small value that keeps divisions and the "inside the box" test stable.
        final_topk: when set, each ground truth keeps at most this many positives after shared anchors are resolved
            (1 for a one-to-one head: one prediction per object).
        min_box_side: candidate anchors are looked for in each box grown about its centre to at least this side
            (pixels), so that objects smaller than a grid cell still get candidates; 0 turns it off.
    """

    box_dims = 4  # values per box: xyxy

    def __init__(self, topk=10, num_classes=80, alpha=0.5, beta=6.0, eps=1e-9, final_topk=None, min_box_side=0.0):
        super().__init__()
        self.topk = topk
        self.num_classes = num_classes
        self.alpha = alpha
        self.beta = beta
        self.eps = eps
        self.final_topk = final_topk
        self.min_box_side = float(min_box_side)

    @torch.no_grad()
    def forward(self, pred_scores, pred_bboxes, anchor_points, gt_labels, gt_bboxes, mask_gt, **task_inputs):
        """Assign targets to every anchor of every image.

        Args:
            pred_scores: (B, A, C) class probabilities (after sigmoid).
            pred_bboxes: (B, A, 4) predicted boxes, xyxy, in the same units as `anchor_points` and `gt_bboxes`.
            anchor_points: (A, 2) anchor centres (x, y).
            gt_labels: (B, M, 1) class index of each ground truth.
            gt_bboxes: (B, M, 4) ground-truth boxes, xyxy.
            mask_gt: (B, M, 1) 1 for real ground truths, 0 for padding rows.
            task_inputs: what a subclass's `candidate_anchors` and `candidate_overlaps` also need (e.g. keypoints).

        Returns:
            target_labels (B, A) long, `num_classes` for background anchors;
            target_bboxes (B, A, 4) xyxy, zeros for background anchors;
            target_scores (B, A, C) soft one-hot targets, zeros for background anchors;
            fg_mask (B, A) bool, True for foreground anchors;
            target_gt_idx (B, A) long, index of the assigned ground truth within its image (0 for background).
        """
        batch_size, num_anchors, _ = pred_scores.shape
        num_max_boxes = gt_bboxes.shape[1]
        if num_max_boxes == 0:
            return self._all_background(pred_scores)

        # Work in float32: under autocast the inputs may be fp16 (IoU ** 6 underflows) or bf16 (too coarse to rank).
        pred_scores, pred_bboxes = pred_scores.float(), pred_bboxes.float()
        anchor_points, gt_bboxes = anchor_points.float(), gt_bboxes.float()
        gt_labels = gt_labels.long().clamp(0, self.num_classes - 1)

        candidates = self.candidate_anchors(anchor_points, gt_bboxes, **task_inputs) & mask_gt.bool()  # (B, M, A)
        align_metric, overlaps = self._alignment(pred_scores, pred_bboxes, gt_labels, gt_bboxes, candidates,
                                                 task_inputs)
        is_positive = self._select_topk(align_metric, candidates, self.topk)  # (B, M, A)
        is_positive = self._keep_best_gt_per_anchor(is_positive, overlaps)  # (B, M, A)
        if self.final_topk is not None and self.final_topk < self.topk:
            is_positive = self._select_topk(align_metric, is_positive, self.final_topk)

        fg_mask = any_along(is_positive, 1)  # (B, A)
        # max(1).indices: the first maximum, as argmax(1), which on the CPU reduces a middle dimension ~10x slower
        target_gt_idx = is_positive.max(1).indices  # (B, A)
        target_labels, target_bboxes, target_scores = self._gather_targets(
            gt_labels, gt_bboxes, target_gt_idx, fg_mask
        )
        quality = self._normalised_alignment(align_metric, overlaps, is_positive)  # (B, A)
        target_scores = target_scores * quality.unsqueeze(-1)
        return target_labels, target_bboxes, target_scores, fg_mask, target_gt_idx

    def _all_background(self, pred_scores):
        """Targets for a batch without any ground truth."""
        batch_size, num_anchors, num_classes = pred_scores.shape
        device = pred_scores.device
        return (
            torch.full((batch_size, num_anchors), self.num_classes, dtype=torch.long, device=device),
            torch.zeros((batch_size, num_anchors, self.box_dims), device=device),
            torch.zeros((batch_size, num_anchors, num_classes), device=device),
            torch.zeros((batch_size, num_anchors), dtype=torch.bool, device=device),
            torch.zeros((batch_size, num_anchors), dtype=torch.long, device=device),
        )

    def candidate_anchors(self, anchor_points, gt_bboxes, **task_inputs):
        """(B, M, A) True for the anchors each ground truth may take: those inside its box (grown to
        `min_box_side`)."""
        return self._anchors_inside_boxes(anchor_points, self._grown_to_min_side(gt_bboxes))

    def _anchors_inside_boxes(self, anchor_points, gt_bboxes):
        """(B, M, A) True where the anchor centre lies strictly inside the ground-truth box (by more than `eps`
        from each side; coordinate by coordinate, with no (B, M, A, 2) temporaries)."""
        x, y = anchor_points[:, 0], anchor_points[:, 1]  # (A,)
        x1, y1, x2, y2 = (gt_bboxes[..., k : k + 1] for k in range(4))  # (B, M, 1) each
        return (x - x1 > self.eps) & (y - y1 > self.eps) & (x2 - x > self.eps) & (y2 - y > self.eps)

    def _grown_to_min_side(self, gt_bboxes):
        """(B, M, 4) xyxy boxes with each side at least `min_box_side`, grown about their centres."""
        if self.min_box_side <= 0:
            return gt_bboxes
        centre = (gt_bboxes[..., :2] + gt_bboxes[..., 2:]) / 2
        half_side = (gt_bboxes[..., 2:] - gt_bboxes[..., :2]).clamp(min=self.min_box_side) / 2
        return torch.cat((centre - half_side, centre + half_side), -1)

    def _alignment(self, pred_scores, pred_bboxes, gt_labels, gt_bboxes, candidates, task_inputs):
        """Alignment metric and overlap (`candidate_overlaps`) between every ground truth and anchor, zero outside
        the candidates."""
        num_anchors = candidates.shape[-1]
        # Score of each anchor for the class of each ground truth.
        scores_by_class = pred_scores.transpose(1, 2)  # (B, C, A)
        gt_class_scores = scores_by_class.gather(1, gt_labels.expand(-1, -1, num_anchors))  # (B, M, A)
        overlaps = self.candidate_overlaps(gt_bboxes, pred_bboxes, candidates, class_scores=gt_class_scores,
                                           **task_inputs)  # (B, M, A)
        align_metric = gt_class_scores.pow(self.alpha) * overlaps.pow(self.beta)  # (B, M, A)
        return align_metric * candidates, overlaps

    def candidate_overlaps(self, gt_bboxes, pred_bboxes, candidates, **task_inputs):
        """(B, M, A) how well each candidate's prediction matches each ground truth (`pair_iou`), 0 elsewhere.
        `task_inputs` also hold `class_scores` (B, M, A), each anchor's score for each ground truth's class.

        On the CPU only the candidate pairs are computed (a few percent of the grid: anchors inside a box, and no
        padding rows). On a GPU the whole grid is computed and masked: indexing would make the device report the
        candidate count, a sync each step.
        """
        if candidates.device.type != "cpu":
            return self.pair_iou(gt_bboxes[:, :, None], pred_bboxes[:, None]) * candidates
        image, gt, anchor = candidates.nonzero(as_tuple=True)
        overlaps = torch.zeros(candidates.shape, device=candidates.device)
        overlaps[image, gt, anchor] = self.pair_iou(gt_bboxes[image, gt], pred_bboxes[image, anchor])
        return overlaps

    @staticmethod
    def pair_iou(gt_bboxes, pred_bboxes):
        """The Complete IoU, floored at 0, of broadcastable (..., 4) xyxy ground truths and predictions: the
        method's overlap (besides IoU it favours predictions centred on the object and of its aspect)."""
        return bbox_ciou(gt_bboxes, pred_bboxes).clamp(min=0)

    @staticmethod
    def _select_topk(align_metric, candidates, topk):
        """(B, M, A) True for the `topk` best-aligned candidate anchors of each ground truth."""
        num_anchors = align_metric.shape[-1]
        k = min(topk, num_anchors)
        # Non-candidates rank below every candidate, so a box with few candidates never borrows outside anchors.
        ranking = align_metric.masked_fill(~candidates, -1.0)  # (B, M, A)
        topk_idx = ranking.topk(k, dim=-1).indices  # (B, M, k)
        in_topk = torch.zeros_like(candidates)
        in_topk.scatter_(-1, topk_idx, True)
        return in_topk & candidates

    @staticmethod
    def _keep_best_gt_per_anchor(is_positive, overlaps):
        """An anchor selected by several ground truths keeps only the one it overlaps most."""
        num_max_boxes = is_positive.shape[1]
        shared = is_positive.sum(1, keepdim=True, dtype=torch.int32) > 1  # (B, 1, A) (int64 sums are ~10x slower)
        # Restrict the choice to the ground truths that actually selected the anchor.
        best_gt = overlaps.masked_fill(~is_positive, -1.0).max(1).indices  # (B, A) (see `forward` on argmax)
        gt_ids = torch.arange(num_max_boxes, device=best_gt.device)[None, :, None]  # (1, M, 1)
        best_one_hot = gt_ids == best_gt[:, None, :]  # (B, M, A)
        return torch.where(shared, best_one_hot & is_positive, is_positive)

    def _gather_targets(self, gt_labels, gt_bboxes, target_gt_idx, fg_mask):
        """Look up each anchor's assigned ground truth; background anchors get label `num_classes`."""
        batch_size, num_max_boxes = gt_labels.shape[:2]
        image_offset = torch.arange(batch_size, device=gt_labels.device)[:, None] * num_max_boxes  # (B, 1)
        flat_idx = target_gt_idx + image_offset  # (B, A) index into the flattened (B*M) ground truths
        target_labels = gt_labels.view(-1)[flat_idx]  # (B, A)
        target_bboxes = gt_bboxes.view(-1, gt_bboxes.shape[-1])[flat_idx]  # (B, A, 4)
        num_anchors = target_labels.shape[1]
        one_hot = torch.zeros((batch_size, num_anchors, self.num_classes), device=gt_labels.device)  # (B, A, C)
        one_hot.scatter_(-1, target_labels.unsqueeze(-1), 1.0)

        target_labels = target_labels.masked_fill(~fg_mask, self.num_classes)
        target_bboxes = target_bboxes * fg_mask.unsqueeze(-1)
        target_scores = one_hot * fg_mask.unsqueeze(-1)
        return target_labels, target_bboxes, target_scores

    def _normalised_alignment(self, align_metric, overlaps, is_positive):
        """(B, A) soft target of each positive anchor: alignment / best alignment of its gt * best IoU of its gt."""
        align_metric = align_metric * is_positive  # (B, M, A)
        best_align_per_gt = align_metric.amax(-1, keepdim=True)  # (B, M, 1)
        best_iou_per_gt = (overlaps * is_positive).amax(-1, keepdim=True)  # (B, M, 1)
        quality = align_metric * best_iou_per_gt / (best_align_per_gt + self.eps)  # (B, M, A)
        return quality.amax(1)  # (B, A): at most one positive gt per anchor, so this picks it
