"""``fg-bench finetune``: a pretrained ViT fine-tuned on scikit-learn's digits with and without a backward pass, against
backprop (full, LoRA, activation checkpointing): peak memory over inference's on the same model and batch, median step
time, and test accuracy against steps and against training seconds, mean ± sd over seeds.

    fg-bench finetune --quick
    fg-bench finetune --steps 300 --seeds 0 1 2 --checkpoint tb_logs/vit_pretrain/version_0/checkpoints/last.ckpt

What is measured, and how:

- Starting point: ``--checkpoint``, a checkpoint of :func:`fg_lightning.models.ViT` that fg-cli wrote
  (``configs/vit_pretrain.yaml``), loaded by :func:`fg_lightning.finetune.pretrained` with a new classifier head
  (zero, as torchvision's ViT starts it; the digits are new classes), as ``configs/vit_finetune_*.yaml``. Without it
  the bench pretrains the ViT itself as that config does (backprop, AdamW lr 1e-3, weight decay 0.05, batch 256 on
  Fashion-MNIST, seed 0) for ``--pretrain-steps`` steps, saves it as ``<out>/pretrained_vit.ckpt`` and reuses that
  file when it is there (the output says which), and records its accuracy on the first 2,000 Fashion-MNIST test images.
- Methods: the one table :data:`METHODS` (adapter, estimator, optimizer and learning rate, backward class). LoRA is
  :data:`LORA` (rank 8 on each block's MLP layers, the classifier head trained whole, as
  ``configs/vit_finetune_lora_multi_direction.yaml``).
- Accuracy: each method and seed trains through Lightning (``ForwardGradientModule``, ``DigitsDataModule(per_class=50,
  val_per_class=10, seed=seed)``, ``Trainer(max_steps=--steps)``); the seed sets the digits split and shuffle, the
  estimator's directions and the adapters' initial weights. :func:`test_accuracy` measures the accuracy on the held-out
  test images (1,197 at the defaults) before the first step, every ``--eval-every`` steps and after the last.
- Time: each training step's wall-clock (Lightning's whole batch, from ``on_train_batch_start`` to
  ``on_train_batch_end``, synchronised on CUDA), summed into the training seconds of the time-to-accuracy plot; the
  evaluations are not in it. The median step leaves out the first :data:`WARMUP_STEPS` of each run (the first
  forward-mode step also checks the model's derivative against autograd's). An untimed two-step run of
  ``backprop_adamw`` comes first, so that the process's one-time costs fall on no method.
- Memory, per method and for inference (a ``no_grad`` forward of the same model, in eval mode), on the same model and a
  random batch of the training batch size: one step after a warm-up step at batch 2 (which loads the kernels and gives
  AdamW its state). On the CPU each case runs in a process of its own, forked from a server process that only imported
  the modules (Python's ``forkserver``; started with glibc's mmap threshold pinned at 64 KiB as ``fg-bench memory``'s
  subprocesses are, so that freed tensors leave the RSS): ``above_rest_mb`` is the step's peak RSS (``VmHWM``, reset
  through ``/proc/self/clear_refs`` just before it) minus the RSS before it, and ``resident_mb`` the bytes of the
  tensors resident at rest (every parameter and buffer, the optimizer's state, the batch). On CUDA the cases run in
  this process, after an untimed inference case (the libraries' handles and workspaces): ``resident_mb`` is
  ``memory_allocated`` before the step and ``above_rest_mb`` ``max_memory_allocated`` (reset before the step) minus
  it, both less what was allocated before the case began. ``total_mb = above_rest_mb + resident_mb``;
  ``ratio = total_mb / inference's total_mb``. ``--memory-models`` picks the ViT configurations measured
  (:data:`MEMORY_MODELS`): ``vit`` is the fine-tuned model (its checkpoint's weights), ``vit-wide`` a larger one of
  random weights, where the weights' share of memory is larger (memory depends on the shapes, not the values).
- :data:`TARGETS`: the issue's targets for the ratios and the accuracy gap, printed beside the measured values. The
  bench reports them; it does not assert them.

Writes ``<out>/finetune.json`` (everything: the environment, the settings, every run's curve and step times, every
memory case), ``finetune.md`` and ``finetune.csv`` (the table), and ``finetune.png`` (test accuracy against steps and
against training seconds, mean and ± sd band). ``--out`` defaults to ``results/cpu/finetune`` (``finetune-quick`` with
``--quick``; ``results/<card>/…`` on CUDA).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import gc
import logging
import multiprocessing
import os
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.utils.checkpoint
from torch import nn

from fg_lightning.bench.budget import Budget, slug
from fg_lightning.bench.common import environment, markdown_table, pyplot, sync, write_report
from fg_lightning.bench.memory import PINNED_MALLOC, reset_peak_rss, status_mb
from fg_lightning.estimators import (
    ActivityPerturbation, Backprop, GradientEstimator, MultiDirection, ZerothOrder, training_step,
)
from fg_lightning.estimators.collective import Collective
from fg_lightning.estimators.registry import BACKWARD

MIB = 2**20
INFERENCE = "inference"
WARMUP_STEPS = 3  # left out of the median step time
PRETRAIN_FILE = "pretrained_vit.ckpt"
PRETRAIN_ACC_IMAGES = 2000  # Fashion-MNIST test images the pretrained model's accuracy is measured on

# The pretrained weights all but the classifier head, which starts anew (at zero, as torchvision's ViT starts it: the
# digits are new classes), as in configs/vit_finetune_*.yaml.
NEW_HEAD = ["heads.*"]
# PEFT LoRA as configs/vit_finetune_lora_multi_direction.yaml: rank 8 on each encoder block's two MLP layers, the new
# classifier head trained whole.
LORA = dict(target_modules=["mlp.0", "mlp.3"], r=8, alpha=16, modules_to_save=["heads.head"])

# ViT configurations for the memory cases (fg_lightning.models.ViT's arguments): "vit" is the model fine-tuned here.
MEMORY_MODELS: dict[str, dict[str, int]] = {
    "vit": {},
    "vit-wide": dict(hidden_dim=384, num_layers=6, num_heads=6, mlp_dim=1536),
}


@dataclass(frozen=True)
class Method:
    """One fine-tuning method: which parameters train (``adapter``: ``"full"``, every weight, or ``"lora"``,
    :data:`LORA`'s adapters and the head), the estimator (``estimator(seed=seed)`` makes it), the optimizer class and
    its learning rate, the backward computation it uses (``backward``: a key of the registry's ``BACKWARD``), whether
    each encoder block is checkpointed, and ``same_as``: the method whose update this one takes (by another route
    through memory and time), trained on the first seed only."""

    name: str
    adapter: str
    estimator: Callable[..., GradientEstimator]
    optimizer: type[torch.optim.Optimizer]
    lr: float
    backward: str
    checkpointed: bool = False
    same_as: str | None = None

    def __post_init__(self) -> None:
        if self.adapter not in ("full", "lora"):
            raise ValueError(f"{self.name}: adapter must be 'full' or 'lora', got {self.adapter!r}")
        if self.backward not in BACKWARD:
            raise ValueError(f"{self.name}: backward must be one of {sorted(BACKWARD)}, got {self.backward!r}")


# The one table of methods. Rates from single tries (seed 0, new head, test accuracy at the end; the ViT pretrained
# for 1,000 steps unless said): backprop's AdamW full 1e-3: 0.95 at 300 steps; LoRA 3e-3: 0.86 (1e-2: 0.83; 200-step
# pretraining). Without a backward pass, LoRA trains best under AdamW (its state is the adapters' size, 2 x 13 K
# numbers): zeroth order at 3e-3 0.56 after 1,000 steps (1e-3: 0.44; plain SGD at 1e-3, MeZO's optimizer: 0.35 at 300
# steps, 0.63 at 2,000 and then unstable, 3e-3 unstable); the whole model under plain SGD (no optimizer state: the
# memory of inference) at 3e-4: 0.29 after 300 steps (1e-3: 0.23, 3e-3: 0.11). k = 1: at k = 1, from the same seed,
# zeroth order and the forward gradient take the same step up to O(eps^2) (their accuracies agree to 3 decimals), and
# on the torch backend stored tangents (MultiDirection's default, used here) hold a parameter-sized tangent per
# direction through the step (vit-wide, forward_gradient above rest: 73 MB at k = 1, 197 MB at k = 4; replayed ones
# are flat in k, results/cpu/torch-one-direction). k = 4 under AdamW reached 0.54 after 250 steps with LoRA, 0.67
# after 750.
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("backprop_adamw", "full", Backprop, torch.optim.AdamW, 1e-3, "global"),
    Method("backprop_lora", "lora", Backprop, torch.optim.AdamW, 3e-3, "global"),
    Method("backprop_checkpointed", "full", Backprop, torch.optim.AdamW, 1e-3, "global", checkpointed=True,
           same_as="backprop_adamw"),
    Method("forward_gradient", "full", functools.partial(MultiDirection, k=1), torch.optim.SGD, 3e-4, "none"),
    Method("forward_gradient_lora", "lora", functools.partial(MultiDirection, k=1), torch.optim.AdamW, 3e-3, "none"),
    Method("zeroth_order", "full", functools.partial(ZerothOrder, k=1), torch.optim.SGD, 3e-4, "none"),
    Method("zeroth_order_lora", "lora", functools.partial(ZerothOrder, k=1), torch.optim.AdamW, 3e-3, "none"),
    Method("activity", "full", functools.partial(ActivityPerturbation, k=1), torch.optim.SGD, 1e-2, "layer"),
)}

# The targets: peak memory over inference's at the same batch, at most this (backprop_adamw reported beside
# them), and the best method with no backward pass within this many points of backprop_adamw's test accuracy.
TARGETS = {"zeroth_order": 1.1, "zeroth_order_lora": 1.1, "forward_gradient_lora": 1.3, "forward_gradient": 2.2}
TARGET_GAP_POINTS = 2.0

# --quick: every method on 3 seeds in short runs, a short pretraining, both memory models; these options in place of
# the user's. QUICK_MEASURED: `fg-bench finetune --quick` on the development machine's 2 cores, shared with other
# engineers' test runs (the load average over the run; torch's two threads slow down badly when the cores are busy).
QUICK = ("--steps", "20", "--eval-every", "10", "--pretrain-steps", "20")
QUICK_MEASURED = "49 s at load 1.5, 147 s at load 2-4, 11 min at load 6-7"


# -- the command line ------------------------------------------------------------------------------------------------

def add_arguments(sub: argparse.ArgumentParser) -> None:
    """``fg-bench finetune``'s options (the cli registers the subcommand)."""
    from fg_lightning.bench.cli import _device, _positive

    def seed(value: str) -> int:
        number = int(value)
        if number < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
        return number

    sub.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu")
    sub.add_argument("--out", default=None, help="folder for the files (default results/cpu/finetune, or "
                                                 "finetune-quick with --quick; results/<card>/... on CUDA)")
    sub.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    sub.add_argument("--seeds", nargs="+", type=seed, default=[0, 1, 2], help="a run per seed; mean and sd over them")
    sub.add_argument("--steps", type=_positive, default=1000, help="optimizer steps per run")
    sub.add_argument("--eval-every", type=_positive, default=50, help="steps between test-accuracy measurements")
    sub.add_argument("--batch-size", type=_positive, default=50, help="the training batch, and the memory cases'")
    sub.add_argument("--checkpoint", default=None, help="an fg-cli checkpoint of fg_lightning.models.ViT (default: "
                                                        "pretrain one into <out>/pretrained_vit.ckpt, or reuse it)")
    sub.add_argument("--pretrain-steps", type=_positive, default=1000, help="backprop steps of the pretraining")
    sub.add_argument("--root", default="data", help="where MNISTDataModule looks for Fashion-MNIST (pretraining)")
    sub.add_argument("--no-download", dest="download", action="store_false")
    sub.add_argument("--memory-models", nargs="+", choices=list(MEMORY_MODELS), default=list(MEMORY_MODELS),
                     help="ViT configurations of the memory cases: vit (the fine-tuned one), vit-wide (width 384, "
                          "6 layers, MLP 1536)")
    sub.add_argument("--quick", action="store_true",
                     help=f"a smoke look, measured {QUICK_MEASURED} on 2 shared CPU cores: {' '.join(QUICK)} (in "
                          "place of those options)")


def check(args: Any) -> None:
    """Refuses what cannot run, in one line, before anything runs; fills in the default ``--out``."""
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"fg-bench finetune: --seeds must differ, got {args.seeds}")
    if len(set(args.methods)) != len(args.methods):
        raise SystemExit(f"fg-bench finetune: --methods names a method twice: {args.methods}")
    if args.checkpoint is not None:
        from fg_lightning.finetune import CheckpointError, pretrained
        from fg_lightning.models import ViT

        try:
            pretrained(ViT(), args.checkpoint, skip=NEW_HEAD)
        except CheckpointError as err:
            raise SystemExit(f"fg-bench finetune: --checkpoint: {err}") from None
    if args.out is None:
        device = torch.device(args.device)
        card = "cpu" if device.type == "cpu" else slug(environment(device)["device_name"])
        args.out = os.path.join("results", card, "finetune-quick" if args.quick else "finetune")


# -- the models ------------------------------------------------------------------------------------------------------

def vit(model: str = "vit", checkpoint: str | None = None) -> nn.Module:
    """:func:`fg_lightning.models.ViT` in configuration ``model`` (:data:`MEMORY_MODELS`), its weights from
    ``checkpoint`` but a new head (:data:`NEW_HEAD`; the fine-tuned model only) or random."""
    from fg_lightning.finetune import pretrained
    from fg_lightning.models import ViT

    network = ViT(**MEMORY_MODELS[model])
    return pretrained(network, checkpoint, skip=NEW_HEAD) if checkpoint is not None and model == "vit" else network


def adapted(model: nn.Module, method: Method) -> nn.Module:
    """``model`` as ``method`` trains it: LoRA adapters, or each encoder block checkpointed
    (``torch.utils.checkpoint.checkpoint(use_reentrant=False)``: a block's activations are computed again in the
    backward pass instead of kept; the parameters keep their names)."""
    from fg_lightning.finetune import lora

    if method.adapter == "lora":
        return lora(model, **LORA)
    if method.checkpointed:
        for block in model.encoder.layers:
            block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)
    return model


