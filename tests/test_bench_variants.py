"""bench/memory_gpu.py checks its rows before it starts any process: a plan variant names
MemoryPlan fields with Python literals, and a wrong one says what was wrong."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "memory_gpu", Path(__file__).resolve().parent.parent / "bench" / "memory_gpu.py")
memory_gpu = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(memory_gpu)


def test_good_rows_pass():
    for which in ("balanced", "fast:stream_vae=True,park_idle=False", "low:vae_tile=24,vae_tile_overlap=6",
                  "minimal:vae_tile_above=None"):
        memory_gpu.check_variant(which)


@pytest.mark.parametrize("which, message", [
    ("turbo", "unknown row 'turbo'"),
    ("fast:stream_vea=True", "'stream_vea=True' is not field=value with a MemoryPlan field"),
    ("fast:stream_vae", "'stream_vae' is not field=value"),
    ("low:vae_tile=abc", "the value of vae_tile must be a Python literal"),
    ("low:mode=fast", "'mode=fast' is not field=value"),
])
def test_bad_rows_say_what_was_wrong(which, message):
    with pytest.raises(ValueError, match=message):
        memory_gpu.check_variant(which)


def test_device_cpu_hands_over_to_the_cpu_table(monkeypatch, capsys):
    """`--device cpu` runs bench/memory_cpu.py with the remaining options (its own, checked by it)."""
    monkeypatch.setattr("sys.argv", ["memory_gpu.py", "--device", "cpu", "--help"])
    with pytest.raises(SystemExit) as done:
        memory_gpu.main()
    assert done.value.code == 0 and "memory_cpu.py" in capsys.readouterr().out
    monkeypatch.setattr("sys.argv", ["memory_gpu.py", "--device", "cpu", "--arch", "sdxl"])
    with pytest.raises(SystemExit) as done:
        memory_gpu.main()
    assert done.value.code == 2 and "unrecognized arguments: --arch sdxl" in capsys.readouterr().err
