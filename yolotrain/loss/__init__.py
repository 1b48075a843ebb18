"""Detection loss and label assignment."""

from yolotrain.loss.assigner import TaskAlignedAssigner
from yolotrain.loss.detection import DetectionLoss, class_weights_from_labels, distribution_focal_loss

__all__ = ["DetectionLoss", "TaskAlignedAssigner", "class_weights_from_labels", "distribution_focal_loss"]
