"""Early stopping on validation fitness."""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, Optional

LOGGER = logging.getLogger(__name__)


class EarlyStopping:
    """Stop training when fitness has not improved for ``patience`` epochs.

    A fitness equal to the best counts as an improvement; NaN or infinite fitness never does.
    ``patience <= 0`` disables stopping.
    """

    def __init__(self, patience: float = 50) -> None:
        self.patience = float(patience) if patience > 0 else math.inf
        self.best_fitness: Optional[float] = None
        self.best_epoch = 0
        self.last_epoch = 0

    def _improves(self, fitness: Optional[float]) -> bool:
        if fitness is None or not math.isfinite(fitness):
            return False
        return self.best_fitness is None or fitness >= self.best_fitness

    def update(self, epoch: int, fitness: Optional[float]) -> bool:
        """Record ``fitness`` for ``epoch`` (0-based); returns True when training should stop now."""
        self.last_epoch = epoch
        if fitness is not None and not math.isfinite(fitness):
            LOGGER.warning("epoch %d: fitness is %s; it does not count as an improvement", epoch + 1, fitness)
        if self._improves(fitness):
            self.best_fitness = float(fitness)  # type: ignore[arg-type]
            self.best_epoch = epoch
        stop = self.should_stop
        if stop:
            LOGGER.info(
                "stopping early: no improvement for %d epochs (best fitness %s at epoch %d); "
                "set patience=<epochs> (or 0 to disable) to train longer",
                self.epochs_without_improvement, self.best_fitness, self.best_epoch + 1,
            )
        return stop

    @property
    def epochs_without_improvement(self) -> int:
        """Epochs since the best one, as of the last ``update``."""
        return self.last_epoch - self.best_epoch

    @property
    def should_stop(self) -> bool:
        """The decision of the last ``update``: True when patience has run out."""
        return self.epochs_without_improvement >= self.patience

    @property
    def possible_stop(self) -> bool:
        """True when the next epoch without improvement would stop training."""
        return self.epochs_without_improvement + 1 >= self.patience

    def state_dict(self) -> Dict[str, Any]:
        """Best fitness, its epoch, the last epoch seen and the patience, as plain types."""
        return {
            "patience": self.patience,
            "best_fitness": self.best_fitness,
            "best_epoch": self.best_epoch,
            "last_epoch": self.last_epoch,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore ``state_dict()``; the patience itself comes from the resumed run's arguments, not the file."""
        self.best_fitness = state.get("best_fitness")
        self.best_epoch = int(state.get("best_epoch", 0))
        self.last_epoch = int(state.get("last_epoch", self.best_epoch))
