"""Start a multi-process (DDP) training run on this machine with torch.distributed's own launcher.

`device=0,1,2,3` (or `YOLO.train(nprocs=N)`) starts N worker processes through
`torch.distributed.launcher.api.elastic_launch`, the same machinery as `torchrun --standalone`: every worker gets the
usual `RANK`/`LOCAL_RANK`/`WORLD_SIZE`/`MASTER_ADDR` environment, and when one worker fails the launcher stops the
others and reports the failing rank's error. The worker function receives the trainer class, the user's overrides
and the `Callbacks` registry as Python objects, so a user's trainer subclass and callbacks run on every rank; no
script is generated.

How the objects reach the workers: with the `spawn` start method they are pickled, which works for classes and
module-level functions (pickled by reference, imported again in the worker). Lambdas and closures cannot be pickled;
for them the `fork` start method is used when CUDA has not been initialised in this process (forked children inherit
the objects as they are). If neither works, a `CfgError` says which object is the problem.

Started by hand, the same run is `torchrun --standalone --nproc_per_node N -m yolotrain train ...` (see
`torchrun_command`); across machines, `torchrun --nnodes M --nproc_per_node N --rdzv_backend c10d
--rdzv_endpoint HOST:PORT --rdzv_id RUN -m yolotrain train ...` on each machine.
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import shlex
import time
import uuid
from typing import Any, Dict, Optional

from yolotrain.errors import CfgError, YoloTrainError
from yolotrain.utils import dist

LOGGER = logging.getLogger(__name__)

# Seconds the launcher gives surviving workers to exit after SIGTERM (one rank failed) before it kills them.
WORKER_SHUTDOWN_TIMEOUT_S = 15


class DistributedRunError(YoloTrainError):
    """A worker of a multi-process run failed; the launcher stopped the others."""

    exit_code = 1


def listed_gpu_count(device: Any) -> int:
    """Number of GPU indices in a `device` argument like `0,1,2,3` (0 for cpu, mps, empty or a single GPU name)."""
    text = "" if device is None else str(device).replace(" ", "").replace("cuda:", "").strip("[]()")
    indices = [part for part in text.split(",") if part.strip("'\"").isdigit()]
    return len(indices)


def processes_to_launch(device: Any, nprocs: Optional[int] = None) -> int:
    """How many worker processes this call should start: 0 when it should train in this process.

    Inside a worker (started by torchrun or by `launch_training`) the answer is always 0. Otherwise `nprocs` when
    given and above 1, else the number of GPUs listed in `device` when above 1.
    """
    if dist.launched_distributed() or dist.is_dist():
        return 0
    count = int(nprocs) if nprocs else listed_gpu_count(device)
    return count if count > 1 else 0


def torchrun_command(overrides: Dict[str, Any], nprocs: int, mode: str = "train") -> str:
    """The `torchrun` command line that starts the same run by hand on one machine."""
    arguments = [f"{key}={_cli_value(value)}" for key, value in overrides.items() if key not in ("mode",)]
    words = ["torchrun", "--standalone", f"--nproc_per_node={nprocs}", "-m", "yolotrain", mode, *arguments]
    return " ".join(shlex.quote(word) for word in words)


def _cli_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return "" if value is None else str(value)


def launch_training(trainer_class: type, overrides: Dict[str, Any], callbacks: Any, nprocs: int) -> Dict[str, Any]:
    """Train with `nprocs` processes on this machine and return rank 0's result.

    Each worker builds `trainer_class(overrides=overrides, _callbacks=callbacks)` and calls `train()`, which joins
    the process group. Returns `{"metrics": dict, "save_dir": str, "best": str}` from rank 0. A failed worker raises
    `DistributedRunError` naming the rank and its error (its traceback is logged).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    payload = (trainer_class, dict(overrides), callbacks)
    config = _launch_config(nprocs, _start_method(payload))
    LOGGER.info(
        f"DDP: starting {nprocs} processes ({config.start_method}); the same run from a shell: "
        f"{torchrun_command(overrides, nprocs)}"
    )
    try:
        results = elastic_launch(config, train_worker)(*payload)
    except ChildFailedError as error:
        raise _run_error(error) from None
    return results[0]


