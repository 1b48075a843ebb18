"""Detection metrics: COCO-style matching, per-class AP, the metric containers the validator reports, and the
confusion matrix.

AP follows pycocotools' `COCOeval.evaluate()` + `accumulate()` for area range "all" (stats[0] = mAP50-95,
stats[1] = mAP50): greedy matching per IoU threshold in descending confidence order, a detection matches the
unmatched same-class ground truth with the highest IoU >= threshold, precision is made monotone (the envelope) and
sampled at 101 recall thresholds linspace(0, 1, 101), AP = the mean of those samples. Known differences:
- No crowd annotations: every ground truth counts and nothing is ignored (pycocotools lets detections match
  `iscrowd` boxes without penalty). YOLO labels have no crowd flag.
- No area ranges: we report only what pycocotools calls areaRng "all".
- No per-image detection cap here: pycocotools keeps the top `maxDets[-1]` (100) detections per image *per
  category*; our cap is NMS's `max_det` per image over all classes, applied before matching. The results agree
  whenever neither cap binds.
- IoU is computed in float32 by `utils.boxes.box_iou` (with a 1e-7 denominator guard) where pycocotools uses
  float64, so a pair whose IoU lies within ~1e-6 of a threshold may be decided differently.
- Ties in confidence are broken by input order with a stable sort, as pycocotools' mergesort does; pass the
  detections image by image in the same image order for identical tie handling. Ties in IoU between two
  ground truths go to the later one, as in pycocotools.
"""

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from yolotrain.utils.boxes import box_iou

LOGGER = logging.getLogger(__name__)

# Recall thresholds of COCO's 101-point interpolated AP.
NUM_RECALL_THRESHOLDS = 101
# Number of confidence samples of the P/R/F1-confidence and PR curves (for plots and the max-F1 operating point).
NUM_CURVE_POINTS = 1000


# COCO's per-keypoint OKS sigmas of its 17 person keypoints (nose, eyes, ears, shoulders, elbows, wrists, hips,
# knees, ankles): how far, relative to the object's size, a prediction of each may stray.
COCO_KEYPOINT_SIGMAS = np.array([0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87,
                                 0.87, 0.89, 0.89]) / 10.0
PERSON_KPT_SHAPE = (17, 3)
# The object area OKS divides by is its box area times this (a person's segment covers about 53% of its box).
OKS_AREA_FROM_BOX = 0.53


def keypoint_sigmas(kpt_shape, custom=None):
    """(K,) OKS sigmas: `custom` (a data yaml's `kpt_sigmas`) when given, COCO's for 17 person keypoints with
    visibility, else 1 / K for every keypoint."""
    count = int(kpt_shape[0])
    if custom is not None:
        sigmas = np.asarray(custom, np.float64).reshape(-1)
        if len(sigmas) != count or not np.all(sigmas > 0):
            raise ValueError(f"kpt_sigmas must be {count} positive numbers (one per keypoint), got {list(custom)}")
        return sigmas
    if tuple(int(v) for v in kpt_shape) == PERSON_KPT_SHAPE:
        return COCO_KEYPOINT_SIGMAS.copy()
    return np.full(count, 1.0 / count)


def coco_iou_thresholds(device=None):
    """The 10 COCO IoU thresholds 0.50:0.05:0.95 as a new float32 tensor."""
    return torch.linspace(0.5, 0.95, 10, device=device)


