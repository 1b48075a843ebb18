"""match_predictions, ap_per_class, Metric, DetMetrics and ConfusionMatrix."""

import pickle

import numpy as np
import pytest
import torch

from yolotrain.utils.boxes import box_iou
from yolotrain.utils.metrics import (
    ConfusionMatrix,
    DetMetrics,
    Metric,
    ap_per_class,
    coco_iou_thresholds,
    match_predictions,
)


def reference_match(pred_classes, true_classes, iou, iouv):
    """pycocotools' evaluateImg loop: predictions in order, each takes the unmatched same-class gt with the
    highest IoU >= threshold (later gt wins ties)."""
    num_gt, num_pred = iou.shape
    tp = np.zeros((num_pred, len(iouv)), bool)
    for t, threshold in enumerate(iouv.tolist()):
        taken = set()
        for d in range(num_pred):
            best, best_iou = -1, threshold
            for g in range(num_gt):
                if g in taken or true_classes[g] != pred_classes[d] or iou[g, d] < best_iou:
                    continue
                best, best_iou = g, iou[g, d]
            if best >= 0:
                taken.add(best)
                tp[d, t] = True
    return tp


def clustered_boxes(generator, count, clusters=3):
    """Random xyxy boxes around a few centres, so predictions compete for the same ground truths."""
    centres = torch.randint(0, clusters, (count,), generator=generator).float() * 30 + 20
    centre = centres[:, None] + torch.randn(count, 2, generator=generator) * 3
    half = 8 + torch.rand(count, 2, generator=generator) * 4
    return torch.cat([centre - half, centre + half], 1)


@pytest.mark.parametrize("seed", range(8))
def test_match_predictions_equals_sequential_greedy(seed):
    generator = torch.Generator().manual_seed(seed)
    num_gt, num_pred, num_classes = [0, 1, 5, 12, 7, 20, 3, 9][seed], [4, 0, 6, 30, 25, 40, 1, 18][seed], 2
    gt_boxes, pred_boxes = clustered_boxes(generator, num_gt), clustered_boxes(generator, num_pred)
    gt_cls = torch.randint(0, num_classes, (num_gt,), generator=generator)
    pred_cls = torch.randint(0, num_classes, (num_pred,), generator=generator)
    iou = box_iou(gt_boxes, pred_boxes)
    iouv = coco_iou_thresholds()
    tp = match_predictions(pred_cls, gt_cls, iou, iouv)
    assert tp.shape == (num_pred, 10) and tp.dtype == torch.bool
    np.testing.assert_array_equal(tp.numpy(), reference_match(pred_cls.numpy(), gt_cls.numpy(), iou.numpy(), iouv))


def test_match_prefers_confidence_order_then_highest_iou():
    # gt A = [0,0,10,10], gt B = [2,0,12,10]. Prediction 0 (highest conf) overlaps A with IoU 1 and B with 0.67;
    # prediction 1 equals B. At 0.5 pred 0 takes A, pred 1 takes B. Prediction 2 duplicates A: a false positive.
    gt = torch.tensor([[0.0, 0, 10, 10], [2, 0, 12, 10]])
    preds = torch.tensor([[0.0, 0, 10, 10], [2, 0, 12, 10], [0, 0, 10, 10]])
    tp = match_predictions(torch.zeros(3), torch.zeros(2), box_iou(gt, preds), torch.tensor([0.5]))
    assert tp[:, 0].tolist() == [True, True, False]
    # A lower-confidence perfect box does not steal a gt already matched by a higher-confidence one.
    preds = torch.tensor([[0.0, 0, 10, 7], [0, 0, 10, 10]])  # IoU with A: 0.7, then 1.0
    tp = match_predictions(torch.zeros(2), torch.zeros(1), box_iou(gt[:1], preds), torch.tensor([0.5, 0.75]))
    assert tp.tolist() == [[True, False], [False, True]]


def test_match_never_crosses_classes():
    box = torch.tensor([[0.0, 0, 10, 10]])
    tp = match_predictions(torch.tensor([1]), torch.tensor([0]), box_iou(box, box), coco_iou_thresholds())
    assert not tp.any()


