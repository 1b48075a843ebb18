"""DetectionValidator: COCO-style box metrics (P, R, mAP50, mAP50-95) of a detector on a YOLO dataset.

Predictions and labels are compared in ORIGINAL image pixels: both are mapped back from the letterboxed batch
image with the sample's `ratio_pad`, so the numbers do not depend on the validation image size or rect padding,
and predictions.json holds boxes for the original images.

predictions.json (`save_json=True`) is a COCO results list: `{"image_id", "category_id", "bbox", "score"}` with
`image_id` = int(file stem) when the stem is numeric (COCO's file naming) else the stem, `category_id` = the
*class index* of the data yaml (no mapping to COCO's 91 category ids is applied: map them yourself before running
the official COCO evaluation on COCO itself), `bbox` = [x_min, y_min, width, height] in original-image pixels
rounded to 3 decimals, `score` rounded to 5 decimals.
"""

import json
import logging
from pathlib import Path

import numpy as np
import torch

from yolotrain.engine.validator import BaseValidator
from yolotrain.errors import DatasetError
from yolotrain.loss.detection import loss_item_names
from yolotrain.utils.boxes import box_iou, scale_boxes_to_original, xywhn2xyxy, xyxy2xywh
from yolotrain.utils.metrics import ConfusionMatrix, DetMetrics, coco_iou_thresholds, match_predictions
from yolotrain.utils.nms import end_to_end_detections, is_end_to_end, non_max_suppression, set_max_det
from yolotrain.utils.torch_utils import de_parallel

LOGGER = logging.getLogger(__name__)

DEFAULT_VAL_CONF = 0.001  # low, so the PR curve reaches high recall; AP ignores the low-score tail's precision
# The confusion matrix counts only confident detections, matched at a looser IoU than mAP's.
CONFUSION_CONF = 0.25
CONFUSION_IOU = 0.45
PER_CLASS_ROWS_MAX_NC = 50  # below this class count the per-class table is always logged
PLOT_MAX_DET = 15  # predictions drawn per image on val_batch{i}_pred.jpg
TABLE_HEADER = ("Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95")
STAT_KEYS = ("tp", "conf", "pred_cls", "target_cls", "target_img")


