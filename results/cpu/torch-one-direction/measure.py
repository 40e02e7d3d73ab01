"""Peak memory above rest and step time of one MultiDirection step on the torch backend (ViT width 384, batch 50),
each case in a fresh process with glibc's mmap threshold pinned (fg_lightning.bench.memory's method):

    python results/cpu/torch-one-direction/measure.py            # every case, a table
    python results/cpu/torch-one-direction/measure.py 4 replayed # one case, JSON (what the table's processes run)
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch


def case(k: int, tangents: str, steps: int = 3) -> dict:
    from fg_lightning.bench.memory import reset_peak_rss, status_mb
    from fg_lightning.estimators import MultiDirection
    from fg_lightning.estimators.base import training_step
    from fg_lightning.estimators.collective import Collective
    from fg_lightning.models import ViT
    from fg_lightning.torch_network import TorchNetwork

    torch.set_num_threads(2)
    torch.manual_seed(0)
    network = TorchNetwork(ViT(hidden_dim=384, num_layers=6, num_heads=6, mlp_dim=1536))
    estimator = MultiDirection(k=k, tangents=tangents, seed=0)
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-6)  # plain SGD: the update applied as it is formed
    generator = torch.Generator().manual_seed(0)

    def batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(size, 1, 28, 28, generator=generator), torch.randint(0, 10, (size,), generator=generator)

    training_step(estimator, network, *batch(2), 0, optimizer, Collective())  # warm-up, the forward-mode check
    x, labels = batch(50)
    gc.collect()
    resting = reset_peak_rss()
    start = time.perf_counter()
    training_step(estimator, network, x, labels, 1, optimizer, Collective())
    times = [time.perf_counter() - start]
    peak = max(status_mb("VmHWM") - resting, 0.0)
    for index in range(steps - 1):
        start = time.perf_counter()
        training_step(estimator, network, x, labels, 2 + index, optimizer, Collective())
        times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in network.parameters())
    return {"k": k, "tangents": tangents, "above_rest_mb": round(peak, 1), "params_mb": round(4 * params / 2**20, 1),
            "step_s": round(statistics.median(times), 3)}


def main() -> None:
    if len(sys.argv) == 3:
        print(json.dumps(case(int(sys.argv[1]), sys.argv[2])))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    print("| k | tangents | above rest (MiB) | params (MiB) | step (s, median of 3) |")
    print("|---|---|---|---|---|")
    for k in (1, 4, 8):
        for tangents in ("stored", "replayed"):
            done = subprocess.run([sys.executable, __file__, str(k), tangents], env=env, capture_output=True,
                                  text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"| {row['k']} | {row['tangents']} | {row['above_rest_mb']} | {row['params_mb']} | {row['step_s']} |",
                  flush=True)


if __name__ == "__main__":
    main()
