"""``fg-bench comm``: bytes each process sends per data-parallel step (``fg_ddp``), per estimator, beside the
``n · 4`` bytes of the float32 gradient that stock DDP all-reduces every step.

Counted by a single-process :class:`~fg_lightning.estimators.collective.Collective` passed to each estimate, which
counts what the same calls send across processes, over two steps (``--steps``) so that the momentum estimator shows a
checkpoint step and a forward-mode step. What depends on the batch (the layer inputs gathered by the
input-generated estimators) is for the per-process batch size given.
"""

from __future__ import annotations

from typing import Any

import torch

from fg_lightning.bench.common import build_network, cases, environment, make_batch, write_report
from fg_lightning.estimators import REGISTRY, num_parameters
from fg_lightning.estimators.collective import Collective

COLUMNS = ["model", "estimator", "k", "batch_size", "bytes_per_step", "bytes_each_step", "gradient_bytes", "ratio"]


def measure(models: list[str], estimators: list[str], directions: list[int], batch_sizes: list[int],
            device: torch.device, steps: int = 2) -> list[dict[str, Any]]:
    records = []
    for model in models:
        for batch_size in batch_sizes:
            for name, k in cases(estimators, directions):
                network = build_network(model, name).to(device)
                estimator = REGISTRY[name].make(k)
                x, labels = make_batch(network, batch_size, device)
                comm, sent = Collective(), []
                for step in range(steps):
                    before = comm.bytes
                    estimator.estimate(network, x, labels, step, comm)
                    sent.append(comm.bytes - before)
                gradient = 4 * num_parameters(network)
                records.append({"model": model, "estimator": name, "k": k, "batch_size": batch_size,
                                "bytes_per_step": max(sent), "bytes_each_step": sent, "gradient_bytes": gradient,
                                "ratio": round(max(sent) / gradient, 7)})
    return records


def run(args: Any) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    records = measure(args.models, args.estimators, args.directions, args.batch_sizes, device, args.steps)
    meta = {**environment(device), "steps": args.steps}
    table = write_report(args.out, "comm", records, COLUMNS, meta,
                         "Bytes each process sends into collectives per step under `fg_ddp` (the most over "
                         f"{args.steps} steps), against the float32 gradient's `n · 4` bytes that DDP all-reduces; "
                         "`ratio` = bytes_per_step / gradient_bytes. Float32 parameters.\n")
    print(table)
    return records
