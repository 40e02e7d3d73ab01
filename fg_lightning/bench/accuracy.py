"""``fg-bench accuracy``: an accuracy leaderboard. Each estimator trains each network for ``--epochs`` epochs of plain
SGD through :func:`~fg_lightning.estimators.apply_estimate`, with a cosine (``CosineAnnealingLR`` over all steps,
stepped every step) or constant learning rate, at every rate of a small grid (each estimator's ``REGISTRY`` record's
``grid``, or ``--lrs`` for all), once per seed (``--seeds``: seed s sets the network's initial weights, the
estimator's seed and the order of the training batches; seed 0 is the one run of earlier versions). After every
epoch the validation and test accuracy are measured (outside the timed training). The rate with the best mean
validation accuracy over the seeds at the end is picked (the first in the grid on a tie; a rate at which any seed
diverged cannot be). While the pick sits on the grid's smallest or largest rate, the grid grows by the next rate
beyond that edge (÷3 or ×3), up to ``--grid-growth`` added rates; the largest rate below one that diverged is not
at the edge. The leaderboard gives the picked rate's test accuracy (mean and sd over the seeds), its gap to
backprop's on the same network, the test accuracy it had at backprop's training time, its steps and its seconds of
training. Every run with a given seed starts from the same weights and sees the same batches in the same order."""

from __future__ import annotations

import json
import os
import statistics
from typing import Any, Callable

import torch

from fg_lightning.bench.budget import Progress, with_k
from fg_lightning.bench.common import (
    build_network, environment, evaluate, global_model, pyplot, real_data, train, write_report,
)
from fg_lightning.estimators import REGISTRY
from fg_lightning.estimators.registry import BACKWARD

COLUMNS = ["model", "estimator", "backward", "k", "lr", "at_grid_edge", "schedule", "epochs", "steps", "seeds",
           "val_acc", "test_acc", "test_sd", "gap_vs_backprop", "test_acc_at_backprop_time", "wall_s", "diverged_lrs"]
CLASSES = list(BACKWARD)  # the leaderboard ranks the estimators of each backward computation on their own
GROWTH = 3.0  # the factor between a grid's edge and the rate added beyond it
# --ablation: Ren et al.'s convolutional recipe piece by piece (issue 18): the CNN plain, with group-wise losses over 8
# channel groups, with normalisation in the blocks, both, both with blocks of one layer, both with patch-wise
# losses over 2×2 patches, and both with conv heads that pool to a 2×2 grid. Estimators without local losses run on
# the plain CNN only; the variants' gap is to its backprop.
ABLATION = ["cnn", "cnn+groups=8", "cnn+norm", "cnn+groups=8+norm", "cnn+block_size=1+groups=8+norm",
            "cnn+groups=8+norm+patches=2", "cnn+groups=8+norm+head_pool=2"]


def lr_grid(name: str, lrs: list[float] | None) -> list[float]:
    """``lrs`` if given, else the estimator's own grid (its registry record's ``grid``)."""
    return list(lrs) if lrs else list(REGISTRY[name].grid)


def seed_loader(data, seed: int):
    """The training loader of the set-up ``data`` (a :class:`~fg_lightning.data.MNISTDataModule`), shuffled from
    ``seed`` (its :class:`~fg_lightning.data.EpochPermutation` orders epoch e by (seed, e)); the validation split,
    made by ``setup`` from the module's own seed, stays as it is."""
    split_seed, data.seed = data.seed, seed
    try:
        return data.train_dataloader()
    finally:
        data.seed = split_seed


def by_rate(runs: list[dict[str, Any]]) -> dict[float, list[dict[str, Any]]]:
    """The runs of one estimator on one network grouped by rate, in the order the rates were first run."""
    rates: dict[float, list[dict[str, Any]]] = {}
    for r in runs:
        rates.setdefault(r["lr"], []).append(r)
    return rates


def choose(runs: list[dict[str, Any]]) -> float | None:
    """The rate with the best mean validation accuracy over its seeds, among the rates at which no seed diverged
    (the first in the grid on a tie); None if every rate diverged."""
    rates = by_rate(runs)
    trained = [lr for lr, group in rates.items() if not any(r["diverged"] for r in group)]
    return max(trained, key=lambda lr: statistics.fmean(r["val_acc"] for r in rates[lr]), default=None)


