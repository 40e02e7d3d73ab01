"""``fg-bench accuracy``: an accuracy leaderboard. Each estimator trains each network for ``--epochs`` epochs of plain
SGD through :func:`~fg_lightning.estimators.apply_estimate`, with a cosine (``CosineAnnealingLR`` over all steps,
stepped every step) or constant learning rate, at every rate of a small grid (each estimator's ``REGISTRY`` record's ``grid``, or ``--lrs`` for all).
After every epoch the validation and test accuracy are measured (outside the timed training). The rate with the best
validation accuracy at the end is picked (the first in the grid on a tie; a run that diverged cannot be); the
leaderboard gives its final test accuracy, its gap to backprop's test accuracy on the same network, its steps and
the seconds of training. Every run of a network starts from the same weights and sees the same batches in the same
order."""

from __future__ import annotations

import statistics
from typing import Any

import torch

from fg_lightning.bench.common import (
    build_network, environment, evaluate, pyplot, real_data, train, write_report,
)
from fg_lightning.estimators import REGISTRY
from fg_lightning.estimators.registry import BACKWARD

COLUMNS = ["model", "estimator", "backward", "k", "lr", "at_grid_edge", "schedule", "epochs", "steps", "val_acc",
           "test_acc", "gap_vs_backprop", "wall_s", "diverged_lrs"]
CLASSES = list(BACKWARD)  # the leaderboard ranks the estimators of each backward computation on their own


def lr_grid(name: str, lrs: list[float] | None) -> list[float]:
    """``lrs`` if given, else the estimator's own grid (its registry record's ``grid``)."""
    return list(lrs) if lrs else list(REGISTRY[name].grid)


