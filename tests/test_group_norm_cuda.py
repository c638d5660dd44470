"""GroupNorm (+ SiLU) by the Triton kernels of speed/group_norm_cuda.py. The kernel tests need a
GPU with Triton (the device machine: `python3 -m pytest -q tests/test_group_norm_cuda.py`); on the
CPU the layers are checked to be PyTorch's GroupNorm (+ SiLU) exactly, and the plans to pick them
only on CUDA."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pocketdiffusion.memory.plan import MemoryPlan, ops_for
from pocketdiffusion.models.ops import DEFAULT_OPS, GroupNormSiLU
from pocketdiffusion.memory.plan import plan_for
from pocketdiffusion.speed.group_norm_cuda import HOST_BOUND_MIN_ELEMENTS, CudaGroupNorm, CudaGroupNormSiLU, group_norm

try:
    import triton  # noqa: F401
    has_triton = True
except ImportError:
    has_triton = False
gpu = pytest.mark.skipif(not (torch.cuda.is_available() and has_triton), reason="the kernels need CUDA and Triton")

# SD's shapes: the VAE decoder at 512x512 (batch 1), the UNet's levels with CFG (batch 2), and
# odd sizes (a span that is not a multiple of the chunk, a single-chunk group, 3-D input).
SHAPES = [((1, 128, 512, 512), 32), ((1, 512, 64, 64), 32), ((2, 320, 64, 64), 32), ((2, 1280, 8, 8), 32),
          ((3, 12, 37, 53), 4), ((2, 64, 1000), 8)]


def test_the_layers_equal_pytorchs_groupnorm_and_silu_off_cuda():
    torch.manual_seed(0)
    x = torch.randn(2, 64, 9, 9)
    plain, fused = CudaGroupNorm(8, 64, eps=1e-6), CudaGroupNormSiLU(8, 64, eps=1e-6)
    for layer in (plain, fused):
        torch.nn.init.normal_(layer.weight)
        torch.nn.init.normal_(layer.bias)
    expected = F.group_norm(x, 8, plain.weight, plain.bias, 1e-6)
    assert torch.equal(plain(x), expected)
    fused.load_state_dict(plain.state_dict())
    assert torch.equal(fused(x), F.silu(expected))
    model_layer = GroupNormSiLU(8, 64, eps=1e-6)
    model_layer.load_state_dict(plain.state_dict())
    assert torch.equal(model_layer(x), F.silu(expected))


def test_the_plans_use_the_kernels_on_cuda_only():
    assert ops_for(MemoryPlan(), "cpu") is DEFAULT_OPS
    for mode, least in (("fast", 0), ("balanced", 0), ("low", 0), ("minimal", HOST_BOUND_MIN_ELEMENTS)):
        ops = ops_for(plan_for(mode, "cuda"), "cuda")
        norm, fused = ops.GroupNorm(4, 8), ops.GroupNormSiLU(4, 8)
        assert type(norm) is CudaGroupNorm and type(fused) is CudaGroupNormSiLU, mode
        assert norm.min_elements == fused.min_elements == least, mode  # minimal's steps are host-bound
        assert ops.attention is DEFAULT_OPS.attention
    assert type(ops_for(MemoryPlan(attention="chunked", attention_chunk=3), "cuda").GroupNorm(4, 8)) is CudaGroupNorm
    assert ops_for(MemoryPlan(norm_kernels=False), "cuda") is DEFAULT_OPS  # the bench's comparison row


@gpu
@pytest.mark.parametrize("shape,groups", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_the_kernels_equal_pytorch(shape, groups, dtype, silu, layout):
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("channels-last is a 4-D layout")
    torch.manual_seed(0)
    x = (torch.randn(shape, device="cuda") * 3 + 0.5).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(shape[1], device="cuda", dtype=dtype)
    bias = torch.randn(shape[1], device="cuda", dtype=dtype)
    got = group_norm(x, groups, weight, bias, 1e-6, silu=silu)
    assert got is not None and got.dtype == dtype and got.shape == x.shape and got.stride() == x.stride()
    # The reference in float64 from the same inputs; both round their result once to `dtype`.
    reference = F.group_norm(x.double(), groups, weight.double(), bias.double(), 1e-6)
    if silu:
        reference = F.silu(reference)
    error = (got.double() - reference).abs().max().item()
    native = F.group_norm(x, groups, weight, bias, 1e-6)
    native_error = ((F.silu(native.float()).to(dtype) if silu else native).double() - reference).abs().max().item()
    # fp16: both are off by about half a unit in the last place of the largest output
    assert error <= max(native_error * 1.5, 1e-4), (error, native_error)


@gpu
def test_the_statistics_stay_exact_far_from_zero():
    """A large mean and a small spread (E[x^2] - E[x]^2 would cancel): the chunks' mean and M2 merge."""
    torch.manual_seed(0)
    x = torch.randn(1, 32, 256, 256, device="cuda") * 0.01 + 1000.0
    ones, zeros = torch.ones(32, device="cuda"), torch.zeros(32, device="cuda")
    got = group_norm(x, 8, ones, zeros, 1e-6)
    reference = F.group_norm(x.double(), 8, ones.double(), zeros.double(), 1e-6)
    native = F.group_norm(x, 8, ones, zeros, 1e-6)
    error, native_error = ((y.double() - reference).abs().max().item() for y in (got, native))
    assert error < 1e-3 and error <= max(native_error, 1e-4), (error, native_error)


