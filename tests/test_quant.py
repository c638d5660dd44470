"""int8 weight-only quantization (memory/quant.py): the quantize/dequantize math on a hand example,
the int8 layers against the float ones, `quantize_` on the tiny UNet and VAE (names, state dict
keys, bytes, skip, idempotence, bad input) and one tiny txt2img run before and after quantizing.

Measured on this machine (CPU, fp32; recorded so a regression shows up as a changed number):
Int8Linear 3.9e-3, Int8Conv2d 3.9e-3 .. 4.0e-3 relative error; tiny SD1 UNet 7.9e-3; tiny VAE with
every layer int8 2.1e-2 (encode) and 3.1e-2 (decode); tiny txt2img 64x64, 4 steps: PSNR 42.1 dB."""
from __future__ import annotations

import copy
import gc
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pocketdiffusion
from ckpt_fixtures import TINY_VAE, diffusers_models, randomize_, tiny_config, write_diffusers_folder
from pocketdiffusion.memory.quant import (Int8Conv2d, Int8Linear, QuantReport, dequantize, dequantized_state_dict,
                                          quantize_, quantize_per_channel)
from pocketdiffusion.models.unet import UNetModel
from pocketdiffusion.models.vae import AutoencoderKL


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).detach().norm() / expected.detach().norm())


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


@pytest.fixture
def tiny_unet() -> UNetModel:
    return randomize_(UNetModel(tiny_config("sd1").unet), seed=0).eval()


def unet_inputs(unet: UNetModel, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, unet.config.in_channels, 16, 16, generator=generator)
    context = torch.randn(2, 5, unet.config.context_dim, generator=generator)
    return x.to(dtype), torch.tensor([10.0, 700.0]), context.to(dtype)


# ---- the math -------------------------------------------------------------------------------------

def test_quantize_per_channel_on_a_hand_example():
    weight = torch.tensor([[63.5, -10.0, 0.75, 1.0],  # amax 63.5 -> scale 0.5
                           [0.0, 0.0, 0.0, 0.0],  # all zero: scale 1 (any would do), q 0, no NaN
                           [-7.9375, 0.1875, 0.03, 1.0]])  # amax 7.9375 -> scale 1/16
    q, scale = quantize_per_channel(weight)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert scale.tolist() == [0.5, 1.0, 0.0625]
    # 0.75 / 0.5 = 1.5 rounds (half to even) to 2; 0.03 * 16 = 0.48 rounds to 0
    assert q.tolist() == [[127, -20, 2, 2], [0, 0, 0, 0], [-127, 3, 0, 16]]
    assert dequantize(q, scale, torch.float32).tolist() == [[63.5, -10.0, 1.0, 1.0], [0.0] * 4,
                                                             [-7.9375, 0.1875, 0.0, 1.0]]
    # fp16 weights keep fp16 scales; the same grid
    q16, scale16 = quantize_per_channel(weight.half())
    assert scale16.dtype == torch.float16 and torch.equal(q16, q)


def test_quantization_error_is_at_most_half_a_step_per_element():
    weight = torch.randn(64, 32, 3, 3, generator=torch.Generator().manual_seed(0))
    weight[5] = 0  # a dead output channel
    q, scale = quantize_per_channel(weight)
    assert q.abs().amax(dim=(1, 2, 3))[torch.arange(64) != 5].eq(127).all()  # every row uses the full range
    error = (dequantize(q, scale, torch.float32) - weight).abs()
    assert (error <= scale.view(-1, 1, 1, 1) / 2 * (1 + 1e-6)).all()
    assert error[5].max() == 0 and torch.isfinite(scale).all()


# ---- the layers -----------------------------------------------------------------------------------

def test_int8_linear_matches_the_float_layer():
    torch.manual_seed(0)
    layer = nn.Linear(256, 128)
    x = torch.randn(4, 7, 256)  # (B, T, C)
    error = relative_error(Int8Linear.from_float(layer)(x), layer(x))
    assert error < 1e-2, error  # measured 3.9e-3


@pytest.mark.parametrize("options", [
    {"padding": 1},
    {"stride": 2, "padding": 0},  # the VAE Downsample conv
    {"stride": 2, "padding": 2, "dilation": 2, "groups": 4},
    {"padding": 1, "padding_mode": "reflect"},
    {"padding": "same", "bias": False},
])
def test_int8_conv2d_matches_the_float_layer(options):
    torch.manual_seed(0)
    layer = nn.Conv2d(32, 64, 3, **options)
    x = torch.randn(2, 32, 15, 15)
    int8 = Int8Conv2d.from_float(layer)
    assert (int8.stride, int8.padding, int8.dilation, int8.groups) == (layer.stride, layer.padding, layer.dilation,
                                                                        layer.groups)
    error = relative_error(int8(x), layer(x))
    assert error < 1e-2, error  # measured 3.9e-3 .. 4.0e-3


