"""Anchor points and distance <-> box conversions shared by the head and the loss."""

import torch

from yolotrain.nn.anchors import bbox2dist, dist2bbox, make_anchors


def test_make_anchors_lists_cell_centres_level_by_level_row_major():
    feats = [torch.zeros(1, 5, 2, 3), torch.zeros(1, 5, 1, 2)]
    points, strides = make_anchors(feats, [8, 16])
    assert points.shape == (8, 2) and strides.shape == (8, 1)
    expected_level0 = [[x + 0.5, y + 0.5] for y in range(2) for x in range(3)]
    expected_level1 = [[x + 0.5, 0.5] for x in range(2)]
    assert points.tolist() == expected_level0 + expected_level1
    assert strides.squeeze(1).tolist() == [8.0] * 6 + [16.0] * 2


def test_make_anchors_follows_dtype_and_offset():
    points, strides = make_anchors([torch.zeros(1, 1, 1, 1, dtype=torch.float64)], torch.tensor([32.0]), offset=0.0)
    assert points.dtype == torch.float64 and strides.dtype == torch.float64
    assert points.tolist() == [[0.0, 0.0]]


def test_dist2bbox_xyxy_and_xywh():
    anchors = torch.tensor([[5.0, 5.0], [1.0, 2.0]])
    distances = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5]])
    assert dist2bbox(distances, anchors, xywh=False).tolist() == [[4.0, 3.0, 8.0, 9.0], [0.5, 1.5, 1.5, 2.5]]
    assert dist2bbox(distances, anchors, xywh=True).tolist() == [[6.0, 6.0, 4.0, 6.0], [1.0, 2.0, 1.0, 1.0]]


def test_dist2bbox_along_channel_dim():
    anchors = torch.tensor([[5.0], [5.0]])  # (2, A=1)
    distances = torch.tensor([[[1.0], [2.0], [3.0], [4.0]]])  # (B=1, 4, A=1)
    assert dist2bbox(distances, anchors.unsqueeze(0), xywh=False, dim=1).flatten().tolist() == [4.0, 3.0, 8.0, 9.0]


def test_bbox2dist_inverts_dist2bbox_and_clamps_to_last_bin():
    anchors = torch.tensor([[5.0, 5.0], [3.0, 3.0]])
    distances = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 1.5, 2.5, 7.0]])
    boxes = dist2bbox(distances, anchors, xywh=False)
    assert torch.allclose(bbox2dist(anchors, boxes, reg_max=16), distances)
    far = torch.tensor([[-20.0, 4.0, 30.0, 6.0]])  # left 23 and right 27 exceed the 16 bins
    clamped = bbox2dist(torch.tensor([[3.0, 5.0]]), far, reg_max=16)
    assert torch.allclose(clamped, torch.tensor([[14.99, 1.0, 14.99, 1.0]]))
    assert bbox2dist(torch.tensor([[3.0, 5.0]]), torch.tensor([[4.0, 6.0, 8.0, 9.0]]), 16).min() == 0  # outside
