"""ClassificationTrainer: BaseTrainer plus class folders, the classifier, cross-entropy and the top-k validator."""

import copy
import logging

import torch

from yolotrain.cfg import DEFAULT_MODELS
from yolotrain.engine.trainer import BaseTrainer
from yolotrain.utils import dist
from yolotrain.utils.threads import cpu_compute_threads
from yolotrain.utils.torch_utils import de_parallel

LOGGER = logging.getLogger(__name__)


class ClassificationTrainer(BaseTrainer):
    """Trains a `ClassificationModel` on a folder of class folders (the built-in shape crops when `data` is empty).

    Example:
        >>> from yolotrain.tasks.classify.train import ClassificationTrainer
        >>> ClassificationTrainer(overrides={"model": "yolo11n-cls.yaml", "epochs": 3, "imgsz": 64}).train()
    """

    task = "classify"

    def get_dataset(self):
        """Check the dataset folder (or generate the built-in shape crops) and return the resolved data dict."""
        from yolotrain.data.builtin import builtin_classify_root
        from yolotrain.tasks.classify.dataset import check_cls_dataset

        data = self.args.data
        if not data:
            data = builtin_classify_root()
            LOGGER.info(f"data: no data= given, using the built-in shape crops at {data}")
        return check_cls_dataset(data)

    def class_names(self):
        return dict(self.data["names"])

    def get_model(self, cfg=None, weights=None, verbose=True):
        """Build the classifier from a yaml (or a checkpoint's stored yaml) with the dataset's class count; `weights`
        (a classifier's or a detector's checkpoint) give every tensor whose name and shape match."""
        from yolotrain.nn.model import ClassificationModel
        from yolotrain.utils.checkpoint import is_weights_file, load_checkpoint

        cfg = cfg or DEFAULT_MODELS["classify"]
        if is_weights_file(cfg):
            cfg = load_checkpoint(cfg)["model_yaml"]
        model = ClassificationModel(cfg, nc=len(self.class_names()), verbose=verbose and dist.is_main())
        model.head.drop.p = float(self.args.dropout)
        if weights:
            checkpoint = load_checkpoint(weights)
            model.load(checkpoint.get("ema") or checkpoint["model"])
            LOGGER.info(f"pretrained: weights transferred from {weights}")
        return model

    def build_dataset(self, img_path, mode="train", batch=None):
        """A `ClassificationDataset`: augmented for training, centre-cropped for validation."""
        from yolotrain.tasks.classify.dataset import ClassificationDataset

        training = mode == "train"
        return ClassificationDataset(
            img_path, list(self.class_names().values()), imgsz=self._train_imgsz(), augment=training, hyp=self.args,
            cache=self.args.cache or False, fraction=self.args.fraction if training else 1.0, prefix=mode,
        )

    def get_dataloader(self, dataset_path, batch_size=16, rank=0, mode="train"):
        """The DataLoader for `mode`; each rank reads its own shard when distributed."""
        from yolotrain.data.loader import build_dataloader
        from yolotrain.tasks.classify.dataset import collate_classify

        dataset = self.build_dataset(dataset_path, mode, batch_size)
        training = mode == "train"
        workers = self.args.workers if training else self.args.workers * 2
        return build_dataloader(dataset, batch_size, workers, training, rank=rank, seed=self.args.seed,
                                world_size=dist.world_size(), exact_shard=not training, collate=collate_classify,
                                compute_threads=cpu_compute_threads(self.device, self.governor))

    def preprocess_batch(self, batch):
        """Images to the device as float [0, 1], class ids to the device."""
        batch["img"] = batch["img"].to(self.device, non_blocking=True).float() / 255
        batch["cls"] = batch["cls"].to(self.device, non_blocking=True)
        return batch

    def set_model_attributes(self):
        model = de_parallel(self.model)
        model.names = self.class_names()
        model.nc = len(model.names)
        model.args = self.args

    def get_validator(self):
        """A `ClassificationValidator` over the val loader, sharing this trainer's callbacks."""
        from yolotrain.tasks.classify.val import ClassificationValidator

        return ClassificationValidator(self.test_loader, save_dir=self.save_dir, args=copy.copy(self.args),
                                       _callbacks=self.callbacks)

    def autobatch_batch(self, batch_size, imgsz, device):
        """Random images with random class ids."""
        nc = de_parallel(self.model).nc
        return {"img": torch.rand(batch_size, 3, imgsz, imgsz, device=device),
                "cls": torch.randint(0, nc, (batch_size,), device=device)}

    def checkpoint_extras(self):
        """What a checkpoint needs to rebuild the model on its own."""
        names = self.class_names()
        return {"model_yaml": de_parallel(self.model).yaml, "names": names, "nc": len(names)}

    def validate_checkpoint(self, path):
        """Validate the weights stored in `path` (best.pt at the end of training), with plots."""
        self.validator.args.plots = self.args.plots
        return self.validator(model=path)
