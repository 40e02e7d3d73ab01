"""What every fg-bench subcommand shares: the cases, the stock-PyTorch baselines, timing and the report files."""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import platform
import statistics
import time
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

import fg_lightning
from fg_lightning.engine import CNN, MLP, Conv2d, GlobalAvgPool, Linear, Mixer, Network, ReLU, to_torch
from fg_lightning.estimators import REGISTRY, Estimate, GradientEstimator, cosine, training_step
from fg_lightning.estimators.collective import Collective
from fg_lightning.estimators.compiled import CompiledStep
from fg_lightning.torch_network import TorchNetwork

MODELS: dict[str, type[Network]] = {"mlp": MLP, "cnn": CNN, "mixer": Mixer}


def deep_cnn(depth: int, channels: int = 32, in_channels: int = 1, image_size: int = 28, num_classes: int = 10,
             seed: int | None = None, tangent_memory_mb: float | None = 256.0, local_losses: bool = False) -> Network:
    """``fg-bench depth``'s plain deep CNN: ``depth`` 3×3 convolutions of ``channels`` channels (the first from
    ``in_channels``), same padding, no pooling, each followed by ReLU, then a global average pool and a linear
    classifier: layers ``conv1, relu1, …, conv{depth}, relu{depth}, pool, fc``. Every layer keeps the full
    ``image_size``² feature maps. ``local_losses=True`` puts a head (``pool``, a spatial average, then ``fc``, a linear
    classifier) after each ReLU, drawn after the network's own layers, so that they are initialised as without heads
    (as the MLP's). ``seed`` draws the weights from a private RNG (the global one is left untouched)."""
    if depth < 1 or channels < 1:
        raise ValueError(f"deep_cnn needs depth >= 1 and channels >= 1, got depth={depth}, channels={channels}")
    layers: list[tuple[str, Any]] = []
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        for index in range(1, depth + 1):
            layers += [(f"conv{index}", Conv2d(in_channels if index == 1 else channels, channels, 3, padding=1)),
                       (f"relu{index}", ReLU(inplace=True))]
        layers += [("pool", GlobalAvgPool()), ("fc", Linear(channels, num_classes))]
        heads = {f"relu{i}": [("pool", GlobalAvgPool()), ("fc", Linear(channels, num_classes))]
                 for i in range(1, depth + 1)} if local_losses else {}
    return Network(layers, input_shape=(in_channels, image_size, image_size), tangent_memory_mb=tangent_memory_mb,
                   heads=heads)


# networks that build_network makes besides MODELS (the choices of --models): fg-bench depth's
DEPTH_NETWORKS: dict[str, Callable[..., Network]] = {"deep_cnn": deep_cnn}

STOCK = ("stock_autograd", "stock_func_jvp", "stock_compiled", "stock_checkpointed")
TORCH = "torch:"  # a case on the torch backend: "torch:naive"
COMPILED = "compiled:"  # the engine's step under torch.compile (CompiledStep): "compiled:naive"
COMPILED_ESTIMATORS = ("backprop", "naive", "activity")  # timed compiled beside eager, where stock_compiled is


def registered(name: str) -> str:
    """The registry name of a case: ``"torch:naive"`` and ``"compiled:naive"`` are ``"naive"``."""
    return name.removeprefix(TORCH).removeprefix(COMPILED)


# Ren et al.'s recipe: the network switches of the local-loss blocks and the norm, which only the local estimators take
RECIPE_SWITCHES = ("block_size", "groups", "patches", "head_pool", "norm")


def global_model(model: str) -> str:
    """The model a variant's estimators without local losses train in fg-bench accuracy: its switches less the
    recipe's (``"mixer+residual+groups=16"`` -> ``"mixer+residual"``, ``"cnn+groups=8+norm"`` -> ``"cnn"``)."""
    base, *parts = model.split("+")
    return "+".join([base, *(part for part in parts if part.partition("=")[0] not in RECIPE_SWITCHES)])


def model_switches(model: str) -> tuple[str, dict[str, Any]]:
    """``"cnn+groups=8+norm"`` -> ``("cnn", {"groups": 8, "norm": True})``: a model and the switches of its network
    (``MLP``/``CNN`` arguments; a bare name is True)."""
    base, *parts = model.split("+")
    switches = {}
    for part in parts:
        key, _, value = part.partition("=")
        switches[key] = int(value) if value else True
    return base, switches


