"""The `YOLO` facade: one object to train, validate, predict with and export a detector from Python."""

import logging
from pathlib import Path

from yolotrain.cfg import get_cfg
from yolotrain.engine.callbacks import Callbacks
from yolotrain.errors import CfgError
from yolotrain.utils.checkpoint import is_weights_file
from yolotrain.utils.files import run_dir
from yolotrain.utils.log import setup_logging

LOGGER = logging.getLogger(__name__)

EXPORTED_SUFFIXES = (".onnx", ".torchscript")  # files `yolotrain export` writes, run for val and predict


class YOLO:
    """A detection model by name (`"yolo-n.yaml"`) or checkpoint (`"runs/detect/train/weights/best.pt"`).

    Example:
        >>> model = YOLO("yolo-n.yaml")
        >>> model.add_callback("on_fit_epoch_end", lambda trainer: print(trainer.metrics))
        >>> metrics = model.train(data="data.yaml", epochs=3, imgsz=320)
    """

    def __init__(self, model="yolo-n.yaml", task="detect"):
        self.model_path = str(model)
        self.task = task
        self.callbacks = Callbacks()
        self.trainer = None
        self.metrics = None
        self.predictor = None

    def add_callback(self, event, fn):
        """Run `fn(trainer)` (or `fn(validator)` for on_val_* events) on `event`, after earlier callbacks."""
        self.callbacks.add(event, fn)

    def train(self, trainer=None, nprocs=None, **overrides):
        """Train with `overrides` (cfg argument names) and return the final validation metrics.

        `trainer` is the trainer class to use, e.g. a user subclass of `DetectionTrainer`.
        Multi-GPU: `device="0,1,2,3"` starts one process per listed GPU (DDP); `nprocs=N` starts N processes on
        this machine whatever the device (e.g. `nprocs=2, device="cpu"`: two CPU processes over gloo). The trainer
        class and this model's callbacks run in every process; they must be module-level (picklable) objects,
        except on CPU-only/CUDA-untouched parents where workers are forked. After a multi-process run
        `self.trainer` is None (the trainers lived in the worker processes).
        """
        from yolotrain.engine import launch
        from yolotrain.tasks.detect.train import DetectionTrainer

        args = {**overrides, "model": overrides.get("model", self.model_path), "mode": "train", "task": self.task}
        setup_logging(get_cfg(args).verbose)
        trainer_class = trainer or DetectionTrainer
        processes = launch.processes_to_launch(args.get("device"), nprocs)
        if processes:
            return self._train_distributed(trainer_class, args, processes)
        self.trainer = trainer_class(overrides=args, _callbacks=self.callbacks)
        self.metrics = self.trainer.train()
        if self.trainer.best.exists():
            self.model_path = str(self.trainer.best)
        return self.metrics

    def tune(self, **overrides):
        """Search hyperparameters: `iterations` training runs with values drawn from `space`; returns the best.

        Training arguments are given as for `train` (each trial trains with them plus its drawn values); tuning's
        own are `iterations`, `space` (a yaml of ranges; default `cfg/tune_space.yaml`), `backend` (optuna or ray)
        and `ray_address`. `resume=True` continues the newest tuning folder. See `yolotrain.engine.tuner`.
        """
        from yolotrain.engine.tuner import Tuner

        model = overrides.pop("model", self.model_path)
        setup_logging(get_cfg({k: v for k, v in overrides.items() if k == "verbose"}).verbose)
        return Tuner(model, self.task, self.callbacks, overrides).run()

    def _train_distributed(self, trainer_class, args, processes):
        from yolotrain.engine.launch import launch_training

        result = launch_training(trainer_class, args, self.callbacks, processes)
        self.trainer = None
        self.metrics = result["metrics"]
        if Path(result["best"]).exists():
            self.model_path = result["best"]
        return self.metrics

    def val(self, validator=None, **overrides):
        """Validate this model on `data` (its `split`) and return the metrics dict."""
        from yolotrain.tasks.detect.val import DetectionValidator

        args = get_cfg({**overrides, "model": self.model_path, "mode": "val", "task": self.task})
        setup_logging(args.verbose)
        save_dir = run_dir(args, "val")
        validator = (validator or DetectionValidator)(save_dir=save_dir, args=args, _callbacks=self.callbacks)
        self.metrics = validator(model=self._model_for_val())
        return self.metrics

    def predict(self, source=None, stream=False, **overrides):
        """Detections for `source` (see `yolotrain.data.sources`): a list of `Results`, or with `stream=True` a
        generator that reads, predicts and yields one frame at a time."""
        from yolotrain.tasks.detect.predict import DetectionPredictor

        source = source if source is not None else overrides.pop("source", None)
        if source is None:
            raise CfgError("predict needs a source: an image, a video, a folder, a glob, a .txt list or an array")
        args = get_cfg({**overrides, "model": self.model_path, "mode": "predict", "task": self.task})
        setup_logging(args.verbose)
        if self.predictor is None or self.predictor.args != args:
            self.predictor = DetectionPredictor(args)
        model = self.predictor.model if self.predictor.model is not None else self._model_for_val()
        results = self.predictor.stream(source, model)
        return results if stream else list(results)

    def __call__(self, source=None, stream=False, **overrides):
        """Same as `predict`."""
        return self.predict(source, stream=stream, **overrides)

    def export(self, **overrides):
        """Write this model as `format` (onnx, torchscript, safetensors) beside its weights; returns the path."""
        from yolotrain.engine.exporter import export_model

        # One image per call unless asked, as deployments run (the training default of batch would be 16).
        args = get_cfg({"batch": 1, **overrides, "model": self.model_path, "mode": "export", "task": self.task})
        setup_logging(args.verbose)
        return export_model(self.model_path, args)

    def _model_for_val(self):
        if is_weights_file(self.model_path) or Path(self.model_path).suffix in EXPORTED_SUFFIXES:
            return self.model_path
        from yolotrain.nn.model import DetectionModel

        return DetectionModel(self.model_path)
