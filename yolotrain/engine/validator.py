"""BaseValidator: the task-agnostic evaluation driver.

A validator is an evaluator (`reset()`, `update(preds, batch)`, `compute() -> dict`) plus the driver `__call__`
that runs a model over a dataloader. It runs in two modes:

- during training, `validator(trainer=trainer)`: evaluates the trainer's EMA weights on `trainer.test_loader`
  (through a copy with the BatchNorms folded, kept between validations), also averages the validation losses, and
  returns the metrics the trainer logs;
- standalone, `validator(model=DetectionModel | "path/to/best.pt")`: evaluates a fused copy of the model on
  `args.device`, builds the data loader from `args.data` / `args.split` (unless one was given) and returns the
  metrics.

Distributed training: every rank validates its own share of the val set (a loader built with `exact_shard`, whole
batches, nothing repeated) and `compute()` gathers the accumulated statistics of all ranks, in the order of the
batches, before computing the metrics; so the metrics equal a single-process validation exactly and every rank
returns them. Plots and files are written by rank 0 only. Standalone validation always reads the whole set.

Precision: fp32 unless the trainer trains with autocast (its `amp_dtype`, bf16 also on the CPU; the trainer's final
validation of best.pt too) or, standalone, `half=True`: fp16 autocast on CUDA, bf16 autocast on a CPU that computes
bf16 natively (AMX or AVX-512 BF16; other CPUs emulate it, slower than fp32, so they stay fp32 with a warning). On
the CPU the standalone model and batches are channels-last, the layout the CPU convolution kernels run fastest in.

Tasks subclass it (`DetectionValidator`) and fill in the override points: `preprocess`, `postprocess`,
`init_metrics`, `reset`, `update`, `compute`, `build_dataloader`, `load_model`, `log_results`, `plot_batch`,
`save_outputs`.

Callback events (each `fn(validator)`, in registration order): on_val_start, on_val_batch_start (`self.batch_i`
and `self.batch`, the collated batch before preprocessing, are set), on_val_batch_end, on_val_end.
"""

import contextlib
import logging
import time
from pathlib import Path

import torch

from yolotrain.cfg import Args, get_cfg
from yolotrain.engine.amp import cpu_has_native_bf16
from yolotrain.engine.callbacks import Callbacks
from yolotrain.engine.progress import progress_bar
from yolotrain.errors import YoloTrainError
from yolotrain.utils import dist
from yolotrain.utils.files import ensure_writable_dir, run_dir
from yolotrain.utils.threads import start_thread_governor
from yolotrain.utils.torch_utils import FusedCopy, de_parallel, fused_for_inference, select_device

LOGGER = logging.getLogger(__name__)

SPEED_STAGES = ("preprocess", "inference", "loss", "postprocess")
# Batches drawn as image mosaics (labels and predictions) when plots are on.
PLOTTED_BATCHES = 3


class StageTimer:
    """Wall time spent in named stages; waits for CUDA so GPU work is charged to the stage that queued it."""

    def __init__(self, device):
        self.device = device
        self.seconds = dict.fromkeys(SPEED_STAGES, 0.0)

    def _sync(self):
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, stage):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[stage] += time.perf_counter() - start

    def per_image_ms(self, num_images):
        """{stage: milliseconds per image}."""
        return {stage: 1e3 * s / max(num_images, 1) for stage, s in self.seconds.items()}


