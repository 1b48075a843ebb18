"""Segmentation masks and their metrics: polygons stacked and drawn, masks back to polygons, mask IoU and mask AP by
hand, COCO run-length encoding, and mask mAP equal to pycocotools' `segm` evaluation of the same masks."""

import numpy as np
import pytest
import torch

from coco_reference import cocoeval_stats
from yolotrain.tasks.segment.val import SegmentationValidator
from yolotrain.utils.masks import (crop_to_boxes, mask_iou, mask_share_in_boxes, mask_to_polygon, mask_to_rle,
                                   masks_in_image, polygons_to_index_mask, polygons_to_masks, stack_polygons)
from yolotrain.utils.metrics import SegmentMetrics

SQUARE = np.array([[2, 2], [10, 2], [10, 6], [2, 6]], np.float32)  # 8 x 4 pixels
TRIANGLE = np.array([[0, 0], [6, 0], [0, 6]], np.float32)


# ---------------------------------------------------------------------------------------------------- polygons
def test_stacked_polygons_keep_every_corner_and_add_points_on_the_edges():
    stacked = stack_polygons([SQUARE, TRIANGLE], 24)
    assert stacked.shape == (2, 24, 2)
    for polygon, outline in zip((SQUARE, TRIANGLE), stacked):
        assert all((outline == corner).all(1).any() for corner in polygon)  # every corner is kept
        # every point lies on the outline: on one of the polygon's edges
        a, b = polygon, np.roll(polygon, -1, 0)
        cross = np.abs((b - a)[None, :, 0] * (outline[:, None, 1] - a[None, :, 1])
                       - (b - a)[None, :, 1] * (outline[:, None, 0] - a[None, :, 0]))
        assert (cross.min(1) < 1e-4).all()
    exact = stack_polygons([SQUARE, TRIANGLE])  # no count: the most corners, the shorter one padded
    assert exact.shape == (2, 4, 2) and (exact[1, 3] == TRIANGLE[2]).all()
    dense, plain = polygons_to_masks(stacked, (12, 12)), polygons_to_masks(exact, (12, 12))
    assert (dense[0] == plain[0]).all()  # axis-aligned edges: the same pixels
    # a diagonal edge through pixel centres may take or leave those centres: only pixels on it differ
    differ = np.argwhere(dense[1] != plain[1])
    assert len(differ) <= 4 and (np.abs(differ.sum(1) + 1 - 6) <= 1).all()


def test_a_polygon_is_drawn_on_the_pixels_it_covers():
    (mask,) = polygons_to_masks(stack_polygons([SQUARE]), (12, 12))
    rows, columns = np.nonzero(mask)
    # pixels whose centre is inside, plus at most the half-pixel border the rasteriser adds
    assert set(rows) <= set(range(2, 7)) and set(columns) <= set(range(2, 11)) and mask[2:6, 2:10].all()


def test_an_index_mask_draws_larger_objects_first():
    big = np.array([[0, 0], [12, 0], [12, 12], [0, 12]], np.float32)
    index_mask, order = polygons_to_index_mask(stack_polygons([SQUARE, big]), (12, 12))
    assert order.tolist() == [1, 0]  # the big one first: slot 1
    assert index_mask[4, 4] == 2 and index_mask[10, 10] == 1  # the small square stays on top


def test_mask_to_polygon_to_mask_is_exact():
    yy, xx = np.mgrid[:40, :50]
    mask = (((yy - 20) / 12.0) ** 2 + ((xx - 24) / 17.0) ** 2 <= 1).astype(np.uint8)  # one region
    mask[18:22, 5:45] = 1  # with thin arms
    outline = mask_to_polygon(mask)
    assert (polygons_to_masks(outline[None], mask.shape)[0] == mask).all()


def test_a_polygon_drawn_and_traced_keeps_its_shape():
    rng = np.random.default_rng(3)
    polygon = _blob(rng, (48, 48), 30, corners=12)
    (mask,) = polygons_to_masks(stack_polygons([polygon]), (SIZE, SIZE))
    traced = mask_to_polygon(mask)
    (redrawn,) = polygons_to_masks(stack_polygons([traced]), (SIZE, SIZE))
    assert (redrawn & mask).sum() / (redrawn | mask).sum() > 0.97


# -------------------------------------------------------------------------------------------------- IoU and AP
def test_mask_iou_by_hand():
    a = torch.zeros(2, 4, 4, dtype=torch.bool)
    a[0, :2, :2] = True  # 4 pixels
    a[1, :, :] = True  # 16 pixels
    b = torch.zeros(1, 4, 4, dtype=torch.bool)
    b[0, :2, :] = True  # 8 pixels, 4 shared with a[0], 8 with a[1]
    assert mask_iou(a, b).tolist() == [[0.5], [0.5]]
    assert mask_iou(a[:0], b).shape == (0, 1)


