"""Experiment tracking and remote sync, wired onto the trainer's events.

`add_integration_callbacks(trainer)` is called once by the trainer on the main process, before
``on_pretrain_routine_start``. Each enabled integration registers its callbacks with ``integration=True``, so a
backend that fails is reported once and skipped: logging never stops or changes a training run. The trackers do
their writing on a background worker (`common.BackgroundWorker`), so a training event costs a queue put.
"""

import importlib
import logging
import os

LOGGER = logging.getLogger(__name__)

INSTALL_HINT = "{flag}=True but the {package} package is not installed: pip install 'yolotrain[{extra}]'"

# argument -> (package it needs, module and class of its tracker); the extra is named like the argument.
TRACKERS = {
    "tensorboard": ("tensorboard", "yolotrain.integrations.tensorboard", "TensorBoardLogger"),
    "mlflow": ("mlflow", "yolotrain.integrations.mlflow", "MLflowLogger"),
    "wandb": ("wandb", "yolotrain.integrations.wandb", "WandbLogger"),
    "dvclive": ("dvclive", "yolotrain.integrations.dvclive", "DVCLiveLogger"),
}


def _package_available(module_name):
    """True when `module_name` imports; optional packages are only imported when their integration is enabled."""
    try:
        __import__(module_name)
        return True
    except Exception:  # ImportError, or a broken install raising something else at import
        return False


def _enabled(args, flag):
    if flag == "mlflow" and os.environ.get("MLFLOW_TRACKING_URI"):
        return True
    return bool(getattr(args, flag, False))


def _add_tracker(trainer, flag):
    package, module_name, class_name = TRACKERS[flag]
    if not _package_available(package):
        LOGGER.warning(INSTALL_HINT.format(flag=flag, package=package, extra=flag))
        return
    tracker = getattr(importlib.import_module(module_name), class_name)()
    trainer.callbacks.extend(tracker.callbacks(), integration=flag)


def _add_remote(trainer):
    from yolotrain.integrations.remote import RemoteSync

    # Checked here, before the trainer writes args.yaml: a URI with a password must never reach any file.
    sync = RemoteSync(trainer.args.remote)
    trainer.callbacks.extend(sync.callbacks(), integration="remote")


def _already_added(trainer):
    owners = {getattr(fn, "__self__", None) for fn in trainer.callbacks.get("teardown")}
    return any(getattr(owner, "integration_owner", False) for owner in owners)


def add_integration_callbacks(trainer):
    """Register the callbacks of every integration enabled in `trainer.args` (tensorboard, mlflow, wandb,
    dvclive, remote).

    A missing optional package gives one warning naming the extra to install, never an error. A remote URI holding
    credentials raises `CfgError` (credentials belong in environment variables, never in the run's files).
    """
    if _already_added(trainer):  # idempotent: a second call must not open a second session
        return
    for flag in TRACKERS:
        if _enabled(trainer.args, flag):
            _add_tracker(trainer, flag)
    if getattr(trainer.args, "remote", None):
        _add_remote(trainer)
