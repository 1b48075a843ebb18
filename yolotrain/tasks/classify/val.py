"""ClassificationValidator: top-1 / top-5 accuracy and the confusion matrix of a classifier on a class-folder split."""

import logging
from pathlib import Path

import torch

from yolotrain.engine.validator import BaseValidator
from yolotrain.errors import DatasetError
from yolotrain.utils.metrics import ClassifyConfusionMatrix, ClassifyMetrics
from yolotrain.utils.threads import cpu_compute_threads
from yolotrain.utils.torch_utils import de_parallel

LOGGER = logging.getLogger(__name__)

TOP_K = 5
PLOTTED_IMAGES = 16  # images per val_batch{i}_labels.jpg / _pred.jpg


class ClassificationValidator(BaseValidator):
    """Validator of `ClassificationModel`s; see `BaseValidator` for the driver and the callback events.

    Example:
        >>> from yolotrain.tasks.classify.val import ClassificationValidator
        >>> metrics = ClassificationValidator(args={"data": "path/to/folder", "imgsz": 224})(model="best.pt")
        >>> metrics.top1, metrics.top5

    After a run: `metrics` (a `ClassifyMetrics`), `confusion_matrix`, `names`, `nc`, `seen`, `speed`.
    """

    loss_names = ("loss",)
    primary_metric = "metrics/accuracy_top1"

    def __init__(self, dataloader=None, save_dir=None, args=None, _callbacks=None):
        super().__init__(dataloader, save_dir, args, _callbacks)
        self.metrics = ClassifyMetrics()
        self.confusion_matrix = None
        self.records = []  # per batch: {"position", "targets" (B,), "top5" (B, k)}

    # ------------------------------------------------------------------ standalone set-up
    def load_model(self, path):
        """The classifier in `path`: a yolotrain checkpoint, safetensors, or an exported .onnx / .torchscript."""
        from yolotrain.nn.backends import load_inference_model

        return load_inference_model(path)

    def build_dataloader(self, model):
        """Centre-cropped loader of `args.split` of the dataset folder `args.data` (the built-in crops when empty)."""
        from yolotrain.data.loader import build_dataloader
        from yolotrain.nn.backends import fixed_input_size
        from yolotrain.tasks.classify.dataset import ClassificationDataset, check_cls_dataset, collate_classify

        if self.args.data:
            data = self.args.data
        else:
            from yolotrain.data.builtin import builtin_classify_root

            data = builtin_classify_root()
            LOGGER.info(f"data: no data= given, validating on the built-in shape crops at {data}")
        self.data = check_cls_dataset(data)
        split = self.args.split
        if not self.data.get(split):
            raise DatasetError(f"data={data}: split={split!r} has no folder; expected val, test or train")
        fixed = fixed_input_size(model, self.args.imgsz)
        imgsz = fixed[0] if fixed else self.args.imgsz
        dataset = ClassificationDataset(self.data[split], list(self.data["names"].values()), imgsz=imgsz,
                                        prefix=split, workers=self.args.workers)
        batch = max(int(self.args.batch), 1)
        return build_dataloader(dataset, batch, self.args.workers, shuffle=False, rank=-1, seed=self.args.seed,
                                collate=collate_classify, compute_threads=cpu_compute_threads(self.device,
                                                                                             self.governor))

    # ------------------------------------------------------------------ evaluator
    def metric_names(self):
        return list(self.metrics.mean_result_keys)

    def init_metrics(self, model, dataloader):
        names = getattr(getattr(dataloader, "dataset", None), "names", None) or getattr(model, "names", None) or {}
        self.names = {int(k): str(v) for k, v in dict(names).items()}
        self.nc = len(self.names)
        model_nc = getattr(de_parallel(model), "nc", self.nc)
        if model_nc != self.nc:
            LOGGER.warning(f"the model predicts {model_nc} classes but the dataset has {self.nc}; metrics may mislead")
        self.confusion_matrix = ClassifyConfusionMatrix(max(self.nc, model_nc))
        self.metrics = ClassifyMetrics(names=self.names, save_dir=self.save_dir,
                                       confusion_matrix=self.confusion_matrix)

    def reset(self):
        super().reset()
        self.records = []

    def preprocess(self, batch):
        """uint8 images -> float [0, 1] on the device; class ids to the device (the loss needs them there)."""
        batch = dict(batch)
        images = batch["img"].to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        batch["img"] = images.float().div_(255)
        batch["cls"] = batch["cls"].to(self.device, non_blocking=True)
        return batch

    def eval_batch_loss(self, model, batch, preds):
        return model.loss(batch, preds)[1]

    def postprocess(self, preds):
        """The class probabilities (B, nc), from an eval forward's `(probabilities, logits)` or an export's output."""
        return preds[0] if isinstance(preds, (list, tuple)) else preds

    def update(self, preds, batch):
        k = min(TOP_K, preds.shape[1])
        self.records.append({"position": self.batch_position, "targets": batch["cls"].view(-1).cpu(),
                             "top5": preds.float().topk(k, 1).indices.cpu()})
        self.seen += len(preds)

    def compute(self):
        """Accuracies over every image (of all ranks, in batch order); returns the results dict (with "fitness")."""
        super().compute()
        records = sorted((r for part in self.gathered(self.records) for r in part), key=lambda r: r["position"])
        self.seen = sum(len(r["targets"]) for r in records)
        targets = torch.cat([r["targets"] for r in records]) if records else torch.zeros(0, dtype=torch.int64)
        top5 = torch.cat([r["top5"] for r in records]) if records else torch.zeros(0, TOP_K, dtype=torch.int64)
        if self.plot_stats:
            self.confusion_matrix.process(top5[:, 0], targets)
        self.metrics.speed = dict(self.speed)
        return self.metrics.process(targets, top5)

    # ------------------------------------------------------------------ reporting
    def progress_description(self):
        return ("%22s" + "%11s" * 2) % ("classes", "top1_acc", "top5_acc")

    def log_results(self):
        LOGGER.info(self.progress_description())
        LOGGER.info(("%22s" + "%11.3g" * 2) % ("all", self.metrics.top1, self.metrics.top5))

    def plot_batch(self, batch, preds, batch_i):
        """val_batch{i}_labels.jpg and val_batch{i}_pred.jpg: the first images titled with their classes."""
        from yolotrain.utils.plotting import plot_classified_images

        shown = slice(0, PLOTTED_IMAGES)
        images = (batch["img"][shown] * 255).to(torch.uint8).cpu()
        labels = batch["cls"][shown].view(-1).cpu()
        top = preds[shown].float().max(1)
        for suffix, classes, scores in (("labels", labels, None), ("pred", top.indices.cpu(), top.values.cpu())):
            plot_classified_images(images, classes, self.names, Path(self.save_dir) / f"val_batch{batch_i}_{suffix}.jpg",
                                   scores=scores)

    def plot_metrics(self):
        for normalize in (True, False):
            self.confusion_matrix.plot(normalize, self.save_dir, self.names)
