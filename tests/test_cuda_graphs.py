"""CUDA graphs around the UNet call (speed/cuda_graphs.py). The replay tests need a GPU (they run
on the device machine: `python3 -m pytest -q tests/test_cuda_graphs.py`); on the CPU only the
refusal is checked, and that the plan never graphs a CPU UNet."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import ckpt_fixtures as fx
import pocketdiffusion
from pocketdiffusion.speed import GraphedModel

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def test_a_cpu_call_is_refused_with_a_clear_message():
    graphed = GraphedModel(lambda x, t, **cond: x)
    with pytest.raises(ValueError, match="GraphedModel needs CUDA tensors"):
        graphed(torch.zeros(1, 4, 8, 8), torch.zeros(1))
    with pytest.raises(TypeError, match="wraps a callable"):
        GraphedModel(42)


@pytest.fixture(scope="module")
def tiny_sd1(tmp_path_factory):
    config = fx.tiny_config("sd1")
    return str(fx.write_diffusers_folder(tmp_path_factory.mktemp("models") / "tiny_sd1", config,
                                         fx.diffusers_models(config, seed=1)))


def test_the_plan_never_graphs_a_cpu_unet(tiny_sd1):
    pipe = pocketdiffusion.load(tiny_sd1, device="cpu")
    pipe.use_plan(pipe.plan.with_(cuda_graphs=True))
    assert not isinstance(pipe.model_call, GraphedModel)
    assert len(pipe.generate("a cat", steps=2, width=64, height=64)) == 1


@cuda
def test_replay_equals_the_eager_call_and_takes_new_inputs():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 1)).cuda()

    def model(x, t, *, context):
        return layer(x) * t[:, None, None, None] + context.mean()

    graphed = GraphedModel(model)
    with torch.inference_mode():
        for seed in range(3):  # new values each call: inputs are copied in, not baked in
            g = torch.Generator("cuda").manual_seed(seed)
            x = torch.randn(2, 4, 16, 16, device="cuda", generator=g)
            t = torch.rand(2, device="cuda", generator=g)
            ctx = torch.randn(2, 5, 8, device="cuda", generator=g)
            assert torch.equal(graphed(x, t, context=ctx), model(x, t, context=ctx))
        assert graphed.captures == 1
        graphed(torch.randn(1, 4, 32, 32, device="cuda"), torch.rand(1, device="cuda"), context=ctx[:1])
        assert graphed.captures == 2  # a new signature captures once more


@cuda
def test_a_graphed_pipeline_gives_the_eager_pictures_and_captures_once(tiny_sd1):
    pipe = pocketdiffusion.load(tiny_sd1, device="cuda")
    pipe.use_plan(pipe.plan.with_(cuda_graphs=False, graphs_per_run=False))
    settings = {"steps": 4, "width": 64, "height": 64, "cfg": 5.0}
    eager = [np.asarray(pipe.generate(p, seed=s, **settings)[0], np.int16) for p, s in (("a cat", 1), ("a dog", 2))]
    pipe.use_plan(pipe.plan.with_(cuda_graphs=True))  # kept across generations, as fast keeps them
    assert isinstance(pipe.model_call, GraphedModel)
    graphed = [np.asarray(pipe.generate(p, seed=s, **settings)[0], np.int16) for p, s in (("a cat", 1), ("a dog", 2))]
    for a, b in zip(eager, graphed):
        assert np.abs(a - b).max() <= 1
    assert pipe.model_call.captures == 1  # the second prompt reused the first one's graph


@cuda
def test_the_kept_graphs_lend_their_pool_and_replays_stay_right():
    """fast's decode allocates from the kept graphs' pool (lend_pool) instead of beside it."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Conv2d(4, 64, 3, padding=1), torch.nn.SiLU(),
                                torch.nn.Conv2d(64, 4, 1)).cuda()

    def model(x, t):
        return layer(x) * t[:, None, None, None]

    graphed = GraphedModel(model)
    x, t = torch.randn(2, 4, 128, 128, device="cuda"), torch.rand(2, device="cuda")
    with torch.inference_mode():
        want = model(x, t)
        assert torch.equal(graphed(x, t), want)
        segments = graphed._pool.snapshot()
        spans = [(s["address"], s["address"] + s["total_size"]) for s in segments]
        pool_bytes, reserved = sum(s["total_size"] for s in segments), torch.cuda.memory_reserved()
        with graphed.lend_pool():
            assert torch.cuda.current_stream() == graphed._stream
            borrowed = torch.empty(2, 64, 128, 128, device="cuda")  # the graph's activation size
            address = borrowed.data_ptr()
            borrowed.fill_(7.0)
            del borrowed
        assert any(lo <= address < hi for lo, hi in spans)  # a block of the pool, not a new one
        assert sum(s["total_size"] for s in graphed._pool.snapshot()) == pool_bytes
        assert torch.cuda.memory_reserved() == reserved
        assert torch.equal(graphed(x, t), want)  # the replay overwrote what the body left
    per_run = GraphedModel(model, per_run=True)
    with per_run.lend_pool():  # nothing to lend: per-run graphs are freed before the decode
        assert torch.cuda.current_stream() == torch.cuda.default_stream()


