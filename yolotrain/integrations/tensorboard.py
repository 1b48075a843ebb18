"""TensorBoard: per-epoch scalars (every results.csv column), the model graph once, the final plots as images.

Enabled with ``tensorboard=True``; the event file is written in the run folder (``tensorboard --logdir runs``).
"""

import copy
import logging
import warnings

import torch

from yolotrain.integrations.common import epoch_metrics, plot_files
from yolotrain.utils.torch_utils import de_parallel

LOGGER = logging.getLogger(__name__)

GRAPH_IMAGE_SIZE = 64  # the graph does not depend on the image size; a small image traces fast


class TensorBoardLogger:
    """Owns one SummaryWriter for one training run; its methods are the trainer callbacks."""

    integration_owner = True  # marks callbacks registered by add_integration_callbacks

    def __init__(self):
        self.writer = None

    def callbacks(self):
        """{event: fn(trainer)} to register on the trainer."""
        return {
            "on_pretrain_routine_start": self.on_pretrain_routine_start,
            "on_train_start": self.on_train_start,
            "on_fit_epoch_end": self.on_fit_epoch_end,
            "on_train_end": self.on_train_end,
            "teardown": self.teardown,
        }

    def on_pretrain_routine_start(self, trainer):
        """Open the writer in the run folder."""
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(trainer.save_dir))
        LOGGER.info(f"tensorboard: view with 'tensorboard --logdir {trainer.save_dir.parent}'")

    def on_train_start(self, trainer):
        """Add the model graph once, if the model traces cleanly (a graph is a nicety, never an error)."""
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

    def on_fit_epoch_end(self, trainer):
        """One scalar per results.csv column at step epoch + 1."""
        if self.writer is None:
            return
        step = trainer.epoch + 1
        for tag, value in epoch_metrics(trainer).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def on_train_end(self, trainer):
        """Add the run's plots (PNG/JPG in the run folder) as images, then close."""
        if self.writer is None:
            return
        for path in plot_files(trainer.save_dir):
            self._add_image(path, trainer.epoch + 1)
        self.teardown(trainer)

    def _add_image(self, path, step):
        import cv2

        image = cv2.imread(str(path))
        if image is None:
            LOGGER.debug("tensorboard: could not read plot %s", path)
            return
        self.writer.add_image(path.stem, image[..., ::-1].copy(), step, dataformats="HWC")

    def teardown(self, trainer):
        """Close the writer (also when training failed)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
