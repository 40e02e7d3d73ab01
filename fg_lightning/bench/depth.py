"""``fg-bench depth``: peak memory and time of one training step against depth, on an MLP of ``--width`` units with
L hidden layers and on a plain deep CNN of L 3×3 convolutions of ``--channels`` channels (same padding, no pooling
but a final global average pool before the linear classifier, :func:`~fg_lightning.bench.common.deep_cnn`), for the
stock baselines (eager, compiled and checkpointed backprop, ``torch.func.jvp``) and the engine's estimators. The
question: does forward mode's memory stay flat in depth, as it should without stored activations, where backprop's
grows with every layer it must keep for its backward pass?

Each row also gives the parameters' own size (``params_mb``), which every method holds at rest, and which a
forward-mode step's parameter-sized buffers (its tangents, its estimate) add to its peak once more. The CNN's
layers keep 28×28 feature maps of ``--channels`` channels each (25 088 activations per sample at 32 channels, 24×
the MLP's 1024), so it runs at its own batch size, ``--cnn-batch-size``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from fg_lightning.bench.budget import Budget, case_label
from fg_lightning.bench.common import (
    STOCK, build_network, environment, estimator_step, make_batch, panels_per_model, summary, time_steps, write_report,
)
from fg_lightning.bench.memory import measure_case, method
from fg_lightning.estimators import REGISTRY

COLUMNS = ["model", "depth", "batch_size", "estimator", "k", "params_mb", "peak_mb", "ratio_vs_backprop",
           "ratio_vs_checkpointed", "growth_vs_shallowest", "ms_median", "error"]
ESTIMATORS = ["backprop", "naive", "naive_replayed", "multi_direction", "activity", "activity_recomputed",
              "local_activity"]
MODELS = ["mlp", "cnn", "mixer"]
MIB = 2**20


def network_of(model: str, depth: int, width: int, channels: int) -> tuple[str, dict[str, Any], str]:
    """``(build_network's model name, its arguments, a label)`` of ``model`` (``mlp``, ``cnn``, ``mixer``) at
    ``depth``."""
    if model == "mlp":
        return "mlp", {"hidden": (width,) * depth}, f"mlp {width}x{depth}"
    if model == "cnn":
        return "deep_cnn", {"depth": depth, "channels": channels}, f"cnn {channels}ch x{depth}"
    if model == "mixer":  # depth in blocks of Ren et al.'s LocalMixer, its default width (128 channels, 49 tokens)
        return "mixer", {"blocks": depth}, f"mixer x{depth}"
    raise ValueError(f"fg-bench depth: unknown model {model!r}; expected one of {MODELS}")


def measure(device: str | torch.device, depths: Sequence[int], width: int, batch_size: int, estimators: Sequence[str],
            k: int, warmup: int, repeats: int, compile: bool = True, budget: Budget | None = None,
            isolate: bool = True, models: Sequence[str] = ("mlp",), channels: int = 32,
            cnn_batch_size: int | None = None) -> list[dict[str, Any]]:
    """One row per model, depth and case: the peak memory of one step above rest and the median step time. The MLP
    runs at ``batch_size``, the CNN at ``cnn_batch_size`` (default ``batch_size``)."""
    device = torch.device(device)
    budget = budget or Budget()
    names = [s for s in STOCK if compile or s != "stock_compiled"] + list(estimators)
    budget.phase("depth", len(models) * len(depths) * len(names))
    records: list[dict[str, Any]] = []
    for model in models:
        batch = batch_size if model == "mlp" or cnn_batch_size is None else cnn_batch_size
        for depth in depths:
            network_name, shape, label = network_of(model, depth, width, channels)
            params_mb = sum(p.numel() * p.element_size() for p in build_network(network_name, **shape).parameters()) / MIB
            for name in names:
                case_k = k if name in REGISTRY and REGISTRY[name].takes_k else None

                def case() -> dict[str, Any]:
                    peak = measure_case(device, isolate, network_name, batch, name, case_k, **shape)
                    network = build_network(network_name, name, **shape).to(device)
                    x, labels = make_batch(network, batch, device)
                    timed = time_steps(estimator_step(network, name, case_k), x, labels, warmup, repeats, device)
                    return {**peak, **summary([ms for ms, _ in timed])}

                measured, error = budget.run(case_label(label, batch, name, case_k), case, device)
                row = {"model": model, "depth": depth, "batch_size": batch, "estimator": name, "k": case_k,
                       "params_mb": params_mb}
                records.append({**row, "error": error} if error is not None else {**row, **measured})
    _ratios(records)
    return records


def _ratios(records: list[dict[str, Any]]) -> None:
    """Each row's peak against the engine's backprop and the checkpointed stock backprop of its model at its depth,
    and against the same case at its model's shallowest depth measured."""
    peak = {(r["model"], r["depth"], r["estimator"]): r["peak_mb"] for r in records if "peak_mb" in r}
    shallowest: dict[str, int] = {}
    for row in records:
        model = row["model"]
        shallowest[model] = min(shallowest.get(model, row["depth"]), row["depth"])
    for row in records:
        if "peak_mb" not in row:
            continue
        model = row["model"]
        for column, reference in (("ratio_vs_backprop", "backprop"), ("ratio_vs_checkpointed", "stock_checkpointed")):
            other = peak.get((model, row["depth"], reference))
            row[column] = row["peak_mb"] / other if other else None
        first = peak.get((model, shallowest[model], row["estimator"]))
        row["growth_vs_shallowest"] = row["peak_mb"] / first if first else None


def plot(records: list[dict[str, Any]], out: str) -> None:
    """Peak memory against depth, one panel per model, one line per case, with the parameters' own size."""
    panels = panels_per_model(records, height=4.2) if records else None
    if panels is None:
        return
    plt, fig, pairs = panels
    for ax, model in pairs:
        rows = [r for r in records if r["model"] == model]
        for name in dict.fromkeys(r["estimator"] for r in rows):
            points = sorted((r["depth"], r["peak_mb"]) for r in rows if r["estimator"] == name)
            ax.plot(*zip(*points), marker="o", label=name, linestyle="--" if name.startswith("stock") else "-")
        params = sorted({(r["depth"], r["params_mb"]) for r in rows})
        ax.plot(*zip(*params), color="grey", linestyle=":", label="parameters")
        ax.set(xlabel="hidden layers L", ylabel="peak MiB above rest", xscale="log", yscale="log",
               title=f"{model} (batch {rows[0]['batch_size']}): one training step against depth")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{out}/depth.png", dpi=120)
    plt.close(fig)


def report(records: list[dict[str, Any]], out: str, device: str | torch.device, args: Any, isolate: bool = True) -> None:
    device = torch.device(device)
    models = list(dict.fromkeys(r["model"] for r in records))
    meta = {**environment(device), "method": method(device, isolate), "models": models, "width": args.width,
            "channels": args.channels, "batch_size": args.batch_size, "cnn_batch_size": args.cnn_batch_size,
            "warmup": args.warmup, "repeats": args.repeats}
    shapes = {"mlp": f"MLP 784-{args.width}x L-10 at batch {args.batch_size}",
              "cnn": f"CNN of L 3×3 convolutions of {args.channels} channels on 28×28 inputs (same padding, no pooling, "
                     "then a global average pool and a linear classifier) at batch "
                     f"{args.cnn_batch_size or args.batch_size}",
              "mixer": "Mixer of L blocks (128 channels, 7×7 tokens of 4×4 patches; heads after every block for the "
                       f"local-loss estimators) at batch {args.cnn_batch_size or args.batch_size}"}
    notes = ("; ".join(shapes[model] for model in models) + ": peak memory of one training step above the resting "
             "state (weights and batch) and the median step time. `params_mb`: the parameters' own size; "
             "`ratio_vs_backprop` / `ratio_vs_checkpointed`: against the engine's backprop / the checkpointed stock "
             "backprop of the same model and depth; `growth_vs_shallowest`: this case's peak over its peak at the "
             "model's smallest depth measured.\n")
    print(write_report(out, "depth", records, COLUMNS, meta, notes))
    plot([r for r in records if "peak_mb" in r], out)


def run(args: Any) -> list[dict[str, Any]]:
    records = measure(args.device, args.depths, args.width, args.batch_size, args.estimators, args.k, args.warmup,
                      args.repeats, compile=args.compile, models=args.models, channels=args.channels,
                      cnn_batch_size=args.cnn_batch_size)
    report(records, args.out, args.device, args)
    return records
