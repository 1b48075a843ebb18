"""Plots written to disk during training and validation: metric curves, confusion matrix, image mosaics with
boxes, training results and label statistics.

Figures are built with matplotlib's object API (`matplotlib.figure.Figure`) rather than pyplot, so nothing is
registered with pyplot's global figure manager (no leaked figures, no GUI backend needed, and the user's own
backend choice is left untouched). Box drawing on images uses OpenCV for speed.
"""

import csv
import logging
import math
from pathlib import Path

import cv2
import numpy as np
import torch

from yolotrain.utils.boxes import xywhn2xyxy

LOGGER = logging.getLogger(__name__)

# Distinct, colour-blind-friendly-ish colours (RGB) cycled by class id.
CLASS_COLOURS_HEX = (
    "042AFF", "0BDBEB", "FF8000", "00DFB7", "111F68", "FF6FDD", "FF444F", "CCED00", "00F344", "BD00FF",
    "00B4FF", "DD00BA", "00FFFF", "26C000", "01FFB3", "7D24FF", "7B0068", "FF1B6C", "FC6D2F", "A2FF0B",
)  # fmt: skip
# Classes shown individually in curve legends; more than this and only the mean is labelled.
MAX_LEGEND_CLASSES = 20
# Confidence below which predicted boxes are not drawn on image mosaics.
PLOT_CONF_THRES = 0.25


LABEL_FONT_MIN = 0.3  # smallest legible OpenCV font scale
LABEL_FONT_REFERENCE_PX = 640  # image side at which box labels use font scale 0.5
LABEL_BOLD_FROM = 0.6  # font scales from here on are drawn 2 px thick


def label_font_scale(image_shape):
    """OpenCV font scale for box labels on an image of (h, w, ...): 0.5 at 640 px, never below 0.3, so a label on a
    small image stays about the size of a small object instead of covering it."""
    return max(LABEL_FONT_MIN, min(image_shape[:2]) / LABEL_FONT_REFERENCE_PX * 0.5)


def draw_label(image, text, corner, colour, scale):
    """Write `text` in white on a filled `colour` box at `corner` (x, y): above the point when there is room, else
    below it, and shifted left to stay inside the image (legible on any colour, never cut at the edge)."""
    thickness = 1 if scale < LABEL_BOLD_FROM else 2
    (width, height), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    x, y = int(corner[0]), int(corner[1])
    x = max(min(x, image.shape[1] - width - 2), 0)  # the box spans x .. x + width + 1
    top = y - height - baseline - 2 if y - height - baseline - 2 >= 0 else y
    cv2.rectangle(image, (x, top), (x + width + 1, top + height + baseline + 2), colour, -1)
    cv2.putText(image, text, (x + 1, top + height + 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness,
                cv2.LINE_AA)


def class_colour(class_id, bgr=False):
    """(r, g, b) ints for a class id, or (b, g, r) for OpenCV."""
    hex_code = CLASS_COLOURS_HEX[int(class_id) % len(CLASS_COLOURS_HEX)]
    rgb = tuple(int(hex_code[i : i + 2], 16) for i in (0, 2, 4))
    return rgb[::-1] if bgr else rgb


def _new_figure(width, height):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), tight_layout=True)


def _save(fig, path, dpi=200):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _class_name(names, class_id):
    if isinstance(names, dict):
        return str(names.get(int(class_id), int(class_id)))
    names = list(names or [])
    return str(names[int(class_id)]) if 0 <= int(class_id) < len(names) else str(int(class_id))


def plot_pr_curve(px, py, ap, save_path, names=()):
    """Precision-recall curve at IoU 0.5. px (K,) recall, py (nc, K) precision, ap (nc, T) with AP50 in column 0;
    names maps the row index to a class name. Returns the saved path."""
    py, ap = np.asarray(py).reshape(-1, len(px)), np.asarray(ap)
    ap = ap[:, None] if ap.ndim == 1 else ap  # accept AP50 alone as well as (nc, T)
    fig = _new_figure(9, 6)
    ax = fig.add_subplot()
    show_legend_per_class = 0 < len(py) <= MAX_LEGEND_CLASSES
    for i, precision in enumerate(py):
        label = f"{_class_name(names, i)} {ap[i, 0]:.3f}" if show_legend_per_class else None
        ax.plot(px, precision, linewidth=1, label=label, color="grey" if not show_legend_per_class else None)
    if len(py):
        ax.plot(px, py.mean(0), linewidth=3, color="blue", label=f"all classes {ap[:, 0].mean():.3f} mAP@0.5")
    _finish_axes(ax, "Recall", "Precision", "Precision-Recall Curve")
    return _save(fig, save_path)