def count_kernel_calls(monkeypatch) -> list:
    from pocketdiffusion.speed import group_norm_cuda
    calls = []

    def counted(*args, **kwargs):
        y = group_norm(*args, **kwargs)
        calls.append(y is not None)
        return y
    monkeypatch.setattr(group_norm_cuda, "group_norm", counted)
    return calls


@gpu
def test_the_layers_run_the_kernels_on_cuda_and_fall_back_where_they_cannot(monkeypatch):
    calls = count_kernel_calls(monkeypatch)
    torch.manual_seed(0)
    layer = CudaGroupNormSiLU(4, 16, eps=1e-5).cuda()
    x = torch.randn(2, 16, 24, 24, device="cuda")
    expected = F.silu(F.group_norm(x, 4, layer.weight, layer.bias, 1e-5))
    with torch.inference_mode():
        assert torch.allclose(layer(x), expected, atol=1e-5)
        assert torch.allclose(layer(x.contiguous(memory_format=torch.channels_last)), expected, atol=1e-5)
        assert calls == [True, True]
        assert torch.allclose(layer(x.transpose(2, 3)), expected.transpose(2, 3), atol=1e-5)  # no kernel layout
        assert calls == [True, True, False]
        layer.min_elements = x.numel() + 1  # a host-bound plan's small tensor: PyTorch's kernel
        assert torch.equal(layer(x), F.silu(F.group_norm(x, 4, layer.weight, layer.bias, 1e-5)))
        assert len(calls) == 3
    layer.min_elements = 0
    # With autograd recording, PyTorch's layers run, and gradients flow.
    x.requires_grad_(True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    assert len(calls) == 3
    assert group_norm(x.detach().cpu(), 4, layer.weight.cpu(), layer.bias.cpu(), 1e-5) is None


@gpu
def test_a_decode_with_the_kernels_matches_pytorchs(monkeypatch):
    calls = count_kernel_calls(monkeypatch)
    from pocketdiffusion.config import VAEConfig
    from pocketdiffusion.models.vae import AutoencoderKL

    torch.manual_seed(0)
    config = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8)
    plain = AutoencoderKL(config).cuda().eval()
    fast = AutoencoderKL(config, ops_for(MemoryPlan(), "cuda")).cuda().eval()
    fast.load_state_dict(plain.state_dict())
    z = torch.randn(1, config.z_channels, 32, 32, device="cuda")
    with torch.inference_mode():
        torch.testing.assert_close(fast.decode(z), plain.decode(z), rtol=1e-3, atol=1e-3)
    assert calls and all(calls)