# -- the starting point ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Lightning's and the data modules' info lines and their warnings about workers and batch counts silenced."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "fg_lightning")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|log_every_n_steps|smaller than "
                                                  "the logging interval|isinstance.treespec, LeafSpec.).*")
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def _trainer(max_steps: int, device: torch.device, callbacks: list[Any]) -> Any:
    from lightning.pytorch import Trainer

    return Trainer(max_steps=max_steps, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                   logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    """The share of ``images`` that ``model`` classifies right (eval mode, no_grad, 512 at a time)."""
    training = model.training
    model.eval()
    with torch.no_grad():
        right = sum(int((model(images[i:i + 512].to(device)).argmax(1) == labels[i:i + 512].to(device)).sum())
                    for i in range(0, len(images), 512))
    model.train(training)
    return right / len(images)


def pretrain(args: Any, device: torch.device) -> dict[str, Any]:
    """The starting point: ``--checkpoint``, or ``<out>/pretrained_vit.ckpt``, reused if there, else pretrained now
    with backprop and AdamW (lr 1e-3, weight decay 0.05) at batch 256 on Fashion-MNIST for ``--pretrain-steps``."""
    if args.checkpoint is not None:
        print(f"fg-bench finetune: starting from {args.checkpoint}", flush=True)
        return {"checkpoint": args.checkpoint, "pretrained": "given"}
    path = os.path.join(args.out, PRETRAIN_FILE)
    if os.path.isfile(path):
        steps = torch.load(path, map_location="cpu", weights_only=False).get("global_step")
        print(f"fg-bench finetune: reusing {path} ({steps} pretraining steps; delete it to pretrain again)", flush=True)
        return {"checkpoint": path, "pretrained": "reused", "pretrain_steps": steps}
    from lightning.pytorch import seed_everything

    from fg_lightning.data import MNISTDataModule
    from fg_lightning.models import ViT
    from fg_lightning.module import ForwardGradientModule

    print(f"fg-bench finetune: pretraining the ViT on Fashion-MNIST, {args.pretrain_steps} steps at batch 256 "
          f"-> {path}", flush=True)
    start = time.perf_counter()
    with _quiet():
        seed_everything(0, verbose=False)
        data = MNISTDataModule("fashion_mnist", root=args.root, batch_size=256, val_size=0, download=args.download,
                               pin_memory=False)
        module = ForwardGradientModule(ViT(), Backprop(),
                                       functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.05))
        trainer = _trainer(args.pretrain_steps, device, [])
        trainer.fit(module, datamodule=data)
        os.makedirs(args.out, exist_ok=True)
        trainer.save_checkpoint(path, weights_only=True)
    images, labels = data.test_set.tensors
    acc = accuracy(module.network, images[:PRETRAIN_ACC_IMAGES], labels[:PRETRAIN_ACC_IMAGES], device)
    seconds = time.perf_counter() - start
    print(f"fg-bench finetune: pretrained in {seconds:.0f} s, Fashion-MNIST test accuracy {acc:.3f} "
          f"(first {min(len(labels), PRETRAIN_ACC_IMAGES)} test images)", flush=True)
    return {"checkpoint": path, "pretrained": "now", "pretrain_steps": args.pretrain_steps, "pretrain_s": seconds,
            "pretrain_test_acc": acc}


