"""Everything that depends on the process rank lives here.

The rank is read lazily on every call (from ``torch.distributed`` once it is initialised, otherwise from the
launcher's environment variables), never at import time, so importing yolotrain in a parent process and then
spawning workers cannot freeze a stale rank into module state.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import functools
import logging
import os
from typing import Any, Callable, Iterator, List, Optional, Sequence, TypeVar

import torch
import torch.distributed as torch_dist

LOGGER = logging.getLogger(__name__)

_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def _process_group_ready() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        return int(value)
    except ValueError:
        return default


def rank() -> int:
    """Global rank of this process, or -1 when not running distributed."""
    if _process_group_ready():
        return torch_dist.get_rank()
    return _env_int("RANK", -1)


def local_rank() -> int:
    """Rank of this process on its node (the GPU index it should use), or -1 when not distributed."""
    return _env_int("LOCAL_RANK", -1)


def local_world_size() -> int:
    """Number of processes of this run on this node (they share its CPUs); 1 when not distributed."""
    return max(_env_int("LOCAL_WORLD_SIZE", 1), 1)


def world_size() -> int:
    """Number of processes taking part in training; 1 when not distributed."""
    if _process_group_ready():
        return torch_dist.get_world_size()
    return max(_env_int("WORLD_SIZE", 1), 1)


def is_dist() -> bool:
    """True when a process group is initialised with more than one process."""
    return _process_group_ready() and torch_dist.get_world_size() > 1


def is_main() -> bool:
    """True on the process that logs and saves: rank 0, or the only process."""
    return rank() in (-1, 0)


def barrier(group: Optional[Any] = None) -> None:
    """Wait until every process reaches this point; a no-op when not distributed.

    ``group``: a process group (e.g. the one from ``new_wait_group``) instead of the default one.
    """
    if is_dist():
        torch_dist.barrier(group=group)


def broadcast_object(obj: Any, src: int = 0, group: Optional[Any] = None) -> Any:
    """Return the ``src`` rank's ``obj`` on every rank (any picklable object); returns ``obj`` when alone."""
    if not is_dist():
        return obj
    holder = [obj]
    torch_dist.broadcast_object_list(holder, src=src, group=group)
    return holder[0]


def all_gather_object(obj: Any, group: Optional[Any] = None) -> List[Any]:
    """Every rank's ``obj`` (any picklable object), in rank order, on every rank; ``[obj]`` when alone."""
    if not is_dist():
        return [obj]
    gathered = [None] * torch_dist.get_world_size(group)
    torch_dist.all_gather_object(gathered, obj, group=group)
    return gathered


def all_reduce_mean(tensor: torch.Tensor, group: Optional[Any] = None) -> torch.Tensor:
    """Average ``tensor`` in place over all ranks and return it; unchanged when not distributed.

    The tensor must live where the group's backend works: a CUDA tensor for NCCL, a CPU tensor for gloo.
    """
    if not is_dist():
        return tensor
    torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM, group=group)
    tensor /= torch_dist.get_world_size(group)
    return tensor


def any_rank(flag: bool, device: Optional[torch.device] = None) -> bool:
    """True on every rank when ``flag`` is true on at least one rank (one small all-reduce on the default group).

    Used for decisions all ranks must take together (e.g. "this step's loss is not finite: roll back"), so no rank
    enters a collective (DDP's backward) that the others skip. ``device``: this rank's device (CUDA for NCCL).
    """
    return agreed_flags([flag], device)[0]


def agreed_flags(flags: Sequence[Any], device: Optional[torch.device] = None) -> List[bool]:
    """Each flag OR-ed over all ranks, from one all-reduce: every rank then takes the same decisions.

    ``flags``: bools or 0-dim tensors (a tensor flag stays on its device, so nothing is read back before the
    reduction; the one read is of the result). ``device``: this rank's device (CUDA for NCCL).
    """
    if device is None or (is_dist() and torch_dist.get_backend() != "nccl"):
        device = torch.device("cpu")
    values = torch.stack([torch.as_tensor(flag, device=device).reshape(()).float() for flag in flags])
    if is_dist():
        torch_dist.all_reduce(values, op=torch_dist.ReduceOp.MAX)
    return [value > 0 for value in values.tolist()]


_reduce_in_step: contextvars.ContextVar[bool] = contextvars.ContextVar("reduce_in_step", default=False)


@contextlib.contextmanager
def training_step_scope() -> Iterator[None]:
    """The trainer's forward: inside it a loss may reduce over the ranks (every rank runs the same step); a loss
    computed anywhere else (a callback, a custom validator) stays local and can never wait on the other ranks."""
    token = _reduce_in_step.set(is_dist())
    try:
        yield
    finally:
        _reduce_in_step.reset(token)


def in_training_step() -> bool:
    """True inside `training_step_scope` of a distributed run."""
    return _reduce_in_step.get()


