"""fg-bench: every subcommand at tiny sizes writes its JSON, table and plots, with the stock baselines present.
The timings themselves are not asserted."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from idx_files import learnable_idx, write_idx

from fg_lightning.bench import common
from fg_lightning.bench import accuracy
from fg_lightning.bench.accuracy import accuracy_at_time, at_backprop_time, lr_grid, pick, search, seed_loader
from fg_lightning.bench.cli import main as fg_bench
from fg_lightning.bench.common import activation_sizes, build_network, environment, tangent_flops, train
from fg_lightning.bench.memory import forward_bound_mb
from fg_lightning.bench.budget import Budget, slug
from fg_lightning.bench.depth import ESTIMATORS as DEPTH_ESTIMATORS
from fg_lightning.engine import CNN, MLP
from fg_lightning.estimators import REGISTRY

# matplotlib comes with the bench extra only; without it the subcommands write no PNG and everything else.
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def random_idx_root(tmp_path_factory):
    """80 random (unlearnable) 28x28 images and 16 test ones: what the benches time, not what they learn."""
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
        on_torch = {name[len("torch:"):] for name in names if name.startswith("torch:")}
        assert on_torch == {n for n, s in REGISTRY.items() if not s.needs_local_losses}
        autograd = [r for r in records if r["model"] == model and r["estimator"] == "stock_autograd"]
        assert len(autograd) == 1 and autograd[0]["ratio_vs_autograd"] == 1.0
    for record in records:
        assert {"model", "batch_size", "estimator", "ms_median", "ms_min", "ms_max", "ratio_vs_autograd"} <= set(record)
        assert 0 < record["ms_min"] <= record["ms_median"] <= record["ms_max"]
    k2 = [r for r in records if r["estimator"] == "multi_direction" and r["k"] == 2]
    assert all("ratio_vs_k1" in r and r["flop_bound_vs_k1"] > 1 for r in k2)
    assert_plot(out, "speed")


def test_speed_times_a_recipe_variant_against_its_base_models_backprop(tmp_path):
    """``--models cnn+groups=2+norm+head_pool=2``: the local estimators on the variant, backprop and the stock
    baselines on the plain CNN, as fg-bench accuracy trains them."""
    out = str(tmp_path)
    fg_bench(["speed", "--device", "cpu", "--out", out, "--models", "cnn+groups=2+norm+head_pool=2", "--batch-sizes",
              "4", "--estimators", "backprop", "local_activity", "--directions", "2", "--warmup", "1", "--repeats", "2",
              "--no-compile", "--no-torch-backend", "--interleave"])
    records = {r["estimator"]: r for r in load(out, "speed")}
    assert {"stock_autograd", "backprop", "local_activity"} <= set(records)
    assert {r["model"] for r in records.values()} == {"cnn+groups=2+norm+head_pool=2"}
    assert records["local_activity"]["ratio_vs_autograd"] > 0
    assert json.load(open(os.path.join(out, "speed.json")))["meta"]["interleave"] is True


def test_interleaved_timing_takes_one_step_of_each_case_in_turn():
    from fg_lightning.bench.speed import time_in_turn

    calls = []
    steps = [lambda x, labels, index, name=name: calls.append((name, index)) for name in "ab"]
    times = time_in_turn(steps, torch.zeros(1), torch.zeros(1), warmup=1, repeats=2, device=torch.device("cpu"))
    assert calls == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert [len(t) for t in times] == [2, 2] and all(ms >= 0 and exact is False for t in times for ms, exact in t)


def test_speed_quick_preset(tmp_path):
    """--quick: the MLP at batch 256, one and four directions, 5 repeats, whatever --models / --batch-sizes said."""
    out = str(tmp_path)
    fg_bench(["speed", "--quick", "--device", "cpu", "--out", out, "--models", "cnn", "--estimators", "naive",
              "multi_direction", "--no-compile", "--no-torch-backend"])
    records = load(out, "speed")
    assert {(r["model"], r["batch_size"]) for r in records} == {("mlp", 256)}
    assert {r["k"] for r in records if r["estimator"] == "multi_direction"} == {1, 4}
    assert json.load(open(os.path.join(out, "speed.json")))["meta"]["repeats"] == 5


QUICK_OPTIONS = {
    "speed": dict(models=["mlp"], batch_sizes=[256], directions=[1, 4], warmup=2, repeats=5),
    "memory": dict(models=["mlp"], batch_sizes=[256], directions=[1, 4], compile=False, torch_backend=False),
    "depth": dict(models=["mlp", "cnn"], depths=[2, 8], width=256, batch_size=256, cnn_batch_size=16,
                  estimators=["backprop", "naive_replayed", "local_activity"], warmup=1, repeats=2, compile=False),
    "accuracy": dict(models=["mlp"], epochs=1, limit_train_batches=5, seeds=1, grid_growth=0, k=4),
    "quality": dict(models=["mlp"], directions=[4], draws=5),
    "stability": dict(models=["mlp"], batch_sizes=[128], lrs=[1e-2, 1e-1], steps=20, k=4),
    "momentum": dict(models=["mlp"], steps=40, cosine_every=10),
}


@pytest.mark.parametrize("command", sorted(QUICK_OPTIONS))
def test_quick_presets_parse_into_their_options(command, capsys):
    """--quick on every long command: its options in place of the user's (the others, --out, --device, stay), the
    defaults without it, and its measured wall time in --help."""
    from fg_lightning.bench.cli import QUICK, QUICK_MEASURED, parse

    assert set(QUICK) == set(QUICK_OPTIONS)
    user = [command, "--device", "cpu", "--out", "somewhere", "--models", "cnn"]
    quick = parse([*user, "--quick"])
    assert {key: getattr(quick, key) for key in QUICK_OPTIONS[command]} == QUICK_OPTIONS[command]
    assert (quick.device, quick.out, quick.quick) == ("cpu", "somewhere", True)
    assert quick.command_line == f"fg-bench {' '.join(user)} --quick"
    plain = parse(user)
    assert {key: getattr(plain, key) for key in QUICK_OPTIONS[command]} != QUICK_OPTIONS[command]
    assert " s " in QUICK_MEASURED[command]  # a measured time, not a placeholder
    with pytest.raises(SystemExit):
        parse([command, "--help"])
    assert f"measured {QUICK_MEASURED[command]}" in " ".join(capsys.readouterr().out.split())


def test_depth(tmp_path, capsys):
    """fg-bench depth's cases at two depths of a tiny MLP and a tiny plain CNN, measured in this process (the command
    runs each memory case in a fresh one): every case has its peak, its time and its ratios, each printed its
    progress line first, and the report and plot are written."""
    from argparse import Namespace

    from fg_lightning.bench import depth

    records = depth.measure("cpu", [1, 2], width=16, batch_size=8, estimators=depth.ESTIMATORS, k=2, warmup=1,
                            repeats=2, compile=False, isolate=False, models=["mlp", "cnn"], channels=2,
                            cnn_batch_size=3)
    names = ("stock_autograd", "stock_func_jvp", "stock_checkpointed", *depth.ESTIMATORS)
    assert [(r["model"], r["depth"], r["estimator"]) for r in records] == [
        (model, d, name) for model in ("mlp", "cnn") for d in (1, 2) for name in names]
    for record in records:
        assert "error" not in record, record
        assert record["peak_mb"] >= 0 and record["ms_median"] > 0 and record["params_mb"] > 0
        assert record["batch_size"] == {"mlp": 8, "cnn": 3}[record["model"]]
    # the plain CNN: L 3x3 convolutions that keep the 28x28 maps (same padding, no pooling), then a global average
    # pool and the classifier; with local losses a head after every ReLU
    network = build_network("deep_cnn", "local_activity", depth=3, channels=2)
    assert [(name, out) for name, _, out in activation_sizes(network, 1)] == [
        (name, 2 * 28 * 28) for i in (1, 2, 3) for name in (f"conv{i}", f"relu{i}")] + [("pool", 2), ("fc", 10)]
    assert [name for name, _ in network.named_children() if name.startswith("head")] == ["head1", "head2", "head3"]
    cnn = {r["depth"]: r["params_mb"] for r in records if r["model"] == "cnn"}
    assert cnn[2] - cnn[1] == pytest.approx(4 * (2 * 2 * 9 + 2) / 2**20)  # one more 3x3 conv of 2 channels
    printed = capsys.readouterr().out
    total = len(records)
    assert f"fg-bench depth [1/{total}, 0 s] mlp 16x1 batch 8 stock_autograd\n" in printed
    assert " s left in depth] cnn 2ch x2 batch 3 local_activity k=2\n" in printed
    assert f"fg-bench depth [{total}/{total}, " in printed
    made_up = [{"model": model, "depth": d, "estimator": name, "peak_mb": peak * scale} for model, scale in
               (("mlp", 1), ("cnn", 10)) for d, name, peak in
               [(1, "backprop", 4.0), (1, "stock_checkpointed", 2.0), (1, "naive", 1.0), (2, "backprop", 8.0),
                (2, "stock_checkpointed", 4.0), (2, "naive", 1.5)]]
    depth._ratios(made_up)
    for row in (made_up[5], made_up[-1]):  # each model against its own references at its own shallowest depth
        assert (row["ratio_vs_backprop"], row["ratio_vs_checkpointed"], row["growth_vs_shallowest"]) == (
            1.5 / 8, 1.5 / 4, 1.5)
    depth.report(records, str(tmp_path), "cpu", Namespace(width=16, channels=2, batch_size=8, cnn_batch_size=3,
                                                          warmup=1, repeats=2), isolate=False)
    assert len(load(str(tmp_path), "depth")) == len(records)
    notes = open(os.path.join(str(tmp_path), "depth.md")).read()
    assert "MLP 784-16x L-10 at batch 8" in notes and "CNN of L 3×3 convolutions of 2 channels" in notes
    assert_plot(str(tmp_path), "depth")


def test_memory(tmp_path):
    out = str(tmp_path)
    fg_bench(["memory", "--device", "cpu", "--out", out, "--models", "mlp", "--batch-sizes", "64",
              "--estimators", "backprop", "naive", "--directions", "1", "--no-compile"])
    records = load(out, "memory")
    assert [r["estimator"] for r in records] == ["stock_autograd", "stock_func_jvp", "stock_checkpointed", "backprop",
                                                 "naive", "torch:backprop", "torch:naive"]
    for record in records:
        assert "error" not in record, record
        assert {"peak_mb", "ratio_vs_autograd", "method"} <= set(record) and record["peak_mb"] > 0
    assert_plot(out, "memory")


def test_quality_stability_momentum_on_idx_files(tmp_path, random_idx_root, capsys):
    out = str(tmp_path)
    data = ["--dataset", "mnist", "--root", random_idx_root, "--no-download", "--batch-sizes", "8", "--val-size", "16"]
    fg_bench(["quality", "--device", "cpu", "--out", out, "--models", "mlp", "--draws", "2", "--directions", "2", *data])
    quality = load(out, "quality")
    overall = {r["estimator"]: r for r in quality if r["param"] == "all"}
    own = [name for name, spec in REGISTRY.items() if spec.same_as is None]  # not naive_replayed: naive's numbers
    assert set(overall) == set(own) and "naive_replayed" not in own
    assert overall["backprop"]["cosine_mean"] == pytest.approx(1.0) and overall["backprop"]["gain"] == pytest.approx(1.0)
    assert {r["param"] for r in quality} >= {"fc1.weight", "fc3.bias"}
    assert_plot(out, "quality_mlp")
    printed = capsys.readouterr().out
    cases = len(common.cases(own, [2]))
    assert f"fg-bench quality [1/{cases}, " in printed and f"fg-bench quality [{cases}/{cases}, " in printed
    assert " s left in quality] mlp batch 8 multi_direction k=2\n" in printed

    fg_bench(["stability", "--device", "cpu", "--out", out, "--models", "mlp", "--estimators", "backprop", "naive",
              "--steps", "3", "--lrs", "1e-3", "1e6", *data])
    stability = load(out, "stability")
    assert [(r["estimator"], r["lr"], r["diverged"]) for r in stability] == [
        ("backprop", 1e-3, False), ("backprop", 1e6, True), ("naive", 1e-3, False), ("naive", 1e6, True)]
    assert "Largest learning rate" in open(os.path.join(out, "stability.md")).read()
    printed = capsys.readouterr().out
    assert "fg-bench stability [1/4, 0 s] mlp backprop lr=0.001\n" in printed
    assert " s left in stability] mlp naive lr=1e+06\n" in printed and "fg-bench stability [4/4, " in printed

    fg_bench(["momentum", "--device", "cpu", "--out", out, "--models", "mlp", "--steps", "3", "--cosine-every", "1",
              *data])
    momentum = load(out, "momentum")
    assert [r["run"] for r in momentum][:2] == ["backprop", "naive"]
    assert any(r["run"].startswith("momentum decay=1.0 shuffle=0.0") for r in momentum)
    assert all(len(r["losses"]) == 3 and len(r["cosines"]) == 3 for r in momentum)
    decay_1 = [r for r in momentum if r["run"].startswith("momentum decay=1.0")][0]
    assert decay_1["cosine_checkpoint"] > 0.5 and decay_1["gain_checkpoint"] > 1  # step 0 is a checkpoint
    assert_plot(out, "momentum_mlp")
    printed = capsys.readouterr().out
    assert "fg-bench momentum [1/9, 0 s] mlp backprop\n" in printed and "fg-bench momentum [9/9, " in printed


def test_accuracy_leaderboard_on_learnable_idx_files(tmp_path, capsys):
    root, out = learnable_idx(tmp_path / "idx"), str(tmp_path / "out")
    data = ["--device", "cpu", "--dataset", "mnist", "--root", root, "--no-download", "--val-size", "32",
            "--batch-size", "8", "--epochs", "2", "--limit-train-batches", "4", "--seeds", "1", "--grid-growth", "0"]
    # 1e-6 barely moves from the initialisation (chance accuracy), 0.1 learns the task with backprop, 1e6 diverges
    fg_bench(["accuracy", *data, "--models", "mlp", "cnn", "--estimators", "backprop", "naive",
              "--lrs", "1e-6", "0.1", "1e6", "--out", out])
    printed = capsys.readouterr().out
    assert "| mlp | backprop |" in printed
    # a progress line before each of the 2 models x 2 estimators x 3 rates x 1 seed runs, with the time left
    assert "fg-bench accuracy [1/12, 0 s] mlp backprop lr=1e-06 seed 0\n" in printed
    assert " s left in accuracy] cnn naive lr=1e+06 seed 0\n" in printed and "fg-bench accuracy [12/12, " in printed
    runs = load(out, "accuracy")
    with open(os.path.join(out, "accuracy.json")) as f:
        report = json.load(f)
    meta, board = report["meta"], {(r["model"], r["estimator"]): r for r in report["leaderboard"]}
    assert meta["limit_train_batches"] == 4 and meta["steps_per_epoch"] == 4 and meta["schedule"] == "cosine"
    assert "not full epochs" in open(os.path.join(out, "accuracy.md")).read()
    assert_plot(out, "accuracy")
    assert len(runs) == 2 * 2 * 3 and {r["lr"] for r in runs} == {1e-6, 0.1, 1e6}
    for model in ("mlp", "cnn"):
        backprop = {r["lr"]: r for r in runs if r["model"] == model and r["estimator"] == "backprop"}
        for name in ("backprop", "naive"):
            grid = [r for r in runs if r["model"] == model and r["estimator"] == name]
            huge = next(r for r in grid if r["lr"] == 1e6)
            assert huge["diverged"] and huge["diverged_at"] < 8 and huge["test_acc"] is None and not huge["picked"]
            assert "1e+06 (step" in board[model, name]["diverged_lrs"]
            trained = [r for r in grid if not r["diverged"]]
            for r in trained:
                # 10 points an epoch asked, an epoch of 4 steps: one after every step
                assert r["steps"] == 8 and [p["epoch"] for p in r["curve"]] == [0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2]
                assert [p["step"] for p in r["curve"]] == list(range(1, 9))
                assert r["test_acc"] == r["curve"][-1]["test_acc"] and r["wall_s"] > 0
            picked = [r for r in grid if r["picked"]]
            assert len(picked) == 1 and picked[0]["val_acc"] == max(r["val_acc"] for r in trained)
            assert board[model, name]["lr"] == picked[0]["lr"] and board[model, name]["seeds"] == 1
            assert board[model, name]["test_acc"] == picked[0]["test_acc"] and board[model, name]["test_sd"] is None
            assert board[model, name]["gap_vs_backprop"] == pytest.approx(
                picked[0]["test_acc"] - backprop[0.1]["test_acc"])
        assert backprop[0.1]["picked"] and not backprop[1e-6]["picked"]  # the learning rate beats the tiny one
        assert backprop[0.1]["val_acc"] > backprop[1e-6]["val_acc"] + 0.1
    mlp_backprop = next(r for r in runs if r["model"] == "mlp" and r["estimator"] == "backprop" and r["lr"] == 0.1)
    assert mlp_backprop["val_acc"] >= 0.6  # it learned

    # Same weights and batches for every run: backprop at 0.1 alone, on a fresh loader, is the run above that came
    # after the one at 1e-6 (which left the loader at epoch 2).
    again = str(tmp_path / "again")
    fg_bench(["accuracy", *data, "--models", "mlp", "--estimators", "backprop", "--lrs", "0.1", "--out", again])
    (rerun,) = load(again, "accuracy")
    assert [p["test_acc"] for p in rerun["curve"]] == [p["test_acc"] for p in mlp_backprop["curve"]]
    assert [p["train_loss"] for p in rerun["curve"]] == [p["train_loss"] for p in mlp_backprop["curve"]]
    # a fraction of an epoch (the time-fit run of an equal-time comparison): the run and its schedule end within one
    fg_bench(["accuracy", *data, "--epochs", "0.5", "--models", "mlp", "--estimators", "backprop", "--lrs", "0.1",
              "--out", again])
    (half,) = load(again, "accuracy")
    assert half["steps"] == 2 and [p["epoch"] for p in half["curve"]] == [0.25, 0.5] and half["epochs"] == 0.5
    assert half["curve"][0]["train_loss"] == mlp_backprop["curve"][0]["train_loss"]  # the same first step
    assert "epoch 0.5/0.5: val acc" in capsys.readouterr().out
    # the equal-time comparison in two runs: naive for half an epoch against the 2-epoch backprop runs above (`out`)
    apart = str(tmp_path / "apart")
    fg_bench(["accuracy", *data, "--epochs", "0.5", "--models", "mlp", "--estimators", "naive", "--lrs", "1e-4",
              "--out", apart, "--backprop-from", out])
    with open(os.path.join(apart, "accuracy.json")) as f:
        report = json.load(f)
    (row,), (naive,) = report["leaderboard"], report["records"]
    assert report["meta"]["backprop_from"] == out and naive["estimator"] == "naive" and naive["steps"] == 2
    assert row["gap_vs_backprop"] == pytest.approx(naive["test_acc"] - mlp_backprop["test_acc"])  # the picked 0.1
    assert row["test_acc_at_backprop_time"] == accuracy_at_time(naive["curve"], mlp_backprop["wall_s"])
    with pytest.raises(SystemExit, match="--backprop-from .*none: no fg-bench accuracy report there"):
        fg_bench(["accuracy", *data, "--models", "mlp", "--estimators", "naive", "--out", apart,
                  "--backprop-from", str(tmp_path / "none")])


@pytest.mark.parametrize("bad, named", [(["--epochs", "0"], "--epochs: must be a finite number > 0, got 0"),
                                        (["--epochs", "-2"], "--epochs: must be a finite number > 0, got -2"),
                                        (["--lrs", "1e-3", "0"], "--lrs: must be a finite number > 0, got 0"),
                                        (["--lrs", "-0.001"], "--lrs: must be a finite number > 0, got -0.001"),
                                        (["--seeds", "0"], "--seeds: must be >= 1, got 0"),
                                        (["--grid-growth", "-1"], "--grid-growth: must be >= 0, got -1")])
def test_accuracy_bad_input_is_refused_before_training(tmp_path, capsys, bad, named):
    with pytest.raises(SystemExit):
        fg_bench(["accuracy", "--device", "cpu", "--out", str(tmp_path / "out"), *bad])
    assert named in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_accuracy_needs_a_validation_split(tmp_path):
    with pytest.raises(SystemExit, match="--val-size must be >= 1.*got 0"):
        fg_bench(["accuracy", "--device", "cpu", "--out", str(tmp_path), "--val-size", "0", "--root", str(tmp_path)])


def test_accuracy_grids():
    assert all(len(spec.grid) == 3 and all(lr > 0 for lr in spec.grid) for spec in REGISTRY.values())
    assert lr_grid("naive", None) == list(REGISTRY["naive"].grid) and lr_grid("naive", [0.5]) == [0.5]


def test_accuracy_picks_by_validation_not_test():
    def run(name, lr, val=None, test=None, diverged_at=None):
        return {"model": "mlp", "backward": REGISTRY[name].backward, "estimator": name, "k": None, "lr": lr,
                "schedule": "cosine", "epochs": 1,
                "diverged": diverged_at is not None, "diverged_at": diverged_at, "val_acc": val, "test_acc": test,
                "picked": False}

    runs = [run("backprop", 0.1, 0.9, 0.8), run("backprop", 0.3, 0.8, 0.85), run("backprop", 1.0, diverged_at=3),
            run("naive", 1e-4, 0.5, 0.6), run("naive", 1e-3, 0.6, 0.55), run("momentum", 1e-6, diverged_at=0)]
    board = pick(runs, ["mlp"], ["backprop", "naive", "momentum"])
    assert [r["picked"] for r in runs] == [True, False, False, False, True, False]
    # each backward class ranked on its own: naive (forward mode only) first, then backprop and momentum (global)
    assert [(r["estimator"], r.get("lr"), r.get("gap_vs_backprop")) for r in board] == [
        ("naive", 1e-3, pytest.approx(0.55 - 0.8)), ("backprop", 0.1, 0.0), ("momentum", None, None)]
    assert board[1]["diverged_lrs"] == "1 (step 3)" and board[2]["diverged_lrs"] == "1e-06 (step 0)"
    assert [r.get("at_grid_edge") for r in board] == [True, True, None]  # 1e-3 of (1e-4, 1e-3); 0.1 of (0.1, 0.3, 1)
    # without backprop the gap is blank
    assert "gap_vs_backprop" not in pick([run("naive", 1e-4, 0.5, 0.6)], ["mlp"], ["naive"])[0]


def test_accuracy_seeds_on_learnable_idx_files(tmp_path, monkeypatch, capsys):
    """--seeds 2: every rate runs with seeds 0 and 1, each with its own weights, estimator seed and batch order; the
    leaderboard gives the mean and sd over the seeds; the same seed alone gives the same numbers; the grid grew
    below its smallest rate (the largest diverged), once (--grid-growth 1)."""
    root, out = learnable_idx(tmp_path / "idx"), str(tmp_path / "out")
    data = ["--device", "cpu", "--dataset", "mnist", "--root", root, "--no-download", "--val-size", "32",
            "--batch-size", "8", "--epochs", "2", "--limit-train-batches", "3", "--models", "mlp"]
    seen, train = [], accuracy.train

    def spy(network, estimator, lr, loader, *args, **kwargs):
        seen.append((lr, estimator.seed, loader.sampler.seed, float(network.fc1.weight[0, 0])))
        return train(network, estimator, lr, loader, *args, **kwargs)

    monkeypatch.setattr(accuracy, "train", spy)
    fg_bench(["accuracy", *data, "--estimators", "backprop", "naive", "--lrs", "1e-3", "1e6", "--seeds", "2",
              "--grid-growth", "1", "--out", out])
    runs = load(out, "accuracy")
    printed = capsys.readouterr().out  # 2 x 2 rates x 2 seeds announced, then each grid's added rate's 2 seeds
    assert "fg-bench accuracy [4/8, " in printed and "fg-bench accuracy [5/10, " in printed
    assert "fg-bench accuracy [12/12, " in printed
    assert [(r["estimator"], r["lr"], r["seed"]) for r in runs] == [
        (name, lr, seed) for name in ("backprop", "naive") for lr in (1e-3, 1e6, 3.33e-4) for seed in (0, 1)]
    assert all(r["grid"] == [1e-3, 1e6, 3.33e-4] and r["grown"] == (r["lr"] == 3.33e-4) for r in runs)
    # seed s: the estimator's seed, the loader's shuffle and the initial weights (the same for every rate)
    assert {(estimator_seed, loader_seed) for _, estimator_seed, loader_seed, _ in seen} == {(0, 0), (1, 1)}
    weights = {seed: {w for _, s, _, w in seen if s == seed} for seed in (0, 1)}
    assert len(weights[0]) == len(weights[1]) == 1 and weights[0] != weights[1]
    with open(os.path.join(out, "accuracy.json")) as f:
        report = json.load(f)
    assert report["meta"]["seeds"] == 2 and report["meta"]["grid_growth"] == 1
    board = {row["estimator"]: row for row in report["leaderboard"]}
    table = open(os.path.join(out, "accuracy.md")).read()
    assert "| test_sd |" in table and "| test_acc_at_backprop_time |" in table and "measured 10 times an epoch" in table
    assert "mlp naive 0.001, 1e+06 + 0.000333" in table
    for name, row in board.items():
        group = [r for r in runs if r["estimator"] == name and r["lr"] == row["lr"]]
        assert [r["seed"] for r in group] == [0, 1] and all(r["picked"] for r in group) and row["seeds"] == 2
        tests = [r["test_acc"] for r in group]
        assert row["test_acc"] == pytest.approx(np.mean(tests)) and row["test_sd"] == pytest.approx(np.std(tests, ddof=1))
        assert row["val_acc"] == pytest.approx(np.mean([r["val_acc"] for r in group]))
        assert row["at_grid_edge"] == (row["lr"] == 3.33e-4)  # 1e-3 is interior: 1e6 diverged
        assert row["diverged_lrs"].startswith("1e+06 (step")
    assert board["naive"]["test_sd"] > 0  # a noisy estimator: the seeds differ
    assert board["naive"]["gap_vs_backprop"] == pytest.approx(board["naive"]["test_acc"] - board["backprop"]["test_acc"])
    # backprop within its own time: its final accuracy
    assert board["backprop"]["test_acc_at_backprop_time"] == pytest.approx(board["backprop"]["test_acc"])

    # the same seed twice: the same numbers (seed 0 alone, then seed 1 run after it, as above)
    again = str(tmp_path / "again")
    fg_bench(["accuracy", *data, "--estimators", "naive", "--lrs", "1e-3", "--seeds", "1", "--grid-growth", "0",
              "--out", again])
    (rerun,) = load(again, "accuracy")
    first = {r["seed"]: r for r in runs if r["estimator"] == "naive" and r["lr"] == 1e-3}
    assert rerun["curve"] and [p["train_loss"] for p in rerun["curve"]] == [p["train_loss"] for p in first[0]["curve"]]
    assert [p["test_acc"] for p in rerun["curve"]] == [p["test_acc"] for p in first[0]["curve"]]
    assert [p["train_loss"] for p in first[1]["curve"]] != [p["train_loss"] for p in first[0]["curve"]]


def test_accuracy_seed_changes_the_batch_order_not_the_split(tmp_path):
    from argparse import Namespace

    args = Namespace(dataset="mnist", root=learnable_idx(tmp_path / "idx"), download=False, val_size=32)
    data = common.real_data(args, 8)
    val = data.val_set.tensors[1].clone()

    def first_epoch(seed):
        loader = seed_loader(data, seed)
        loader.sampler.set_epoch(0)
        return torch.cat([labels for _, labels in loader])

    assert torch.equal(first_epoch(0), first_epoch(0)) and not torch.equal(first_epoch(0), first_epoch(1))
    own = data.train_dataloader()  # seed 0 is the module's own order (the one run of earlier versions)
    own.sampler.set_epoch(0)
    assert torch.equal(first_epoch(0), torch.cat([labels for _, labels in own]))
    assert data.seed == 0 and torch.equal(data.val_set.tensors[1], val)


def scripted(val_of, diverges=(), seeds=(0, 1)):
    """A run_rate for :func:`search` without training: the runs at ``lr`` have ``val_of(lr, seed)``, or diverge."""
    calls = []

    def run_rate(lr):
        calls.append(lr)
        return [{"lr": lr, "seed": seed, "diverged": lr in diverges, "diverged_at": 0 if lr in diverges else None,
                 "val_acc": None if lr in diverges else val_of(lr, seed)} for seed in seeds]

    return run_rate, calls


def test_accuracy_grid_grows_past_the_edge_up_to_the_cap():
    grid = [0.01, 0.03, 0.1]
    # better the larger: grows up (x3) while the pick is the largest, and stops at the cap, still at the edge
    run_rate, calls = scripted(lambda lr, seed: lr)
    runs, grown, added = search(grid, run_rate, 2)
    assert calls == [0.01, 0.03, 0.1, 0.3, 0.9] and added == [0.3, 0.9] and grown == calls and len(runs) == 10
    assert pick([{**r, **RUN} for r in runs], ["mlp"], ["naive"])[0]["at_grid_edge"] is True
    # a peak at 0.3: grows to 0.9, finds 0.3 interior, stops before the cap
    run_rate, calls = scripted(lambda lr, seed: -abs(lr - 0.3))
    assert search(grid, run_rate, 3)[2] == [0.3, 0.9] and calls == [0.01, 0.03, 0.1, 0.3, 0.9]
    # better the smaller: grows down (/3)
    run_rate, calls = scripted(lambda lr, seed: -lr)
    assert search(grid, run_rate, 2)[2] == [0.00333, 0.00111]
    # no growth: the grid as given
    run_rate, calls = scripted(lambda lr, seed: lr)
    assert search(grid, run_rate, 0)[2] == [] and calls == grid
    # every rate diverged: grows down
    run_rate, calls = scripted(lambda lr, seed: lr, diverges={0.01, 0.03, 0.1})
    assert search(grid, run_rate, 1)[2] == [0.00333]
    # the pick is by the mean over seeds: 0.1's one good seed does not make it the pick, so the grid does not grow
    run_rate, calls = scripted(lambda lr, seed: {0.01: 0.4, 0.03: 0.6, 0.1: 0.9 if seed == 0 else 0.1}[lr])
    assert search(grid, run_rate, 3)[2] == [] and calls == grid


def test_accuracy_a_diverging_top_rate_makes_the_pick_below_it_interior():
    run_rate, calls = scripted(lambda lr, seed: lr, diverges={0.1})
    runs, _, added = search([0.01, 0.03, 0.1], run_rate, 3)
    assert added == [] and calls == [0.01, 0.03, 0.1]
    (row,) = pick([{**r, **RUN} for r in runs], ["mlp"], ["naive"])
    assert row["lr"] == 0.03 and row["at_grid_edge"] is False and row["diverged_lrs"] == "0.1 (step 0)"
    # a rate at which one seed of two diverged cannot be picked, and grows nothing past it
    run_rate, calls = scripted(lambda lr, seed: lr, diverges={0.1})
    runs, _, added = search([0.01, 0.03, 0.1], run_rate, 3)
    runs[-1].update(diverged=False, diverged_at=None, val_acc=1.0)
    (row,) = pick([{**r, **RUN} for r in runs], ["mlp"], ["naive"])
    assert row["lr"] == 0.03 and row["diverged_lrs"] == "0.1 (step 0, 1 of 2 seeds)"


RUN = {"model": "mlp", "estimator": "naive", "backward": "none", "k": None, "schedule": "cosine", "epochs": 1,
       "steps": 4, "test_acc": 0.5, "wall_s": 1.0, "picked": False}


def test_accuracy_picks_by_the_mean_over_seeds():
    def run(lr, seed, val, test):
        return {**RUN, "lr": lr, "seed": seed, "diverged": False, "diverged_at": None, "val_acc": val, "test_acc": test}

    runs = [run(0.01, 0, 0.9, 0.8), run(0.01, 1, 0.1, 0.2), run(0.03, 0, 0.6, 0.7), run(0.03, 1, 0.6, 0.5)]
    (row,) = pick(runs, ["mlp"], ["naive"])
    assert [r["picked"] for r in runs] == [False, False, True, True]
    assert (row["lr"], row["seeds"], row["val_acc"]) == (0.03, 2, pytest.approx(0.6))
    assert (row["test_acc"], row["test_sd"]) == (pytest.approx(0.6), pytest.approx(np.std([0.7, 0.5], ddof=1)))
    assert pick([run(0.01, 0, 0.9, 0.8)], ["mlp"], ["naive"])[0]["test_sd"] is None  # one seed: no sd


def test_accuracy_at_backprop_time():
    curve = [{"epoch": e, "wall_s": 1.0 * e, "test_acc": 0.5 + 0.1 * e} for e in (1, 2, 3, 4)]
    assert accuracy_at_time(curve, 2.5) == pytest.approx(0.7)  # epochs 1 and 2 fit: epoch 2's accuracy
    assert accuracy_at_time(curve, 3.0) == pytest.approx(0.8)  # an epoch that ends at the budget counts
    assert accuracy_at_time(curve, 10.0) == pytest.approx(0.9)
    assert accuracy_at_time(curve, 0.9) is None  # not even one epoch
    slow = [{"epoch": e, "wall_s": 2.0 * e, "test_acc": 0.1 * e} for e in (1, 2, 3)]
    method = [{"seed": 0, "wall_s": 4.0, "curve": curve}, {"seed": 1, "wall_s": 6.0, "curve": slow}]
    backprop = [{"seed": 0, "wall_s": 2.2}, {"seed": 1, "wall_s": 4.1}]  # each seed against backprop's same seed
    assert at_backprop_time(method, backprop) == pytest.approx((0.7 + 0.2) / 2)
    assert at_backprop_time(method, [{"seed": 0, "wall_s": 2.2}, {"seed": 1, "wall_s": 1.9}]) is None
    assert at_backprop_time(method, backprop[:1]) is None  # backprop without seed 1

    def run(name, seed, wall, curve):
        return {**RUN, "estimator": name, "backward": REGISTRY[name].backward, "lr": 0.1, "seed": seed,
                "diverged": False, "diverged_at": None, "val_acc": 0.5, "test_acc": curve[-1]["test_acc"],
                "wall_s": wall, "curve": curve}

    fast = [{"epoch": e, "wall_s": 0.5 * e, "test_acc": 0.6 + 0.05 * e} for e in (1, 2)]
    runs = [run("backprop", 0, 1.05, fast), run("backprop", 1, 1.1, fast), run("naive", 0, 4.0, curve),
            run("naive", 1, 6.0, slow)]
    board = {row["estimator"]: row for row in pick(runs, ["mlp"], ["backprop", "naive"])}
    assert board["backprop"]["test_acc_at_backprop_time"] == pytest.approx(0.7)  # its own final accuracy
    assert board["naive"]["test_acc_at_backprop_time"] is None  # seed 1's first epoch took 2 s of backprop's 1.1
    runs[3]["curve"] = [{"epoch": 1, "wall_s": 1.0, "test_acc": 0.3}, *slow[1:]]
    for r in runs:
        r["picked"] = False
    board = {row["estimator"]: row for row in pick(runs, ["mlp"], ["backprop", "naive"])}
    assert board["naive"]["test_acc_at_backprop_time"] == pytest.approx((0.6 + 0.3) / 2)
    assert "test_acc_at_backprop_time" not in pick(runs[2:], ["mlp"], ["naive"])[0]  # no backprop: blank


def test_train_epochs_scheduler_and_hook():
    network = MLP(hidden=(16,), seed=0)

    class Loader(list):  # a loader whose sampler is told the epoch, as MNISTDataModule's training loader is
        class sampler:
            epochs: list[int] = []

            @classmethod
            def set_epoch(cls, epoch):
                cls.epochs.append(epoch)

    batches = Loader((torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))) for _ in range(3))
    made, ends = [], []

    def cosine(optimizer):
        made.append(torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=6))
        return made[-1]

    result = train(network, REGISTRY["backprop"].make(), 0.1, batches, 6, torch.device("cpu"), epoch_steps=2,
                   scheduler=cosine, on_point=lambda epochs, step, seconds: ends.append((epochs, step, seconds)))
    assert result["steps"] == 6 and result["train_s"] > 0
    assert [(epochs, step) for epochs, step, _ in ends] == [(1, 2), (2, 4), (3, 6)]
    assert made[0].last_epoch == 6 and made[0].get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # stepped per step
    assert Loader.sampler.epochs == [0, 1, 2]  # each epoch its own shuffle, from epoch 0 in every run
    # without epoch_steps an epoch is a whole pass over the loader
    ends.clear()
    train(network, REGISTRY["backprop"].make(), 0.1, batches, 6, torch.device("cpu"),
          on_point=lambda epochs, step, seconds: ends.append((epochs, step)))
    assert ends == [(1, 3), (2, 6)] and Loader.sampler.epochs == [0, 1, 2]  # one order, as before
    # points within each epoch: after steps 1 and 2 of every 3 (a third and two thirds), then at its end
    ends.clear()
    seconds = []
    train(network, REGISTRY["backprop"].make(), 0.1, batches, 6, torch.device("cpu"), epoch_steps=3,
          points_per_epoch=3, on_point=lambda epochs, step, spent: (ends.append((epochs, step)), seconds.append(spent)))
    assert [step for _, step in ends] == [1, 2, 3, 4, 5, 6]
    assert [epochs for epochs, _ in ends] == pytest.approx([1 / 3, 2 / 3, 1, 4 / 3, 5 / 3, 2])
    assert seconds == sorted(seconds) and seconds[0] > 0
    # a run that ends within an epoch (fg-bench accuracy --epochs 1.67) ends with a point, once
    for per_epoch, steps in ((1, [3, 5]), (3, [1, 2, 3, 4, 5])):
        ends.clear()
        train(network, REGISTRY["backprop"].make(), 0.1, batches, 5, torch.device("cpu"), epoch_steps=3,
              points_per_epoch=per_epoch, on_point=lambda epochs, step, spent: ends.append((epochs, step)))
        assert [step for _, step in ends] == steps and ends[-1][0] == pytest.approx(5 / 3)


def test_build_network_adds_local_losses_only_when_the_estimator_needs_them(monkeypatch):
    made = []
    monkeypatch.setitem(common.MODELS, "mlp", lambda **kwargs: made.append(kwargs))

    class Local:
        needs_local_losses = True

    build_network("mlp", Local())
    build_network("mlp", "stock_autograd")
    build_network("mlp")
    assert made == [{"seed": 0, "local_losses": True}, {"seed": 0}, {"seed": 0}]
    made.clear()
    for name, spec in REGISTRY.items():
        build_network("mlp", name)
        assert made.pop() == ({"seed": 0, "local_losses": True} if spec.needs_local_losses else {"seed": 0}), name


def test_missing_data_is_one_clear_error_naming_fg_bench_flags(tmp_path):
    with pytest.raises(SystemExit, match="not found") as exit_info:
        fg_bench(["quality", "--device", "cpu", "--out", str(tmp_path), "--dataset", "mnist", "--root",
                  str(tmp_path / "none"), "--no-download"])
    message = str(exit_info.value.code)
    assert "--root <folder>" in message and "--dataset fashion_mnist" in message and "--no-download" in message
    assert "--data." not in message, message


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
    depth_cases = 2 * 2 * (3 + len(DEPTH_ESTIMATORS))  # both models, two depths, the stock baselines but compiled
    assert f"fg-bench depth [1/{depth_cases}, " in printed and "] cnn 2ch x2 batch 2 local_activity k=2\n" in printed
    for name in ("speed", "memory"):
        records = load(out, name)
        assert not [r for r in records if "error" in r]
        for model in ("mlp", "cnn"):
            names = {r["estimator"] for r in records if r["model"] == model}
            assert set(REGISTRY) | {"stock_autograd", "stock_func_jvp"} <= names, (name, model)
            ks = {r["k"] for r in records if r["model"] == model and r["estimator"] == "multi_direction"}
            assert ks == {1, 2}
        assert_plot(out, name)
    depths = load(out, "depth")
    assert not [r for r in depths if "error" in r] and {(r["model"], r["depth"]) for r in depths} == {
        (model, d) for model in ("mlp", "cnn") for d in (1, 2)}
    for model in ("mlp", "cnn"):
        assert {"stock_autograd", "stock_checkpointed", "naive_replayed", "local_activity"} <= {
            r["estimator"] for r in depths if r["model"] == model}
    readme = open(os.path.join(out, "README.md")).read()
    assert f"fg-bench all --preset tiny --device cpu --out {out}" in readme
    assert environment(torch.device("cpu"))["device_name"] in readme and torch.__version__ in readme
    assert "wall time:" in readme and "CNN of 2 channels at batch 2" in readme


def test_all_time_limit_skips_the_rest(tmp_path):
    out = str(tmp_path)
    fg_bench(["all", "--preset", "tiny", "--device", "cpu", "--out", out, "--time-limit", "0"])
    for name in ("speed", "memory", "depth"):
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


def test_comm_reports_bytes_per_step_beside_the_gradient(tmp_path, capsys):
    out = str(tmp_path / "out")
    fg_bench(["comm", "--device", "cpu", "--out", out, "--models", "mlp", "--batch-sizes", "4", "--estimators",
              "backprop", "naive", "multi_direction", "input_qr", "momentum", "--directions", "1", "5"])
    records = {(r["estimator"], r["k"]): r for r in load(out, "comm")}
    n = 784 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10
    assert records["backprop", None]["gradient_bytes"] == 4 * n
    assert records["backprop", None]["bytes_per_step"] == 4 * (n + 2)  # the gradient, the loss, the batch size
    assert records["naive", None]["bytes_per_step"] == 4 * 3
    assert records["multi_direction", 5]["bytes_per_step"] == 4 * (5 + 2) <= (5 + 1) * 8  # the target
    assert records["momentum", None]["bytes_each_step"] == [4 * (n + 2), 4 * 3]  # a checkpoint, then forward mode
    assert records["input_qr", None]["bytes_per_step"] == 4 * 4 * (784 + 1024 + 1024) + 3 * 8 + 4 * 3
    assert "| mlp | naive |" in capsys.readouterr().out


def test_model_switches_build_the_variant_and_leave_the_recipe_switches_to_local_estimators():
    from fg_lightning.bench.common import build_network, model_switches

    assert model_switches("cnn+block_size=1+groups=8+norm") == ("cnn", {"block_size": 1, "groups": 8, "norm": True})
    assert model_switches("mlp") == ("mlp", {})
    local = build_network("cnn+groups=2+norm", "local_activity")
    plain = build_network("cnn+groups=2+norm", "backprop")  # no heads: the recipe's switches left out, norm too
    assert local.has_local_losses and not plain.has_local_losses
    assert any("norm" in name for name, _ in local.named_layers())
    assert [n for n, _ in build_network("cnn", "backprop").named_layers()] == [n for n, _ in plain.named_layers()]
    residual = build_network("mixer+residual+groups=2", "backprop")  # a switch of the model itself stays
    assert any(name.startswith("skip") for name, _ in residual.named_layers())


def test_accuracy_ablation_trains_the_recipe_variants_against_the_plain_cnns_backprop(tmp_path):
    from fg_lightning.bench.accuracy import ABLATION

    root, out = learnable_idx(tmp_path / "idx"), str(tmp_path / "out")
    fg_bench(["accuracy", "--device", "cpu", "--dataset", "mnist", "--root", root, "--no-download", "--val-size", "32",
              "--batch-size", "8", "--epochs", "1", "--limit-train-batches", "2", "--seeds", "1", "--grid-growth", "0",
              "--ablation", "--estimators", "backprop", "local_activity", "--lrs", "0.1", "--out", out])
    with open(os.path.join(out, "accuracy.json")) as f:
        report = json.load(f)
    board = {(r["model"], r["estimator"]): r for r in report["leaderboard"]}
    assert report["meta"]["ablation"] is True
    assert set(board) == {("cnn", "backprop")} | {(model, "local_activity") for model in ABLATION}
    backprop = board["cnn", "backprop"]["test_acc"]
    for model in ABLATION:
        row = board[model, "local_activity"]
        assert row["gap_vs_backprop"] == pytest.approx(row["test_acc"] - backprop)


def test_accuracy_models_take_network_switches_and_refuse_unknown_ones(tmp_path, capsys):
    root, out = learnable_idx(tmp_path / "idx"), str(tmp_path / "out")
    fg_bench(["accuracy", "--device", "cpu", "--dataset", "mnist", "--root", root, "--no-download", "--val-size", "32",
              "--batch-size", "8", "--epochs", "1", "--limit-train-batches", "2", "--seeds", "1", "--grid-growth", "0",
              "--models", "mlp", "mlp+groups=2+norm", "--estimators", "backprop", "local_activity", "--lrs", "0.1",
              "--out", out])
    with open(os.path.join(out, "accuracy.json")) as f:
        board = {(r["model"], r["estimator"]): r for r in json.load(f)["leaderboard"]}
    assert set(board) == {("mlp", "backprop"), ("mlp", "local_activity"), ("mlp+groups=2+norm", "local_activity")}
    row = board["mlp+groups=2+norm", "local_activity"]
    assert row["gap_vs_backprop"] == pytest.approx(row["test_acc"] - board["mlp", "backprop"]["test_acc"])
    # an architecture switch (the Mixer's residual) is the model of every estimator; the recipe's for the local ones
    fg_bench(["accuracy", "--device", "cpu", "--dataset", "mnist", "--root", root, "--no-download", "--val-size", "32",
              "--batch-size", "8", "--epochs", "1", "--limit-train-batches", "2", "--seeds", "1", "--grid-growth", "0",
              "--models", "mixer+residual+groups=2", "--estimators", "backprop", "local_activity", "--lrs", "0.1",
              "--out", out])
    with open(os.path.join(out, "accuracy.json")) as f:
        board = {(r["model"], r["estimator"]): r for r in json.load(f)["leaderboard"]}
    assert set(board) == {("mixer+residual", "backprop"), ("mixer+residual+groups=2", "local_activity")}
    row = board["mixer+residual+groups=2", "local_activity"]
    assert row["gap_vs_backprop"] == pytest.approx(row["test_acc"] - board["mixer+residual", "backprop"]["test_acc"])
    for bad, said in (("rnn", "unknown model 'rnn'"), ("mlp+wings=3", "wings")):
        with pytest.raises(SystemExit):
            fg_bench(["accuracy", "--models", bad])
        assert said in capsys.readouterr().err