def test_int8_layer_computes_in_the_input_dtype_and_rejects_integer_inputs():
    layer = Int8Linear.from_float(nn.Linear(64, 64))
    assert layer(torch.randn(3, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="floating-point input"):
        layer(torch.ones(3, 64, dtype=torch.long))


# ---- quantize_ on whole models --------------------------------------------------------------------

def test_quantized_unet_stays_close_to_the_float_unet(tiny_unet):
    reference = copy.deepcopy(tiny_unet)
    report = quantize_(tiny_unet)
    assert report.layers > 20
    x, t, context = unet_inputs(tiny_unet)
    with torch.inference_mode():
        error = relative_error(tiny_unet(x, t, context), reference(x, t, context))
    assert error < 2e-2, error  # measured 7.9e-3


def test_names_and_state_dict_keys_are_preserved(tiny_unet):
    float_keys = list(tiny_unet.state_dict())
    small_layers = [name for name, m in tiny_unet.named_modules()
                    if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.numel() < 4096]
    assert small_layers, "the tiny UNet should have layers below min_params to prove they are kept"
    quantize_(tiny_unet)
    assert isinstance(tiny_unet.input_blocks[1][0].in_layers[2], Int8Conv2d)
    assert isinstance(tiny_unet.time_embed[2], Int8Linear)
    assert isinstance(tiny_unet.input_blocks[0][0], nn.Conv2d)  # 4 -> 32 channels, 1152 weights: kept
    modules = dict(tiny_unet.named_modules())
    assert all(type(modules[name]) in (nn.Linear, nn.Conv2d) for name in small_layers)
    int8_names = [name for name, m in modules.items() if isinstance(m, (Int8Linear, Int8Conv2d))]
    expected = []
    for key in float_keys:
        layer, _, leaf = key.rpartition(".")
        if layer in int8_names and leaf == "weight":
            expected += [f"{layer}.weight_int8", f"{layer}.weight_scale"]
        else:
            expected.append(key)
    state = tiny_unet.state_dict()
    assert sorted(state) == sorted(expected)
    assert all(state[f"{n}.weight_int8"].dtype == torch.int8 for n in int8_names)
    assert all(state[f"{n}.bias"].dtype == torch.float32 for n in int8_names if modules[n].bias is not None)
    # the model's dtype, as the pipelines read it, is still the float one
    assert next(tiny_unet.parameters()).dtype == torch.float32
    # and the state dict loads back into a quantized model of the same architecture
    other = UNetModel(tiny_config("sd1").unet)
    quantize_(other)
    other.load_state_dict(state)
    assert torch.equal(other.input_blocks[1][0].in_layers[2].weight_int8,
                       tiny_unet.input_blocks[1][0].in_layers[2].weight_int8)


def test_dequantized_state_dict_has_the_float_keys_and_close_values(tiny_unet):
    reference = {k: v.clone() for k, v in tiny_unet.state_dict().items()}
    quantize_(tiny_unet)
    restored = dequantized_state_dict(tiny_unet)
    assert list(restored) == list(reference)
    error = max(relative_error(restored[k], reference[k]) for k in reference)
    assert 0 < error < 1e-2, error


@pytest.mark.parametrize("dtype, least_ratio", [(torch.float32, 3.8), (torch.float16, 1.9)])
def test_weight_bytes_drop_and_float_weights_are_freed(tiny_unet, dtype, least_ratio):
    tiny_unet.to(dtype)
    before = model_bytes(tiny_unet)
    conv = tiny_unet.input_blocks[1][0].in_layers[2]
    float_weight = weakref.ref(conv.weight)
    del conv
    report = quantize_(tiny_unet)
    gc.collect()
    assert float_weight() is None, "something still holds the float weight"
    # the model lost exactly what the report says, and the quantized layers shrank ~4x (fp32) / ~2x (fp16)
    assert before - model_bytes(tiny_unet) == report.bytes_before - report.bytes_after > 0
    assert report.bytes_before / report.bytes_after > least_ratio, report
    element = torch.finfo(dtype).bits // 8
    assert report.bytes_after < report.params * 1.1 < report.bytes_before / element * 1.1


def test_fp16_model_quantized_under_inference_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 64)).half()
    reference = copy.deepcopy(model)
    x = torch.randn(8, 128, dtype=torch.float16)
    with torch.inference_mode():
        report = quantize_(model)
        out = model(x)
    assert report.layers == 2 and out.dtype == torch.float16
    assert model[0].weight_scale.dtype == torch.float16 and model[0].bias.dtype == torch.float16
    assert relative_error(out.float(), reference(x).float()) < 1e-2


