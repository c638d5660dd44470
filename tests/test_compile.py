"""speed/compile.py: the fast plan's compiled UNet. Compiling takes a minute even for a tiny model
on this CPU, so the compiled numbers are checked on the device machine (tests/test_cuda_memory.py,
fast vs balanced); here the wrapper: channels_last, the cache location, the eager fallback."""
from __future__ import annotations

import pytest
import torch

from pocketdiffusion.memory.plan import lower_plan, plan_for
from pocketdiffusion.speed import compile as compile_module


class TinyUNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x, t, context, y=None):
        return self.conv(x) * t[:, None, None, None] + context.mean()


def test_a_compiler_failure_falls_back_to_eager_once(monkeypatch, tmp_path):
    monkeypatch.setenv("POCKETDIFFUSION_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")  # unset for compile_unet; restored after
    calls = []

    def broken_compile(module, **options):
        def run(*args, **kwargs):
            calls.append(1)
            raise RuntimeError("no triton here")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    unet = TinyUNet().eval()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), torch.randn(2, 3, 5)
    expected = unet(x, t, ctx)
    forward = compile_module.compile_unet(unet)
    assert unet.conv.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.warns(RuntimeWarning, match="torch.compile of the UNet failed.*no triton here"):
        got = forward(x, t, ctx)
    assert torch.allclose(got, expected, atol=1e-6)
    forward(x, t, ctx)  # no second try, no second warning
    assert calls == [1] and forward.state["failed"]
    import os
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")


def test_only_fast_on_cuda_compiles_and_the_fallback_drops_it():
    assert plan_for("fast", "cuda").compile and not plan_for("fast", "cpu").compile
    assert not any(plan_for(mode, "cuda").compile for mode in ("balanced", "low", "minimal"))
    lower = lower_plan(plan_for("fast", "cuda"))
    assert lower.mode == "balanced" and not lower.compile and not lower.cuda_graphs


@pytest.mark.parametrize("name, value, message", [
    ("POCKETDIFFUSION_COMPILE_MODE", "max-autotune", "expected one of .*max-autotune-no-cudagraphs"),
    ("POCKETDIFFUSION_COMPILE_MODE", "fastest", "POCKETDIFFUSION_COMPILE_MODE='fastest'"),
    ("POCKETDIFFUSION_CUDNN_BENCHMARK", "yes", "expected 1 \\(on\\) or 0 \\(off\\)"),
])
def test_bad_tuning_knobs_are_refused_before_anything_compiles(monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    unet = torch.nn.Conv2d(4, 4, 3)
    with pytest.raises(ValueError, match=message):
        compile_module.compile_unet(unet)
    assert unet.weight.is_contiguous()  # untouched: not turned channels_last


def test_good_tuning_knobs_are_read(monkeypatch):
    from pocketdiffusion.speed.compile import tuning_from_environment
    monkeypatch.delenv("POCKETDIFFUSION_COMPILE_MODE", raising=False)
    monkeypatch.delenv("POCKETDIFFUSION_CUDNN_BENCHMARK", raising=False)
    assert tuning_from_environment() == (None, False)
    monkeypatch.setenv("POCKETDIFFUSION_COMPILE_MODE", "max-autotune-no-cudagraphs")
    monkeypatch.setenv("POCKETDIFFUSION_CUDNN_BENCHMARK", "1")
    assert tuning_from_environment() == ("max-autotune-no-cudagraphs", True)
