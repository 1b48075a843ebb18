"""OBBTrainer: DetectionTrainer with rotated-box labels (4 corners), an `OBBModel` and its loss, and the oriented-box
validator."""

import copy

from yolotrain.loss.obb import obb_loss_item_names
from yolotrain.tasks.detect.train import DetectionTrainer


class OBBTrainer(DetectionTrainer):
    """Trains an `OBBModel` on a YOLO OBB dataset (rows `cls x1 y1 x2 y2 x3 y3 x4 y4`), or on the built-in
    oriented-box set when `data` is empty.

    Example:
        >>> from yolotrain.tasks.obb.train import OBBTrainer
        >>> OBBTrainer(overrides={"model": "yolo11n-obb.yaml", "epochs": 3}).train()
    """

    task = "obb"

    def __init__(self, cfg=None, overrides=None, _callbacks=None):
        super().__init__(cfg, overrides, _callbacks)
        self.loss_names = obb_loss_item_names()

    def new_model(self, cfg, verbose=True):
        """An `OBBModel` for the dataset's classes."""
        from yolotrain.nn.model import OBBModel

        return OBBModel(cfg, nc=len(self.class_names()), verbose=verbose)

    def set_model_attributes(self):
        """Detection's attributes and the four oriented-box loss names."""
        super().set_model_attributes()
        from yolotrain.utils.torch_utils import de_parallel

        self.loss_names = obb_loss_item_names(de_parallel(self.model).head.reg_max)

    def get_validator(self):
        from yolotrain.tasks.obb.val import OBBValidator

        return OBBValidator(self.test_loader, save_dir=self.save_dir, args=copy.copy(self.args),
                            _callbacks=self.callbacks)

    def autobatch_batch(self, batch_size, imgsz, device):
        """Detection's synthetic batch with each box's corners (axis-aligned rotated boxes)."""
        import torch

        batch = super().autobatch_batch(batch_size, imgsz, device)
        cx, cy, w, h = batch["bboxes"].unbind(-1)
        batch["corners"] = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy - h / 2, cx + w / 2, cy + h / 2,
                                        cx - w / 2, cy + h / 2], -1).view(-1, 4, 2)
        return batch
