"""VAE parity against diffusers' AutoencoderKL on the same random weights, loaded through
diffusers' own LDM single-file converter (which proves our parameter names are the LDM keys)."""
from __future__ import annotations

import functools

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

from pocketdiffusion.config import SD2, SD15, SDXL, VAEConfig
from pocketdiffusion.models.attention import chunked_attention, sdpa_attention
from pocketdiffusion.models.ops import Ops
from pocketdiffusion.models.vae import AutoencoderKL
from reference_vae import diffusers_vae_config, reference_vae, to_diffusers_state_dict

# (config, image height, image width): non-square images catch H/W mix-ups.
TINY_CASES = {
    "ch32-g32-2levels": (VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=32), 16, 24),
    "ch16-g8-3levels": (VAEConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=2, norm_groups=8), 32, 24),
    "ch16-g16-4levels": (VAEConfig(ch=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=16), 32, 48),
}
SD_VAE_PARAMETERS = 83_653_863  # diffusers' AutoencoderKL with the SD config (re-checked below)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Weights that make every path matter: random GroupNorm affine, non-zero biases, and
    larger q/k so attention is far from uniform (a uniform softmax would hide k mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.rsplit(".", 2)[-2].startswith("norm"):
                param.copy_(1.0 + 0.3 * noise if name.endswith("weight") else 0.3 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            else:
                fan_in = param[0].numel()
                gain = 3.0 if ".attn_1.q." in name or ".attn_1.k." in name else 1.0
                param.copy_(gain * noise / fan_in ** 0.5)


def tiny_pair(case: str, ops: Ops = Ops()) -> tuple[AutoencoderKL, DiffusersAutoencoderKL, VAEConfig, int, int]:
    config, height, width = TINY_CASES[case]
    ours = AutoencoderKL(config, ops).eval()
    randomize_(ours, seed=1234)
    return ours, reference_vae(ours, config), config, height, width


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> float:
    assert actual.shape == expected.shape, f"{what}: {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().item()
    assert scale > 1e-2, f"{what}: reference output is trivial (max |ref| = {scale})"
    error = (actual - expected).abs().max().item()
    print(f"{what}: max abs error {error:.3e}, max |ref| {scale:.3e}, relative {error / scale:.3e}")
    assert error <= 1e-4 * scale, f"{what}: max abs error {error} > 1e-4 * {scale}"
    return error


@pytest.mark.parametrize("case", sorted(TINY_CASES))
def test_encode_matches_diffusers(case):
    ours, reference, config, height, width = tiny_pair(case)
    image = torch.rand(2, config.in_channels, height, width) * 2 - 1
    with torch.no_grad():
        mean, logvar = ours.encode(image)
        dist = reference.encode(image).latent_dist
    latent_shape = (2, config.embed_dim, height // config.downscale, width // config.downscale)
    assert mean.shape == latent_shape
    assert_close(mean, dist.mean, f"{case} mean")
    assert_close(logvar, dist.logvar, f"{case} logvar")
    # The latents the pipeline uses: the mean, and a draw with the same generator seed.
    with torch.no_grad():
        assert torch.equal(ours.encode_latents(image), mean)
        sampled = ours.encode_latents(image, generator=torch.Generator().manual_seed(7), sample=True)
        reference_sample = dist.sample(generator=torch.Generator().manual_seed(7))
    assert not torch.allclose(sampled, mean)
    assert_close(sampled, reference_sample, f"{case} sample")


@pytest.mark.parametrize("case", sorted(TINY_CASES))
def test_decode_matches_diffusers(case):
    ours, reference, config, height, width = tiny_pair(case)
    latents = torch.randn(2, config.embed_dim, height // config.downscale, width // config.downscale)
    with torch.no_grad():
        image = ours.decode(latents)
        expected = reference.decode(latents).sample
    assert image.shape == (2, config.out_ch, height, width)
    assert_close(image, expected, f"{case} decode")


def test_tiny_activations_match_diffusers():
    # Conv biases zeroed and inputs scaled by 1e-3: the first GroupNorm of the encoder and of
    # the decoder sees a variance near its eps, so LDM's eps=1e-6 (not torch's 1e-5) matters.
    config, height, width = TINY_CASES["ch16-g8-3levels"]
    ours = AutoencoderKL(config).eval()
    randomize_(ours, seed=99)
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if name.endswith("bias") and not name.rsplit(".", 2)[-2].startswith("norm"):
                param.zero_()
    reference = reference_vae(ours, config)
    image = 1e-3 * torch.rand(2, config.in_channels, height, width)
    latents = 1e-3 * torch.randn(2, config.embed_dim, height // 4, width // 4)
    with torch.no_grad():
        assert_close(ours.encode(image)[0], reference.encode(image).latent_dist.mean, "tiny mean")
        assert_close(ours.decode(latents), reference.decode(latents).sample, "tiny decode")


def test_logvar_is_clamped_like_diffusers():
    # Push the log-variance channels of quant_conv far outside [-30, 20] on both sides.
    ours, _, config, height, width = tiny_pair("ch32-g32-2levels")
    with torch.no_grad():
        bias = ours.quant_conv.bias
        bias[config.embed_dim:].copy_(torch.tensor([1e3, -1e3, 1e3, -1e3]))
    reference = reference_vae(ours, config)
    image = torch.rand(2, config.in_channels, height, width) * 2 - 1
    with torch.no_grad():
        logvar = ours.encode(image)[1]
        expected = reference.encode(image).latent_dist.logvar
    assert torch.equal(logvar, expected)
    assert set(logvar.unique().tolist()) == {-30.0, 20.0}


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_attention_gives_the_same_images(chunk):
    # 32x48 images, latents 4x6 = 24 positions in both mid attentions: chunks of 1, 5 (not a
    # divisor) and 64 (one chunk).
    chunked_ops = Ops(attention=functools.partial(chunked_attention, chunk=chunk))
    ours, reference, config, height, width = tiny_pair("ch16-g16-4levels", ops=chunked_ops)
    image = torch.rand(2, config.in_channels, height, width) * 2 - 1
    latents = torch.randn(2, config.embed_dim, height // 8, width // 8)
    with torch.no_grad():
        assert_close(ours.encode(image)[0], reference.encode(image).latent_dist.mean, f"chunk {chunk} mean")
        assert_close(ours.decode(latents), reference.decode(latents).sample, f"chunk {chunk} decode")


def test_attention_goes_through_ops():
    calls = []

    def recording_attention(q, k, v, heads, mask=None):
        calls.append((tuple(q.shape), tuple(k.shape), tuple(v.shape), heads, mask))
        return sdpa_attention(q, k, v, heads, mask)

    config = TINY_CASES["ch16-g8-3levels"][0]
    vae = AutoencoderKL(config, Ops(attention=recording_attention)).eval()
    with torch.no_grad():
        vae.encode(torch.zeros(2, 3, 32, 24))  # mid block at 8x6 = 48 positions, 32 channels
        vae.decode(torch.zeros(2, 4, 5, 3))  # mid block at 5x3 = 15 positions
    tokens = [(2, 48, 32)] * 3, [(2, 15, 32)] * 3
    assert calls == [(*tokens[0], 1, None), (*tokens[1], 1, None)]


def test_in_place_memory_tricks_keep_autograd_exact():
    # With autograd on, the in-place swish and residual adds must fall back to out-of-place
    # ops: same numbers, and gradients reach every parameter.
    ours, _, config, height, width = tiny_pair("ch16-g8-3levels")
    latents = torch.randn(1, config.embed_dim, height // 4, width // 4)
    with torch.no_grad():
        no_grad_image = ours.decode(latents)
    image = ours.decode(latents)
    assert torch.equal(image, no_grad_image)
    image.square().mean().backward()
    decoder_params = [(n, p) for n, p in ours.named_parameters() if not n.startswith(("encoder.", "quant_conv."))]
    missing = [n for n, p in decoder_params if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_in_place_adds_never_touch_the_callers_tensors():
    # The residual is added into the block's own fresh conv output, never into its input.
    ours, _, config, _, _ = tiny_pair("ch32-g32-2levels")
    latents = torch.randn(1, config.embed_dim, 4, 4)
    features = torch.randn(1, 64, 4, 4)
    kept_latents, kept_features = latents.clone(), features.clone()
    with torch.no_grad():
        ours.decode(latents)
        for block in (ours.decoder.mid.block_1, ours.decoder.mid.attn_1, ours.decoder.up[1].block[0]):
            block(features)
    assert torch.equal(latents, kept_latents) and torch.equal(features, kept_features)


@pytest.mark.parametrize("preset", [SD15, SD2, SDXL], ids=["sd15", "sd2", "sdxl"])
def test_full_size_preset_matches_diffusers_layout(preset):
    config = preset.vae
    with torch.device("meta"):
        ours = AutoencoderKL(config)
        reference = DiffusersAutoencoderKL(**diffusers_vae_config(config))
    ours_count = sum(p.numel() for p in ours.parameters())
    reference_count = sum(p.numel() for p in reference.parameters())
    assert ours_count == reference_count == SD_VAE_PARAMETERS
    converted = to_diffusers_state_dict(ours.state_dict(), config)
    expected = reference.state_dict()
    assert sorted(converted) == sorted(expected)
    wrong_shapes = [k for k in expected if converted[k].shape != expected[k].shape]
    assert wrong_shapes == []
    assert ours.scaling_factor == config.scaling_factor and ours.downscale == 8


def test_ldm_key_names():
    # A few keys spelled out as they appear in SD single files (minus `first_stage_model.`),
    # including the (C, C, 1, 1) conv attention weights and the reversed decoder levels.
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoencoderKL(SD15.vae).state_dict().items()}
    assert shapes["encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert shapes["decoder.mid.attn_1.proj_out.weight"] == (512, 512, 1, 1)
    assert shapes["encoder.down.1.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)
    assert shapes["encoder.down.2.downsample.conv.weight"] == (512, 512, 3, 3)
    assert "encoder.down.3.downsample.conv.weight" not in shapes
    assert shapes["decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert shapes["decoder.up.3.block.2.conv2.weight"] == (512, 512, 3, 3)
    assert shapes["decoder.up.1.upsample.conv.weight"] == (256, 256, 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in shapes
    assert shapes["quant_conv.weight"] == (8, 8, 1, 1)
    assert shapes["post_quant_conv.weight"] == (4, 4, 1, 1)
    assert shapes["encoder.conv_out.weight"] == (8, 512, 3, 3)


@pytest.mark.parametrize("method, bad, message", [
    ("encode", torch.zeros(1, 4, 16, 16), "must have 3 channels"),
    ("encode", torch.zeros(1, 3, 16, 12), "multiples of 8"),
    ("encode", torch.zeros(1, 3, 0, 16), "multiples of 8"),
    ("encode", torch.zeros(3, 16, 16), "got 3 dimensions"),
    ("encode_latents", torch.zeros(1, 1, 3, 16, 16), "got 5 dimensions"),
    ("decode", torch.zeros(1, 3, 2, 2), "must have 4 channels"),
    ("decode", torch.zeros(4, 2, 2), "got 3 dimensions"),
])
def test_bad_shapes_raise_value_error(method, bad, message):
    vae = AutoencoderKL(TINY_CASES["ch16-g16-4levels"][0])
    with pytest.raises(ValueError, match=message):
        getattr(vae, method)(bad)


@pytest.mark.parametrize("method, bad, message", [
    ("encode", [[0.0]], "must be a torch.Tensor"),
    ("encode", torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "floating-point"),
    ("decode", "latents", "must be a torch.Tensor"),
])
def test_bad_types_raise_type_error(method, bad, message):
    vae = AutoencoderKL(TINY_CASES["ch16-g16-4levels"][0])
    with pytest.raises(TypeError, match=message):
        getattr(vae, method)(bad)


@pytest.mark.parametrize("shape", [(1, 8, 64, 64), (2, 4, 37, 21)])
def test_a_banded_upsample_gives_the_whole_convs_rows(shape, monkeypatch):
    """Large upsamples are convolved in bands of rows (the decoder's memory peak at 512x512): the
    result is the whole conv's, up to the float rounding of a differently sized conv."""
    import torch.nn.functional as F

    from pocketdiffusion.models import vae
    from pocketdiffusion.models.ops import DEFAULT_OPS

    torch.manual_seed(0)
    upsample = vae.Upsample(shape[1], DEFAULT_OPS)
    x = torch.randn(shape)
    whole = upsample.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    calls = []
    upsample.conv.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape)))
    monkeypatch.setattr(vae, "UPSAMPLE_BAND_BYTES", 4 * x.numel() * x.element_size() // 5)  # 5-6 bands
    banded = upsample(x)
    assert len(calls) >= 5 and all(rows < 2 * shape[2] for _, _, rows, _ in calls)  # never the whole tensor
    assert banded.shape == whole.shape
    torch.testing.assert_close(banded, whole, rtol=1e-5, atol=1e-5)
