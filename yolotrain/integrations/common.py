"""What every integration shares: the epoch's numbers (the results.csv columns), the run's files, and the
background worker that keeps the trackers' own calls off the training thread."""

import logging
import math
import queue
import re
import threading
from dataclasses import dataclass
from pathlib import Path

LOGGER = logging.getLogger(__name__)

PLOT_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_EXPERIMENT = "yolotrain"
FINAL_FLUSH_TIMEOUT_S = 120.0  # the most training waits at its end for a tracker to finish writing


def epoch_metrics(trainer):
    """{name: float} for the epoch just finished: train losses, validation metrics (when validated), lrs.

    Non-finite values (an epoch without validation fills NaN) are left out: trackers reject or mis-plot them.
    """
    values = {}
    if trainer.tloss is not None:
        values.update(trainer.label_loss_items(trainer.tloss, prefix="train"))
    values.update(trainer.metrics or {})
    values.update(trainer.lr or {})
    numbers = {}
    for key, value in values.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            numbers[str(key)] = number
    return numbers


def plot_files(save_dir):
    """The image files the trainer and validator wrote in the run folder, sorted by name."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    return sorted(p for p in save_dir.iterdir() if p.is_file() and p.suffix.lower() in PLOT_SUFFIXES)


def plain_params(config):
    """The run's arguments {name: value} as {name: str}: what trackers store as parameters (None becomes '')."""
    return {str(k): "" if v is None else str(v) for k, v in config.items()}


def experiment_name(args):
    """The experiment (project) a run is logged under: the project's folder name, else "yolotrain"."""
    return Path(str(args.project)).name if args.project else DEFAULT_EXPERIMENT


_INVALID_NAME_CHARS = re.compile(r"[^0-9A-Za-z_\-. :/]")


def sanitize_metric_name(name):
    """An MLflow-valid metric name: "metrics/mAP50(B)" -> "metrics/mAP50_B" (MLflow rejects parentheses)."""
    name = str(name).replace("(", "_").replace(")", "")
    return _INVALID_NAME_CHARS.sub("_", name)


def safe_uri(uri):
    """`uri` without any user:password@ part: the only form that may be logged or written to a file."""
    return re.sub(r"//[^/@]*@", "//", str(uri))


# ---------------------------------------------------------------------- trackers off the training thread
class BackgroundWorker:
    """One daemon thread that runs an integration's calls in the order they were submitted.

    A training event then costs one queue put, however slow the tracker's store, server or import is. The first
    call that raises is reported once and every later call is dropped: a broken tracker never stops training.
    """

    def __init__(self, name):
        self.name = name
        self.failed = False
        self._calls = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"yolotrain-{name}", daemon=True)
        self._thread.start()

    def submit(self, fn, *args):
        """Queue `fn(*args)`; the arguments must be snapshots, not objects the training thread goes on changing."""
        self._calls.put((fn, args))

    def close(self, timeout=FINAL_FLUSH_TIMEOUT_S):
        """Let the queued calls finish within `timeout` seconds, then stop; True when all of them ran."""
        self._calls.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            LOGGER.warning(f"{self.name}: still writing after {timeout:g} s at the end of training; "
                           f"left to finish in the background, training ends now")
            return False
        return True

    def _run(self):
        while (call := self._calls.get()) is not None:
            fn, args = call
            if self.failed:
                continue
            try:
                fn(*args)
            except Exception as error:  # any tracker failure: report once, keep training
                self.failed = True
                LOGGER.warning(f"integration '{self.name}' failed in {fn.__name__} ({type(error).__name__}: "
                               f"{error}); it is skipped for the rest of the run")


@dataclass(frozen=True)
class RunStart:
    """What a tracker needs to open its run, read on the training thread."""

    save_dir: Path
    run_name: str  # the run folder's name, e.g. "train3"
    experiment: str  # the project's folder name
    config: dict  # {argument: value}, the run's arguments as given

    @property
    def params(self):
        """The arguments as {name: str}, for trackers that store parameters as text."""
        return plain_params(self.config)


@dataclass(frozen=True)
class RunEnd:
    """What a tracker needs to close its run: the last step, final metrics and the files worth keeping."""

    step: int
    metrics: dict  # {name: float} of the final validation
    weights: tuple  # existing best.pt and last.pt, best first
    plots: tuple


class Tracker:
    """Base of the experiment trackers (TensorBoard, MLflow, W&B, DVCLive): the trainer callbacks snapshot what
    they need and hand the tracker's own calls to a `BackgroundWorker`.

    Subclasses set `name` and implement `open(start)`, `log_epoch(metrics, step)`, `finish(end)` (success) and
    `fail()` (training raised); all four run on the worker thread, in order. The worker never runs torch ops: a
    thread that stays alive after running one slowed every later training step about 2x on CPU (measured).
    """

    integration_owner = True  # marks callbacks registered by add_integration_callbacks
    name = "tracker"
    open_on_training_thread = False  # True only for an `open` that is quick and local

    def __init__(self):
        self.worker = None

    def callbacks(self):
        """{event: fn(trainer)} to register on the trainer."""
        return {
            "on_pretrain_routine_end": self.on_pretrain_routine_end,
            "on_fit_epoch_end": self.on_fit_epoch_end,
            "on_train_end": self.on_train_end,
            "teardown": self.teardown,
        }

    def on_pretrain_routine_end(self, trainer):
        start = RunStart(Path(trainer.save_dir), Path(trainer.save_dir).name, experiment_name(trainer.args),
                         dict(vars(trainer.args)))
        self.worker = BackgroundWorker(self.name)
        if self.open_on_training_thread:
            self.open(start)
        else:
            self.worker.submit(self.open, start)

    def on_fit_epoch_end(self, trainer):
        if self.worker is not None:
            self.worker.submit(self.log_epoch, epoch_metrics(trainer), trainer.epoch + 1)

    def on_train_end(self, trainer):
        if self.worker is None:
            return
        weights = tuple(Path(w) for w in (trainer.best, trainer.last) if Path(w).exists())
        metrics = {k: v for k, v in epoch_metrics(trainer).items() if k.startswith("metrics/")}
        plots = tuple(plot_files(trainer.save_dir))
        self.worker.submit(self.finish, RunEnd(trainer.epoch + 1, metrics, weights, plots))
        self._close()

    def teardown(self, trainer):
        """Still open here: training failed before on_train_end."""
        if self.worker is not None:
            self.worker.submit(self.fail)
            self._close()

    def _close(self):
        worker, self.worker = self.worker, None  # first: never close twice
        worker.close()

    # ------------------------------------------------------------------ on the worker thread
    def open(self, start):
        raise NotImplementedError

    def log_epoch(self, metrics, step):
        raise NotImplementedError

    def finish(self, end):
        raise NotImplementedError

    def fail(self):
        raise NotImplementedError