class DetectionValidator(BaseValidator):
    """Validator of `DetectionModel`s; see `BaseValidator` for the driver and the callback events.

    Example:
        >>> from yolotrain.tasks.detect.val import DetectionValidator
        >>> validator = DetectionValidator(args={"data": "data.yaml", "imgsz": 640})
        >>> metrics = validator(model="runs/detect/train/weights/best.pt")
        >>> metrics["metrics/mAP50-95(B)"]

    After a run: `metrics` (a `DetMetrics`: `metrics.box.p/.r/.f1/.ap50/.ap/.ap_class_index/.mp/.mr/.map50/.map`),
    `confusion_matrix`, `names`, `nc`, `seen`, `speed`, `nt_per_class` / `nt_per_image` (ground-truth boxes /
    images containing each class).
    """

    loss_names = ("box_loss", "cls_loss", "dfl_loss")
    rect_pad = 0.5  # margin of the rectangular batch shapes, in strides (as the reference validator pads)

    def __init__(self, dataloader=None, save_dir=None, args=None, _callbacks=None):
        super().__init__(dataloader, save_dir, args, _callbacks)
        self.iouv = coco_iou_thresholds()  # (10,) IoU 0.50:0.05:0.95
        self.metrics = DetMetrics(names={})
        self.confusion_matrix = None
        self.stats = {key: [] for key in STAT_KEYS}
        self.json_records = []  # per image: (image_id, (n, 6) x, y, w, h, score, class) in original pixels
        self.nt_per_class = self.nt_per_image = np.zeros(0, np.int64)

    # ------------------------------------------------------------------ standalone set-up
    def load_model(self, path):
        """The detector in `path`: a yolotrain checkpoint (its EMA weights, else its model weights), safetensors,
        or an exported .onnx / .torchscript file."""
        from yolotrain.nn.backends import load_inference_model

        return load_inference_model(path)

    def build_dataloader(self, model):
        """Rect-batched loader of `args.split` of `args.data` (the built-in dataset when `data` is empty)."""
        from yolotrain.data.data_yaml import check_det_dataset
        from yolotrain.data.dataset import YOLODataset
        from yolotrain.data.loader import build_dataloader

        if self.args.data:
            data = self.args.data
        else:
            from yolotrain.data.builtin import builtin_data_yaml

            data = builtin_data_yaml()
            LOGGER.info(f"data: no data= given, validating on the built-in shapes dataset at {data}")
        self.data = check_det_dataset(data)
        split = self.args.split
        if not self.data.get(split):
            where = self.data.get("yaml_file") or "data dict"
            raise DatasetError(f"{where}: split={split!r} has no images; expected a data yaml key val, test or train")
        stride = max(int(model.stride.max()), 32) if hasattr(model, "stride") else 32
        batch = max(int(self.args.batch), 1)
        dataset = YOLODataset(
            self.data[split],
            imgsz=self.args.imgsz,
            augment=False,
            hyp=self.args,
            rect=True,
            batch_size=batch,
            stride=stride,
            pad=self.rect_pad,
            single_cls=self.args.single_cls,
            classes=self.args.classes,  # labels of other classes are dropped, as in training
            data=self.data,
            prefix=f"{split}: ",
            workers=self.args.workers,
        )
        return build_dataloader(dataset, batch, self.args.workers, shuffle=False, rank=-1, seed=self.args.seed)

    # ------------------------------------------------------------------ evaluator
    def metric_names(self):
        return list(self.metrics.keys)

    def init_metrics(self, model, dataloader):
        """Class names from the dataset (else the model), fresh metric containers."""
        names = getattr(getattr(dataloader, "dataset", None), "names", None) or getattr(model, "names", None) or {}
        self.names = {int(k): str(v) for k, v in dict(names).items()}
        self.nc = len(self.names)
        model_nc = getattr(de_parallel(model), "nc", self.nc)
        if model_nc != self.nc and not self.args.single_cls:
            LOGGER.warning(f"the model predicts {model_nc} classes but the dataset has {self.nc}; metrics may mislead")
        self.end2end = is_end_to_end(model)
        if hasattr(de_parallel(model), "head"):
            self.loss_names = loss_item_names(de_parallel(model).head.reg_max)
        set_max_det(model, self.args.max_det)
        self.metrics = DetMetrics(names=self.names, plot=self.plots, save_dir=self.save_dir)
        self.confusion_matrix = ConfusionMatrix(self.nc, conf=CONFUSION_CONF, iou_thres=CONFUSION_IOU)

    def reset(self):
        super().reset()
        self.stats = {key: [] for key in STAT_KEYS}
        self.json_records = []

    def preprocess(self, batch):
        """uint8 images -> float [0, 1] on the device; labels to the device (the loss needs them there)."""
        batch = dict(batch)  # the caller's collated batch stays as it was
        batch["img"] = batch["img"].to(self.device, non_blocking=True).float() / 255
        for key in ("cls", "bboxes", "batch_idx"):
            batch[key] = batch[key].to(self.device, non_blocking=True)
        return batch

    def postprocess(self, preds):
        """NMS -> per image (n, 6) x1, y1, x2, y2, conf, cls in batch-image pixels, descending conf."""
        y = preds[0] if isinstance(preds, (list, tuple)) else preds
        conf = self.args.conf if self.args.conf is not None else DEFAULT_VAL_CONF
        if self.end2end:
            return end_to_end_detections(y.float(), conf_thres=conf, classes=self.args.classes, max_det=self.args.max_det)
        # Multi-label by default: a box whose right class is not its top class still counts towards mAP.
        multi_label = self.args.multi_label if self.args.multi_label is not None else True
        return non_max_suppression(
            y.float(),
            conf_thres=conf,
            iou_thres=self.args.iou,
            max_det=self.args.max_det,
            classes=self.args.classes,
            agnostic=self.args.agnostic_nms or self.args.single_cls,
            multi_label=multi_label,
        )

    def update(self, preds, batch):
        """Match each image's predictions to its labels at IoU 0.50:0.05:0.95, in original-image pixels."""
        height, width = batch["img"].shape[2:]
        # match_predictions and the confusion matrix work on CPU tensors; per-image tensors are small.
        gt_cls_all = batch["cls"].detach().reshape(-1).cpu()
        gt_boxes_all = xywhn2xyxy(batch["bboxes"].detach().float().cpu(), width, height)  # (N, 4) batch pixels
        batch_idx = batch["batch_idx"].detach().cpu()
        for i, pred in enumerate(preds):  # per image; everything inside is vectorised over boxes
            self.seen += 1
            in_image = batch_idx == i
            ratio_pad, ori_shape = batch["ratio_pad"][i], batch["ori_shape"][i]
            gt_cls = gt_cls_all[in_image]
            gt_boxes = scale_boxes_to_original(gt_boxes_all[in_image], ratio_pad, ori_shape)
            detections = self._to_original(pred.detach().float().cpu(), ratio_pad, ori_shape)
            self._record(detections, gt_boxes, gt_cls)
            if self.plots:
                self.confusion_matrix.process_batch(detections, gt_boxes, gt_cls)
            if self.args.save_json:
                self._add_json_record(detections, batch["im_file"][i])

    def _to_original(self, detections, ratio_pad, ori_shape):
        detections = detections.clone()
        if self.args.single_cls:
            detections[:, 5] = 0
        detections[:, :4] = scale_boxes_to_original(detections[:, :4], ratio_pad, ori_shape)
        return detections

    def _record(self, detections, gt_boxes, gt_cls):
        """Store tp (n, 10), conf, class of the detections and the image's ground-truth classes."""
        if len(detections) and len(gt_cls):
            iou = box_iou(gt_boxes, detections[:, :4])  # (M, N)
            tp = match_predictions(detections[:, 5], gt_cls, iou, self.iouv)
        else:
            tp = torch.zeros(len(detections), len(self.iouv), dtype=torch.bool)
        self.stats["tp"].append(tp)
        self.stats["conf"].append(detections[:, 4])
        self.stats["pred_cls"].append(detections[:, 5])
        self.stats["target_cls"].append(gt_cls)
        self.stats["target_img"].append(gt_cls.unique())

    def _add_json_record(self, detections, im_file):
        stem = Path(im_file).stem
        image_id = int(stem) if stem.isnumeric() else stem
        boxes = xyxy2xywh(detections[:, :4])
        boxes[:, :2] -= boxes[:, 2:] / 2  # COCO boxes start at the top-left corner
        self.json_records.append((image_id, torch.cat([boxes, detections[:, 4:6]], 1).numpy()))

    def compute(self):
        """DetMetrics over all accumulated predictions; returns its results dict (with "fitness")."""
        stats = {key: torch.cat(values).numpy() if values else np.zeros(0) for key, values in self.stats.items()}
        tp = stats["tp"].reshape(-1, len(self.iouv)).astype(bool)
        target_cls = stats["target_cls"].astype(np.int64)
        self.nt_per_class = np.bincount(target_cls, minlength=self.nc)
        self.nt_per_image = np.bincount(stats["target_img"].astype(np.int64), minlength=self.nc)
        if len(target_cls) == 0:
            LOGGER.warning(f"no labels found in the {self.args.split} set, so no metrics can be computed")
        self.metrics.speed = dict(self.speed)
        return self.metrics.process(tp, stats["conf"], stats["pred_cls"], target_cls)

    # ------------------------------------------------------------------ reporting
    def progress_description(self):
        return ("%22s" + "%11s" * 6) % TABLE_HEADER

    def log_results(self):
        """The table: one "all" row, then one row per class (when verbose or fewer than 50 classes)."""
        row = "%22s" + "%11i" * 2 + "%11.3g" * 4
        LOGGER.info(self.progress_description())
        LOGGER.info(row % ("all", self.seen, self.nt_per_class.sum(), *self.metrics.mean_results()))
        if self.nc > 1 and (self.args.verbose or self.nc < PER_CLASS_ROWS_MAX_NC):
            for i, c in enumerate(self.metrics.ap_class_index):
                name = self.names.get(int(c), str(c))
                counts = (self.nt_per_image[c], self.nt_per_class[c])
                LOGGER.info(row % (name, *counts, *self.metrics.class_result(i)))

    def plot_batch(self, batch, preds, batch_i):
        """val_batch{i}_labels.jpg and val_batch{i}_pred.jpg (predictions in batch-image pixels)."""
        from yolotrain.utils.plotting import plot_images

        try:
            plot_images(
                batch["img"], batch["batch_idx"], batch["cls"].reshape(-1), batch["bboxes"],
                paths=batch.get("im_file"), fname=self.save_dir / f"val_batch{batch_i}_labels.jpg", names=self.names,
            )  # fmt: skip
            shown = [p[:PLOT_MAX_DET].detach().float().cpu() for p in preds]
            image_index = torch.cat([torch.full((len(p),), i) for i, p in enumerate(shown)])
            detections = torch.cat(shown) if shown else torch.zeros(0, 6)
            plot_images(
                batch["img"], image_index, detections[:, 5], detections[:, :5],
                paths=batch.get("im_file"), fname=self.save_dir / f"val_batch{batch_i}_pred.jpg", names=self.names,
            )  # fmt: skip
        except Exception as e:  # a plot must never stop a validation (or the training around it)
            LOGGER.warning(f"validation batch plot failed: {e}")

    def plot_metrics(self):
        """The normalised confusion matrix (the PR and confidence curves are drawn by DetMetrics.process)."""
        try:
            self.confusion_matrix.plot(normalize=True, save_dir=self.save_dir, names=self.names)
        except Exception as e:
            LOGGER.warning(f"confusion matrix plot failed: {e}")

    def save_outputs(self):
        """predictions.json in save_dir when save_json is on (format in the module docstring)."""
        if not self.args.save_json:
            return
        from yolotrain.utils.checkpoint import save_atomic_text

        path = Path(self.save_dir) / "predictions.json"
        save_atomic_text(json.dumps(self.coco_predictions()), path)
        LOGGER.info(f"Saving {path} ({sum(len(rows) for _, rows in self.json_records)} predictions)")

    def coco_predictions(self):
        """The COCO results list built from the accumulated per-image arrays."""
        records = []
        for image_id, rows in self.json_records:  # serialisation: one dict per box is what COCO json is
            boxes, scores, classes = np.round(rows[:, :4], 3).tolist(), np.round(rows[:, 4], 5).tolist(), rows[:, 5]
            records.extend(
                {"image_id": image_id, "category_id": int(c), "bbox": b, "score": s}
                for b, s, c in zip(boxes, scores, classes.astype(np.int64).tolist())
            )
        return records