def test_match_sorts_by_pred_conf_and_accepts_numpy():
    generator = torch.Generator().manual_seed(0)
    gt_boxes, pred_boxes = clustered_boxes(generator, 6), clustered_boxes(generator, 15)
    gt_cls, pred_cls = torch.zeros(6), torch.zeros(15)
    conf = torch.rand(15, generator=generator)
    order = conf.argsort(descending=True)
    iouv = coco_iou_thresholds()
    sorted_tp = match_predictions(pred_cls[order], gt_cls, box_iou(gt_boxes, pred_boxes[order]), iouv)
    tp = match_predictions(pred_cls, gt_cls, box_iou(gt_boxes, pred_boxes), iouv, pred_conf=conf)
    assert torch.equal(tp[order], sorted_tp)
    tp_numpy = match_predictions(
        pred_cls.numpy(), gt_cls.numpy(), box_iou(gt_boxes, pred_boxes).numpy(), iouv.numpy(), conf.numpy()
    )
    assert isinstance(tp_numpy, np.ndarray)
    np.testing.assert_array_equal(tp_numpy, tp.numpy())


def test_match_batched_with_padding_equals_per_image():
    generator = torch.Generator().manual_seed(1)
    iouv = coco_iou_thresholds()
    counts = [(3, 10), (0, 4), (7, 2)]
    max_gt, max_pred = 7, 10
    iou = torch.zeros(3, max_gt, max_pred)
    gt_cls, pred_cls = torch.full((3, max_gt), -1), torch.full((3, max_pred), -2)
    expected = []
    for image, (num_gt, num_pred) in enumerate(counts):
        gt_boxes, pred_boxes = clustered_boxes(generator, num_gt), clustered_boxes(generator, num_pred)
        gt_cls[image, :num_gt] = torch.randint(0, 2, (num_gt,), generator=generator)
        pred_cls[image, :num_pred] = torch.randint(0, 2, (num_pred,), generator=generator)
        iou[image, :num_gt, :num_pred] = box_iou(gt_boxes, pred_boxes)
        expected.append(
            match_predictions(pred_cls[image, :num_pred], gt_cls[image, :num_gt], iou[image, :num_gt, :num_pred], iouv)
        )
    batched = match_predictions(pred_cls, gt_cls, iou, iouv)
    assert batched.shape == (3, max_pred, 10)
    for image, (_, num_pred) in enumerate(counts):
        assert torch.equal(batched[image, :num_pred], expected[image])
        assert not batched[image, num_pred:].any()


def test_ap_per_class_ignores_classes_without_ground_truth_and_reports_p_r():
    # Class 0: 2 gts, predictions hit, hit (conf 0.9, 0.8). Class 5 has predictions but no gt: ignored.
    tp = np.array([[True] * 10, [True] * 10, [False] * 10])
    result = ap_per_class(tp, np.array([0.9, 0.8, 0.7]), np.array([0, 0, 5]), np.array([0, 0, 3]))
    assert result.ap_class_index.tolist() == [0, 3]
    np.testing.assert_allclose(result.all_ap, [[1.0] * 10, [0.0] * 10])
    # At the max-F1 confidence class 0 has found both gts with no false positive; class 3 has nothing.
    np.testing.assert_allclose(result.p[0], 1.0)
    np.testing.assert_allclose(result.r, [1.0, 0.0])
    assert result.tp.tolist() == [2, 0]
    assert result.pr_curve.shape == result.f1_curve.shape == (2, len(result.px))


def test_ap_per_class_empty_inputs():
    result = ap_per_class(np.zeros((0, 10), bool), np.zeros(0), np.zeros(0), np.zeros(0))
    assert result.all_ap.shape == (0, 10) and result.p.shape == (0,)
    metric = Metric(nc=3)
    assert metric.mean_results() == [0.0, 0.0, 0.0, 0.0] and metric.fitness() == 0.0


