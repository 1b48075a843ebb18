"""PoseTrainer: DetectionTrainer with keypoint labels, a `PoseModel` and its loss, and the pose validator."""

import copy

from yolotrain.loss.pose import pose_loss_item_names
from yolotrain.tasks.detect.train import DetectionTrainer
from yolotrain.utils.torch_utils import de_parallel


class PoseTrainer(DetectionTrainer):
    """Trains a `PoseModel` on a YOLO pose dataset (`kpt_shape`, optional `flip_idx` and `kpt_sigmas` in its data
    yaml), or on the built-in pose set when `data` is empty.

    Example:
        >>> from yolotrain.tasks.pose.train import PoseTrainer
        >>> PoseTrainer(overrides={"model": "yolo11n-pose.yaml", "epochs": 3}).train()
    """

    task = "pose"

    def __init__(self, cfg=None, overrides=None, _callbacks=None):
        super().__init__(cfg, overrides, _callbacks)
        self.loss_names = pose_loss_item_names()

    def get_dataset(self):
        """The data dict, which must name `kpt_shape` (checked with `flip_idx` and `kpt_sigmas`)."""
        from yolotrain.data.data_yaml import require_kpt_shape

        data = super().get_dataset()
        require_kpt_shape(data)
        return data

    def new_model(self, cfg, verbose=True):
        """A `PoseModel` for the dataset's classes and keypoints (a yaml or checkpoint for other keypoints gets a new
        keypoint head)."""
        from yolotrain.nn.model import PoseModel

        return PoseModel(cfg, nc=len(self.class_names()), data_kpt_shape=self.data["kpt_shape"], verbose=verbose)

    def set_model_attributes(self):
        """Detection's attributes, the pose loss names (a sixth, `rle_loss`, for a YOLO26 head) and the data yaml's
        OKS sigmas."""
        super().set_model_attributes()
        de_parallel(self.model).kpt_oks_sigmas = self.data.get("kpt_sigmas")
        self.loss_names = pose_loss_item_names(de_parallel(self.model).rle)

    def get_validator(self):
        from yolotrain.tasks.pose.val import PoseValidator

        return PoseValidator(self.test_loader, save_dir=self.save_dir, args=copy.copy(self.args),
                             _callbacks=self.callbacks)

    def autobatch_batch(self, batch_size, imgsz, device):
        """Detection's synthetic batch with random keypoints of the dataset's shape."""
        import torch

        batch = super().autobatch_batch(batch_size, imgsz, device)
        count, dims = self.data["kpt_shape"]
        batch["keypoints"] = torch.rand(len(batch["cls"]), count, dims, device=device)
        return batch
