"""MLflow: parameters, per-epoch metrics, weights and plots of a run, through the `mlflow` client.

Enabled with ``mlflow=True`` or by setting ``MLFLOW_TRACKING_URI`` (a tracking server ``http://...`` or a local
store such as ``sqlite:///path/mlflow.db``). Without ``MLFLOW_TRACKING_URI`` the runs go to
``<project>/mlflow.db`` with artifacts in ``<project>/mlartifacts``. Experiment = ``project`` (default
"yolotrain"), run name = the run folder's name. Every client call runs on a background worker, so training never
waits on the store or the server.
"""

import logging
import os
import time

from yolotrain.integrations.common import Tracker, safe_uri, sanitize_metric_name

LOGGER = logging.getLogger(__name__)

PARAMS_PER_CALL = 100  # MLflow's log-batch limit for parameters
MAX_PARAM_LENGTH = 6000  # MLflow's limit for a parameter value


class MLflowLogger(Tracker):
    """One MLflow run per training run."""

    name = "mlflow"

    def __init__(self):
        super().__init__()
        self.client = None
        self.run_id = None

    def open(self, start):
        """Create the run and log the arguments as parameters."""
        from mlflow import MlflowClient
        from mlflow.entities import Param

        tracking_uri, artifact_root = self._locations(start.save_dir)
        self.client = MlflowClient(tracking_uri=tracking_uri)
        experiment_id = self._experiment_id(start.experiment, artifact_root)
        run = self.client.create_run(experiment_id, run_name=start.run_name)
        self.run_id = run.info.run_id
        params = [Param(k, v[:MAX_PARAM_LENGTH]) for k, v in start.params.items()]
        for first in range(0, len(params), PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=params[first : first + PARAMS_PER_CALL])
        LOGGER.info(f"mlflow: logging run '{run.info.run_name}' ({self.run_id}) to {safe_uri(tracking_uri)}")

    @staticmethod
    def _locations(save_dir):
        """(tracking URI, artifact root for a new experiment or None): the env's server, else a local database."""
        tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
        project_dir = save_dir.resolve().parent
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

    def log_epoch(self, metrics, step):
        """The epoch's losses, metrics and learning rates at step epoch + 1."""
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        entries = [Metric(sanitize_metric_name(k), v, timestamp, step) for k, v in metrics.items()]
        if entries:
            self.client.log_batch(self.run_id, metrics=entries)

    def finish(self, end):
        """Log best.pt/last.pt and the plots, and end the run FINISHED."""
        for weights in end.weights:
            self.client.log_artifact(self.run_id, str(weights), "weights")
        for plot in end.plots:
            self.client.log_artifact(self.run_id, str(plot), "plots")
        self.client.set_terminated(self.run_id, "FINISHED")
        LOGGER.info("mlflow: run finished and artifacts logged")

    def fail(self):
        """Training failed: end the run FAILED."""
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, "FAILED")
