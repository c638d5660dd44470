"""Pure key mappers for LDM/CompVis single files: `(key, tensor) -> [(target, tensor), ...]`.

A target is `"<component>.<parameter>"` in our models' names: `unet.input_blocks.1.0...`,
`vae.encoder.down.0...`, `text_encoders.0.text_model...`. An empty list means the tensor is
deliberately discarded (the reason is in `discard_reason`); a key nobody knows raises
`UnexpectedKey`, never silently dropped. The functions only slice, transpose and reshape, so
they work the same on real tensors and on meta tensors (which is how the loader checks a whole
file before reading a byte of it).

The diffusers-folder mappers are in keymaps_diffusers.py.
"""
from __future__ import annotations

import re

import torch

from ..errors import CheckpointError

Mapped = list[tuple[str, torch.Tensor]]

UNET = "unet"
VAE = "vae"


def text_encoder(index: int) -> str:
    """Component name of the `index`-th text encoder (SDXL has two)."""
    return f"text_encoders.{index}"


class UnexpectedKey(CheckpointError):
    """A tensor no rule knows: the loader collects these and reports them together."""

    def __init__(self, key: str, why: str = "no rule maps it to a model parameter"):
        super().__init__(f"{key}: {why}")
        self.key = key


# ---- what single files carry besides weights -------------------------------------------------

# The DDPM noise schedule that LDM/sgm register as persistent buffers
# (ldm/models/diffusion/ddpm.py `register_schedule`); sampling/ recomputes the schedule.
_SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
    # sgm's DiscreteDenoiser keeps its sigmas as buffers too
    "denoiser.sigmas", "denoiser.log_sigmas",
})

# (pattern, reason) checked in order; the first match discards the key.
_DISCARD_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), why) for p, why in (
    (r"^model_ema\.",
     "EMA copy of the UNet kept for training (the file's main UNet weights are used)"),
    (r"^first_stage_model\.loss\.",
     "the VAE's training loss (LPIPS network and discriminator)"),
    (r"(^|\.)position_ids$",
     "transformers' constant position index buffer (0..76), recomputed by the model"),
    (r"(^cond_stage_model\.model\.|^conditioner\.embedders\.\d+\.model\.)logit_scale$",
     "CLIP's contrastive-loss temperature, unused for text conditioning"),
    (r"^cond_stage_model\.model\.text_projection$",
     "SD2 conditions on the token hidden states; the pooled projection is never used"),
    (r"^v_pred$",
     "a flag (ComfyUI convention) that the model predicts v; read by detect(), holds no weight"),
    (r"^ztsnr$",
     "a flag (ComfyUI convention) for a zero-terminal-SNR schedule; holds no weight"),
))


def discard_reason(key: str) -> str | None:
    """Why a single-file key is deliberately not loaded, or None when it must map to a weight."""
    if key in _SCHEDULE_BUFFERS:
        return "the training noise schedule (a buffer, recomputed by the sampler)"
    for pattern, why in _DISCARD_RULES:
        if pattern.search(key):
            return why
    return None


# ---- text encoders ---------------------------------------------------------------------------

def map_hf_clip_key(key: str, tensor: torch.Tensor, index: int) -> Mapped:
    """A transformers CLIPTextModel(WithProjection) key -> our text encoder `index`.

    Our parameter names are transformers' with the `text_model.` level; CLIPTextModel saved by
    transformers >= 5.6 and very old SD1 files (`cond_stage_model.transformer.embeddings...`)
    lack that level, so it is added."""
    if key.endswith("position_ids"):
        return []  # see _DISCARD_RULES
    if key == "text_projection.weight" or key.startswith("text_model."):
        return [(f"{text_encoder(index)}.{key}", tensor)]
    return [(f"{text_encoder(index)}.text_model.{key}", tensor)]


