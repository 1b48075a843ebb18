"""Complete IoU (used by the box loss) on pairs computed by hand."""

import math

import pytest
import torch

from yolotrain.utils.boxes import bbox_ciou


def test_identical_boxes_have_ciou_one():
    box = torch.tensor([[3.0, 4.0, 10.0, 20.0]])
    assert bbox_ciou(box, box).item() == pytest.approx(1.0, abs=1e-5)


def test_disjoint_boxes_pay_the_centre_distance_penalty():
    # Two 2x2 squares side by side with a gap of 2: IoU = 0, equal aspect ratios so v = 0.
    box1 = torch.tensor([0.0, 0.0, 2.0, 2.0])
    box2 = torch.tensor([4.0, 0.0, 6.0, 2.0])
    centre_distance_sq = (5.0 - 1.0) ** 2 + (1.0 - 1.0) ** 2  # centres (1, 1) and (5, 1)
    enclosing_diagonal_sq = 6.0**2 + 2.0**2  # enclosing box (0, 0, 6, 2)
    expected = 0.0 - centre_distance_sq / enclosing_diagonal_sq  # = -0.4
    assert bbox_ciou(box1, box2).item() == pytest.approx(expected, abs=1e-5)


def test_same_centre_different_aspect_pays_only_the_aspect_penalty():
    # 4x2 and 2x4 boxes both centred on (2, 1): overlap 2x2.
    box1 = torch.tensor([0.0, 0.0, 4.0, 2.0])
    box2 = torch.tensor([1.0, -1.0, 3.0, 3.0])
    iou = 4.0 / (8.0 + 8.0 - 4.0)
    v = 4 / math.pi**2 * (math.atan(2 / 4) - math.atan(4 / 2)) ** 2
    alpha = v / (v - iou + 1)
    expected = iou - 0.0 - alpha * v  # centre distance is zero
    assert bbox_ciou(box1, box2).item() == pytest.approx(expected, abs=1e-5)
    assert expected < iou  # the aspect term is a real penalty here


def test_ciou_broadcasts_over_leading_dimensions():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 5.0, 3.0]])
    pairwise = bbox_ciou(boxes[:, None], boxes[None, :])
    assert pairwise.shape == (2, 2)
    assert torch.allclose(pairwise.diagonal(), torch.ones(2), atol=1e-5)
    assert torch.allclose(pairwise, pairwise.T, atol=1e-6)
