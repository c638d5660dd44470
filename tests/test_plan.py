"""MemoryPlan: what each mode means on each device, and the layer family built from it."""
import pytest
import torch

from pocketdiffusion.memory.plan import MODES, MemoryPlan, ops_for, plan_for
from pocketdiffusion.models.attention import sdpa_attention
from pocketdiffusion.models.ops import DEFAULT_OPS


def test_modes_per_device():
    assert plan_for("balanced", "cpu").attention == "sdpa"
    assert plan_for("balanced", "mps").attention == "chunked"
    assert plan_for("balanced", "cuda").attention == "sdpa"
    assert not plan_for("balanced", "cpu").quantize_unet
    assert "balanced" in MODES
    with pytest.raises(ValueError, match="memory='huge': expected one of"):
        plan_for("huge", "cpu")


def test_ops_follow_the_plan():
    assert ops_for(MemoryPlan()) is DEFAULT_OPS
    ops = ops_for(MemoryPlan(attention="chunked", attention_chunk=7))
    q, k, v = (torch.randn(2, 30, 16) for _ in range(3))
    assert torch.allclose(ops.attention(q, k, v, 2), sdpa_attention(q, k, v, 2), atol=1e-5)
    with pytest.raises(ValueError, match="attention='flash3'"):
        ops_for(MemoryPlan(attention="flash3"))
    assert MemoryPlan().with_(vae_tile=32).vae_tile == 32