# -- the training runs -----------------------------------------------------------------------------------------------

@functools.cache
def _test_accuracy_class() -> type:
    """:class:`TestAccuracy`, built on first use: Lightning is imported then, so that ``fg-bench`` parses its command
    line (this module's options among them) without it."""
    from lightning.pytorch import Callback
    from typing_extensions import override

    class TestAccuracy(Callback):
        """Test accuracy on ``images`` / ``labels`` before the first step, every ``every`` optimizer steps and after
        the last, with the training seconds so far: ``curve`` holds ``(step, train_s, test_acc)``. ``step_ms`` holds
        every step's wall-clock (Lightning's whole batch: ``on_train_batch_start`` to ``on_train_batch_end``,
        synchronised on CUDA); the evaluations are outside it.

        Example::

            Trainer(max_steps=300, callbacks=[test_accuracy(*digits.test_set.tensors, every=25)])
        """

        def __init__(self, images: torch.Tensor, labels: torch.Tensor, every: int) -> None:
            if isinstance(every, bool) or not isinstance(every, int) or every < 1:
                raise ValueError(f"every must be an integer >= 1, got every={every!r}")
            self.images, self.labels, self.every = images, labels, every
            self.curve: list[tuple[int, float, float]] = []
            self.step_ms: list[float] = []
            self._start = 0.0

        def _evaluate(self, trainer: Any, pl_module: Any) -> None:
            self.curve.append((trainer.global_step, sum(self.step_ms) / 1e3,
                               accuracy(pl_module.network, self.images, self.labels, pl_module.device)))

        @override
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self._evaluate(trainer, pl_module)

        @override
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            sync(pl_module.device)
            self._start = time.perf_counter()

        @override
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            sync(pl_module.device)
            self.step_ms.append((time.perf_counter() - self._start) * 1e3)
            if trainer.global_step % self.every == 0 or trainer.global_step >= trainer.max_steps:
                self._evaluate(trainer, pl_module)

    return TestAccuracy