def match_predictions(pred_classes, true_classes, iou, iouv, pred_conf=None):
    """COCO greedy matching of predictions to ground truths at every IoU threshold.

    pred_classes (..., N), true_classes (..., M), iou (..., M, N): ground truths along rows, predictions along
    columns, i.e. `box_iou(gt_boxes, pred_boxes)`; iouv (T,). Leading batch dimensions are allowed (pad with
    class -1 for absent ground truths and -2 for absent predictions so padding never matches).
    Predictions are taken in the given order, which must be descending confidence (NMS output is), unless
    `pred_conf` (..., N) is given, in which case they are stably sorted by it first.
    Returns tp (..., N, T) bool: prediction n matched a ground truth at threshold t. Each ground truth is matched
    at most once per threshold; a prediction takes the unmatched same-class ground truth with the highest IoU
    >= the threshold. Accepts torch tensors or numpy arrays and returns the same kind.
    """
    as_numpy = isinstance(iou, np.ndarray)
    pred_classes, true_classes, iou, iouv = (torch.as_tensor(x) for x in (pred_classes, true_classes, iou, iouv))
    if pred_conf is not None:
        pred_conf = torch.as_tensor(pred_conf, device=iou.device)
        order = torch.sort(pred_conf, dim=-1, descending=True, stable=True).indices  # (..., N)
        pred_classes = pred_classes.gather(-1, order)
        iou = iou.gather(-1, order.unsqueeze(-2).expand_as(iou))
    iou_t = iou.transpose(-1, -2).to(torch.float32)  # (..., N, M)
    same_class = pred_classes.unsqueeze(-1) == true_classes.unsqueeze(-2)  # (..., N, M)
    thresholds = iouv.to(iou_t).reshape((-1,) + (1,) * iou_t.dim())  # (T, 1.., 1, 1)
    candidate = same_class & (iou_t >= thresholds)  # (T, ..., N, M)
    matched_gt = _greedy_assignment(candidate, iou_t)  # (T, ..., N)
    tp = (matched_gt >= 0).movedim(0, -1)  # (..., N, T)
    if pred_conf is not None:
        tp = torch.empty_like(tp).scatter_(-2, order.unsqueeze(-1).expand_as(tp), tp)
    return tp.numpy() if as_numpy else tp


def _greedy_assignment(candidate, iou):
    """Index of the ground truth each prediction takes (-1: none) under greedy matching in prediction order.

    candidate (T, ..., N, M) bool, iou (..., N, M). Prediction n takes the best candidate not taken by a prediction
    before it, so its choice depends only on earlier predictions. We iterate "everyone re-chooses given the current
    choices of earlier predictions" to its fixpoint: after k rounds the first k predictions are final, the
    fixpoint is unique, hence it is exactly the sequential greedy result. Each round is a few tensor ops over all
    predictions and thresholds, and the number of rounds is the length of the longest chain of predictions
    displacing each other (small), not N.
    """
    num_preds, num_gts, device = candidate.shape[-2], candidate.shape[-1], candidate.device
    matched = torch.full(candidate.shape[:-1], -1, dtype=torch.long, device=device)  # (T, ..., N)
    if num_preds == 0 or num_gts == 0:
        return matched
    # Flip ground truths so argmax's "first maximum" is the *last* gt in original order, like pycocotools.
    iou_flipped = iou.flip(-1).expand(candidate.shape)
    candidate_flipped = candidate.flip(-1)
    pred_index = torch.arange(num_preds, device=device).unsqueeze(-1)  # (N, 1)
    gt_index_flipped = torch.arange(num_gts - 1, -1, -1, device=device)
    while True:
        chosen = matched.unsqueeze(-1) == gt_index_flipped  # (T, ..., N, M) one-hot in flipped order
        first_taker = torch.where(chosen, pred_index, num_preds).amin(-2, keepdim=True)  # (T, ..., 1, M)
        available = candidate_flipped & (first_taker >= pred_index)  # not taken by an earlier prediction
        best_score, best_flipped = torch.where(available, iou_flipped, -1.0).max(-1)
        new_matched = torch.where(best_score >= 0, num_gts - 1 - best_flipped, -1)
        if torch.equal(new_matched, matched):
            return matched
        matched = new_matched


