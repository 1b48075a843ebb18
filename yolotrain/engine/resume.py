"""Resume: which checkpoint a `resume=` run continues, with which arguments, and from which batch.

A resumed run is a fresh set-up followed by loading the checkpoint's state (`Checkpointer.load_state_dict`). Its
arguments come from the checkpoint, except the few in `RESUME_OVERRIDABLE` that a user may change when continuing,
and those in `RUN_OWNED`, which only the resuming command sets: a checkpoint is data, and a last.pt from anywhere
must not decide where this run's metrics, weights and credentials go or which code it imports.
A checkpoint written mid-epoch (after a signal) also holds the position inside the epoch: `MidEpochPosition`.
"""

import logging
from pathlib import Path

import torch

from yolotrain.cfg import get_cfg
from yolotrain.engine.checkpointer import check_format_version
from yolotrain.errors import CheckpointError, DatasetError, YoloTrainError
from yolotrain.utils import dist
from yolotrain.utils.checkpoint import find_latest_checkpoint, load_checkpoint, set_rng_state
from yolotrain.utils.files import project_dir

LOGGER = logging.getLogger(__name__)

# Arguments that may change when a run is resumed; everything else comes from the checkpoint.
# `data` may name the same dataset at its new place (a moved folder, another machine).
RESUME_OVERRIDABLE = ("epochs", "patience", "time", "save_period", "workers", "device", "batch_timeout", "data")
# Arguments that belong to the command that resumes, never to the checkpoint: the integrations and the remote server
# (destinations of the run's data and of the credentials in this environment) and `augment` (a module to import and
# call). Given on the command line they are used; otherwise their defaults (off), whatever the checkpoint says.
RUN_OWNED = ("augment", "tensorboard", "mlflow", "wandb", "dvclive", "remote", "remote_metrics_period",
             "remote_ckpt_period", "remote_heartbeat_period", "remote_timeout", "remote_final_timeout")


ELASTIC_RUN_FILE = ".torchelastic_run_id"  # in a run folder started by torchrun: the job id, to find it on a restart


def elastic_restart_folder(args):
    """The run folder this torchrun job started, when torchrun's agent has restarted its group after a failure
    (TORCHELASTIC_RESTART_COUNT > 0): the folder whose ELASTIC_RUN_FILE holds this job's id. None on a first start
    (which never continues an older run) or when no folder of the project holds the id."""
    run_id = dist.elastic_run_id()
    if dist.restart_count() < 1 or run_id is None:
        return None
    for marker in sorted(project_dir(args).glob(f"**/{ELASTIC_RUN_FILE}")):
        try:
            if marker.read_text(encoding="utf-8").strip() == run_id:
                return marker.parent
        except OSError:
            continue
    return None


def mark_elastic_run(save_dir):
    """Record this torchrun job's id in its run folder, so a restarted group finds the run it continues."""
    run_id = dist.elastic_run_id()
    if run_id is not None:
        (Path(save_dir) / ELASTIC_RUN_FILE).write_text(run_id, encoding="utf-8")


def find_resume_checkpoint(args):
    """The checkpoint `args.resume` names: a path, or (resume=True) the newest last.pt under the project folder."""
    resume = args.resume
    if isinstance(resume, str):
        path = Path(resume)
        if not path.exists():
            raise CheckpointError(f"resume checkpoint '{resume}' does not exist")
        return path
    search_dir = project_dir(args)
    path = find_latest_checkpoint(search_dir)
    if path is None:
        raise CheckpointError(f"resume=True but no last.pt was found under '{search_dir}'")
    return path


def args_for_resume(path, overrides):
    """The checkpoint's arguments, with the few that may change on resume taken from the user's `overrides`."""
    checkpoint = load_checkpoint(path)
    if "optimizer" not in checkpoint or "train_args" not in checkpoint:
        raise CheckpointError(f"'{path}' holds no optimizer state (stripped release weights); cannot resume it")
    check_format_version(checkpoint, path)
    args = dict(checkpoint["train_args"])
    changed = {k: overrides[k] for k in RESUME_OVERRIDABLE if k in overrides and overrides[k] != args.get(k)}
    # What the caller passes that equals the checkpoint's own (the facade always passes mode and task) is no news.
    ignored = sorted(k for k in overrides if k not in (*RESUME_OVERRIDABLE, *RUN_OWNED, "resume", "model", "cfg")
                     and overrides[k] != args.get(k))
    args.update(changed)
    args.update(_run_owned(args, overrides, path))
    _check_saved_data(args.get("data"), path)
    args.update(resume=str(path), exist_ok=True)
    if changed:
        LOGGER.info(f"resume: using the new values {changed}")
    if ignored:
        LOGGER.warning(f"resume: ignoring {ignored}; these come from the checkpoint when resuming")
    epochs = args["epochs"]
    last_epoch = checkpoint["epoch"] + (0 if "batch_index" in checkpoint else 1)
    if last_epoch >= epochs and not args.get("time"):
        raise YoloTrainError(
            f"'{path}' already finished its {epochs} epochs; resume with epochs=N (N > {epochs}) to train further"
        )
    return get_cfg(args)


def _check_saved_data(data, path):
    """The dataset a resume trains on must still be where the checkpoint says (a relative path is read from the
    current folder); if not, say how to point at it instead of failing later on a path the user never typed."""
    if isinstance(data, str) and data and not Path(data).expanduser().exists():
        raise DatasetError(f"resume: the dataset '{data}' saved in {path} is not found from {Path.cwd()}; give "
                           f"data=<its path now> (a relative path is read from the folder the run started in)")


def _run_owned(saved, overrides, path):
    """The `RUN_OWNED` arguments of a resumed run: the resuming command's, else the defaults. A value the checkpoint
    holds and the command does not repeat is named in one line (it is not used)."""
    defaults = vars(get_cfg())
    owned = {key: overrides.get(key, defaults[key]) for key in RUN_OWNED}
    dropped = {key: saved[key] for key in RUN_OWNED
               if key not in overrides and saved.get(key) not in (None, "", defaults[key])}
    if dropped:
        listed = ", ".join(f"{key}={value}" for key, value in dropped.items())
        LOGGER.warning(f"resume: {listed} from {path} not used: integrations, remote servers and augment hooks "
                       f"come from the resuming command (give them again to keep them)")
    return owned


class MidEpochPosition:
    """Where inside an epoch a signal stopped training: the next batch, the running loss, the gradients
    accumulated but not yet stepped, and the RNG states. Applied after the epoch's normal start (which seeds the
    RNGs and positions the loader), so the rest of the epoch replays exactly as if never stopped."""

    def __init__(self, checkpoint):
        self.epoch = checkpoint["epoch"]
        self.next_batch = checkpoint["batch_index"]
        self._checkpoint = checkpoint

    @staticmethod
    def entries(next_batch, model, tloss, batches_in_epoch):
        """The checkpoint entries of a position (added to the checkpoint written on a signal)."""
        return {
            "batch_index": next_batch,
            "grads": [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()],
            "tloss": None if tloss is None else tloss.tolist(),
            "batches_in_epoch": batches_in_epoch,
        }

    def apply(self, model, device):
        """Put back RNG states and gradients; return (tloss on `device` or None, batches done in the epoch)."""
        state = self._checkpoint
        set_rng_state(state["rng"])
        for param, grad in zip(model.parameters(), state.get("grads", [])):
            param.grad = None if grad is None else grad.to(param.device)
        tloss = None if state.get("tloss") is None else torch.tensor(state["tloss"], device=device)
        return tloss, state.get("batches_in_epoch", 0)
