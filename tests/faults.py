"""A worker that fails on purpose, for the fault tests of ``test_distributed.py``: given to fg-cli as
``--trainer.callbacks+={"class_path": "faults.SignalAt", ...}`` (with ``tests/`` on ``PYTHONPATH``, so that every
process Lightning starts finds it)."""

from __future__ import annotations

import os
import signal

from lightning.pytorch import Callback


class SignalAt(Callback):
    """Rank ``rank`` sends itself ``signal_name`` (``SIGKILL``: it dies; ``SIGSTOP``: it hangs) at the start of step
    ``step`` (or of the validation after ``step`` steps, ``in_validation``), after writing its process id to ``pid_file``, so that the test can end a stopped process."""

    def __init__(self, step: int, rank: int = 1, signal_name: str = "SIGKILL", pid_file: str = "",
                 in_validation: bool = False) -> None:
        self.step, self.rank, self.signal = step, rank, getattr(signal, signal_name)
        self.pid_file, self.in_validation = pid_file, in_validation

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.in_validation:
            self._signal(trainer)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.in_validation and not trainer.sanity_checking:
            self._signal(trainer)

    def _signal(self, trainer) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            if self.pid_file:
                with open(self.pid_file, "w") as file:
                    file.write(str(os.getpid()))
            os.kill(os.getpid(), self.signal)