def test_a_channels_last_unet_call_gives_the_nchw_result(tiny_sd1):
    """MemoryPlan.channels_last (a benchmark variant, no named plan's default: balanced's peak)."""
    from pocketdiffusion.memory.plan import MODES, lower_plan, plan_for
    from pocketdiffusion.pipelines.base import model_call
    assert not any(plan_for(m, d).channels_last for m in MODES for d in ("cuda", "cpu"))
    assert not lower_plan(plan_for("balanced", "cuda").with_(channels_last=True)).channels_last  # int8: NCHW
    parts = pocketdiffusion.load(tiny_sd1, device="cpu", dtype=torch.float32).parts
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 20.0])
    ctx = torch.randn(2, 77, parts.config.unet.context_dim)
    with torch.inference_mode():
        want = model_call(parts)(x, t, context=ctx)
        got = model_call(parts, channels_last=True)(x, t, context=ctx)
    conv_weights = [p for p in parts.unet.parameters() if p.dim() == 4]
    assert conv_weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in conv_weights)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert got.is_contiguous()  # the latents (and the decode after them) stay NCHW


def test_the_fast_mode_graphs_only_on_cuda_and_falls_back_to_balanced():
    from pocketdiffusion.memory.plan import lower_plan, plan_for
    assert plan_for("fast", "cuda").cuda_graphs and not plan_for("fast", "cpu").cuda_graphs
    assert not plan_for("fast", "cuda").graphs_per_run  # fast keeps its graphs across generations
    for mode in ("balanced", "low"):  # eager UNet graphed per generation; minimal streams, so never
        assert plan_for(mode, "cuda").cuda_graphs and plan_for(mode, "cuda").graphs_per_run
        assert not plan_for(mode, "cpu").cuda_graphs
    assert not plan_for("minimal", "cuda").cuda_graphs
    lower = lower_plan(plan_for("fast", "cuda"))
    assert lower.mode == "balanced" and not lower.cuda_graphs  # an OOM first gives up the graphs


def test_fast_on_the_cpu_gives_the_balanced_pictures(tiny_sd1):
    settings = {"steps": 2, "width": 64, "height": 64, "seed": 3}
    fast = pocketdiffusion.load(tiny_sd1, device="cpu", memory="fast")
    assert not isinstance(fast.model_call, GraphedModel)
    balanced = pocketdiffusion.load(tiny_sd1, device="cpu")
    assert np.array_equal(np.asarray(fast.generate("a cat", **settings)[0]),
                          np.asarray(balanced.generate("a cat", **settings)[0]))


@cuda
def test_per_run_graphs_run_the_first_call_eager_and_give_their_memory_back():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Conv2d(4, 64, 3, padding=1), torch.nn.SiLU(),
                                torch.nn.Conv2d(64, 4, 1)).cuda()

    def model(x, t, *, context):
        return layer(x) * t[:, None, None, None] + context.mean()

    graphed = GraphedModel(model, per_run=True)
    x = torch.randn(2, 4, 128, 128, device="cuda")
    t, ctx = torch.rand(2, device="cuda"), torch.randn(2, 5, 8, device="cuda")
    with torch.inference_mode():
        expected = model(x, t, context=ctx)
        assert torch.equal(graphed(x, t, context=ctx), expected) and graphed.captures == 0  # eager
        assert torch.equal(graphed(x, t, context=ctx), expected) and graphed.captures == 1  # captured
        held = torch.cuda.memory_reserved()
        graphed.end_run()
        assert torch.cuda.memory_reserved() < held  # the pool (the 64-channel activations) is gone
        # warmed up already: the next generation captures at its first call
        assert torch.equal(graphed(x, t, context=ctx), expected) and graphed.captures == 2
        assert torch.equal(graphed(x, t, context=ctx), expected) and graphed.captures == 2


@cuda
def test_balanced_on_cuda_graphs_each_generation_and_equals_the_eager_pictures(tiny_sd1):
    pipe = pocketdiffusion.load(tiny_sd1, device="cuda")
    assert pipe.plan.graphs_per_run and isinstance(pipe.model_call, GraphedModel)
    settings = {"steps": 4, "width": 64, "height": 64, "cfg": 5.0}
    graphed = [np.asarray(pipe.generate(p, seed=s, **settings)[0], np.int16) for p, s in (("a cat", 1), ("a dog", 2))]
    assert pipe.model_call.captures == 2 and not pipe.model_call._graphs  # one per generation, freed after
    pipe.use_plan(pipe.plan.with_(cuda_graphs=False, graphs_per_run=False))
    eager = [np.asarray(pipe.generate(p, seed=s, **settings)[0], np.int16) for p, s in (("a cat", 1), ("a dog", 2))]
    for a, b in zip(eager, graphed):
        assert np.abs(a - b).max() <= 1
