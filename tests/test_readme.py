"""The README's examples run as written (on Fashion-MNIST from Debian's package)."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                    reason="needs Debian's dataset-fashion-mnist (.ci/run installs it)")
def test_readme_reuse_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", open(README).read(), flags=re.S)
    example = [b for b in blocks if b.startswith("# README example")]
    assert len(example) == 1
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example[0], "README.md", "exec"), namespace)
    assert namespace["trainer"].global_step == 20
    assert os.path.isdir(tmp_path / "tb_logs" / "readme")


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                    reason="needs Debian's dataset-fashion-mnist (.ci/run installs it)")
def test_readme_own_model_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", open(README).read(), flags=re.S)
    example = [b for b in blocks if b.startswith("# README own-model example")]
    assert len(example) == 1
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example[0], "README.md", "exec"), namespace)
    assert namespace["trainer"].global_step == 20
    assert type(namespace["module"].network).__name__ == "TorchNetwork"


def test_readme_engine_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", open(README).read(), flags=re.S)
    engine = [b for b in blocks if "from fg_lightning.engine import MLP" in b]
    assert len(engine) == 1
    namespace: dict = {}
    exec(compile(engine[0], "README.md", "exec"), namespace)
    assert namespace["result"].dir_derivs.shape == (8,)
