"""The tasks and the classes that serve each: `task_classes("detect")` names its model, trainer, validator and
predictor by explicit imports, so every entry point (the `YOLO` object, the command line) dispatches on a task
name through this one table and a reader can follow each class to its definition.
"""

from dataclasses import dataclass

from yolotrain.cfg import TASKS
from yolotrain.errors import CfgError


@dataclass(frozen=True)
class TaskClasses:
    """What serves one task: its model, trainer, validator and predictor classes."""

    model: type
    trainer: type
    validator: type
    predictor: type


def task_classes(task: str) -> TaskClasses:
    """The classes of `task` (one of `cfg.TASKS`), imported when first asked for (they import torch)."""
    if task == "detect":
        from yolotrain.nn.model import DetectionModel
        from yolotrain.tasks.detect.predict import DetectionPredictor
        from yolotrain.tasks.detect.train import DetectionTrainer
        from yolotrain.tasks.detect.val import DetectionValidator

        return TaskClasses(DetectionModel, DetectionTrainer, DetectionValidator, DetectionPredictor)
    if task == "segment":
        from yolotrain.nn.model import SegmentationModel
        from yolotrain.tasks.segment.predict import SegmentationPredictor
        from yolotrain.tasks.segment.train import SegmentationTrainer
        from yolotrain.tasks.segment.val import SegmentationValidator

        return TaskClasses(SegmentationModel, SegmentationTrainer, SegmentationValidator, SegmentationPredictor)
    if task == "pose":
        from yolotrain.nn.model import PoseModel
        from yolotrain.tasks.pose.predict import PosePredictor
        from yolotrain.tasks.pose.train import PoseTrainer
        from yolotrain.tasks.pose.val import PoseValidator

        return TaskClasses(PoseModel, PoseTrainer, PoseValidator, PosePredictor)
    if task == "obb":
        from yolotrain.nn.model import OBBModel
        from yolotrain.tasks.obb.predict import OBBPredictor
        from yolotrain.tasks.obb.train import OBBTrainer
        from yolotrain.tasks.obb.val import OBBValidator

        return TaskClasses(OBBModel, OBBTrainer, OBBValidator, OBBPredictor)
    if task == "classify":
        from yolotrain.nn.model import ClassificationModel
        from yolotrain.tasks.classify.predict import ClassificationPredictor
        from yolotrain.tasks.classify.train import ClassificationTrainer
        from yolotrain.tasks.classify.val import ClassificationValidator

        return TaskClasses(ClassificationModel, ClassificationTrainer, ClassificationValidator,
                           ClassificationPredictor)
    raise CfgError(f"task={task!r} is not one of {', '.join(TASKS)}")
