"""DetectionTrainer: BaseTrainer plus the YOLO dataset, the anchor-free model, its loss and the validator."""

import copy
import functools
import logging
import random

import numpy as np
import torch
import torch.nn.functional as F

from yolotrain.cfg import DEFAULT_MODELS
from yolotrain.data.instances import PER_OBJECT_KEYS
from yolotrain.engine.trainer import BaseTrainer
from yolotrain.loss.detection import loss_item_names
from yolotrain.utils import dist
from yolotrain.utils.threads import cpu_compute_threads
from yolotrain.utils.torch_utils import de_parallel

LOGGER = logging.getLogger(__name__)

TRAIN_BATCH_PLOTS = 3  # training mosaics drawn with their boxes at the start of a run


class DetectionTrainer(BaseTrainer):
    """Trains a `DetectionModel` on a YOLO-format dataset (the built-in shapes dataset when `data` is empty).

    Example:
        >>> from yolotrain import DetectionTrainer
        >>> DetectionTrainer(overrides={"model": "yolo-n.yaml", "epochs": 3}).train()

    `last_batch_shape` is the (B, 3, H, W) shape of the last preprocessed training batch (with `multi_scale`, the
    size the model actually saw), readable from `on_train_batch_end` callbacks.

    An `augment` override that is an object (a callable or an Albumentations Compose) is kept as
    `augment_hook`, outside `args` (whose values are saved as plain types); a `module:name` string stays in `args`.
    """

    task = "detect"

    def __init__(self, cfg=None, overrides=None, _callbacks=None):
        from yolotrain.data.augment_hook import split_augment_hook

        overrides, self.augment_hook = split_augment_hook(overrides)
        super().__init__(cfg, overrides, _callbacks)
        self.loss_names = loss_item_names()
        self._plotted_batches = 0
        self.last_batch_shape = None

    def get_dataset(self):
        """Check the data yaml (or generate the built-in dataset) and return the resolved data dict."""
        from yolotrain.data.builtin import builtin_data_yaml_for
        from yolotrain.data.data_yaml import check_det_dataset

        data = self.args.data
        if not data:
            data = builtin_data_yaml_for(self.task)
            LOGGER.info(f"data: no data= given, using the built-in shapes dataset at {data}")
        return check_det_dataset(data)

    def build_dataset(self, img_path, mode="train", batch=None):
        """A `YOLODataset` for `mode`: augmented for training, letterboxed with rect batches for validation.
        Both drop the labels of classes outside `classes` and use `imgsz` rounded up to the model's stride."""
        from yolotrain.data.dataset import YOLODataset

        training = mode == "train"
        dataset_class = self._train_dataset_class() if training else YOLODataset
        return dataset_class(
            img_path,
            imgsz=self._train_imgsz(),
            augment=training,
            hyp=self.args,
            rect=self.args.rect if training else True,
            batch_size=batch or self.args.batch,
            stride=self._model_stride(),
            pad=0.0 if training else 0.5,
            single_cls=self.args.single_cls,
            classes=self.args.classes,
            fraction=self.args.fraction if training else 1.0,
            cache=self.args.cache or False,
            data=self.data,
            prefix=mode,
            augment_hook=self._augment_hook() if training else None,
            task=self.task,
        )

    def _augment_hook(self):
        """The `augment` hook object (given from Python, or imported from its `module:name` argument), or None."""
        from yolotrain.data.augment_hook import hook_name, resolve_augment_hook

        hook = resolve_augment_hook(self.augment_hook if self.augment_hook is not None else self.args.augment)
        if hook is not None:
            LOGGER.info(f"augment: {hook_name(hook)} runs on every training sample after mosaic/affine")
        return hook

    def _train_dataset_class(self):
        """`YOLODataset` (augmenting in the loader workers) or, with `augment_device`, `DeviceAugmentDataset`
        (the workers only decode, or on CUDA with torchvision only read the JPEGs; `preprocess_batch` augments on
        the device). Decided once, logged as resolved."""
        from yolotrain.data.dataset import YOLODataset
        from yolotrain.data.device_augment import DeviceAugmentDataset, check_device_augment, jpeg_decoder_for

        if getattr(self.resolved, "augment_on_device", None) is None:
            has_hook = self.augment_hook is not None or bool(getattr(self.args, "augment", None))
            self.resolved.augment_on_device = check_device_augment(self.args, self.device, augment_hook=has_hook)
        if not self.resolved.augment_on_device:
            return YOLODataset
        return functools.partial(DeviceAugmentDataset, decode_on_device=jpeg_decoder_for(self.device))

    def get_dataloader(self, dataset_path, batch_size=16, rank=0, mode="train"):
        """The DataLoader for `mode`; each rank reads its own shard when distributed. Training shuffles (rect: whole
        batches of one shape as groups) or, with `image_weights`, draws images by class content and class mAP."""
        from yolotrain.data.loader import build_dataloader

        dataset = self.build_dataset(dataset_path, mode, batch_size)
        training = mode == "train"
        workers = self.args.workers if training else self.args.workers * 2
        return build_dataloader(
            dataset, batch_size, workers, training, rank=rank, seed=self.args.seed, world_size=dist.world_size(),
            image_weights=training and self.args.image_weights, exact_shard=not training,
            compute_threads=cpu_compute_threads(self.device, self.governor),
        )

    def preprocess_batch(self, batch):
        """Move the batch to the device, scale images to [0, 1] (a `DeviceAugmentDataset` batch: augment it there)
        and, with multi_scale, resize the batch."""
        if "augment_seed" in batch:
            batch = self.train_loader.dataset.device_augment.preprocess(batch, self.device)
        else:
            batch["img"] = batch["img"].to(self.device, non_blocking=True).float() / 255
            for key in ("batch_idx", *PER_OBJECT_KEYS, "masks"):  # the labels the task's samples carry
                if key in batch:
                    batch[key] = batch[key].to(self.device, non_blocking=True)
        if self.args.multi_scale:
            batch["img"] = self._random_rescale(batch["img"])
        self.last_batch_shape = tuple(batch["img"].shape)
        self._plot_training_batch(batch)
        return batch

    def _random_rescale(self, images):
        """Resize a batch to a random multiple of the stride within imgsz * (1 +/- r), r = 0.5 for
        multi_scale=True or the share given (labels are normalised, so they need no change)."""
        from yolotrain.data.augment import multi_scale_sizes

        stride = self._model_stride()
        size = random.choice(multi_scale_sizes(self._train_imgsz(), stride, self.args.multi_scale))
        scale = size / max(images.shape[2:])
        if scale == 1:
            return images
        new_shape = [max(stride, round(x * scale / stride) * stride) for x in images.shape[2:]]
        return F.interpolate(images, size=new_shape, mode="bilinear", align_corners=False)

    def class_names(self):
        """{id: name} of the classes the model learns: the dataset's, or with `single_cls` one class (the dataset's
        name when it has one class, else "item"); what the model and its checkpoints carry."""
        from yolotrain.data.data_yaml import single_class_names

        names = dict(self.data["names"])
        return single_class_names(names) if self.args.single_cls else names

    def get_model(self, cfg=None, weights=None, verbose=True):
        """Build the model from a yaml (or a checkpoint's stored yaml) with the dataset's class count."""
        from yolotrain.utils.checkpoint import is_weights_file, load_checkpoint

        cfg = cfg or DEFAULT_MODELS[self.task]
        if is_weights_file(cfg):
            cfg = load_checkpoint(cfg)["model_yaml"]
        model = self.new_model(cfg, verbose=verbose and dist.is_main())
        if weights:
            checkpoint = load_checkpoint(weights)
            model.load(checkpoint.get("ema") or checkpoint["model"])
            LOGGER.info(f"pretrained: weights transferred from {weights}")
        return model

    def new_model(self, cfg, verbose=True):
        """A new model of this task from a model yaml (or its dict), sized for the dataset."""
        from yolotrain.nn.model import DetectionModel

        return DetectionModel(cfg, nc=len(self.class_names()), verbose=verbose)

    def set_model_attributes(self):
        """Give the model its classes, hyperparameters (read by the loss) and optional class weights."""
        from yolotrain.loss.detection import class_weights_from_labels

        model = de_parallel(self.model)
        model.names = self.class_names()
        model.nc = len(model.names)
        model.args = self.args
        self.loss_names = loss_item_names(model.head.reg_max)
        if model.end2end:
            self.add_callback("on_train_epoch_start", _set_loss_epoch)
        if self.args.image_weights:
            self._feed_class_maps_to_sampler()
        if self.args.cls_pw > 0:
            classes = np.concatenate([label["cls"].reshape(-1) for label in self.train_loader.dataset.labels])
            model.class_weights = class_weights_from_labels(classes, model.nc, self.args.cls_pw).to(self.device)
            LOGGER.info(f"cls_pw: class weights {model.class_weights.cpu().numpy().round(3).tolist()}")
        if dist.is_main() and self.args.plots:
            self._plot_training_labels()

    def _feed_class_maps_to_sampler(self):
        """image_weights: each training validation's per-class mAP reweights the sampler's draw; the weights
        are callback state, so checkpoints carry them and resume draws the same images."""
        from yolotrain.data.samplers import ClassMapsFeed

        feed = ClassMapsFeed(self.train_loader.sampler)
        self.add_callback("on_val_end", feed.on_val_end)
        self.add_callback("on_fit_epoch_end", feed.on_fit_epoch_end)

    def get_validator(self):
        """A `DetectionValidator` over the val loader, sharing this trainer's callbacks."""
        from yolotrain.tasks.detect.val import DetectionValidator

        return DetectionValidator(
            self.test_loader, save_dir=self.save_dir, args=copy.copy(self.args), _callbacks=self.callbacks
        )

    def autobatch_batch(self, batch_size, imgsz, device):
        """Random images, each with a few random boxes (the detection loss's cost grows with them)."""
        from yolotrain.engine import autobatch

        return autobatch.synthetic_batch(batch_size, imgsz, device)

    def always_frozen(self):
        """The DFL projection is a fixed integral, never trained."""
        return (".dfl",)

    def checkpoint_extras(self):
        """What a checkpoint needs to rebuild the model on its own."""
        model = de_parallel(self.model)
        names = self.class_names()
        return {"model_yaml": model.yaml, "names": names, "nc": len(names)}

    def validate_checkpoint(self, path):
        """Validate the weights stored in `path` (best.pt at the end of training), with plots."""
        self.validator.args.plots = self.args.plots
        return self.validator(model=path)

    def _plot_training_labels(self):
        try:
            from yolotrain.utils.plotting import plot_labels

            labels = self.train_loader.dataset.labels
            boxes = np.concatenate([label["bboxes"] for label in labels], 0)
            classes = np.concatenate([label["cls"].reshape(-1) for label in labels], 0)
            plot_labels(classes, boxes, self.class_names(), self.save_dir)
        except Exception as e:  # a plot must never stop training
            self._warn_once("plot_labels", f"label statistics plot failed: {e}")

    def _plot_training_batch(self, batch):
        if self._plotted_batches >= TRAIN_BATCH_PLOTS or not (self.args.plots and dist.is_main()):
            return
        try:
            from yolotrain.tasks.detect.val import label_outlines
            from yolotrain.utils.plotting import plot_images

            plot_images(
                (batch["img"] * 255).to(torch.uint8).cpu(),
                batch["batch_idx"].cpu(),
                batch["cls"].cpu().view(-1),
                batch["bboxes"].cpu(),
                paths=batch.get("im_file"),
                fname=self.save_dir / f"train_batch{self._plotted_batches}.jpg",
                names=self.class_names(),
                keypoints=batch["keypoints"].cpu() if "keypoints" in batch else None,
                outlines=label_outlines(batch),
            )
        except Exception as e:
            self._warn_once("plot_images", f"training batch plot failed: {e}")
        self._plotted_batches += 1


def _set_loss_epoch(trainer):
    """End-to-end heads mix their two losses by epoch; the EMA's copy of the loss computes the val loss."""
    for model in (de_parallel(trainer.model), getattr(getattr(trainer, "ema", None), "module", None)):
        if model is not None:
            model.set_loss_epoch(trainer.epoch, trainer.epochs)