def build_network(model: str, estimator: str | GradientEstimator | None = None, seed: int = 0,
                  **kwargs: Any) -> Network:
    """``MLP`` / ``CNN`` (``model``, optionally with switches: ``"cnn+groups=8+norm"``) from ``seed``, so every case
    of a model starts from the same weights, with local loss heads (``local_losses=True``) only when ``estimator`` — a
    registry name, an instance, or a stock baseline's name (never) — needs them; without heads the recipe's switches
    are left out (:func:`global_model`), so that a variant's other estimators and baselines run its base model."""
    if isinstance(estimator, str):
        local = estimator not in STOCK and REGISTRY[registered(estimator)].needs_local_losses
    else:
        local = estimator is not None and estimator.needs_local_losses
    base, switches = model_switches(model)
    if local:
        kwargs["local_losses"] = True
    else:
        base, switches = model_switches(global_model(model))
    return (MODELS.get(base) or DEPTH_NETWORKS[base])(seed=seed, **switches, **kwargs)


def environment(device: torch.device) -> dict[str, Any]:
    """Where a measurement came from."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"device": device.type, "device_name": name, "torch": torch.__version__, "fg_lightning": fg_lightning.__version__,
            "threads": torch.get_num_threads()}


def make_batch(network: Network, batch_size: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, *network.input_shape, generator=gen)
    labels = torch.randint(0, network.num_classes, (batch_size,), generator=gen)
    return x.to(device), labels.to(device)


def torch_backend_runs(name: str) -> bool:
    """Whether the registered estimator ``name`` runs on the torch backend (its ``validate`` says so)."""
    probe = TorchNetwork(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2)))
    try:
        REGISTRY[name].make(1).validate(probe)
    except ValueError:
        return False
    return True


def cases(estimators: Sequence[str], directions: Sequence[int], torch_backend: bool = False) -> list[tuple[str, int | None]]:
    """``(name, k)`` for every estimator, once per ``k`` in ``directions`` for those that take one; with
    ``torch_backend``, then ``("torch:<name>", k)`` for those that run on the torch backend."""
    engine = [(name, k) for name in estimators for k in (directions if REGISTRY[name].takes_k else [None])]
    return engine + [(TORCH + name, k) for name, k in engine if torch_backend and torch_backend_runs(name)]


def compiled_cases(estimators: Sequence[str], directions: Sequence[int]) -> list[tuple[str, int | None]]:
    """``("compiled:<name>", k)`` for the estimators of :data:`COMPILED_ESTIMATORS` among ``estimators``."""
    return [(COMPILED + name, k) for name, k in cases([e for e in estimators if e in COMPILED_ESTIMATORS], directions)]


def estimator_step(network: Network, name: str, k: int | None) -> Callable[[torch.Tensor, torch.Tensor, int], Any]:
    """The training step of case ``name``: a stock baseline, an estimator on the engine, (``torch:<name>``) an
    estimator on the torch backend, i.e. on :func:`to_torch`'s twin wrapped in a TorchNetwork, or
    (``compiled:<name>``) the engine's step under torch.compile."""
    if name in STOCK:
        return stock_step(network, name)
    if name.startswith(TORCH):
        return engine_step(TorchNetwork(to_torch(network)), REGISTRY[registered(name)].make(k))
    return engine_step(network, REGISTRY[registered(name)].make(k), compiled=name.startswith(COMPILED))


def engine_step(network: Network, estimator: GradientEstimator, lr: float = 1e-6,
                compiled: bool = False) -> Callable[[torch.Tensor, torch.Tensor, int], Estimate]:
    """One training step exactly as ForwardGradientModule takes it: the estimate, then
    :func:`~fg_lightning.estimators.training_step` with plain SGD; ``compiled``: as with ``compile=True``
    (:class:`~fg_lightning.estimators.compiled.CompiledStep`; the first, warm-up steps compile it)."""
    optimizer, comm = torch.optim.SGD(network.parameters(), lr=lr), Collective()  # one process
    if compiled:
        torch._dynamo.reset()  # compiled afresh for each case: dynamo keeps 8 variants of a function per process
        compiled_step = CompiledStep(estimator, network)

        def step(x: torch.Tensor, labels: torch.Tensor, index: int) -> Estimate:
            return compiled_step(x, labels, index, optimizer, comm)

        return step

    def step(x: torch.Tensor, labels: torch.Tensor, index: int) -> Estimate:
        return training_step(estimator, network, x, labels, index, optimizer, comm)

    return step


