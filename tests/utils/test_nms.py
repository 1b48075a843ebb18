"""non_max_suppression against a plain, obviously-correct greedy reference."""

import time

import pytest
import torch

from yolotrain.utils import nms as nms_module
from yolotrain.utils.nms import greedy_nms, non_max_suppression


def reference_iou(a, b):
    """IoU of two xyxy boxes given as Python floats."""
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / (union + 1e-7)


def reference_nms_one_image(pred, conf_thres, iou_thres, classes, agnostic, max_det, multi_label=False):
    """Textbook greedy NMS, one box at a time. pred (A, 4 + nc) xywh + scores -> list of (x1,y1,x2,y2,conf,cls).

    Single-label: an anchor's best class among `classes` is its candidate; multi-label: every class above conf."""
    candidates = []
    for row in pred.tolist():
        cx, cy, w, h = row[:4]
        scores = row[4:]
        allowed = [c for c in range(len(scores)) if classes is None or c in classes]
        if multi_label:
            labels = [c for c in allowed if scores[c] > conf_thres]
        else:
            best = max(allowed, key=lambda c: (scores[c], -c)) if allowed else None
            labels = [best] if best is not None and scores[best] > conf_thres else []
        for c in labels:
            candidates.append((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, scores[c], float(c)))
    candidates.sort(key=lambda d: -d[4])
    kept = []
    for det in candidates:
        if all(
            (not agnostic and other[5] != det[5]) or reference_iou(other[:4], det[:4]) <= iou_thres for other in kept
        ):
            kept.append(det)
    return kept[:max_det]


def random_prediction(generator, batch, num_classes, num_anchors, image_size=64.0):
    """(B, 4 + nc, A): clustered xywh boxes (so many overlap) and random scores."""
    centres = torch.rand(batch, 2, num_anchors, generator=generator) * image_size
    centres = torch.round(centres / 8) * 8 + torch.randn(batch, 2, num_anchors, generator=generator) * 2
    sizes = 4 + torch.rand(batch, 2, num_anchors, generator=generator) * 16
    scores = torch.rand(batch, num_classes, num_anchors, generator=generator)
    return torch.cat([centres, sizes, scores], 1)


