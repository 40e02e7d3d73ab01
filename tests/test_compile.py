"""The compiled step (``ForwardGradientModule(compile=True)``, ``CompiledStep``) against eager, the reference: every
registered estimator that compiles takes eager's steps (the same parameters, float tolerance, the same seed) without
compiling again step after step; every other one is refused in one line before training.

The equality runs on ``backend="aot_eager"`` (dynamo's graphs and their decompositions, without inductor's C++ code
generation, which takes 10-20 s per graph on two cores); one test per network kind and the module's switch run the
default inductor backend."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from fg_lightning.bench.common import compiled_cases, estimator_step, time_steps
from fg_lightning.engine import CNN, MLP
from fg_lightning.estimators import REGISTRY, DivergenceError, training_step
from fg_lightning.estimators.collective import Collective
from fg_lightning.estimators.compiled import CompiledStep
from fg_lightning.module import ForwardGradientModule

COMPILES = [name for name, spec in REGISTRY.items() if spec.make(k=2).compile_refusal() is None]
REFUSED = [name for name in REGISTRY if name not in COMPILES]
CNN_CASES = ["backprop", "naive", "input_qr", "activity", "local_weight"]  # a few per kind of pass, where cheap


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each case compiles from scratch: dynamo keeps 8 variants of a function, and a test run compiles many."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def tiny(model, name):
    local = REGISTRY[name].needs_local_losses
    if model == "mlp":
        return MLP(in_features=12, hidden=(16, 8), num_classes=4, seed=0, local_losses=local)
    return CNN(in_channels=1, image_size=8, channels=(4, 4), hidden=8, num_classes=4, seed=0, local_losses=local)


def batches(network, steps, seed=2):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, *network.input_shape, generator=generator),
             torch.randint(0, 4, (6,), generator=generator)) for _ in range(steps)]


def train(model, name, compiled, steps=4, backend=None):
    """Parameters after ``steps`` SGD steps (eager, or compiled on ``backend``), and the compiled frames per step."""
    network = tiny(model, name)
    estimator = REGISTRY[name].make(k=2, seed=1)
    optimizer = torch.optim.SGD(network.parameters(), lr=REGISTRY[name].training.lr)
    comm = Collective()
    step_fn = CompiledStep(estimator, network, backend=backend) if compiled else None
    frames = []
    for index, (x, labels) in enumerate(batches(network, steps)):
        if step_fn is None:  # the estimate kept, as the compiled step keeps it (applied as formed, activity
            # perturbation would send its gradient in one all-reduce per layer: the same parameters, test_update_as_formed)
            training_step(estimator, network, x, labels, index, optimizer, comm, keep_estimate=True)
        else:
            step_fn(x, labels, index, optimizer, comm)
        frames.append(counters["frames"]["total"])
    return dict(network.named_parameters()), frames, comm.bytes


def assert_same_steps(model, name, backend, rtol=1.3e-6, atol=1e-5):
    initial = dict(tiny(model, name).named_parameters())
    eager, _, eager_bytes = train(model, name, compiled=False)
    compiled, frames, compiled_bytes = train(model, name, compiled=True, backend=backend)
    assert frames[0] > 0, "nothing was compiled"
    assert frames[-1] == frames[1], f"{name} compiled again after its first steps: {frames}"
    assert compiled_bytes == eager_bytes  # the communicator still counts what a step would send
    for param, value in eager.items():
        assert not torch.equal(value, initial[param]), f"{param} did not move: nothing to compare"
        torch.testing.assert_close(compiled[param], value, rtol=rtol, atol=atol, msg=f"{name} {model}: {param}")


@pytest.mark.parametrize("name", COMPILES)
def test_compiled_steps_take_the_eager_steps_on_the_mlp(name):
    counter = CompileCounterWithBackend("aot_eager")
    assert_same_steps("mlp", name, counter)
    assert counter.frame_count > 0 and counter.op_count > 0


@pytest.mark.parametrize("name", [name for name in CNN_CASES if name in COMPILES])
def test_compiled_steps_take_the_eager_steps_on_the_cnn(name):
    assert_same_steps("cnn", name, "aot_eager")


@pytest.mark.parametrize("name", ["backprop", "naive"])
def test_inductor_takes_the_eager_steps(name):
    assert_same_steps("mlp", name, "inductor", rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", REFUSED)
def test_an_estimator_that_cannot_compile_is_refused_in_one_line_as_the_module_is_built(name):
    network, estimator = tiny("mlp", name), REGISTRY[name].make(k=2)
    with pytest.raises(ValueError) as info:
        ForwardGradientModule(network, estimator, compile=True)
    line = str(info.value)
    assert "\n" not in line and type(estimator).__name__ in line and "compile" in line, line
    ForwardGradientModule(network, estimator)  # eager trains it


def test_the_torch_backend_is_refused_in_one_line():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    with pytest.raises(ValueError, match=r"^compile=True compiles the engine's hand-written step; [^\n]*TorchNetwork"):
        ForwardGradientModule(model, REGISTRY["naive"].make(), compile=True)


def test_a_non_finite_estimate_raises_before_any_parameter_changes():
    network = tiny("mlp", "naive")
    before = {name: p.clone() for name, p in network.named_parameters()}
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    step_fn = CompiledStep(REGISTRY["naive"].make(), network, backend="aot_eager")
    x, labels = batches(network, 1)[0]
    x[0, 0] = float("nan")
    with pytest.raises(DivergenceError, match="non-finite loss"):
        step_fn(x, labels, 0, optimizer, Collective())
    for name, p in network.named_parameters():
        assert torch.equal(p, before[name])


class _Batches(pl.LightningDataModule):
    def __init__(self, network):
        super().__init__()
        x, labels = zip(*batches(network, 3))
        self.data = torch.utils.data.TensorDataset(torch.cat(x), torch.cat(labels))

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.data, batch_size=6)


def test_module_compile_switch_trains_as_eager(tmp_path):
    """``ForwardGradientModule(compile=True)`` under a Trainer, with the default (inductor) backend."""
    params = []
    for compile in (False, True):
        network = tiny("mlp", "backprop")
        module = ForwardGradientModule(network, REGISTRY["backprop"].make(), lambda p: torch.optim.SGD(p, lr=0.1),
                                       compile=compile)
        trainer = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=tmp_path)
        trainer.fit(module, datamodule=_Batches(network))
        params.append(dict(network.named_parameters()))
    for name, value in params[0].items():
        torch.testing.assert_close(params[1][name], value, rtol=1e-5, atol=1e-6)


def test_fg_bench_times_the_compiled_engine_beside_eager():
    assert compiled_cases(["backprop", "momentum", "naive", "partition"], [1, 4]) == [
        ("compiled:backprop", None), ("compiled:naive", None)]
    network = tiny("mlp", "backprop")
    x, labels = batches(network, 1)[0]
    timed = time_steps(estimator_step(network, "compiled:backprop", None), x, labels, 2, 2, torch.device("cpu"))
    assert len(timed) == 2 and counters["frames"]["total"] > 0
