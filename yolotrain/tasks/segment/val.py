"""SegmentationValidator: box metrics as DetectionValidator, plus mask metrics (M) matched by mask IoU.

Masks are compared at each image's ORIGINAL size, as COCO's `segm` evaluation does: a detection's mask is its
coefficients times the prototypes brought to the original image (letterbox padding cut away, bilinear), positive
logits inside its box; a label's mask is its polygon drawn at that size (`utils.masks.polygons_to_masks`). Matching
is COCO's (each detection, in descending confidence, takes the unmatched label of its class with the highest IoU at
or above each threshold), so the figures equal pycocotools' `segm` evaluation of the same masks.

predictions.json (`save_json=True`) adds `segmentation` to each detection: its mask at the original size in COCO's
compressed run-length encoding.
"""

import numpy as np
import torch

from yolotrain.loss.segment import segment_loss_item_names
from yolotrain.nn.modules import Segment
from yolotrain.tasks.detect.val import DetectionValidator, _slots, padded_match
from yolotrain.utils.boxes import batched_box_iou
from yolotrain.utils.masks import (mask_iou, mask_iou_from_protos, mask_share_in_boxes, mask_to_polygon, mask_to_rle,
                                   masks_from_protos, polygons_to_masks, protos_in_image, stack_polygons)
from yolotrain.utils.metrics import SegmentMetrics

TABLE_HEADER = ("Class", "Images", "Instances", "Box(P", "R", "mAP50", "mAP50-95)", "Mask(P", "R", "mAP50",
                "mAP50-95)")


