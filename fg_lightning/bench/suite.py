"""``fg-bench all``: ``speed`` and ``memory`` for both networks, every registered estimator and the stock baselines, and
``depth`` (memory and time against depth, the stock baselines and the depth cases), in one run under a time limit, written to ``results/<card>/`` with a README naming the command, the device, torch and
the wall time."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import torch

from fg_lightning.bench import depth, memory, speed
from fg_lightning.bench.budget import Budget, slug
from fg_lightning.bench.common import environment
from fg_lightning.estimators import REGISTRY

# gpu: 80 speed and 68 memory cases, estimated at 3-5 minutes on one H100 (not yet measured: the README of a run
# records its wall time). torch.compile compiles once per shape, so its baseline runs at one batch size only.
# depth's plain CNN (32 channels, batch 256): by its FLOPs well under a minute of steps on a GPU plus one compile per
# depth (not yet measured; its cases come after the MLP's, so the time limit skips them first). Not in the cpu
# preset: its 30 cases at batch 32 took 914 s on the 2 shared CPU cores (load 4-7), over a third of that preset's
# time limit on their own (`fg-bench depth --models cnn` runs them).
PRESETS: dict[str, dict[str, Any]] = {
    "gpu": dict(batch_sizes=[256, 4096, 16384], speed_directions=[1, 4, 16], memory_directions=[1, 16], warmup=3,
                repeats=10, compile_at=[4096], time_limit=600.0, isolate=True,
                depth=dict(depths=[2, 4, 8, 16, 32, 64], width=1024, batch_size=4096, k=4, models=["mlp", "cnn"],
                           channels=32, cnn_batch_size=256)),
    "cpu": dict(batch_sizes=[64, 256], speed_directions=[1, 4, 16], memory_directions=[1, 16], warmup=2,
                repeats=5, compile_at=[256], time_limit=2400.0, isolate=True,
                depth=dict(depths=[2, 8, 32], width=1024, batch_size=1024, k=4, models=["mlp"], channels=32,
                           cnn_batch_size=32)),
    # for tests: seconds on the CPU; memory measured in this process, not a fresh one per case. The time limit is far
    # beyond it: on 2 cores shared with two other test runs (load 7) its speed and memory cases alone took 300 s.
    "tiny": dict(batch_sizes=[4], speed_directions=[1, 2], memory_directions=[1, 2], warmup=1, repeats=2,
                 compile_at=[], time_limit=1800.0, isolate=False,
                 depth=dict(depths=[1, 2], width=8, batch_size=4, k=2, models=["mlp", "cnn"], channels=2,
                            cnn_batch_size=2)),
}


def run(args: Any) -> None:

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
    shape = SimpleNamespace(**preset["depth"], warmup=1, repeats=min(preset["repeats"], 3))
    depths = depth.measure(device, shape.depths, shape.width, shape.batch_size, depth.ESTIMATORS, shape.k,
                           shape.warmup, shape.repeats, compile=bool(compile_at), budget=budget,
                           isolate=preset["isolate"], models=shape.models, channels=shape.channels,
                           cnn_batch_size=shape.cnn_batch_size)
    depth.report(depths, out, device, shape, preset["isolate"])
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
        f"- depth: L in {shape.depths}, k {shape.k}; MLP of width {shape.width} at batch {shape.batch_size}"
        + (f", CNN of {shape.channels} channels at batch {shape.cnn_batch_size}" if "cnn" in shape.models else ""),
        f"- speed: {counts(timings)}; memory: {counts(peaks)}; depth: {counts(depths)} (failed and skipped cases: the "
        "`error` column)",
        "",
        "Files: `speed.*`, `memory.*`, `depth.*` (JSON, Markdown, and with matplotlib a PNG plot).",
    ]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"fg-bench all: done in {wall:.0f} s; the results are in {out}/ (README.md, speed.*, memory.*, depth.*)")
