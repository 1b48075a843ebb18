"""DetectionValidator: COCO-style box metrics (P, R, mAP50, mAP50-95) of a detector on a YOLO dataset.

Predictions and labels are compared in ORIGINAL image pixels: both are mapped back from the letterboxed batch
image with the sample's `ratio_pad`, so the numbers do not depend on the validation image size or rect padding,
and predictions.json holds boxes for the original images.

predictions.json (`save_json=True`) is a COCO results list: `{"image_id", "category_id", "bbox", "score"}` with
`image_id` = int(file stem) when the stem is numeric (COCO's file naming) else the stem, `category_id` = the
class index of the data yaml, `bbox` = [x_min, y_min, width, height] in original-image pixels rounded to 3
decimals, `score` rounded to 5 decimals. On a dataset made by `yolotrain convert coco` (its data yaml has
`coco_json`, the annotation file, and `coco_category_ids`, the category id of each class) the ids are COCO's own:
the image id listed for the file name and the original category id; predictions.json is then also scored by
pycocotools (when installed) against that annotation file, logged beside our figures and, standalone, returned as
"coco/mAP50-95(B)" and "coco/mAP50(B)".

Metrics are computed batch by batch: NMS, the mapping to original pixels and the COCO matching of all images of a
batch run as tensor operations over the whole batch (padded per image), on the device, without host copies; the
statistics move to the CPU once, in `compute()`.
"""

import contextlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from yolotrain.cfg import check_class_ids
from yolotrain.data.instances import PER_OBJECT_KEYS
from yolotrain.engine.validator import BaseValidator
from yolotrain.errors import CfgError, DatasetError
from yolotrain.utils import dist
from yolotrain.loss.detection import loss_item_names
from yolotrain.nn.backends import fixed_input_size
from yolotrain.utils.boxes import batched_box_iou, xywhn2xyxy
from yolotrain.utils.metrics import ConfusionMatrix, DetMetrics, coco_iou_thresholds, match_predictions
from yolotrain.utils.nms import end_to_end_detections, is_end_to_end, non_max_suppression, set_max_det
from yolotrain.utils.threads import cpu_compute_threads
from yolotrain.utils.torch_utils import de_parallel

LOGGER = logging.getLogger(__name__)

DEFAULT_VAL_CONF = 0.001  # low, so the PR curve reaches high recall; AP ignores the low-score tail's precision
# The confusion matrix counts only confident detections, matched at a looser IoU than mAP's.
CONFUSION_CONF = 0.25
CONFUSION_IOU = 0.45
PER_CLASS_ROWS_MAX_NC = 50  # below this class count the per-class table is always logged
PLOT_MAX_DET = 15  # predictions drawn per image on val_batch{i}_pred.jpg
TABLE_HEADER = ("Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95")
# Elements of the (T, B, N, M) matching tensors handled at once; larger batches are matched in chunks of images.
MATCH_CHUNK_ELEMENTS = 1 << 24


def boxes_to_original(boxes, gain, pad, shape):
    """(n, 4) xyxy letterboxed-batch pixels -> original-image pixels, clipped to the image; gain, pad, shape (n, 2)
    (w, h) per box: original = (box - pad) / gain."""
    scale, offset, limit = gain.repeat(1, 2), pad.repeat(1, 2), shape.repeat(1, 2)  # (n, 4) in x, y, x, y order
    return ((boxes - offset) / scale).clamp(min=0).minimum(limit)