def stock_step(network: Network, kind: str, lr: float = 1e-6) -> Callable[[torch.Tensor, torch.Tensor, int], Any]:
    """The stock-PyTorch baselines on the ``torch.nn`` twin with the same weights (torch.autograd is allowed here):
    ``stock_autograd`` (loss.backward()), ``stock_compiled`` (the same, torch.compile'd), ``stock_checkpointed`` (the
    same with activation checkpointing, ``torch.utils.checkpoint.checkpoint_sequential`` in √L segments of the L
    layers: only the segments' inputs are kept, each segment is run again in the backward pass) and
    ``stock_func_jvp`` (the naive forward gradient through ``torch.func.jvp``)."""
    model = to_torch(network)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    if kind in ("stock_autograd", "stock_compiled", "stock_checkpointed"):
        # dynamic=False: compiled for the one batch shape it is timed at (no recompilation for dynamic shapes)
        forward = torch.compile(model, dynamic=False) if kind == "stock_compiled" else model
        if kind == "stock_checkpointed":
            for module in model.modules():  # an in-place ReLU would change a segment's saved input
                if isinstance(module, torch.nn.ReLU):
                    module.inplace = False
            segments = max(1, round(math.sqrt(len(model))))
            forward = functools.partial(torch.utils.checkpoint.checkpoint_sequential, model, segments,
                                        use_reentrant=False)

        def step(x: torch.Tensor, labels: torch.Tensor, index: int) -> Any:
            loss = F.cross_entropy(forward(x), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        return step
    if kind != "stock_func_jvp":
        raise ValueError(f"unknown stock baseline {kind!r}; expected one of {STOCK}")
    names = [name for name, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    generator = torch.Generator(device=params[0].device).manual_seed(0)

    def step(x: torch.Tensor, labels: torch.Tensor, index: int) -> Any:
        def loss_of(*values: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(torch.func.functional_call(model, dict(zip(names, values)), (x,)), labels)

        tangents = tuple(torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype) for p in params)
        loss, dir_deriv = torch.func.jvp(loss_of, tuple(params), tangents)
        for param, tangent in zip(model.parameters(), tangents):
            param.grad = dir_deriv * tangent
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    step: Callable[[torch.Tensor, torch.Tensor, int], Any], x: torch.Tensor, labels: torch.Tensor,
    warmup: int, repeats: int, device: torch.device, first_index: int = 0,
) -> list[tuple[float, bool]]:
    """Milliseconds of each of ``repeats`` steps after ``warmup`` untimed ones, each synchronised, and whether the
    step also computed the exact gradient (``Estimate.exact``; nothing else of a step's result outlives it)."""
    for index in range(warmup):
        step(x, labels, first_index + index)
    sync(device)
    times = []
    for index in range(warmup, warmup + repeats):
        start = time.perf_counter()
        result = step(x, labels, first_index + index)
        sync(device)
        times.append(((time.perf_counter() - start) * 1e3, bool(getattr(result, "exact", False))))
        del result
    return times


def summary(ms: Sequence[float]) -> dict[str, float]:
    return {"ms_median": statistics.median(ms), "ms_min": min(ms), "ms_max": max(ms)}


def markdown_table(records: list[dict[str, Any]], columns: Sequence[str]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.3e}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in records]
    return "\n".join(lines) + "\n"