def _launch_config(nprocs: int, start_method: str):
    from torch.distributed.launcher.api import LaunchConfig

    # The same rendezvous as `torchrun --standalone`: a store on a free local port, one node, no restarts
    # (a restart would silently start the run over).
    return LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nprocs,
        run_id=f"yolotrain-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        start_method=start_method,
        shutdown_timeout=WORKER_SHUTDOWN_TIMEOUT_S,
    )


def _start_method(payload: tuple) -> str:
    """`spawn` when the trainer class, overrides and callbacks pickle; else `fork` if that is safe here."""
    try:
        pickle.dumps(payload)
        return "spawn"
    except Exception as error:  # lambdas, closures, local classes: any pickling failure
        reason = f"{type(error).__name__}: {error}"
    import torch

    if "fork" in multiprocessing.get_all_start_methods() and not torch.cuda.is_initialized():
        LOGGER.info(f"DDP: the trainer class or a callback cannot be pickled ({reason}); starting workers by fork")
        return "fork"
    raise CfgError(
        f"multi-process training needs the trainer class and callbacks to be importable (module-level) objects, "
        f"but one cannot be pickled ({reason}); define it at module level"
    )


# What a rank reports when it lost its peers: a consequence of another rank's failure, not its cause.
PEER_LOSS_MARKERS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "remote worker crashing",
    "Broken pipe",
    "NCCL communicator was aborted",
)


PEER_LOSS_GRACE_S = 3.0


def is_peer_loss(message: str) -> bool:
    """True for the error of a rank that only lost its peers (see PEER_LOSS_MARKERS)."""
    return any(marker in message for marker in PEER_LOSS_MARKERS)


def _failure_message(failure) -> str:
    message = failure.message
    if isinstance(message, dict):  # the error file written by @record: {"message": ..., "extraInfo": ...}
        message = message.get("message", message)
    return str(message).strip()


def _root_failure(error):
    """(rank, failure) of the rank that failed first for a reason of its own: when one rank raises, the others
    fail too as their collectives lose it, sometimes a moment earlier by the clock."""
    failures = sorted(error.failures.items(), key=lambda item: item[1].timestamp)
    for rank, failure in failures:
        if not is_peer_loss(_failure_message(failure)):
            return rank, failure
    return failures[0]


def _run_error(error) -> DistributedRunError:
    """One line naming the failed rank and its error; the full report (tracebacks) goes to the log."""
    LOGGER.error(str(error))
    rank, failure = _root_failure(error)
    message = _failure_message(failure)
    last_line = message.splitlines()[-1] if message else ""
    return DistributedRunError(f"DDP worker rank {rank} failed with exit code {failure.exitcode}: {last_line}")


def train_worker(trainer_class: type, overrides: Dict[str, Any], callbacks: Any) -> Optional[Dict[str, Any]]:
    """Entry point of one worker process: train, and return rank 0's metrics and paths (None on other ranks).

    Wrapped by torch's `record` so an exception is written to the launcher's error file with its traceback.
    """
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(_train_in_worker)(trainer_class, overrides, callbacks)


def _train_in_worker(trainer_class: type, overrides: Dict[str, Any], callbacks: Any) -> Optional[Dict[str, Any]]:
    from yolotrain.cfg import get_cfg
    from yolotrain.utils.log import setup_logging

    # A spawned worker starts with no logging set up; only rank 0 prints progress.
    setup_logging(get_cfg(overrides).verbose and dist.is_main())
    trainer = trainer_class(overrides=overrides, _callbacks=callbacks)
    try:
        metrics = trainer.train()
    except Exception as error:
        if is_peer_loss(str(error)):
            # Only a consequence of another rank's failure: let that rank's exit be observed first, since the
            # launcher reports the first process to end (and stops the others).
            time.sleep(PEER_LOSS_GRACE_S)
        raise
    if not dist.is_main():
        return None
    from yolotrain.engine.model import final_metrics

    return {"metrics": final_metrics(trainer, metrics), "save_dir": str(trainer.save_dir), "best": str(trainer.best)}
