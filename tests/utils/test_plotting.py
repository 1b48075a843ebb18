"""Every plot writes a real, non-blank image, never leaks pyplot figures and copes with empty inputs."""

import cv2
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from yolotrain.utils.metrics import ConfusionMatrix, DetMetrics
from yolotrain.utils.plotting import (
    plot_confusion_matrix,
    plot_images,
    plot_labels,
    plot_mc_curve,
    plot_pr_curve,
    plot_results,
)


@pytest.fixture(autouse=True)
def no_leaked_figures():
    before = set(plt.get_fignums())
    yield
    assert set(plt.get_fignums()) == before


def assert_real_image(path, min_std=3.0):
    """The file decodes as an image and is not a single flat colour."""
    image = cv2.imread(str(path))
    assert image is not None, f"{path} is not a readable image"
    assert image.shape[0] > 20 and image.shape[1] > 20
    assert image.std() > min_std, f"{path} looks blank"
    return image


def test_pr_and_metric_confidence_curves(tmp_path):
    px = np.linspace(0, 1, 1000)
    py = np.stack([1 - px**2, 1 - px])  # 2 classes
    ap = np.array([[0.7] * 10, [0.5] * 10])
    assert_real_image(plot_pr_curve(px, py, ap, tmp_path / "PR_curve.png", {0: "cat", 1: "dog"}))
    path = plot_mc_curve(px, py * px, tmp_path / "F1_curve.png", {0: "cat", 1: "dog"}, ylabel="F1")
    assert_real_image(path)


def test_curves_with_no_classes_and_many_classes(tmp_path):
    px = np.linspace(0, 1, 1000)
    assert_real_image(plot_pr_curve(px, np.zeros((0, 1000)), np.zeros((0, 10)), tmp_path / "empty_pr.png"))
    assert_real_image(plot_mc_curve(px, np.zeros((0, 1000)), tmp_path / "empty_mc.png"))
    many = np.random.default_rng(0).random((40, 1000))
    assert_real_image(plot_mc_curve(px, many, tmp_path / "many.png", {i: str(i) for i in range(40)}))


def test_det_metrics_plots_its_curves(tmp_path):
    seen = []
    metrics = DetMetrics({0: "a", 1: "b"}, plot=True, save_dir=tmp_path, on_plot=seen.append)
    tp = torch.tensor([[True] * 10, [False] * 10, [True] * 10])
    metrics.process(tp, torch.tensor([0.9, 0.6, 0.3]), torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0.0, 1.0, 1.0]))
    names = ["PR_curve.png", "F1_curve.png", "P_curve.png", "R_curve.png"]
    assert [p.name for p in seen] == names
    for name in names:
        assert_real_image(tmp_path / name)


@pytest.mark.parametrize("num_classes", [1, 3, 80])
def test_confusion_matrix_plot(tmp_path, num_classes):
    rng = np.random.default_rng(num_classes)
    matrix = ConfusionMatrix(num_classes)
    for _ in range(5):
        gt = torch.as_tensor(rng.uniform(0, 100, (6, 2)), dtype=torch.float32)
        gt_boxes = torch.cat([gt, gt + 20], 1)
        detections = torch.cat([gt_boxes + 2, torch.full((6, 1), 0.9), torch.randint(0, num_classes, (6, 1))], 1)
        matrix.process_batch(detections, gt_boxes, torch.randint(0, num_classes, (6,)))
    names = {i: f"class{i}" for i in range(num_classes)}
    for normalize in (True, False):
        path = matrix.plot(normalize=normalize, save_dir=tmp_path, names=names)
        assert path.name == ("confusion_matrix_normalized.png" if normalize else "confusion_matrix.png")
        assert_real_image(path)


def test_confusion_matrix_plot_when_empty(tmp_path):
    assert_real_image(plot_confusion_matrix(np.zeros((2, 2)), True, tmp_path, {0: "only"}))


def make_batch(num_images=4, size=64):
    rng = np.random.default_rng(0)
    images = torch.as_tensor(rng.integers(0, 255, (num_images, 3, size, size), dtype=np.uint8))
    batch_idx = torch.tensor([0, 0, 1, 3], dtype=torch.float32)
    cls = torch.tensor([[0.0], [1.0], [2.0], [1.0]])
    bboxes = torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.3, 0.3, 0.2, 0.3], [0.6, 0.4, 0.5, 0.5], [0.5, 0.5, 0.9, 0.9]])
    return images, batch_idx, cls, bboxes


def test_plot_images_draws_label_boxes(tmp_path):
    images, batch_idx, cls, bboxes = make_batch()
    blank = torch.zeros_like(images)  # boxes on black images: any colour in the tiles comes from drawing
    path = plot_images(blank, batch_idx, cls, bboxes, fname=tmp_path / "train_batch0.jpg",
                       names={0: "cat", 1: "dog", 2: "bird"})  # fmt: skip
    mosaic = cv2.imread(str(path))
    assert mosaic.shape[:2] == (128, 128)  # 2 x 2 grid of 64 px tiles
    tile_without_boxes = mosaic[64 + 3 : 128 - 3, 3:61]  # image 2 (bottom left) has no boxes
    tile_with_boxes = mosaic[3:61, 3:61]
    assert tile_with_boxes.std() > 10
    assert path.exists()
    assert tile_without_boxes.max() < 60  # at most JPEG ringing from the neighbours, no box
    assert_real_image(plot_images(images, batch_idx, cls, bboxes, paths=["a.jpg"] * 4, fname=tmp_path / "real.jpg"))