def write_report(out: str, name: str, records: list[dict[str, Any]], columns: Sequence[str], meta: dict[str, Any],
                 notes: str = "", table_records: list[dict[str, Any]] | None = None,
                 extra: dict[str, Any] | None = None) -> str:
    """``<out>/<name>.json`` (``{"meta": …, "records": […]}``, and ``extra``'s keys) and ``<out>/<name>.md`` (a table
    of ``table_records``, all records by default); returns the table."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump({"meta": meta, "records": records, **(extra or {})}, f, indent=1)
    table = markdown_table(records if table_records is None else table_records, columns)
    header = f"# fg-bench {name}\n\n{', '.join(f'{k}: {v}' for k, v in meta.items())}\n\n{notes}"
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(header + ("\n" if notes else "") + table)
    return table


def pyplot():
    """matplotlib's pyplot (Agg), or None when the ``bench`` extra is not installed (the JSON and tables still come)."""
    try:
        import matplotlib
    except ImportError:
        print("fg-bench: matplotlib is not installed (pip install 'fg-lightning[bench]'): no plots")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def panels_per_model(records: list[dict[str, Any]], height: float = 3.7):
    """``(plt, fig, [(axes, model), …])`` with one panel per model in ``records``, or None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    models = sorted({r["model"] for r in records})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), height), squeeze=False)
    return plt, fig, list(zip(axes[0], models))


def activation_sizes(network: Network, batch_size: int) -> list[tuple[str, int, int]]:
    """``(layer name, input numel, output numel)`` for each layer at this batch size (shapes only, no compute)."""
    sizes = []
    x = torch.empty(batch_size, *network.input_shape, device="meta")
    for name, layer in network.named_layers():
        y = _meta_forward(layer, x)
        sizes.append((name, x.numel(), y.numel()))
        x = y
    return sizes


def _meta_forward(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    import copy

    return copy.deepcopy(layer).to("meta")(x)


def tangent_flops(network: Network, batch_size: int) -> tuple[float, float]:
    """``(primal, tangent per direction)`` multiply-add FLOPs of the linear and conv layers of one forward-mode pass.

    The primal costs one product per layer; each direction costs the parameter-tangent product of every layer
    plus the input-tangent product of every layer but the first (whose input carries no tangent).
    """
    from fg_lightning.engine import Conv2d, Linear

    primal = tangent = 0.0
    first = True
    for (name, layer), (_, _, out_numel) in zip(network.named_layers(), activation_sizes(network, batch_size)):
        if isinstance(layer, Linear):
            cost = 2.0 * out_numel * layer.in_features
        elif isinstance(layer, Conv2d):
            cost = 2.0 * out_numel * layer.in_channels * layer.kernel_size**2
        else:
            continue
        primal += cost
        tangent += cost if first else 2 * cost
        first = False
    return primal, tangent


def real_data(args: Any, batch_size: int):
    """Real MNIST / Fashion-MNIST (``args.dataset``, ``root``, ``download``, ``val_size``) as a set-up
    :class:`MNISTDataModule`: ``train_dataloader()``, ``val_set``, ``test_set``."""
    from fg_lightning.data import MNISTDataModule

    data = MNISTDataModule(dataset=args.dataset, root=args.root, batch_size=batch_size, download=args.download,
                           val_size=args.val_size, pin_memory=False)
    data.setup("fit")
    return data


def real_batches(args: Any, batch_size: int):
    """``(train loader, validation set)`` of :func:`real_data`."""
    data = real_data(args, batch_size)
    return data.train_dataloader(), data.val_set


def evaluate(network: Network, dataset, device: torch.device) -> tuple[float, float]:
    """``(mean loss, accuracy)`` of ``network`` on a whole ``TensorDataset`` of images and labels, 2048 at a time
    (the engine's forward only)."""
    from fg_lightning.engine import cross_entropy

    images, labels = dataset.tensors
    with torch.no_grad():
        logits = torch.cat([network(images[i : i + 2048].to(device)) for i in range(0, len(images), 2048)])
    labels = labels.to(device)
    return float(cross_entropy(logits, labels)), float((logits.argmax(1) == labels).float().mean())


def _epochs(loader, epoch_steps: int | None):
    """Passes over ``loader``, each cut after ``epoch_steps`` batches; with ``epoch_steps``, pass ``e`` is shuffled as
    epoch ``e`` (``sampler.set_epoch``, as Lightning does), so every run sees the same batches in the same order."""
    for epoch in itertools.count():
        if epoch_steps is not None and hasattr(getattr(loader, "sampler", None), "set_epoch"):
            loader.sampler.set_epoch(epoch)
        yield itertools.islice(loader, epoch_steps)


def train(network: Network, estimator: GradientEstimator, lr: float, loader, steps: int, device: torch.device,
          validation=None, cosine_every: int = 0, epoch_steps: int | None = None,
          scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
          on_point: Callable[[float, int, float], None] | None = None, points_per_epoch: int = 1) -> dict[str, Any]:
    """Plain SGD with ``estimator`` for ``steps`` steps, through the same
    :func:`~fg_lightning.estimators.training_step` as ForwardGradientModule, stopping at the first non-finite loss or
    update. Returns the losses; every ``cosine_every`` steps the cosine to the exact gradient and the gain ĝ·g/|g|²
    (the step taken along g per unit of learning rate); validation accuracy and loss at the end; where it
    diverged; and ``train_s``, the seconds spent in the steps (batches included, ``on_epoch_end`` not).

    Without ``epoch_steps`` it cycles over ``loader`` in the loader's one order (as the short runs of ``stability``
    and ``momentum`` always have). With it, training goes in epochs of ``epoch_steps`` steps (fewer if the loader
    runs out first), each shuffled as its epoch. ``on_point(epochs so far, steps so far, train_s so far)`` follows
    every completed epoch and, with ``points_per_epoch`` P > 1 (and ``epoch_steps``), the steps ``round(j ·
    epoch_steps / P)`` of each epoch too (``epochs so far``: ``epoch + steps in it / epoch_steps``), for accuracy
    against time at a finer resolution than an epoch. ``scheduler(optimizer)`` builds a learning-rate scheduler,
    stepped after every step."""
    from fg_lightning.estimators import DivergenceError

    optimizer, comm = torch.optim.SGD(network.parameters(), lr=lr), Collective()  # one process
    schedule = scheduler(optimizer) if scheduler is not None else None
    losses: list[float] = []
    cosines: list[tuple[int, float, float, bool]] = []  # (step, cosine, gain ĝ·g/|g|², exact gradient computed?)
    diverged_at = None
    if points_per_epoch < 1 or (points_per_epoch > 1 and epoch_steps is None):
        raise ValueError(f"points_per_epoch must be 1, or more with epoch_steps, got {points_per_epoch}")
    # the steps within an epoch after which a point falls (the epoch's end has its own)
    points = ({round(j * epoch_steps / points_per_epoch) for j in range(1, points_per_epoch)} - {0, epoch_steps}
              if epoch_steps else set())
    index, seconds, start = 0, 0.0, time.perf_counter()

    def point(epochs: float) -> None:
        nonlocal seconds, start
        sync(device)
        seconds += time.perf_counter() - start
        on_point(epochs, index, seconds)
        start = time.perf_counter()

    for epoch, batches in enumerate(_epochs(loader, epoch_steps)):
        taken = index
        for x, labels in batches:
            if index == steps:
                break
            x, labels = x.to(device), labels.to(device)
            exact = (estimator.exact_gradient(network, x, labels)  # what it estimates: LocalBackprop's for the local ones
                     if cosine_every and index % cosine_every == 0 else None)
            try:
                estimate = training_step(estimator, network, x, labels, index, optimizer, comm,
                                         keep_estimate=exact is not None)
            except DivergenceError:
                diverged_at = index
                break
            if exact is not None:  # the estimate of the step just taken, against the gradient before it
                projection = sum(float((estimate.grads[n] * g).sum()) for n, g in exact.items())
                gain = projection / sum(float(g.square().sum()) for g in exact.values())
                cosines.append((index, cosine(estimate.grads, exact), gain, estimate.exact))
            if schedule is not None:
                schedule.step()
            losses.append(float(estimate.loss))
            index += 1
            if on_point is not None and index - taken in points:
                point(epoch + (index - taken) / epoch_steps)
        else:
            if index == taken:
                raise ValueError("the training loader gave no batch")
            if on_point is not None:
                point(epoch + 1)
        if index == steps or diverged_at is not None:
            if on_point is not None and epoch_steps and diverged_at is None and 0 < index - taken < epoch_steps \
                    and index - taken not in points:  # a run that ends within an epoch ends with a point too
                point(epoch + (index - taken) / epoch_steps)
            break
    sync(device)
    seconds += time.perf_counter() - start
    result: dict[str, Any] = {"losses": losses, "cosines": cosines, "diverged": diverged_at is not None,
                              "diverged_at": diverged_at, "steps": len(losses), "train_s": seconds}
    if validation is not None and diverged_at is None:
        result["val_loss"], result["val_acc"] = evaluate(network, validation, device)
    return result
