"""``fg-bench momentum``: training curves at a tiny learning rate (1e-6) for the momentum estimator over its
hyperparameters, against naive and backprop at the same rate and backprop at a large one (Fig. 9–12)."""

from __future__ import annotations

import statistics
from typing import Any

import torch

from fg_lightning.bench.budget import Progress
from fg_lightning.bench.common import build_network, environment, pyplot, real_batches, train, write_report
from fg_lightning.estimators import Backprop, MomentumForwardGradient, NaiveForwardGradient

COLUMNS = ["model", "run", "lr", "steps", "diverged", "first_loss", "final_loss", "val_acc", "cosine_checkpoint",
           "cosine_other", "gain_checkpoint", "gain_other"]


def runs(lr: float, reference_lr: float, fix_gap: int, decrease_gap: int) -> list[tuple[str, Any, float]]:
    """The paper's settings: Fig. 9 (backprop, naive), Fig. 10 (decay 0.9/0.8/0.7 at shuffle 0.5; shuffle 0.2/0.4/0.5
    at decay 0.9), Fig. 11 (decay 1, shuffle 0), and backprop at a large learning rate for reference."""
    def momentum(decay: float, shuffle: float) -> MomentumForwardGradient:
        return MomentumForwardGradient(fix_gap, decrease_gap, decay_rate=decay, shuffle_ratio=shuffle, seed=0)

    settings = [(0.9, 0.5), (0.8, 0.5), (0.7, 0.5), (0.9, 0.2), (0.9, 0.4), (1.0, 0.0)]
    return ([("backprop", Backprop(), lr), ("naive", NaiveForwardGradient(seed=0), lr)]
            + [(f"momentum decay={d} shuffle={s}", momentum(d, s), lr) for d, s in settings]
            + [(f"backprop lr={reference_lr:g}", Backprop(), reference_lr)])


def run(args: Any) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    records: list[dict[str, Any]] = []
    progress = Progress("momentum", len(args.models) * len(runs(args.lr, args.reference_lr, args.fix_gap,
                                                                args.decrease_gap)))
    for model in args.models:
        loader, validation = real_batches(args, args.batch_sizes[0])
        for name, estimator, lr in runs(args.lr, args.reference_lr, args.fix_gap, args.decrease_gap):
            progress.case(f"{model} {name}")
            result = train(build_network(model, estimator).to(device), estimator, lr, loader, args.steps, device,
                           validation, cosine_every=args.cosine_every)
            losses, measured = result["losses"], result["cosines"]
            record = {"model": model, "run": name, "lr": lr, **result, "first_loss": losses[0] if losses else None,
                      "final_loss": sum(losses[-20:]) / len(losses[-20:]) if losses else None}
            for kind, at_checkpoint in (("checkpoint", True), ("other", False)):
                chosen = [(cos, gain) for _, cos, gain, checkpoint in measured if checkpoint == at_checkpoint]
                record[f"cosine_{kind}"] = statistics.median(c for c, _ in chosen) if chosen else None
                record[f"gain_{kind}"] = statistics.median(g for _, g in chosen) if chosen else None
            records.append(record)
            print(f"fg-bench momentum: {model} {name}: loss {record['first_loss']:.4f} -> {record['final_loss']:.4g}"
                  + (" (diverged)" if result["diverged"] else ""))
    meta = {**environment(device), "dataset": args.dataset, "batch_size": args.batch_sizes[0], "steps": args.steps}
    print(write_report(args.out, "momentum", records, COLUMNS, meta,
                       f"Plain SGD for {args.steps} steps; `final_loss` is the mean of the last 20 steps. Every "
                       f"{args.cosine_every} steps the cosine to the exact gradient and the gain ĝ·g/|g|² (the step "
                       "along g per unit of learning rate) are measured; the table gives their medians over the steps "
                       "that ran a backprop checkpoint and over the others.\n"))
    plot(records, args.out)
    return records


def plot(records: list[dict[str, Any]], out: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    for model in sorted({r["model"] for r in records}):
        fig, (loss_ax, cos_ax) = plt.subplots(1, 2, figsize=(11, 4))
        for r in (r for r in records if r["model"] == model):
            loss_ax.plot(r["losses"], label=r["run"], linewidth=1)
            if r["cosines"]:
                steps, cosines = [c[0] for c in r["cosines"]], [c[1] for c in r["cosines"]]
                cos_ax.plot(steps, cosines, ".", markersize=2, label=r["run"])
        first = [r["losses"][0] for r in records if r["model"] == model and r["losses"]]
        loss_ax.set_ylim(0, 1.3 * max(first))  # a diverging run would flatten every other curve
        loss_ax.set(title=f"{model}: training loss (Fig. 9–11)", xlabel="step", ylabel="loss")
        cos_ax.set(title="cosine to the exact gradient (Fig. 12)", xlabel="step", ylabel="cosine")
        loss_ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(f"{out}/momentum_{model}.png", dpi=120)
        plt.close(fig)
