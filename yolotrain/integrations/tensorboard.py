"""TensorBoard: per-epoch scalars (every results.csv column), the model graph once, the final plots as images.

Enabled with ``tensorboard=True``; the event file is written in the run folder (``tensorboard --logdir runs``).
The writer writes on its own thread and the plots are added on a background worker; the one-off graph trace runs
on the training thread.
"""

import copy
import logging
import warnings

import torch

from yolotrain.integrations.common import Tracker
from yolotrain.utils.torch_utils import de_parallel

LOGGER = logging.getLogger(__name__)

GRAPH_IMAGE_SIZE = 64  # the graph does not depend on the image size; a small image traces fast
FLUSH_SECS = 10  # how stale a live TensorBoard may be; the writer flushes on its own thread


class TensorBoardLogger(Tracker):
    """Owns one SummaryWriter for one training run."""

    name = "tensorboard"
    open_on_training_thread = True  # a local file and the writer's own thread: cheap, and the graph needs it

    def __init__(self):
        super().__init__()
        self.writer = None

    def callbacks(self):
        return {**super().callbacks(), "on_train_start": self.on_train_start}

    def open(self, start):
        """Open the writer in the run folder (it writes events on a thread of its own)."""
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(start.save_dir), flush_secs=FLUSH_SECS)
        LOGGER.info(f"tensorboard: view with 'tensorboard --logdir {start.save_dir.parent}'")

    def on_train_start(self, trainer):
        """Add the model graph once. Traced here, on the training thread: torch ops on a thread that stays alive
        (the worker) slowed every later training step about 2x on CPU (measured), while this one-off trace costs
        about a second."""
        if self.writer is not None and trainer.model is not None:
            self._add_graph(de_parallel(trainer.model))

    def _add_graph(self, model):
        try:
            parameter = next(model.parameters())
            image = torch.zeros(1, 3, GRAPH_IMAGE_SIZE, GRAPH_IMAGE_SIZE, device=parameter.device, dtype=parameter.dtype)
            # A copy in eval mode: tracing must not move the training model's BatchNorm statistics or mode.
            traced_model = copy.deepcopy(model).eval()
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracing warnings (deprecation, constant outputs) are noise here
                self.writer.add_graph(traced_model, image, use_strict_trace=False)
        except Exception as error:  # models with data-dependent control flow do not trace
            LOGGER.debug("tensorboard: model graph skipped (%s: %s)", type(error).__name__, error)

    def log_epoch(self, metrics, step):
        """One scalar per results.csv column at step epoch + 1."""
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)

    def finish(self, end):
        """Add the run's plots (PNG/JPG in the run folder) as images, then close."""
        for path in end.plots:
            self._add_image(path, end.step)
        self._close_writer()

    def _add_image(self, path, step):
        import cv2

        image = cv2.imread(str(path))
        if image is None:
            LOGGER.debug("tensorboard: could not read plot %s", path)
            return
        self.writer.add_image(path.stem, image[..., ::-1].copy(), step, dataformats="HWC")

    def fail(self):
        """Training failed: close the writer, so everything written so far stays readable."""
        self._close_writer()

    def _close_writer(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