# open_clip's TextTransformer names -> transformers' CLIP names, per transformer block
# (open_clip/transformer.py ResidualAttentionBlock; diffusers' DIFFUSERS_TO_LDM_MAPPING["openclip"]).
_OPENCLIP_BLOCK_RENAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_OPENCLIP_TOP_LEVEL = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_IN_PROJ = re.compile(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")


def map_openclip_key(key: str, tensor: torch.Tensor, index: int, *, keep_projection: bool) -> Mapped:
    """An open_clip text tower key (relative to `...model.`) -> our text encoder `index`.

    `attn.in_proj_weight` (3C, C) holds q, k and v stacked (torch.nn.MultiheadAttention), so it
    becomes three (C, C) tensors. open_clip computes `x @ text_projection` with a (C, P) matrix;
    our Linear computes `x @ W.T`, so W is its transpose (P, C). SD2 does not use the projection
    (`keep_projection=False`), SDXL's second encoder does."""
    prefix = text_encoder(index)
    if key in _OPENCLIP_TOP_LEVEL:
        return [(f"{prefix}.{_OPENCLIP_TOP_LEVEL[key]}", tensor)]
    if key == "text_projection":
        if not keep_projection:
            return []  # see _DISCARD_RULES
        if tensor.ndim != 2:
            raise UnexpectedKey(key, f"text_projection must be a (width, projection) matrix, "
                                     f"got shape {tuple(tensor.shape)}")
        return [(f"{prefix}.text_projection.weight", tensor.t().contiguous())]  # (P, C)
    if key == "logit_scale":
        return []  # see _DISCARD_RULES
    in_proj = _IN_PROJ.match(key)
    if in_proj:
        layer, kind = in_proj.groups()
        if tensor.shape[0] % 3:
            raise UnexpectedKey(key, f"in_proj must stack q, k and v along dim 0 (a multiple of 3), "
                                     f"got shape {tuple(tensor.shape)}")
        q, k, v = tensor.unflatten(0, (3, -1)).unbind(0)  # each (C, C) or (C,)
        base = f"{prefix}.text_model.encoder.layers.{layer}.self_attn"
        return [(f"{base}.q_proj.{kind}", q), (f"{base}.k_proj.{kind}", k), (f"{base}.v_proj.{kind}", v)]
    block = _RESBLOCK.match(key)
    if block and block.group(2) in _OPENCLIP_BLOCK_RENAMES:
        layer, name, kind = block.groups()
        return [(f"{prefix}.text_model.encoder.layers.{layer}.{_OPENCLIP_BLOCK_RENAMES[name]}.{kind}", tensor)]
    raise UnexpectedKey(key, "not part of an open_clip text transformer")


# ---- the whole single file -------------------------------------------------------------------

_VAE_ATTENTION_1X1 = re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def map_vae_key(key: str, tensor: torch.Tensor) -> Mapped:
    """An LDM VAE key (without `first_stage_model.`) -> ours. The mid-block attention
    projections are 1x1 convs (C, C, 1, 1) in LDM files; some converted files store them as
    Linear (C, C) matrices, which are the same numbers."""
    if _VAE_ATTENTION_1X1.match(key) and tensor.ndim == 2:
        tensor = tensor[:, :, None, None]  # (C, C) -> (C, C, 1, 1)
    return [(f"{VAE}.{key}", tensor)]


# (prefix, mapper of the key with the prefix removed)
_LDM_PREFIXES = (
    ("model.diffusion_model.", lambda k, t: [(f"{UNET}.{k}", t)]),
    ("first_stage_model.", map_vae_key),
    # SD1: OpenAI CLIP ViT-L/14 in transformers' layout
    ("cond_stage_model.transformer.", lambda k, t: map_hf_clip_key(k, t, 0)),
    # SD2: OpenCLIP ViT-H/14 in open_clip's layout
    ("cond_stage_model.model.", lambda k, t: map_openclip_key(k, t, 0, keep_projection=False)),
    # SDXL: CLIP ViT-L/14 (transformers' layout) and OpenCLIP ViT-bigG/14 (open_clip's layout)
    ("conditioner.embedders.0.transformer.", lambda k, t: map_hf_clip_key(k, t, 0)),
    ("conditioner.embedders.1.model.", lambda k, t: map_openclip_key(k, t, 1, keep_projection=True)),
)


def map_ldm_key(key: str, tensor: torch.Tensor) -> Mapped:
    """One key of an LDM/CompVis/sgm single file (SD1.x, SD2.x, SDXL) -> our parameters."""
    if discard_reason(key) is not None:
        return []
    for prefix, mapper in _LDM_PREFIXES:
        if key.startswith(prefix):
            return mapper(key[len(prefix):], tensor)
    raise UnexpectedKey(key, "not under any SD1/SD2/SDXL component prefix "
                             "(model.diffusion_model., first_stage_model., cond_stage_model., "
                             "conditioner.embedders.)")


def map_state_dict(state_dict: dict[str, torch.Tensor], mapper=map_ldm_key) -> dict[str, torch.Tensor]:
    """Apply a key mapper to a whole dict, refusing two sources for one target."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        for target, value in mapper(key, tensor):
            if target in out:
                raise CheckpointError(f"two tensors map to {target}; the second is {key}")
            out[target] = value
    return out


def meta_like(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A data-less tensor of `shape`: what the mappers see during a dry run."""
    return torch.empty(shape, dtype=dtype, device="meta")


def mapped_shapes(shapes: dict[str, tuple[int, ...]], mapper=map_ldm_key,
                  ) -> tuple[dict[str, tuple[int, ...]], list[UnexpectedKey]]:
    """Run `mapper` on shapes alone: ({target: shape}, the keys it rejected)."""
    out: dict[str, tuple[int, ...]] = {}
    rejected: list[UnexpectedKey] = []
    for key, shape in shapes.items():
        try:
            mapped = mapper(key, meta_like(tuple(shape)))
        except UnexpectedKey as error:
            rejected.append(error)
            continue
        for target, tensor in mapped:
            out[target] = tuple(tensor.shape)
    return out, rejected
