"""TaskAlignedAssigner on small hand-made cases."""

import math

import pytest
import torch

from yolotrain.loss.assigner import TaskAlignedAssigner

ALPHA, BETA = 0.5, 6.0


def grid_anchors(side=4, stride=8.0):
    """(side*side, 2) anchor centres of one level, row-major: index = row * side + column."""
    coords = (torch.arange(side, dtype=torch.float32) + 0.5) * stride
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    return torch.stack((xs, ys), -1).view(-1, 2)


def boxes_around(points, size):
    """Boxes of the given size centred on each point, xyxy."""
    half = size / 2
    return torch.cat((points - half, points + half), -1)


def iou(box1, box2):
    """Plain IoU of two xyxy lists, written out for the hand computations."""
    inter_w = max(0.0, min(box1[2], box2[2]) - max(box1[0], box2[0]))
    inter_h = max(0.0, min(box1[3], box2[3]) - max(box1[1], box2[1]))
    inter = inter_w * inter_h
    area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
    return inter / (area(box1) + area(box2) - inter)


def ciou(box1, box2):
    """Complete IoU of two xyxy lists, written out: IoU - centre distance^2 / enclosing diagonal^2 - alpha * v."""
    centre_sq = ((box1[0] + box1[2] - box2[0] - box2[2]) ** 2 + (box1[1] + box1[3] - box2[1] - box2[3]) ** 2) / 4
    diagonal_sq = (max(box1[2], box2[2]) - min(box1[0], box2[0])) ** 2 + (
        max(box1[3], box2[3]) - min(box1[1], box2[1])) ** 2
    aspect = lambda b: math.atan((b[2] - b[0]) / (b[3] - b[1]))  # noqa: E731
    v = 4 / math.pi**2 * (aspect(box2) - aspect(box1)) ** 2
    overlap = iou(box1, box2)
    return overlap - centre_sq / diagonal_sq - (v / (v - overlap + 1) if v else 0.0) * v


def run(assigner, scores, pred_boxes, anchors, labels, gt_boxes, mask=None):
    labels = torch.tensor(labels, dtype=torch.float32).view(1, -1, 1)
    gt_boxes = torch.tensor(gt_boxes, dtype=torch.float32).view(1, -1, 4)
    mask = torch.ones_like(labels) if mask is None else torch.tensor(mask, dtype=torch.float32).view(1, -1, 1)
    return assigner(scores[None], pred_boxes[None], anchors, labels, gt_boxes, mask)


def test_two_gts_on_a_4x4_grid_pick_their_best_aligned_anchors():
    anchors = grid_anchors()  # centres 4, 12, 20, 28
    pred_boxes = boxes_around(anchors, 16.0)
    gt_a, gt_b = [0.0, 0.0, 16.0, 16.0], [16.0, 16.0, 32.0, 32.0]
    pred_boxes[15] = torch.tensor(gt_b)  # anchor 15 predicts gt B exactly
    scores = torch.full((16, 2), 0.05)
    # gt A (class 0) contains anchors 0, 1, 4, 5; all four predict boxes with the same IoU, so scores decide.
    scores[[0, 1, 4, 5], 0] = torch.tensor([0.9, 0.2, 0.5, 0.1])
    # gt B (class 1) contains anchors 10, 11, 14, 15.
    scores[[10, 11, 14, 15], 1] = torch.tensor([0.3, 0.3, 0.8, 0.3])

    assigner = TaskAlignedAssigner(topk=2, num_classes=2, alpha=ALPHA, beta=BETA)
    labels, boxes, target_scores, fg, gt_idx = run(assigner, scores, pred_boxes, anchors, [0, 1], [gt_a, gt_b])

    fg_anchors = fg[0].nonzero().view(-1).tolist()
    # A: the two highest scores (0 and 4). B: anchor 15 (IoU 1) then 14 (highest score at the shared overlap).
    assert fg_anchors == [0, 4, 14, 15]
    assert labels[0, fg_anchors].tolist() == [0, 0, 1, 1]
    assert gt_idx[0, fg_anchors].tolist() == [0, 0, 1, 1]
    assert torch.equal(boxes[0, 0], torch.tensor(gt_a)) and torch.equal(boxes[0, 15], torch.tensor(gt_b))
    background = [i for i in range(16) if i not in fg_anchors]
    assert (labels[0, background] == 2).all()
    assert (target_scores[0, background] == 0).all() and (boxes[0, background] == 0).all()

    # Soft targets: alignment / best alignment of the gt * best overlap of the gt; the overlap is the Complete IoU.
    # Every candidate's box is a 16-px square 4 px off its gt's centre along both axes: IoU 144 / 368, centres
    # 32 px^2 apart, enclosing square 20 px wide (diagonal^2 800), the same aspect.
    iou_a = ciou(pred_boxes[0].tolist(), gt_a)
    assert iou_a == pytest.approx(144 / 368 - 32 / 800) and ciou(pred_boxes[14].tolist(), gt_b) == iou_a
    align = lambda score, overlap: score**ALPHA * overlap**BETA  # noqa: E731
    expected = {
        0: align(0.9, iou_a) / align(0.9, iou_a) * iou_a,
        4: align(0.5, iou_a) / align(0.9, iou_a) * iou_a,
        15: 1.0,
        14: align(0.8, iou_a) / align(0.3, 1.0) * 1.0,
    }
    for anchor, value in expected.items():
        cls = labels[0, anchor].item()
        assert target_scores[0, anchor, cls].item() == pytest.approx(value, rel=1e-4)
        assert target_scores[0, anchor, 1 - cls].item() == 0.0