def padded_match(detections, pred_image, gt_boxes, gt_cls, gt_image, num_images, max_preds, max_boxes, iouv,
                 pred_values=None, gt_values=None, similarity=batched_box_iou):
    """COCO matching of a whole batch at once: tp (P, T) bool for the detections (P, 6+) of images `pred_image`.

    Predictions and labels are laid out per image in (B, max_preds) / (B, max_boxes) slots (absent predictions get
    class -2 and absent labels -1, so padding never matches) and matched with one `match_predictions` call per
    chunk of images, the chunk sized so the (T, B, N, M) working tensors stay small. What is compared is the boxes
    by IoU, or `gt_values` (G, ...) with `pred_values` (P, ...) by `similarity(gt (b, M, ...), pred (b, N, ...))`
    -> (b, M, N) (a pose validator's keypoints by OKS).
    """
    num_thresholds, device = len(iouv), detections.device
    tp = torch.zeros(len(detections), num_thresholds, dtype=torch.bool, device=device)
    if len(detections) == 0 or len(gt_cls) == 0:
        return tp
    pred_values = detections[:, :4] if pred_values is None else pred_values
    gt_values = gt_boxes if gt_values is None else gt_values
    pred_slot = _slots(pred_image)
    gt_slot = _slots(gt_image)
    pred_padded = pred_values.new_zeros((num_images, max_preds, *pred_values.shape[1:]))
    pred_cls = torch.full((num_images, max_preds), -2.0, device=device)
    pred_padded[pred_image, pred_slot] = pred_values
    pred_cls[pred_image, pred_slot] = detections[:, 5]
    true_padded = gt_values.new_zeros((num_images, max_boxes, *gt_values.shape[1:]))
    true_cls = torch.full((num_images, max_boxes), -1.0, device=device)
    true_padded[gt_image, gt_slot] = gt_values
    true_cls[gt_image, gt_slot] = gt_cls
    per_image = max(max_preds * max_boxes * num_thresholds, 1)
    chunk = max(MATCH_CHUNK_ELEMENTS // per_image, 1)
    matched = []
    for start in range(0, num_images, chunk):  # usually one chunk; more only for crowded, many-detection batches
        part = slice(start, start + chunk)
        scores = similarity(true_padded[part], pred_padded[part])  # (b, M, N)
        matched.append(match_predictions(pred_cls[part], true_cls[part], scores, iouv))  # (b, N, T)
    return torch.cat(matched)[pred_image, pred_slot]


def _slots(image_index):
    """Position of each row within its image, for rows sorted by image: (n,) -> (n,)."""
    return torch.arange(len(image_index), device=image_index.device) - torch.searchsorted(image_index, image_index)


def classes_per_image(image_index, classes):
    """The distinct classes of each image's labels, all images together: (k,) one entry per (image, class)."""
    if len(classes) == 0:
        return classes
    pairs = torch.stack([image_index.to(classes.dtype), classes])  # (2, n)
    return torch.unique(pairs, dim=1)[1]


def _split_by_image(image_index, num_images, *rows):
    """Each of `rows` (tensors of one row per label, sorted by `image_index`) split into its images' parts."""
    counts = torch.bincount(image_index, minlength=num_images).tolist()
    return [part.split(counts) for part in rows]


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

    task = "detect"
    loss_names = loss_item_names()
    primary_metric = "metrics/mAP50-95(B)"
    table_header = TABLE_HEADER  # the columns of the results table
    stat_keys = ("tp", "conf", "pred_cls", "target_cls", "target_img")  # per-batch statistics joined in `compute`
    coco_parts = (("bbox", "B"),)  # what pycocotools scores of predictions.json: (its iouType, our metric suffix)
    rect_pad = 0.5  # margin of the rectangular batch shapes, in strides (as the reference validator pads)

    def __init__(self, dataloader=None, save_dir=None, args=None, _callbacks=None):
        super().__init__(dataloader, save_dir, args, _callbacks)
        self.iouv = coco_iou_thresholds()  # (10,) IoU 0.50:0.05:0.95
        self.metrics = DetMetrics(names={})
        self.confusion_matrix = None
        self.nms_classes = None  # the `classes` filter applied to predictions (set with the metrics)
        self.stats = []  # per batch: {"position", "tp", "conf", "pred_cls", "target_cls", "target_img", "seen"}
        self.json_records = []  # per batch: (position, im_files, detections per image, (P, 6) xyxy, conf, class)
        self.nt_per_class = self.nt_per_image = np.zeros(0, np.int64)

    # ------------------------------------------------------------------ standalone set-up
    def load_model(self, path):
        """The detector in `path`: a yolotrain checkpoint (its EMA weights, else its model weights), safetensors,
        or an exported .onnx / .torchscript file."""
        from yolotrain.nn.backends import load_inference_model

        return load_inference_model(path)

    def build_dataloader(self, model):
        """Rect-batched loader of `args.split` of `args.data` (the built-in dataset when `data` is empty)."""
        from yolotrain.data.builtin import builtin_data_yaml_for
        from yolotrain.data.data_yaml import check_det_dataset
        from yolotrain.data.dataset import YOLODataset
        from yolotrain.data.loader import build_dataloader

        if self.args.data:
            data = self.args.data
        else:
            data = builtin_data_yaml_for(self.task)
            LOGGER.info(f"data: no data= given, validating on the built-in shapes dataset at {data}")
        self.data = check_det_dataset(data)
        split = self.args.split
        if not self.data.get(split):
            where = self.data.get("yaml_file") or "data dict"
            raise DatasetError(f"{where}: split={split!r} has no images; expected a data yaml key val, test or train")
        stride = max(int(model.stride.max()), 32) if hasattr(model, "stride") else 32
        batch = max(int(self.args.batch), 1)
        fixed = fixed_input_size(model, self.args.imgsz)  # an export without dynamic=True: square letterboxes
        if fixed is not None and fixed[0] != fixed[1]:
            raise CfgError(f"{model.path} was exported for fixed {fixed[0]}x{fixed[1]} images and validation "
                           f"letterboxes to a square: export it with one imgsz or with dynamic=True")
        dataset = YOLODataset(
            self.data[split],
            imgsz=fixed[0] if fixed else self.args.imgsz,
            augment=False,
            hyp=self.args,
            rect=fixed is None,
            batch_size=batch,
            stride=stride,
            pad=self.rect_pad,
            single_cls=self._evaluates_single_class(model),
            classes=self.args.classes,  # labels of other classes are dropped, as in training
            data=self.data,
            prefix=f"{split}: ",
            workers=self.args.workers,
            task=self.task,
        )
        return build_dataloader(dataset, batch, self.args.workers, shuffle=False, rank=-1, seed=self.args.seed,
                                compute_threads=cpu_compute_threads(self.device, self.governor))

    def _evaluates_single_class(self, model):
        """single_cls, or a one-class model (as `single_cls` training makes) on a dataset of several classes: every
        label then counts as that one class, as in the training run's own validation."""
        model_nc = getattr(de_parallel(model), "nc", None)
        if self.args.single_cls or model_nc != 1 or self.data["nc"] == 1 or self.args.classes is not None:
            return bool(self.args.single_cls)
        LOGGER.info(f"the model predicts one class and the dataset has {self.data['nc']}: evaluating with "
                    f"single_cls=True (give classes= to evaluate chosen classes only)")
        return True

    # ------------------------------------------------------------------ evaluator
    def metric_names(self):
        return list(self.metrics.mean_result_keys)

    def init_metrics(self, model, dataloader):
        """Class names from the dataset (else the model), fresh metric containers."""
        names = getattr(getattr(dataloader, "dataset", None), "names", None) or getattr(model, "names", None) or {}
        self.names = {int(k): str(v) for k, v in dict(names).items()}
        self.nc = len(self.names)
        model_nc = getattr(de_parallel(model), "nc", self.nc)
        single_class = bool(getattr(getattr(dataloader, "dataset", None), "single_cls", self.args.single_cls))
        if model_nc != self.nc and not single_class:
            LOGGER.warning(f"the model predicts {model_nc} classes but the dataset has {self.nc}; metrics may mislead")
        # A one-class model of a single_cls run predicts class 0: `classes` then selected labels, not predictions.
        self.nms_classes = None if single_class and model_nc == 1 else self.args.classes
        check_class_ids(self.nms_classes, model_nc, "the model")
        self.end2end = is_end_to_end(model)
        if hasattr(de_parallel(model), "head"):
            self.loss_names = loss_item_names(de_parallel(model).head.reg_max)
        set_max_det(model, self.args.max_det)
        self.confusion_matrix = ConfusionMatrix(self.nc, conf=CONFUSION_CONF, iou_thres=CONFUSION_IOU)
        self.metrics = DetMetrics(names=self.names, plot=self.plots, save_dir=self.save_dir,
                                  confusion_matrix=self.confusion_matrix)

    def reset(self):
        super().reset()
        self.stats = []
        self.json_records = []

    def preprocess(self, batch):
        """uint8 images -> float [0, 1] on the device; labels to the device (the loss needs them there)."""
        batch = dict(batch)  # the caller's collated batch stays as it was
        images = batch["img"].to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)  # uint8: the cheapest copy to make
        batch["img"] = images.float().div_(255)  # in place: one float copy of the batch, not two
        for key in ("batch_idx", *PER_OBJECT_KEYS, "masks"):  # the labels the task's samples carry
            if key in batch:
                batch[key] = batch[key].to(self.device, non_blocking=True)
        return batch

    def postprocess(self, preds):
        """NMS -> per image (n, 6 + extra) x1, y1, x2, y2, conf, cls (then `nms_extra_columns` values, a pose
        model's keypoints) in batch-image pixels, descending conf."""
        y = preds[0] if isinstance(preds, (list, tuple)) else preds
        conf = self.args.conf if self.args.conf is not None else DEFAULT_VAL_CONF
        if self.end2end:
            return end_to_end_detections(y.float(), conf_thres=conf, classes=self.nms_classes, max_det=self.args.max_det)
        # Multi-label by default: a box whose right class is not its top class still counts towards mAP.
        multi_label = self.args.multi_label if self.args.multi_label is not None else True
        return self.suppress(y.float(), conf_thres=conf, iou_thres=self.args.iou, max_det=self.args.max_det,
                             classes=self.nms_classes, agnostic=self.args.agnostic_nms or self.args.single_cls,
                             multi_label=multi_label)

    def suppress(self, predictions, **options):
        """NMS of a decoded output (B, 4 + nc + extra, A) with these `options` (thresholds, classes, max_det, ...);
        an oriented-box validator suppresses rotated boxes instead."""
        return non_max_suppression(predictions, num_extra=self.nms_extra_columns(), **options)

    def update(self, preds, batch):
        """Match the predictions of every image of the batch to its labels at IoU 0.50:0.05:0.95, in original-image
        pixels, all images at once; the statistics stay where they are (on the device) until `compute`."""
        num_images = len(preds)
        device = batch["img"].device
        detections, pred_image = self._batch_detections(preds, device)  # (P, 6), (P,)
        gt_image = batch["batch_idx"].detach().long().reshape(-1)  # (G,) sorted: collate concatenates image by image
        gt_cls = batch["cls"].detach().reshape(-1).float()
        height, width = batch["img"].shape[2:]
        gt_boxes = xywhn2xyxy(batch["bboxes"].detach().float().reshape(-1, 4), width, height)  # batch pixels
        gain, pad, shape = self._letterbox_params(batch, device)  # (B, 2) each
        gt_boxes = boxes_to_original(gt_boxes, gain[gt_image], pad[gt_image], shape[gt_image])
        detections[:, :4] = boxes_to_original(detections[:, :4], gain[pred_image], pad[pred_image], shape[pred_image])
        max_boxes = batch.get("max_boxes")
        if max_boxes is None:
            max_boxes = int(torch.bincount(gt_image, minlength=1).max()) if len(gt_image) else 0
        max_preds = max((len(p) for p in preds), default=0)
        labels = BatchLabels(detections, pred_image, gt_boxes, gt_cls, gt_image, num_images, max_preds, max_boxes,
                             gain, pad, shape)
        tp = self.box_matches(labels, batch)  # (P, 10)
        self.seen += num_images
        self.stats.append({
            "position": self.batch_position, "tp": tp, "conf": detections[:, 4], "pred_cls": detections[:, 5],
            "target_cls": gt_cls, "target_img": classes_per_image(gt_image, gt_cls), "seen": num_images,
            **self.part_stats(labels, batch),
        })  # fmt: skip
        counts = [len(p) for p in preds]
        if self.plot_stats:  # the plotted confusion matrix only (last epoch): image by image, confident detections
            gt_rows = torch.arange(len(gt_cls), device=gt_cls.device)
            per_image = zip(detections.split(counts), *_split_by_image(gt_image, num_images, gt_boxes, gt_cls, gt_rows))
            for image_detections, image_boxes, image_cls, image_rows in per_image:
                # the matrix drops the others: their overlaps (rotated IoUs for oriented boxes) are never needed
                confident = image_detections[image_detections[:, 4] > self.confusion_matrix.conf]
                overlaps = self.confusion_overlaps(confident, image_rows)
                self.confusion_matrix.process_batch(confident.cpu(), image_boxes.cpu(), image_cls.cpu(), overlaps)
        if self.args.save_json:
            self.json_records.append((self.batch_position, list(batch["im_file"]), counts, detections))

    def confusion_overlaps(self, detections, gt_rows):
        """The IoU (g, n) of one image's labels (their rows `gt_rows` in the batch) with its detections for the
        confusion matrix, or None for their boxes' IoU (an oriented-box validator compares its rotated boxes)."""
        return None

    def box_matches(self, labels, batch):
        """(P, 10) bool: the detections matched to labels of their class by box IoU at each threshold (COCO's
        matching; an oriented-box validator compares its rotated boxes instead)."""
        return padded_match(labels.detections, labels.pred_image, labels.gt_boxes, labels.gt_cls, labels.gt_image,
                            labels.num_images, labels.max_preds, labels.max_boxes, self.iouv.to(labels.gt_cls.device))

    def nms_extra_columns(self):
        """Values per anchor that follow the class scores in the model's output and each detection keeps through
        NMS (a pose model's keypoints); a detector has none."""
        return 0

    def part_stats(self, labels, batch):
        """Statistics of the parts a task adds to the boxes (a pose model's keypoints), kept per batch beside the
        box statistics: {name: tensor}. Detection has none."""
        return {}

    def _batch_detections(self, preds, device):
        """All images' detections (P, 6+) in one new tensor (batch pixels), and each one's image index (P,)."""
        counts = torch.tensor([len(p) for p in preds], device=device)
        detections = torch.cat([p.detach().float() for p in preds]) if preds else torch.zeros(0, 6, device=device)
        pred_image = torch.repeat_interleave(torch.arange(len(preds), device=device), counts)
        if self.args.single_cls:
            detections[:, 5] = 0
        return detections, pred_image

    @staticmethod
    def _letterbox_params(batch, device):
        """(B, 2) gain (w, h), pad (w, h) and original size (w, h) of each image, from `ratio_pad` / `ori_shape`."""
        letterboxes = zip(batch["ratio_pad"], batch["ori_shape"])
        rows = [(gw, gh, pw, ph, w0, h0) for ((gh, gw), (pw, ph)), (h0, w0) in letterboxes]
        params = torch.tensor(rows, dtype=torch.float32).reshape(-1, 6).to(device, non_blocking=True)
        return params[:, 0:2], params[:, 2:4], params[:, 4:6]

    def compute(self):
        """DetMetrics over all accumulated predictions (of all ranks, in batch order); returns its results dict
        (with "fitness")."""
        super().compute()
        records = [{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in r.items()} for r in self.stats]
        records = sorted((r for part in self.gathered(records) for r in part), key=lambda r: r["position"])
        self.seen = sum(r["seen"] for r in records)
        stats = {key: torch.cat([r[key] for r in records]).numpy() if records else np.zeros(0)
                 for key in self.stat_keys}
        target_cls = stats["target_cls"].astype(np.int64)
        self.nt_per_class = np.bincount(target_cls, minlength=self.nc)
        self.nt_per_image = np.bincount(stats["target_img"].astype(np.int64), minlength=self.nc)
        if self.sharded:
            self.confusion_matrix.matrix = sum(self.gathered(self.confusion_matrix.matrix))
            if self.args.save_json:
                cpu_records = [(p, f, c, d.cpu()) for p, f, c, d in self.json_records]
                gathered = (r for part in self.gathered(cpu_records) for r in part)
                self.json_records = sorted(gathered, key=lambda r: r[0])
        if len(target_cls) == 0:
            LOGGER.warning(f"no labels found in the {self.args.split} set, so no metrics can be computed")
        self.metrics.speed = dict(self.speed)
        return self.process_metrics(stats)

    def process_metrics(self, stats):
        """The metrics object's results from the joined statistics (numpy arrays named by `stat_keys`)."""
        tp = stats["tp"].reshape(-1, len(self.iouv)).astype(bool)
        return self.metrics.process(tp, stats["conf"], stats["pred_cls"], stats["target_cls"].astype(np.int64))

    # ------------------------------------------------------------------ reporting
    def progress_description(self):
        return ("%22s" + "%11s" * (len(self.table_header) - 1)) % self.table_header

    def log_results(self):
        """The table: one "all" row, then one row per class (when verbose or fewer than 50 classes) outside training:
        after each training epoch the "all" row is enough, and the final validation of best.pt has the classes."""
        row = "%22s" + "%11i" * 2 + "%11.3g" * (len(self.table_header) - 3)
        LOGGER.info(self.progress_description())
        LOGGER.info(row % ("all", self.seen, self.nt_per_class.sum(), *self.metrics.mean_results()))
        if self.nc > 1 and not self.training and (self.args.verbose or self.nc < PER_CLASS_ROWS_MAX_NC):
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
                keypoints=batch["keypoints"].cpu() if "keypoints" in batch else None, outlines=label_outlines(batch),
            )  # fmt: skip
            shown = [p[:PLOT_MAX_DET].detach().float().cpu() for p in preds]
            image_index = torch.cat([torch.full((len(p),), i) for i, p in enumerate(shown)])
            detections = torch.cat(shown) if shown else torch.zeros(0, 6)
            plot_images(
                batch["img"], image_index, detections[:, 5], detections[:, :5],
                paths=batch.get("im_file"), fname=self.save_dir / f"val_batch{batch_i}_pred.jpg", names=self.names,
                keypoints=self.predicted_keypoints(detections),
                outlines=self.predicted_outlines(detections, image_index, batch),
            )  # fmt: skip
        except Exception as e:  # a plot must never stop a validation (or the training around it)
            LOGGER.warning(f"validation batch plot failed: {e}")

    def predicted_keypoints(self, detections):
        """The keypoints (n, K, D) of detections (n, 6+) for plots; a detector has none."""
        return None

    def predicted_outlines(self, detections, image_index, batch):
        """The outlines (n, P, 2) in batch-image pixels of detections (n, 6+) of the batch's images `image_index`
        (n,), for plots (a rotated box's corners, a mask's outline); a detector has none."""
        return None

    def plot_metrics(self):
        """The confusion matrix as counts and normalised per true class (the PR and confidence curves are drawn by
        DetMetrics.process)."""
        try:
            for normalize in (False, True):
                self.confusion_matrix.plot(normalize=normalize, save_dir=self.save_dir, names=self.names)
        except Exception as e:
            LOGGER.warning(f"confusion matrix plot failed: {e}")

    def save_outputs(self):
        """predictions.json in save_dir when save_json is on (format in the module docstring), written by rank 0;
        on a dataset converted from COCO it is then scored by pycocotools too (`coco_stats`)."""
        self.coco_stats = {}
        if not self.args.save_json or not dist.is_main():
            return
        from yolotrain.utils.checkpoint import save_atomic_text

        coco = coco_source(self.data, self.args.split)
        path = Path(self.save_dir) / "predictions.json"
        predictions = self.coco_predictions(coco)
        save_atomic_text(json.dumps(predictions), path)
        LOGGER.info(f"Saving {path} ({len(predictions)} predictions)")
        if coco is not None:
            self.coco_stats = self._pycocotools_eval(coco.annotations, path)

    def _pycocotools_eval(self, annotations, predictions_path):
        """pycocotools' mAP50-95 / mAP50 of predictions.json for each of `coco_parts` (its iouType and our figures),
        logged beside ours; {} without pycocotools."""
        try:
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval
        except ImportError:
            LOGGER.info("pycocotools is not installed: predictions.json is not scored by it (pip install pycocotools)")
            return {}
        if not self.json_records or not any(counts for _, _, counts, _ in self.json_records):
            return {}  # pycocotools cannot load an empty results list
        stats = {}
        try:
            with contextlib.redirect_stdout(io.StringIO()) as printed:
                ground_truth = COCO(str(annotations))
                detections = ground_truth.loadRes(str(predictions_path))
                seen = {i for i in self._image_ids_seen() if isinstance(i, int)}  # a val set may be a subset
                for iou_type, suffix in self.coco_parts:
                    evaluation = COCOeval(ground_truth, detections, iou_type)
                    evaluation.params.imgIds = sorted(seen & set(ground_truth.getImgIds()))
                    self.configure_coco_evaluation(evaluation)
                    evaluation.evaluate()
                    evaluation.accumulate()
                    evaluation.summarize()
                    stats[suffix] = (float(evaluation.stats[0]), float(evaluation.stats[1]))
        except Exception as e:  # a broken annotation file must not end a validation that has its own metrics
            LOGGER.warning(f"pycocotools evaluation of {predictions_path} failed: {e}")
            return {}
        LOGGER.info(printed.getvalue().rstrip())
        LOGGER.info("%22s%11s%13s" % ("", "yolotrain", "pycocotools"))
        results = {}
        for suffix, (theirs_map, theirs_map50) in stats.items():
            ours = {key: self.metrics[f"metrics/{key}({suffix})"] for key in ("mAP50-95", "mAP50")}
            theirs = {"mAP50-95": theirs_map, "mAP50": theirs_map50}
            for key in ours:
                LOGGER.info("%22s%11.4g%13.4g" % (f"{key}({suffix})", ours[key], theirs[key]))
                results[f"coco/{key}({suffix})"] = theirs[key]
        return results

    def configure_coco_evaluation(self, evaluation):
        """Set up a pycocotools `COCOeval` before it runs (the pose validator gives it the keypoint sigmas)."""

    def _image_ids_seen(self):
        return [image_id for _, files, _, _ in self.json_records for image_id in self._image_ids(files)]

    def _image_ids(self, im_files, coco=None):
        coco = coco if coco is not None else getattr(self, "_coco", None)
        return [coco_image_id(f, coco) for f in im_files]

    def results(self, stats, trainer=None):
        """The metrics dict; standalone, pycocotools' figures follow ours when predictions.json was scored."""
        results = super().results(stats, trainer)
        if trainer is None and getattr(self, "coco_stats", None):
            fitness = results.pop("fitness", None)
            results.update(self.coco_stats)
            if fitness is not None:
                results["fitness"] = fitness
        return results

    def coco_predictions(self, coco=None):
        """The COCO results list from the accumulated detections: COCO image and category ids when the dataset
        was converted from COCO (`coco`, a `CocoSource`), else the file stem and the class index."""
        self._coco = coco
        category_ids = np.asarray(coco.category_ids, np.int64) if coco is not None else None
        records = []
        for _, im_files, counts, detections in self.json_records:
            rows = detections.cpu().numpy().astype(np.float64)
            boxes = rows[:, :4].copy()
            boxes[:, 2:] -= boxes[:, :2]  # COCO boxes: x_min, y_min, width, height
            classes = rows[:, 5].astype(np.int64)
            if category_ids is not None:
                classes = category_ids[classes]
            image_ids = np.repeat(np.asarray(self._image_ids(im_files, coco), dtype=object), counts)
            boxes, scores = np.round(boxes, 3).tolist(), np.round(rows[:, 4], 5).tolist()
            records.extend(  # serialisation: one dict per box is what COCO json is
                {"image_id": i, "category_id": int(c), "bbox": b, "score": sc}
                for i, b, sc, c in zip(image_ids.tolist(), boxes, scores, classes.tolist())
            )
        return records