def assert_same_detections(ours, reference):
    expected = torch.tensor(reference, dtype=torch.float32).reshape(-1, 6)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("agnostic", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_matches_reference_greedy_nms(seed, agnostic):
    generator = torch.Generator().manual_seed(seed)
    num_classes = [1, 3, 7, 2, 5, 4][seed]
    num_anchors = [1, 40, 200, 0, 120, 300][seed]
    prediction = random_prediction(generator, 3, num_classes, num_anchors)
    conf_thres, iou_thres = [0.1, 0.3, 0.5, 0.2, 0.0, 0.25][seed], [0.45, 0.3, 0.6, 0.5, 0.2, 0.7][seed]
    ours = non_max_suppression(prediction, conf_thres, iou_thres, agnostic=agnostic)
    assert len(ours) == 3
    for image in range(3):
        reference = reference_nms_one_image(prediction[image].T, conf_thres, iou_thres, None, agnostic, 300)
        assert_same_detections(ours[image], reference)


def test_block_processing_is_still_exact(monkeypatch):
    # Tiny blocks force the "pruned by earlier blocks" path many times.
    monkeypatch.setattr(nms_module, "NMS_BLOCK_SIZE", 7)
    prediction = random_prediction(torch.Generator().manual_seed(11), 2, 3, 150)
    ours = non_max_suppression(prediction, 0.05, 0.4)
    for image in range(2):
        assert_same_detections(ours[image], reference_nms_one_image(prediction[image].T, 0.05, 0.4, None, False, 300))


def greedy_nms_standing_in_for_torchvision(boxes, scores, iou_thres):
    """torchvision.ops.nms's contract (class-agnostic, kept indices by descending score) from our own kernel."""
    return greedy_nms(boxes, scores, iou_thres)


def test_torchvision_path_with_class_offsets(monkeypatch):
    # Stand in for torchvision with our class-agnostic kernel: the class offsets alone must keep classes apart.
    monkeypatch.setattr(nms_module, "torchvision_nms", lambda: greedy_nms_standing_in_for_torchvision)
    prediction = random_prediction(torch.Generator().manual_seed(5), 2, 4, 160)
    for agnostic in (False, True):
        ours = non_max_suppression(prediction, 0.2, 0.5, agnostic=agnostic)
        for image in range(2):
            reference = reference_nms_one_image(prediction[image].T, 0.2, 0.5, None, agnostic, 300)
            assert_same_detections(ours[image], reference)


def test_torchvision_path_keeps_images_apart_and_stops_at_max_det(monkeypatch):
    # One call covers the whole batch: the offsets must also keep images apart, and max_det applies per image.
    monkeypatch.setattr(nms_module, "torchvision_nms", lambda: greedy_nms_standing_in_for_torchvision)
    prediction = random_prediction(torch.Generator().manual_seed(6), 3, 3, 200)
    prediction[1, :4] = prediction[0, :4]  # image 1 has image 0's boxes: suppression across images would show
    for max_det in (4, 300):
        ours = non_max_suppression(prediction, 0.1, 0.5, multi_label=True, max_det=max_det)
        for image in range(3):
            reference = reference_nms_one_image(prediction[image].T, 0.1, 0.5, None, False, max_det, True)
            assert_same_detections(ours[image], reference)


def test_torchvision_path_offsets_keep_full_precision_in_a_large_batch(monkeypatch):
    # 32 images x 80 classes: the last (image, class) range starts millions of pixels out, where float32 steps by
    # 0.125 px. Two boxes 0.3 px apart have IoU 0.99402; at IoU threshold 0.994 one suppresses the other.
    monkeypatch.setattr(nms_module, "torchvision_nms", lambda: greedy_nms_standing_in_for_torchvision)
    prediction = torch.zeros(32, 4 + 80, 3)
    prediction[:, :4, 0] = torch.tensor([50.0, 50.0, 100.0, 100.0])
    prediction[:, :4, 1] = torch.tensor([50.3, 50.0, 100.0, 100.0])
    prediction[:, :4, 2] = torch.tensor([590.0, 590.0, 100.0, 100.0])  # widens the span to 640 px
    prediction[:, 4 + 79] = torch.tensor([0.9, 0.8, 0.7])
    for iou_thres in (0.9939, 0.9941):
        ours = non_max_suppression(prediction, 0.25, iou_thres)
        reference = reference_nms_one_image(prediction[31].T, 0.25, iou_thres, None, False, 300)
        assert_same_detections(ours[31], reference)


def test_equal_scores_keep_anchor_then_class_order():
    # Five far-apart boxes, both classes scoring 0.5 on each: kept in anchor order, then class order.
    boxes = torch.tensor([[10.0 + 30 * i, 10.0, 8.0, 8.0] for i in range(5)]).T  # (4, A) xywh
    prediction = torch.cat([boxes, torch.full((2, 5), 0.5)])[None]  # (1, 4 + 2, 5): two classes tie too
    multi = non_max_suppression(prediction, 0.25, 0.5, multi_label=True)[0]
    assert multi[:, 0].tolist() == [6.0, 6.0, 36.0, 36.0, 66.0, 66.0, 96.0, 96.0, 126.0, 126.0]
    assert multi[:, 5].tolist() == [0.0, 1.0] * 5


def test_candidates_come_by_descending_score_then_position_whatever_their_sign():
    generator = torch.Generator().manual_seed(0)
    scores = (torch.randint(-6, 7, (4, 300), generator=generator) / 4.0).float()  # many ties, negatives, zeros
    scores[3] = -5.0  # a row with nothing passing
    passing = scores > -1.0
    width = int(passing.sum(1).max())
    top = nms_module._descending_top(scores, passing, width)
    for row in range(3):  # the passing scores, in a stable descending order
        expected = [i for i in sorted(range(300), key=lambda i: -scores[row, i].item()) if passing[row, i]]
        got = [i for i in top[row].tolist() if passing[row, i]]
        assert got == expected
        assert not passing[row, top[row, len(expected):]].any()  # the rest pads the row after them


def test_conf_threshold_and_classes_filter():
    prediction = random_prediction(torch.Generator().manual_seed(3), 2, 5, 100)
    ours = non_max_suppression(prediction, conf_thres=0.6, iou_thres=0.5, classes=[1, 3])
    for image in range(2):
        assert (ours[image][:, 4] > 0.6).all()
        assert set(ours[image][:, 5].tolist()) <= {1.0, 3.0}
        assert_same_detections(ours[image], reference_nms_one_image(prediction[image].T, 0.6, 0.5, [1, 3], False, 300))


def test_max_det_keeps_the_highest_scores():
    prediction = random_prediction(torch.Generator().manual_seed(4), 1, 2, 200)
    full = non_max_suppression(prediction, 0.0, 0.9)[0]
    capped = non_max_suppression(prediction, 0.0, 0.9, max_det=5)[0]
    assert full.shape[0] > 5 and capped.shape[0] == 5
    torch.testing.assert_close(capped, full[:5])
    assert (capped[:-1, 4] >= capped[1:, 4]).all()


def test_accepts_model_output_tuple_and_handles_no_candidates():
    prediction = random_prediction(torch.Generator().manual_seed(8), 2, 3, 30)
    from_tuple = non_max_suppression((prediction, [torch.zeros(1)]), 0.3, 0.5)
    direct = non_max_suppression(prediction, 0.3, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(from_tuple, direct))
    nothing = non_max_suppression(prediction, conf_thres=1.0)
    assert [d.shape for d in nothing] == [(0, 6), (0, 6)]


def test_identical_boxes_of_two_classes_are_both_kept_unless_agnostic():
    # Two anchors, same box, best classes 0 and 1.
    prediction = torch.tensor([[[10.0, 10.0], [10.0, 10.0], [4.0, 4.0], [4.0, 4.0], [0.9, 0.1], [0.1, 0.8]]])
    assert non_max_suppression(prediction, 0.25, 0.5)[0].shape[0] == 2
    agnostic = non_max_suppression(prediction, 0.25, 0.5, agnostic=True)[0]
    assert agnostic.shape[0] == 1 and agnostic[0, 4].item() == pytest.approx(0.9)


@pytest.mark.parametrize("agnostic", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_multi_label_matches_reference_greedy_nms(seed, agnostic):
    generator = torch.Generator().manual_seed(100 + seed)
    num_classes, num_anchors = [3, 5, 1, 4][seed], [60, 150, 40, 0][seed]
    prediction = random_prediction(generator, 2, num_classes, num_anchors)
    conf_thres, iou_thres = [0.3, 0.5, 0.1, 0.2][seed], [0.5, 0.45, 0.6, 0.5][seed]
    ours = non_max_suppression(prediction, conf_thres, iou_thres, agnostic=agnostic, multi_label=True)
    for image in range(2):
        reference = reference_nms_one_image(prediction[image].T, conf_thres, iou_thres, None, agnostic, 300, True)
        assert_same_detections(ours[image], reference)


def test_multi_label_keeps_every_class_above_conf_of_one_anchor():
    # One anchor: class 0 at 0.9, class 2 at 0.6, class 1 below conf.
    prediction = torch.tensor([[[10.0], [10.0], [4.0], [4.0], [0.9], [0.1], [0.6]]])
    single = non_max_suppression(prediction, 0.25, 0.5)[0]
    multi = non_max_suppression(prediction, 0.25, 0.5, multi_label=True)[0]
    assert single[:, 4:].tolist() == [[pytest.approx(0.9), 0.0]]
    assert multi[:, 4:].tolist() == [[pytest.approx(0.9), 0.0], [pytest.approx(0.6), 2.0]]
    assert torch.equal(multi[0, :4], multi[1, :4])  # the same box, once per class
    only_class_2 = non_max_suppression(prediction, 0.25, 0.5, classes=[2], multi_label=True)[0]
    assert only_class_2[:, 5].tolist() == [2.0]


def test_multi_label_with_classes_filter_matches_reference():
    prediction = random_prediction(torch.Generator().manual_seed(21), 2, 5, 120)
    ours = non_max_suppression(prediction, 0.4, 0.5, classes=[0, 3], multi_label=True)
    for image in range(2):
        reference = reference_nms_one_image(prediction[image].T, 0.4, 0.5, [0, 3], False, 300, True)
        assert_same_detections(ours[image], reference)


def test_every_image_is_processed_however_late_the_clock_says_it_is(monkeypatch):
    """Results must not depend on how busy the machine is: no time limit drops the images not yet processed."""
    late = iter(range(0, 10**9, 10**6))
    monkeypatch.setattr(time, "monotonic", lambda: float(next(late)))
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(late)))
    prediction = random_prediction(torch.Generator().manual_seed(9), 16, 3, 200)
    ours = non_max_suppression(prediction, 0.1, 0.5, multi_label=True)
    assert len(ours) == 16 and all(len(image) > 0 for image in ours)
    for image in range(16):
        reference = reference_nms_one_image(prediction[image].T, 0.1, 0.5, None, False, 300, True)
        assert_same_detections(ours[image], reference)