class SegmentationValidator(DetectionValidator):
    """Validator of `SegmentationModel`s; `metrics` is a `SegmentMetrics` (`metrics.box`, `metrics.seg`)."""

    task = "segment"
    loss_names = segment_loss_item_names()
    primary_metric = "metrics/mAP50-95(M)"
    stat_keys = (*DetectionValidator.stat_keys, "tp_mask")
    table_header = TABLE_HEADER
    coco_parts = (*DetectionValidator.coco_parts, ("segm", "M"))

    def __init__(self, dataloader=None, save_dir=None, args=None, _callbacks=None):
        super().__init__(dataloader, save_dir, args, _callbacks)
        self.metrics = SegmentMetrics(names={})
        self.num_masks = 0  # prototype count, read from the model's output
        self._protos = None
        self.json_masks = []

    def init_metrics(self, model, dataloader):
        super().init_metrics(model, dataloader)
        self.loss_names = segment_loss_item_names()  # an eval output has no semantic logits to score
        self.metrics = SegmentMetrics(names=self.names, plot=self.plots, save_dir=self.save_dir,
                                      confusion_matrix=self.confusion_matrix)

    def reset(self):
        super().reset()
        self.json_masks = []

    def postprocess(self, preds):
        """NMS as detection, each detection keeping its mask coefficients; the prototypes are kept for `update`.
        preds: `(y, (maps, coefficients, protos))` from a model, `(y, protos)` from an export."""
        self._protos = Segment.eval_prototypes(preds)  # (B, nm, h, w)
        self.num_masks = int(self._protos.shape[1])
        return super().postprocess(preds)

    def nms_extra_columns(self):
        """Each detection keeps its nm mask coefficients."""
        return self.num_masks

    def part_stats(self, labels, batch):
        """Mask matches by mask IoU at the 10 thresholds (`tp_mask` (P, 10)), masks at each image's original
        size. Images differ in size, so the masks are made and compared image by image (each image's masks are
        also what bounds the memory: n masks of its full size). Only detections whose box holds enough of a label
        mask of their class can match; only their masks are made (all of them with save_json, which writes every
        mask)."""
        detections = labels.detections
        iou_rows = torch.zeros((len(labels.gt_cls), max(labels.max_preds, 1)), device=detections.device)
        outlines = self._label_outlines(batch, labels)
        input_hw = tuple(batch["img"].shape[2:])
        slots = _slots(labels.pred_image)  # (P,) a detection's column in its image's IoU rows
        wanted = torch.ones_like(slots, dtype=torch.bool) if self.args.save_json else _may_match(labels)
        masks_json = []
        for image in range(labels.num_images):
            pred_rows = torch.nonzero((labels.pred_image == image) & wanted).flatten()
            if not len(pred_rows):
                continue  # no mask to make: the image's IoUs stay 0
            gt_rows = torch.nonzero(labels.gt_image == image).flatten()
            image_hw = tuple(int(v) for v in batch["ori_shape"][image])
            gt_masks = self.label_masks(outlines[gt_rows.cpu().numpy()], image_hw).to(detections.device)
            if not self.args.save_json:
                pred_rows = pred_rows[self._reachable(gt_masks, labels.gt_cls[gt_rows], detections[pred_rows])]
                if not len(pred_rows):
                    continue
            coefficients, boxes = detections[pred_rows, 6:], detections[pred_rows, :4]
            protos = protos_in_image(self._protos[image], input_hw, batch["ratio_pad"][image], image_hw)
            if self.args.save_json:
                pred_masks = masks_from_protos(coefficients, protos, boxes)
                masks_json.extend(mask_to_rle(m) for m in pred_masks.cpu().numpy())
                iou = mask_iou(gt_masks, pred_masks)
            else:
                iou = mask_iou_from_protos(gt_masks, coefficients, protos, boxes)
            iou_rows[gt_rows[:, None], slots[pred_rows][None]] = iou
        if self.args.save_json:
            self.json_masks.append((self.batch_position, masks_json))
        tp = padded_match(detections, labels.pred_image, labels.gt_boxes, labels.gt_cls, labels.gt_image,
                          labels.num_images, labels.max_preds, labels.max_boxes, self.iouv.to(detections.device),
                          slots[:, None].float(), iou_rows, _precomputed_iou)
        return {"tp_mask": tp}

    def _reachable(self, gt_masks, gt_cls, detections):
        """(n,) bool: the detections of an image whose mask can reach the lowest IoU threshold with a label mask of
        their class: the share of that label's pixels inside the detection's box bounds their IoU from above."""
        share = mask_share_in_boxes(gt_masks, detections[:, :4])  # (m, n)
        lowest = float(self.iouv.min()) * (1 - 1e-6)  # the margin covers the IoU's float rounding
        same_class = gt_cls[:, None] == detections[None, :, 5]
        return ((share >= lowest) & (share > 0) & same_class).any(0)

    def predicted_outlines(self, detections, image_index, batch):
        """Each detection's mask outline in batch-image pixels, for the plots: its mask on the prototypes' grid (as
        validation makes it, cropped to its box) traced and scaled to the input; a detection whose mask is empty
        is drawn as a point at its box's centre. The plots show a few images: this is not a hot path."""
        if not len(detections):
            return None
        protos = self._protos.detach().float().cpu()
        to_protos = protos.shape[-1] / batch["img"].shape[-1]
        centres = ((detections[:, :2] + detections[:, 2:4]) / 2).numpy()[:, None]  # (n, 1, 2)
        outlines = list(centres)
        for image in image_index.unique().tolist():
            rows = torch.nonzero(image_index == image).flatten().tolist()
            masks = masks_from_protos(detections[rows, 6:], protos[image], detections[rows, :4] * to_protos)
            for row, mask in zip(rows, masks.numpy()):  # OpenCV traces one mask per call
                outline = mask_to_polygon(mask) / to_protos
                if len(outline):
                    outlines[row] = outline
        return torch.from_numpy(stack_polygons(outlines))

    def label_masks(self, outlines, image_hw):
        """(n, H, W) uint8 masks of an image's labels from their (n, S, 2) outlines in its pixels."""
        return torch.from_numpy(polygons_to_masks(outlines, image_hw))

    @staticmethod
    def _label_outlines(batch, labels):
        """(G, S, 2) label polygons in original-image pixels (numpy, for drawing)."""
        segments = batch["segments"].detach().float()  # (G, S, 2) normalised to the batch image
        height, width = batch["img"].shape[2:]
        gain, pad = labels.gain[labels.gt_image][:, None], labels.pad[labels.gt_image][:, None]  # (G, 1, 2) w, h
        pixels = segments * torch.tensor([width, height], device=segments.device)
        return ((pixels - pad) / gain).cpu().numpy()

    def compute(self):
        if self.sharded and self.args.save_json:
            gathered = (r for part in self.gathered(self.json_masks) for r in part)
            self.json_masks = sorted(gathered, key=lambda r: r[0])
        return super().compute()

    def process_metrics(self, stats):
        tp = stats["tp"].reshape(-1, len(self.iouv)).astype(bool)
        tp_mask = stats["tp_mask"].reshape(-1, len(self.iouv)).astype(bool)
        target_cls = stats["target_cls"].astype(np.int64)
        return self.metrics.process(tp, stats["conf"], stats["pred_cls"], target_cls, tp_mask, target_cls)

    def coco_predictions(self, coco=None):
        """Detection's COCO results with each detection's `segmentation` (compressed RLE at the original size)."""
        records = super().coco_predictions(coco)
        masks = [rle for _, rles in sorted(self.json_masks, key=lambda r: r[0]) for rle in rles]
        for record, rle in zip(records, masks):
            record["segmentation"] = rle
        return records


def _may_match(labels):
    """(P,) bool: detections whose box overlaps a label box of their class in their image (others have mask IoU 0
    with every label they could match)."""
    detections = labels.detections
    same_image = labels.pred_image[:, None] == labels.gt_image[None]
    same_class = detections[:, 5:6] == labels.gt_cls[None]
    return ((batched_box_iou(detections[None, :, :4], labels.gt_boxes[None])[0] > 0) & same_image & same_class).any(1)


def _precomputed_iou(true_values, pred_values):
    """A `padded_match` similarity reading IoUs already computed: labels (b, M, N) hold each label's IoU with the
    detections of its image in slot order, so the (b, M, N) scores are those rows as they are."""
    return true_values[..., : pred_values.shape[-2]]
