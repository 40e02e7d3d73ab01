"""The per-case bookkeeping of the fg-bench commands: the progress line every long command prints before each case
(:class:`Progress`: case i/N, elapsed, time left), and for ``speed``, ``memory``, ``depth`` and ``all`` the time
limit, the memory check before a case, and a failing case recorded instead of ending the run (:class:`Budget`)."""

from __future__ import annotations

import gc
import re
import time
from typing import Any, Callable

import torch

from fg_lightning.engine import Network


def slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def free_bytes(device: torch.device) -> int | None:
    """Memory a case could still allocate: free GPU memory, or the host's MemAvailable; None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def tangent_bytes(network: Network, batch_size: int, k: int) -> int:
    """What a forward-mode step with ``k`` directions holds at least: the primal and the tangents of the widest
    activation (float32) that one pass carries. The engine carries at most ``network.directions_per_pass`` of the
    ``k`` directions at a time; the stock baselines carry one."""
    x = torch.empty(batch_size, *network.input_shape, device="meta")
    carried = network.directions_per_pass(x, k)
    return 4 * (carried + 1) * batch_size * network.widest_activation(network.input_shape)


class Progress:
    """The progress line of every long fg-bench command, printed before each case:
    ``fg-bench depth [3/20, 41 s, ~232 s left in depth] mlp 1024x8 batch 4096 naive`` (the case's number of the
    command's ``total``, seconds since the start, and the time left at the mean pace of the cases so far)."""

    def __init__(self, name: str = "", total: int = 0) -> None:
        self.start = time.perf_counter()
        self.phase(name, total)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def phase(self, name: str, total: int) -> None:
        """The next ``total`` cases belong to ``name`` (``speed``, ``accuracy``, …)."""
        self.name, self.total, self.done, self.phase_start = name, total, 0, time.perf_counter()

    def more(self, cases: int) -> None:
        """``cases`` more than announced (``accuracy``'s grid growing past its edge)."""
        self.total += cases

    def case(self, label: str) -> None:
        """Counts the next case and prints its progress line."""
        self.done += 1
        self.announce(label)

    def announce(self, label: str) -> None:
        """The progress line of the case just counted (``done``)."""
        spent = time.perf_counter() - self.phase_start
        left = f", ~{spent / (self.done - 1) * (self.total - self.done + 1):.0f} s left in {self.name}" if self.done > 1 else ""
        print(f"fg-bench {self.name} [{self.done}/{self.total}, {self.elapsed():.0f} s{left}] {label}", flush=True)


class Budget(Progress):
    """Runs the cases of ``fg-bench speed``, ``memory`` and ``depth`` one at a time: prints a progress line with the
    time left, records a case as skipped once ``time_limit`` seconds have passed or when it would not fit in memory,
    records a failing case (CUDA out of memory, torch.compile without a compiler) instead of stopping, and frees the
    GPU's cached memory after each case."""

    def __init__(self, time_limit: float | None = None) -> None:
        self.time_limit = time_limit
        super().__init__()

    def run(self, label: str, case: Callable[[], Any], device: torch.device, need_bytes: int = 0) -> tuple[Any, str | None]:
        """``(case(), None)``, or ``(None, why)`` when the case was skipped or failed."""
        self.done += 1
        elapsed = self.elapsed()
        if self.time_limit is not None and elapsed >= self.time_limit:
            return None, self._skip(label, f"time limit of {self.time_limit:g} s reached")
        free = free_bytes(device)
        if free is not None and need_bytes > free:
            return None, self._skip(label, f"would need at least {need_bytes / 1e9:.1f} GB, {free / 1e9:.1f} GB free")
        self.announce(label)
        result = error = None
        try:
            result = case()
        except Exception as err:  # one failing case is a row of the report, not the end of the run
            error = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
            print(f"fg-bench {self.name}: {label}: {error}", flush=True)
        # Out here the traceback no longer holds the failed case's tensors, so they can be freed.
        if error is not None or device.type == "cuda":
            gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return result, error

    def _skip(self, label: str, why: str) -> str:
        print(f"fg-bench {self.name}: {label}: skipped: {why}", flush=True)
        return f"skipped: {why}"


def with_k(name: str, k: int | None) -> str:
    """``"multi_direction k=4"``, or the name alone for an estimator without k."""
    return name if k is None else f"{name} k={k}"


def case_label(model: str, batch_size: int, name: str, k: int | None) -> str:
    return f"{model} batch {batch_size} {with_k(name, k)}"