def test_anchor_inside_two_gts_goes_to_the_higher_iou_gt():
    anchors = grid_anchors()
    pred_boxes = boxes_around(anchors, 16.0)
    gt_a, gt_b = [0.0, 0.0, 24.0, 24.0], [8.0, 8.0, 32.0, 32.0]
    # Anchors 5 (12, 12) and 10 (20, 20) lie inside both boxes.
    pred_boxes[5] = torch.tensor(gt_a)
    pred_boxes[10] = torch.tensor([9.0, 9.0, 31.0, 31.0])
    scores = torch.full((16, 2), 0.5)
    scores[5, 1] = 0.99  # a high score for B's class must not beat the IoU rule
    assigner = TaskAlignedAssigner(topk=16, num_classes=2, alpha=ALPHA, beta=BETA)
    labels, boxes, _, fg, gt_idx = run(assigner, scores, pred_boxes, anchors, [0, 1], [gt_a, gt_b])

    assert iou(pred_boxes[5].tolist(), gt_a) > iou(pred_boxes[5].tolist(), gt_b)
    assert iou(pred_boxes[10].tolist(), gt_b) > iou(pred_boxes[10].tolist(), gt_a)
    assert fg[0, 5] and gt_idx[0, 5] == 0 and labels[0, 5] == 0
    assert fg[0, 10] and gt_idx[0, 10] == 1 and labels[0, 10] == 1
    assert torch.equal(boxes[0, 10], torch.tensor(gt_b))
    # topk = 16 keeps every candidate: A contains rows/columns 0-2, B rows/columns 1-3; only 3 and 12 are in neither.
    inside_a = {0, 1, 2, 4, 5, 6, 8, 9, 10}
    inside_b = {5, 6, 7, 9, 10, 11, 13, 14, 15}
    assert set(fg[0].nonzero().view(-1).tolist()) == inside_a | inside_b
    assert set(gt_idx[0, sorted(inside_a - inside_b)].tolist()) == {0}
    assert set(gt_idx[0, sorted(inside_b - inside_a)].tolist()) == {1}


def test_topk_limits_the_positives_of_each_gt():
    anchors = grid_anchors()
    pred_boxes = torch.tensor([[8.0, 8.0, 24.0, 24.0]]).expand(16, 4)  # the same box everywhere: one overlap
    scores = torch.linspace(0.1, 0.9, 16).view(16, 1)
    assigner = TaskAlignedAssigner(topk=3, num_classes=1, alpha=ALPHA, beta=BETA)
    _, _, _, fg, _ = run(assigner, scores, pred_boxes, anchors, [0], [[0.0, 0.0, 32.0, 32.0]])
    assert fg[0].nonzero().view(-1).tolist() == [13, 14, 15]  # the three highest scores


def test_gt_with_fewer_candidates_than_topk_does_not_borrow_outside_anchors():
    anchors = grid_anchors()
    pred_boxes = boxes_around(anchors, 8.0)
    scores = torch.full((16, 1), 0.5)
    assigner = TaskAlignedAssigner(topk=10, num_classes=1)
    _, _, _, fg, _ = run(assigner, scores, pred_boxes, anchors, [0], [[0.0, 0.0, 16.0, 8.0]])
    assert fg[0].nonzero().view(-1).tolist() == [0, 1]  # only anchors (4, 4) and (12, 4) are inside


