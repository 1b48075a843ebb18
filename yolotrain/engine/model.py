"""The `YOLO` facade: one object to train, validate, predict with and export a detector from Python."""

import logging
from pathlib import Path

import torch

from yolotrain.cfg import DEFAULT_MODEL, TASKS, get_cfg
from yolotrain.engine.callbacks import Callbacks
from yolotrain.errors import CfgError
from yolotrain.tasks import task_classes
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

    def __init__(self, model=DEFAULT_MODEL, task=None):
        self.model_path = str(model)
        self.callbacks = Callbacks()
        self.trainer = None
        self.metrics = None
        self.predictor = None
        self._module = None  # the torch module, loaded when first asked for
        self._saved = None  # plain entries of the weights file (task, train_args), read once
        self._said = set()  # (mode, settings) taken from the weights and already logged
        self.task = (task or self._saved_entries().get("task") or self._trained_args().get("task")
                     or self._yaml_task() or "detect")
        if self.task not in TASKS:
            what = f"task={self.task!r} is given" if task else f"{self.model_path} holds a {self.task!r} model"
            raise CfgError(f"{what}; the tasks served here are: {', '.join(TASKS)}")

    # ------------------------------------------------------------------ the model itself
    @property
    def model(self):
        """The torch module: the checkpoint's weights, an exported file's runtime, or a fresh model of a yaml."""
        if self._module is None:
            self._module = self._load_module()
        return self._module

    @property
    def names(self):
        """{class id: name} of the model."""
        return dict(self.model.names)

    @property
    def device(self):
        """The device of the model's weights (CPU for an exported file's runtime)."""
        parameter = next(self.model.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    def to(self, *args, **kwargs):
        """Move or cast the model as `nn.Module.to` does; returns self."""
        self.model.to(*args, **kwargs)
        return self

    def fuse(self):
        """Fold BatchNorm layers into their convolutions, for faster inference; returns self."""
        self.model.fuse()
        return self

    def info(self, verbose=True, imgsz=640):
        """Log and return (layers, parameters, gradients, GFLOPs at imgsz) of the model."""
        return self.model.info(imgsz=imgsz, verbose=verbose)

    def _load_module(self):
        from yolotrain.nn.backends import load_inference_model

        if is_weights_file(self.model_path) or Path(self.model_path).suffix in EXPORTED_SUFFIXES:
            return load_inference_model(self.model_path)
        return task_classes(self.task).model(self.model_path, verbose=False)

    # ------------------------------------------------------------------ what the weights remember
    def _saved_entries(self):
        """What a weights file says of itself (task, train_args) or an exported file's metadata (task); none for a
        yaml."""
        if self._saved is None:
            self._saved = {}
            exists = Path(self.model_path).exists()
            if exists and is_weights_file(self.model_path):
                from yolotrain.utils.checkpoint import load_checkpoint

                checkpoint = load_checkpoint(self.model_path)
                self._saved = {k: v for k, v in checkpoint.items() if k in ("task", "train_args")}
                if "task" not in self._saved and isinstance(checkpoint.get("model_yaml"), dict):
                    from yolotrain.nn.model import head_task, load_model_yaml

                    # Weights saved without their task (an imported Ultralytics file): the head says it.
                    self._saved["task"] = head_task(load_model_yaml(checkpoint["model_yaml"]))
            elif exists and Path(self.model_path).suffix in EXPORTED_SUFFIXES:
                self._saved = {"task": self.model.task}
        return self._saved

    def _yaml_task(self):
        """The task of a model yaml's head (None for anything else, or a yaml that cannot be read: the mode then
        says what it needs)."""
        if Path(self.model_path).suffix not in (".yaml", ".yml"):
            return None
        from yolotrain.nn.model import head_task, load_model_yaml

        try:
            return head_task(load_model_yaml(self.model_path))
        except CfgError:
            return None

    def _trained_args(self):
        """The arguments the weights were trained with ({} when they do not say); for an exported file, the image
        size it was exported for."""
        if Path(self.model_path).suffix in EXPORTED_SUFFIXES and Path(self.model_path).exists():
            size = tuple(getattr(self.model, "imgsz", ()) or ())
            return {"imgsz": max(size)} if size else {}
        return dict(self._saved_entries().get("train_args") or {})

    def _mode_args(self, mode, overrides, remembered=(), defaults=None):
        """The checked arguments of `mode`: the caller's `overrides`, then for each `remembered` key the caller did
        not set the value the weights were trained (or exported) with, so `val model=best.pt` runs at the training
        image size on the training data as the run itself did, and says so; then `defaults`. Sets up logging."""
        trained = self._trained_args()
        taken = {key: trained[key] for key in remembered if key not in overrides and trained.get(key) is not None}
        args = get_cfg({**(defaults or {}), **taken, **overrides, "model": self.model_path, "mode": mode,
                        "task": self.task})
        setup_logging(args.verbose)
        settings = ", ".join(f"{key}={value}" for key, value in taken.items())
        if settings and (mode, settings) not in self._said:  # once, not for every frame a stream predicts
            self._said.add((mode, settings))
            LOGGER.info(f"{mode}: {settings}, as saved in {self.model_path} (give them to change them)")
        return args

    # ------------------------------------------------------------------ callbacks
    def add_callback(self, event, fn):
        """Run `fn(trainer)` (or `fn(validator)` for on_val_* events) on `event`, after earlier callbacks."""
        self.callbacks.add(event, fn)

    def clear_callback(self, event):
        """Remove every callback added for `event`."""
        self.callbacks.clear(event)

    def reset_callbacks(self):
        """Remove every callback added to this model (integrations are added by each run on its own)."""
        self.callbacks = Callbacks()

    # ------------------------------------------------------------------ modes
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

        args = {**overrides, "model": overrides.get("model", self.model_path), "mode": "train", "task": self.task}
        setup_logging(get_cfg(args).verbose)
        trainer_class = trainer or task_classes(self.task).trainer
        processes = launch.processes_to_launch(args.get("device"), nprocs)
        if processes:
            return self._train_distributed(trainer_class, args, processes)
        self.trainer = trainer_class(overrides=args, _callbacks=self.callbacks)
        self.metrics = final_metrics(self.trainer, self.trainer.train())
        if self.trainer.best.exists():
            self._use_weights(self.trainer.best)
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
            self._use_weights(result["best"])
        return self.metrics

    def _use_weights(self, path):
        """From now on this object is the model in `path` (what training just wrote)."""
        self.model_path = str(path)
        self._module = self._saved = None
        self._said = set()

    def val(self, validator=None, **overrides):
        """Validate this model on `data` (its `split`) and return its metrics (`DetMetrics`: `metrics.box.map`,
        ..., also the flat mapping `metrics["metrics/mAP50-95(B)"]`). `imgsz` and `data` default to those the
        weights were trained with."""
        args = self._mode_args("val", overrides, remembered=("imgsz", "data"))
        save_dir = run_dir(args, "val")
        validator_class = validator or task_classes(self.task).validator
        validator = validator_class(save_dir=save_dir, args=args, _callbacks=self.callbacks)
        validator(model=self._model_for_val())
        self.metrics = validator.metrics
        return self.metrics

    def predict(self, source=None, stream=False, **overrides):
        """Detections for `source` (see `yolotrain.data.sources`): a list of `Results`, or with `stream=True` a
        generator that reads, predicts and yields one frame at a time. Nothing is written unless asked (`save=True`,
        `save_txt`, `save_crop`): a script predicting in a loop fills no run folders (`yolotrain predict` saves)."""
        source = source if source is not None else overrides.pop("source", None)
        if source is None:
            raise CfgError("predict needs a source: an image, a video, a folder, a glob, a .txt list or an array")
        args = self._mode_args("predict", overrides, remembered=("imgsz",), defaults={"save": False})
        if self.predictor is None or self.predictor.args != args:
            self.predictor = task_classes(self.task).predictor(args)
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
        args = self._mode_args("export", overrides, remembered=("imgsz",), defaults={"batch": 1})
        return export_model(self.model_path, args)

    def _model_for_val(self):
        if is_weights_file(self.model_path) or Path(self.model_path).suffix in EXPORTED_SUFFIXES:
            return self.model_path
        return self.model


def final_metrics(trainer, trainer_metrics):
    """What `train()` returns: the metrics object of the run's last validation (of best.pt when it was
    validated), else the trainer's metrics dict (None when nothing was validated)."""
    validator_metrics = getattr(getattr(trainer, "validator", None), "metrics", None)
    return validator_metrics if validator_metrics is not None else trainer_metrics
