"""Data parallelism: every estimator on two gloo processes takes the update of one process on the union batch."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch
from ddp_worker import K, cases, make, train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fg_lightning.cli import main as fg_cli
from fg_lightning.data import EpochPermutation
from fg_lightning.estimators.collective import Collective

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(HERE, "..", "configs")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


CASES = cases()


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


@pytest.mark.parametrize("name", ["naive", "multi_direction", "orthogonal", "partition", "local_weight", "zeroth_order"])
def test_random_directions_send_k_derivatives_the_loss_and_the_batch_size(name, two_ranks):
    """(zeroth_order: its k loss differences, the directional derivatives up to O(ε²))"""
    for model in ("mlp", "cnn"):
        sent = two_ranks[0][name, model]["bytes"]
        k = 1 if name == "naive" else K
        blocks = len(make(name, model)[0].block_parameters()) if name == "local_weight" else 1  # and local loss
        assert sent == [(k * blocks + 2) * 8] * len(sent)  # float64


@pytest.mark.parametrize("name", ["backprop", "local_backprop", "activity"])
def test_gradient_estimators_send_the_gradient(name, two_ranks):
    for model in ("mlp", "cnn"):
        result = two_ranks[0][name, model]
        # activity also asks where its rows are in the union batch, and sends each layer's gradient as it is formed
        # (under plain SGD), each with the batch size
        layers = len({n.rpartition(".")[0] for n, _ in make(name, model)[0].named_parameters()})
        extra = 8 + 8 * layers if name == "activity" else 0
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


# ------------------------------------------------------------------------------- fg-cli on two processes (Lightning)

FG_CLI = shutil.which("fg-cli")
needs_script = pytest.mark.skipif(FG_CLI is None, reason="fg-cli is not installed (pip install -e .)")



def fit_args(config, idx_root, save_dir, batch_size, *extra):
    return ["fit", "--config", os.path.join(CONFIGS, f"{config}.yaml"), "--data.root", idx_root,
            "--data.download", "false", "--data.batch_size", str(batch_size), "--data.val_size", "16",
            "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(save_dir),
            "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1", "--trainer.accelerator", "cpu",
            *extra]


def two_processes(argv, cwd):
    """fg-cli on two CPU processes: Lightning's launcher starts the second one by running the same command."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("FG_CLI_TRACEBACK", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["MASTER_PORT"] = str(free_port())
    env["PYTHONPATH"] = os.pathsep.join([HERE, *filter(None, [env.get("PYTHONPATH")])])  # faults.SignalAt
    return subprocess.run([FG_CLI, *argv, "--trainer.devices", "2"], cwd=cwd, env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)


def checkpoint(save_dir, config, version=0, name="last.ckpt"):
    return torch.load(os.path.join(str(save_dir), config, f"version_{version}", "checkpoints", name),
                      weights_only=False)


def scalars(save_dir, config, tag, version=0):
    values = {}
    for path in glob.glob(os.path.join(str(save_dir), config, f"version_{version}", "events.out.tfevents.*")):
        events = EventAccumulator(path)
        events.Reload()
        if tag in events.Tags()["scalars"]:
            values.update({e.step: e.value for e in events.Scalars(tag)})
    return values


@needs_script
@pytest.mark.parametrize("config, strategy", [("mlp_naive", None), ("mlp_backprop", "fg_ddp"),
                                              ("mlp_zeroth_order", "fg_ddp")],
                         ids=["naive-no-strategy", "backprop-fg_ddp", "zeroth_order-fg_ddp"])
