"""Every registered estimator under data parallelism, without Lightning: run as one of ``WORLD_SIZE`` gloo processes
(``python ddp_worker.py <out file>`` with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` set), it trains
each estimator a few steps on this rank's share of fixed union batches, through ``training_step`` as the module trains
(activity perturbation applying each layer's update as it forms it, one all-reduce per layer), and saves the
parameters and the bytes communicated; ``test_distributed.py`` runs the same :func:`train` in one process on the union batches and compares.
"""

from __future__ import annotations

import sys

import torch

from fg_lightning.engine import CNN, MLP, to_torch
from fg_lightning.estimators import REGISTRY, training_step
from fg_lightning.estimators.collective import Collective, TorchCollective
from fg_lightning.torch_network import TorchNetwork

UNION_SIZES = (12, 12, 9)  # the last union batch splits 5 + 4: unequal shares, weighted means
MODELS = ("mlp", "cnn", "torch_cnn")  # torch_cnn: the CNN's to_torch twin on the torch backend
K = 3


def make(name: str, model: str):
    spec = REGISTRY[name]
    local = spec.needs_local_losses
    if model == "mlp":
        network = MLP(in_features=12, hidden=(10, 8), num_classes=4, seed=1, local_losses=local)
    else:
        network = CNN(image_size=8, channels=(2, 3, 3), hidden=6, num_classes=4, seed=1, local_losses=local)
    kwargs = {"fix_gap": 2, "decrease_gap": 2} if name == "momentum" else {}
    estimator = spec.make(k=K, seed=7, **kwargs)
    network = network.double()
    return (TorchNetwork(to_torch(network)) if model == "torch_cnn" else network), estimator


def cases() -> list[tuple[str, str]]:
    """Every estimator on both engine networks, and those that run on the torch backend on the CNN's twin."""
    return [(name, model) for name, spec in REGISTRY.items() for model in MODELS
            if model != "torch_cnn" or not spec.needs_local_losses]


def union_batches(model: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    shape = (12,) if model == "mlp" else (1, 8, 8)  # the CNN and its twin
    return [(torch.randn(size, *shape, generator=generator, dtype=torch.float64),
             torch.randint(0, 4, (size,), generator=generator)) for size in UNION_SIZES]


def shard(batch: tuple[torch.Tensor, torch.Tensor], rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(t.tensor_split(world_size)[rank] for t in batch)  # as EpochPermutation splits a short union batch


def train(name: str, model: str, comm: Collective, rank: int = 0, world_size: int = 1, made=None) -> dict:
    """``made``: ``make(name, model)``'s network and estimator, built beforehand (ranks that are threads: a network's
    initialisation draws from the global RNG)."""
    network, estimator = made or make(name, model)
    exact = estimator.exact_gradient(network, *shard(union_batches(model)[0], rank, world_size), comm)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.05)
    losses, sent = [], []
    for step, batch in enumerate(union_batches(model)):
        x, labels = shard(batch, rank, world_size)
        before = comm.bytes
        estimate = training_step(estimator, network, x, labels, step, optimizer, comm)
        sent.append(comm.bytes - before)
        losses.append(float(estimate.loss))
    return {"params": {n: p.detach().clone() for n, p in network.named_parameters()}, "losses": losses,
            "bytes": sent, "n": sum(p.numel() for p in network.parameters()), "exact": exact}


def main(out: str) -> None:
    torch.distributed.init_process_group("gloo")
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    comm = TorchCollective()
    results = {(name, model): train(name, model, comm, rank, world_size) for name, model in cases()}
    torch.save(results, out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
