"""Weights & Biases: the run's arguments as config, per-epoch metrics, the plots, and best.pt as a model artifact.

Enabled with ``wandb=True`` (extra ``yolotrain[wandb]``). Project = ``project`` (default "yolotrain"), run name =
the run folder's name; W&B's own files go to ``<run>/wandb``. Log in once with ``wandb login``, or set
``WANDB_MODE=offline`` and upload later with ``wandb sync``. Every call runs on a background worker.
"""

import logging

from yolotrain.integrations.common import Tracker

LOGGER = logging.getLogger(__name__)


class WandbLogger(Tracker):
    """One W&B run per training run."""

    name = "wandb"

    def __init__(self):
        super().__init__()
        self.run = None

    def open(self, start):
        """Start the run with the arguments as its config."""
        import wandb

        self.run = wandb.init(project=start.experiment, name=start.run_name, config=start.config,
                              dir=str(start.save_dir), job_type="train")
        LOGGER.info(f"wandb: logging run '{start.run_name}' to project '{start.experiment}'")

    def log_epoch(self, metrics, step):
        """The epoch's losses, metrics and learning rates at step epoch + 1."""
        self.run.log(metrics, step=step)

    def finish(self, end):
        """The plots as images, the final metrics in the summary, best.pt (else last.pt) as a model artifact."""
        import wandb

        if end.plots:
            self.run.log({path.stem: wandb.Image(str(path)) for path in end.plots}, step=end.step)
        self.run.summary.update({f"final/{k}": v for k, v in end.metrics.items()})
        if end.weights:
            weights = end.weights[0]
            artifact = wandb.Artifact(f"run_{self.run.id}_model", type="model", metadata=dict(end.metrics))
            artifact.add_file(str(weights), name=weights.name)
            self.run.log_artifact(artifact, aliases=["latest", "best"] if weights.stem == "best" else ["latest"])
        self.run.finish(exit_code=0)
        self.run = None

    def fail(self):
        """Training failed: end the run with a failed state."""
        if self.run is not None:
            self.run.finish(exit_code=1)
            self.run = None
