"""``fg-bench quality``: cosine to the exact gradient and the error of each estimator, on real data (Fig. 7)."""

from __future__ import annotations

import statistics
from typing import Any

import torch

from fg_lightning.bench.budget import Progress, case_label
from fg_lightning.bench.common import (
    build_network, cases, environment, pyplot, real_batches, train, write_report,
)
from fg_lightning.estimators import REGISTRY, Backprop, cosine

COLUMNS = ["model", "batch_size", "estimator", "k", "param", "cosine_mean", "cosine_std", "gain", "error_rms",
           "exact_rms", "draws"]


def run(args: Any) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    records: list[dict[str, Any]] = []
    errors: dict[tuple[str, str, int | None], dict[str, torch.Tensor]] = {}
    progress = Progress("quality", len(args.models) * len(args.batch_sizes) * len(cases(args.estimators, args.directions)))
    for model in args.models:
        for batch_size in args.batch_sizes:
            loader, _ = real_batches(args, batch_size)
            x, labels = (t.to(device) for t in next(iter(loader)))
            prepared: dict[bool, Any] = {}  # networks by needs_local_losses

            def network_for(name: str) -> Any:
                local = REGISTRY[name].needs_local_losses
                if local not in prepared:
                    network = build_network(model, name).to(device)
                    if args.pretrain_steps:  # the paper's plots come from networks in training, not only at init
                        train(network, Backprop(), args.pretrain_lr, loader, args.pretrain_steps, device)
                    prepared[local] = network
                return prepared[local]

            for name, k in cases(args.estimators, args.directions):
                progress.case(case_label(model, batch_size, name, k))
                network = network_for(name)
                estimator = REGISTRY[name].make(k)
                exact = estimator.exact_gradient(network, x, labels)  # LocalBackprop's gradient for the local ones
                draws = 1 if name == "backprop" else args.draws
                cosines: dict[str, list[float]] = {"all": []} | {p: [] for p in exact}
                projections = dict.fromkeys(cosines, 0.0)  # Σ over draws of ĝ·g
                sq_error = {p: torch.zeros_like(g) for p, g in exact.items()}
                for draw in range(draws):
                    grads = estimator.estimate(network, x, labels, draw).grads
                    cosines["all"].append(cosine(grads, exact))
                    for param, grad in exact.items():
                        cosines[param].append(cosine({param: grads[param]}, {param: grad}))
                        projection = float((grads[param] * grad).sum())
                        projections[param] += projection
                        projections["all"] += projection
                        sq_error[param] += (grads[param] - grad).square()
                    if draw == 0:
                        errors[(model, name, k)] = {p: (grads[p] - g).flatten().cpu() for p, g in exact.items()}
                for param, values in cosines.items():
                    exact_sq = (sum(float(g.square().sum()) for g in exact.values()) if param == "all"
                                else float(exact[param].square().sum()))
                    if param == "all":
                        error_rms = sum(float(e.sum()) for e in sq_error.values()) / sum(g.numel() for g in exact.values())
                        exact_rms = sum(float(g.square().sum()) for g in exact.values()) / sum(g.numel() for g in exact.values())
                    else:
                        error_rms = float(sq_error[param].mean())
                        exact_rms = float(exact[param].square().mean())
                    records.append({
                        "model": model, "batch_size": batch_size, "estimator": name, "k": k, "param": param,
                        "cosine_mean": statistics.fmean(values),
                        "cosine_std": statistics.pstdev(values) if len(values) > 1 else 0.0,
                        "gain": projections[param] / draws / exact_sq if exact_sq > 0 else None,
                        "error_rms": (error_rms / draws) ** 0.5, "exact_rms": exact_rms**0.5, "draws": draws,
                    })
    meta = {**environment(device), "dataset": args.dataset, "pretrain_steps": args.pretrain_steps}
    table = write_report(args.out, "quality", records, COLUMNS, meta,
                         "Cosine between the estimate and the exact gradient at the same parameters, over `draws` "
                         "draws on one batch; `gain` is the mean of ĝ·g / |g|² (1 for an unbiased estimator, up to "
                         "noise: the step it takes along g, per unit of learning rate); `error_rms` is the root mean "
                         "square of estimate − exact. Per-parameter "
                         "rows are in quality.json.\n", table_records=[r for r in records if r["param"] == "all"])
    print(table)
    plot(errors, args.out)
    return records


def plot(errors: dict[tuple[str, str, int | None], dict[str, torch.Tensor]], out: str) -> None:
    """Fig. 7: the distribution of estimate − exact for two consecutive weight tensors, one column per estimator."""
    plt = pyplot()
    if plt is None:
        return
    for model in sorted({m for m, _, _ in errors}):
        cases = [(name, k) for m, name, k in errors if m == model and name != "backprop"]
        weights = [p for p in errors[(model, *cases[0])] if p.endswith("weight")][:2] if cases else []
        if not weights:
            continue
        fig, axes = plt.subplots(len(weights), len(cases), figsize=(2.6 * len(cases), 2.2 * len(weights)), squeeze=False)
        for col, (name, k) in enumerate(cases):
            for row, param in enumerate(weights):
                error = errors[(model, name, k)][param]
                limit = float(error.abs().quantile(0.999)) if error.numel() < 2**24 else float(error.abs().max())
                axes[row][col].hist(error.clamp(-limit, limit).numpy(), bins=80)
                axes[row][col].set_title(f"{name}{'' if k is None else f' k={k}'}\n{param}", fontsize=7)
                axes[row][col].tick_params(labelsize=6)
        fig.tight_layout()
        fig.savefig(f"{out}/quality_{model}.png", dpi=110)
        plt.close(fig)
