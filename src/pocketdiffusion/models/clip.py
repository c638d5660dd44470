"""The CLIP text transformer (OpenAI CLIP ViT-L/14, OpenCLIP ViT-H/14 and ViT-bigG/14).

Module names are those of Hugging Face transformers' CLIPTextModel /
CLIPTextModelWithProjection state dicts (`text_model.encoder.layers.0.self_attn.q_proj`), the
layout of diffusers folders and of SD1 single files (under `cond_stage_model.transformer.`),
so those keys load unchanged. Reference:
https://github.com/huggingface/transformers/blob/main/src/transformers/models/clip/modeling_clip.py
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CLIPConfig
from .ops import DEFAULT_OPS, Ops


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU (transformers' QuickGELUActivation)."""
    return x * torch.sigmoid(1.702 * x)


# Named functions, not lambdas, so a model pickles.
ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}  # OpenCLIP uses the exact erf GELU


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPConfig, ops: Ops):
        super().__init__()
        self.token_embedding = ops.Embedding(config.vocab_size, config.width)
        self.position_embedding = ops.Embedding(config.context_length, config.width)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        return self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, T, C)


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPConfig, ops: Ops):
        super().__init__()
        self.heads = config.heads
        self.q_proj = ops.Linear(config.width, config.width)
        self.k_proj = ops.Linear(config.width, config.width)
        self.v_proj = ops.Linear(config.width, config.width)
        self.out_proj = ops.Linear(config.width, config.width)
        self.attention = ops.attention

    def forward(self, x: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        out = self.attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, mask=causal_mask)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPConfig, ops: Ops):
        super().__init__()
        self.activation = ACTIVATIONS[config.activation]
        self.fc1 = ops.Linear(config.width, config.mlp_dim)
        self.fc2 = ops.Linear(config.mlp_dim, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: CLIPConfig, ops: Ops):
        super().__init__()
        self.self_attn = CLIPAttention(config, ops)
        self.layer_norm1 = ops.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config, ops)
        self.layer_norm2 = ops.LayerNorm(config.width, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), causal_mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPConfig, ops: Ops):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config, ops) for _ in range(config.layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPConfig, ops: Ops):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config, ops)
        self.encoder = CLIPEncoder(config, ops)
        self.final_layer_norm = ops.LayerNorm(config.width, eps=config.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """Token ids (B, T) -> hidden states of one layer (B, T, width), and optionally the pooled
    (B, projection_dim or width) end-of-text feature."""

    def __init__(self, config: CLIPConfig, ops: Ops = DEFAULT_OPS):
        super().__init__()
        if config.activation not in ACTIVATIONS:
            raise ValueError(f"CLIPConfig.activation must be one of {sorted(ACTIVATIONS)}, "
                             f"got {config.activation!r}")
        if config.width % config.heads:
            raise ValueError(f"CLIPConfig.width ({config.width}) must be divisible by heads ({config.heads})")
        self.config = config
        self.text_model = CLIPTextTransformer(config, ops)
        self.text_projection = (ops.Linear(config.width, config.projection_dim, bias=False)
                                if config.projection_dim is not None else None)

    def forward(self, input_ids: torch.Tensor, *, layer: int = -1, final_norm: bool = True,
                pooled: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`layer` indexes the hidden states like transformers' `hidden_states[layer]`
        (0 = embeddings, -1 = last layer, -2 = penultimate). The chosen hidden state gets the
        final layer norm when `final_norm`. With `pooled`, also returns final_layer_norm(last
        layer) at each row's first end-of-text token, projected by text_projection if any
        (transformers' `pooler_output` / `text_embeds`); without it, layers after the chosen
        one are not run."""
        self._check_ids(input_ids)
        n_layers = self.config.layers
        if not isinstance(layer, int) or not -(n_layers + 1) <= layer <= n_layers:
            raise ValueError(f"layer must be an int in [{-(n_layers + 1)}, {n_layers}] "
                             f"(hidden states 0..{n_layers}), got {layer!r}")
        chosen = layer % (n_layers + 1)  # index into [embeddings, layer 1 out, ..., layer L out]
        last_needed = n_layers if pooled else chosen

        text = self.text_model
        x = text.embeddings(input_ids)  # (B, T, C)
        seq_len = input_ids.shape[1]
        # Additive causal mask, (T, T): position i sees positions <= i.
        causal_mask = torch.full((seq_len, seq_len), torch.finfo(x.dtype).min, dtype=x.dtype,
                                 device=x.device).triu_(1)
        hidden = x
        for index, block in enumerate(text.encoder.layers[:last_needed], start=1):
            x = block(x, causal_mask)
            if index == chosen:
                hidden = x
        if final_norm:
            hidden = text.final_layer_norm(hidden)
        if not pooled:
            return hidden, None

        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        eos_positions = self._eos_positions(input_ids)
        # Layer norm is per token, so normalising only the gathered tokens gives the same values.
        pooled_output = text.final_layer_norm(x[rows, eos_positions])  # (B, C)
        if self.text_projection is not None:
            pooled_output = self.text_projection(pooled_output)  # (B, projection_dim)
        return hidden, pooled_output

    def _eos_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Index of each row's first end-of-text token; where a row has none, the position of its
        largest id (legacy CLIP, where end-of-text was the largest id: modeling_clip.py)."""
        is_eos = input_ids == self.config.eos_token_id
        first_eos = is_eos.int().argmax(dim=1)
        legacy = input_ids.argmax(dim=1)
        return torch.where(is_eos.any(dim=1), first_eos, legacy)

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an integer tensor (torch.long), got {input_ids.dtype}")
        if input_ids.dim() != 2 or input_ids.shape[0] == 0:
            raise ValueError(f"input_ids must have shape (batch, tokens) with batch >= 1, "
                             f"got {tuple(input_ids.shape)}")
        context = self.config.context_length
        if not 1 <= input_ids.shape[1] <= context:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens; this text encoder takes "
                             f"1 to {context} (truncate with the tokenizer)")
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size - 1}] "
                             f"(the vocabulary size is {self.config.vocab_size}), got ids in [{low}, {high}]")
