"""The README's examples run as written (on Fashion-MNIST from Debian's package)."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(__file__), "..", "README.md")
NEEDS_DATA = pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                                reason="needs Debian's dataset-fashion-mnist (.ci/run installs it)")


def run_example(marker, folder=None, monkeypatch=None) -> dict:
    """Run the README's one Python block that holds ``marker``; return its namespace."""
    blocks = re.findall(r"```python\n(.*?)```", open(README).read(), flags=re.S)
    example = [b for b in blocks if marker in b]
    assert len(example) == 1
    if monkeypatch is not None:
        monkeypatch.chdir(folder)
    namespace: dict = {}
    exec(compile(example[0], "README.md", "exec"), namespace)
    return namespace


@NEEDS_DATA
def test_readme_reuse_example_runs(tmp_path, monkeypatch):
    namespace = run_example("# README example", tmp_path, monkeypatch)
    assert namespace["trainer"].global_step == 20
    assert os.path.isdir(tmp_path / "tb_logs" / "readme")


@NEEDS_DATA
def test_readme_own_model_example_runs(tmp_path, monkeypatch):
    namespace = run_example("# README own-model example", tmp_path, monkeypatch)
    assert namespace["trainer"].global_step == 20
    assert type(namespace["module"].network).__name__ == "TorchNetwork"


def test_readme_engine_example_runs():
    namespace = run_example("from fg_lightning.engine import MLP")
    assert namespace["result"].dir_derivs.shape == (8,)


def test_readme_fabric_example_trains_the_adapters():
    pytest.importorskip("peft")
    pytest.importorskip("sklearn")
    namespace = run_example("# README Fabric example")
    losses = namespace["losses"]
    assert len(losses) == 2 * len(namespace["loader"])
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.1  # it learns
    assert all("lora_" in name or "modules_to_save" in name for name, _ in namespace["network"].named_parameters())
