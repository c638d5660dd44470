"""Test-side helpers: transformers' CLIP text model built to match a pocketdiffusion CLIPConfig,
loaded with the same weights. transformers is a test-only dependency."""
from __future__ import annotations

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from pocketdiffusion.config import CLIPConfig


def hf_text_config(config: CLIPConfig, *, eos_token_id: int | None = None) -> CLIPTextConfig:
    """The transformers CLIPTextConfig of the same architecture. BOS is the id before EOS, as in
    the real vocabulary. `eos_token_id=2` selects transformers' legacy argmax pooling."""
    eos = config.eos_token_id if eos_token_id is None else eos_token_id
    return CLIPTextConfig(
        vocab_size=config.vocab_size, hidden_size=config.width, intermediate_size=config.mlp_dim,
        num_hidden_layers=config.layers, num_attention_heads=config.heads,
        max_position_embeddings=config.context_length, hidden_act=config.activation,
        layer_norm_eps=config.layer_norm_eps, projection_dim=config.projection_dim or config.width,
        bos_token_id=config.eos_token_id - 1, eos_token_id=eos, pad_token_id=config.eos_token_id,
        attn_implementation="eager",  # the plainest reference: explicit softmax(QK^T)V
    )


def reference_text_model(config: CLIPConfig, state_dict: dict[str, torch.Tensor], *,
                         eos_token_id: int | None = None) -> torch.nn.Module:
    """transformers' CLIPTextModelWithProjection (config with projection) or CLIPTextModel,
    strictly loaded from our state dict: a missing, extra or misnamed key fails here."""
    hf_config = hf_text_config(config, eos_token_id=eos_token_id)
    if config.projection_dim is not None:
        model = CLIPTextModelWithProjection(hf_config)
        model.load_state_dict(state_dict, strict=True)
    else:
        # transformers 5 dropped CLIPTextModel's `text_model.` level (files keep it; its loader
        # strips it): every one of our keys must carry the prefix.
        assert all(k.startswith("text_model.") for k in state_dict), sorted(state_dict)[:3]
        model = CLIPTextModel(hf_config)
        model.load_state_dict({k.removeprefix("text_model."): v for k, v in state_dict.items()},
                              strict=True)
    return model.eval()


def final_layer_norm(reference: torch.nn.Module) -> torch.nn.Module:
    text_model = getattr(reference, "text_model", reference)
    return text_model.final_layer_norm


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial weights: normal matrices and biases, layer norms far from identity."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if "layer_norm" in name and name.endswith("weight"):
            param.copy_(1.0 + 0.2 * noise)
        elif "embedding" in name:
            param.copy_(0.5 * noise)
        else:
            param.copy_(0.08 * noise)
    return model