@dataclass
class APResult:
    """Per-class results of `ap_per_class`; row i of every per-class array is class `ap_class_index[i]`."""

    tp: np.ndarray  # (nc,) true positives at the max-F1 confidence, IoU 0.5
    fp: np.ndarray  # (nc,) false positives at the max-F1 confidence, IoU 0.5
    p: np.ndarray  # (nc,) precision at the max-F1 confidence
    r: np.ndarray  # (nc,) recall at the max-F1 confidence
    f1: np.ndarray  # (nc,) F1 at the max-F1 confidence
    all_ap: np.ndarray  # (nc, T) AP at each IoU threshold
    ap_class_index: np.ndarray  # (nc,) int class ids present in the ground truth
    px: np.ndarray  # (NUM_CURVE_POINTS,) x axis of all curves (confidence, or recall for the PR curve)
    pr_curve: np.ndarray  # (nc, NUM_CURVE_POINTS) interpolated precision at recall px, IoU 0.5
    p_curve: np.ndarray  # (nc, NUM_CURVE_POINTS) precision at confidence px, IoU 0.5
    r_curve: np.ndarray  # (nc, NUM_CURVE_POINTS) recall at confidence px, IoU 0.5
    f1_curve: np.ndarray  # (nc, NUM_CURVE_POINTS) F1 at confidence px, IoU 0.5


