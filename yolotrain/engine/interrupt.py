"""GracefulInterrupt: SIGTERM/SIGINT end a training run at a batch boundary, with its state saved.

The first signal is only counted; the training loop reads `requested` (agreed over all ranks) after its batch,
saves a mid-epoch checkpoint and raises `TrainingInterrupted`. A second signal exits at once.

Ctrl-C signals the whole process group, data-loader workers included, and forked workers inherit the handler:
in any process but the one that installed it the handler does nothing, so the run reports the signal once and
its workers keep serving batches until the main process has saved and shuts them down (a worker that died of
the signal would break the loader mid-save).
"""

import logging
import os
import signal
import threading

from yolotrain.errors import YoloTrainError

LOGGER = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(YoloTrainError):
    """SIGTERM/SIGINT: the current batch finished, a mid-epoch checkpoint was written."""

    exit_code = 130


class GracefulInterrupt:
    """A context manager that holds SIGTERM/SIGINT handlers while training (in the main thread only: Python
    delivers signals there). `received` counts the signals seen; the previous handlers come back on exit."""

    def __init__(self):
        self.received = 0
        self._previous = {}
        self._owner = None  # the process that installed the handlers

    @property
    def requested(self):
        """A signal asked this process to stop."""
        return self.received > 0

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._owner = os.getpid()
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in HANDLED_SIGNALS}
        return self

    def __exit__(self, *exc_info):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False

    def _on_signal(self, signum, frame):
        if os.getpid() != self._owner:  # a forked data worker: the main process handles the signal
            return
        self.received += 1
        if self.received > 1:
            LOGGER.warning("second signal received: exiting now without saving")
            raise SystemExit(128 + signum)
        LOGGER.warning(f"{signal.Signals(signum).name} received: finishing this batch and saving a checkpoint")
