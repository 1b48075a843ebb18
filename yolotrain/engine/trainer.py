"""BaseTrainer: the task-agnostic training loop.

The loop reads as its outline (see `train` and `_fit`): set up, then per epoch train, validate if due, save if due,
decide whether to stop. A batch is `_forward_loss -> _backward -> _optimizer_step`, followed by the one verdict
all ranks agree on (non-finite loss, a signal, the time budget).

The concerns around the loop live in their own modules, each with public state: `checkpointer` (what a checkpoint
holds, one rule for every component), `resume` (which checkpoint, which arguments, the mid-epoch position),
`interrupt` (SIGTERM/SIGINT), `nan_recovery` (rollback on divergence), `time_budget`, `amp`, `freeze`, `autobatch`,
`wrapping` (compile, DDP), `progress` (the display shared with the validator). A resumed run is a fresh set-up
followed by `_load_state(checkpoint)`.

Tasks subclass it (`DetectionTrainer`) and fill in the override points: `get_dataset`, `get_model`,
`get_dataloader`, `preprocess_batch`, `get_validator`, `set_model_attributes`, `label_loss_items`,
`progress_string`.
"""

import contextlib
import logging
import math
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

from yolotrain import __version__
from yolotrain.cfg import check_imgsz, get_cfg
from yolotrain.engine.amp import resolve_amp, resolve_channels_last
from yolotrain.engine.callbacks import Callbacks
from yolotrain.engine.checkpointer import Checkpointer, EMAState, Stored
from yolotrain.engine.ema import ModelEMA
from yolotrain.engine.interrupt import GracefulInterrupt, TrainingInterrupted
from yolotrain.engine.nan_recovery import NanRecovery, NonFiniteLossError
from yolotrain.engine.optim import (
    OptimizerStepper,
    build_param_groups,
    class_branch_prefixes,
    make_optimizer,
    resolve_auto_optimizer,
    scaled_weight_decay,
)
from yolotrain.engine.progress import progress_bar
from yolotrain.engine.results import ResultsCSV
from yolotrain.engine.resume import (MidEpochPosition, args_for_resume, elastic_restart_folder,
                                     find_resume_checkpoint, mark_elastic_run)
from yolotrain.engine.schedule import TrainSchedule
from yolotrain.engine.stopping import EarlyStopping
from yolotrain.engine.time_budget import TimeBudget
from yolotrain.engine.wrapping import wrap_for_training
from yolotrain.errors import CfgError, YoloTrainError
from yolotrain.utils import dist
from yolotrain.utils.checkpoint import (
    NonFiniteCheckpointError,
    is_weights_file,
    load_checkpoint,
    save_atomic_text,
    save_checkpoint,
    strip_optimizer,
)
from yolotrain.utils.files import ensure_writable_dir, missing_root, remove_unstarted_run, run_dir
from yolotrain.utils.threads import start_thread_governor
from yolotrain.utils.torch_utils import de_parallel, init_seeds

LOGGER = logging.getLogger(__name__)

# Arguments `update_args` refuses: the trainer's run folder, device and resume source are chosen from them when it
# is created.
ARGS_FIXED_AT_CONSTRUCTION = ("task", "mode", "resume", "device", "project", "name", "exist_ok")

# A fitness of exactly 0 counts as a collapse only after the best fitness reached this (mAP-scale) value.
COLLAPSE_MIN_BEST_FITNESS = 0.01
# Without a terminal (a log file, a pipe, CI), a progress line at least this often within an epoch, with its ETA.
PROGRESS_LOG_INTERVAL_S = 30.0


