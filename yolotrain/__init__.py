"""yolotrain: a YOLO object-detection training engine."""

__version__ = "0.1.0"

_EXPORTS = {
    "YOLO": "yolotrain.engine.model",
    "BaseTrainer": "yolotrain.engine.trainer",
    "BaseValidator": "yolotrain.engine.validator",
    "DetectionTrainer": "yolotrain.tasks.detect.train",
    "DetectionValidator": "yolotrain.tasks.detect.val",
    "DetectionModel": "yolotrain.nn.model",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    # Imported lazily so that `import yolotrain` (and the CLI's argument errors) stay fast.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'yolotrain' has no attribute {name!r}")