class BaseValidator:
    """Evaluates a model on a dataset; see the module docstring for the two modes.

    Args:
        dataloader: the loader to evaluate on; None builds one from `args` (standalone) or uses the trainer's.
        save_dir: folder for plots and predictions.json; None uses `project/name` (default runs/<task>/val).
        args: an `Args` (used as given, never mutated) or a dict of overrides of the defaults.
        _callbacks: a `Callbacks` registry, shared with the trainer when created by it.

    Public attributes after a run: `metrics`, `speed` ({stage: ms per image}), `seen` (images), `names`, `nc`,
    `loss` (mean validation loss items during training, else None), `device`, `save_dir`, `training`.
    """

    # Names of the loss items `model.loss` returns; the trainer's `label_loss_items` gives the final keys.
    loss_names = ()
    # The task's headline metric (a key of the results), which integrations report for best.pt.
    primary_metric = None

    def __init__(self, dataloader=None, save_dir=None, args=None, _callbacks=None):
        self.args = args if isinstance(args, Args) else get_cfg(dict(args or {}))
        self.dataloader = dataloader
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.callbacks = _callbacks if _callbacks is not None else Callbacks()
        self.training = False
        self.device = None
        self.amp_dtype = None  # autocast dtype (the trainer's, or half=True standalone), else None (fp32)
        self.trainer_amp_dtype = None  # a trainer's, set for its final validation of best.pt (see `_setup_standalone`)
        self.channels_last = False  # batches go to the model channels-last (standalone on the CPU)
        self.sharded = False  # this rank evaluates its share of the data; compute() gathers over the ranks
        self.gather_group = None  # process group of that gathering (the trainer's gloo wait group)
        self.batch_positions = []  # global position of each batch of this rank's loader
        self.batch_position = None  # ... of the batch being evaluated (orders gathered statistics)
        self.loss_items = []  # (batch position, loss items) of each validated batch, during training
        self.model = None
        self.data = None
        self.names = {}
        self.nc = 0
        self.metrics = None
        self.seen = 0
        self.loss = None
        self.batch_i = None
        self.batch = None
        self.plots = False  # whether this run draws plots (args.plots, limited to the final epoch in training)
        self.plot_stats = False  # whether plot-only statistics (the confusion matrix) are accumulated, on every rank
        self.speed = dict.fromkeys(SPEED_STAGES, 0.0)
        self.governor = None  # standalone: this process's thread budget (training: the trainer's)
        self._fused = None  # during training: the EMA's fused copy (`FusedCopy`), kept between validations

    # ------------------------------------------------------------------ callbacks
    def add_callback(self, event, fn):
        """Append `fn(validator)` to `event`'s callbacks."""
        self.callbacks.add(event, fn)

    def run_callbacks(self, event):
        """Run every callback of `event` with this validator."""
        self.callbacks.run(event, self)

    # ------------------------------------------------------------------ driver
    def __call__(self, trainer=None, model=None):
        """Evaluate and return the results dict (see `results`). Give `trainer` during training, else `model`."""
        self.training = trainer is not None
        if self.training:
            model, dataloader = self._setup_training(trainer)
        else:
            model, dataloader = self._setup_standalone(model)
        was_training = model.training
        model.eval()
        try:
            self.model = model
            network = self._network(model)
            self._set_sharding(dataloader)
            self.init_metrics(network, dataloader)
            self.reset()
            self.run_callbacks("on_val_start")
            self._run_batches(network, dataloader)
            stats = self.compute()
            self._log_speed()
            self.log_results()
            if self.plots:
                self.plot_metrics()
            self.save_outputs()
            self.run_callbacks("on_val_end")
        finally:
            model.train(was_training)
        return self.results(stats, trainer)

    def _setup_training(self, trainer):
        """The EMA weights (the model's when there is no EMA), the trainer's device and val loader."""
        ema = getattr(trainer, "ema", None)
        model = de_parallel(ema.module if ema is not None else trainer.model)
        self.device = trainer.device
        self.amp_dtype = self._training_amp_dtype(getattr(trainer, "amp_dtype", None))
        self.channels_last = False  # the EMA weights are the trainer's: their layout stays as it is
        self.gather_group = getattr(trainer, "_wait_group", None)
        self.data = getattr(trainer, "data", None) or self.data
        if self.save_dir is None:
            self.save_dir = Path(trainer.save_dir)
        self.plot_stats = bool(self.args.plots) and self._is_final_epoch(trainer)
        self.plots = self.plot_stats and dist.is_main()
        dataloader = getattr(trainer, "test_loader", None)
        return model, dataloader if dataloader is not None else self.dataloader

    def _network(self, model):
        """What computes the predictions: during training a copy of `model` (the EMA weights) with its BatchNorms
        folded, made once and refreshed each validation (`FusedCopy`), the same function at less cost; otherwise
        `model` itself (a standalone validation fuses it once as it loads)."""
        if not self.training:
            return model
        if self._fused is None or self._fused.source is not model:
            self._fused = FusedCopy(model)
        return self._fused.refreshed() if self._fused.copy is not None else model

    def _training_amp_dtype(self, amp_dtype):
        """The trainer's autocast dtype where it helps: any on CUDA, bf16 on the CPU (fp16 is slow there)."""
        if self.device.type == "cuda" or amp_dtype == torch.bfloat16:
            return amp_dtype
        return None

    def _standalone_amp_dtype(self):
        """half=True: fp16 on CUDA, bf16 on a CPU with native bf16; None (fp32) otherwise."""
        if not self.args.half:
            return None
        if self.device.type == "cuda":
            return torch.float16
        if self.device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        LOGGER.warning(f"half=True: {self.device.type} has no native bf16/fp16 arithmetic, validating in fp32")
        return None

    def _set_sharding(self, dataloader):
        """Whether this rank holds one share of the data, and the global position of each of its batches."""
        from yolotrain.data.loader import is_exact_shard

        self.sharded = self.training and dist.is_dist() and is_exact_shard(dataloader)
        sampler = getattr(dataloader, "batch_sampler", None)
        if self.sharded:
            self.batch_positions = list(sampler.batch_positions())
        else:
            self.batch_positions = list(range(len(dataloader)))

    @staticmethod
    def _is_final_epoch(trainer):
        """Plots are drawn once per run: on the last epoch, or when the trainer is about to stop early."""
        possible_stop = bool(getattr(getattr(trainer, "stopper", None), "possible_stop", False))
        return trainer.epoch + 1 >= trainer.epochs or bool(getattr(trainer, "stop", False)) or possible_stop

    def _setup_standalone(self, model):
        """Load/fuse the model on `args.device` and build the data loader unless one was given."""
        if model is None:
            raise YoloTrainError("validation needs model= (a DetectionModel or a checkpoint .pt path), got None")
        from yolotrain.data.loader import unsharded

        self.device = select_device(self.args.device)
        if self.governor is None:  # a trainer validating its best.pt lends its own
            self.governor = start_thread_governor(self.args.threads)
        # best.pt at the end of training: in the precision of the epochs' validations (`half=True` repeats it)
        self.amp_dtype = self._training_amp_dtype(self.trainer_amp_dtype) or self._standalone_amp_dtype()
        self.gather_group = None
        loaded = isinstance(model, (str, Path))
        model = self.load_model(model) if loaded else de_parallel(model)
        # Fusing removes BatchNorm in place: a model the caller gave is fused as a copy, so it can still train.
        fused = fused_for_inference(model, copy_first=not loaded)
        owned = loaded or fused is not model  # a caller's model that was already fused is used as it is
        model = fused.to(self.device)
        # Exported models (ONNX, TorchScript) take their inputs as they were exported: only our own torch model.
        self.channels_last = self.device.type == "cpu" and owned and hasattr(model, "fuse")
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        dataloader = self.dataloader
        if dataloader is None:
            dataloader = self.dataloader = self.build_dataloader(model)
        dataloader = unsharded(dataloader)  # e.g. best.pt after a distributed run, on rank 0 alone
        if self.save_dir is None:
            self.save_dir = run_dir(self.args, "val")
        self.plots = self.plot_stats = bool(self.args.plots)
        if self.plots or self.args.save_json:
            ensure_writable_dir(self.save_dir)
        return model, dataloader

    def _run_batches(self, network, dataloader):
        timer = StageTimer(self.device)
        self.loss_items = []
        for self.batch_i, batch in enumerate(self._progress(dataloader)):
            self.batch = batch
            self.batch_position = self.batch_positions[self.batch_i]
            self.run_callbacks("on_val_batch_start")
            with timer("preprocess"):
                batch = self.preprocess(batch)
            with timer("inference"), torch.no_grad(), self._autocast():
                preds = network(batch["img"])
            if self.training:
                with timer("loss"), torch.no_grad(), self._autocast():
                    items = self.eval_batch_loss(self.model, batch, preds).detach().float()
                self.loss_items.append((self.batch_position, items))
            with timer("postprocess"):
                preds = self.postprocess(preds)
            self.update(preds, batch)
            if self.governor is not None and not self.training:
                self.governor.check()
            if self.plots and self.batch_i < PLOTTED_BATCHES:
                self.plot_batch(batch, preds, self.batch_i)
            self.run_callbacks("on_val_batch_end")
        self.speed = timer.per_image_ms(self.seen)

    def _autocast(self):
        """Autocast to `amp_dtype` (see the module docstring); the weights stay fp32."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def gathered(self, obj):
        """Every rank's `obj` in rank order when this rank holds a share of the data, else `[obj]`. Collective
        when sharded: call it from `compute()`, which every rank runs."""
        return dist.all_gather_object(obj, group=self.gather_group) if self.sharded else [obj]

    def _mean_loss(self):
        """The mean validation loss items over all batches of all ranks, summed in batch order; None if no loss."""
        records = [record for part in self.gathered([(p, i.cpu()) for p, i in self.loss_items]) for record in part]
        if not records:
            return None
        return torch.stack([items for _, items in sorted(records, key=lambda r: r[0])]).sum(0) / len(records)

    def _progress(self, dataloader):
        """A tqdm bar on a terminal; plain iteration otherwise (logs and CI stay readable)."""
        return progress_bar(dataloader, total=len(dataloader), desc=self.progress_description(), leave=False)

    def _log_speed(self):
        if self.training:
            return
        speeds = ", ".join(f"{ms:.1f}ms {stage}" for stage, ms in self.speed.items() if stage != "loss")
        LOGGER.info(f"Speed: {speeds} per image")

    def results(self, stats, trainer=None):
        """The metrics dict; during training the mean val losses come after the metrics and "fitness" last."""
        stats = dict(stats)
        fitness = stats.pop("fitness", None)
        if trainer is not None and self.loss is not None:
            stats.update(trainer.label_loss_items(self.loss, prefix="val"))
        if fitness is not None:
            stats["fitness"] = fitness
        return stats

    def metric_keys(self):
        """The result keys without "fitness": metric columns then val loss columns (for epochs not validated)."""
        return [*self.metric_names(), *(f"val/{name}" for name in self.loss_names)]

    # ------------------------------------------------------------------ override points
    def eval_batch_loss(self, model, batch, preds):
        """The loss items of one eval batch, logged as the val losses during training (called under no_grad and
        the training's autocast). Default: the model's loss of its raw head outputs, which an eval forward
        returns second, after the decoded predictions."""
        return model.loss(batch, preds[1])[1]

    def metric_names(self):
        """Names of the metric values in the results dict, in order (without losses and fitness)."""
        return []

    def load_model(self, path):
        """Rebuild the model stored in a checkpoint file. Called in standalone mode for a path."""
        raise NotImplementedError

    def build_dataloader(self, model):
        """Return the loader of `args.data` / `args.split`. Called in standalone mode when none was given."""
        raise NotImplementedError

    def init_metrics(self, model, dataloader):
        """Set names, nc and the metric containers before a run."""

    def reset(self):
        """Forget everything accumulated by `update`."""
        self.seen = 0

    def preprocess(self, batch):
        """Move a collated batch to the device and normalise it; returns the batch."""
        return batch

    def postprocess(self, preds):
        """Turn the model's raw output into final predictions (e.g. NMS)."""
        return preds

    def update(self, preds, batch):
        """Accumulate one batch of postprocessed predictions against its labels."""

    def compute(self):
        """Return the metrics dict from everything accumulated; gathers over the ranks when `sharded`. This base
        version sets `loss` (the mean validation loss of all ranks); subclasses call it first."""
        self.loss = self._mean_loss()
        return {}

    def progress_description(self):
        """Text shown left of the progress bar."""
        return "validating"

    def log_results(self):
        """Log the metrics table."""

    def plot_batch(self, batch, preds, batch_i):
        """Draw one batch with labels and predictions (first batches only, when plots are on)."""

    def plot_metrics(self):
        """Draw the dataset-level plots (curves, confusion matrix) after `compute`."""

    def save_outputs(self):
        """Write files such as predictions.json after `compute`."""
