"""DVCLive: params, per-epoch metrics as plots, images of the final plots, and the weights as a model artifact.

Enabled with ``dvclive=True`` (extra ``yolotrain[dvclive]``). Files go to ``<run>/dvclive`` (``params.yaml``,
``metrics.json``, ``plots/metrics/...tsv``, ``dvc.yaml``); inside a DVC repository best.pt is also tracked as a
model artifact (``dvc exp show``, ``dvc plots show`` read these). Run from inside a Git repository that has no
DVC yet, DVCLive itself runs ``dvc init`` there (its own behaviour). Every call runs on a background worker.
"""

import logging

from yolotrain.integrations.common import Tracker

LOGGER = logging.getLogger(__name__)


class DVCLiveLogger(Tracker):
    """One DVCLive folder per training run."""

    name = "dvclive"

    def __init__(self):
        super().__init__()
        self.live = None

    def open(self, start):
        """Create the DVCLive folder in the run folder and log the arguments as params."""
        from dvclive import Live

        # No automatic DVC experiment: that commits to the user's git repository, which a trainer must not do.
        self.live = Live(dir=str(start.save_dir / "dvclive"), save_dvc_exp=False)
        self.live.log_params(start.config)
        LOGGER.info(f"dvclive: logging to {start.save_dir / 'dvclive'}")

    def log_epoch(self, metrics, step):
        """The epoch's numbers at step epoch + 1 (one .tsv plot per name, metrics.json updated)."""
        self.live.step = step
        for name, value in metrics.items():
            self.live.log_metric(name, value)
        self.live.next_step()

    def finish(self, end):
        """The plots as images and best.pt as the model artifact, then end."""
        self.live.step = end.step
        for path in end.plots:
            self.live.log_image(path.name, str(path))
        if end.weights:
            self.live.log_artifact(str(end.weights[0]), type="model", name="best", copy=False)
        self.live.end()
        self.live = None

    def fail(self):
        """Training failed: end what was logged so far."""
        if self.live is not None:
            self.live.end()
            self.live = None
