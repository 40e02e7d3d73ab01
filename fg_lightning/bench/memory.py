"""``fg-bench memory``: peak memory of one training step above the resting state (Fig. 14).

CUDA: ``torch.cuda.max_memory_allocated`` after a reset, minus what is allocated at rest (weights, batch).
CPU (Linux): each case runs in a fresh subprocess (in this one for ``fg-bench all --preset tiny``): the peak RSS of the one measured step (``VmHWM``, reset through
``/proc/self/clear_refs`` just before it) minus the RSS at rest, with glibc's mmap threshold pinned at 64 KiB so
that freed tensors leave the RSS. On the CPU, oneDNN's convolution needs a workspace the size of its output. Before it, one step at batch 2 loads the kernels and libraries (and gives the momentum estimator its
ranking, so the measured step is a forward-mode one, not a checkpoint).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from typing import Any, Sequence

import torch

from fg_lightning.bench.common import (
    STOCK, TORCH, activation_sizes, build_network, cases, environment, estimator_step, make_batch, panels_per_model, sync,
    write_report,
)
from fg_lightning.bench.budget import Budget, case_label, tangent_bytes

COLUMNS = ["model", "batch_size", "estimator", "k", "peak_mb", "ratio_vs_autograd", "fwd_bound_mb", "ratio_vs_bound",
           "method", "error"]
MIB = 2**20
# glibc: every block of 64 KiB or more gets its own mapping, returned to the OS on free, so RSS follows the live tensors
# (by default the threshold grows to 32 MiB and freed blocks linger in the heap). Read as a process starts: the
# environment of the processes that measure.
PINNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def status_mb(field: str) -> float:
    """``/proc/self/status``'s ``field`` (``VmRSS``, ``VmHWM``) in MiB."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    return kib / 1024