def label_outlines(batch):
    """The labels' outlines for batch plots: rotated boxes' corners or polygons (normalised), else None."""
    for key in ("corners", "segments"):
        if key in batch:
            return batch[key].cpu()
    return None


@dataclass
class BatchLabels:
    """One validation batch matched in original-image pixels: detections (P, 6+) and their image index (P,), label
    boxes (G, 4), classes (G,) and image index (G,), the batch's image count and most detections / labels of one
    image, and each image's letterbox gain (w, h), pad (w, h) and original size (w, h) as (B, 2) tensors."""

    detections: torch.Tensor
    pred_image: torch.Tensor
    gt_boxes: torch.Tensor
    gt_cls: torch.Tensor
    gt_image: torch.Tensor
    num_images: int
    max_preds: int
    max_boxes: int
    gain: torch.Tensor
    pad: torch.Tensor
    shape: torch.Tensor


@dataclass
class CocoSource:
    """What `yolotrain convert coco` recorded in the data yaml: the annotation file and each class's category id."""

    annotations: Path
    category_ids: list
    image_ids: dict  # file name (as listed in the annotation file, and its base name) -> COCO image id


def coco_source(data, split):
    """The `CocoSource` of `split` when the data yaml has `coco_json` (a path, or {split: path}) and
    `coco_category_ids`; None otherwise. Relative paths resolve against the yaml's folder."""
    if not data or not data.get("coco_json") or not data.get("coco_category_ids"):
        return None
    source = data["coco_json"]
    source = source.get(split) if isinstance(source, dict) else source
    if not source:
        return None
    path = Path(str(source)).expanduser()
    if not path.is_absolute() and data.get("yaml_file"):
        path = Path(data["yaml_file"]).parent / path
    if not path.is_file():
        LOGGER.warning(f"coco_json: {path} not found, predictions.json keeps class indices and file stems")
        return None
    images = json.loads(path.read_text(encoding="utf-8")).get("images", [])
    image_ids = {}
    for image in images:
        image_ids.setdefault(Path(image["file_name"]).name, image["id"])
        image_ids[str(image["file_name"])] = image["id"]
    return CocoSource(path, [int(c) for c in data["coco_category_ids"]], image_ids)


def coco_image_id(im_file, coco=None):
    """The image id of `im_file` in predictions.json: its COCO id when known, else int(stem) for a numeric stem
    (COCO's file naming), else the stem."""
    if coco is not None:
        image_id = coco.image_ids.get(Path(im_file).name)
        if image_id is not None:
            return image_id
    stem = Path(im_file).stem
    return int(stem) if stem.isnumeric() else stem