def _to_numpy(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def smooth(y, fraction=0.05):
    """Box-filter moving average over `fraction` of the points, edges padded with the end values."""
    window = 2 * round(len(y) * fraction) + 1  # odd, so the output has the input's length
    padded = np.concatenate([np.full(window // 2, y[0]), y, np.full(window // 2, y[-1])])
    return np.convolve(padded, np.ones(window) / window, mode="valid")


def _step_sample(recall, envelope, recall_points):
    """COCO interpolation: for each recall point, the envelope precision at the first index with recall >= it
    (0 beyond the last recall reached). recall, envelope (n, T) with recall nondecreasing per column ->
    (len(recall_points), T)."""
    n, num_thresholds = recall.shape
    sampled = np.zeros((len(recall_points), num_thresholds))
    # One searchsorted per IoU threshold (10): recall often equals a recall point exactly (e.g. 3/10 vs 0.30), so
    # the comparison must be made on the untouched values, as pycocotools does.
    for t in range(num_thresholds):
        index = np.searchsorted(recall[:, t], recall_points, side="left")
        valid = index < n
        sampled[valid, t] = envelope[index[valid], t]
    return sampled


def _class_curves(tp, num_gt, ignored=None):
    """Cumulative recall, precision and its envelope for one class's predictions sorted by descending conf.

    tp (n, T) bool -> recall, precision, envelope (n, T); the same formulas as pycocotools' accumulate(). A
    prediction `ignored` (n, T) at a threshold counts neither as a true nor as a false positive there.
    """
    tp_cum = tp.cumsum(0, dtype=np.float64)
    fp = ~tp if ignored is None else ~tp & ~ignored
    fp_cum = fp.cumsum(0, dtype=np.float64)
    recall = tp_cum / num_gt
    precision = tp_cum / (tp_cum + fp_cum + np.spacing(1))
    envelope = np.maximum.accumulate(precision[::-1], axis=0)[::-1]
    return recall, precision, envelope


def ap_per_class(tp, conf, pred_cls, target_cls, eps=1e-16, ignored=None):
    """Per-class AP at each IoU threshold (COCO 101-point), plus P, R, F1 at the max mean-F1 confidence.

    tp (N, T) bool from `match_predictions`, conf (N,), pred_cls (N,) for all predictions of the data set;
    target_cls (M,) classes of all ground truths. Only classes with ground truths are reported (as pycocotools);
    predictions of other classes are ignored. `ignored` (N, T) bool marks predictions matched to labels that do
    not count (COCO's ignored ground truths): they are neither true nor false positives. Returns an `APResult`.
    """
    tp, conf, pred_cls, target_cls = (_to_numpy(x) for x in (tp, conf, pred_cls, target_cls))
    tp = tp.astype(bool)
    tp = tp[:, None] if tp.ndim == 1 else tp  # a single IoU threshold given as (N,)
    ignored = None if ignored is None else _to_numpy(ignored).astype(bool).reshape(tp.shape)
    classes, gt_counts = np.unique(target_cls.astype(np.int64), return_counts=True)
    num_classes, num_thresholds = len(classes), tp.shape[1]
    px = np.linspace(0, 1, NUM_CURVE_POINTS)
    recall_points = np.linspace(0, 1, NUM_RECALL_THRESHOLDS)
    all_ap = np.zeros((num_classes, num_thresholds))
    pr_curve, p_curve, r_curve = (np.zeros((num_classes, NUM_CURVE_POINTS)) for _ in range(3))

    # Group predictions by class, each group in descending confidence; stable so ties keep the input order.
    order = np.argsort(-conf, kind="stable")
    order = order[np.argsort(pred_cls[order].astype(np.int64), kind="stable")]
    sorted_cls = pred_cls[order].astype(np.int64)
    starts, ends = np.searchsorted(sorted_cls, classes, "left"), np.searchsorted(sorted_cls, classes, "right")
    for i in range(num_classes):  # per class, vectorised over its predictions
        if starts[i] == ends[i]:
            continue
        segment = order[starts[i] : ends[i]]
        recall, precision, envelope = _class_curves(tp[segment], gt_counts[i],
                                                    None if ignored is None else ignored[segment])
        all_ap[i] = _step_sample(recall, envelope, recall_points).mean(0)
        pr_curve[i] = _step_sample(recall[:, :1], envelope[:, :1], px)[:, 0]
        # np.interp needs increasing x: confidence decreases along the segment, so interpolate on -conf.
        r_curve[i] = np.interp(-px, -conf[segment], recall[:, 0], left=0)
        p_curve[i] = np.interp(-px, -conf[segment], precision[:, 0], left=1)

    f1_curve = 2 * p_curve * r_curve / (p_curve + r_curve + eps)
    best = smooth(f1_curve.mean(0), 0.1).argmax() if num_classes else 0
    p, r, f1 = p_curve[:, best], r_curve[:, best], f1_curve[:, best]
    tp_count = (r * gt_counts).round()
    fp_count = (tp_count / (p + eps) - tp_count).round()
    return APResult(tp_count, fp_count, p, r, f1, all_ap, classes, px, pr_curve, p_curve, r_curve, f1_curve)


class Metric:
    """Box metrics of one evaluation: per-class arrays plus the means the trainer reports.

    Attributes (after `update`): p, r, f1 (nc_present,), all_ap (nc_present, 10), ap_class_index (nc_present,).
    """

    def __init__(self, nc=0):
        self.nc = nc
        self.update(ap_per_class(np.zeros((0, 10), bool), np.zeros(0), np.zeros(0), np.zeros(0)))

    def update(self, result):
        """Store an `APResult`."""
        self.result = result
        self.p, self.r, self.f1 = result.p, result.r, result.f1
        self.all_ap, self.ap_class_index = result.all_ap, result.ap_class_index

    @property
    def ap50(self):
        """(nc_present,) AP at IoU 0.5."""
        return self.all_ap[:, 0] if len(self.all_ap) else np.zeros(0)

    @property
    def ap(self):
        """(nc_present,) AP averaged over the IoU thresholds 0.5:0.95."""
        return self.all_ap.mean(1) if len(self.all_ap) else np.zeros(0)

    @staticmethod
    def _mean(values):
        return float(values.mean()) if len(values) else 0.0

    @property
    def mp(self):
        """Mean precision over classes at the max-F1 confidence."""
        return self._mean(self.p)

    @property
    def mr(self):
        """Mean recall over classes at the max-F1 confidence."""
        return self._mean(self.r)

    @property
    def map50(self):
        """mAP at IoU 0.5."""
        return self._mean(self.ap50)

    @property
    def map75(self):
        """mAP at IoU 0.75."""
        return self._mean(self.all_ap[:, 5]) if len(self.all_ap) else 0.0

    @property
    def map(self):
        """mAP averaged over IoU 0.5:0.95."""
        return self._mean(self.ap)

    @property
    def maps(self):
        """(nc,) mAP50-95 per class id; classes absent from the ground truth get the overall mAP."""
        maps = np.full(self.nc, self.map)
        maps[self.ap_class_index] = self.ap
        return maps

    def mean_results(self):
        """[mp, mr, map50, map]."""
        return [self.mp, self.mr, self.map50, self.map]

    def class_result(self, i):
        """(p, r, ap50, ap) of the i-th reported class (class id `ap_class_index[i]`)."""
        return float(self.p[i]), float(self.r[i]), float(self.ap50[i]), float(self.ap[i])

    def fitness(self):
        """0.1 * mAP50 + 0.9 * mAP50-95: the score used to pick the best checkpoint."""
        return 0.1 * self.map50 + 0.9 * self.map


class ResultsMapping(Mapping):
    """A task's metrics object read as the flat mapping of its `results_dict` (the results.csv names)."""

    def __getitem__(self, key):
        return self.results_dict[key]

    def __iter__(self):
        return iter(self.results_dict)

    def __len__(self):
        return len(self.results_dict)


@dataclass(eq=False)  # compared as the mapping it is, not field by field
class DetMetrics(ResultsMapping):
    """Detection metrics as reported by the validator: `process(...)`, then read them as attributes or as the flat
    mapping of results.csv names.

    The attributes scripts read: `box` (a `Metric`: `map`, `map50`, `map75`, `maps`, `mp`, `mr`, `p`, `r`, `f1`,
    `ap50`, `ap`), `results_dict`, `fitness`, `speed` (ms per image by stage), `save_dir`, `confusion_matrix`
    (its `matrix`, once the validator has counted it). As a mapping it is `results_dict`:
    `metrics["metrics/mAP50-95(B)"]`, `dict(metrics)`.
    """

    names: dict = field(default_factory=dict)
    plot: bool = False
    save_dir: Path = None
    on_plot: object = None  # optional fn(path) called for every saved plot
    confusion_matrix: object = None

    def __post_init__(self):
        self.box = Metric(nc=len(self.names))
        self.speed = {"preprocess": 0.0, "inference": 0.0, "loss": 0.0, "postprocess": 0.0}

    def __getstate__(self):
        """Pickled (from a DDP worker to its launcher) without the plot hook, which may hold a whole validator."""
        return {**self.__dict__, "on_plot": None}

    def process(self, tp, conf, pred_cls, target_cls):
        """Compute the metrics from all predictions (tp (N, 10), conf, pred_cls) and all gt classes."""
        self.box.update(ap_per_class(tp, conf, pred_cls, target_cls))
        if self.plot and self.save_dir is not None:
            self._plot_curves()
        return self.results_dict

    def _plot_curves(self, result=None, prefix=""):
        """PR_curve.png, F1_curve.png, P_curve.png and R_curve.png of one part (`prefix` names it: Box, Pose)."""
        from yolotrain.utils.plotting import plot_mc_curve, plot_pr_curve

        save_dir, result = Path(self.save_dir), result if result is not None else self.box.result
        names = {i: self.names.get(int(c), str(int(c))) for i, c in enumerate(result.ap_class_index)}
        paths = [save_dir / f"{prefix}PR_curve.png"]
        plot_pr_curve(result.px, result.pr_curve, result.all_ap, paths[0], names)
        for stem, curve, ylabel in (("F1", result.f1_curve, "F1"), ("P", result.p_curve, "Precision"),
                                    ("R", result.r_curve, "Recall")):  # fmt: skip
            paths.append(save_dir / f"{prefix}{stem}_curve.png")
            plot_mc_curve(result.px, curve, paths[-1], names, xlabel="Confidence", ylabel=ylabel)
        if self.on_plot is not None:
            for path in paths:
                self.on_plot(path)

    @property
    def mean_result_keys(self):
        """Names of the values in `mean_results()`, in order."""
        return ["metrics/precision(B)", "metrics/recall(B)", "metrics/mAP50(B)", "metrics/mAP50-95(B)"]

    def mean_results(self):
        return self.box.mean_results()

    def class_result(self, i):
        return self.box.class_result(i)

    @property
    def maps(self):
        return self.box.maps

    @property
    def ap_class_index(self):
        return self.box.ap_class_index

    @property
    def fitness(self):
        return self.box.fitness()

    @property
    def results_dict(self):
        """{key: value} for the four metrics plus "fitness"."""
        return {**dict(zip(self.mean_result_keys, self.mean_results())), "fitness": self.fitness}

    @property
    def curves(self):
        return ["Precision-Recall(B)", "F1-Confidence(B)", "Precision-Confidence(B)", "Recall-Confidence(B)"]

    @property
    def curves_results(self):
        """[[x, y (nc, points), xlabel, ylabel], ...] matching `curves`."""
        result = self.box.result
        return [
            [result.px, result.pr_curve, "Recall", "Precision"],
            [result.px, result.f1_curve, "Confidence", "F1"],
            [result.px, result.p_curve, "Confidence", "Precision"],
            [result.px, result.r_curve, "Confidence", "Recall"],
        ]


class _PartMetrics(DetMetrics):
    """Box metrics as `DetMetrics` plus one more part (a `Metric` of the same attributes) matched by its own
    similarity: results.csv names carry (B) and the part's suffix; fitness is the sum of both parts' fitness.
    A subclass names the part's attribute (`part`), its suffix and its curves' title."""

    part, suffix, title = "", "", ""

    def __post_init__(self):
        super().__post_init__()
        setattr(self, self.part, Metric(nc=len(self.names)))

    @property
    def _part(self):
        return getattr(self, self.part)

    def process(self, tp, conf, pred_cls, target_cls, tp_part=None, part_target_cls=None, part_ignored=None):
        """Box metrics from `tp` (N, 10) as `DetMetrics`; the part's from `tp_part` (N, 10) against the labels that
        have the part (`part_target_cls`), leaving out the detections `part_ignored` (N, 10) marks."""
        self.box.update(ap_per_class(tp, conf, pred_cls, target_cls))
        self._part.update(ap_per_class(tp_part, conf, pred_cls, part_target_cls, ignored=part_ignored))
        if self.plot and self.save_dir is not None:
            self._plot_curves(self.box.result, "Box")
            self._plot_curves(self._part.result, self.title)
        return self.results_dict

    @property
    def mean_result_keys(self):
        return [*super().mean_result_keys, *(f"metrics/{key}({self.suffix})" for key in
                                             ("precision", "recall", "mAP50", "mAP50-95"))]

    def mean_results(self):
        return self.box.mean_results() + self._part.mean_results()

    def class_result(self, i):
        return self.box.class_result(i) + self._part.class_result(i)

    @property
    def maps(self):
        return self.box.maps + self._part.maps

    @property
    def fitness(self):
        return self.box.fitness() + self._part.fitness()

    @property
    def curves(self):
        return [*super().curves, *(f"{name}({self.suffix})" for name in
                                   ("Precision-Recall", "F1-Confidence", "Precision-Confidence", "Recall-Confidence"))]

    @property
    def curves_results(self):
        result = self._part.result
        return super().curves_results + [
            [result.px, result.pr_curve, "Recall", "Precision"],
            [result.px, result.f1_curve, "Confidence", "F1"],
            [result.px, result.p_curve, "Confidence", "Precision"],
            [result.px, result.r_curve, "Confidence", "Recall"],
        ]


class PoseMetrics(_PartMetrics):
    """Pose metrics: `box` as in `DetMetrics` and `pose`, matched by OKS instead of box IoU; names carry (P)."""

    part, suffix, title = "pose", "P", "Pose"


class SegmentMetrics(_PartMetrics):
    """Segmentation metrics: `box` as in `DetMetrics` and `seg`, matched by mask IoU; names carry (M)."""

    part, suffix, title = "seg", "M", "Mask"


def keypoint_oks(true_keypoints, pred_keypoints, area, sigmas):
    """Object keypoint similarity of every label with every prediction, as COCO's keypoint evaluation defines it.

    true_keypoints (..., M, K, 3) x, y, visibility; pred_keypoints (..., N, K, 2+); area (..., M) the labels' object
    areas; sigmas (K,). OKS = mean over the label's labelled keypoints (visibility > 0) of
    exp(-d^2 / (2 * area * (2 sigma)^2)); a label without labelled keypoints scores 0. Returns (..., M, N).
    """
    sigmas = torch.as_tensor(sigmas, dtype=true_keypoints.dtype, device=true_keypoints.device)
    difference = true_keypoints[..., :, None, :, :2] - pred_keypoints[..., None, :, :, :2]  # (..., M, N, K, 2)
    error = difference.pow(2).sum(-1) / ((2 * sigmas) ** 2 * (area[..., None, None] + np.spacing(1)) * 2)
    labelled = (true_keypoints[..., 2] > 0).to(error.dtype)  # (..., M, K)
    return (torch.exp(-error) * labelled[..., None, :]).sum(-1) / labelled.sum(-1, keepdim=True).clamp(min=1)


@dataclass(eq=False)  # compared as the mapping it is, not field by field
class ClassifyMetrics(ResultsMapping):
    """Classification metrics as reported by the validator: `process(targets, top5)`, then read them as attributes
    (`top1`, `top5`, `results_dict`, `fitness`, `speed`, `save_dir`, `confusion_matrix`) or as the flat mapping of
    results.csv names (`metrics["metrics/accuracy_top1"]`). Fitness is the mean of the two accuracies."""

    names: dict = field(default_factory=dict)
    save_dir: Path = None
    confusion_matrix: object = None
    top1: float = 0.0
    top5: float = 0.0

    def __post_init__(self):
        self.speed = {"preprocess": 0.0, "inference": 0.0, "loss": 0.0, "postprocess": 0.0}

    def process(self, targets, top5):
        """Accuracies from the class ids (n,) and each image's five best classes, best first (n, 5)."""
        self.top1, self.top5 = top_k_accuracy(targets, top5)
        return self.results_dict

    @property
    def mean_result_keys(self):
        return ["metrics/accuracy_top1", "metrics/accuracy_top5"]

    @property
    def fitness(self):
        return (self.top1 + self.top5) / 2

    @property
    def results_dict(self):
        return {**dict(zip(self.mean_result_keys, (self.top1, self.top5))), "fitness": self.fitness}


def top_k_accuracy(targets, ranked):
    """(top-1, top-k accuracy) of class ids `targets` (n,) against `ranked` (n, k) classes, best first; k is the
    number of columns (fewer than 5 when a model has fewer classes). 0 for no images."""
    targets, ranked = _to_numpy(targets).reshape(-1, 1), _to_numpy(ranked)
    if len(targets) == 0:
        return 0.0, 0.0
    hits = ranked == targets
    return float(hits[:, 0].mean()), float(hits.any(1).mean())


class ClassifyConfusionMatrix:
    """Confusion matrix of classification: `matrix[predicted, true]`, nc x nc, no background."""

    def __init__(self, nc):
        self.nc = nc
        self.matrix = np.zeros((nc, nc))

    def process(self, predicted, targets):
        """Add the top-1 classes `predicted` (n,) of images whose true classes are `targets` (n,)."""
        np.add.at(self.matrix, (_to_numpy(predicted).astype(np.int64), _to_numpy(targets).astype(np.int64)), 1)

    def plot(self, normalize=True, save_dir="", names=(), on_plot=None):
        """Save confusion_matrix(_normalized).png in save_dir; returns its path."""
        from yolotrain.utils.plotting import plot_confusion_matrix

        path = plot_confusion_matrix(self.matrix, normalize, save_dir, names, background=False)
        if on_plot is not None:
            on_plot(path)
        return path


class ConfusionMatrix:
    """Confusion matrix of detections vs ground truths; index nc is "background".

    `matrix[predicted, true]`: a missed ground truth counts in row nc, a false detection in column nc.
    """

    def __init__(self, nc, conf=0.25, iou_thres=0.45):
        self.nc = nc
        self.conf = conf
        self.iou_thres = iou_thres
        self.matrix = np.zeros((nc + 1, nc + 1))

    def process_batch(self, detections, gt_bboxes, gt_cls, overlaps=None):
        """Add one image. detections (n, 6) x1, y1, x2, y2, conf, cls (or None); gt_bboxes (m, 4) xyxy; gt_cls (m,);
        overlaps (m, n), when given, the labels' IoU with the detections in place of their boxes' (rotated boxes).

        Detections below `conf` are dropped; remaining pairs with IoU > `iou_thres` are matched one-to-one
        regardless of class, highest IoU first.
        """
        background = self.nc
        gt_cls = _to_numpy(gt_cls).reshape(-1).astype(np.int64)
        if detections is None or len(detections) == 0:
            np.add.at(self.matrix, (background, gt_cls), 1)
            return
        detections = torch.as_tensor(detections)
        confident = detections[:, 4] > self.conf
        detections = detections[confident]
        det_cls = _to_numpy(detections[:, 5]).astype(np.int64)
        if len(gt_cls) == 0:
            np.add.at(self.matrix, (det_cls, background), 1)
            return
        if overlaps is not None:
            iou = _to_numpy(torch.as_tensor(overlaps)[:, confident].float())
        else:
            iou = _to_numpy(box_iou(torch.as_tensor(gt_bboxes, dtype=torch.float32), detections[:, :4].float()))
        gt_index, det_index = _one_to_one_matches(iou, self.iou_thres)
        np.add.at(self.matrix, (det_cls[det_index], gt_cls[gt_index]), 1)
        missed = np.ones(len(gt_cls), bool)
        missed[gt_index] = False
        np.add.at(self.matrix, (background, gt_cls[missed]), 1)
        spurious = np.ones(len(det_cls), bool)
        spurious[det_index] = False
        np.add.at(self.matrix, (det_cls[spurious], background), 1)

    def tp_fp(self):
        """(tp, fp) per class, background excluded."""
        tp = self.matrix.diagonal()
        fp = self.matrix.sum(1) - tp
        return tp[:-1], fp[:-1]

    def plot(self, normalize=True, save_dir="", names=(), on_plot=None):
        """Save confusion_matrix(_normalized).png in save_dir; returns its path."""
        from yolotrain.utils.plotting import plot_confusion_matrix

        path = plot_confusion_matrix(self.matrix, normalize, save_dir, names)
        if on_plot is not None:
            on_plot(path)
        return path


def _one_to_one_matches(iou, iou_thres):
    """Pairs (gt_index, det_index) above the threshold, each gt and detection used once, highest IoU first."""
    gt_index, det_index = np.nonzero(iou > iou_thres)
    order = np.argsort(-iou[gt_index, det_index], kind="stable")
    gt_index, det_index = gt_index[order], det_index[order]
    # Each detection keeps its best gt, then each gt its best remaining detection (np.unique keeps first hits).
    _, first = np.unique(det_index, return_index=True)
    gt_index, det_index = gt_index[np.sort(first)], det_index[np.sort(first)]
    _, first = np.unique(gt_index, return_index=True)
    return gt_index[np.sort(first)], det_index[np.sort(first)]
