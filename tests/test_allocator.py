"""fg_lightning.allocator: glibc's thresholds raised, so that a step's large tensors come from the heap, which keeps
what is freed, instead of mappings returned to the system at each free (the time it saves is measured in
results/cpu/speed-recipe, not asserted here)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys, torch
from fg_lightning.allocator import keep_freed_memory
libc = ctypes.CDLL("libc.so.6")
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t]
if sys.argv[1] == "keep":
    assert keep_freed_memory()
tensor = torch.ones(6 << 20)  # 24 MiB, an activation's size
print(int(tensor.data_ptr() < libc.sbrk(0)))  # 1: in the heap, below the program break; 0: a mapping of its own
"""


def in_heap(mode: str) -> bool:
    run = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return run.stdout.split()[-1] == "1"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc thresholds")
def test_a_large_tensor_comes_from_the_heap_once_freed_memory_is_kept():
    assert not in_heap("default")  # glibc maps a 24 MiB block apart and unmaps it when it is freed
    assert in_heap("keep")


def test_fg_cli_and_fg_bench_keep_freed_memory(monkeypatch):
    import fg_lightning.bench.cli as bench_cli
    from fg_lightning import cli

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append("fg-cli") or True)
    monkeypatch.setattr("fg_lightning.allocator.keep_freed_memory", lambda: calls.append("fg-bench") or True)
    monkeypatch.setattr(cli, "ForwardGradientCLI", lambda **kwargs: None)
    monkeypatch.setattr("importlib.import_module", lambda name: type("Bench", (), {"run": staticmethod(print)}))
    cli.main([])
    bench_cli.main(["speed", "--quick"])
    assert calls == ["fg-cli", "fg-bench"]