def test_stopping_at_max_det_gives_the_prefix_of_the_full_answer(monkeypatch):
    # Small blocks: the early stop happens after a few blocks, not inside the first one.
    monkeypatch.setattr(nms_module, "NMS_BLOCK_SIZE", 7)
    prediction = random_prediction(torch.Generator().manual_seed(12), 2, 3, 300)
    for multi_label in (False, True):
        full = non_max_suppression(prediction, 0.05, 0.4, multi_label=multi_label, max_det=10**6)
        for max_det in (1, 6, 7, 8, 30):
            capped = non_max_suppression(prediction, 0.05, 0.4, multi_label=multi_label, max_det=max_det)
            for image in range(2):
                torch.testing.assert_close(capped[image], full[image][:max_det], rtol=0, atol=0)
                reference = reference_nms_one_image(prediction[image].T, 0.05, 0.4, None, False, max_det, multi_label)
                assert_same_detections(capped[image], reference)  # and the prefix is the textbook answer's


def test_any_along_equals_any_over_every_dimension_and_over_none():
    from yolotrain.utils.torch_utils import any_along

    mask = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0)) > 0.9
    for dim in range(3):
        assert torch.equal(any_along(mask, dim), mask.any(dim))
    assert torch.equal(any_along(mask[:, :0], 1), torch.zeros(3, 7, dtype=torch.bool))