def test_vae_strided_downsample_convs_are_quantized_and_stay_close():
    vae = randomize_(AutoencoderKL(TINY_VAE), seed=1).eval()
    reference = copy.deepcopy(vae)
    report = quantize_(vae, min_params=0)  # every conv, the tiny ones too
    down = vae.encoder.down[0].downsample.conv
    assert isinstance(down, Int8Conv2d) and (down.stride, down.padding) == ((2, 2), (0, 0))
    assert report.layers == sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in reference.modules())
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.inference_mode():
        latents = reference.encode_latents(pixels)  # the mean: no sampling noise
        error = relative_error(vae.encode_latents(pixels), latents)
        decode_error = relative_error(vae.decode(latents), reference.decode(latents))
    # Looser than the UNet's: every layer is int8 here (even the 3-channel conv_in with 27 weights a
    # row), and this random VAE's GroupNorms amplify the per-layer error over its ~20 convs deep.
    assert error < 5e-2 and decode_error < 5e-2, (error, decode_error)  # measured 2.1e-2, 3.1e-2


def test_skip_callback_min_params_and_shared_layers():
    shared = nn.Linear(64, 64)
    model = nn.Sequential()
    model.add_module("keep", nn.Linear(64, 128))
    model.add_module("first", shared)
    model.add_module("again", shared)  # the same layer under two names
    model.add_module("tiny", nn.Linear(63, 64))  # 4032 < 4096 weights
    model.add_module("attention", nn.MultiheadAttention(64, 4))  # reads out_proj.weight directly
    seen = []

    def skip(name, module):
        seen.append(name)
        return name == "keep"

    report = quantize_(model, skip=skip)
    assert seen == ["keep", "first"]  # each large layer asked once; the shared one once
    assert type(model.keep) is nn.Linear and type(model.tiny) is nn.Linear
    assert isinstance(model.first, Int8Linear) and model.again is model.first
    assert type(model.attention.out_proj) is not Int8Linear
    assert report == QuantReport(layers=1, params=64 * 64, bytes_before=(64 * 64 + 64) * 4,
                                 bytes_after=64 * 64 + 64 * 4 + 64 * 4)


def test_quantize_twice_leaves_the_model_as_it_is(tiny_unet):
    quantize_(tiny_unet)
    state = {k: v.clone() for k, v in tiny_unet.state_dict().items()}
    layer = tiny_unet.input_blocks[1][0].in_layers[2]
    assert quantize_(tiny_unet) == QuantReport(layers=0, params=0, bytes_before=0, bytes_after=0)
    assert tiny_unet.input_blocks[1][0].in_layers[2] is layer
    assert all(torch.equal(v, state[k]) for k, v in tiny_unet.state_dict().items())


def test_bad_input_gets_clear_errors(tiny_unet):
    with pytest.raises(TypeError, match="expects an nn.Module"):
        quantize_("unet.safetensors")
    with pytest.raises(TypeError, match="from_float"):
        quantize_(nn.Linear(64, 64))
    with pytest.raises(ValueError, match="min_params"):
        quantize_(tiny_unet, min_params=-1)
    with pytest.raises(TypeError, match="skip"):
        quantize_(tiny_unet, skip="out")
    with pytest.raises(TypeError, match="nn.Linear"):
        Int8Linear.from_float(nn.Conv2d(3, 3, 1))
    with pytest.raises(TypeError, match="floating-point"):
        quantize_per_channel(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="nn.Module"):
        dequantized_state_dict({"weight": torch.ones(1)})
    assert isinstance(tiny_unet.input_blocks[1][0].in_layers[2], nn.Conv2d)  # nothing half-done


# ---- end to end -----------------------------------------------------------------------------------

def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def test_txt2img_with_a_quantized_unet_stays_close(tmp_path):
    config = tiny_config("sd1")
    pipe = pocketdiffusion.load(write_diffusers_folder(tmp_path / "sd1", config, diffusers_models(config)),
                                device="cpu")
    options = {"steps": 4, "width": 64, "height": 64, "seed": 0}
    before = np.asarray(pipe.generate("a red apple on a table", **options)[0])
    report = quantize_(pipe.parts.unet)
    after = np.asarray(pipe.generate("a red apple on a table", **options)[0])
    assert report.layers > 20 and before.std() > 1
    assert not np.array_equal(before, after)  # the int8 UNet really ran
    quality = psnr(before, after)
    assert quality >= 25, quality  # measured 42.1 dB