def test_fg_cli_on_two_processes_is_one_process_on_the_union_batch(config, strategy, idx_root, tmp_path):
    """Two processes with batch 4 each end where one process with batch 8 ends (float32 tolerance); without
    --trainer.strategy fg-cli picks fg_ddp. perf/comm_bytes: K + 2 numbers for naive and zeroth_order (its k = 1 loss
    difference, the loss, the batch size), the gradient for backprop."""
    extra = ["--trainer.max_steps", "4"] + (["--trainer.strategy", strategy] if strategy else [])
    done = two_processes(fit_args(config, idx_root, tmp_path / "ddp", 4, *extra), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    fg_cli(fit_args(config, idx_root, tmp_path / "one", 8, "--trainer.max_steps", "4"))
    ddp, one = checkpoint(tmp_path / "ddp", config), checkpoint(tmp_path / "one", config)
    assert ddp["global_step"] == one["global_step"] == 4
    for name, value in one["state_dict"].items():
        torch.testing.assert_close(ddp["state_dict"][name], value, rtol=1e-4, atol=1e-6, msg=name)
    losses = scalars(tmp_path / "ddp", config, "train/loss")
    assert sorted(losses) == [0, 1, 2, 3]
    for step, loss in scalars(tmp_path / "one", config, "train/loss").items():
        assert losses[step] == pytest.approx(loss, rel=1e-5)
    n = sum(v.numel() for v in one["state_dict"].values())
    expected = 3 * 4 if config in ("mlp_naive", "mlp_zeroth_order") else (n + 2) * 4
    assert set(scalars(tmp_path / "ddp", config, "perf/comm_bytes").values()) == {expected}


@needs_script
def test_resumed_two_process_run_continues_exactly(idx_root, tmp_path):
    """Momentum (its ranking state and generator in the checkpoint) on two processes: resumed from the checkpoint of
    step 3, in the middle of an epoch, to step 6, it ends bit-for-bit where the uninterrupted run ends."""
    config, run = "mlp_momentum", tmp_path / "tb"
    extra = ["--model.estimator.init_args.fix_gap", "2", "--trainer.strategy", "fg_ddp", "--trainer.max_steps", "6"]
    every_3 = ('--trainer.callbacks+={"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": '
               '{"every_n_train_steps": 3, "save_top_k": -1, "filename": "{step}"}}')
    done = two_processes(fit_args(config, idx_root, run, 4, *extra, every_3), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    step_3 = os.path.join(str(run), config, "version_0", "checkpoints", "step=3.ckpt")
    done = two_processes(fit_args(config, idx_root, run, 4, *extra, "--ckpt_path", step_3), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    straight, resumed = checkpoint(run, config), checkpoint(run, config, 1)
    assert resumed["global_step"] == 6
    for name, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name


@needs_script
def test_lightning_ddp_is_refused_in_one_line(idx_root, tmp_path):
    done = two_processes(fit_args("mlp_naive", idx_root, tmp_path / "tb", 4, "--trainer.strategy", "ddp"), tmp_path)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("fg-cli: ConfigError: strategy DDPStrategy cannot train") and "fg_ddp" in lines[-1]
    assert "Traceback" not in done.stderr


def test_predict_on_several_processes_is_refused(idx_root, tmp_path, capsys):
    argv = ["predict", "--config", os.path.join(CONFIGS, "mlp_backprop.yaml"), "--data.root", idx_root,
            "--data.download", "false", "--data.val_size", "16", "--trainer.accelerator", "cpu", "--trainer.devices",
            "2", "--trainer.strategy", "fg_ddp", "--trainer.logger.init_args.save_dir", str(tmp_path)]
    with pytest.raises(SystemExit):
        fg_cli(argv)
    assert "ConfigError: predict writes the test set's probabilities in order to one file" in capsys.readouterr().err


def test_fg_ddp_waits_minutes_not_half_an_hour_and_refuses_wrapper_arguments():
    from lightning.pytorch import Trainer

    from fg_lightning.distributed import DEFAULT_TIMEOUT, ForwardGradientDDPStrategy

    assert DEFAULT_TIMEOUT == timedelta(minutes=5)
    assert Trainer(strategy="fg_ddp", accelerator="cpu", devices=2).strategy._timeout == DEFAULT_TIMEOUT
    assert ForwardGradientDDPStrategy(timeout=timedelta(seconds=20))._timeout == timedelta(seconds=20)
    with pytest.raises(ValueError, match="find_unused_parameters would do nothing"):
        ForwardGradientDDPStrategy(find_unused_parameters=True)


@needs_script
@pytest.mark.parametrize("signal_name, in_validation, what", [
    ("SIGKILL", False, "another process died"),
    ("SIGSTOP", False, "another process did not answer within 0:00:10"),
    ("SIGSTOP", True, "another process did not answer within 0:00:10"),
], ids=["killed", "stopped", "stopped-in-validation"])
def test_a_dead_or_stopped_peer_ends_the_run_in_one_line_naming_the_checkpoint(signal_name, in_validation, what,
                                                                                   idx_root, tmp_path):
    """Rank 1 dies (SIGKILL) or hangs (SIGSTOP) at the start of step 5 (or of the validation after step 5, where the
    logged metrics are all-reduced): rank 0 ends with one line naming its rank, the step and interrupted.ckpt
    (written, at step 5), within the 10 s timeout (plus shutdown) for the hung peer, whose process it kills."""
    pid_file, run = tmp_path / "rank1.pid", tmp_path / "tb"
    signal_at = ('--trainer.callbacks+={"class_path": "faults.SignalAt", "init_args": {"step": 5, '
                 f'"signal_name": "{signal_name}", "pid_file": "{pid_file}", '
                 f'"in_validation": {str(in_validation).lower()}}}}}')
    strategy = ["--trainer.strategy", "fg_lightning.ForwardGradientDDPStrategy", "--trainer.strategy.timeout",
                "0:00:10", "--trainer.val_check_interval", "5"]
    try:
        done = two_processes(fit_args("mlp_naive", idx_root, run, 4, "--trainer.max_steps", "20", signal_at,
                                      *strategy), tmp_path)
        ended = time.time()
        assert done.returncode == 1, done.stderr[-3000:]
        lines = [line for line in done.stderr.splitlines() if "fg-cli:" in line]
        assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
        ckpt = os.path.join(str(run), "mlp_naive", "version_0", "checkpoints", "interrupted.ckpt")
        assert lines[0].startswith(f"fg-cli: PeerLostError: rank 0 of 2: {what}"), lines[0]
        assert f"stopped at step 5; resume with --ckpt_path {ckpt}" in lines[0]
        assert torch.load(ckpt, weights_only=False)["global_step"] == 5
        if signal_name == "SIGSTOP":
            assert ended - os.path.getmtime(pid_file) < 10 + 8  # the timeout, then the checkpoint and the exit
            state = subprocess.run(["ps", "-o", "stat=", "-p", pid_file.read_text()], capture_output=True, text=True)
            assert state.stdout.strip() in ("", "Z"), "the stopped rank was left behind"
    finally:
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)


TORCHRUN = shutil.which("torchrun")


@needs_script
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
def test_two_nodes_through_torchrun_take_the_union_batch_update(idx_root, tmp_path):
    """Two "machines" on this one: two torchrun commands of one process each, meeting through a c10d rendezvous on
    localhost (as two hosts would at node 0's address), end where one process with the doubled batch ends."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    rendezvous = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                  f"localhost:{free_port()}", "--rdzv-id", "two-nodes"]
    argv = fit_args("mlp_naive", idx_root, tmp_path / "nodes", 4, "--trainer.max_steps", "4", "--trainer.devices",
                    "1", "--trainer.num_nodes", "2", "--trainer.strategy", "fg_ddp")
    nodes = [subprocess.Popen([TORCHRUN, *rendezvous, "-m", "fg_lightning.cli", *argv], cwd=tmp_path,
                              env={**env, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    for node in nodes:
        output = node.communicate(timeout=300)[0]
        assert node.returncode == 0, output[-3000:]
    fg_cli(fit_args("mlp_naive", idx_root, tmp_path / "one", 8, "--trainer.max_steps", "4"))
    two, one = checkpoint(tmp_path / "nodes", "mlp_naive"), checkpoint(tmp_path / "one", "mlp_naive")
    assert two["global_step"] == one["global_step"] == 4
    for name, value in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][name], value, rtol=1e-4, atol=1e-6, msg=name)
