"""Checkpointer: the training state as one checkpoint dict, gathered from the components that hold it.

One rule for every component: `state_dict()` returns its checkpoint entries under fixed top-level keys, and
`load_state_dict(checkpoint)` reads them back from the whole checkpoint. An object with an ordinary state dict
(optimizer, schedule, early stopping, callbacks) is stored under one key with `Stored`; the EMA stores its weights
under `ema` (a model state dict, what users load) and its update count under `ema_updates`.

Components come in two groups: the *weights* (model, EMA, optimizer, GradScaler, schedule, early stopping), which a
NaN rollback restores, and the *progress* (time budget, NaN recovery count, callbacks), which only a resume does.
"""

from yolotrain.errors import CheckpointError
from yolotrain.utils.checkpoint import rng_state
from yolotrain.utils.torch_utils import cpu_copy

CHECKPOINT_FORMAT_VERSION = 1


def check_format_version(checkpoint, path):
    """Raise a one-line `CheckpointError` unless `checkpoint` (read from `path`) has this yolotrain's format."""
    found = checkpoint.get("format_version")
    if found != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"'{path}' has checkpoint format version {found}, this yolotrain reads version "
            f"{CHECKPOINT_FORMAT_VERSION} only; train it further with the yolotrain that wrote it"
        )


class Stored:
    """A component with its own `state_dict()/load_state_dict(state)`, stored whole under `key`."""

    def __init__(self, key, component):
        self.key = key
        self.component = component

    def state_dict(self):
        return {self.key: self.component.state_dict()}

    def load_state_dict(self, checkpoint):
        self.component.load_state_dict(checkpoint[self.key])


class EMAState:
    """The EMA's averaged weights (`ema`) and its update count (`ema_updates`, which sets its decay ramp)."""

    def __init__(self, ema):
        self.ema = ema

    def state_dict(self):
        return {"ema": self.ema.state_dict(), "ema_updates": int(self.ema.updates)}

    def load_state_dict(self, checkpoint):
        self.ema.load_state_dict(checkpoint["ema"])
        self.ema.updates = int(checkpoint["ema_updates"])


class Checkpointer:
    """Gathers `weights` and `progress` components (lists, in load order) into checkpoint entries."""

    def __init__(self, weights, progress):
        self.weights = list(weights)
        self.progress = list(progress)

    def snapshot(self):
        """A copy of the weights' entries in CPU memory (on a GPU, a second copy there would cost as much memory
        as the model itself): what a NaN rollback returns to when no completed-epoch checkpoint exists."""
        return cpu_copy(self._entries(self.weights))

    def state_dict(self):
        """Every component's entries, plus the format version and the RNG states (restored by a mid-epoch resume)."""
        entries = self._entries(self.weights + self.progress)
        entries.update(format_version=CHECKPOINT_FORMAT_VERSION, rng=rng_state())
        return entries

    def load_weights(self, checkpoint):
        """Restore the weights group only (a NaN rollback keeps its progress)."""
        for component in self.weights:
            component.load_state_dict(checkpoint)

    def load_state_dict(self, checkpoint):
        """Restore every component (a resume)."""
        self.load_weights(checkpoint)
        for component in self.progress:
            component.load_state_dict(checkpoint)

    @staticmethod
    def _entries(components):
        entries = {}
        for component in components:
            state = component.state_dict()
            claimed = entries.keys() & state.keys()
            if claimed:  # a programming error: two components would overwrite each other's state
                raise RuntimeError(f"checkpoint keys {sorted(claimed)} are claimed by two components")
            entries.update(state)
        return entries