def reset_peak_rss() -> float:
    """Resets this process's peak RSS (``VmHWM``) to its current RSS and returns that RSS (MiB): the peak read after
    a step is then the step's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_mb("VmRSS")


def measure_cpu_case(model: str, batch_size: int, name: str, k: int | None, **network_kwargs: Any) -> dict[str, float]:
    """Runs in a fresh process (see the module docstring); ``network_kwargs`` go to the network (e.g. ``hidden``)."""
    network = build_network(model, name, **network_kwargs)
    step = estimator_step(network, name, k)
    step(*make_batch(network, 2, torch.device("cpu")), 0)
    x, labels = make_batch(network, batch_size, torch.device("cpu"))
    gc.collect()
    resting = reset_peak_rss()  # the warm-up's peak does not count
    step(x, labels, 1)
    # The kernel's RSS counters are per-CPU and approximate (a few hundred KiB), so a step that allocates next to
    # nothing can read a little below rest: that is no memory above rest, read as 0.
    return {"peak_mb": max(status_mb("VmHWM") - resting, 0.0), "resting_mb": resting}


def _cpu_case(model: str, batch_size: int, name: str, k: int | None, threads: int,
              **network_kwargs: Any) -> dict[str, float]:
    code = ("import json, sys, torch; from fg_lightning.bench.memory import measure_cpu_case; "
            f"torch.set_num_threads({threads}); "
            f"print(json.dumps(measure_cpu_case({model!r}, {batch_size}, {name!r}, {k!r}, **{network_kwargs!r})))")
    env = {**os.environ, **PINNED_MALLOC}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cuda_case(model: str, batch_size: int, name: str, k: int | None, device: torch.device,
               **network_kwargs: Any) -> dict[str, float]:
    network = build_network(model, name, **network_kwargs).to(device)
    step = estimator_step(network, name, k)
    step(*make_batch(network, 2, device), 0)
    x, labels = make_batch(network, batch_size, device)
    gc.collect()
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    resting = torch.cuda.memory_allocated(device)
    step(x, labels, 1)
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) - resting
    return {"peak_mb": peak / MIB, "resting_mb": resting / MIB}


def measure_case(device: torch.device, isolate: bool, model: str, batch_size: int, name: str, k: int | None,
                 **network_kwargs: Any) -> dict[str, float]:
    """Peak memory of one step of case ``name`` above rest: on CUDA in this process, on the CPU in a fresh one
    (``isolate``) or in this one."""
    if device.type == "cuda":
        return _cuda_case(model, batch_size, name, k, device, **network_kwargs)
    if isolate:
        return _cpu_case(model, batch_size, name, k, torch.get_num_threads(), **network_kwargs)
    return measure_cpu_case(model, batch_size, name, k, **network_kwargs)


def forward_bound_mb(network: torch.nn.Module, batch_size: int, k: int) -> float:
    """What any forward-mode pass must hold: one layer's primal and its k tangents at the widest layer, plus the k
    parameter tangents and the estimate (float32)."""
    widest = max(max(inp, out) for _, inp, out in activation_sizes(network, batch_size))
    params = sum(p.numel() for p in network.parameters())
    return 4 * ((1 + k) * widest + (k + 1) * params) / MIB


def method(device: torch.device, isolate: bool = True) -> str:
    if device.type == "cuda":
        return "cuda: max_memory_allocated - memory_allocated at rest"
    if isolate:
        return "cpu: subprocess VmHWM - VmRSS at rest (mmap threshold 64 KiB)"
    return "cpu: VmHWM - VmRSS at rest in this process (not isolated: a smoke test)"


def measure(device: str | torch.device, models: Sequence[str], batch_sizes: Sequence[int], estimators: Sequence[str],
            directions: Sequence[int], compile_at: Sequence[int] = (), budget: Budget | None = None,
            isolate: bool = True, torch_backend: bool = True) -> list[dict[str, Any]]:
    """One row per model, batch size and case, as in :func:`fg_lightning.bench.speed.measure`. On the CPU each case
    runs in a fresh process unless ``isolate`` is False."""
    device = torch.device(device)
    budget = budget or Budget()
    how = method(device, isolate)
    stock = {b: [s for s in STOCK if s != "stock_compiled" or b in compile_at] for b in batch_sizes}
    budget.phase("memory", len(models) * sum(len(stock[b]) + len(cases(estimators, directions, torch_backend)) for b in batch_sizes))
    records: list[dict[str, Any]] = []
    for model in models:
        for batch_size in batch_sizes:
            base = build_network(model).to(device)
            rows = []
            for name, k in [(s, None) for s in stock[batch_size]] + cases(estimators, directions, torch_backend):
                def case() -> dict[str, float]:
                    return measure_case(device, isolate, model, batch_size, name, k)

                measured, error = budget.run(case_label(model, batch_size, name, k), case, device,
                                             tangent_bytes(base, batch_size, k or 1))
                if error is not None:
                    rows.append({"model": model, "batch_size": batch_size, "estimator": name, "k": k, "error": error})
                    continue
                row = {"model": model, "batch_size": batch_size, "estimator": name, "k": k, "method": how, **measured}
                if name.removeprefix(TORCH) not in ("backprop", "stock_autograd", "stock_compiled"):
                    row["fwd_bound_mb"] = forward_bound_mb(base, batch_size, k or 1)
                    row["ratio_vs_bound"] = row["peak_mb"] / row["fwd_bound_mb"]
                rows.append(row)
            autograd = next((r["peak_mb"] for r in rows if r["estimator"] == "stock_autograd" and "peak_mb" in r), None)
            for row in rows:
                if "peak_mb" in row and autograd:
                    row["ratio_vs_autograd"] = row["peak_mb"] / autograd
            records += rows
    return records


def report(records: list[dict[str, Any]], out: str, device: str | torch.device, isolate: bool = True) -> None:
    """``<out>/memory.json``, ``.md`` and ``.png``; prints the table."""
    device = torch.device(device)
    meta = {**environment(device), "method": method(device, isolate)}
    print(write_report(out, "memory", records, COLUMNS, meta,
                       "Peak memory of one training step above the resting state (weights and batch). "
                       "`fwd_bound_mb`: one layer's primal and k tangents at the widest layer plus k parameter "
                       "tangents and the estimate.\n"))
    plot([r for r in records if "peak_mb" in r], out)


def run(args: Any) -> list[dict[str, Any]]:
    records = measure(args.device, args.models, args.batch_sizes, args.estimators, args.directions,
                      args.batch_sizes if args.compile else [], torch_backend=args.torch_backend)
    report(records, args.out, args.device)
    return records


def plot(records: list[dict[str, Any]], out: str) -> None:
    """Fig. 14: peak memory against batch size."""
    panels = panels_per_model(records) if records else None
    if panels is None:
        return
    plt, fig, pairs = panels
    for ax, model in pairs:
        names = sorted({(r["estimator"], r["k"]) for r in records if r["model"] == model}, key=str)
        for name, k in names:
            points = sorted((r["batch_size"], r["peak_mb"]) for r in records
                            if r["model"] == model and r["estimator"] == name and r["k"] == k)
            ax.plot(*zip(*points), marker="o", label=name if k is None else f"{name} k={k}",
                    linestyle="--" if name.startswith("stock") else "-")
        ax.set(title=model, xlabel="batch size", ylabel="peak MiB above rest", xscale="log", yscale="log")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(f"{out}/memory.png", dpi=120)
    plt.close(fig)