def test_metric_summaries():
    metric = Metric(nc=4)
    tp = np.array([[True, True, False, False, False, False, False, False, False, False], [False] * 10])
    metric.update(ap_per_class(tp, np.array([0.9, 0.5]), np.array([1, 2]), np.array([1, 2])))
    np.testing.assert_allclose(metric.ap50, [1.0, 0.0])
    np.testing.assert_allclose(metric.ap, [0.2, 0.0])
    assert metric.map50 == pytest.approx(0.5) and metric.map == pytest.approx(0.1)
    assert metric.map75 == pytest.approx(0.0)
    assert metric.fitness() == pytest.approx(0.1 * 0.5 + 0.9 * 0.1)
    np.testing.assert_allclose(metric.maps, [0.1, 0.2, 0.0, 0.1])  # absent classes 0 and 3 get the mean
    assert metric.class_result(0)[2:] == pytest.approx((1.0, 0.2))


def test_det_metrics_is_its_results_dict_as_a_mapping_and_pickles_without_its_plot_hook():
    metrics = DetMetrics({0: "a", 1: "b"}, on_plot=lambda path: None)  # a lambda does not pickle
    tp = torch.tensor([[True] * 10, [False] * 10])
    metrics.process(tp, torch.tensor([0.9, 0.6]), torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0]))
    assert dict(metrics) == metrics.results_dict and metrics == metrics.results_dict
    assert metrics["metrics/mAP50(B)"] == metrics.box.map50 and len(metrics) == 5
    copy = pickle.loads(pickle.dumps(metrics))
    assert copy == metrics and copy.box.map == metrics.box.map and copy.on_plot is None
    assert metrics.on_plot is not None  # the original keeps its hook


def test_det_metrics_results_dict():
    metrics = DetMetrics({0: "a", 1: "b"})
    assert metrics.mean_result_keys == ["metrics/precision(B)", "metrics/recall(B)", "metrics/mAP50(B)", "metrics/mAP50-95(B)"]
    tp = torch.tensor([[True] * 10, [False] * 10])
    results = metrics.process(tp, torch.tensor([0.9, 0.6]), torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0]))
    assert list(results) == metrics.mean_result_keys + ["fitness"]
    assert results["metrics/mAP50(B)"] == pytest.approx(0.5)
    assert results["metrics/mAP50-95(B)"] == pytest.approx(0.5)
    assert results["fitness"] == pytest.approx(metrics.fitness) == pytest.approx(0.5)
    assert set(metrics.speed) == {"preprocess", "inference", "loss", "postprocess"}
    assert [len(curve) for curve in metrics.curves_results] == [4, 4, 4, 4]


def test_confusion_matrix_counts():
    matrix = ConfusionMatrix(nc=3, conf=0.25, iou_thres=0.45)
    gt_boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]])
    gt_cls = torch.tensor([0, 1, 2])
    detections = torch.tensor(
        [
            [0, 0, 10, 10, 0.9, 0],  # right class on gt 0
            [20, 20, 30, 30, 0.8, 0],  # gt 1 (class 1) predicted as class 0
            [80, 80, 90, 90, 0.7, 1],  # background predicted as class 1
            [50, 50, 60, 60, 0.1, 2],  # below conf: dropped, so gt 2 is missed
        ]
    )
    matrix.process_batch(detections, gt_boxes, gt_cls)
    expected = np.zeros((4, 4))
    expected[0, 0] = expected[0, 1] = expected[1, 3] = expected[3, 2] = 1
    np.testing.assert_array_equal(matrix.matrix, expected)
    matrix.process_batch(None, gt_boxes[:1], gt_cls[:1])  # no detections: gt missed
    matrix.process_batch(detections[:1], torch.zeros((0, 4)), torch.zeros(0))  # no gt: false positive
    expected[3, 0] += 1
    expected[0, 3] += 1
    np.testing.assert_array_equal(matrix.matrix, expected)
    tp, fp = matrix.tp_fp()
    assert tp.tolist() == [1, 0, 0] and fp.tolist() == [2, 1, 0]  # row sums minus the diagonal


def test_confusion_matrix_matches_each_box_once():
    matrix = ConfusionMatrix(nc=1)
    # Two detections on one gt: one match, one false positive.
    detections = torch.tensor([[0, 0, 10, 10, 0.9, 0], [0, 0, 10, 9, 0.8, 0]])
    matrix.process_batch(detections, torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([0]))
    np.testing.assert_array_equal(matrix.matrix, [[1, 1], [0, 0]])