def test_predicted_masks_are_cropped_to_their_box_and_brought_to_the_image():
    protos = torch.full((1, 8, 8), 5.0)  # every logit positive
    boxes = torch.tensor([[4.0, 4.0, 12.0, 8.0]])  # in the 16 x 16 original image
    # network input 8 x 8 made from the 16 x 16 image at gain 0.5, no padding
    masks = masks_in_image(torch.ones(1, 1), protos, boxes, (8, 8), ((0.5, 0.5), (0.0, 0.0)), (16, 16))
    assert masks.shape == (1, 16, 16) and masks[0].sum() == 8 * 4 and masks[0, 4:8, 4:12].all()
    cropped = crop_to_boxes(torch.ones(1, 4, 4), torch.tensor([[1.0, 1.0, 3.0, 2.0]]))
    assert cropped[0].nonzero().tolist() == [[1, 1], [1, 2]]


def test_mask_ap_by_hand():
    """Two labels of class 0; detections: a good mask (IoU 0.9), then a poor one (IoU 0.3 with the other label).
    Mask AP50: recall reaches 0.5 at precision 1, so AP50 = 0.5 (101-point interpolation)."""
    metrics = SegmentMetrics(names={0: "a"})
    tp_box = np.ones((2, 10), bool)
    tp_mask = np.zeros((2, 10), bool)
    tp_mask[0, :9] = True  # IoU 0.9: a match at 0.50 ... 0.90
    metrics.process(tp_box, np.array([0.9, 0.8]), np.array([0, 0]), np.array([0, 0]), tp_mask, np.array([0, 0]))
    assert metrics.seg.map50 == pytest.approx(0.5, abs=0.01)
    assert metrics.box.map50 == pytest.approx(1.0, abs=0.01)
    assert metrics["metrics/mAP50(M)"] == metrics.seg.map50
    assert metrics.fitness == pytest.approx(metrics.box.fitness() + metrics.seg.fitness())


def test_run_length_encoding_is_cocos():
    mask_utils = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(1)
    for shape in [(1, 1), (7, 5), (64, 48)]:
        for fill in (0.0, 0.3, 1.0):
            mask = (rng.random(shape) < fill).astype(np.uint8)
            theirs = mask_utils.encode(np.asfortranarray(mask))
            ours = mask_to_rle(mask)
            assert ours["counts"] == theirs["counts"].decode() and ours["size"] == list(shape)
            assert (mask_utils.decode(ours) == mask).all()


# ------------------------------------------------------------------------------- equality with pycocotools segm
SIZE = 96


def _blob(rng, centre, radius, corners=9):
    angles = np.sort(rng.uniform(0, 2 * np.pi, corners))
    radii = radius * rng.uniform(0.6, 1.0, corners)
    return np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], 1).clip(0, SIZE)


