"""OBBValidator: COCO-style metrics (P, R, mAP50, mAP50-95) of an oriented-box model, its rotated boxes matched to
the labels by their exact IoU (the area shared by the two rotated rectangles, from their polygon intersection).

The reference trainer matches by probabilistic IoU (ProbIoU, a Gaussian approximation); the exact IoU differs from
it by a few hundredths for long thin boxes, and by more for small, loosely placed ones (ProbIoU is the more lenient),
so the figures of the two differ on the same predictions. `obb_iou=probiou` matches as the reference does, to
compare with its figures.
Boxes are compared in original-image pixels: each corner is mapped back through the letterbox (per axis), and the
mapped quadrilaterals are intersected as they are. results.csv keeps detection's (B) columns.

predictions.json (`save_json=True`): per detection `image_id`, `category_id`, `score`, `rbox` [cx, cy, w, h,
angle] and `poly` [x1, y1, ..., x4, y4] in original-image pixels, and `bbox` (the rotated box's axis-aligned
extent); pycocotools has no rotated-box evaluation, so it does not score them.
"""

import functools

import torch

from yolotrain.loss.obb import obb_loss_item_names
from yolotrain.tasks.detect.val import DetectionValidator, padded_match
from yolotrain.utils.nms import non_max_suppression_rotated
from yolotrain.utils.obb import corners_to_xywhr, polygon_iou, probiou, xywhr_to_corners
from yolotrain.utils.torch_utils import de_parallel

ROTATED = slice(6, 11)  # a detection row's rotated box (cx, cy, w, h, angle) after its extent, conf and class


class OBBValidator(DetectionValidator):
    """Validator of `OBBModel`s; `metrics` is a `DetMetrics` whose box figures are those of the rotated boxes."""

    task = "obb"
    coco_parts = ()

    loss_names = obb_loss_item_names()

    def init_metrics(self, model, dataloader):
        super().init_metrics(model, dataloader)
        if hasattr(de_parallel(model), "head"):  # an export has no loss
            self.loss_names = obb_loss_item_names(de_parallel(model).head.reg_max)

    def postprocess(self, preds):
        """Rotated NMS (or an end-to-end head's own top-k) -> per image (n, 11): the rotated box's axis-aligned
        extent x1, y1, x2, y2, conf, cls, then cx, cy, w, h, angle, in batch-image pixels."""
        return [with_extent(rows) for rows in super().postprocess(preds)]

    def suppress(self, predictions, **options):
        """Rotated NMS: (B, 4 + nc + 1, A) rotated boxes, scores and angles -> per image (n, 7) cx, cy, w, h, conf,
        cls, angle."""
        return non_max_suppression_rotated(predictions, **options)

    def box_matches(self, labels, batch):
        """Rotated boxes matched by exact IoU (or, `obb_iou=probiou`, ProbIoU) in original-image pixels; the
        detections' rotated boxes are stored back in original pixels (predictions.json's)."""
        detections = labels.detections
        pred_corners = self._to_original(xywhr_to_corners(detections[:, ROTATED]), labels, labels.pred_image)
        height, width = batch["img"].shape[2:]
        true_corners = batch["corners"].detach().float().view(-1, 4, 2) * torch.tensor([width, height],
                                                                                        device=detections.device)
        true_corners = self._to_original(true_corners, labels, labels.gt_image)
        self._true_corners = true_corners  # the confusion matrix compares them too (`confusion_overlaps`)
        if len(detections):
            detections[:, ROTATED] = corners_to_xywhr(pred_corners)
        similarity = CORNER_SIMILARITIES[self.args.obb_iou]
        if similarity is _corner_iou:  # pairs below the lowest threshold never match: they need no intersection
            similarity = functools.partial(_corner_iou, at_least=float(self.iouv.min()))
        return padded_match(detections, labels.pred_image, labels.gt_boxes, labels.gt_cls, labels.gt_image,
                            labels.num_images, labels.max_preds, labels.max_boxes, self.iouv.to(detections.device),
                            pred_corners.flatten(1), true_corners.flatten(1), similarity)

    def confusion_overlaps(self, detections, gt_rows):
        """The rotated boxes' IoU, as `obb_iou` matches them for mAP, in original-image pixels."""
        if not len(detections) or not len(gt_rows):
            return None
        similarity = CORNER_SIMILARITIES[self.args.obb_iou]
        pred_corners = xywhr_to_corners(detections[:, ROTATED]).flatten(1)
        return similarity(self._true_corners[gt_rows].flatten(1)[None], pred_corners[None])[0].cpu()

    def predicted_outlines(self, detections, image_index, batch):
        """Each detection's rotated corners (batch-image pixels) for the validation batch plots."""
        return xywhr_to_corners(detections[:, ROTATED])

    @staticmethod
    def _to_original(corners, labels, image_index):
        """(n, 4, 2) batch-image pixels -> original-image pixels of each row's image."""
        gain, pad = labels.gain[image_index][:, None], labels.pad[image_index][:, None]  # (n, 1, 2)
        return (corners - pad) / gain

    def coco_predictions(self, coco=None):
        """Detection's results with each detection's `rbox` and `poly` in original pixels."""
        records = super().coco_predictions(coco)
        rows = [d[:, ROTATED].cpu().double() for _, _, _, d in self.json_records]
        boxes = torch.cat(rows) if rows else torch.zeros(0, 5, dtype=torch.float64)
        polygons = xywhr_to_corners(boxes).flatten(1)
        for record, box, polygon in zip(records, boxes.numpy().round(3).tolist(),
                                        polygons.numpy().round(3).tolist()):
            record["rbox"], record["poly"] = box, polygon
        return records


def with_extent(rows):
    """(n, 7) cx, cy, w, h, conf, cls, angle -> (n, 11) the box's axis-aligned extent x1, y1, x2, y2, conf, cls,
    then cx, cy, w, h, angle: the first six columns are what every detection row holds."""
    rotated = rows[:, [0, 1, 2, 3, 6]]
    corners = xywhr_to_corners(rotated)  # (n, 4, 2)
    extent = torch.cat((corners.amin(1), corners.amax(1)), 1)
    return torch.cat((extent, rows[:, 4:6], rotated), 1)


def _corner_iou(true_values, pred_values, at_least=0.0):
    """A `padded_match` similarity: exact IoU of labels (b, M, 8) and detections (b, N, 8) given by 4 corners (0
    for pairs that cannot reach `at_least`)."""
    true_corners = true_values.unflatten(-1, (4, 2))
    pred_corners = pred_values.unflatten(-1, (4, 2))
    return polygon_iou(true_corners, pred_corners, at_least)  # (b, M, N)


def _corner_probiou(true_values, pred_values):
    """A `padded_match` similarity: ProbIoU of labels (b, M, 8) and detections (b, N, 8) given by 4 corners."""
    true_boxes = corners_to_xywhr(true_values.unflatten(-1, (4, 2)))
    pred_boxes = corners_to_xywhr(pred_values.unflatten(-1, (4, 2)))
    return probiou(true_boxes, pred_boxes)  # (b, M, N)


CORNER_SIMILARITIES = {"exact": _corner_iou, "probiou": _corner_probiou}  # by `obb_iou`
