"""UNet parity with HF diffusers on the same random weights, converted by diffusers' own single-file
converter (so our parameter names are proven to be the LDM checkpoint keys), plus the full-size
presets' parameter counts and key sets, and input validation."""
from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import get_timestep_embedding

from pocketdiffusion.config import SD2, SD15, SDXL, UNetConfig
from pocketdiffusion.models.attention import chunked_attention
from pocketdiffusion.models.ops import Ops
from pocketdiffusion.models.unet import UNetModel, sdxl_label_vector, timestep_embedding
from reference_unet import diffusers_unet_config, to_diffusers_state_dict

PARITY_BOUND = 1e-4  # max-abs error relative to max |reference|, fp32
POOLED_DIM = 32  # tiny SDXL: pooled text width; y = pooled + 6 sinusoidal size/crop embeddings

TINY = {
    # SD1: fixed head count, 1x1-conv projections, no attention at the last level.
    "sd1": UNetConfig(model_channels=32, channel_mult=(1, 2, 2), transformer_depth=(1, 1, 0),
                      transformer_depth_middle=1, num_heads=8, context_dim=48, norm_groups=8),
    # SD2: fixed head size, Linear projections.
    "sd2": UNetConfig(model_channels=32, channel_mult=(1, 2, 2), transformer_depth=(1, 1, 0),
                      num_heads=None, head_dim=16, context_dim=64, use_linear_in_transformer=True,
                      norm_groups=16),
    # SDXL: no attention at level 0, deeper transformers further down, label embedding.
    "sdxl": UNetConfig(model_channels=32, channel_mult=(1, 2, 4), transformer_depth=(0, 1, 2),
                       transformer_depth_middle=2, num_heads=None, head_dim=16, context_dim=64,
                       use_linear_in_transformer=True, adm_in_channels=POOLED_DIM + 6 * 256,
                       norm_groups=16),
}
TINY["sd1_inpaint"] = replace(TINY["sd1"], in_channels=9)
TINY["sdxl_inpaint"] = replace(TINY["sdxl"], in_channels=9)

BATCH, HEIGHT, WIDTH, TOKENS = 2, 16, 8, 7  # H != W catches transposed reshapes
TIMESTEPS = [torch.tensor([999.0, 1.0]), torch.tensor([500, 37]), torch.tensor([0.5, 250.25])]


def randomize(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-trivial weights everywhere (LDM zero-inits several convs, which would hide errors)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            is_norm = isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm))
            for name, param in module.named_parameters(recurse=False):
                noise = torch.randn(param.shape, generator=gen)
                if is_norm and name == "weight":
                    param.copy_(1 + 0.2 * noise)
                elif is_norm:
                    param.copy_(0.2 * noise)
                else:
                    param.copy_(0.05 * noise)


def build_pair(config: UNetConfig, ops: Ops = Ops()) -> tuple[UNetModel, UNet2DConditionModel]:
    ours = UNetModel(config, ops).eval()
    randomize(ours)
    reference_config = diffusers_unet_config(config)
    reference = UNet2DConditionModel(**reference_config).eval()
    state = to_diffusers_state_dict(ours.state_dict(), reference_config)
    assert len(state) == len(ours.state_dict()), "the converter dropped or duplicated keys"
    reference.load_state_dict(state, strict=True)
    return ours, reference


def make_inputs(config: UNetConfig, seed: int = 2) -> dict:
    gen = torch.Generator().manual_seed(seed)
    inputs = {
        "x": torch.randn(BATCH, config.in_channels, HEIGHT, WIDTH, generator=gen),
        "context": torch.randn(BATCH, TOKENS, config.context_dim, generator=gen),
    }
    if config.adm_in_channels is not None:
        inputs["pooled"] = torch.randn(BATCH, POOLED_DIM, generator=gen)
        # original size, crop top-left, target size, as SDXL pipelines pass them
        inputs["time_ids"] = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 1344, 64, 32, 768, 1344]])
    return inputs


def run_ours(model: UNetModel, inputs: dict, t: torch.Tensor) -> torch.Tensor:
    y = sdxl_label_vector(inputs["pooled"], inputs["time_ids"]) if "pooled" in inputs else None
    return model(inputs["x"], t, inputs["context"], y=y)


