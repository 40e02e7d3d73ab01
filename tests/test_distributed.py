"""Data parallelism: every estimator on two gloo processes takes the update of one process on the union batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from ddp_worker import K, MODELS, make, train
from fg_lightning.data import EpochPermutation
from fg_lightning.estimators import REGISTRY
from fg_lightning.estimators.collective import Collective

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(argv: list[str], world_size: int = 2, timeout: int = 600, cwd: str = HERE) -> list[str]:
    """Run ``argv`` once per rank with torch.distributed's environment; fail with every rank's output."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": HERE}
        procs.append(subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{output[-3000:]}"
    return outputs


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    outs = [str(folder / f"rank{rank}.pt") for rank in range(2)]
    port = free_port()
    procs = []
    for rank, out in enumerate(outs):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "ddp_worker.py"), out], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for rank, proc in enumerate(procs):
        output = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, f"rank {rank} failed:\n{output[-3000:]}"
    return [torch.load(out, weights_only=False) for out in outs]


CASES = [(name, model) for name in REGISTRY for model in MODELS]


@pytest.mark.parametrize("name, model", CASES)
def test_two_ranks_take_the_union_batch_update(name, model, two_ranks):
    """Both ranks end with identical parameters (the same all-reduced update), equal to one process trained on the
    union of their batches (float64), over three steps whose last union batch splits unevenly (5 + 4)."""
    rank0, rank1 = (results[name, model] for results in two_ranks)
    single = train(name, model, Collective())
    for param, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][param]), f"{param} differs between the ranks"
        torch.testing.assert_close(value, single["params"][param], rtol=1e-9, atol=1e-12, msg=param)
    assert rank0["losses"] == rank1["losses"]
    torch.testing.assert_close(rank0["losses"], single["losses"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["naive", "multi_direction", "orthogonal", "partition", "local_weight"])
def test_random_directions_send_k_derivatives_the_loss_and_the_batch_size(name, two_ranks):
    for model in MODELS:
        sent = two_ranks[0][name, model]["bytes"]
        k = 1 if name == "naive" else K
        blocks = len(make(name, model)[0].block_parameters()) if name == "local_weight" else 1  # and local loss
        assert sent == [(k * blocks + 2) * 8] * len(sent)  # float64


@pytest.mark.parametrize("name", ["backprop", "local_backprop", "activity"])
def test_gradient_estimators_send_the_gradient(name, two_ranks):
    for model in MODELS:
        result = two_ranks[0][name, model]
        extra = 8 if name == "activity" else 0  # activity also asks where its rows are in the union batch
        assert result["bytes"] == [(result["n"] + 2) * 8 + extra] * 3


def test_input_generated_estimators_send_the_layer_inputs(two_ranks):
    for name in ("input_qr", "input_approx"):
        # MLP 12-10-8-4: the inputs of its three linear layers, 6 rows each on rank 0, and the batch size with each
        assert two_ranks[0][name, "mlp"]["bytes"][0] == 6 * (12 + 10 + 8) * 8 + 3 * 8 + (1 + 2) * 8


def shards(size, batch_size, world_size, seed=0, epoch=0):
    samplers = [EpochPermutation(size, seed, batch_size, world_size, rank) for rank in range(world_size)]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    return [list(sampler) for sampler in samplers]


@pytest.mark.parametrize("size, batch_size, world_size", [(100, 8, 2), (101, 8, 2), (97, 5, 3), (64, 8, 4)])
def test_sharded_order_is_the_union_batches_of_one_process(size, batch_size, world_size):
    """Each step's batches of the ranks, concatenated in rank order, are the batch of one process with
    world_size × batch_size; every index is seen once; every rank has the same number of batches."""
    single = shards(size, batch_size * world_size, 1)[0]
    ranks = shards(size, batch_size, world_size)
    batches = [[r[i : i + batch_size] for i in range(0, len(r), batch_size)] for r in ranks]
    assert len({len(b) for b in batches}) == 1, "the ranks have different numbers of batches"
    union = [sum((b[step] for b in batches), []) for step in range(len(batches[0]))]
    unions_single = [single[i : i + batch_size * world_size] for i in range(0, len(single), batch_size * world_size)]
    rest = size % (batch_size * world_size)
    if 0 < rest < world_size:  # too short to split: left out of this epoch
        unions_single = unions_single[:-1]
    assert union == unions_single
    assert sorted(sum(ranks, [])) == sorted(sum(unions_single, []))
    assert [len(sampler) for sampler in (EpochPermutation(size, 0, batch_size, world_size, r)
                                         for r in range(world_size))] == [len(r) for r in ranks]


def test_one_process_order_is_unchanged_by_sharding():
    generator = torch.Generator().manual_seed(5 * 1_000_003 + 2)
    assert shards(50, 7, 1, seed=5, epoch=2)[0] == torch.randperm(50, generator=generator).tolist()