@contextlib.contextmanager
def main_process_first(group: Optional[Any] = None) -> Iterator[None]:
    """Let the main process run the block first (e.g. download or cache a dataset), then the others.

    Non-main ranks wait at a barrier until the main rank has finished the block and reached the matching barrier.
    ``group``: the group to wait in; pass the ``new_wait_group`` one when the block may take longer than the
    default group's timeout (label scanning of a large dataset).
    """
    if not is_main():
        barrier(group)
    try:
        yield
    finally:
        if is_main():
            barrier(group)


def rank_zero_only(fn: _Fn) -> _Fn:
    """Decorate ``fn`` so that it runs only on the main process; other ranks get ``None``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if is_main():
            return fn(*args, **kwargs)
        return None

    return wrapper  # type: ignore[return-value]


def default_backend(device: Optional[Any] = None) -> str:
    """``nccl`` for a CUDA ``device`` (or, with no device given, when CUDA is usable), otherwise ``gloo``."""
    cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    return "nccl" if cuda and torch_dist.is_nccl_available() else "gloo"


def restart_count() -> int:
    """How many times torchrun's elastic agent has restarted this job's group (0 on the first start)."""
    return _env_int("TORCHELASTIC_RESTART_COUNT", 0)


def elastic_run_id() -> Optional[str]:
    """The id torchrun gives the whole job (its `--rdzv-id`, or a fresh one per `--standalone` run), which stays the
    same across the restarts of its group; None outside torchrun."""
    return os.environ.get("TORCHELASTIC_RUN_ID") or None


def launched_distributed() -> bool:
    """True in a worker started by a distributed launcher (torchrun, ``yolotrain.engine.launch``) for a run of
    more than one process: the environment names a rendezvous and a world size above 1."""
    return _env_int("WORLD_SIZE", 1) > 1 and "MASTER_ADDR" in os.environ


def init_process_group(backend: Optional[str] = None, timeout_s: float = 600, device: Optional[Any] = None) -> bool:
    """Join the process group described by the launcher's environment (``torchrun`` sets it).

    Does nothing when the group is already initialised. With NCCL, the process is bound to ``device`` (default:
    its ``LOCAL_RANK`` GPU) first so collectives use the right device. ``timeout_s`` bounds how long a collective
    waits for a missing rank before the run is aborted. Returns True when this call created the group (so the
    caller knows it should destroy it).
    """
    if _process_group_ready():
        return False
    backend = backend or default_backend(device)
    if backend == "nccl":
        torch.cuda.set_device(device if device is not None else max(local_rank(), 0))
    timeout = datetime.timedelta(seconds=timeout_s)
    store, group_rank, group_size = next(torch_dist.rendezvous("env://", timeout=timeout))
    # Keys of this attempt only: after torchrun restarts a failed group, the store may still hold the addresses of
    # the dead workers, and a group built from them waits for peers that are gone (gloo: "connectFullMesh failed").
    store = torch_dist.PrefixStore(f"yolotrain/attempt{restart_count()}", store)
    torch_dist.init_process_group(backend=backend, store=store, rank=group_rank, world_size=group_size, timeout=timeout)
    LOGGER.debug("joined process group: backend=%s rank=%d world_size=%d", backend, rank(), world_size())
    return True


# Long enough for any validation or checkpoint write; a rank that dies meanwhile is caught by the launcher
# (torchrun / elastic_launch stop every worker when one exits with an error), not by this timeout.
WAIT_GROUP_TIMEOUT_S = 7 * 24 * 3600


def new_wait_group(timeout_s: float = WAIT_GROUP_TIMEOUT_S) -> Optional[Any]:
    """A gloo group over all ranks for waiting on rank-0-only work (validation, saving, label scanning).

    The default group's short timeout exists to catch hung collectives between training steps; validation on rank
    0 may legitimately take longer, so the other ranks wait for its result in this group instead. Gloo also works
    next to NCCL and moves small CPU objects without touching the GPU. Every rank must call this (collective);
    returns None when not distributed.
    """
    if not is_dist():
        return None
    return torch_dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


def rank_device(device_arg: Any) -> torch.device:
    """This process's device for the user's ``device`` argument.

    Not distributed: ``select_device(device_arg)``. In a distributed worker: the CPU for ``device=cpu``, otherwise
    the GPU of this local rank: ``device=2,3`` puts local rank 0 on GPU 2 and local rank 1 on GPU 3; when the
    argument lists fewer GPUs than local ranks (e.g. torchrun with ``device=0`` or none), local rank N uses GPU N.
    """
    from yolotrain.utils.torch_utils import select_device

    device = select_device(device_arg)
    if local_rank() < 0 or device.type != "cuda":
        return device
    listed = [int(i) for i in str(device_arg).replace("cuda:", "").replace(" ", "").split(",") if i.isdigit()]
    index = listed[local_rank()] if local_rank() < len(listed) else local_rank()
    return torch.device("cuda", index)


def destroy_process_group() -> None:
    """Leave the process group; safe to call when none exists or twice."""
    if _process_group_ready():
        torch_dist.destroy_process_group()
