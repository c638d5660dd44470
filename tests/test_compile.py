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


@pytest.mark.slow
def test_the_compiled_unet_is_saved_once_and_loaded_by_the_next_process(monkeypatch, tmp_path):
    """The AOT artifact holds the graph and kernels, not the weights: a second UNet of the same
    architecture (other weights, as in a new process with another checkpoint) loads it instead of
    compiling, and computes with its own weights. About 30 s of compiling on this CPU."""
    import ckpt_fixtures as fx

    from pocketdiffusion.models.unet import UNetModel

    if not hasattr(torch.compile(lambda v: v, fullgraph=True), "aot_compile"):
        pytest.skip("this torch has no torch.compile(...).aot_compile")
    monkeypatch.setenv("POCKETDIFFUSION_CACHE", str(tmp_path))
    config = fx.tiny_config("sd1").unet
    x, t = torch.randn(2, config.in_channels, 16, 16), torch.tensor([500.0, 20.0])
    ctx = torch.randn(2, 77, config.context_dim)
    outputs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        unet = UNetModel(config).eval()
        forward = compile_module.compile_unet(unet)
        with torch.inference_mode():
            outputs.append((forward(x, t, ctx), unet(x, t, ctx), dict(forward.state)))
    (first, first_eager, first_state), (second, second_eager, second_state) = outputs
    assert (first_state["compiled"], first_state["loaded"]) == (1, 0)
    assert (second_state["compiled"], second_state["loaded"]) == (0, 1)  # loaded, not compiled
    assert len(list((tmp_path / "aot").glob("unet-*.pt"))) == 1
    torch.testing.assert_close(first, first_eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(second, second_eager, rtol=1e-4, atol=1e-4)  # its own weights
    assert not torch.allclose(first, second)


def test_a_saved_unet_that_cannot_run_is_compiled_anew(monkeypatch, tmp_path):
    """An AOT artifact whose guards or kernels fail at its first call (another driver, a changed
    torch) gives way to the lazy torch.compile with a warning, not to the eager UNet."""
    monkeypatch.setenv("POCKETDIFFUSION_CACHE", str(tmp_path))

    def stale(x, t, context, y=None):
        raise RuntimeError("GuardManager check failed")
    stale.aot = True
    monkeypatch.setattr(compile_module, "_aot_call", lambda *args: stale)
    monkeypatch.setattr(torch, "compile", lambda module, **options: module)  # "compiled": the module itself
    unet = TinyUNet().eval()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), torch.randn(2, 3, 5)
    forward = compile_module.compile_unet(unet)
    with pytest.warns(RuntimeWarning, match="saved compiled UNet failed.*GuardManager"):
        got = forward(x, t, ctx)
    assert torch.allclose(got, unet(x, t, ctx), atol=1e-6) and not forward.state["failed"]
    assert forward(x, t, ctx) is not None  # the lazy call stays; no second warning


def test_a_cache_that_cannot_be_written_costs_only_the_next_start(monkeypatch, tmp_path):
    """The compiled UNet is still used; the warning names the path; no half-written file stays."""
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setattr(compile_module, "aot_dir", lambda: blocker / "aot")

    class Compiled:
        def save_compiled_function(self, path):
            raise AssertionError("never reached: the folder cannot be made")

    with pytest.warns(RuntimeWarning, match="could not save the compiled UNet to .*not_a_folder"):
        compile_module._save(Compiled(), blocker / "aot" / "unet-x.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_folder"]


def test_the_artifact_name_changes_with_inductor_switches_and_layout_not_weights(monkeypatch):
    """The saved artifact is shared by every checkpoint of an architecture (weights are inputs),
    but not across Inductor switches from the environment, which change its kernels."""
    monkeypatch.delenv("TORCHINDUCTOR_COORDINATE_DESCENT_TUNING", raising=False)
    args = (torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), torch.randn(2, 3, 5))

    def name(unet, inputs=args):
        return compile_module._fingerprint(unet, inputs, None, None)

    torch.manual_seed(0)
    first = name(TinyUNet())
    torch.manual_seed(1)
    assert name(TinyUNet()) == first  # other weights, same artifact
    assert name(TinyUNet(), (torch.randn(2, 4, 16, 16), *args[1:])) != first  # another latent size
    monkeypatch.setenv("TORCHINDUCTOR_COORDINATE_DESCENT_TUNING", "1")
    assert name(TinyUNet()) != first
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")  # where the cache is: not what it holds
    monkeypatch.delenv("TORCHINDUCTOR_COORDINATE_DESCENT_TUNING")
    assert name(TinyUNet()) == first