def grid_edge(grid: list[float], lr: float) -> str | None:
    """``"low"`` / ``"high"`` when ``lr`` is the smallest / largest rate of ``grid``, else None (a one-rate grid has
    no edge). Rates that diverged count: the largest rate that trained, below one that diverged, is interior."""
    if len(grid) < 2:
        return None
    return "low" if lr == min(grid) else "high" if lr == max(grid) else None


def next_rate(grid: list[float], side: str) -> float:
    """The rate beyond ``grid``'s ``side``: its smallest ÷ 3 or its largest × 3 (to three significant digits)."""
    lr = min(grid) / GROWTH if side == "low" else max(grid) * GROWTH
    return float(f"{lr:.3g}")


def search(grid: list[float], run_rate: Callable[[float], list[dict[str, Any]]], growth: int
           ) -> tuple[list[dict[str, Any]], list[float], list[float]]:
    """Runs every rate of ``grid`` (``run_rate(lr)``: the runs at ``lr``, one per seed), then, while the picked rate
    (:func:`choose`) sits on an edge of the grid, the next rate beyond that edge, at most ``growth`` of them; when
    every rate diverged, the next below the smallest. Returns the runs, the grid as run and the rates added."""
    grid, added = list(grid), []
    runs = [r for lr in grid for r in run_rate(lr)]
    while len(added) < growth:
        best = choose(runs)
        side = "low" if best is None else grid_edge(grid, best)
        if side is None:
            break
        lr = next_rate(grid, side)
        grid.append(lr)
        added.append(lr)
        runs += run_rate(lr)
    return runs, grid, added


def accuracy_at_time(curve: list[dict[str, Any]], seconds: float) -> float | None:
    """The test accuracy at the last point of ``curve`` reached within ``seconds`` of training (cumulative
    ``wall_s``), or None when not even the first was: the resolution is ``--points-per-epoch`` points an epoch."""
    within = [point for point in curve if point["wall_s"] <= seconds]
    return within[-1]["test_acc"] if within else None


def at_backprop_time(runs: list[dict[str, Any]], backprop: list[dict[str, Any]]) -> float | None:
    """Mean over seeds of :func:`accuracy_at_time` of each run, within the training seconds (``wall_s``) of
    backprop's run with the same seed; None when backprop has no run of one of the seeds, or one of the runs had
    not finished an epoch by then."""
    budget = {r.get("seed", 0): r["wall_s"] for r in backprop if r.get("wall_s") is not None}  # training seconds
    values = [accuracy_at_time(r.get("curve", []), budget[r.get("seed", 0)]) if r.get("seed", 0) in budget else None
              for r in runs]
    return None if not values or None in values else statistics.fmean(values)


def diverged_label(lr: float, group: list[dict[str, Any]]) -> str:
    """``"1 (step 3)"``: a rate and the first step at which one of its seeds diverged, and how many seeds did if
    not all."""
    diverged = [r for r in group if r["diverged"]]
    seeds = "" if len(diverged) == len(group) else f", {len(diverged)} of {len(group)} seeds"
    return f"{lr:g} (step {min(r['diverged_at'] for r in diverged)}{seeds})"


