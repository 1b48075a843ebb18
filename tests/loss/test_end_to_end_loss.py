"""The pieces YOLO26's end-to-end training adds: a top-1 assignment, candidate regions for tiny objects, the L1
side-distance loss of a head without DFL, and the epoch schedule mixing the two branches."""

import types

import pytest
import torch

from tests.loss.test_assigner import boxes_around, grid_anchors, run
from yolotrain.loss.assigner import TaskAlignedAssigner
from yolotrain.loss.detection import EndToEndDetectionLoss, side_distance_l1
from yolotrain.nn.model import DetectionModel


def test_final_topk_keeps_only_the_best_aligned_anchor_of_each_object():
    anchors = grid_anchors(side=4, stride=8.0)  # centres 4, 12, 20, 28
    scores = torch.full((16, 1), 0.5)
    pred = boxes_around(anchors, 16.0)
    gt = [[0.0, 0.0, 32.0, 16.0]]  # covers rows 0-1: eight anchors inside
    scores[5] = 0.9  # anchor (row 1, col 1): best score, and its box fits best among the others
    many = run(TaskAlignedAssigner(topk=7, num_classes=1), scores, pred, anchors, [0], gt)
    one = run(TaskAlignedAssigner(topk=7, num_classes=1, final_topk=1), scores, pred, anchors, [0], gt)
    assert int(many[3].sum()) == 7
    assert one[3][0].nonzero().view(-1).tolist() == [5]


def test_tiny_objects_get_candidates_when_boxes_grow_to_the_minimum_side():
    anchors = grid_anchors(side=4, stride=8.0)
    scores = torch.full((16, 1), 0.5)
    pred = boxes_around(anchors, 8.0)
    gt = [[6.0, 6.0, 10.0, 10.0]]  # 4 px, centred between anchor centres 4 and 12: none lies inside
    plain = run(TaskAlignedAssigner(topk=10, num_classes=1), scores, pred, anchors, [0], gt)
    grown = run(TaskAlignedAssigner(topk=10, num_classes=1, min_box_side=16.0), scores, pred, anchors, [0], gt)
    assert not plain[3].any()
    # Grown to 16 px about (8, 8): anchors (4|12, 4|12) are inside, and their IoU with the real box is > 0.
    assert sorted(grown[3][0].nonzero().view(-1).tolist()) == [0, 1, 4, 5]


def test_side_distance_l1_by_hand():
    # One anchor at grid (2, 3), stride 8, image 64 wide x 32 high. Target box xyxy (1, 2, 4, 5) in grid units:
    # distances left 1, top 1, right 2, bottom 2. Prediction off by (+1, 0, -1, +2) grid units = 8, 0, 8, 16 px.
    pred = torch.tensor([[2.0, 1.0, 1.0, 4.0]])
    anchor = torch.tensor([[2.0, 3.0]])
    target = torch.tensor([[1.0, 2.0, 4.0, 5.0]])
    loss = side_distance_l1(pred, anchor, target, torch.tensor([[8.0]]), (32, 64))
    expected = (8 / 64 + 0 / 32 + 8 / 64 + 16 / 32) / 4
    assert loss.shape == (1, 1) and loss.item() == pytest.approx(expected)


def test_branch_weights_move_from_one_to_many_to_one_to_one_over_the_epochs(tiny_family_yaml):
    model = DetectionModel(tiny_family_yaml("yolo26"), verbose=False)
    loss = EndToEndDetectionLoss(model)
    weights = []
    for epoch in (0, 5, 10):
        loss.set_epoch(epoch, 11)
        weights.append(loss.one2many_weight)
    assert weights == pytest.approx([0.8, 0.45, 0.1])
    assert loss.one2one.assigner.final_topk == 1 and loss.one2many.assigner.final_topk is None
    assert loss.one2one.assigner.min_box_side == 16.0  # the middle of strides 8, 16, 32


def test_end_to_end_loss_mixes_the_two_branch_losses(tiny_family_yaml):
    torch.manual_seed(0)
    model = DetectionModel(tiny_family_yaml("yolo26"), nc=2, verbose=False)
    model.args = types.SimpleNamespace(box=7.5, cls=0.5, dfl=1.5, label_smoothing=0.0)
    batch = {"img": torch.rand(2, 3, 64, 64), "batch_idx": torch.tensor([0.0, 1.0]),
             "cls": torch.tensor([[0.0], [1.0]]), "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.3, 0.6, 0.2, 0.5]])}
    preds = model.train()(batch["img"])
    loss = EndToEndDetectionLoss(model)
    loss.set_epoch(3, 5)
    total, items = loss(preds, batch)
    one2many, _ = loss.one2many(preds["one2many"], batch)
    one2one, one2one_items = loss.one2one(preds["one2one"], batch)
    assert total.item() == pytest.approx((0.1 + 0.7 * 0.25) * one2many.item() + (0.9 - 0.7 * 0.25) * one2one.item())
    assert torch.equal(items, one2one_items)