def run_reference(model: UNet2DConditionModel, inputs: dict, t: torch.Tensor) -> torch.Tensor:
    added = ({"text_embeds": inputs["pooled"], "time_ids": inputs["time_ids"]}
             if "pooled" in inputs else None)
    return model(inputs["x"], t, encoder_hidden_states=inputs["context"], added_cond_kwargs=added).sample


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@pytest.mark.parametrize("name", list(TINY))
def test_matches_diffusers(name):
    config = TINY[name]
    ours, reference = build_pair(config)
    inputs = make_inputs(config)
    for t in TIMESTEPS:
        with torch.inference_mode():
            expected = run_reference(reference, inputs, t)
            got = run_ours(ours, inputs, t)
        assert got.shape == (BATCH, config.out_channels, HEIGHT, WIDTH)
        assert expected.abs().max() > 0.1, "reference output is trivial: the test would prove nothing"
        error = relative_error(got, expected)
        print(f"{name} t={t.tolist()}: max-abs error / max|ref| = {error:.2e}")
        assert error <= PARITY_BOUND


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_chunked_attention_matches_diffusers(name):
    config = TINY[name]
    ops = Ops(attention=functools.partial(chunked_attention, chunk=5))  # 5 does not divide 128 tokens
    ours, reference = build_pair(config, ops)
    inputs = make_inputs(config)
    t = TIMESTEPS[0]
    with torch.inference_mode():
        error = relative_error(run_ours(ours, inputs, t), run_reference(reference, inputs, t))
    print(f"{name} chunked: max-abs error / max|ref| = {error:.2e}")
    assert error <= PARITY_BOUND


def test_norm_epsilons_match_diffusers_at_tiny_variance():
    """GroupNorm eps 1e-5 (ResBlocks) vs 1e-6 (SpatialTransformer) and LayerNorm eps 1e-5 change the
    output by far less than the parity bound at unit-scale activations; at a variance of 1e-6 they
    dominate, so compare the blocks there."""
    config = TINY["sd1"]
    ours, reference = build_pair(config)
    gen = torch.Generator().manual_seed(3)
    x = 1e-3 * torch.randn(BATCH, 32, HEIGHT, WIDTH, generator=gen)
    emb = torch.randn(BATCH, 128, generator=gen)
    context = torch.randn(BATCH, TOKENS, config.context_dim, generator=gen)
    tokens = 1e-3 * torch.randn(BATCH, HEIGHT * WIDTH, 32, generator=gen)
    with torch.inference_mode():
        pairs = [
            (ours.input_blocks[1][0](x, emb), reference.down_blocks[0].resnets[0](x, emb)),
            (ours.input_blocks[1][1](x, context),
             reference.down_blocks[0].attentions[0](x, encoder_hidden_states=context).sample),
            (ours.input_blocks[1][1].transformer_blocks[0](tokens, context),
             reference.down_blocks[0].attentions[0].transformer_blocks[0](
                 tokens, encoder_hidden_states=context)),
        ]
    for got, expected in pairs:
        assert relative_error(got, expected) <= PARITY_BOUND


def test_in_place_fast_path_equals_autograd_path():
    """Under inference_mode the blocks add and activate in place; with autograd on they must not.
    Both paths compute the same numbers, and the autograd path still back-propagates."""
    config = TINY["sdxl"]
    model = UNetModel(config)
    randomize(model)
    inputs = make_inputs(config)
    t = TIMESTEPS[1]
    x_before = inputs["x"].clone()
    with torch.inference_mode():
        fast = run_ours(model, inputs, t)
    slow = run_ours(model, inputs, t)
    assert torch.equal(inputs["x"], x_before), "the UNet modified its input"
    assert torch.equal(fast, slow.detach())
    slow.square().mean().backward()
    assert model.input_blocks[0][0].weight.grad is not None


def test_scalar_timestep_broadcasts():
    config = TINY["sd1"]
    model = UNetModel(config).eval()
    randomize(model)
    inputs = make_inputs(config)
    with torch.inference_mode():
        per_sample = run_ours(model, inputs, torch.tensor([321.0, 321.0]))
        assert torch.equal(run_ours(model, inputs, torch.tensor(321.0)), per_sample)
        assert torch.equal(run_ours(model, inputs, 321), per_sample)


@pytest.mark.parametrize("dim", [32, 33, 320])
def test_timestep_embedding_matches_diffusers(dim):
    t = torch.tensor([0, 1, 37, 999.5])
    expected = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.equal(timestep_embedding(t, dim), expected)


def test_sdxl_label_vector_matches_diffusers_text_time():
    pooled = torch.randn(2, 1280)
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [512, 768, 8, 16, 1024, 1024]])
    time_embeds = get_timestep_embedding(time_ids.flatten(), 256, flip_sin_to_cos=True,
                                         downscale_freq_shift=0).reshape(2, -1)
    expected = torch.cat([pooled, time_embeds], dim=-1)
    got = sdxl_label_vector(pooled, time_ids)
    assert got.shape == (2, 2816)
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="time_ids"):
        sdxl_label_vector(pooled, time_ids[:1])


# Parameter counts of the released UNets (SD1.5, SD2.x, SDXL base).
@pytest.mark.parametrize("preset, expected_params", [(SD15, 859_520_964), (SD2, 865_910_724),
                                                     (SDXL, 2_567_463_684)])