def test_padding_rows_are_ignored():
    anchors = grid_anchors()
    pred_boxes = boxes_around(anchors, 8.0)
    scores = torch.full((16, 2), 0.5)
    assigner = TaskAlignedAssigner(topk=10, num_classes=2)
    real_and_padding = [[0.0, 0.0, 16.0, 16.0], [0.0, 0.0, 32.0, 32.0]]
    _, _, _, fg, gt_idx = run(assigner, scores, pred_boxes, anchors, [0, 1], real_and_padding, mask=[1, 0])
    assert fg[0].nonzero().view(-1).tolist() == [0, 1, 4, 5]
    assert (gt_idx[0] == 0).all()


def test_no_ground_truth_gives_all_background():
    assigner = TaskAlignedAssigner(topk=10, num_classes=3)
    anchors = grid_anchors()
    scores, pred_boxes = torch.rand(2, 16, 3), boxes_around(anchors, 8.0).expand(2, -1, -1)
    labels, boxes, target_scores, fg, gt_idx = assigner(
        scores, pred_boxes, anchors, torch.zeros(2, 0, 1), torch.zeros(2, 0, 4), torch.zeros(2, 0, 1)
    )
    assert labels.shape == (2, 16) and (labels == 3).all()
    assert boxes.shape == (2, 16, 4) and (boxes == 0).all()
    assert target_scores.shape == (2, 16, 3) and (target_scores == 0).all()
    assert fg.dtype == torch.bool and not fg.any()
    assert gt_idx.shape == (2, 16)


@pytest.mark.numeric
def test_bfloat16_inputs_give_float32_targets_matching_float32():
    anchors = grid_anchors()
    pred_boxes = boxes_around(anchors, 12.0)
    scores = torch.rand(16, 2, generator=torch.Generator().manual_seed(0))
    assigner = TaskAlignedAssigner(topk=4, num_classes=2)
    gts = [[0.0, 0.0, 16.0, 16.0], [8.0, 8.0, 32.0, 24.0]]
    _, _, full, fg_full, _ = run(assigner, scores, pred_boxes, anchors, [0, 1], gts)
    _, _, half, fg_half, _ = run(assigner, scores.bfloat16(), pred_boxes.bfloat16(), anchors, [0, 1], gts)
    assert half.dtype == torch.float32
    assert torch.equal(fg_full, fg_half)
    assert torch.allclose(full, half, atol=2e-2)
    assert math.isfinite(half.sum().item())


def test_overlaps_of_the_candidates_alone_equal_the_masked_grid(monkeypatch):
    """On the CPU only the candidate pairs are computed; the targets equal those of the whole (B, M, A) grid masked,
    which is what a GPU computes."""
    generator = torch.Generator().manual_seed(3)
    anchors = grid_anchors(side=16)
    batch, boxes_per_image, num_classes = 3, 5, 4
    centres = torch.rand(batch, boxes_per_image, 2, generator=generator) * 128
    gt_bboxes = torch.cat((centres - 20, centres + 20), -1)
    gt_labels = torch.randint(0, num_classes, (batch, boxes_per_image, 1), generator=generator)
    mask_gt = torch.ones(batch, boxes_per_image, 1)
    mask_gt[0, 3:] = 0  # padding rows
    pred_centres = anchors[None] + torch.randn(batch, len(anchors), 2, generator=generator) * 4
    pred_bboxes = torch.cat((pred_centres - 16, pred_centres + 16), -1)
    scores = torch.rand(batch, len(anchors), num_classes, generator=generator)
    assigner = TaskAlignedAssigner(topk=5, num_classes=num_classes)
    indexed = assigner(scores, pred_bboxes, anchors, gt_labels, gt_bboxes, mask_gt)

    def masked_grid(self, gt, pred, candidates, **task_inputs):
        return self.pair_iou(gt[:, :, None], pred[:, None]) * candidates

    monkeypatch.setattr(TaskAlignedAssigner, "candidate_overlaps", masked_grid)
    dense = assigner(scores, pred_bboxes, anchors, gt_labels, gt_bboxes, mask_gt)
    assert indexed[3].sum() > 10  # foreground anchors exist
    for ours, grid in zip(indexed, dense):
        assert torch.allclose(ours.float(), grid.float(), atol=1e-6)
