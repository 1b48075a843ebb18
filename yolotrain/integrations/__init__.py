"""Experiment tracking and remote sync, wired onto the trainer's events.

`add_integration_callbacks(trainer)` is called once by the trainer on the main process, before
``on_pretrain_routine_start``. Each enabled integration registers its callbacks with ``integration=True``, so a
backend that fails is reported once and skipped: logging never stops or changes a training run.
"""

import logging
import os

LOGGER = logging.getLogger(__name__)

INSTALL_HINT = "{flag}=True but the {package} package is not installed: pip install 'yolotrain[{extra}]'"


def _package_available(module_name):
    """True when `module_name` imports; optional packages are only imported when their integration is enabled."""
    try:
        __import__(module_name)
        return True
    except Exception:  # ImportError, or a broken install raising something else at import
        return False


def _add_tensorboard(trainer):
    if not _package_available("tensorboard"):
        LOGGER.warning(INSTALL_HINT.format(flag="tensorboard", package="tensorboard", extra="tensorboard"))
        return
    from yolotrain.integrations.tensorboard import TensorBoardLogger

    trainer.callbacks.extend(TensorBoardLogger().callbacks(), integration="tensorboard")


def _add_mlflow(trainer):
    if not _package_available("mlflow"):
        LOGGER.warning(INSTALL_HINT.format(flag="mlflow", package="mlflow", extra="mlflow"))
        return
    from yolotrain.integrations.mlflow import MLflowLogger

    trainer.callbacks.extend(MLflowLogger().callbacks(), integration="mlflow")


def _add_remote(trainer):
    from yolotrain.integrations.remote import RemoteSync

    # Checked here, before the trainer writes args.yaml: a URI with a password must never reach any file.
    sync = RemoteSync(trainer.args.remote)
    trainer.callbacks.extend(sync.callbacks(), integration="remote")


def _already_added(trainer):
    owners = {getattr(fn, "__self__", None) for fn in trainer.callbacks.get("teardown")}
    return any(getattr(owner, "integration_owner", False) for owner in owners)


def add_integration_callbacks(trainer):
    """Register the callbacks of every integration enabled in `trainer.args` (tensorboard, mlflow, remote).

    A missing optional package gives one warning naming the extra to install, never an error. A remote URI holding
    credentials raises `CfgError` (credentials belong in environment variables, never in the run's files).
    """
    if _already_added(trainer):  # idempotent: a second call must not open a second session
        return
    args = trainer.args
    if getattr(args, "tensorboard", False):
        _add_tensorboard(trainer)
    if getattr(args, "mlflow", False) or os.environ.get("MLFLOW_TRACKING_URI"):
        _add_mlflow(trainer)
    if getattr(args, "remote", None):
        _add_remote(trainer)
