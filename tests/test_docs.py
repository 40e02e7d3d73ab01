"""The examples in the README and on the documentation site (docs/*.md) run as written: every ```python block is
run by a test here, found by the marker comment on its first line. The site itself is built by
``mkdocs build --strict`` in ``.ci/run`` (broken links and missing API references fail it)."""

import glob
import os
import re

import pytest
from idx_files import needs_fashion

ROOT = os.path.join(os.path.dirname(__file__), "..")
PAGES = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
# The marker on the first line of each python block, and the test that runs it.
MARKERS = {
    "# README own-model example": "test_readme_own_model_example_runs",
    "# docs example": "test_reuse_example_runs",
    "# docs own-model example": "test_own_model_example_runs",
    "# docs engine example": "test_engine_example_runs",
    "# docs Fabric example": "test_fabric_example_trains_the_adapters",
}


def blocks(language: str) -> list[tuple[str, str]]:
    """Every ```<language> block of every page, as (page, code)."""
    found = []
    for page in PAGES:
        for code in re.findall(rf"^```{language}\n(.*?)^```", open(page).read(), flags=re.S | re.M):
            found.append((os.path.relpath(page, ROOT), code))
    return found


def run_example(marker, folder=None, monkeypatch=None) -> dict:
    """Run the one python block whose first line starts with ``marker``; return its namespace."""
    example = [(page, code) for page, code in blocks("python") if code.split("\n", 1)[0].split(" (")[0] == marker]
    assert len(example) == 1, (marker, [page for page, _ in example])
    if monkeypatch is not None:
        monkeypatch.chdir(folder)
    namespace: dict = {}
    exec(compile(example[0][1], example[0][0], "exec"), namespace)
    return namespace


def test_every_python_block_is_run_by_a_test():
    import sys

    tests = vars(sys.modules[__name__])
    for page, code in blocks("python"):
        marker = code.split("\n", 1)[0].split(" (")[0]
        assert marker in MARKERS, f"{page}: a python block without a known marker on its first line: {marker!r}"
        assert MARKERS[marker] in tests, MARKERS[marker]


def test_every_config_a_page_names_exists():
    named = {name for page in PAGES for name in re.findall(r"configs/([a-z0-9_]+\.yaml)", open(page).read())}
    assert named, "no page names a config"
    missing = sorted(name for name in named if not os.path.isfile(os.path.join(ROOT, "configs", name)))
    assert not missing, missing


def test_every_fg_bench_command_a_page_names_exists():
    from fg_lightning.bench.cli import parser

    commands = parser()._subparsers._group_actions[0].choices
    named = {name for page in PAGES for name in re.findall(r"(?:`|^)(?:[A-Z_]+=\S+ )?fg-bench ([a-z]+)",
                                                                 open(page).read(), flags=re.M)}
    assert named - {"all"} and not named - set(commands), named - set(commands)


def test_the_api_reference_documents_every_public_name():
    import fg_lightning

    page = open(os.path.join(ROOT, "docs", "api.md")).read()
    documented = {line.rsplit(".", 1)[-1] for line in re.findall(r"^::: (\S+)", page, flags=re.M)}
    assert not set(fg_lightning.__all__) - documented, set(fg_lightning.__all__) - documented


def test_the_readme_stays_short():
    assert len(open(PAGES[0]).read().splitlines()) <= 200


@needs_fashion
def test_readme_own_model_example_runs(tmp_path, monkeypatch):
    namespace = run_example("# README own-model example", tmp_path, monkeypatch)
    assert namespace["trainer"].global_step == 20
    assert type(namespace["module"].network).__name__ == "TorchNetwork"


@needs_fashion
def test_reuse_example_runs(tmp_path, monkeypatch):
    namespace = run_example("# docs example", tmp_path, monkeypatch)
    assert namespace["trainer"].global_step == 20
    assert os.path.isdir(tmp_path / "tb_logs" / "docs")


@needs_fashion
def test_own_model_example_runs(tmp_path, monkeypatch):
    namespace = run_example("# docs own-model example", tmp_path, monkeypatch)
    assert namespace["trainer"].global_step == 20
    assert type(namespace["module"].network).__name__ == "TorchNetwork"


def test_engine_example_runs():
    namespace = run_example("# docs engine example")
    assert namespace["result"].dir_derivs.shape == (8,)


def test_fabric_example_trains_the_adapters():
    pytest.importorskip("peft")
    pytest.importorskip("sklearn")
    namespace = run_example("# docs Fabric example")
    losses = namespace["losses"]
    assert len(losses) == 2 * len(namespace["loader"])
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.1  # it learns
    assert all("lora_" in name or "modules_to_save" in name for name, _ in namespace["network"].named_parameters())
