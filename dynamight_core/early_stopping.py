"""When to stop training: the held-out loss has stopped improving, and not before learning had
time to begin.

The signal is the residual power of the validation particles (which train nothing; their codes
are inferred with the model fixed) after each joint epoch, summed over both halves, so both
halves stop at the same epoch. An epoch counts as an improvement when it beats the best value so
far by more than ``min_fraction`` of the total improvement since the first joint epoch (a
scale-free tolerance: the residual of noisy images is mostly noise, so a tolerance relative to
the loss itself would be meaningless). Training stops after ``patience`` epochs in a row without
improvement, but never before ``min_epochs`` joint epochs: at a realistic SNR the first epochs
change the held-out residual by less than its noise while the deformation model is still
forming, and a stopping rule that sees a plateau there ends the run before anything is learnt.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class EarlyStopping:
    patience: int  # epochs without improvement before stopping; 0 = never stop early
    min_fraction: float = 0.01
    min_epochs: int = 0  # joint epochs before stopping is considered at all
    first: float = math.nan
    best: float = math.nan
    best_epoch: int = 0
    stale_epochs: int = 0
    n_epochs: int = 0  # joint epochs seen

    def update(self, epoch: int, value: float) -> bool:
        """Record the held-out loss after ``epoch``; True when training should stop."""
        if not math.isfinite(value):
            return False
        self.n_epochs += 1
        if not math.isfinite(self.first):
            self.first = self.best = value
            self.best_epoch = epoch
            return False
        tolerance = self.min_fraction * max(self.first - self.best, 0.0)
        if value < self.best - tolerance:
            self.best, self.best_epoch, self.stale_epochs = value, epoch, 0
        else:
            self.stale_epochs += 1
        return (self.patience > 0 and self.stale_epochs >= self.patience
                and self.n_epochs >= self.min_epochs)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, type(getattr(self, key))(value))


__all__ = ["EarlyStopping"]