def test_the_dequantization_scratch_gives_the_same_weight_in_one_buffer():
    from pocketdiffusion.memory.quant import dequantize, quantize_per_channel
    from pocketdiffusion.memory.scratch import Scratch
    scratch = Scratch()
    small, big = (quantize_per_channel(torch.randn(*shape)) for shape in ((8, 4), (16, 4, 3, 3)))
    for q, scale in (small, big, small):
        assert torch.equal(scratch.dequantize(q, scale, torch.float32), dequantize(q, scale, torch.float32))
    (buffer,) = scratch.buffers.values()  # grown once to the largest, then reused
    assert buffer.numel() == big[0].numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantizing_while_loading_gives_the_same_int8_weights(tmp_path, dtype):
    """`low` quantizes each weight as the loader reads it (checkpoints/load.py `swap_layers`): the
    int8 weights and scales of quantizing the loaded model afterwards, bit for bit (fp16: the
    scales stay fp16, as on a GPU)."""
    from pocketdiffusion.checkpoints import load
    config = tiny_config("sd1")
    folder = write_diffusers_folder(tmp_path / "sd1", config, diffusers_models(config))
    during = load(folder, device="cpu", dtype=dtype, swap_layers=lambda models: quantize_(models["unet"]))
    after = load(folder, device="cpu", dtype=dtype)
    quantize_(after.unet)
    a, b = during.unet.state_dict(), after.unet.state_dict()
    assert set(a) == set(b) and any(k.endswith("weight_int8") for k in a)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert during.unet.input_blocks[1][0].in_layers[2].weight_scale.dtype == (
        torch.float16 if dtype == torch.float16 else torch.float32)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_the_largest_layers_dequantize_in_output_slices_through_a_smaller_buffer(monkeypatch, kind):
    """Above SLICE_ELEMENTS weight elements a layer computes slice by slice of its output channels,
    each slice dequantized into the shared buffer: the same output as the whole weight at once, and
    a buffer the size of one slice."""
    import pocketdiffusion.memory.quant as quant
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 100)) if kind == "linear" else nn.Sequential(nn.Conv2d(16, 100, 3, padding=1))
    x = torch.randn(2, 5, 64) if kind == "linear" else torch.randn(2, 16, 6, 6)
    monkeypatch.setattr(quant, "SLICE_ELEMENTS", -(-model[0].weight.numel() // 3))
    quantize_(model, min_params=1)
    layer = model[0]
    slices = layer.output_slices()
    assert len(slices) == 3 and [len(range(100)[s]) for s in slices] == [34, 34, 32]
    whole = (F.linear(x, layer.dequantized_weight(), layer.bias) if kind == "linear"
             else F.conv2d(x, layer.dequantized_weight(), layer.bias, padding=1))
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-5)
    assert layer.scratch.nbytes() == layer.weight_int8[:34].numel() * 4  # one slice of fp32, not the layer
    assert layer.scratch.size_hint == layer.weight_int8[:34].numel()
    grouped = Int8Conv2d.from_float(nn.Conv2d(16, 100, 3, groups=4))
    assert grouped.output_slices() == [slice(None)]  # slicing a grouped conv's outputs would cut its groups


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton dequantization kernel runs on CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_the_cuda_dequantization_kernel_equals_pytorchs_multiply_bit_for_bit(dtype):
    from pocketdiffusion.memory.dequant_cuda import dequantize_into
    from pocketdiffusion.memory.quant import quantize_per_channel
    torch.manual_seed(0)
    for shape in ((1280, 2560, 3, 3), (320, 4, 1, 1), (10240, 1280), (7, 5)):
        q, scale = quantize_per_channel(torch.randn(*shape, device="cuda", dtype=dtype))
        rows = slice(0, max(1, shape[0] // 3))  # an output slice, as the largest layers take them
        for q_, s_ in ((q, scale), (q[rows], scale[rows])):
            out = torch.empty(q_.shape, dtype=dtype, device="cuda")
            assert dequantize_into(q_, s_.to(dtype), out)
            expected = torch.mul(q_, s_.to(dtype).view(-1, *([1] * (q_.ndim - 1))))
            assert torch.equal(out, expected)
