"""``fg-bench stability``: short trainings of each estimator across learning rates (Fig. 5, 6, 8): final loss,
validation accuracy, whether it diverged, and the largest learning rate that did not."""

from __future__ import annotations

from typing import Any

import torch

from fg_lightning.bench.budget import Progress, with_k
from fg_lightning.bench.common import (
    build_network, environment, markdown_table, panels_per_model, real_batches, train, write_report,
)
from fg_lightning.estimators import REGISTRY

COLUMNS = ["model", "estimator", "k", "lr", "steps", "diverged", "diverged_at", "final_loss", "val_acc"]


def run(args: Any) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    records: list[dict[str, Any]] = []
    progress = Progress("stability", len(args.models) * len(args.estimators) * len(args.lrs))
    for model in args.models:
        loader, validation = real_batches(args, args.batch_sizes[0])
        for name in args.estimators:
            k = args.k if REGISTRY[name].takes_k else None
            for lr in args.lrs:
                progress.case(f"{model} {with_k(name, k)} lr={lr:g}")
                result = train(build_network(model, name).to(device), REGISTRY[name].make(k), lr, loader, args.steps,
                               device, validation)
                losses = result.pop("losses")
                tail = losses[-20:]
                records.append({"model": model, "estimator": name, "k": k, "lr": lr, **result,
                                "final_loss": sum(tail) / len(tail) if tail and not result["diverged"] else None,
                                "losses": losses})
                print(f"fg-bench stability: {model} {name} lr={lr:g}: "
                      + (f"diverged at step {result['diverged_at']}" if result["diverged"]
                         else f"loss {records[-1]['final_loss']:.4f}, val acc {result.get('val_acc', 0):.4f}"))
    largest = []
    for model in args.models:
        for name in args.estimators:
            stable = [r["lr"] for r in records if r["model"] == model and r["estimator"] == name and not r["diverged"]]
            largest.append({"model": model, "estimator": name, "largest_stable_lr": max(stable) if stable else None})
    meta = {**environment(device), "dataset": args.dataset, "batch_size": args.batch_sizes[0], "steps": args.steps}
    table = write_report(args.out, "stability", records, COLUMNS, meta,
                         f"Plain SGD for {args.steps} steps per run; `final_loss` is the mean training loss of the "
                         "last 20 steps; `diverged_at` the step of the first non-finite loss or update.\n")
    summary = markdown_table(largest, ["model", "estimator", "largest_stable_lr"])
    with open(f"{args.out}/stability.md", "a") as f:
        f.write("\nLargest learning rate that did not diverge:\n\n" + summary)
    print(table + "\n" + summary)
    plot(records, args.out)
    return records


def plot(records: list[dict[str, Any]], out: str) -> None:
    panels = panels_per_model(records)
    if panels is None:
        return
    plt, fig, pairs = panels
    for ax, model in pairs:
        for name in dict.fromkeys(r["estimator"] for r in records if r["model"] == model):
            runs = [r for r in records if r["model"] == model and r["estimator"] == name]
            lrs = [r["lr"] for r in runs if not r["diverged"]]
            accs = [r.get("val_acc") for r in runs if not r["diverged"]]
            line = ax.plot(lrs, accs, marker="o", label=name)[0]
            for r in runs:
                if r["diverged"]:
                    ax.plot([r["lr"]], [0.0], marker="x", color=line.get_color())
        ax.set(title=f"{model}: validation accuracy (x = diverged)", xlabel="learning rate", ylabel="val acc",
               xscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{out}/stability.png", dpi=120)
    plt.close(fig)
