"""CLIPTextModel parity with transformers' CLIPTextModel / CLIPTextModelWithProjection on the
same random weights, for the three Stable Diffusion text encoder styles."""
from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextModel as HFCLIPTextModel
from transformers import CLIPTextModelWithProjection as HFCLIPTextModelWithProjection

from pocketdiffusion.config import CLIPConfig
from pocketdiffusion.models.attention import chunked_attention
from pocketdiffusion.models.clip import CLIPTextModel
from pocketdiffusion.models.ops import Ops

from reference_clip import final_layer_norm, hf_text_config, randomize_, reference_text_model

VOCAB = 1000
EOS = VOCAB - 1  # as in the real vocabulary: BOS, EOS are the last two ids
BOS = VOCAB - 2

STYLES = {
    # SD1: OpenAI CLIP ViT-L/14
    "openai": CLIPConfig(vocab_size=VOCAB, width=64, layers=3, heads=1, mlp_dim=256,
                         activation="quick_gelu", eos_token_id=EOS),
    # SD2: OpenCLIP ViT-H/14
    "openclip_h": CLIPConfig(vocab_size=VOCAB, width=128, layers=3, heads=2, mlp_dim=512,
                             activation="gelu", eos_token_id=EOS),
    # SDXL's second encoder: OpenCLIP ViT-bigG/14 with text_projection
    "bigg": CLIPConfig(vocab_size=VOCAB, width=128, layers=2, heads=2, mlp_dim=512,
                       activation="gelu", projection_dim=96, eos_token_id=EOS),
}


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def prompt_batch(context: int = 77, seed: int = 1) -> torch.Tensor:
    """Rows as tokenizers lay them out: BOS, words, EOS, padding; EOS at varying positions and
    both pad conventions (EOS for SD1, `!` = 0 for OpenCLIP)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for eos_at, pad in ((9, EOS), (min(30, context - 2), 0), (context - 1, EOS), (1, 0), (5, 0)):
        row = torch.full((context,), pad, dtype=torch.long)
        row[0] = BOS
        row[1:eos_at] = torch.randint(1, BOS, (eos_at - 1,), generator=generator)
        row[eos_at] = EOS
        rows.append(row)
    return torch.stack(rows)  # (5, context)


def build(style: str, ops: Ops | None = None) -> CLIPTextModel:
    config = STYLES[style]
    model = CLIPTextModel(config) if ops is None else CLIPTextModel(config, ops)
    return randomize_(model, seed=len(style)).eval()


@pytest.mark.parametrize("style", sorted(STYLES))
@pytest.mark.parametrize("seq_len", [77, 24])
@torch.no_grad()
def test_matches_transformers(style, seq_len):
    ours = build(style)
    config = ours.config
    reference = reference_text_model(config, ours.state_dict())
    ids = prompt_batch(seq_len)
    out = reference(ids, output_hidden_states=True)
    hidden_states = out.hidden_states  # (embeddings, layer 1, ..., layer L)
    assert len(hidden_states) == config.layers + 1

    last, pooled = ours(ids, pooled=True)
    assert relative_error(last, out.last_hidden_state) <= 1e-4
    ref_pooled = out.text_embeds if config.projection_dim else out.pooler_output
    assert pooled.shape == (ids.shape[0], config.projection_dim or config.width)
    assert relative_error(pooled, ref_pooled) <= 1e-4

    # clip skip: every hidden state, raw and through the final layer norm
    for layer in range(-(config.layers + 1), config.layers + 1):
        raw, none = ours(ids, layer=layer, final_norm=False)
        assert none is None
        assert relative_error(raw, hidden_states[layer]) <= 1e-4, layer
        normed, _ = ours(ids, layer=layer, final_norm=True)
        assert relative_error(normed, final_layer_norm(reference)(hidden_states[layer])) <= 1e-4, layer


@pytest.mark.parametrize("style", ["openai", "bigg"])
@torch.no_grad()
def test_pooled_without_eos_uses_legacy_argmax(style):
    """A row without an end-of-text token pools at its largest id, like transformers' legacy
    configs (eos_token_id == 2) do for every row."""
    ours = build(style)
    legacy = reference_text_model(ours.config, ours.state_dict(), eos_token_id=2)
    ids = torch.randint(1, BOS, (3, 77), generator=torch.Generator().manual_seed(3))
    ids[0, 40] = BOS + 0  # no EOS anywhere; argmax lands on the BOS-valued token
    _, pooled = ours(ids, pooled=True)
    out = legacy(ids)
    ref = out.text_embeds if ours.config.projection_dim else out.pooler_output
    assert relative_error(pooled, ref) <= 1e-4
    # and the rule is really "first EOS" when there is one: move the first EOS, the result moves
    with_eos = ids.clone()
    with_eos[1, 10] = EOS
    with_eos[1, 50] = EOS
    _, pooled_eos = ours(with_eos, pooled=True)
    _, pooled_at_10 = ours(with_eos[:, :11], pooled=True)
    assert torch.allclose(pooled_eos[1], pooled_at_10[1], atol=1e-5)  # causal: later tokens unseen


@pytest.mark.parametrize("style", sorted(STYLES))
def test_state_dict_is_the_transformers_file_layout(style, tmp_path):
    """Our state dict saved as a diffusers text_encoder folder loads in transformers with no
    missing or unexpected key, and holds no buffer (no position_ids)."""
    ours = build(style)
    state = ours.state_dict()
    assert set(state) == {name for name, _ in ours.named_parameters()}
    assert not any("position_ids" in key for key in state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    hf_config = hf_text_config(ours.config)
    (tmp_path / "config.json").write_text(json.dumps(hf_config.to_dict()))
    cls = HFCLIPTextModelWithProjection if ours.config.projection_dim else HFCLIPTextModel
    _, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


@torch.no_grad()
def test_clip_skip_stops_early():
    """layer=-2 without pooling equals the full run's penultimate layer, and never runs the
    last layer."""
    ours = build("openclip_h")
    ids = prompt_batch()
    calls = []
    ours.text_model.encoder.layers[-1].register_forward_hook(lambda *_: calls.append(1))
    full, _ = ours(ids, layer=-2, pooled=True)
    assert calls == [1]
    early, pooled = ours(ids, layer=-2, pooled=False)
    assert calls == [1] and pooled is None
    assert torch.equal(early, full)
    embeddings, _ = ours(ids, layer=0, final_norm=False)
    assert calls == [1]
    assert torch.equal(embeddings, ours.text_model.embeddings(ids))


@torch.no_grad()
def test_chunked_attention_backend_gives_the_same_result():
    """The causal mask works with the chunked CPU/MPS kernel too (chunk smaller than T)."""
    ids = prompt_batch()
    reference, ref_pooled = build("bigg")(ids, layer=-2, pooled=True)
    chunked = build("bigg", Ops(attention=partial(chunked_attention, chunk=16)))
    out, pooled = chunked(ids, layer=-2, pooled=True)
    assert relative_error(out, reference) <= 1e-5
    assert relative_error(pooled, ref_pooled) <= 1e-5


@pytest.mark.parametrize("bad_ids, error, words", [
    (torch.zeros(1, 77), TypeError, "integer"),
    ([[1, 2, 3]], TypeError, "torch.Tensor"),
    (torch.zeros(77, dtype=torch.long), ValueError, "(batch, tokens)"),
    (torch.zeros(1, 2, 77, dtype=torch.long), ValueError, "(batch, tokens)"),
    (torch.zeros(0, 77, dtype=torch.long), ValueError, "batch >= 1"),
    (torch.zeros(1, 78, dtype=torch.long), ValueError, "1 to 77"),
    (torch.zeros(1, 0, dtype=torch.long), ValueError, "1 to 77"),
    (torch.full((1, 77), VOCAB, dtype=torch.long), ValueError, "[0, 999]"),
    (torch.full((1, 77), -1, dtype=torch.long), ValueError, "[0, 999]"),
])
def test_bad_input_ids_raise_clear_errors(bad_ids, error, words):
    with pytest.raises(error) as info:
        build("openai")(bad_ids)
    assert words in str(info.value)


def test_bad_layer_and_config_raise_clear_errors():
    ids = prompt_batch()
    model = build("openai")  # 3 layers: hidden states 0..3
    for layer in (4, -5, 1.5):
        with pytest.raises(ValueError, match=r"layer must be an int in \[-4, 3\]"):
            model(ids, layer=layer)
    with pytest.raises(ValueError, match="activation"):
        CLIPTextModel(CLIPConfig(vocab_size=10, width=8, layers=1, heads=1, mlp_dim=8, activation="relu"))
    with pytest.raises(ValueError, match="divisible"):
        CLIPTextModel(CLIPConfig(vocab_size=10, width=10, layers=1, heads=3, mlp_dim=8))
