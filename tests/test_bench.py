"""fg-bench: every subcommand at tiny sizes writes its JSON, table and plots, with the stock baselines present.
The timings themselves are not asserted."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from idx_files import write_idx

from fg_lightning.bench.cli import main as fg_bench
from fg_lightning.bench.common import environment, tangent_flops
from fg_lightning.bench.memory import forward_bound_mb
from fg_lightning.bench.suite import Budget, slug
from fg_lightning.engine import CNN, MLP
from fg_lightning.estimators import REGISTRY

# matplotlib comes with the bench extra only; without it the subcommands write no PNG and everything else.
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def idx_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(1)
    labels, test_labels = rng.integers(0, 10, 80).astype(np.uint8), rng.integers(0, 10, 16).astype(np.uint8)
    images = rng.integers(0, 255, (80, 28, 28)).astype(np.uint8)
    write_idx(root, images, labels, images[:16], test_labels)
    return str(root)


def load(out, name):
    with open(os.path.join(out, f"{name}.json")) as f:
        report = json.load(f)
    assert {"device", "torch"} <= set(report["meta"])
    assert os.path.isfile(os.path.join(out, f"{name}.md"))
    return report["records"]


def assert_plot(out, name):
    assert os.path.isfile(os.path.join(out, f"{name}.png")) == HAS_MATPLOTLIB


def test_speed(tmp_path, capsys):
    out = str(tmp_path)
    fg_bench(["speed", "--device", "cpu", "--out", out, "--models", "mlp", "cnn", "--batch-sizes", "4",
              "--directions", "1", "2", "--warmup", "1", "--repeats", "2", "--no-compile"])
    records = load(out, "speed")
    assert "| stock_autograd |" in capsys.readouterr().out
    for model in ("mlp", "cnn"):
        names = {r["estimator"] for r in records if r["model"] == model}
        assert {"stock_autograd", "stock_func_jvp", *REGISTRY} <= names
        autograd = [r for r in records if r["model"] == model and r["estimator"] == "stock_autograd"]
        assert len(autograd) == 1 and autograd[0]["ratio_vs_autograd"] == 1.0
    for record in records:
        assert {"model", "batch_size", "estimator", "ms_median", "ms_min", "ms_max", "ratio_vs_autograd"} <= set(record)
        assert 0 < record["ms_min"] <= record["ms_median"] <= record["ms_max"]
    k2 = [r for r in records if r["estimator"] == "multi_direction" and r["k"] == 2]
    assert all("ratio_vs_k1" in r and r["flop_bound_vs_k1"] > 1 for r in k2)
    assert_plot(out, "speed")


def test_memory(tmp_path):
    out = str(tmp_path)
    fg_bench(["memory", "--device", "cpu", "--out", out, "--models", "mlp", "--batch-sizes", "64",
              "--estimators", "backprop", "naive", "--directions", "1", "--no-compile"])
    records = load(out, "memory")
    assert [r["estimator"] for r in records] == ["stock_autograd", "stock_func_jvp", "backprop", "naive"]
    for record in records:
        assert "error" not in record, record
        assert {"peak_mb", "ratio_vs_autograd", "method"} <= set(record) and record["peak_mb"] > 0
    assert_plot(out, "memory")


def test_quality_stability_momentum_on_idx_files(tmp_path, idx_root):
    out = str(tmp_path)
    data = ["--dataset", "mnist", "--root", idx_root, "--no-download", "--batch-sizes", "8", "--val-size", "16"]
    fg_bench(["quality", "--device", "cpu", "--out", out, "--models", "mlp", "--draws", "2", "--directions", "2", *data])
    quality = load(out, "quality")
    overall = {r["estimator"]: r for r in quality if r["param"] == "all"}
    assert set(overall) == set(REGISTRY)
    assert overall["backprop"]["cosine_mean"] == pytest.approx(1.0) and overall["backprop"]["gain"] == pytest.approx(1.0)
    assert {r["param"] for r in quality} >= {"fc1.weight", "fc3.bias"}
    assert_plot(out, "quality_mlp")

    fg_bench(["stability", "--device", "cpu", "--out", out, "--models", "mlp", "--estimators", "backprop", "naive",
              "--steps", "3", "--lrs", "1e-3", "1e6", *data])
    stability = load(out, "stability")
    assert [(r["estimator"], r["lr"], r["diverged"]) for r in stability] == [
        ("backprop", 1e-3, False), ("backprop", 1e6, True), ("naive", 1e-3, False), ("naive", 1e6, True)]
    assert "Largest learning rate" in open(os.path.join(out, "stability.md")).read()

    fg_bench(["momentum", "--device", "cpu", "--out", out, "--models", "mlp", "--steps", "3", "--cosine-every", "1",
              *data])
    momentum = load(out, "momentum")
    assert [r["run"] for r in momentum][:2] == ["backprop", "naive"]
    assert any(r["run"].startswith("momentum decay=1.0 shuffle=0.0") for r in momentum)
    assert all(len(r["losses"]) == 3 and len(r["cosines"]) == 3 for r in momentum)
    decay_1 = [r for r in momentum if r["run"].startswith("momentum decay=1.0")][0]
    assert decay_1["cosine_checkpoint"] > 0.5 and decay_1["gain_checkpoint"] > 1  # step 0 is a checkpoint
    assert_plot(out, "momentum_mlp")


def test_missing_data_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        fg_bench(["quality", "--device", "cpu", "--out", str(tmp_path), "--dataset", "mnist", "--root",
                  str(tmp_path / "none"), "--no-download"])


def test_flop_and_memory_bounds():
    primal, tangent = tangent_flops(MLP(), 256)
    # the MLP: primal ≈ 2 big matmuls, each direction ≈ 3 (the (2 + 3K)/5 rule)
    assert (primal + 4 * tangent) / (primal + tangent) == pytest.approx((2 + 3 * 4) / 5, rel=0.03)
    assert forward_bound_mb(CNN(), 1024, 1) > forward_bound_mb(CNN(), 256, 1)


def test_all_tiny_preset(tmp_path, capsys):
    out = str(tmp_path / "run")
    fg_bench(["all", "--preset", "tiny", "--device", "cpu", "--out", out])
    printed = capsys.readouterr().out
    assert "fg-bench speed [1/" in printed and f"the results are in {out}/" in printed
    for name in ("speed", "memory"):
        records = load(out, name)
        assert not [r for r in records if "error" in r]
        for model in ("mlp", "cnn"):
            names = {r["estimator"] for r in records if r["model"] == model}
            assert set(REGISTRY) | {"stock_autograd", "stock_func_jvp"} <= names, (name, model)
            ks = {r["k"] for r in records if r["model"] == model and r["estimator"] == "multi_direction"}
            assert ks == {1, 2}
        assert_plot(out, name)
    readme = open(os.path.join(out, "README.md")).read()
    assert f"fg-bench all --preset tiny --device cpu --out {out}" in readme
    assert environment(torch.device("cpu"))["device_name"] in readme and torch.__version__ in readme
    assert "wall time:" in readme


def test_all_time_limit_skips_the_rest(tmp_path):
    out = str(tmp_path)
    fg_bench(["all", "--preset", "tiny", "--device", "cpu", "--out", out, "--time-limit", "0"])
    for name in ("speed", "memory"):
        records = load(out, name)
        assert records and all(r["error"] == "skipped: time limit of 0 s reached" for r in records)
    assert "0 measured" in open(os.path.join(out, "README.md")).read()


def test_budget_skips_what_does_not_fit_and_records_failures(capsys):
    budget = Budget()
    budget.phase("speed", 2)
    cpu = torch.device("cpu")
    assert budget.run("huge", lambda: 1, cpu, need_bytes=10**18)[1].startswith("skipped: would need at least 1000000000.0 GB")

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 26.00 GiB\nmore lines")

    assert budget.run("oom", oom, cpu) == (None, "OutOfMemoryError: CUDA out of memory. Tried to allocate 26.00 GiB")
    assert "fg-bench speed: huge: skipped: would need at least" in capsys.readouterr().out
    assert slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
