"""``fg-bench``: time, memory and gradient-quality benchmarks against stock PyTorch, and the paper's experiments.

    fg-bench speed --device cuda --batch-sizes 4096 16384
    fg-bench memory --device cpu --batch-sizes 256 1024
    fg-bench quality --dataset fashion_mnist
    fg-bench stability --lrs 1e-4 1e-3 1e-2
    fg-bench momentum
    fg-bench accuracy --dataset fashion_mnist --epochs 10 --schedule cosine
    fg-bench depth --models mlp cnn --depths 2 8 32
    fg-bench comm --batch-sizes 256
    fg-bench finetune --quick
    fg-bench all --device cuda

Each subcommand writes ``<out>/<subcommand>.json``, ``<out>/<subcommand>.md`` and PNG plots, and prints its table.
The long ones (speed, memory, depth, quality, stability, momentum, accuracy, finetune) print a progress line before
each case (case i/N, seconds so far, the time left) and take ``--quick``: a smoke look in at most 3 minutes on 2 CPU
cores.

``all`` runs ``speed`` and ``memory`` for both networks, every registered estimator and the stock baselines, with
a ``--preset``: ``gpu`` (the default on CUDA: batch 256, 4096 and 16384; k 1, 4, 16 for speed and 1, 16 for memory;
warmup 3, repeats 10; the torch.compile'd baseline at batch 4096 only; estimated 3-5 minutes on one H100), ``cpu``
or ``tiny`` (seconds, for tests). It prints a progress line per case, records a failing case (e.g. CUDA out of
memory) or one that cannot fit as an error row and goes on, records what is left after ``--time-limit`` seconds
(gpu: 600) as skipped, and writes to ``results/<card>/`` (``results/nvidia-h100-80gb-hbm3/``, ``results/cpu/``)
unless ``--out`` is given, with a README.md naming the command, device, torch version and wall time.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from typing import Sequence

import torch

from fg_lightning.bench import finetune
from fg_lightning.bench.common import MODELS, model_switches
from fg_lightning.bench.depth import ESTIMATORS as DEPTH_ESTIMATORS, MODELS as DEPTH_MODELS
from fg_lightning.bench.suite import PRESETS
from fg_lightning.estimators import REGISTRY


def _device(value: str) -> str:
    if value not in ("cpu", "cuda") and not value.startswith("cuda:"):
        raise argparse.ArgumentTypeError(f"--device must be cpu or cuda, got {value!r}")
    if value.startswith("cuda") and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"--device {value}: CUDA is not available on this machine")
    return value


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return number


def _model_variant(value: str) -> str:
    """``mlp``, ``cnn``, or either with switches of its network (``cnn+groups=8+norm``), refused here if the network
    does not take them."""
    base, switches = model_switches(value)
    if base not in MODELS:
        raise argparse.ArgumentTypeError(f"unknown model {base!r} in {value!r}; expected one of {sorted(MODELS)}")
    try:
        MODELS[base](local_losses=True, **switches)
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"{value!r}: {err}") from None
    return value


def _nonnegative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not (math.isfinite(number) and number > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return number


# --quick: a smoke look at each long command in at most 3 minutes on 2 CPU cores; these options in place of the
# user's (the user's others, --device, --out, --estimators, --dataset, stay). Measured wall times: QUICK_MEASURED.
QUICK: dict[str, tuple[str, ...]] = {
    # every estimator and baseline on the MLP at batch 256, one and four directions
    "speed": ("--models", "mlp", "--batch-sizes", "256", "--directions", "1", "4", "--warmup", "2", "--repeats", "5"),
    # every estimator and baseline on the MLP at batch 256, one and four directions (each case a fresh process)
    "memory": ("--models", "mlp", "--batch-sizes", "256", "--directions", "1", "4", "--no-compile",
               "--no-torch-backend"),
    # both networks, narrow and at small batches, at two depths: the stock baselines against backprop, the replayed
    # naive forward gradient (flat in depth) and local_activity (each case a fresh process)
    "depth": ("--models", "mlp", "cnn", "--depths", "2", "8", "--width", "256", "--batch-size", "256",
              "--cnn-batch-size", "16", "--estimators", "backprop", "naive_replayed", "local_activity", "--warmup", "1",
              "--repeats", "2", "--no-compile"),
    # the MLP, every estimator at each rate of its grid, one seed, one epoch cut to 5 batches, k = 4, one evaluation
    "accuracy": ("--models", "mlp", "--epochs", "1", "--limit-train-batches", "5", "--seeds", "1", "--grid-growth",
                 "0", "--k", "4", "--points-per-epoch", "1"),
    "quality": ("--models", "mlp", "--directions", "4", "--draws", "5"),
    "stability": ("--models", "mlp", "--batch-sizes", "128", "--lrs", "1e-2", "1e-1", "--steps", "20", "--k", "4"),
    "momentum": ("--models", "mlp", "--steps", "40", "--cosine-every", "10"),
}
# wall time of `fg-bench <command> --quick --device cpu` (Fashion-MNIST for the trainings) on the development machine's 2
# cores, shared with two other engineers' test runs (the load average over the run): once while they ran (load 3-5),
# once while one process ran (load 1). torch.compile's cache was warm (speed compiles four steps).
QUICK_MEASURED = {"speed": "181 s at load 4, 27 s at load 1", "memory": "90 s at load 3-4, 79 s at load 1",
                  "depth": "134 s at load 3, 81 s at load 1", "accuracy": "172 s at load 4, 28 s at load 1",
                  "quality": "75 s at load 5.5, 11 s at load 1", "stability": "159 s at load 4, 19 s at load 1",
                  "momentum": "166 s at load 4-5, 33 s at load 1"}


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="fg-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = root.add_subparsers(dest="command", required=True)

    def add(name: str, help: str, batch_sizes: list[int] | None, estimators: list[str]) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help)
        sub.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu")
        sub.add_argument("--out", default="bench_out", help="folder for the JSON, Markdown and PNG files")
        if name in ("accuracy", "speed"):  # a network's switches after "+": the recipe's variants, as --ablation's
            sub.add_argument("--models", nargs="+", type=_model_variant, default=["mlp", "cnn"],
                             help="mlp, cnn, or either with network switches, e.g. mlp+groups=8+norm (the local-loss "
                                  "estimators train the variant, the others its base model)")
        else:
            sub.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["mlp", "cnn"])
        if batch_sizes is not None:
            sub.add_argument("--batch-sizes", nargs="+", type=_positive, default=batch_sizes)
        sub.add_argument("--estimators", nargs="+", choices=list(REGISTRY), default=estimators)
        return sub

    all_estimators = list(REGISTRY)
    own_numbers = [name for name, spec in REGISTRY.items() if spec.same_as is None]  # not another's numbers again
    speed = add("speed", "median ms per training step (Table I, Fig. 13)", [256, 4096, 16384], all_estimators)
    speed.add_argument("--directions", nargs="+", type=_positive, default=[1, 2, 4, 8, 16],
                       help="k for multi_direction and partition")
    speed.add_argument("--warmup", type=_positive, default=5)
    speed.add_argument("--repeats", type=_positive, default=30)
    speed.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile'd baseline")
    speed.add_argument("--interleave", action="store_true",
                       help="time the cases of a model and batch size one step each in turn (a shared machine's "
                            "changing load on every case alike; their networks alive at once)")
    memory = add("memory", "peak memory of one step above rest (Fig. 14)", [256, 1024, 4096, 16384], all_estimators)
    memory.add_argument("--directions", nargs="+", type=_positive, default=[1, 16])
    memory.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile'd baseline")
    for sub in (speed, memory):
        sub.add_argument("--no-torch-backend", dest="torch_backend", action="store_false",
                         help="skip the torch:<estimator> cases (the estimators on the torch backend, on the twin)")
    depth = commands.add_parser("depth", help="peak memory and step time against depth: MLP of --width units and a "
                                              "plain CNN of --channels channels, L layers")
    depth.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu")
    depth.add_argument("--out", default="bench_out", help="folder for the JSON, Markdown and PNG files")
    depth.add_argument("--models", nargs="+", choices=DEPTH_MODELS, default=["mlp", "cnn"],
                       help="mlp: L hidden layers of --width units; cnn: L 3x3 convolutions of --channels channels, "
                            "same padding, no pooling, then a global average pool and a linear classifier; mixer: "
                            "Ren et al.'s LocalMixer of L blocks (the CNN's batch size)")
    depth.add_argument("--depths", nargs="+", type=_positive, default=[2, 4, 8, 16, 32, 64], help="hidden layers L")
    depth.add_argument("--width", type=_positive, default=1024)
    depth.add_argument("--channels", type=_positive, default=32, help="the CNN's channels")
    depth.add_argument("--batch-size", type=_positive, default=4096, help="the MLP's batch size")
    depth.add_argument("--cnn-batch-size", type=_positive, default=256,
                       help="the CNN's batch size (a 28x28 feature map of 32 channels is 24x the MLP's 1024 units)")
    depth.add_argument("--estimators", nargs="+", choices=list(REGISTRY), default=DEPTH_ESTIMATORS)
    depth.add_argument("--k", type=_positive, default=4, help="k for the estimators that take one")
    depth.add_argument("--warmup", type=_positive, default=1)
    depth.add_argument("--repeats", type=_positive, default=3)
    depth.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile'd baseline")
    comm = add("comm", "bytes each process sends per data-parallel step, beside the gradient's", [256],
               all_estimators)
    comm.add_argument("--directions", nargs="+", type=_positive, default=[1, 10])
    comm.add_argument("--steps", type=_positive, default=2, help="steps counted (momentum: a checkpoint, then not)")
    for name, help, batch, estimators in (
        ("quality", "cosine to the exact gradient and error per layer on real data (Fig. 7, 12)", [256], own_numbers),
        ("stability", "short trainings across learning rates; largest stable rate (Fig. 5, 6, 8)", [256], own_numbers),
        ("momentum", "training curves of the momentum estimator at lr 1e-6 (Fig. 9-12)", [256], ["momentum"]),
        ("accuracy", "test-accuracy leaderboard: full trainings, the rate of a grid picked by validation", None,
         own_numbers),
    ):
        sub = add(name, help, batch, estimators)
        sub.add_argument("--dataset", choices=["mnist", "fashion_mnist"], default="mnist")
        sub.add_argument("--root", default="data", help="where MNISTDataModule looks for (and downloads) the IDX files")
        sub.add_argument("--no-download", dest="download", action="store_false")
        sub.add_argument("--val-size", type=int, default=5000, help="training images held out for validation")
        if name == "quality":
            sub.add_argument("--directions", nargs="+", type=_positive, default=[3, 16])
            sub.add_argument("--draws", type=_positive, default=20)
            sub.add_argument("--pretrain-steps", type=int, default=0, help="backprop steps before measuring")
            sub.add_argument("--pretrain-lr", type=float, default=1e-2)
        if name == "stability":
            sub.add_argument("--lrs", nargs="+", type=float, default=[1e-5, 1e-4, 3e-4, 1e-3, 1e-2, 1e-1])
            sub.add_argument("--k", type=_positive, default=10,
                             help="k for every estimator that takes k (multi_direction, partition, orthogonal, ...)")
            sub.add_argument("--steps", type=_positive, default=300)
        if name == "momentum":
            sub.add_argument("--lr", type=float, default=1e-6)
            sub.add_argument("--reference-lr", type=float, default=1e-2, help="backprop's large learning rate")
            sub.add_argument("--fix-gap", type=_positive, default=10)
            sub.add_argument("--decrease-gap", type=_positive, default=10)
            sub.add_argument("--steps", type=_positive, default=1000)
            sub.add_argument("--cosine-every", type=_positive, default=1, help="steps between cosine measurements")
        if name == "accuracy":
            sub.add_argument("--ablation", action="store_true",
                             help="train on the CNN variants of Ren et al.'s recipe in place of --models: "
                                  "groups=8, norm, both, and with block_size=1 (the local-loss estimators; the others "
                                  "on the plain CNN)")
            sub.add_argument("--batch-size", "--batch-sizes", dest="batch_size", type=_positive, default=256,
                             help="one training batch size")
            sub.add_argument("--epochs", type=_positive_float, default=10,
                             help="epochs per run, for every model; a fraction (2.8) ends the run, and its schedule, "
                                  "within an epoch: the time-fit run of an equal-time comparison")
            sub.add_argument("--lrs", nargs="+", type=_positive_float, default=None,
                             help="learning rates for every estimator (default: each one's grid, its registry record's)")
            sub.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                             help="cosine: CosineAnnealingLR over all steps, stepped every step")
            sub.add_argument("--k", type=_positive, default=10, help="k for the estimators that take one")
            sub.add_argument("--limit-train-batches", type=_positive, default=None,
                             help="cut each epoch after this many batches (quick looks; the report says so)")
            sub.add_argument("--seeds", type=_positive, default=3,
                             help="runs per rate, seeds 0..N-1 (weights, estimator, batch order); mean and sd over them")
            sub.add_argument("--points-per-epoch", type=_positive, default=10,
                             help="test accuracy this many times an epoch (evenly spaced, the last at its end): the "
                                  "curves' and test_acc_at_backprop_time's resolution (evaluation time excluded)")
            sub.add_argument("--backprop-from", metavar="DIR", default=None,
                             help="a folder of an earlier fg-bench accuracy report whose picked backprop runs are the "
                                  "reference (gap_vs_backprop, test_acc_at_backprop_time) of the models this run "
                                  "trains no backprop on: the time-fit run of an equal-time comparison (--epochs 2.8), "
                                  "run beside backprop's so that both see the same load")
            sub.add_argument("--grid-growth", type=_nonnegative, default=3,
                             help="rates at most added per estimator beyond the grid's edge (/3, x3) while the pick "
                                  "sits on it; 0: the grid as given")
    for name, options in QUICK.items():
        commands.choices[name].add_argument(
            "--quick", action="store_true",
            help=f"a smoke look, measured {QUICK_MEASURED[name]} on 2 shared CPU cores: {' '.join(options)} (in place "
                 "of those options)")
    finetune.add_arguments(commands.add_parser(
        "finetune", help="a pretrained ViT fine-tuned on the digits with and without a backward pass: peak memory over "
                         "inference's, step time, test accuracy against steps and seconds"))
    suite = commands.add_parser("all", help="speed and memory, every estimator and model, into results/<card>/")
    suite.add_argument("--preset", choices=list(PRESETS), default=None, help="default: gpu with --device cuda, else cpu")
    suite.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu")
    suite.add_argument("--out", default=None, help="folder for the results (default results/<card slug>/)")
    suite.add_argument("--time-limit", type=float, default=None,
                       help="seconds after which the remaining cases are recorded as skipped (default: the preset's)")
    suite.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile'd baseline")
    return root


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """The options of ``fg-bench <argv>``; with ``--quick``, the command's :data:`QUICK` options in place of the ones
    they name."""
    args = parser().parse_args(argv)
    if getattr(args, "quick", False):
        preset = finetune.QUICK if args.command == "finetune" else QUICK[args.command]
        args = parser().parse_args([*argv, *preset])
    args.command_line = shlex.join(["fg-bench", *argv])
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    import importlib

    from fg_lightning.allocator import keep_freed_memory

    keep_freed_memory()  # as fg-cli: every case's step without the page faults of its large tensors

    from fg_lightning.data import DatasetNotFoundError

    try:
        module = "suite" if args.command == "all" else args.command
        importlib.import_module(f"fg_lightning.bench.{module}").run(args)
    except DatasetNotFoundError as err:
        flags = err.naming(download="drop --no-download", root="--root <folder>", dataset="--dataset fashion_mnist")
        raise SystemExit(f"fg-bench {args.command}: {flags}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