def test_accuracy(images: torch.Tensor, labels: torch.Tensor, every: int) -> Any:
    """A Lightning callback (:func:`_test_accuracy_class`'s ``TestAccuracy``) that measures the test accuracy every
    ``every`` steps and times every step."""
    return _test_accuracy_class()(images, labels, every)


test_accuracy.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def train(method: Method, seed: int, checkpoint: str, steps: int, eval_every: int, batch_size: int,
          device: torch.device) -> dict[str, Any]:
    """One run of ``method`` from ``checkpoint``: ForwardGradientModule on DigitsDataModule through a Lightning
    Trainer for ``steps`` steps, seed ``seed``. Returns the test-accuracy curve, the step times and their median
    (:data:`WARMUP_STEPS` left out), and the trainable parameters."""
    from lightning.pytorch import seed_everything

    from fg_lightning.data import DigitsDataModule
    from fg_lightning.module import ForwardGradientModule

    with _quiet():
        seed_everything(seed, verbose=False)  # the LoRA adapters' initial weights
        network = adapted(vit("vit", checkpoint), method)
        module = ForwardGradientModule(network, method.estimator(seed=seed),
                                       functools.partial(method.optimizer, lr=method.lr))
        data = DigitsDataModule(per_class=50, val_per_class=10, batch_size=batch_size, seed=seed, pin_memory=False)
        data.setup("fit")
        timer = test_accuracy(*data.test_set.tensors, every=eval_every)
        _trainer(steps, device, [timer]).fit(module, datamodule=data)
    timed = timer.step_ms[WARMUP_STEPS:] or timer.step_ms
    trainable = sum(p.numel() for p in module.network.parameters())
    return {"method": method.name, "seed": seed, "trainable_params": trainable, "curve": timer.curve,
            "step_ms": timer.step_ms, "step_ms_median": statistics.median(timed), "train_s": sum(timer.step_ms) / 1e3,
            "test_acc": timer.curve[-1][2]}


