"""NanRecovery: a run whose loss or fitness turns non-finite rolls back to its last good state and replays.

The last good state is `last.pt` when it holds a completed epoch, else the state the run started from (kept in CPU
memory). The replay uses a new seed salt, so the same bad batch order is not repeated. Under DDP only rank 0 picks
and reads the rollback state (other nodes may not share its filesystem); the trainer broadcasts it.
"""

from yolotrain.errors import YoloTrainError
from yolotrain.utils.checkpoint import load_checkpoint

MAX_NAN_RECOVERIES = 3


class NonFiniteLossError(RuntimeError):
    """Raised inside an epoch when the loss is NaN/Inf; handled by rolling back to the last good state."""


class NanRecovery:
    """Counts the rollbacks of a run and knows where to roll back to.

    State (`state_dict`): the number of rollbacks so far, which is also the seed salt of the replayed epochs.
    """

    def __init__(self, max_recoveries=MAX_NAN_RECOVERIES):
        self.max_recoveries = max_recoveries
        self.count = 0
        self._start = None  # {"state", "next_epoch", "source"}: where this process started

    @property
    def salt(self):
        """Mixed into each epoch's seed: 0 until the first rollback."""
        return self.count

    def remember_start(self, state, epoch, source):
        """The fallback when no completed-epoch checkpoint exists yet: `state` (a CPU snapshot) before `epoch`."""
        self._start = {"state": state, "next_epoch": epoch, "source": source}

    def begin(self, reason):
        """Count a rollback for `reason`; give up with a one-line error after `max_recoveries`."""
        self.count += 1
        if self.count > self.max_recoveries:
            raise YoloTrainError(f"training diverged: {reason}; gave up after {self.max_recoveries} recoveries")

    def last_good_state(self, last_checkpoint):
        """`{"state", "next_epoch", "source"}` to roll back to: `last_checkpoint` if it ends a completed epoch."""
        if last_checkpoint.exists():
            state = load_checkpoint(last_checkpoint)
            if "batch_index" not in state:
                return {"state": state, "next_epoch": state["epoch"] + 1, "source": str(last_checkpoint)}
        return self._start

    def state_dict(self):
        return {"nan_recoveries": self.count}

    def load_state_dict(self, state):
        self.count = int(state.get("nan_recoveries", 0))