def test_full_size_presets_match_diffusers_layout(preset, expected_params):
    """Built on the meta device (no memory): the same parameter count as diffusers' UNet of the
    same architecture and as the released model, and diffusers' converter maps our state dict onto
    exactly diffusers' keys and shapes, every key used once."""
    config = preset.unet
    reference_config = diffusers_unet_config(config)
    with torch.device("meta"):
        ours = UNetModel(config)
        reference = UNet2DConditionModel(**reference_config)
    our_count = sum(p.numel() for p in ours.parameters())
    assert our_count == sum(p.numel() for p in reference.parameters()) == expected_params

    our_state = ours.state_dict()
    converted = to_diffusers_state_dict(our_state, reference_config)
    assert len(converted) == len(our_state)
    assert {k: tuple(v.shape) for k, v in converted.items()} == \
           {k: tuple(v.shape) for k, v in reference.state_dict().items()}


def test_ldm_key_names():
    keys = set(UNetModel(TINY["sdxl"]).state_dict())
    for key in ["time_embed.0.weight", "time_embed.2.bias", "label_emb.0.0.weight", "label_emb.0.2.bias",
                "input_blocks.0.0.weight", "input_blocks.1.0.in_layers.0.weight",
                "input_blocks.1.0.in_layers.2.weight", "input_blocks.1.0.emb_layers.1.weight",
                "input_blocks.1.0.out_layers.0.bias", "input_blocks.1.0.out_layers.3.weight",
                "input_blocks.3.0.op.weight", "input_blocks.4.0.skip_connection.weight",
                "input_blocks.4.1.norm.weight", "input_blocks.4.1.proj_in.weight",
                "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
                "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
                "input_blocks.4.1.transformer_blocks.0.attn2.to_out.0.bias",
                "input_blocks.4.1.transformer_blocks.0.ff.net.0.proj.weight",
                "input_blocks.4.1.transformer_blocks.0.ff.net.2.weight",
                "input_blocks.4.1.transformer_blocks.0.norm3.weight", "input_blocks.4.1.proj_out.bias",
                "middle_block.0.in_layers.0.weight", "middle_block.1.transformer_blocks.1.norm1.bias",
                "middle_block.2.out_layers.3.weight", "output_blocks.2.2.conv.weight",
                "output_blocks.8.0.skip_connection.weight", "output_blocks.5.2.conv.weight",
                "out.0.weight", "out.2.bias"]:
        assert key in keys, key
    assert not any(k.endswith(("to_q.bias", "to_k.bias", "to_v.bias")) for k in keys)
    # SD1 projects with 1x1 convs, SD2/SDXL with Linear
    sd1 = UNetModel(TINY["sd1"]).state_dict()
    assert sd1["input_blocks.1.1.proj_in.weight"].ndim == 4
    assert "output_blocks.2.1.conv.weight" in sd1  # upsample right after the resblock (no attention)


@pytest.mark.parametrize("change, message", [
    (dict(x=torch.randn(2, 5, 16, 8)), r"\(B, 4, H, W\)"),
    (dict(x=torch.randn(4, 16, 8)), r"\(B, 4, H, W\)"),
    (dict(x=torch.randn(2, 4, 18, 8)), "multiples of 4"),
    (dict(context=torch.randn(2, 7, 32)), r"\(2, T, 48\)"),
    (dict(context=torch.randn(3, 7, 48)), r"\(2, T, 48\)"),
    (dict(context=None), r"\(2, T, 48\) text embeddings, got NoneType"),
    (dict(t="500"), "number or a"),
    (dict(t=torch.tensor([1.0, 2.0, 3.0])), r"a \(2,\) tensor"),
    (dict(t=torch.ones(2, 1)), r"a \(2,\) tensor"),
    (dict(y=torch.randn(2, 16)), "takes no `y`"),
])
def test_bad_inputs_raise_clear_errors(change, message):
    model = UNetModel(TINY["sd1"])
    args = {"x": torch.randn(2, 4, 16, 8), "t": torch.tensor([1.0, 2.0]),
            "context": torch.randn(2, 7, 48), "y": None} | change
    with pytest.raises(ValueError, match=message):
        model(args["x"], args["t"], args["context"], y=args["y"])


def test_sdxl_y_is_required_and_checked():
    config = TINY["sdxl"]
    model = UNetModel(config)
    x, context = torch.randn(2, 4, 16, 8), torch.randn(2, 7, 64)
    with pytest.raises(ValueError, match=r"needs y of shape \(2, 1568\).*got None"):
        model(x, torch.tensor([1.0, 2.0]), context)
    with pytest.raises(ValueError, match=r"needs y of shape \(2, 1568\).*got \(2, 2816\)"):
        model(x, torch.tensor([1.0, 2.0]), context, y=torch.randn(2, 2816))


@pytest.mark.parametrize("change, message", [
    (dict(transformer_depth=(1, 1)), "one entry per level"),
    (dict(head_dim=8), "exactly one of num_heads"),
    (dict(num_heads=None), "exactly one of num_heads"),
    (dict(num_heads=7), "do not split into attention heads"),
    (dict(norm_groups=12), "norm groups"),
    (dict(transformer_depth_middle=0), "transformer_depth_middle"),
])
def test_bad_configs_raise_clear_errors(change, message):
    with pytest.raises(ValueError, match=message):
        UNetModel(replace(TINY["sd1"], **change))
