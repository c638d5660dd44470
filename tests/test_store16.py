"""16-bit weight storage with fp32 compute (memory/store16.py), the CPU's balanced plan: the layers
against the float ones with the fp16-rounded weight (bit for bit), the shared scratch, swapping on
the meta device before loading (the loader's `load_weight` protocol), and what `pocketdiffusion.load`
does on the CPU (the UNet stored in fp16, the text encoder and the VAE streamed from the file, the
pictures within fp16 rounding of the fp32 ones)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import pocketdiffusion
from ckpt_fixtures import diffusers_models, randomize_, tiny_config, write_diffusers_folder
from pocketdiffusion.checkpoints import load
from pocketdiffusion.memory.plan import plan_for, swap_layers_for
from pocketdiffusion.memory.quant import Int8Conv2d, quantize_
from pocketdiffusion.memory.store16 import (Scratch, Stored16Conv2d, Stored16Linear, reserve_scratch,
                                            store16_)
from pocketdiffusion.models.unet import UNetModel


def rounded(layer: nn.Module, dtype: torch.dtype = torch.float16) -> nn.Module:
    """The float layer computing with its weight rounded to `dtype` (what the stored layer must equal)."""
    with torch.no_grad():
        layer.weight.copy_(layer.weight.to(dtype).float())
    return layer


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("grad", [False, True])  # the scratch in inference, a fresh upcast under autograd
def test_stored_layers_equal_the_float_layers_with_rounded_weights(dtype, grad):
    torch.manual_seed(0)
    linear = nn.Linear(48, 40)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    circular = nn.Conv2d(8, 16, 3, padding=1, padding_mode="circular", stride=2)
    scratch = Scratch()
    stored = [Stored16Linear.from_float(linear, dtype, scratch), Stored16Conv2d.from_float(conv, dtype, scratch),
              Stored16Conv2d.from_float(circular, dtype, scratch)]
    inputs = [torch.randn(3, 5, 48), torch.randn(2, 8, 12, 12), torch.randn(2, 8, 12, 12)]
    for layer, float_layer, x in zip(stored, (linear, conv, circular), inputs):
        assert layer.weight.dtype == dtype and layer.bias.dtype == torch.float32
        expected = rounded(float_layer, dtype)(x)
        with torch.set_grad_enabled(grad):
            got = layer(x)
        assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert (scratch.nbytes() > 0) != grad  # the scratch only without autograd


def test_the_scratch_is_one_buffer_of_the_largest_layer():
    torch.manual_seed(1)
    small, big = nn.Linear(8, 64), nn.Linear(64, 32)
    model = nn.Sequential(small, nn.ReLU(), big)
    assert store16_(model, min_params=0) == 2
    a, b = model[0], model[2]
    assert a.scratch is b.scratch and a.scratch.size_hint == 64 * 32  # the larger of 8x64 and 64x32
    assert reserve_scratch(model, torch.float32, "cpu") == 64 * 32 * 4  # allocated at once, at its largest
    buffer = next(iter(a.scratch.buffers.values()))
    with torch.inference_mode():
        model(torch.randn(2, 8))
    assert next(iter(a.scratch.buffers.values())) is buffer  # never regrown


def test_store16_on_the_unet_keeps_names_and_halves_the_weights():
    unet = randomize_(UNetModel(tiny_config("sd1").unet), seed=0).eval()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    fp32_bytes = sum(t.numel() * t.element_size() for t in unet.parameters())
    layers = store16_(unet)
    after = unet.state_dict()
    assert layers > 20 and set(after) == set(before)  # the same keys (a layer's buffer `weight` after its `bias`)
    assert all(torch.equal(after[k].float(), before[k].half().float()) if after[k].dtype == torch.float16
               else torch.equal(after[k], before[k]) for k in before)
    assert next(unet.parameters()).dtype == torch.float32  # what the pipelines read as the compute dtype
    stored = sum(t.numel() * t.element_size() for t in [*unet.parameters(), *unet.buffers()])
    assert stored < 0.6 * fp32_bytes
    report = quantize_(unet)  # the out-of-memory fallback from balanced to low quantizes them as it finds them
    assert report.layers == layers and isinstance(unet.input_blocks[1][0].in_layers[2], Int8Conv2d)


def test_bad_input_gets_clear_errors():
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        store16_(nn.Sequential(nn.Linear(80, 80)), torch.float32)
    with pytest.raises(TypeError, match="replaces the layers inside a model"):
        store16_(nn.Linear(80, 80))
    layer = Stored16Linear.from_float(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="floating-point input"):
        layer(torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(4, 4\)"):
        layer.load_weight(torch.ones(4, 5))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    config = tiny_config("sd1")
    return write_diffusers_folder(tmp_path_factory.mktemp("sd1"), config, diffusers_models(config))


@pytest.mark.parametrize("mode", ["balanced", "low"])
def test_swapping_before_loading_equals_swapping_after(folder, mode):
    """The loader gives a swapped layer its weight as it reads it (`load_weight`): the same tensors
    as swapping a resident fp32 model afterwards."""
    plan = plan_for(mode, "cpu")
    during = load(folder, device="cpu", swap_layers=swap_layers_for(plan))
    after = load(folder, device="cpu")
    swap_layers_for(plan)({"unet": after.unet})
    a, b = during.unet.state_dict(), after.unet.state_dict()
    assert set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_cpu_balanced_stores_the_unet_in_fp16_and_streams_the_rest(folder):
    pipe = pocketdiffusion.load(folder, device="cpu")
    plan = pipe.plan
    assert plan.unet_store == torch.float16 and plan.stream_text and plan.stream_vae and plan.heap_reuse
    assert isinstance(pipe.parts.unet.input_blocks[1][0].in_layers[2], Stored16Conv2d)
    # the text encoder and the VAE wait in the file: placeholders between their uses
    assert pipe.parts.text_encoders[0].text_model.encoder.layers[0].mlp.fc1.weight.numel() == 0
    assert pipe.parts.vae.decoder.up[0].block[0].conv1.weight.numel() == 0
    fp32 = pocketdiffusion.load(folder, device="cpu", dtype=torch.float32)  # a dtype asked for: no 16-bit store
    assert fp32.plan.unet_store is None
    assert type(fp32.parts.unet.input_blocks[1][0].in_layers[2]) is nn.Conv2d
    options = dict(steps=4, width=64, height=64, seed=2)
    a = np.asarray(pipe.generate("a red apple on a table", **options)[0]).astype(float)
    b = np.asarray(fp32.generate("a red apple on a table", **options)[0]).astype(float)
    psnr = 10 * np.log10(255 ** 2 / max(((a - b) ** 2).mean(), 1e-12))
    assert b.std() > 10 and psnr >= 35, psnr