def run(args: Any) -> list[dict[str, Any]]:
    if args.val_size < 1:
        raise SystemExit(f"fg-bench accuracy: --val-size must be >= 1 (the rate is picked by validation accuracy), "
                         f"got {args.val_size}")
    device = torch.device(args.device)
    grids = {name: lr_grid(name, args.lrs) for name in args.estimators}
    data = real_data(args, args.batch_size)
    loader = data.train_dataloader()
    epoch_steps = min(len(loader), args.limit_train_batches or len(loader))
    total = args.epochs * epoch_steps
    schedule = None if args.schedule == "constant" else (
        lambda optimizer: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total))
    records: list[dict[str, Any]] = []
    for model in args.models:
        for name in args.estimators:
            k = args.k if REGISTRY[name].takes_k else None
            for lr in grids[name]:
                network, curve = build_network(model, name).to(device), []

                def on_epoch_end(epoch: int, step: int, seconds: float) -> None:
                    val_loss, val_acc = evaluate(network, data.val_set, device)
                    test_loss, test_acc = evaluate(network, data.test_set, device)
                    curve.append({"epoch": epoch + 1, "step": step, "wall_s": seconds, "val_loss": val_loss,
                                  "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc})
                    print(f"fg-bench accuracy: {model} {name} lr={lr:g} epoch {epoch + 1}/{args.epochs}: "
                          f"val acc {val_acc:.4f}, test acc {test_acc:.4f} ({seconds:.1f} s)")

                result = train(network, REGISTRY[name].make(k), lr, loader, total, device, epoch_steps=epoch_steps,
                               scheduler=schedule, on_epoch_end=on_epoch_end)
                start = 0
                for point in curve:  # the mean training loss of each epoch
                    point["train_loss"] = statistics.fmean(result["losses"][start : point["step"]])
                    start = point["step"]
                last = curve[-1] if curve and not result["diverged"] else {}
                records.append({"model": model, "backward": REGISTRY[name].backward, "estimator": name, "k": k,
                                "lr": lr, "grid": grids[name],
                                "schedule": args.schedule, "epochs": args.epochs, "steps": result["steps"],
                                "diverged": result["diverged"], "diverged_at": result["diverged_at"],
                                "wall_s": result["train_s"], "val_acc": last.get("val_acc"),
                                "test_acc": last.get("test_acc"), "curve": curve, "picked": False})
                if result["diverged"]:
                    print(f"fg-bench accuracy: {model} {name} lr={lr:g}: diverged at step {result['diverged_at']}")
    leaderboard = pick(records, args.models, args.estimators)
    meta = {**environment(device), "dataset": args.dataset, "train_size": len(data.train_set),
            "val_size": len(data.val_set), "test_size": len(data.test_set), "batch_size": args.batch_size,
            "epochs": args.epochs, "steps_per_epoch": epoch_steps, "schedule": args.schedule,
            "limit_train_batches": args.limit_train_batches, "command": args.command_line}
    limited = "" if args.limit_train_batches is None else (
        f"**Each epoch was cut to {epoch_steps} of {len(loader)} batches (`--limit-train-batches "
        f"{args.limit_train_batches}`): these are not full epochs.**\n\n" if epoch_steps < len(loader) else
        f"`--limit-train-batches {args.limit_train_batches}` is no less than an epoch's {len(loader)} batches: "
        "full epochs.\n\n")
    notes = (f"{limited}Plain SGD, batch {args.batch_size}, {args.epochs} epochs of {epoch_steps} steps, "
             f"{args.schedule} learning rate; the rate of the grid with the best validation accuracy at the end "
             "(`val_acc`, on the held-out part of the training set) is picked, and `test_acc` is its final test "
             "accuracy; `backward` is the backward computation the estimator uses (none: forward mode only; layer: a "
             "weight's outer product with its own layer input; block: backprop within a block; global), and the "
             "table ranks each class on its own; `at_grid_edge` marks a pick at the smallest or largest rate of its "
             "grid (a better rate may lie beyond); `gap_vs_backprop` is `test_acc` minus backprop's on the same "
             "network; `wall_s` is the "
             "training time only (evaluation excluded); `diverged_lrs` lists the rates of the grid that diverged "
             "(at which step). Grids: " + "; ".join(f"{n} {', '.join(f'{lr:g}' for lr in g)}" for n, g in grids.items())
             + ". Every run and its per-epoch curve are in accuracy.json.\n")
    table = write_report(args.out, "accuracy", records, COLUMNS, meta, notes, table_records=leaderboard)
    print(limited + table)
    plot(records, args.out)
    return records


def pick(records: list[dict[str, Any]], models: list[str], estimators: list[str]) -> list[dict[str, Any]]:
    """Marks each estimator's run with the best validation accuracy as ``picked`` (with ``gap_vs_backprop``,
    ``at_grid_edge`` and ``diverged_lrs``); returns the leaderboard rows, by model, then by backward computation
    (none, layer, block, global), then by test accuracy."""
    rows = []
    for model in models:
        backprop = None
        for name in estimators:
            runs = [r for r in records if r["model"] == model and r["estimator"] == name]
            diverged = ", ".join(f"{r['lr']:g} (step {r['diverged_at']})" for r in runs if r["diverged"])
            trained = [r for r in runs if not r["diverged"]]
            best = max(trained, key=lambda r: r["val_acc"]) if trained else None
            if best is None:
                rows.append({"model": model, "backward": runs[0]["backward"], "estimator": name, "k": runs[0]["k"],
                             "schedule": runs[0]["schedule"], "epochs": runs[0]["epochs"], "diverged_lrs": diverged})
                continue
            grid = [r["lr"] for r in runs]
            best.update(picked=True, diverged_lrs=diverged,
                        at_grid_edge=len(grid) > 1 and best["lr"] in (min(grid), max(grid)))
            rows.append(best)
            if name == "backprop":
                backprop = best["test_acc"]
        for row in rows:
            if row["model"] == model and row.get("test_acc") is not None and backprop is not None:
                row["gap_vs_backprop"] = row["test_acc"] - backprop
    return sorted(rows, key=lambda r: (models.index(r["model"]), CLASSES.index(r["backward"]), r.get("test_acc") is None,
                                       -(r.get("test_acc") or 0)))


def plot(records: list[dict[str, Any]], out: str) -> None:
    """Per model: test accuracy against epoch (top) and against training seconds (bottom), at the picked rates."""
    plt = pyplot()
    picked = [r for r in records if r["picked"]]
    if plt is None or not picked:
        return
    models = list(dict.fromkeys(r["model"] for r in picked))
    fig, axes = plt.subplots(2, len(models), figsize=(5.5 * len(models), 7), squeeze=False)
    for col, model in enumerate(models):
        for r in (r for r in picked if r["model"] == model):
            k = "" if r["k"] is None else f" k={r['k']}"
            label = f"{r['estimator']}{k} lr={r['lr']:g}"
            accs = [p["test_acc"] for p in r["curve"]]
            axes[0][col].plot([p["epoch"] for p in r["curve"]], accs, marker="o", markersize=3, label=label)
            axes[1][col].plot([p["wall_s"] for p in r["curve"]], accs, marker="o", markersize=3, label=label)
        axes[0][col].set(title=f"{model}: test accuracy", xlabel="epoch", ylabel="test acc")
        axes[1][col].set(xlabel="training seconds", ylabel="test acc")
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{out}/accuracy.png", dpi=120)
    plt.close(fig)