def _synthetic_segment_images(seed, num_images=16):
    """Per image: label polygons and classes, and detections whose masks are given exactly through prototypes:
    prototype k is +8 on detection k's own blob and -8 elsewhere, detection k has coefficient 1 on it."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(num_images):
        m = int(rng.integers(1, 5))
        centres = rng.uniform(20, SIZE - 20, (m, 2))
        labels = [_blob(rng, c, rng.uniform(8, 18)) for c in centres]
        cls = rng.integers(0, 2, m)
        found = rng.random(m) < 0.8
        # a found object's mask: its outline moved, grown or shrunk and its corners jittered by a few pixels
        preds = [((label - c) * rng.uniform(0.8, 1.2) + c + rng.normal(0, 1.5, 2) + rng.normal(0, 1.0, label.shape))
                 .clip(0, SIZE) for label, c, f in zip(labels, centres, found) if f]
        pred_cls = list(np.where(rng.random(found.sum()) < 0.9, cls[found], 1 - cls[found]))
        for _ in range(int(rng.integers(0, 3)) + (12 if index == 0 else 0)):  # false positives
            preds.append(_blob(rng, rng.uniform(15, SIZE - 15, 2), rng.uniform(5, 12)))
            pred_cls.append(int(rng.integers(0, 2)))
        images.append((labels, cls, preds, np.array(pred_cls), rng.uniform(0.01, 1, len(preds))))
    return images


class _RecordingValidator(SegmentationValidator):
    """Records the label masks it draws, for the reference evaluator to read the same ones."""

    def label_masks(self, outlines, image_hw):
        masks = super().label_masks(outlines, image_hw)
        self.recorded.append(masks.numpy())
        return masks


def _our_mask_metrics(images, save_json=True):
    validator = _RecordingValidator(args={"save_json": save_json, "plots": False})
    validator.recorded = []
    validator.names, validator.nc, validator.device = {0: "a", 1: "b"}, 2, torch.device("cpu")
    validator.metrics = SegmentMetrics(names=validator.names)
    validator.plot_stats, validator.training = False, False
    validator.reset()
    for position, (labels, cls, preds, pred_cls, scores) in enumerate(images):
        n = len(preds)
        order = np.argsort(-scores, kind="stable")
        protos = torch.full((max(n, 1), SIZE, SIZE), -8.0)
        boxes = torch.zeros(n, 4)
        for k, slot in enumerate(order):  # prototype k: detection k's blob (in confidence order)
            protos[k][torch.from_numpy(polygons_to_masks(stack_polygons([preds[slot]]), (SIZE, SIZE))[0] > 0)] = 8.0
            boxes[k] = torch.tensor([*preds[slot].min(0), *preds[slot].max(0)])
        detections = torch.cat([boxes, torch.tensor(scores[order], dtype=torch.float32)[:, None],
                                torch.tensor(pred_cls[order], dtype=torch.float32)[:, None],
                                torch.eye(n, max(n, 1))], 1)
        outlines = stack_polygons([p / SIZE for p in labels])
        extent = np.concatenate([outlines.min(1), outlines.max(1)], 1)
        xywhn = np.concatenate([(extent[:, :2] + extent[:, 2:]) / 2, extent[:, 2:] - extent[:, :2]], 1)
        batch = {"img": torch.zeros(1, 3, SIZE, SIZE), "batch_idx": torch.zeros(len(labels)),
                 "cls": torch.tensor(cls[:, None], dtype=torch.float32), "bboxes": torch.tensor(xywhn).float(),
                 "segments": torch.from_numpy(outlines), "ratio_pad": [((1.0, 1.0), (0.0, 0.0))],
                 "ori_shape": [(SIZE, SIZE)], "im_file": [f"{position + 1}.png"]}
        validator.batch_position = position
        validator._protos = protos[None]
        validator.num_masks = protos.shape[0]
        validator.update([detections], batch)
    validator.compute()
    return validator


def _pycocotools_mask_map(images, validator):
    from pycocotools import mask as mask_utils

    annotations = []
    for image_id, ((_, cls, *_), masks) in enumerate(zip(images, validator.recorded), start=1):
        for c, mask in zip(cls, masks):
            rle = mask_utils.encode(np.asfortranarray(mask))
            rle["counts"] = rle["counts"].decode()
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(c),
                                "segmentation": rle, "area": float(mask_utils.area(rle)), "iscrowd": 0,
                                "bbox": [float(v) for v in mask_utils.toBbox(rle)]})
    detections = validator.coco_predictions()
    for detection in detections:
        detection["image_id"] = int(detection["image_id"])
    ground_truth = {"images": [{"id": i, "height": SIZE, "width": SIZE} for i in range(1, len(images) + 1)],
                    "annotations": annotations, "categories": [{"id": 0, "name": "a"}, {"id": 1, "name": "b"}]}
    return cocoeval_stats(ground_truth, detections, "segm")


@pytest.mark.numeric
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_map_equals_pycocotools_segm(seed):
    pytest.importorskip("pycocotools")
    images = _synthetic_segment_images(seed)
    ours = _our_mask_metrics(images)
    theirs = _pycocotools_mask_map(images, ours)
    metrics = ours.metrics
    assert metrics.seg.map == pytest.approx(theirs[0], abs=1e-4)
    assert metrics.seg.map50 == pytest.approx(theirs[1], abs=1e-4)
    assert 0.05 < metrics.seg.map < 0.95 and metrics.seg.map != pytest.approx(metrics.box.map, abs=1e-3)


@pytest.mark.parametrize("seed", [0, 1])
def test_masks_skipped_by_their_bound_change_no_match(seed):
    """Without save_json only the detections whose box holds half a label mask of their class get masks made: the
    matches (every threshold) equal those of comparing every mask, as save_json does."""
    images = _synthetic_segment_images(seed)
    every = _our_mask_metrics(images, save_json=True).metrics
    bounded = _our_mask_metrics(images, save_json=False).metrics
    assert bounded.seg.all_ap.tolist() == every.seg.all_ap.tolist()
    assert bounded.seg.map > 0.05


def test_mask_share_in_boxes_by_hand():
    masks = torch.zeros(2, 6, 8, dtype=torch.bool)
    masks[0, 1:3, 2:6] = True  # 8 pixels: rows 1-2, columns 2-5
    # box 0 holds the centres of columns 2-3 (2.5, 3.5) and rows 0-5: half of mask 0; box 1 holds none of it
    # (column 6's centre 6.5 is not below 6.5); box 2 is degenerate
    boxes = torch.tensor([[2.5, 0.0, 4.0, 6.0], [5.9, 0.0, 6.5, 6.0], [3.0, 3.0, 3.0, 1.0]])
    share = mask_share_in_boxes(masks, boxes)
    assert share.tolist() == [[0.5, 0.0, 0.0], [0.0, 0.0, 0.0]]  # an empty mask shares nothing
