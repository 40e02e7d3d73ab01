"""``fg-bench depth``: peak memory and time of one training step against depth, on an MLP of ``--width`` units with
L hidden layers, for the stock baselines (eager, compiled and checkpointed backprop, ``torch.func.jvp``) and the
engine's estimators. The question: does forward mode's memory stay flat in depth, as it should without stored
activations, where backprop's grows with every layer it must keep for its backward pass?

Each row also gives the parameters' own size (``params_mb``), which every method holds at rest, and which a
forward-mode step's parameter-sized buffers (its tangents, its estimate) add to its peak once more.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from fg_lightning.bench.budget import Budget
from fg_lightning.bench.common import (
    STOCK, build_network, environment, estimator_step, make_batch, pyplot, summary, time_steps, write_report,
)
from fg_lightning.bench.memory import measure_case, method
from fg_lightning.estimators import REGISTRY

COLUMNS = ["depth", "estimator", "k", "params_mb", "peak_mb", "ratio_vs_backprop", "ratio_vs_checkpointed",
           "growth_vs_shallowest", "ms_median", "error"]
ESTIMATORS = ["backprop", "naive", "naive_replayed", "multi_direction", "activity", "local_activity"]
MIB = 2**20


def measure(device: str | torch.device, depths: Sequence[int], width: int, batch_size: int, estimators: Sequence[str],
            k: int, warmup: int, repeats: int, compile: bool = True, budget: Budget | None = None,
            isolate: bool = True) -> list[dict[str, Any]]:
    """One row per depth and case: the peak memory of one step above rest and the median step time."""
    device = torch.device(device)
    budget = budget or Budget()
    names = [s for s in STOCK if compile or s != "stock_compiled"] + list(estimators)
    budget.phase("depth", len(depths) * len(names))
    records: list[dict[str, Any]] = []
    for depth in depths:
        hidden = (width,) * depth
        params_mb = sum(p.numel() * p.element_size() for p in build_network("mlp", hidden=hidden).parameters()) / MIB
        for name in names:
            case_k = k if name in REGISTRY and REGISTRY[name].takes_k else None

            def case() -> dict[str, Any]:
                peak = measure_case(device, isolate, "mlp", batch_size, name, case_k, hidden=hidden)
                network = build_network("mlp", name, hidden=hidden).to(device)
                x, labels = make_batch(network, batch_size, device)
                timed = time_steps(estimator_step(network, name, case_k), x, labels, warmup, repeats, device)
                return {**peak, **summary([ms for ms, _ in timed])}

            label = f"mlp {width}x{depth} batch {batch_size} {name}" + ("" if case_k is None else f" k={case_k}")
            measured, error = budget.run(label, case, device)
            row = {"depth": depth, "estimator": name, "k": case_k, "params_mb": params_mb}
            records.append({**row, "error": error} if error is not None else {**row, **measured})
    _ratios(records)
    return records


def _ratios(records: list[dict[str, Any]]) -> None:
    """Each row's peak against the engine's backprop and the checkpointed stock backprop at its depth, and against
    the same case at the shallowest depth measured."""
    peak = {(r["depth"], r["estimator"]): r["peak_mb"] for r in records if "peak_mb" in r}
    shallowest = min((r["depth"] for r in records), default=None)
    for row in records:
        if "peak_mb" not in row:
            continue
        for column, reference in (("ratio_vs_backprop", "backprop"), ("ratio_vs_checkpointed", "stock_checkpointed")):
            other = peak.get((row["depth"], reference))
            row[column] = row["peak_mb"] / other if other else None
        first = peak.get((shallowest, row["estimator"]))
        row["growth_vs_shallowest"] = row["peak_mb"] / first if first else None


def plot(records: list[dict[str, Any]], out: str) -> None:
    """Peak memory against depth, one line per case, with the parameters' own size."""
    plt = pyplot() if records else None
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name in dict.fromkeys(r["estimator"] for r in records):
        points = sorted((r["depth"], r["peak_mb"]) for r in records if r["estimator"] == name)
        ax.plot(*zip(*points), marker="o", label=name, linestyle="--" if name.startswith("stock") else "-")
    params = sorted({(r["depth"], r["params_mb"]) for r in records})
    ax.plot(*zip(*params), color="grey", linestyle=":", label="parameters")
    ax.set(xlabel="hidden layers L", ylabel="peak MiB above rest", xscale="log", yscale="log",
           title="one training step against depth")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{out}/depth.png", dpi=120)
    plt.close(fig)


def report(records: list[dict[str, Any]], out: str, device: str | torch.device, args: Any, isolate: bool = True) -> None:
    device = torch.device(device)
    meta = {**environment(device), "method": method(device, isolate), "width": args.width,
            "batch_size": args.batch_size, "warmup": args.warmup, "repeats": args.repeats}
    notes = (f"MLP 784-{args.width}x L-10, batch {args.batch_size}: peak memory of one training step above the resting "
             "state (weights and batch) and the median step time. `params_mb`: the parameters' own size; "
             "`growth_vs_shallowest`: this case's peak over its peak at the smallest depth measured.\n")
    print(write_report(out, "depth", records, COLUMNS, meta, notes))
    plot([r for r in records if "peak_mb" in r], out)


def run(args: Any) -> list[dict[str, Any]]:
    records = measure(args.device, args.depths, args.width, args.batch_size, args.estimators, args.k, args.warmup,
                      args.repeats, compile=args.compile)
    report(records, args.out, args.device, args)
    return records
