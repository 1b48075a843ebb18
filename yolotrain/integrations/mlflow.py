"""MLflow: parameters, per-epoch metrics, weights and plots of a run, through the `mlflow` client.

Enabled with ``mlflow=True`` or by setting ``MLFLOW_TRACKING_URI`` (a tracking server ``http://...`` or a local
store such as ``sqlite:///path/mlflow.db``). Without ``MLFLOW_TRACKING_URI`` the runs go to
``<project>/mlflow.db`` with artifacts in ``<project>/mlartifacts``. Experiment = ``project`` (default
"yolotrain"), run name = the run folder's name. Metric logging is asynchronous so training never waits on it.
"""

import logging
import os
import time
from pathlib import Path

from yolotrain.integrations.common import epoch_metrics, plain_params, plot_files, safe_uri, sanitize_metric_name

LOGGER = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "yolotrain"
PARAMS_PER_CALL = 100  # MLflow's log-batch limit for parameters
MAX_PARAM_LENGTH = 6000  # MLflow's limit for a parameter value


def experiment_name(args):
    """The experiment a run is logged under: the project's folder name, else "yolotrain"."""
    return Path(str(args.project)).name if args.project else DEFAULT_EXPERIMENT


class MLflowLogger:
    """One MLflow run per training run; its methods are the trainer callbacks."""

    integration_owner = True  # marks callbacks registered by add_integration_callbacks

    def __init__(self):
        self.client = None
        self.run_id = None
        self._pending_operations = []

    def callbacks(self):
        """{event: fn(trainer)} to register on the trainer."""
        return {
            "on_pretrain_routine_end": self.on_pretrain_routine_end,
            "on_fit_epoch_end": self.on_fit_epoch_end,
            "on_train_end": self.on_train_end,
            "teardown": self.teardown,
        }

    # ------------------------------------------------------------------ run life cycle
    def on_pretrain_routine_end(self, trainer):
        """Create the run and log the arguments as parameters."""
        from mlflow import MlflowClient
        from mlflow.entities import Param

        tracking_uri, artifact_root = self._locations(trainer)
        self.client = MlflowClient(tracking_uri=tracking_uri)
        experiment_id = self._experiment_id(experiment_name(trainer.args), artifact_root)
        run = self.client.create_run(experiment_id, run_name=Path(trainer.save_dir).name)
        self.run_id = run.info.run_id
        params = [Param(k, v[:MAX_PARAM_LENGTH]) for k, v in plain_params(trainer.args).items()]
        for start in range(0, len(params), PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=params[start : start + PARAMS_PER_CALL])
        LOGGER.info(f"mlflow: logging run '{run.info.run_name}' ({self.run_id}) to {safe_uri(tracking_uri)}")

    @staticmethod
    def _locations(trainer):
        """(tracking URI, artifact root for a new experiment or None): the env's server, else a local database."""
        tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
        project_dir = Path(trainer.save_dir).resolve().parent
        local_artifacts = (project_dir / "mlartifacts").as_uri()
        if tracking_uri:
            # A database store without a server would put artifacts in ./mlruns of whatever the working folder is.
            remote = tracking_uri.startswith(("http://", "https://", "databricks"))
            return tracking_uri, None if remote else local_artifacts
        return f"sqlite:///{project_dir / 'mlflow.db'}", local_artifacts

    def _experiment_id(self, name, artifact_root):
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        return self.client.create_experiment(name, artifact_location=artifact_root)

    # ------------------------------------------------------------------ per epoch
    def on_fit_epoch_end(self, trainer):
        """The epoch's losses, metrics and learning rates at step epoch + 1 (sent in the background)."""
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        step = trainer.epoch + 1
        metrics = [
            Metric(sanitize_metric_name(k), v, timestamp, step) for k, v in epoch_metrics(trainer).items()
        ]
        if metrics:
            operation = self.client.log_batch(self.run_id, metrics=metrics, synchronous=False)
            if operation is not None:
                self._pending_operations.append(operation)

    # ------------------------------------------------------------------ end
    def on_train_end(self, trainer):
        """Log the final metrics, best.pt/last.pt and the plots, and end the run FINISHED."""
        if self.run_id is None:
            return
        self._wait_for_metrics()
        for weights in (trainer.best, trainer.last):
            if Path(weights).exists():
                self.client.log_artifact(self.run_id, str(weights), "weights")
        for plot in plot_files(trainer.save_dir):
            self.client.log_artifact(self.run_id, str(plot), "plots")
        self._end_run("FINISHED")
        LOGGER.info("mlflow: run finished and artifacts logged")

    def teardown(self, trainer):
        """A run still open here did not reach on_train_end: training failed, so end it FAILED."""
        if self.run_id is not None:
            self._end_run("FAILED")

    def _wait_for_metrics(self):
        for operation in self._pending_operations:
            try:
                operation.wait()
            except Exception as error:  # a lost metric batch must not stop the artifacts and the status
                LOGGER.warning(f"mlflow: a metric batch could not be logged ({type(error).__name__}: {error})")
        self._pending_operations = []

    def _end_run(self, status):
        run_id, self.run_id = self.run_id, None  # first: never end the same run twice
        self._wait_for_metrics()
        self.client.set_terminated(run_id, status)
