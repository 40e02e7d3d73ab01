"""``fg-bench speed``: median milliseconds per training step, every estimator against stock PyTorch (Table I, Fig. 13)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from fg_lightning.bench.common import (
    STOCK, build_network, cases, compiled_cases, environment, estimator_step, make_batch, pyplot, summary, tangent_flops,
    time_steps, write_report,
)
from fg_lightning.bench.budget import Budget, case_label, tangent_bytes
from fg_lightning.estimators import REGISTRY

COLUMNS = ["model", "batch_size", "estimator", "k", "ms_median", "ms_min", "ms_max", "ratio_vs_autograd",
           "ratio_vs_k1", "flop_bound_vs_k1", "error"]


def measure(device: str | torch.device, models: Sequence[str], batch_sizes: Sequence[int], estimators: Sequence[str],
            directions: Sequence[int], warmup: int, repeats: int, compile_at: Sequence[int] = (),
            budget: Budget | None = None, torch_backend: bool = True, interleave: bool = False) -> list[dict[str, Any]]:
    """One row per model, batch size and case: the stock baselines, then every estimator, once per ``k`` in
    ``directions`` for those that take one; at the batch sizes in ``compile_at`` also ``stock_compiled`` and the
    engine's compiled step (``compiled:<name>``) for the estimators of ``COMPILED_ESTIMATORS``. ``interleave``: the
    cases of a model and batch size take their steps in turn, one step each a round, so that a shared machine's
    changing load falls on every case alike (all of their networks alive at once)."""
    device = torch.device(device)
    budget = budget or Budget()
    stock = {b: [s for s in STOCK if s != "stock_compiled" or b in compile_at] for b in batch_sizes}
    engine = {b: cases(estimators, directions, torch_backend) + (compiled_cases(estimators, directions)
                                                                  if b in compile_at else []) for b in batch_sizes}
    budget.phase("speed", len(models) * sum(len(stock[b]) + len(engine[b]) for b in batch_sizes))
    records = []
    for model_name in models:
        for batch_size in batch_sizes:
            base = build_network(model_name).to(device)
            x, labels = make_batch(base, batch_size, device)
            primal_flops, tangent_flops_per_dir = tangent_flops(base, batch_size)
            rows: list[dict[str, Any]] = []
            timed_cases: dict[tuple[str, int | None], Any] = {}
            for name, k in [(s, None) for s in stock[batch_size]] + engine[batch_size]:
                def case() -> Any:
                    network = build_network(model_name, name).to(device)  # the same weights as base
                    step = estimator_step(network, name, k)
                    return step if interleave else time_steps(step, x, labels, warmup, repeats, device)

                timed, error = budget.run(case_label(model_name, batch_size, name, k), case, device,
                                          tangent_bytes(base, batch_size, k or 1))
                if error is not None:
                    rows.append({"estimator": name, "k": k, "error": error})
                else:
                    timed_cases[name, k] = timed
            if interleave:
                timed_cases = dict(zip(timed_cases, time_in_turn(list(timed_cases.values()), x, labels, warmup,
                                                                 repeats, device)))
            for (name, k), timed in timed_cases.items():
                exact = [ms for ms, is_exact in timed if is_exact]
                if exact and len(exact) < len(timed):  # Table I: momentum's checkpoint steps (backprop too) apart
                    rows.append({"estimator": name, "k": k, **summary([ms for ms, is_exact in timed if not is_exact])})
                    rows.append({"estimator": f"{name}_checkpoint", "k": k, **summary(exact)})
                    continue
                row = {"estimator": name, "k": k, **summary([ms for ms, _ in timed])}
                if name == "multi_direction":
                    row["flop_bound_vs_k1"] = (primal_flops + k * tangent_flops_per_dir) / (primal_flops + tangent_flops_per_dir)
                rows.append(row)
            autograd = next((r["ms_median"] for r in rows if r["estimator"] == "stock_autograd" and "error" not in r), None)
            k1 = {r["estimator"]: r["ms_median"] for r in rows if r.get("k") == 1 and "error" not in r}
            for row in rows:
                row.update(model=model_name, batch_size=batch_size)
                if "error" in row:
                    continue
                row["ratio_vs_autograd"] = row["ms_median"] / autograd if autograd else None
                if row["estimator"] in k1:
                    row["ratio_vs_k1"] = row["ms_median"] / k1[row["estimator"]]
                records.append(row)
            records.extend(r for r in rows if "error" in r)
    return records


def plot(records: list[dict[str, Any]], out: str) -> None:
    """Fig. 13: step time against the number of directions / partitions."""
    plt = pyplot() if records else None
    if plt is None:
        return
    groups = sorted({(r["model"], r["batch_size"]) for r in records})
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.6), squeeze=False)
    for ax, (model, batch) in zip(axes[0], groups):
        for name in (name for name, spec in REGISTRY.items() if spec.takes_k):
            points = sorted((r["k"], r["ms_median"]) for r in records
                            if r["model"] == model and r["batch_size"] == batch and r["estimator"] == name and "error" not in r)
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        for name in ("stock_autograd", "backprop", "naive"):
            ms = [r["ms_median"] for r in records if r["model"] == model and r["batch_size"] == batch
                  and r["estimator"] == name and "error" not in r]
            if ms:
                ax.axhline(ms[0], linestyle="--", linewidth=1, label=name, color={"stock_autograd": "k"}.get(name))
        ax.set(title=f"{model}, batch {batch}", xlabel="directions / partitions k", ylabel="ms per step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{out}/speed.png", dpi=120)
    plt.close(fig)


def report(records: list[dict[str, Any]], out: str, device: str | torch.device, warmup: int, repeats: int,
           interleave: bool = False) -> None:
    """``<out>/speed.json``, ``.md`` and ``.png``; prints the table."""
    meta = {**environment(torch.device(device)), "warmup": warmup, "repeats": repeats, "interleave": interleave}
    notes = ("Median of `repeats` synchronised training steps after `warmup` steps (`interleave`: the cases of a "
             "model and batch size one step each in turn): for the engine's estimators the "
             "step ForwardGradientModule takes (estimate, finite check, SGD update), for the stock baselines loss, "
             "backward and SGD update (no finite check); `compiled:<name>` is the engine's step with its estimate "
             "under torch.compile (`ForwardGradientModule(compile=True)`, CUDA graphs on a GPU; the warm-up steps "
             "compile it); `ratio_vs_autograd` divides by stock autograd backprop "
             "measured in the same run. `flop_bound_vs_k1` is (primal + k·tangent FLOPs) / (primal + tangent FLOPs) "
             "for one pass; under `tangent_memory_mb` many directions take several primal passes.\n")
    print(write_report(out, "speed", records, COLUMNS, meta, notes))
    plot([r for r in records if "error" not in r], out)


def time_in_turn(steps: Sequence[Any], x: torch.Tensor, labels: torch.Tensor, warmup: int, repeats: int,
                 device: torch.device) -> list[list[tuple[float, bool]]]:
    """:func:`~fg_lightning.bench.common.time_steps` of every step in ``steps``, one step of each in turn."""
    times: list[list[tuple[float, bool]]] = [[] for _ in steps]
    for index in range(warmup + repeats):
        for step, timed in zip(steps, times):
            if index < warmup:
                step(x, labels, index)
            else:
                timed += time_steps(step, x, labels, 0, 1, device, first_index=index)
    return times


def run(args: Any) -> list[dict[str, Any]]:
    records = measure(args.device, args.models, args.batch_sizes, args.estimators, args.directions, args.warmup,
                      args.repeats, args.batch_sizes if args.compile else [], torch_backend=args.torch_backend,
                      interleave=args.interleave)
    report(records, args.out, args.device, args.warmup, args.repeats, args.interleave)
    return records
