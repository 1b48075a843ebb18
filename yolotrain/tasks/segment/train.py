"""SegmentationTrainer: DetectionTrainer with polygon labels drawn as masks, a `SegmentationModel` and its loss,
and the segmentation validator."""

import copy

from yolotrain.loss.segment import segment_loss_item_names
from yolotrain.tasks.detect.train import DetectionTrainer
from yolotrain.utils.torch_utils import de_parallel


class SegmentationTrainer(DetectionTrainer):
    """Trains a `SegmentationModel` on a YOLO segmentation dataset (polygon labels), or on the built-in
    segmentation set when `data` is empty.

    Example:
        >>> from yolotrain.tasks.segment.train import SegmentationTrainer
        >>> SegmentationTrainer(overrides={"model": "yolo11n-seg.yaml", "epochs": 3}).train()
    """

    task = "segment"

    def __init__(self, cfg=None, overrides=None, _callbacks=None):
        super().__init__(cfg, overrides, _callbacks)
        self.loss_names = segment_loss_item_names()

    def new_model(self, cfg, verbose=True):
        """A `SegmentationModel` for the dataset's classes."""
        from yolotrain.nn.model import SegmentationModel

        return SegmentationModel(cfg, nc=len(self.class_names()), verbose=verbose)

    def set_model_attributes(self):
        """Detection's attributes and the segmentation loss names (a fifth, `sem_loss`, for a semantic branch)."""
        super().set_model_attributes()
        self.loss_names = segment_loss_item_names(de_parallel(self.model).semantic_branch)

    def get_validator(self):
        from yolotrain.tasks.segment.val import SegmentationValidator

        return SegmentationValidator(self.test_loader, save_dir=self.save_dir, args=copy.copy(self.args),
                                     _callbacks=self.callbacks)

    def autobatch_batch(self, batch_size, imgsz, device):
        """Detection's synthetic batch with one index mask per image (random object pixels)."""
        import torch

        batch = super().autobatch_batch(batch_size, imgsz, device)
        ratio = int(self.args.mask_ratio)
        objects = int(batch["max_boxes"]) + 1
        batch["masks"] = torch.randint(0, objects, (batch_size, imgsz // ratio, imgsz // ratio), device=device,
                                       dtype=torch.uint8)
        return batch