# -- memory ----------------------------------------------------------------------------------------------------------

def _tensor_bytes(tensors: Iterator[torch.Tensor]) -> int:
    """Bytes of the storages behind ``tensors``, each counted once (LoRA's frozen base weights, a tied view)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def measure_memory(case: str, model: str, batch_size: int, checkpoint: str | None, device: str,
                   threads: int = 0) -> dict[str, float]:
    """Peak memory of one step of method ``case`` (or of inference: ``case="inference"``) on the ViT ``model`` at
    ``batch_size``, in this process (see the module docstring): ``above_rest_mb``, ``resident_mb``, ``total_mb``.
    ``threads``: torch's intra-op threads (0: as they are)."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    if device.type == "cpu" and os.environ.get("MALLOC_MMAP_THRESHOLD_") != PINNED_MALLOC["MALLOC_MMAP_THRESHOLD_"]:
        raise RuntimeError("measure_memory runs in a process started with fg_lightning.bench.memory.PINNED_MALLOC "
                           "in its environment (freed tensors would stay in the RSS)")
    torch.manual_seed(0)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0  # earlier cases' leftovers
    base = vit(model, checkpoint)
    if case == INFERENCE:
        network = base.to(device).eval()
        optimizer = None

        def step(x: torch.Tensor, labels: torch.Tensor, index: int) -> None:
            with torch.no_grad():
                network(x)
    else:
        from fg_lightning.torch_network import TorchNetwork

        method = METHODS[case]
        network = adapted(base, method).to(device)
        trained, estimator = TorchNetwork(network), method.estimator(seed=0)
        optimizer = method.optimizer(trained.parameters(), lr=method.lr)

        def step(x: torch.Tensor, labels: torch.Tensor, index: int) -> None:
            training_step(estimator, trained, x, labels, index, optimizer, Collective())

    def batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:  # random images: memory depends on the shape alone
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(size, 1, 28, 28, generator=generator)
        return x.to(device), torch.randint(0, 10, (size,), generator=generator).to(device)

    step(*batch(2), 0)
    x, labels = batch(batch_size)
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device) - before
        step(x, labels, 1)
        sync(device)
        above = (torch.cuda.max_memory_allocated(device) - before - resident) / MIB
    else:
        state = [t for s in (optimizer.state.values() if optimizer else []) for t in s.values()
                 if isinstance(t, torch.Tensor)]
        grads = [p.grad for p in network.parameters() if p.grad is not None]
        resident = _tensor_bytes(iter([*network.parameters(), *network.buffers(), *state, *grads, x, labels]))
        resting = reset_peak_rss()
        step(x, labels, 1)
        # The kernel's RSS counters are approximate (a few hundred KiB): a reading below rest is no memory above it.
        above = max(status_mb("VmHWM") - resting, 0.0)
    return {"above_rest_mb": above, "resident_mb": resident / MIB, "total_mb": above + resident / MIB}


