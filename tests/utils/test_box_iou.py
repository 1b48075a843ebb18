"""Pairwise IoU of axis-aligned boxes (NMS, matching, metrics) on cases computed by hand and against a float64
formula."""

import numpy as np
import pytest
import torch

from yolotrain.utils.boxes import batched_box_iou, box_iou


def test_iou_of_pairs_computed_by_hand():
    boxes1 = torch.tensor([[0.0, 0.0, 4.0, 2.0], [10.0, 10.0, 12.0, 12.0]])
    boxes2 = torch.tensor([[2.0, 0.0, 6.0, 2.0],  # half of each 4x2 box shared: 4 / 12
                           [4.0, 0.0, 8.0, 2.0],  # touching along an edge: nothing shared
                           [0.0, 0.0, 4.0, 2.0],  # identical to the first
                           [9.0, 9.0, 13.0, 13.0]])  # holds the second: 4 / 16
    expected = torch.tensor([[4 / 12, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 4 / 16]])
    assert torch.allclose(box_iou(boxes1, boxes2), expected, atol=1e-6)


def test_batched_iou_keeps_each_set_apart_and_equals_the_formula():
    generator = np.random.default_rng(0)

    def random_boxes(batch, count):
        corners = generator.uniform(0, 100, (batch, count, 2))
        sides = generator.uniform(0, 30, (batch, count, 2)) * (generator.random((batch, count, 1)) > 0.05)
        return np.concatenate([corners, corners + sides], -1)  # a few of zero size

    boxes1, boxes2 = random_boxes(3, 17), random_boxes(3, 11)
    inter_w = np.clip(np.minimum(boxes1[:, :, None, 2], boxes2[:, None, :, 2])
                      - np.maximum(boxes1[:, :, None, 0], boxes2[:, None, :, 0]), 0, None)
    inter_h = np.clip(np.minimum(boxes1[:, :, None, 3], boxes2[:, None, :, 3])
                      - np.maximum(boxes1[:, :, None, 1], boxes2[:, None, :, 1]), 0, None)
    inter = inter_w * inter_h
    area1 = np.prod(boxes1[..., 2:] - boxes1[..., :2], -1)
    area2 = np.prod(boxes2[..., 2:] - boxes2[..., :2], -1)
    expected = inter / (area1[:, :, None] + area2[:, None, :] - inter + 1e-7)
    got = batched_box_iou(torch.from_numpy(boxes1).float(), torch.from_numpy(boxes2).float())
    assert got.shape == (3, 17, 11)
    assert got.numpy() == pytest.approx(expected, abs=1e-5)