def test_plot_images_predictions_and_empty(tmp_path):
    images, _, _, _ = make_batch(num_images=2)
    predictions = torch.tensor([[5, 5, 40, 40, 0.9], [10, 10, 20, 20, 0.1]])  # second below the draw threshold
    path = plot_images(images, torch.tensor([0, 1]), torch.tensor([0, 1]), predictions, fname=tmp_path / "pred.jpg")
    assert_real_image(path)
    empty = plot_images(images, torch.zeros(0), torch.zeros(0), torch.zeros((0, 4)), fname=tmp_path / "none.jpg")
    assert_real_image(empty)
    floats = plot_images(images.float() / 255, None, None, None, fname=tmp_path / "floats.png")
    assert_real_image(floats)


def test_plot_results(tmp_path):
    csv_path = tmp_path / "results.csv"
    rows = ["epoch, train/box_loss, metrics/mAP50(B), lr/pg0, time"]
    rows += [f"{e}, {2 / e:.4f}, {1 - 1 / e:.4f}, {0.01 * 0.9**e:.5f}, {e * 3.0}" for e in range(1, 11)]
    csv_path.write_text("\n".join(rows) + "\n")
    path = plot_results(csv_path)
    assert path == tmp_path / "results.png"
    assert_real_image(path)
    single = tmp_path / "one" / "results.csv"
    single.parent.mkdir()
    single.write_text(rows[0] + "\n" + rows[1] + "\n")  # one epoch only
    assert_real_image(plot_results(single))


def test_plot_labels(tmp_path):
    rng = np.random.default_rng(0)
    bboxes = np.concatenate([rng.uniform(0.2, 0.8, (50, 2)), rng.uniform(0.05, 0.4, (50, 2))], 1)
    path = plot_labels(rng.integers(0, 3, 50), bboxes, {0: "a", 1: "b", 2: "c"}, tmp_path)
    assert path == tmp_path / "labels.jpg"
    assert_real_image(path)
    empty_dir = tmp_path / "empty"
    assert_real_image(plot_labels(np.zeros(0), np.zeros((0, 4)), {0: "only"}, empty_dir))


@pytest.mark.parametrize("side, corner", [(160, (150, 5)), (160, (2, 80)), (640, (630, 600))])
def test_a_box_label_stays_whole_inside_the_image_and_small_on_small_images(side, corner):
    """At the right edge or the top a label moves inside the image instead of being cut; on a 160 px image its
    text is smaller than a small object (10 px), on a 640 px one it is the usual size."""
    from yolotrain.utils.plotting import draw_label, label_font_scale

    image = np.zeros((side, side, 3), np.uint8)
    scale = label_font_scale(image.shape)
    draw_label(image, "circle 0.93", corner, (0, 0, 255), scale)
    painted = image.any(-1)
    columns, rows = np.flatnonzero(painted.any(0)), np.flatnonzero(painted.any(1))
    (width, height), baseline = cv2.getTextSize("circle 0.93", cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    assert columns[-1] < side and columns[-1] - columns[0] + 1 == width + 2  # the whole label box, not cut
    assert rows[-1] - rows[0] + 1 == height + baseline + 3
    assert (height < 10) == (side == 160)
    background = image[rows[0], columns[0]]
    assert tuple(background) == (0, 0, 255)  # text on a filled box: legible whatever the image colours


def test_batch_plots_draw_each_objects_outline_in_its_class_colour(tmp_path):
    """A rotated box's corners (or a polygon) are drawn closed: the middle of each side is in the class colour, the
    middle of the box stays the image's (labels normalised, predictions in pixels above the score threshold)."""
    import cv2
    import torch

    from yolotrain.utils.plotting import class_colour, plot_images

    images = torch.zeros(2, 3, 100, 100, dtype=torch.uint8)
    diamond = torch.tensor([[50.0, 20.0], [80.0, 50.0], [50.0, 80.0], [20.0, 50.0]])
    labels = plot_images(images, torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([[0.5, 0.5, 0.6, 0.6]]),
                         fname=tmp_path / "labels.jpg", outlines=(diamond / 100)[None], max_size=200)
    predictions = plot_images(images, torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]),
                              torch.tensor([[20.0, 20.0, 80.0, 80.0, 0.9], [20.0, 20.0, 80.0, 80.0, 0.01]]),
                              fname=tmp_path / "predictions.jpg", outlines=torch.stack([diamond, diamond + 5]),
                              max_size=200)
    colour = np.array(class_colour(1, bgr=True))
    label_tile = cv2.imread(str(labels))[:100, :100].astype(int)
    prediction_tile = cv2.imread(str(predictions))[:100, 100:200].astype(int)
    def nearest(tile, y, x, bgr):  # the closest colour around a point (lines are thin, smoothed and compressed)
        return np.abs(tile[y - 1 : y + 2, x - 1 : x + 2] - bgr).max(-1).min()

    for tile in (label_tile, prediction_tile):
        assert nearest(tile, 35, 35, colour) < 100  # the middle of the upper-left side (black would be 235 off)
        assert tile[50, 50].max() < 40  # inside: untouched
    assert prediction_tile[38:43, 38:43].max() < 40  # the second box, under the score threshold: not drawn