class BaseTrainer:
    """Task-agnostic trainer. Public attributes user code relies on: args, epoch, epochs, model, ema, optimizer,
    validator, metrics, fitness, best_fitness, loss, tloss, save_dir, device, stop."""

    task = None  # the task a subclass trains ("detect", "classify", ...): its runs' folder and checkpoints say it

    def __init__(self, cfg=None, overrides=None, _callbacks=None):
        overrides = dict(overrides or {})
        self.args = get_cfg(overrides, cfg)
        if self.task is not None and self.args.task != self.task:
            if "task" in overrides:
                raise CfgError(f"task={self.args.task} is given to {type(self).__name__}, which trains {self.task}")
            self.args = get_cfg({**overrides, "task": self.task}, cfg)
        # Its own registry: integrations a run adds must not stay registered on the caller's (the YOLO object's).
        self.callbacks = _callbacks.copy() if _callbacks is not None else Callbacks()
        self.resume_path = find_resume_checkpoint(self.args) if self.args.resume else None
        self._restarted_in = None if self.resume_path else elastic_restart_folder(self.args)
        if self._restarted_in is not None and (self._restarted_in / "weights" / "last.pt").is_file():
            self.resume_path = self._restarted_in / "weights" / "last.pt"  # torchrun restarted the group: continue
            LOGGER.info(f"torchrun restarted the group (restart {dist.restart_count()}): resuming {self.resume_path}")
        if self.resume_path:
            self.args = args_for_resume(self.resume_path, overrides)
        self.device = dist.rank_device(self.args.device)  # cuda:LOCAL_RANK (or cpu) in a DDP worker
        self.governor = None  # the thread budget, started at set-up (see yolotrain.utils.threads)
        self._epoch_began = self._last_progress_log = 0.0  # perf_counter marks of the progress lines
        self._use_save_dir(self._resolve_save_dir())
        self.epochs = self.args.epochs
        self.epoch = self.start_epoch = 0
        self.start_batch = 0
        self.batches_in_epoch = 0
        self.model = self.ema = self.optimizer = self.validator = None
        self.channels_last = False  # decided at set-up, with the device
        self.metrics = self.fitness = self.best_fitness = None
        self.loss = self.loss_items = self.tloss = None
        self.loss_names = ("loss",)
        self.stop = False
        self.plots = {}
        self.lr = {}
        self.resolved = SimpleNamespace()
        self.interrupt = GracefulInterrupt()
        self.nan_recovery = NanRecovery()
        self.time_budget = TimeBudget(self.args.time)
        self.checkpointer = None  # built at set-up, once the components it gathers exist
        self._mid_epoch = None  # a MidEpochPosition to apply when the resumed epoch starts
        self._mosaic_closed = False
        self._pending_save_retry = False
        self._wait_group = None  # DDP: gloo group with a long timeout for waiting on rank-0-only work
        self._args_final = False  # set-up has read args: update_args() is refused from then on

    # ------------------------------------------------------------------ callbacks
    def add_callback(self, event, fn):
        """Append `fn(trainer)` to `event`'s callbacks (run in registration order)."""
        self.callbacks.add(event, fn)

    def set_callback(self, event, fn):
        """Replace the user callbacks of `event` with `fn`."""
        self.callbacks.set(event, fn)

    def run_callbacks(self, event):
        """Run every callback of `event` with this trainer."""
        self.callbacks.run(event, self)

    # ------------------------------------------------------------------ arguments
    def update_args(self, **overrides):
        """Set arguments (e.g. the hyperparameters of a tuning trial) and fire `on_params_update`.

        Allowed until set-up reads the arguments: before `train()`, or from an `on_pretrain_routine_start`
        callback; args.yaml and checkpoints then hold the new values. Values are checked as at construction
        (one-line `CfgError`); `args` is replaced by a new object, never changed in place.
        """
        from yolotrain.cfg import Args, check_args

        if self._args_final:
            raise YoloTrainError("update_args() after set-up has read the arguments: call it before train() or "
                                 "from an on_pretrain_routine_start callback")
        fixed = sorted(set(overrides) & set(ARGS_FIXED_AT_CONSTRUCTION))
        if fixed:
            raise YoloTrainError(f"update_args(): {', '.join(fixed)} cannot change after the trainer is created "
                                 f"(they chose its run folder and device); pass them when creating it")
        self.args = Args(**{**vars(self.args), **check_args(overrides)})
        self.epochs = self.args.epochs
        self.time_budget = TimeBudget(self.args.time)
        self.run_callbacks("on_params_update")

    # ------------------------------------------------------------------ the loop
    def train(self):
        """Train and return the final validation metrics (a dict)."""
        joined_group = self._join_process_group()
        created = missing_root(self.save_dir) if dist.is_main() and not self.resume_path else None
        try:
            with self.interrupt:
                try:
                    self._setup()
                except YoloTrainError:  # a user mistake found before training: no run folder is left behind
                    if created is not None:
                        remove_unstarted_run(created)
                    raise
                self._fit()
            return self.metrics
        finally:
            self.run_callbacks("teardown")
            if joined_group:  # also on error, so a failed rank leaves the group instead of hanging it
                dist.destroy_process_group()

    def _fit(self):
        self.run_callbacks("on_train_start")
        self.governor.restart_interval()
        self.time_budget.start(self.start_epoch)
        epoch = self.start_epoch
        while epoch < self.epochs and not self.stop:
            self.epoch = epoch
            try:
                self._train_epoch(epoch)
            except NonFiniteLossError as e:
                epoch = self._recover_from_nan(str(e))
                continue
            self._validate_if_due(epoch)
            if self._fitness_collapsed():
                epoch = self._recover_from_nan(f"fitness collapsed to {self.fitness}")
                continue
            self._log_epoch(epoch)
            self._replan_for_time_budget(epoch)
            self._save_if_due(epoch)
            self.run_callbacks("on_fit_epoch_end")
            # A signal during validation or saving, on any rank: the epoch is complete, every rank stops here.
            if dist.any_rank(self.interrupt.requested, self.device) and epoch + 1 < self.epochs:
                self._interrupt_at_epoch_end(epoch)
            self.stop = self._should_stop(epoch)
            epoch += 1
        self._final_eval()
        self.run_callbacks("on_train_end")
        if dist.is_main():
            LOGGER.info(f"Results saved to {self.save_dir}")

    def _train_epoch(self, epoch):
        self._begin_epoch(epoch)
        if self._mid_epoch is not None:
            self._resume_mid_epoch()
        self.run_callbacks("on_train_epoch_start")
        self._freeze_bn_stats_of_frozen_layers()
        batches = self._progress(epoch)
        for i, batch in batches:
            self.run_callbacks("on_train_batch_start")
            verdict = self._train_step(epoch, i, batch)
            self.governor.check()
            self._update_progress(batches, epoch, i, batch)
            self.run_callbacks("on_train_batch_end")
            if verdict.interrupted:
                self._save_interrupted(epoch, i + 1)
            if verdict.out_of_time:
                self.stop = True
                break
        self.start_batch = 0
        if self.tloss is not None:  # DDP: log the loss of the global batch, not rank 0's shard
            self.tloss = dist.all_reduce_mean(self.tloss.cpu(), group=self._wait_group)
        self.lr = {f"lr/pg{j}": group["lr"] for j, group in enumerate(self.optimizer.param_groups)}
        self.run_callbacks("on_train_epoch_end")

    def _train_step(self, epoch, i, batch):
        """One batch: forward, the agreed verdict, backward, optimizer step when due. Returns the verdict."""
        step = epoch * self.num_batches + i
        self.accumulate = self.schedule.accumulate(epoch, i)
        self.schedule.apply(self.optimizer, epoch, i)
        batch = self.preprocess_batch(batch)
        # DDP: gradients are all-reduced only on the micro-step that steps the optimizer; the others accumulate.
        with self._gradient_sync(self.stepper.is_due(step, self.accumulate)):
            self.loss, self.loss_items = self._forward_loss(batch)
            verdict = self._agree_on_step(self.loss)
            # Every rank rolls back together: none may enter DDP's backward (a collective) while another does not.
            if verdict.nonfinite:
                raise NonFiniteLossError(f"non-finite loss at epoch {epoch + 1}, batch {i}")
            self._backward(self.loss)
        self._optimizer_step(step)
        self._update_running_loss(self.loss_items.detach().float())
        return verdict

    def _agree_on_step(self, loss):
        """The step's three decisions, taken by all ranks together from one all-reduce: the loss is not finite
        (on some rank), a signal arrived (on some rank), the time budget ran out (on some rank's clock)."""
        nonfinite, interrupted, out_of_time = dist.agreed_flags(
            [~torch.isfinite(loss.detach()).all(), self.interrupt.requested, self.time_budget.exceeded()],
            self.device,
        )
        return SimpleNamespace(nonfinite=nonfinite, interrupted=interrupted, out_of_time=out_of_time)

    def _gradient_sync(self, due):
        """DDP's `no_sync()` on accumulation micro-steps; a no-op when training in one process."""
        if due or not hasattr(self.train_model, "no_sync"):
            return contextlib.nullcontext()
        return self.train_model.no_sync()

    def _update_running_loss(self, items):
        """tloss: the mean of the loss items over this epoch's batches so far (on the device: read when shown)."""
        done = self.batches_in_epoch
        self.tloss = items if self.tloss is None else (self.tloss * done + items) / (done + 1)
        self.batches_in_epoch = done + 1

    def _forward_loss(self, batch):
        with self.stepper.autocast(), dist.training_step_scope():
            loss, loss_items = self.compute_loss(batch)
        # `loss` is this rank's mean loss times its batch size; DDP averages gradients over ranks, so times the world
        # size the gradient is that of (mean loss x global batch), the same scale as one process on the global batch.
        return loss * dist.world_size(), loss_items

    def _backward(self, loss):
        self.stepper.backward(loss)

    def _optimizer_step(self, step):
        self.stepper.step_if_due(
            self.model,
            self.ema,
            self.accumulate,
            step,
            before_zero_grad=lambda: self.run_callbacks("on_before_zero_grad"),
            after_step=lambda: self.run_callbacks("optimizer_step"),
        )

    # ------------------------------------------------------------------ set-up
    def _setup(self):
        if dist.is_main():
            # Before args.yaml is written: the remote integration refuses credentials inside its URI.
            from yolotrain.integrations import add_integration_callbacks

            add_integration_callbacks(self)
        self.run_callbacks("on_pretrain_routine_start")
        self._args_final = True
        self.run_callbacks("on_params_update")  # the arguments this run trains with, final from here on
        if dist.is_main():
            ensure_writable_dir(self.wdir)
            save_atomic_text(yaml.safe_dump(vars(self.args), sort_keys=False), self.save_dir / "args.yaml")
            mark_elastic_run(self.save_dir)
            LOGGER.info(f"run folder: {self.save_dir} (args.yaml, results.csv, weights/, plots)")
        init_seeds(self.args.seed, self.args.deterministic)
        self.governor = start_thread_governor(self.args.threads)
        self.resolved.threads = self.governor.budget
        with dist.main_process_first(self._wait_group):
            self.data = self.get_dataset()
        resumed = load_checkpoint(self.resume_path) if self.resume_path else None
        # A resumed run rebuilds the network it saved, whatever its yaml file says today.
        model_cfg = resumed.get("model_yaml") if resumed is not None else None
        self.model = self.get_model(cfg=model_cfg or self.args.model, weights=self._pretrained_weights())
        self.model.to(self.device)
        self._use_channels_last()
        self._freeze_layers()
        self._resolve_batch()
        with dist.main_process_first(self._wait_group):
            self.train_loader = self.get_dataloader(self.data["train"], self.batch_size, dist.rank(), "train")
            # Every rank validates its own share of the val set (the validator gathers the statistics).
            self.test_loader = self.get_dataloader(self.data["val"], self.batch_size * 2, dist.rank(), "val")
        self.num_batches = len(self.train_loader)
        self.resolved.workers = getattr(self.train_loader, "num_workers", None)  # a custom loader may not say
        if dist.is_main():
            self._copy_bad_entry_lists()
        self.set_model_attributes()
        self.validator = self.get_validator()
        self.ema = ModelEMA(self.model)
        self._build_optimization()
        self.stopper = EarlyStopping(self.args.patience)
        self.train_model = self._wrap_model()
        self.checkpointer = self._build_checkpointer()
        if resumed is not None:
            self._load_state(resumed)
        elif dist.is_main():
            self.results.reset()  # a fresh run in an existing folder (exist_ok=True) starts a new results.csv
        # NaN recovery falls back to where this process started when last.pt is missing or mid-epoch.
        source = f"the weights resumed from {self.resume_path}" if self.resume_path else "the initial weights"
        self.nan_recovery.remember_start(self.checkpointer.snapshot(), self.start_epoch, source)
        self._log_resolved()
        self.run_callbacks("on_pretrain_routine_end")

    def _copy_bad_entry_lists(self):
        """The datasets' lists of skipped files (with reasons) go into the run folder, beside the run they shaped."""
        for split, loader in (("train", self.train_loader), ("val", self.test_loader)):
            listed = getattr(getattr(loader, "dataset", None), "bad_entries_file", None)
            if listed and Path(listed).is_file():
                shutil.copy2(listed, self.save_dir / f"{split}.bad.txt")

    def _resolve_batch(self):
        """The per-rank batch: `batch` split over the processes, or for batch=-1 / a share in (0, 1) the batch that
        fits that share of one GPU's memory, measured once on rank 0 and used by every rank."""
        from yolotrain.engine.autobatch import auto_batch_size, is_auto_batch

        world = dist.world_size()
        if is_auto_batch(self.args.batch):
            measured = None
            if dist.is_main():
                measured = auto_batch_size(self.model, self.args.imgsz, self.device, self.args.batch, self.args.amp,
                                           make_batch=self.autobatch_batch)
            self.batch_size = int(dist.broadcast_object(measured, group=self._wait_group))
            return
        if self.args.batch % world:
            raise YoloTrainError(f"batch={self.args.batch} does not divide over {world} processes")
        self.batch_size = self.args.batch // world

    def _build_optimization(self):
        """Optimizer, schedule and optimizer-step helper, with values derived from (not written into) args."""
        global_batch = self.batch_size * dist.world_size()
        accumulate = max(round(self.args.nbs / global_batch), 1)
        weight_decay = scaled_weight_decay(self.args.weight_decay, global_batch, accumulate, self.args.nbs)
        iterations = math.ceil(len(self.train_loader.dataset) / max(global_batch, self.args.nbs)) * self.epochs
        self.optimizer = self.build_optimizer(
            model=self.model,
            name=self.args.optimizer,
            lr=self.args.lr0,
            momentum=self.args.momentum,
            decay=weight_decay,
            iterations=iterations,
        )
        self.schedule = TrainSchedule(
            initial_lrs=[g.get("initial_lr", g["lr"]) for g in self.optimizer.param_groups],
            bias_groups=[bool(g.get("bias_group", False)) for g in self.optimizer.param_groups],
            epochs=self.epochs,
            num_batches=self.num_batches,
            warmup_epochs=self.args.warmup_epochs,
            warmup_bias_lr=self.args.warmup_bias_lr,
            warmup_momentum=self.args.warmup_momentum,
            momentum=self._optimizer_momentum(),
            lrf=self.args.lrf,
            cos_lr=self.args.cos_lr,
            nominal_batch=self.args.nbs,
            batch_size=global_batch,
        )
        self.amp_dtype = resolve_amp(self.args.amp, self.device, self.model)
        self.stepper = OptimizerStepper(self.optimizer, self.amp_dtype, self.device.type, max_norm=10.0)
        self.resolved.__dict__.update(
            batch_per_rank=self.batch_size,
            accumulate=accumulate,
            weight_decay=weight_decay,
            warmup_iters=self.schedule.warmup_iters,
            amp=str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "off",
        )

    def _optimizer_momentum(self):
        group = self.optimizer.param_groups[0]
        if "betas" in group:
            return group["betas"][0]
        return group.get("momentum", self.args.momentum)

    def build_optimizer(self, model, name="auto", lr=0.001, momentum=0.9, decay=1e-5, iterations=1e5):
        """Return the optimizer. Called once at set-up with the decay already scaled to the batch.

        Default: three groups (weights with decay, normalisation weights and biases without); MuSGD adds a Muon
        group for 2-D and 4-D weights and gives the head's class branches 3x the lr. `name="auto"` picks MuSGD for
        long runs and AdamW with an lr fitted to the class count otherwise. Each group's starting lr is its
        schedule's base: warmup and decay scale every group by the same factor, so ratios between groups hold.
        """
        if name.lower() == "auto":
            nc = getattr(model, "nc", 10)
            name, lr, momentum = resolve_auto_optimizer(iterations, nc)
            LOGGER.info(
                f"optimizer: 'optimizer=auto' picked {name}(lr={lr}, momentum={momentum}) for {int(iterations)} "
                f"iterations, ignoring lr0 and momentum"
            )
        self.resolved.optimizer = f"{name}(lr={lr}, momentum={momentum})"
        muon = name.lower() == "musgd"
        boosted = class_branch_prefixes(model) if muon else ()
        return make_optimizer(name, build_param_groups(model, decay, muon=muon, boosted_prefixes=boosted), lr, momentum)

    def _use_channels_last(self):
        """`channels_last`: keep the model's (and, in `compute_loss`, the batch's) tensors channels-last, where
        oneDNN or CUDA convolutions run faster on them. The weights keep their values; only their layout changes."""
        self.channels_last = resolve_channels_last(self.args.channels_last, self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.resolved.channels_last = self.channels_last

    def _model_stride(self):
        """The model's largest stride (at least 32): image sizes are multiples of it."""
        return max(int(de_parallel(self.model).stride.max()), 32) if self.model is not None else 32

    def _train_imgsz(self):
        """`imgsz` rounded up to the model's stride, once (one warning), kept with the other derived values;
        args.imgsz stays as the user gave it."""
        if getattr(self.resolved, "imgsz", None) is None:
            self.resolved.imgsz = check_imgsz(self.args.imgsz, self._model_stride())
        return self.resolved.imgsz

    def _wrap_model(self):
        """The module the training step calls: compiled and/or DDP-wrapped views of self.model. The training step
        calls it with images only (see `compute_loss`), so `compile=True` compiles the network, never the loss."""
        return wrap_for_training(self.model, self.device, use_compile=self.args.compile, sync_bn=self.args.sync_bn)

    def compute_loss(self, batch):
        """Return (loss summed over the batch, detached loss items); runs under autocast. Forwards the images
        through `train_model` (the network, compiled and/or DDP-wrapped), then computes the model's own loss
        eagerly: `compile=True` compiles the network only, never the loss or its target assignment."""
        images = batch["img"]
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        preds = self.train_model(images)
        return de_parallel(self.model).loss(batch, preds)

    # ------------------------------------------------------------------ freezing
    def _freeze_layers(self):
        """Freeze what `freeze` and `always_frozen()` name (see `yolotrain.engine.freeze`)."""
        from yolotrain.cfg import format_value
        from yolotrain.engine.freeze import freeze_parameters

        frozen = freeze_parameters(self.model, self.args.freeze, self.always_frozen())
        if frozen and self.args.freeze is not None:
            LOGGER.info(f"freeze: {len(frozen)} parameters frozen (freeze={format_value(self.args.freeze)})")

    def always_frozen(self):
        """Name prefixes that never train (e.g. a fixed DFL projection); a leading dot matches them anywhere in
        a parameter's name. Called once at set-up, when the model is built."""
        return ()

    def _freeze_bn_stats_of_frozen_layers(self):
        """Keep running statistics of frozen normalisation layers fixed (callbacks may unfreeze, so check now)."""
        from yolotrain.engine.freeze import freeze_bn_statistics

        freeze_bn_statistics(self.model)

    # ------------------------------------------------------------------ epochs
    def _begin_epoch(self, epoch):
        self.model.train()
        self._seed_epoch(epoch)
        self._set_loader_epoch(epoch)
        # `>=`, not `==`: a resume or a time-budget re-plan may start past the boundary.
        if self.args.close_mosaic and epoch >= self.epochs - self.args.close_mosaic and not self._mosaic_closed:
            self._close_dataloader_mosaic()
        self.tloss = None
        self.batches_in_epoch = 0
        self.stepper.zero_grad()

    def _seed_epoch(self, epoch):
        """Make epoch `epoch` a pure function of (seed, epoch): resume replays it exactly.

        After a NaN rollback the salt changes the replay, so the same bad step is not repeated.
        """
        seed = self.args.seed + 1_000_003 * epoch + 7919 * self.nan_recovery.salt
        init_seeds(seed, self.args.deterministic)

    def _set_loader_epoch(self, epoch):
        from yolotrain.data.loader import set_loader_epoch

        set_loader_epoch(self.train_loader, epoch, start_batch=self.start_batch, salt=self.nan_recovery.salt)

    def _close_dataloader_mosaic(self):
        """Switch mosaic (and the augmentations that go with it) off for the final epochs."""
        self._mosaic_closed = True
        from yolotrain.data.loader import reset_loader_workers

        dataset = self.train_loader.dataset
        if hasattr(dataset, "close_mosaic"):  # a dataset without mosaic (classification) has nothing to close
            LOGGER.info("close_mosaic: mosaic off for the final epochs")
            dataset.close_mosaic(self.args)
            reset_loader_workers(self.train_loader)  # persistent workers hold their own copy of the dataset

    def _validate_if_due(self, epoch):
        final_epoch = epoch + 1 >= self.epochs or self.stop or self.stopper.possible_stop
        due = self.args.val and (epoch + 1) % max(self.args.val_period, 1) == 0
        if due or final_epoch:  # on every rank, each over its shard: the metrics come out the same on all
            self.ema.module.to(self.device)
            self.metrics, self.fitness = self.validate()
        else:
            self.metrics, self.fitness = None, None
        self.metrics, self.fitness = dist.broadcast_object((self.metrics, self.fitness), group=self._wait_group)
        if self.fitness is not None:
            self.stopper.update(epoch, self.fitness)
            self.best_fitness = self.stopper.best_fitness

    def validate(self):
        """Run the validator on the EMA weights; return (metrics dict, fitness float)."""
        metrics = self.validator(trainer=self)
        fitness = metrics.pop("fitness", None)
        if fitness is None:
            fitness = -float(self.tloss.sum()) if self.tloss is not None else 0.0
        return metrics, float(fitness)

    def _fitness_collapsed(self):
        """Divergence seen by validation: a non-finite fitness, or exactly 0 after the run had learnt something.
        Early in training fitness hovers near 0 and may touch it: below COLLAPSE_MIN_BEST_FITNESS that is no sign."""
        if self.fitness is None:
            return False
        learnt = self.best_fitness is not None and self.best_fitness >= COLLAPSE_MIN_BEST_FITNESS
        return not math.isfinite(self.fitness) or (learnt and self.fitness == 0)

    def _log_epoch(self, epoch):
        if not dist.is_main():
            return
        row = {"epoch": epoch + 1, "time": round(self._elapsed(), 3)}
        row.update(self.label_loss_items(self.tloss, prefix="train"))
        row.update(self._metrics_row())
        row.update(self.lr)
        try:
            self.results.append(row)
        except OSError as e:  # disk full: ResultsCSV keeps the row and writes it with the next one
            LOGGER.warning(f"could not write {self.csv} ({e}); the row is kept and written with the next epoch")
        if self.args.plots:
            self._plot_results()

    def _metrics_row(self):
        if self.metrics is not None:
            return {k: float(v) for k, v in self.metrics.items()}
        return {k: float("nan") for k in self.metric_keys()}

    def metric_keys(self):
        """Columns the validator reports (used to fill rows of epochs without validation)."""
        return [k for k in getattr(self.validator, "metric_keys", lambda: [])()]

    def _plot_results(self):
        try:
            from yolotrain.utils.plotting import plot_results

            plot_results(self.csv)
        except Exception as e:  # a plot must never stop training
            self._warn_once("plot_results", f"results plot failed: {e}")

    def _replan_for_time_budget(self, epoch):
        """`time=` runs: the epoch count that fits, from rank 0's clock, the same on every rank (LR included)."""
        if not self.args.time:
            return
        planned = dist.broadcast_object(self.time_budget.replan(epoch), group=self._wait_group)
        if planned != self.epochs:
            self.epochs = planned
            self.schedule.set_epochs(planned)
            self.resolved.epochs = planned

    def _should_stop(self, epoch):
        """Rank 0 decides (early stopping, the end of a time budget) and every rank follows."""
        stop = self.stop or self.stopper.should_stop
        if self.args.time:
            stop = stop or epoch + 1 >= self.epochs or self.time_budget.exceeded()
        return bool(dist.broadcast_object(stop, group=self._wait_group))

    def _elapsed(self):
        return self.time_budget.elapsed()

    # ------------------------------------------------------------------ checkpoints
    def _save_if_due(self, epoch):
        if not (self.args.save and dist.is_main()):
            return
        try:
            self.save_model()
            self._pending_save_retry = False
        except NonFiniteCheckpointError as e:
            LOGGER.warning(f"checkpoint not written: {e}")
        except OSError as e:
            # Disk full or folder gone: keep the previous last.pt and try again next epoch.
            self._pending_save_retry = True
            LOGGER.warning(f"checkpoint save failed ({e}); the previous last.pt is kept, retrying next epoch")
            return
        self.run_callbacks("on_model_save")

    def save_model(self):
        """Write weights/last.pt, weights/best.pt at the best fitness and weights/epochN.pt every save_period."""
        copies = []
        if self.fitness is not None and self.best_fitness == self.fitness:
            copies.append(self.best)
        period = self.args.save_period
        if period > 0 and (self.epoch + 1) % period == 0:
            copies.append(self.wdir / f"epoch{self.epoch + 1}.pt")
        save_checkpoint(self.checkpoint_state(), self.last, copies)  # serialised once, the copies take its bytes

    def checkpoint_state(self, batch_index=None):
        """Everything resume needs, as state dicts and plain types (loads with weights_only=True)."""
        state = self.checkpointer.state_dict()
        state.update(
            version=__version__,
            date=datetime.now(timezone.utc).isoformat(),
            task=self.args.task,
            epoch=self.epoch,
            best_fitness=None if self.best_fitness is None else float(self.best_fitness),
            train_args=dict(vars(self.args)),
            train_metrics={**(self.metrics or {}), "fitness": self.fitness},
        )
        state.update(self.checkpoint_extras())
        if batch_index is not None:
            model = de_parallel(self.model)
            state.update(MidEpochPosition.entries(batch_index, model, self.tloss, self.batches_in_epoch))
        return state

    def checkpoint_extras(self):
        """Task-specific plain entries added to every checkpoint (e.g. the model yaml and class names)."""
        return {}

    def _build_checkpointer(self):
        """The components whose state a checkpoint holds, each under its fixed keys (see `Checkpointer`)."""
        weights = [
            Stored("model", de_parallel(self.model)),
            EMAState(self.ema),
            Stored("optimizer", self.optimizer),
            Stored("scaler", self.stepper),
            Stored("schedule", self.schedule),
            Stored("stopper", self.stopper),
        ]
        progress = [self.time_budget, self.nan_recovery, Stored("callbacks", self.callbacks)]
        return Checkpointer(weights, progress)

    def _load_state(self, checkpoint):
        """Continue from a checkpoint: the same code path as a fresh start, plus the components' state."""
        self.checkpointer.load_state_dict(checkpoint)
        if self.args.time and self.time_budget.planned_epochs:
            self.epochs = int(self.time_budget.planned_epochs)  # re-planned, not the epochs= it started from
        self.schedule.set_epochs(self.epochs)
        self.best_fitness = checkpoint.get("best_fitness")
        if "batch_index" in checkpoint:
            self._mid_epoch = MidEpochPosition(checkpoint)
            self.start_epoch, self.start_batch = self._mid_epoch.epoch, self._mid_epoch.next_batch
        else:
            self.start_epoch = checkpoint["epoch"] + 1
        if dist.is_main():
            self.results.keep_epochs_up_to(self.start_epoch)
        LOGGER.info(f"resume: continuing {self.resume_path} from epoch {self.start_epoch + 1} to {self.epochs}")

    def _resume_mid_epoch(self):
        """After the epoch's normal start: put back RNGs, running loss and not-yet-stepped gradients."""
        position, self._mid_epoch = self._mid_epoch, None
        self.tloss, self.batches_in_epoch = position.apply(de_parallel(self.model), self.device)

    # ------------------------------------------------------------------ NaN recovery
    def _recover_from_nan(self, reason):
        """Roll back to the last good checkpoint (or the initial state) and replay with a new seed salt."""
        self.nan_recovery.begin(reason)
        # Rank 0 reads the rollback state and sends it: other nodes may not share its filesystem.
        good = self.nan_recovery.last_good_state(self.last) if dist.is_main() else None
        good = dist.broadcast_object(good, group=self._wait_group)
        self.checkpointer.load_weights(good["state"])
        self.epoch = good["next_epoch"]
        self.best_fitness = self.stopper.best_fitness
        self.tloss = self.fitness = None
        self.start_batch, self._mid_epoch = 0, None  # the replayed epoch starts from its first batch
        self.stepper.zero_grad()
        LOGGER.warning(
            f"NaN recovery {self.nan_recovery.count}/{self.nan_recovery.max_recoveries}: {reason}; "
            f"reloaded {good['source']} and continuing from epoch {good['next_epoch'] + 1}"
        )
        return good["next_epoch"]

    # ------------------------------------------------------------------ end of training
    def _final_eval(self):
        """Validate best.pt (the weights users ship) with plots; strip its optimizer for release."""
        if not dist.is_main():
            return
        if self.best.exists() and self.args.save:
            strip_optimizer(self.best)
            if self.args.val or self.metrics is not None:
                LOGGER.info(f"\nValidating {self.best}...")
                if self.validator is not None:
                    self.validator.governor = self.governor  # the threads this run has found it gets
                    self.validator.trainer_amp_dtype = self.amp_dtype  # the precision of the epochs' validations
                self.metrics = self.validate_checkpoint(self.best)
                self.metrics.pop("fitness", None)

    def validate_checkpoint(self, path):
        """Validate the weights in `path` (task-specific); default: validate the EMA in memory."""
        metrics, _ = self.validate()
        return metrics

    # ------------------------------------------------------------------ resume
    def _use_save_dir(self, save_dir):
        self.save_dir = Path(save_dir)
        self.wdir = self.save_dir / "weights"
        self.last, self.best = self.wdir / "last.pt", self.wdir / "best.pt"
        self.results = ResultsCSV(self.save_dir / "results.csv")
        self.csv = self.results.path

    def _join_process_group(self):
        """In a DDP worker (torchrun or `yolotrain.engine.launch`): join the process group, create the group that
        waits on rank 0, and take rank 0's run folder. Returns True when this call created the process group."""
        if not dist.launched_distributed():
            return False
        joined = dist.init_process_group(timeout_s=self.args.dist_timeout, device=self.device)
        self._wait_group = dist.new_wait_group()
        # Each rank numbered the run folder on its own before the group existed; rank 0's choice wins.
        self._use_save_dir(dist.broadcast_object(self.save_dir, group=self._wait_group))
        return joined

    def _resolve_save_dir(self):
        if self.resume_path:  # a resumed run continues in its own folder: <save_dir>/weights/last.pt
            return Path(self.resume_path).resolve().parent.parent
        if self._restarted_in is not None:  # restarted before its first save: start again in the same folder
            return self._restarted_in
        return dist.broadcast_object(run_dir(self.args, self.args.mode))

    def _pretrained_weights(self):
        pretrained = self.args.pretrained
        model = self.args.model
        if isinstance(pretrained, str):
            return pretrained
        if pretrained and isinstance(model, str) and is_weights_file(model):
            return model
        return None

    # ------------------------------------------------------------------ signals
    def _save_interrupted(self, epoch, next_batch):
        saved = "state saved to"
        if dist.is_main() and self.args.save:
            try:
                save_checkpoint(self.checkpoint_state(batch_index=next_batch), self.last)
            except (OSError, NonFiniteCheckpointError) as e:  # the previous last.pt is still intact
                LOGGER.warning(f"mid-epoch checkpoint not written: {e}")
                saved = "could not save this position; the previous checkpoint is kept at"
        raise TrainingInterrupted(
            f"training interrupted at epoch {epoch + 1}, batch {next_batch}; {saved} {self.last}, "
            f"continue with resume={self.last}"
        )

    def _interrupt_at_epoch_end(self, epoch):
        saved = "state saved to" if self.args.save and not self._pending_save_retry else "last checkpoint kept at"
        raise TrainingInterrupted(
            f"training interrupted after epoch {epoch + 1}; {saved} {self.last}, continue with resume={self.last}"
        )

    # ------------------------------------------------------------------ progress and logging
    def _progress(self, epoch):
        batches = enumerate(self.train_loader, start=self.start_batch)
        if not dist.is_main():
            return batches
        LOGGER.info(self.progress_string())  # in every log, so each epoch's line has its column names above it
        self._epoch_began = self._last_progress_log = time.perf_counter()
        return progress_bar(batches, total=self.num_batches, initial=self.start_batch)

    def _update_progress(self, batches, epoch, i, batch):
        if hasattr(batches, "set_description"):
            batches.set_description(self._progress_line(epoch, batch))
            return
        if not dist.is_main():
            return
        if i + 1 == self.num_batches:
            LOGGER.info(self._progress_line(epoch, batch))
        elif time.perf_counter() - self._last_progress_log >= PROGRESS_LOG_INTERVAL_S:
            LOGGER.info(self._progress_line(epoch, batch) + self._batches_and_eta(i))
            self._last_progress_log = time.perf_counter()

    def _batches_and_eta(self, i):
        """"  120/500 batches, ETA 2:31": where a long epoch stands, for logs without a progress bar."""
        done = i + 1 - self.start_batch
        left = (self.num_batches - i - 1) * (time.perf_counter() - self._epoch_began) / max(done, 1)
        return f"  {i + 1}/{self.num_batches} batches, ETA {int(left // 60)}:{int(left % 60):02d}"

    def _progress_line(self, epoch, batch):
        losses = "".join(f"{x:11.4g}" for x in (self.tloss.tolist() if self.tloss is not None else []))
        instances = int(batch["cls"].shape[0]) if isinstance(batch, dict) and "cls" in batch else 0
        size = batch["img"].shape[-1] if isinstance(batch, dict) and "img" in batch else 0
        return f"{f'{epoch + 1}/{self.epochs}':>11}{self._memory():>11}{losses}{instances:>11}{size:>11}"

    def _memory(self):
        if self.device.type == "cuda":
            return f"{torch.cuda.memory_reserved(self.device) / 2**30:.3g}G"
        import psutil

        return f"{psutil.Process().memory_info().rss / 2**30:.3g}G"

    def progress_string(self):
        """Header of the per-epoch progress line."""
        names = ("Epoch", "Mem", *self.loss_names, "Instances", "Size")
        return "".join(f"{n:>11}" for n in names)

    def _log_resolved(self):
        if dist.is_main():
            values = ", ".join(f"{k}={v}" for k, v in vars(self.resolved).items())
            LOGGER.info(f"resolved: {values}")

    def _warn_once(self, key, message):
        warned = self.__dict__.setdefault("_warned", set())
        if key not in warned:
            warned.add(key)
            LOGGER.warning(message)

    # ------------------------------------------------------------------ task override points
    def get_dataset(self):
        """Return the data dict ({"train": ..., "val": ..., "names": {...}, "nc": int}). Called once at set-up."""
        raise NotImplementedError

    def get_model(self, cfg=None, weights=None, verbose=True):
        """Return the model to train (an nn.Module), loading `weights` when given."""
        raise NotImplementedError

    def get_dataloader(self, dataset_path, batch_size=16, rank=0, mode="train"):
        """Return the DataLoader for `mode` ("train" or "val")."""
        raise NotImplementedError

    def build_dataset(self, img_path, mode="train", batch=None):
        """Return the Dataset for `mode`."""
        raise NotImplementedError

    def preprocess_batch(self, batch):
        """Move a collated batch to the device and normalise it. Called once per training batch."""
        return batch

    def get_validator(self):
        """Return the validator used after each epoch; it is called as `validator(trainer=self)`."""
        raise NotImplementedError

    def autobatch_batch(self, batch_size, imgsz, device):
        """Return a collated training batch of `batch_size` random images at `imgsz` on `device`, with the labels
        the task's loss needs: batch=-1 measures the memory of a training step on it (GPU only)."""
        raise NotImplementedError(f"{type(self).__name__} has no autobatch_batch: batch=-1 needs one")

    def set_model_attributes(self):
        """Attach task information (class count, names, hyperparameters) to the model; called once the
        dataloaders exist, before the optimizer is built."""

    def label_loss_items(self, loss_items=None, prefix="train"):
        """Loss items as {f"{prefix}/{name}": value}, or the list of keys when loss_items is None."""
        keys = [f"{prefix}/{name}" for name in self.loss_names]
        if loss_items is None:
            return keys
        return {k: round(float(v), 5) for k, v in zip(keys, loss_items)}
