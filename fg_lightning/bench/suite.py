"""``fg-bench all``: ``speed`` and ``memory`` for both networks, every registered estimator and the stock baselines in
one run under a time limit, written to ``results/<card>/`` with a README naming the command, the device, torch and
the wall time.

Also :class:`Budget`, the per-case bookkeeping that ``speed`` and ``memory`` share: a progress line, the time limit,
a memory check before a case and clean-up after a failed one.
"""

from __future__ import annotations

import gc
import os
import re
import time
from typing import Any, Callable

import torch

from fg_lightning.bench.common import environment
from fg_lightning.engine import Network
from fg_lightning.estimators import REGISTRY

# gpu: 80 speed and 68 memory cases, estimated at 3-5 minutes on one H100 (not yet measured: the README of a run
# records its wall time). torch.compile compiles once per shape, so its baseline runs at one batch size only.
PRESETS: dict[str, dict[str, Any]] = {
    "gpu": dict(batch_sizes=[256, 4096, 16384], speed_directions=[1, 4, 16], memory_directions=[1, 16], warmup=3,
                repeats=10, compile_at=[4096], time_limit=480.0, isolate=True),
    "cpu": dict(batch_sizes=[64, 256], speed_directions=[1, 4, 16], memory_directions=[1, 16], warmup=2,
                repeats=5, compile_at=[256], time_limit=1800.0, isolate=True),
    # for tests: seconds on the CPU; memory measured in this process, not a fresh one per case
    "tiny": dict(batch_sizes=[4], speed_directions=[1, 2], memory_directions=[1, 2], warmup=1, repeats=2,
                 compile_at=[], time_limit=300.0, isolate=False),
}


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


class Budget:
    """Runs the cases of ``fg-bench speed`` and ``memory`` one at a time: prints a progress line with the time left,
    records a case as skipped once ``time_limit`` seconds have passed or when it would not fit in memory, records a
    failing case (CUDA out of memory, torch.compile without a compiler) instead of stopping, and frees the GPU's
    cached memory after each case."""

    def __init__(self, time_limit: float | None = None) -> None:
        self.time_limit = time_limit
        self.start = time.perf_counter()
        self.phase("", 0)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def phase(self, name: str, total: int) -> None:
        """The next ``total`` cases belong to ``name`` (``speed``, ``memory``)."""
        self.name, self.total, self.done, self.phase_start = name, total, 0, time.perf_counter()

    def run(self, label: str, case: Callable[[], Any], device: torch.device, need_bytes: int = 0) -> tuple[Any, str | None]:
        """``(case(), None)``, or ``(None, why)`` when the case was skipped or failed."""
        self.done += 1
        elapsed = self.elapsed()
        if self.time_limit is not None and elapsed >= self.time_limit:
            return None, self._skip(label, f"time limit of {self.time_limit:g} s reached")
        free = free_bytes(device)
        if free is not None and need_bytes > free:
            return None, self._skip(label, f"would need at least {need_bytes / 1e9:.1f} GB, {free / 1e9:.1f} GB free")
        spent = time.perf_counter() - self.phase_start
        left = f", ~{spent / (self.done - 1) * (self.total - self.done + 1):.0f} s left in {self.name}" if self.done > 1 else ""
        print(f"fg-bench {self.name} [{self.done}/{self.total}, {elapsed:.0f} s{left}] {label}", flush=True)
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


def case_label(model: str, batch_size: int, name: str, k: int | None) -> str:
    return f"{model} batch {batch_size} {name}" + ("" if k is None else f" k={k}")


def run(args: Any) -> None:
    from fg_lightning.bench import memory, speed

    device = torch.device(args.device)
    args.preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    preset = PRESETS[args.preset]
    env = environment(device)
    out = args.out or os.path.join("results", slug(env["device_name"]) if device.type == "cuda" else "cpu")
    time_limit = preset["time_limit"] if args.time_limit is None else args.time_limit
    compile_at = preset["compile_at"] if args.compile else []
    models, estimators = ["mlp", "cnn"], list(REGISTRY)
    print(f"fg-bench all: preset {args.preset} on {env['device_name']}, time limit {time_limit:g} s, writing to {out}/")
    budget = Budget(time_limit)
    timings = speed.measure(device, models, preset["batch_sizes"], estimators, preset["speed_directions"],
                            preset["warmup"], preset["repeats"], compile_at, budget)
    speed.report(timings, out, device, preset["warmup"], preset["repeats"])
    peaks = memory.measure(device, models, preset["batch_sizes"], estimators, preset["memory_directions"],
                           compile_at, budget, preset["isolate"])
    memory.report(peaks, out, device, preset["isolate"])
    wall = budget.elapsed()

    def counts(records: list[dict[str, Any]]) -> str:
        skipped = sum(str(r.get("error", "")).startswith("skipped") for r in records)
        failed = sum("error" in r for r in records) - skipped
        return f"{len(records) - failed - skipped} measured, {failed} failed, {skipped} skipped"

    lines = [
        f"# fg-bench all: {env['device_name']}",
        "",
        f"- command: `{getattr(args, 'command_line', 'fg-bench all')}`",
        f"- device: {env['device_name']} ({device}), torch {env['torch']}, fg_lightning {env['fg_lightning']}, "
        f"{env['threads']} CPU threads",
        f"- preset {args.preset}: batch sizes {preset['batch_sizes']}; speed: k {preset['speed_directions']}, warmup "
        f"{preset['warmup']}, repeats {preset['repeats']}; memory: k {preset['memory_directions']}; torch.compile'd "
        f"baseline at batch {compile_at or 'none'}",
        f"- wall time: {wall:.0f} s from the first case to the last report (time limit {time_limit:g} s)",
        f"- speed: {counts(timings)}; memory: {counts(peaks)} (failed and skipped cases: the `error` column)",
        "",
        "Files: `speed.json`, `speed.md`, `memory.json`, `memory.md`, and with matplotlib `speed.png`, `memory.png`.",
    ]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"fg-bench all: done in {wall:.0f} s; the results are in {out}/ (README.md, speed.*, memory.*)")
