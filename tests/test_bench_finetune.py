"""fg-bench finetune on a tiny run: a pretraining of two steps on small IDX files, three methods on three seeds and a
refused one, the memory cases of the fine-tuned ViT; the files it writes and their numbers consistent with each other;
bad input refused in one line before anything runs."""

from __future__ import annotations

import csv
import json
import os
import statistics

import pytest
import torch

from fg_lightning.bench.cli import main as fg_bench, parse

pytest.importorskip("peft")
pytest.importorskip("sklearn")

METHODS = ["backprop_adamw", "backprop_checkpointed", "zeroth_order_lora", "activity"]


@pytest.fixture(scope="module")
def tiny_run(idx_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("finetune"))
    fg_bench(["finetune", "--device", "cpu", "--out", out, "--root", idx_root, "--no-download", "--pretrain-steps", "2",
              "--steps", "4", "--eval-every", "2", "--methods", *METHODS, "--memory-models", "vit"])
    with open(os.path.join(out, "finetune.json")) as f:
        return out, json.load(f)


def test_files_and_their_numbers_agree(tiny_run, capsys):
    out, report = tiny_run
    for name in ("finetune.json", "finetune.md", "finetune.csv", "finetune.png", "pretrained_vit.ckpt"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    assert report["meta"]["pretrained"] == "now" and report["meta"]["pretrain_steps"] == 2

    runs = {(r["method"], r["seed"]): r for r in report["runs"]}
    for method in ("backprop_adamw", "zeroth_order_lora"):  # three seeds each, evaluated at steps 0, 2, 4
        assert sorted(seed for name, seed in runs if name == method) == [0, 1, 2]
    for run in (r for r in report["runs"] if "error" not in r):
        assert [step for step, _, _ in run["curve"]] == [0, 2, 4]
        assert all(0 <= acc <= 1 for _, _, acc in run["curve"]) and run["test_acc"] == run["curve"][-1][2]
        assert len(run["step_ms"]) == 4 and run["train_s"] == pytest.approx(sum(run["step_ms"]) / 1e3)
        seconds = [s for _, s, _ in run["curve"]]
        assert seconds[0] == 0 and seconds == sorted(seconds) and seconds[-1] == pytest.approx(run["train_s"])
    assert runs[("backprop_adamw", 0)]["trainable_params"] > 10 * runs[("zeroth_order_lora", 0)]["trainable_params"]
    # activation checkpointing takes the same update: trained on seed 0 only, the same accuracies as backprop's
    assert [seed for name, seed in runs if name == "backprop_checkpointed"] == [0]
    assert ([a for _, _, a in runs[("backprop_checkpointed", 0)]["curve"]]
            == [a for _, _, a in runs[("backprop_adamw", 0)]["curve"]])
    # activity perturbation refuses the ViT (attention returns a tuple): its one-line message, no other seed tried
    (refused,) = [r for r in report["runs"] if r["method"] == "activity"]
    assert "returns a tuple" in refused["error"] and "\n" not in refused["error"]

    memory = {r["case"]: r for r in report["memory"]}
    assert set(memory) == {"inference", "backprop_adamw", "backprop_checkpointed", "zeroth_order_lora"}  # not activity
    for case, record in memory.items():
        assert record["model"] == "vit" and record["batch_size"] == 50
        assert record["total_mb"] == pytest.approx(record["above_rest_mb"] + record["resident_mb"])
        assert record["ratio"] == pytest.approx(record["total_mb"] / memory["inference"]["total_mb"])
    weights_mb = runs[("backprop_adamw", 0)]["trainable_params"] * 4 / 2**20
    assert memory["inference"]["resident_mb"] > weights_mb  # the weights and the batch
    assert memory["backprop_adamw"]["resident_mb"] > 3 * weights_mb  # and AdamW's two moments
    # At this size the kept activations outweigh the rest (measured 15.4 MB without checkpointing, 7.0 MB with)
    assert memory["backprop_checkpointed"]["total_mb"] < 0.8 * memory["backprop_adamw"]["total_mb"]

    rows = {r["method"]: r for r in report["records"]}
    assert list(rows) == ["inference", *METHODS]
    for method in ("backprop_adamw", "zeroth_order_lora"):
        accs = [runs[(method, seed)]["test_acc"] for seed in (0, 1, 2)]
        assert rows[method]["test_acc_mean"] == pytest.approx(statistics.mean(accs))
        assert rows[method]["test_acc_sd"] == pytest.approx(statistics.stdev(accs))
        assert rows[method]["ratio[vit]"] == memory[method]["ratio"]
    assert rows["zeroth_order_lora"]["gap_points"] == pytest.approx(
        100 * (rows["zeroth_order_lora"]["test_acc_mean"] - rows["backprop_adamw"]["test_acc_mean"]))
    assert "returns a tuple" in rows["activity"]["error"]
    with open(os.path.join(out, "finetune.csv")) as f:
        assert [r["method"] for r in csv.DictReader(f)] == list(rows)
    with open(os.path.join(out, "finetune.md")) as f:
        text = f.read()
    assert "zeroth_order_lora" in text and "(<= 1.1x)" in text and "backprop_adamw" in text

    # the pretrained model is reused on the next run into the same folder, and said so
    from fg_lightning.bench.finetune import pretrain

    again = pretrain(parse(["finetune", "--out", out, "--root", "nowhere"]), torch.device("cpu"))
    assert again["pretrained"] == "reused" and again["pretrain_steps"] == 2
    assert "reusing" in capsys.readouterr().out


@pytest.mark.parametrize("bad, named", [
    (["--methods", "backprop_adamw", "nope"], "invalid choice: 'nope'"),
    (["--steps", "0"], "--steps: must be >= 1, got 0"),
    (["--eval-every", "-1"], "--eval-every: must be >= 1, got -1"),
    (["--seeds", "0", "0"], "--seeds must differ, got [0, 0]"),
    (["--checkpoint", "no/such.ckpt"], "checkpoint 'no/such.ckpt' is not a file"),
])
def test_bad_input_is_refused_in_one_line_before_anything_runs(tmp_path, capsys, bad, named):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        fg_bench(["finetune", "--device", "cpu", "--out", str(out), *bad])
    message = str(exit_info.value.code) if isinstance(exit_info.value.code, str) else capsys.readouterr().err
    assert named in message
    assert not out.exists()


def test_a_checkpoint_that_does_not_fit_is_refused_naming_it(tmp_path):
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"network.module.heads.head.weight": torch.zeros(3, 3)}}, other)
    with pytest.raises(SystemExit, match=r"^fg-bench finetune: --checkpoint: checkpoint '.*other.ckpt' does not fit "
                                         r"VisionTransformer .*missing"):
        fg_bench(["finetune", "--device", "cpu", "--out", str(tmp_path / "out"), "--checkpoint", str(other)])
    assert not (tmp_path / "out").exists()


def test_quick_preset_keeps_three_seeds_and_every_method():
    from fg_lightning.bench.finetune import METHODS, QUICK

    args = parse(["finetune", "--quick", "--steps", "500"])
    preset = dict(zip(QUICK[::2], QUICK[1::2]))
    assert args.steps == int(preset["--steps"]) < 500  # the preset's, in place of the user's
    assert args.seeds == [0, 1, 2] and args.methods == list(METHODS)
    assert args.out is None  # results/cpu/finetune-quick, filled in as the run starts