def plot_mc_curve(px, py, save_path, names=(), xlabel="Confidence", ylabel="Metric"):
    """Metric-confidence curve (F1, precision or recall vs confidence). px (K,), py (nc, K). Returns the path."""
    from yolotrain.utils.metrics import smooth

    py = np.asarray(py).reshape(-1, len(px))
    fig = _new_figure(9, 6)
    ax = fig.add_subplot()
    show_legend_per_class = 0 < len(py) <= MAX_LEGEND_CLASSES
    for i, values in enumerate(py):
        label = _class_name(names, i) if show_legend_per_class else None
        ax.plot(px, values, linewidth=1, label=label, color="grey" if not show_legend_per_class else None)
    if len(py):
        mean = smooth(py.mean(0), 0.05)
        best = mean.argmax()
        ax.plot(px, mean, linewidth=3, color="blue", label=f"all classes {mean[best]:.2f} at {px[best]:.3f}")
    _finish_axes(ax, xlabel, ylabel, f"{ylabel}-{xlabel} Curve")
    return _save(fig, save_path)


def _finish_axes(ax, xlabel, ylabel, title):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left")


def plot_confusion_matrix(matrix, normalize=True, save_dir="", names=(), background=True):
    """Heatmap of an (nc + 1, nc + 1) confusion matrix (rows predicted, columns true, last = background), or
    without `background` of an (nc, nc) one (classification). With normalize, each true-class column sums to 1.
    Returns the saved path."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if normalize:
        matrix = matrix / (matrix.sum(0, keepdims=True) + 1e-9)
    num_classes = matrix.shape[0] - int(background)
    labels = [_class_name(names, i) for i in range(num_classes)] + (["background"] if background else [])
    side = min(max(6.0, 0.12 * (num_classes + 1) + 5), 16.0)  # 80 classes: ~15 in, labels still legible
    fig = _new_figure(side * 1.15, side)
    ax = fig.add_subplot()
    shown = np.where(matrix < 0.005, np.nan, matrix) if normalize else matrix
    image = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    font_size = 10 if num_classes < 30 else max(4, int(500 / (num_classes + 1)))
    ticks = np.arange(len(labels))
    ax.set_xticks(ticks, labels, rotation=90, fontsize=font_size)
    ax.set_yticks(ticks, labels, fontsize=font_size)
    if num_classes < 30:  # cell values are readable only for modest class counts
        for (row, col), value in np.ndenumerate(matrix):
            if value >= 0.005:
                text = f"{value:.2f}" if normalize else f"{int(value)}"
                ax.text(col, row, text, ha="center", va="center", fontsize=8,
                        color="white" if value > 0.5 * np.nanmax(matrix) else "black")  # fmt: skip
    ax.set_xlabel("True")
    ax.set_ylabel("Predicted")
    ax.set_title("Confusion Matrix" + (" Normalized" if normalize else ""))
    suffix = "_normalized" if normalize else ""
    return _save(fig, Path(save_dir) / f"confusion_matrix{suffix}.png", dpi=120)


def _to_numpy(x):
    if x is None:
        return None
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def plot_images(
    images,
    batch_idx,
    cls,
    bboxes,
    paths=None,
    fname="images.jpg",
    names=None,
    max_subplots=16,
    max_size=1920,
    conf_thres=PLOT_CONF_THRES,
    titles=None,
    keypoints=None,
    outlines=None,
):
    """Save a mosaic of a batch with its boxes and class labels; each tile is titled with its file name (`paths`)
    or with `titles[i]`.

    images (B, 3, H, W) uint8 RGB (tensor or array; floats in [0, 1] are scaled); batch_idx (N,) image index of
    each box; cls (N,) or (N, 1); bboxes either (N, 4) normalised xywh (labels) or (N, 5) pixel xyxy + conf in the
    batch image (predictions; boxes below conf_thres are skipped); keypoints (N, K, 2 | 3) of each box, and
    outlines (N, P, 2) (a rotated box's corners, an object's polygon), drawn closed in the class colour: both
    normalised for labels, batch-image pixels for predictions. Returns the saved path.
    """
    images = _to_numpy(images)
    if images.dtype != np.uint8:
        images = (images * 255 if images.max() <= 1.0 else images).clip(0, 255).astype(np.uint8)
    images = images[:max_subplots]
    num_images, _, height, width = images.shape
    grid = math.ceil(num_images**0.5) if num_images else 1
    rows = max(1, math.ceil(num_images / grid))
    scale = min(1.0, max_size / max(height, width) / grid)
    tile_h, tile_w = max(1, int(height * scale)), max(1, int(width * scale))
    mosaic = np.full((rows * tile_h, grid * tile_w, 3), 255, dtype=np.uint8)  # BGR canvas
    batch_idx, cls, bboxes = _to_numpy(batch_idx), _to_numpy(cls), _to_numpy(bboxes)
    cls = np.zeros(0) if cls is None else cls.reshape(-1)
    bboxes = np.zeros((0, 4)) if bboxes is None or len(cls) == 0 else bboxes.reshape(len(cls), -1)
    line = max(1, round(min(tile_h, tile_w) / 200))
    for i in range(num_images):  # one tile per image; drawing needs OpenCV calls per box anyway
        top, left = (i // grid) * tile_h, (i % grid) * tile_w
        tile = cv2.resize(np.ascontiguousarray(images[i].transpose(1, 2, 0)[..., ::-1]), (tile_w, tile_h))
        in_image = batch_idx.reshape(-1) == i if batch_idx is not None else np.zeros(len(cls), bool)
        _draw_boxes(tile, cls[in_image], bboxes[in_image], (height, width), scale, names, line, conf_thres)
        if keypoints is not None and len(cls):
            _draw_tile_keypoints(tile, _to_numpy(keypoints)[in_image], bboxes[in_image], (height, width), scale,
                                 line, conf_thres)
        if outlines is not None and len(cls):
            _draw_tile_outlines(tile, _to_numpy(outlines)[in_image], cls[in_image], bboxes[in_image],
                                (height, width), scale, line, conf_thres)
        title = titles[i] if titles is not None else Path(paths[i]).name if paths is not None and i < len(paths) else None
        if title:
            cv2.putText(tile, title[:40], (3, 12 * line), 0, line / 3, (220, 220, 220), line, cv2.LINE_AA)
        cv2.rectangle(tile, (0, 0), (tile_w - 1, tile_h - 1), (255, 255, 255), line)
        mosaic[top : top + tile_h, left : left + tile_w] = tile
    path = Path(fname)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), mosaic)
    return path


def plot_classified_images(images, classes, names, fname, scores=None, max_subplots=16):
    """Save a mosaic of images (B, 3, H, W) uint8 RGB, each titled with its class (and score, for predictions)."""
    titles = [_class_name(names, int(c)) + (f" {float(scores[i]):.2f}" if scores is not None else "")
              for i, c in enumerate(_to_numpy(classes).reshape(-1)[:max_subplots])]
    return plot_images(images, None, None, None, fname=fname, max_subplots=max_subplots, titles=titles)


def _draw_boxes(tile, cls, bboxes, image_shape, scale, names, line, conf_thres):
    """Draw boxes and labels on one BGR tile in place. bboxes (n, 4) normalised xywh or (n, 5) xyxy + conf."""
    if len(cls) == 0:
        return
    is_prediction = bboxes.shape[1] == 5
    if is_prediction:
        keep = bboxes[:, 4] > conf_thres
        cls, conf, corners = cls[keep], bboxes[keep, 4], bboxes[keep, :4] * scale
    else:
        conf, corners = None, xywhn2xyxy(bboxes[:, :4].astype(np.float64), image_shape[1], image_shape[0]) * scale
    scale = label_font_scale(tile.shape) * 0.8  # tiles are small: labels a little smaller still
    for j, (box, class_id) in enumerate(zip(corners.round().astype(int), cls)):
        colour = class_colour(class_id, bgr=True)
        cv2.rectangle(tile, (box[0], box[1]), (box[2], box[3]), colour, line, cv2.LINE_AA)
        label = _class_name(names, class_id) + (f" {conf[j]:.2f}" if conf is not None else "")
        draw_label(tile, label, (box[0], box[1]), colour, scale)


def _draw_tile_keypoints(tile, keypoints, bboxes, image_shape, scale, line, conf_thres):
    """Keypoints of one tile's boxes: normalised for labels (4-column boxes), pixels for predictions (5 columns,
    those under conf_thres skipped)."""
    points = keypoints.astype(np.float64).copy()
    if bboxes.shape[1] == 5:
        points = points[bboxes[:, 4] > conf_thres]
    else:
        points[..., :2] *= (image_shape[1], image_shape[0])
    points[..., :2] *= scale
    draw_keypoints(tile, points, line)


def _draw_tile_outlines(tile, outlines, cls, bboxes, image_shape, scale, line, conf_thres):
    """Closed outlines of one tile's objects in their class colours: normalised for labels (4-column boxes), pixels
    for predictions (5 columns, those under conf_thres skipped)."""
    points = outlines.astype(np.float64)[..., :2].copy()
    if bboxes.shape[1] == 5:
        keep = bboxes[:, 4] > conf_thres
        points, cls = points[keep], cls[keep]
    else:
        points *= (image_shape[1], image_shape[0])
    for outline, c in zip(np.round(points * scale).astype(np.int32), cls):  # OpenCV draws one polyline per call
        cv2.polylines(tile, [outline], True, class_colour(int(c), bgr=True), line, cv2.LINE_AA)


def _read_results_csv(csv_path):
    """{column name (stripped): float array} from a results.csv."""
    with open(csv_path, newline="") as file:
        rows = list(csv.reader(file))
    header = [name.strip() for name in rows[0]] if rows else []
    values = np.array([[_as_float(v) for v in row] for row in rows[1:] if row], dtype=np.float64)
    values = values.reshape(-1, len(header))
    return {name: values[:, i] for i, name in enumerate(header)}


def _as_float(text):
    try:
        return float(text)
    except ValueError:
        return float("nan")


def plot_results(csv_path, save_path=None):
    """results.png next to results.csv: every column except epoch/time against epoch, with a smoothed line.
    Returns the saved path."""
    from yolotrain.utils.metrics import smooth

    columns = _read_results_csv(csv_path)
    epochs = columns.get("epoch")
    series = {name: values for name, values in columns.items() if name not in ("epoch", "time")}
    if epochs is None:
        epochs = np.arange(1, len(next(iter(series.values()), [])) + 1, dtype=np.float64)
    num_cols = 5
    num_rows = max(1, math.ceil(len(series) / num_cols))
    fig = _new_figure(3 * num_cols, 2.8 * num_rows)
    for i, (name, values) in enumerate(series.items()):
        ax = fig.add_subplot(num_rows, num_cols, i + 1)
        ax.plot(epochs, values, marker=".", linewidth=2, markersize=8, label="results")
        finite = np.isfinite(values)
        if finite.sum() > 2:
            ax.plot(epochs[finite], smooth(values[finite], 0.1), ":", linewidth=2, label="smooth")
        ax.set_title(name, fontsize=10)
    if series:
        fig.axes[0].legend(fontsize=8)
    path = Path(save_path) if save_path else Path(csv_path).with_name("results.png")
    return _save(fig, path)


def plot_labels(cls, bboxes, names=(), save_dir=""):
    """labels.jpg: class histogram, box-centre and width-height 2D histograms of a label set.
    cls (N,), bboxes (N, 4) normalised xywh. Returns the saved path."""
    cls = _to_numpy(cls).reshape(-1).astype(np.int64)
    bboxes = _to_numpy(bboxes).reshape(-1, 4).astype(np.float64)
    num_classes = max(len(names) if names is not None else 0, int(cls.max()) + 1 if len(cls) else 1)
    fig = _new_figure(12, 9)
    axes = [fig.add_subplot(2, 2, i + 1) for i in range(4)]
    counts = np.bincount(cls, minlength=num_classes)
    axes[0].bar(np.arange(num_classes), counts, color=[np.array(class_colour(c)) / 255 for c in range(num_classes)])
    axes[0].set_ylabel("instances")
    if num_classes <= 30:
        axes[0].set_xticks(np.arange(num_classes), [_class_name(names, c) for c in range(num_classes)],
                           rotation=90, fontsize=8)  # fmt: skip
    _hist2d(axes[1], bboxes[:, 0], bboxes[:, 1], "x", "y")
    _hist2d(axes[2], bboxes[:, 2], bboxes[:, 3], "width", "height")
    _draw_box_outlines(axes[3], cls, bboxes)
    return _save(fig, Path(save_dir) / "labels.jpg")


def _hist2d(ax, x, y, xlabel, ylabel):
    ax.hist2d(x, y, bins=50, range=[[0, 1], [0, 1]], cmap="Blues", cmin=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def _draw_box_outlines(ax, cls, bboxes, max_boxes=1000):
    """Up to max_boxes label boxes centred on one canvas, to show the size/aspect distribution."""
    canvas = np.full((500, 500, 3), 255, dtype=np.uint8)
    half_sizes = (bboxes[:max_boxes, 2:] * 250).round().astype(int)
    for (half_w, half_h), class_id in zip(half_sizes, cls[:max_boxes]):
        cv2.rectangle(canvas, (250 - half_w, 250 - half_h), (250 + half_w, 250 + half_h), class_colour(class_id), 1)
    ax.imshow(canvas)
    ax.axis("off")



def plot_tune_results(csv_path, save_path=None):
    """tune_scatter_plots.png next to tune_results.csv: fitness against each tuned value, one panel per value,
    points coloured by trial order and the best trial starred; choices that are not numbers are spread along the
    axis in order of appearance. Failed trials (no fitness) are left out. Returns the saved path."""
    with open(csv_path, newline="") as file:
        rows = list(csv.DictReader(file))
    names = [name for name in (rows[0] if rows else {}) if name not in ("trial", "state", "fitness")]
    rows = [row for row in rows if math.isfinite(_as_float(row["fitness"]))]
    fitness = np.array([float(row["fitness"]) for row in rows], dtype=np.float64)
    best = int(np.argmax(fitness)) if len(fitness) else None
    num_cols = min(5, max(1, len(names)))
    num_rows = max(1, math.ceil(len(names) / num_cols))
    fig = _new_figure(3 * num_cols, 2.8 * num_rows)
    for i, name in enumerate(names):
        ax = fig.add_subplot(num_rows, num_cols, i + 1)
        texts = [row[name] for row in rows]
        values = np.array([_as_float(text) for text in texts], dtype=np.float64)
        if not np.isfinite(values).all():  # choices such as optimizer names: one position per choice
            labels = list(dict.fromkeys(texts))
            values = np.array([labels.index(text) for text in texts], dtype=np.float64)
            ax.set_xticks(np.arange(len(labels)), labels, rotation=45, fontsize=8)
        ax.scatter(values, fitness, c=np.arange(len(values)), cmap="viridis", s=12, alpha=0.8)
        if best is not None:
            ax.plot(values[best], fitness[best], "r*", markersize=12)
        ax.set_title(name if best is None else f"{name} = {_short(texts[best])}", fontsize=10)
        if i % num_cols == 0:
            ax.set_ylabel("fitness")
    path = Path(save_path) if save_path else Path(csv_path).with_name("tune_scatter_plots.png")
    return _save(fig, path)


def _short(text):
    """A csv value for a title: numbers to 3 significant digits, anything else as written."""
    value = _as_float(text)
    return f"{value:.3g}" if math.isfinite(value) else text


KEYPOINT_VISIBLE = 0.5  # a predicted keypoint's visibility from which it is drawn (and reported)
# COCO's person skeleton: the limbs joining its 17 keypoints (0-based), drawn for person-keypoint models.
PERSON_KEYPOINTS = 17
PERSON_SKELETON = ((15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8),
                   (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6))


MASK_ALPHA = 0.5  # how much of a masked pixel's colour is its class colour


def draw_masks(image, masks, classes):
    """Blend (n, H, W) masks onto a BGR image of that size in place, each in its class colour; where masks
    overlap, the earlier (more confident) one is on top."""
    if len(masks) == 0:
        return
    colours = np.array([class_colour(c, bgr=True) for c in classes], np.float32)  # (n, 3)
    masks = np.asarray(masks, bool)
    owner = masks.argmax(0)  # the first mask covering each pixel
    covered = masks.any(0)
    overlay = colours[owner[covered]]
    image[covered] = (image[covered] * (1 - MASK_ALPHA) + overlay * MASK_ALPHA).astype(np.uint8)


def draw_keypoints(image, keypoints, line):
    """Draw (n, K, 2 | 3) pixel keypoints on a BGR image in place: a dot per seen point (visibility >= 0.5, or all
    without visibility), each keypoint index in its own colour, and the limbs of the person skeleton for K = 17."""
    radius = max(line, 2)
    for points in keypoints:
        seen = points[:, 2] >= KEYPOINT_VISIBLE if points.shape[1] == 3 else np.ones(len(points), bool)
        if len(points) == PERSON_KEYPOINTS:
            for a, b in PERSON_SKELETON:
                if seen[a] and seen[b]:
                    cv2.line(image, tuple(int(v) for v in points[a, :2]), tuple(int(v) for v in points[b, :2]),
                             class_colour(a, bgr=True), max(line // 2, 1), cv2.LINE_AA)
        for k in np.flatnonzero(seen):
            cv2.circle(image, tuple(int(v) for v in points[k, :2]), radius, class_colour(int(k), bgr=True), -1,
                       cv2.LINE_AA)
