"""TimeBudget: the `time=` hours a run may take, resumes included, and the epoch count that fits in them."""

import time


class TimeBudget:
    """Elapsed training time, the over-budget check and the re-planned epoch count of a `time=` run.

    Args:
        hours: the budget (`args.time`); None or 0 means no budget.
        clock: seconds now (`time.time`); replaceable, e.g. to give each rank of a test its own clock.

    State (`state_dict`): the seconds trained so far and the planned epoch count, so a resumed run keeps both.
    Under DDP each rank has its own clock: callers agree on `exceeded()` over the ranks and take rank 0's `replan`.
    """

    def __init__(self, hours=None, clock=time.time):
        self.seconds = float(hours) * 3600 if hours else None
        self.clock = clock
        self.seconds_before = 0.0  # trained before a resume
        self.planned_epochs = None  # set by `replan`; None until the budget has re-planned the run
        self._started_at = None
        self._start_epoch = 0

    def start(self, start_epoch):
        """Training (re)starts now at `start_epoch`."""
        self._started_at = self.clock()
        self._start_epoch = start_epoch

    def elapsed(self):
        """Seconds trained in this run and every run it resumed."""
        if self._started_at is None:
            return self.seconds_before
        return self.seconds_before + self.clock() - self._started_at

    def exceeded(self):
        return self.seconds is not None and self.elapsed() > self.seconds

    def replan(self, epoch):
        """The epoch count that ends within the budget, from this run's measured time per epoch (after `epoch`)."""
        epochs_done_here = max(epoch + 1 - self._start_epoch, 1)
        seconds_per_epoch = max(self.clock() - self._started_at, 1e-9) / epochs_done_here
        remaining = self.seconds - self.elapsed()
        self.planned_epochs = epoch + 1 + max(int(remaining // seconds_per_epoch), 0)
        return self.planned_epochs

    def state_dict(self):
        return {"train_time": self.elapsed(), "planned_epochs": self.planned_epochs}

    def load_state_dict(self, state):
        self.seconds_before = float(state.get("train_time", 0.0))
        self.planned_epochs = state.get("planned_epochs")