@contextlib.contextmanager
def _forkserver_pool() -> Iterator[Any]:
    """A pool whose every task runs in a process of its own, forked from a server process that imported this module
    and nothing else, started with :data:`~fg_lightning.bench.memory.PINNED_MALLOC` in its environment."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, "fg_lightning.torch_network", "fg_lightning.finetune", "peft"])
    saved = {key: os.environ.get(key) for key in PINNED_MALLOC}
    os.environ.update(PINNED_MALLOC)  # read by the server as it starts, inherited by what it forks
    try:
        pool = context.Pool(1, maxtasksperchild=1)
    finally:
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value
    with pool:
        yield pool


def memory(cases: list[str], models: list[str], batch_size: int, checkpoint: str, device: torch.device,
           budget: Budget) -> list[dict[str, Any]]:
    """One record per model and case (inference first), with ``ratio`` = its ``total_mb`` over inference's; a case that
    fails is a record with its ``error``."""
    records = []
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(_forkserver_pool()) if device.type == "cpu" else None
        if pool is None:  # CUDA, in this process: the library handles and workspaces made before any case counts
            measure_memory(INFERENCE, models[0], batch_size, checkpoint, str(device))
        for model in models:
            rows = []
            for case in [INFERENCE, *cases]:
                args = (case, model, batch_size, checkpoint, str(device), torch.get_num_threads())
                measured, error = budget.run(
                    f"memory {model} batch {batch_size} {case}",
                    lambda: pool.apply(measure_memory, args) if pool else measure_memory(*args), device)
                rows.append({"model": model, "case": case, "batch_size": batch_size, **(measured or {"error": error})})
            inference = rows[0].get("total_mb")
            for row in rows:
                if "total_mb" in row and inference:
                    row["ratio"] = row["total_mb"] / inference
            records += rows
    return records


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return ("cuda: max_memory_allocated over the step (reset before it), less what was allocated before the case "
                "began (above rest: less memory_allocated before the step)")
    return ("cpu: a process per case forked from a forkserver (mmap threshold 64 KiB): VmHWM - VmRSS before the step, "
            "plus the bytes of the tensors resident at rest")


# -- the report ------------------------------------------------------------------------------------------------------

def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _first_reaching(curve: list[tuple[int, float, float]], target: float) -> float:
    """Training seconds at the first evaluation whose accuracy is at least ``target``."""
    return next(seconds for _, seconds, acc in curve if acc >= target)


def summarise(methods: list[str], runs: list[dict[str, Any]],
              memory_records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The table: a row per method (and inference's memory), accuracy as mean and sd over the seeds."""
    rows = []
    for name in [INFERENCE, *methods]:
        method = METHODS.get(name)
        row: dict[str, Any] = {"method": name, "backward": method.backward if method else "",
                               "adapter": method.adapter if method else ""}
        for record in memory_records:
            if record["case"] == name:
                row[f"total_mb[{record['model']}]"] = record.get("total_mb")
                row[f"ratio[{record['model']}]"] = record.get("ratio")
                if "error" in record:
                    row["error"] = record["error"]
        done = [r for r in runs if r["method"] == name and "error" not in r]
        failed = [r for r in runs if r["method"] == name and "error" in r]
        if failed:  # every seed (a refusal), or some (a divergence)
            seeds = "" if not done else f"seeds {[r['seed'] for r in failed]}: "
            row["error"] = seeds + failed[0]["error"]
        if done:
            accs = [r["test_acc"] for r in done]
            row["seeds"] = [r["seed"] for r in done]
            row["trainable_params"] = done[0]["trainable_params"]
            row["step_ms_median"] = statistics.median(r["step_ms_median"] for r in done)
            row["test_acc_mean"], row["test_acc_sd"] = _mean_sd(accs)
            row["test_acc"] = f"{row['test_acc_mean']:.3f} ± {row['test_acc_sd']:.3f}"
            row["s_to_final"] = statistics.mean(_first_reaching(r["curve"], r["test_acc"]) for r in done)
            row["train_s"] = statistics.mean(r["train_s"] for r in done)
        rows.append(row)
    reference = next((r for r in rows if r["method"] == "backprop_adamw" and "test_acc_mean" in r), None)
    for row in rows:
        same_as = METHODS[row["method"]].same_as if row["method"] in METHODS else None
        if same_as is not None and "test_acc_mean" in row:  # one seed: no gap against the others' mean
            row["test_acc"] = f"{row['test_acc_mean']:.3f} (seed {row['seeds'][0]} only: {same_as}'s update)"
        elif reference is not None and "test_acc_mean" in row:
            row["gap_points"] = 100 * (row["test_acc_mean"] - reference["test_acc_mean"])
    return rows