def pick(records: list[dict[str, Any]], models: list[str], estimators: list[str],
         baseline: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Marks each estimator's runs (every seed) at the rate :func:`choose` picks as ``picked``; returns the
    leaderboard rows, by model, then by backward computation (none, layer, block, global), then by mean test
    accuracy. A row gives the picked rate, its seeds' mean validation and test accuracy, the test accuracy's sd
    (``test_sd``, from two seeds on), the mean steps and wall time, ``at_grid_edge``, ``gap_vs_backprop`` (to
    backprop's mean), ``test_acc_at_backprop_time`` (:func:`at_backprop_time`) and ``diverged_lrs``. Backprop is
    the model's own, else that of the model without the recipe's switches, else the picked backprop runs of that
    model in ``baseline`` (another report's backprop runs: :func:`load_baseline`)."""
    rows, chosen_by_model = [], {}
    for model in models:
        chosen: dict[str, list[dict[str, Any]]] = {}
        for name in estimators:
            runs = [r for r in records if r["model"] == model and r["estimator"] == name]
            if not runs:
                continue
            rates, best = by_rate(runs), choose(runs)
            row = {"model": model, "backward": runs[0]["backward"], "estimator": name, "k": runs[0]["k"],
                   "schedule": runs[0]["schedule"], "epochs": runs[0]["epochs"], "grid": list(rates),
                   "diverged_lrs": ", ".join(diverged_label(lr, group) for lr, group in rates.items()
                                             if any(r["diverged"] for r in group))}
            rows.append(row)
            if best is None:
                continue
            chosen[name] = group = rates[best]
            for r in group:
                r["picked"] = True
            tests = [r["test_acc"] for r in group]
            row.update(lr=best, at_grid_edge=grid_edge(list(rates), best) is not None, seeds=len(group),
                       steps=group[0].get("steps"),  # the same for every seed: none diverged
                       val_acc=statistics.fmean(r["val_acc"] for r in group), test_acc=statistics.fmean(tests),
                       test_sd=statistics.stdev(tests) if len(tests) > 1 else None,
                       wall_s=statistics.fmean(r["wall_s"] for r in group) if "wall_s" in group[0] else None)
        chosen_by_model[model] = chosen
    for model, chosen in chosen_by_model.items():  # a model's backprop, else that of the model without the recipe
        reference = chosen.get("backprop") or chosen_by_model.get(global_model(model), {}).get("backprop") or [
            r for r in baseline if r["picked"] and r["model"] == global_model(model)]
        if not reference:
            continue
        backprop = statistics.fmean(r["test_acc"] for r in reference)
        for row in rows:
            if row["model"] == model and row["estimator"] in chosen:
                row["gap_vs_backprop"] = row["test_acc"] - backprop
                row["test_acc_at_backprop_time"] = at_backprop_time(chosen[row["estimator"]], reference)
    return sorted(rows, key=lambda r: (models.index(r["model"]), CLASSES.index(r["backward"]), r.get("test_acc") is None,
                                       -(r.get("test_acc") or 0)))


def load_baseline(folder: str | None) -> list[dict[str, Any]]:
    """The backprop runs of the fg-bench accuracy report in ``folder`` (``--backprop-from``); none without one."""
    if folder is None:
        return []
    try:
        with open(os.path.join(folder, "accuracy.json")) as f:
            records = json.load(f)["records"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SystemExit(f"fg-bench accuracy: --backprop-from {folder}: no fg-bench accuracy report there "
                         f"({error})") from None
    baseline = [r for r in records if r.get("estimator") == "backprop" and "curve" in r]
    if not any(r.get("picked") for r in baseline):
        raise SystemExit(f"fg-bench accuracy: --backprop-from {folder}: its report trained no backprop")
    return baseline


def run(args: Any) -> list[dict[str, Any]]:
    if args.val_size < 1:
        raise SystemExit(f"fg-bench accuracy: --val-size must be >= 1 (the rate is picked by validation accuracy), "
                         f"got {args.val_size}")
    backprop_from = args.backprop_from
    baseline = load_baseline(backprop_from)  # before any training
    device = torch.device(args.device)
    seeds = list(range(args.seeds))
    data = real_data(args, args.batch_size)
    loaders = {seed: seed_loader(data, seed) for seed in seeds}
    batches = len(loaders[0])
    epoch_steps = min(batches, args.limit_train_batches or batches)
    total = max(1, round(args.epochs * epoch_steps))  # --epochs 2.8: the schedule ends with the run, within an epoch
    schedule = None if args.schedule == "constant" else (
        lambda optimizer: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total))
    records: list[dict[str, Any]] = []
    grids: dict[tuple[str, str], tuple[list[float], list[float]]] = {}  # (model, estimator): (grid as run, added)

    def train_one(model: str, name: str, k: int | None, lr: float, seed: int) -> dict[str, Any]:
        progress.case(f"{model} {with_k(name, k)} lr={lr:g} seed {seed}")
        network, curve = build_network(model, name, seed=seed).to(device), []

        def on_point(epochs: float, step: int, seconds: float) -> None:
            val_loss, val_acc = evaluate(network, data.val_set, device)
            test_loss, test_acc = evaluate(network, data.test_set, device)
            curve.append({"epoch": round(epochs, 6), "step": step, "wall_s": seconds, "val_loss": val_loss,
                          "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc})
            if step % epoch_steps == 0 or step == total:
                print(f"fg-bench accuracy: {model} {name} lr={lr:g} seed {seed} epoch {epochs:g}/{args.epochs:g}: "
                      f"val acc {val_acc:.4f}, test acc {test_acc:.4f} ({seconds:.1f} s)")

        result = train(network, REGISTRY[name].make(k, seed=seed), lr, loaders[seed], total, device,
                       epoch_steps=epoch_steps, scheduler=schedule, on_point=on_point,
                       points_per_epoch=args.points_per_epoch)
        start = 0
        for point in curve:  # the mean training loss since the point before
            point["train_loss"] = statistics.fmean(result["losses"][start : point["step"]])
            start = point["step"]
        if result["diverged"]:
            print(f"fg-bench accuracy: {model} {name} lr={lr:g} seed {seed}: diverged at step {result['diverged_at']}")
        last = curve[-1] if curve and not result["diverged"] else {}
        return {"model": model, "backward": REGISTRY[name].backward, "estimator": name, "k": k, "lr": lr,
                "seed": seed, "schedule": args.schedule, "epochs": args.epochs, "steps": result["steps"],
                "diverged": result["diverged"], "diverged_at": result["diverged_at"], "wall_s": result["train_s"],
                "val_acc": last.get("val_acc"), "test_acc": last.get("test_acc"), "curve": curve, "picked": False}

    # the recipe's switches (groups, norm, ...) are for the local-loss estimators: the others run on the model
    # without them (once, for all the variants that share it)
    pairs = list(dict.fromkeys((model if REGISTRY[name].needs_local_losses else global_model(model), name)
                               for model in (ABLATION if getattr(args, "ablation", False) else args.models)
                               for name in args.estimators))
    models = list(dict.fromkeys(model for model, _ in pairs))
    progress = Progress("accuracy", sum(len(lr_grid(name, args.lrs)) for _, name in pairs) * len(seeds))
    for model, name in pairs:
        k = args.k if REGISTRY[name].takes_k else None
        first = lr_grid(name, args.lrs)

        def run_rate(lr: float) -> list[dict[str, Any]]:
            if lr not in first:  # a rate the grid grew by: cases beyond those announced
                progress.more(len(seeds))
            return [train_one(model, name, k, lr, seed) for seed in seeds]

        runs, grid, added = search(first, run_rate, args.grid_growth)
        if added:
            print(f"fg-bench accuracy: {model} {name}: the grid grew by {', '.join(f'{lr:g}' for lr in added)}")
        for r in runs:
            r.update(grid=grid, grown=r["lr"] in added)
        records += runs
        grids[model, name] = grid, added
    leaderboard = pick(records, models, args.estimators, baseline)
    meta = {**environment(device), "dataset": args.dataset, "train_size": len(data.train_set),
            "val_size": len(data.val_set), "test_size": len(data.test_set), "batch_size": args.batch_size,
            "epochs": args.epochs, "steps_per_epoch": epoch_steps, "points_per_epoch": args.points_per_epoch,
            "schedule": args.schedule, "seeds": args.seeds,
            "grid_growth": args.grid_growth, "ablation": getattr(args, "ablation", False),
            "limit_train_batches": args.limit_train_batches, "backprop_from": backprop_from,
            "command": args.command_line}
    limited = "" if args.limit_train_batches is None else (
        f"**Each epoch was cut to {epoch_steps} of {batches} batches (`--limit-train-batches "
        f"{args.limit_train_batches}`): these are not full epochs.**\n\n" if epoch_steps < batches else
        f"`--limit-train-batches {args.limit_train_batches}` is no less than an epoch's {batches} batches: "
        "full epochs.\n\n")
    grown = "; ".join(f"{model} {name} {', '.join(f'{lr:g}' for lr in grid if lr not in added)}"
                      + (f" + {', '.join(f'{lr:g}' for lr in added)}" if added else "")
                      for (model, name), (grid, added) in grids.items())
    notes = (f"{limited}Plain SGD, batch {args.batch_size}, {args.epochs:g} epochs of {epoch_steps} steps, "
             f"{args.schedule} learning rate, every rate run with {args.seeds} seed(s) (seed s: the initial weights, "
             "the estimator's seed and the order of the batches); the rate with the best mean validation accuracy "
             "over the seeds at the end (`val_acc`, on the held-out part of the training set) is picked (a rate at "
             "which a seed diverged cannot be), and `test_acc` is the mean of its seeds' final test accuracies, "
             "`test_sd` their sd; `backward` is the backward computation the estimator uses (none: forward mode "
             "only; layer: a weight's outer product with its own layer input; block: backprop within a block; "
             "global), and the table ranks each class on its own; while the pick sat on the smallest or largest "
             f"rate of its grid, the grid grew by the next rate beyond it (÷3, ×3; at most {args.grid_growth} per "
             "estimator; the largest rate below one that diverged is not an edge), and `at_grid_edge` marks a pick "
             "still at an edge (a better rate may lie beyond); `gap_vs_backprop` is `test_acc` minus backprop's on "
             "the same network; `test_acc_at_backprop_time` is the test accuracy (mean over seeds) at the last point "
             "of its curve reached within the training time of backprop's run with the same seed, on the same "
             f"network and device (test accuracy measured {args.points_per_epoch} times an epoch: that is its "
             "resolution), blank when not even the first point was reached (or backprop was not run)"
             + ("" if backprop_from is None else
                f"; backprop's runs are those of the report in {backprop_from} (`--backprop-from`), which ran "
                "apart: its time is comparable only where both ran under the same load")
             + "; `wall_s` is "
             "the mean training time only (evaluation excluded); `diverged_lrs` lists the "
             "rates at which a seed diverged (the first step). Grids as run (+ the rates added): " + grown
             + ". Every run (each rate and seed) and its per-epoch curve are in accuracy.json, beside the leaderboard.\n")
    table = write_report(args.out, "accuracy", records, COLUMNS, meta, notes, table_records=leaderboard,
                         extra={"leaderboard": leaderboard})
    print(limited + table)
    plot(records, args.out)
    return records


def plot(records: list[dict[str, Any]], out: str) -> None:
    """Per model: test accuracy (mean over seeds) against epoch (top) and against training seconds (bottom), at the
    picked rates."""
    plt = pyplot()
    picked = [r for r in records if r["picked"]]
    if plt is None or not picked:
        return
    models = list(dict.fromkeys(r["model"] for r in picked))
    fig, axes = plt.subplots(2, len(models), figsize=(5.5 * len(models), 7), squeeze=False)
    for col, model in enumerate(models):
        for name in dict.fromkeys(r["estimator"] for r in picked if r["model"] == model):
            group = [r for r in picked if r["model"] == model and r["estimator"] == name]
            k = "" if group[0]["k"] is None else f" k={group[0]['k']}"
            label = f"{name}{k} lr={group[0]['lr']:g}" + (f" ({len(group)} seeds)" if len(group) > 1 else "")
            points = min(len(r["curve"]) for r in group)
            accs = [statistics.fmean(r["curve"][e]["test_acc"] for r in group) for e in range(points)]
            seconds = [statistics.fmean(r["curve"][e]["wall_s"] for r in group) for e in range(points)]
            axes[0][col].plot([group[0]["curve"][e]["epoch"] for e in range(points)], accs, marker="o", markersize=3,
                              label=label)
            axes[1][col].plot(seconds, accs, marker="o", markersize=3, label=label)
        axes[0][col].set(title=f"{model}: test accuracy", xlabel="epoch", ylabel="test acc")
        axes[1][col].set(xlabel="training seconds", ylabel="test acc")
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{out}/accuracy.png", dpi=120)
    plt.close(fig)