def targets(rows: list[dict[str, Any]], models: list[str], batch_size: int, steps: int) -> str:
    """The issue's targets beside the measured values (the bench reports; it does not assert)."""
    lines = [f"Targets (measured in this run; reported, not asserted). Peak memory over inference's at batch "
             f"{batch_size}:"]
    by_name = {r["method"]: r for r in rows}
    for model in models:
        parts = []
        for name, limit in [*TARGETS.items(), ("backprop_adamw", None)]:
            ratio = by_name.get(name, {}).get(f"ratio[{model}]")
            if name in by_name:
                measured = "n/a" if ratio is None else f"{ratio:.2f}x"
                parts.append(f"{name} {measured} ({'reported' if limit is None else f'<= {limit}x'})")
        lines.append(f"- {model}: " + ", ".join(parts))
    forward_only = [r for r in rows if r["backward"] == "none" and "test_acc_mean" in r]
    reference = by_name.get("backprop_adamw", {})
    if forward_only and "test_acc_mean" in reference:
        best = max(forward_only, key=lambda r: r["test_acc_mean"])
        lines.append(f"- test accuracy at {steps} steps: best with no backward pass {best['method']} "
                     f"{best['test_acc']} vs backprop_adamw {reference['test_acc']}: gap {best['gap_points']:+.1f} "
                     f"points (target: within {TARGET_GAP_POINTS:g})")
    return "\n".join(lines) + "\n"


def columns(models: list[str]) -> list[str]:
    per_model = [f"{what}[{model}]" for model in models for what in ("total_mb", "ratio")]
    return ["method", "backward", "adapter", "trainable_params", *per_model, "step_ms_median", "test_acc",
            "gap_points", "s_to_final", "error"]


def plot(runs: list[dict[str, Any]], methods: list[str], out: str) -> None:
    """Test accuracy against steps and against training seconds: the mean over seeds and a ± sd band."""
    plt = pyplot()
    if plt is None:
        return
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for name in methods:
        curves = [r["curve"] for r in runs if r["method"] == name and "error" not in r]
        if not curves or METHODS[name].same_as:
            continue
        length = min(len(c) for c in curves)
        steps = [c[0] for c in curves[0][:length]]
        seconds = [statistics.mean(c[i][1] for c in curves) for i in range(length)]
        accs = [_mean_sd([c[i][2] for c in curves]) for i in range(length)]
        mean = [m for m, _ in accs]
        low, high = [m - s for m, s in accs], [m + s for m, s in accs]
        for ax, x in ((by_step, steps), (by_time, seconds)):
            style = "-" if METHODS[name].backward == "none" else "--"
            line, = ax.plot(x, mean, marker=".", label=name, linestyle=style)
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2)
    by_step.set(xlabel="optimizer steps", ylabel="test accuracy (digits)", title="accuracy against steps")
    by_time.set(xlabel="training seconds (evaluations left out)", ylabel="test accuracy (digits)",
                title="time to accuracy")
    by_step.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "finetune.png"), dpi=120)
    plt.close(fig)


def report(args: Any, start: dict[str, Any], runs: list[dict[str, Any]], memory_records: list[dict[str, Any]],
           device: torch.device, wall_s: float) -> str:
    """``finetune.json``, ``.md``, ``.csv`` and ``.png`` in ``args.out``; returns what it prints."""
    rows = summarise(args.methods, runs, memory_records)
    cols = columns(args.memory_models)
    meta = {**environment(device), "command": getattr(args, "command_line", "fg-bench finetune"),
            "wall_s": round(wall_s, 1), "steps": args.steps, "eval_every": args.eval_every,
            "batch_size": args.batch_size, "seeds": args.seeds, "memory": memory_method(device),
            "load_average_1_5_15_min": [round(load, 1) for load in os.getloadavg()], **start}
    goals = targets(rows, args.memory_models, args.batch_size, args.steps)
    models = ", ".join(f"{m} ({MEMORY_MODELS[m] or 'the fine-tuned ViT'})" for m in args.memory_models)
    memory_table = markdown_table(memory_records, ["model", "case", "batch_size", "above_rest_mb", "resident_mb",
                                                   "total_mb", "ratio", "error"])
    notes = ("A pretrained ViT fine-tuned on scikit-learn's digits (50 images per class; test accuracy on the held-out "
             "images), mean ± sd over the seeds. `total_mb[model]`: a step's peak memory including the resident "
             "tensors (parameters, buffers, optimizer state, batch) on that ViT configuration; `ratio`: over "
             "inference's on the same model and batch; `step_ms_median`: Lightning's whole step; `gap_points`: test "
             "accuracy minus backprop_adamw's, in points; `s_to_final`: training seconds to the first evaluation "
             f"reaching the run's final accuracy (0: it ended no better than it began). Models: {models}.\n\n"
             f"{goals}\nMemory cases ({memory_method(device)}):\n\n{memory_table}\n")
    table = write_report(args.out, "finetune", rows, cols, meta, notes,
                         extra={"runs": runs, "memory": memory_records, "methods": {
                             name: {"adapter": m.adapter, "optimizer": m.optimizer.__name__, "lr": m.lr,
                                    "backward": m.backward, "estimator": repr(m.estimator(seed=0)),
                                    "checkpointed": m.checkpointed, "same_as": m.same_as}
                             for name, m in METHODS.items() if name in args.methods}, "lora": LORA})
    with open(os.path.join(args.out, "finetune.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    plot(runs, args.methods, args.out)
    return f"{table}\n{goals}"


def run(args: Any) -> dict[str, Any]:
    """The starting point, every method on every seed, the memory cases of the methods that trained, the report;
    returns what it printed, the runs and the memory records."""
    check(args)
    wall = time.perf_counter()
    device = torch.device(args.device)
    start = pretrain(args, device)
    # One short untimed run first: the process's one-time costs (kernels, thread pool, allocator) are no method's.
    train(METHODS["backprop_adamw"], args.seeds[0], start["checkpoint"], 2, 2, args.batch_size, device)
    budget = Budget()
    budget.phase("finetune", sum(1 if METHODS[name].same_as else len(args.seeds) for name in args.methods))
    runs: list[dict[str, Any]] = []
    for name in args.methods:
        method = METHODS[name]
        seeds = args.seeds[:1] if method.same_as else args.seeds
        for seed in seeds:
            result, error = budget.run(f"train {name} seed {seed}", lambda: train(
                method, seed, start["checkpoint"], args.steps, args.eval_every, args.batch_size, device), device)
            runs.append(result if error is None else {"method": name, "seed": seed, "error": error})
            if error is not None and seed == seeds[0]:  # refused (activity on the ViT): the method's, not a seed's
                budget.more(1 - len(seeds))
                break
    trained = {r["method"] for r in runs if "error" not in r}
    measured = [name for name in args.methods if name in trained]  # not a refused method
    budget.phase("finetune memory", len(args.memory_models) * (1 + len(measured)))
    memory_records = memory(measured, args.memory_models, args.batch_size, start["checkpoint"], device, budget)
    printed = report(args, start, runs, memory_records, device, time.perf_counter() - wall)
    print(printed)
    print(f"fg-bench finetune: {time.perf_counter() - wall:.0f} s; wrote {args.out}/finetune.json, .md, .csv, .png")
    return {"rows": printed, "runs": runs, "memory": memory_records}
