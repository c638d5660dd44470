"""Typed architecture configs for the three Stable Diffusion networks, and presets.

Field names follow the original LDM code (`model_channels`, `channel_mult`, `ch`, ...) because
our module names follow its checkpoint keys. Format quirks (diffusers' `attention_head_dim`
misnomer, SD2's open_clip layout) are absorbed in `checkpoints/`, never here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class CLIPConfig:
    """A CLIP text transformer (OpenAI CLIP ViT-L/14, OpenCLIP ViT-H/14 or ViT-bigG/14)."""

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    activation: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP) or "gelu" (OpenCLIP)
    projection_dim: int | None = None  # text_projection (SDXL's second encoder); None = no projection
    eos_token_id: int = 49407  # pooled output is read at the first end-of-text token
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class PromptEncoding:
    """How a pipeline reads one text encoder: which hidden layer, and the tokenizer's pad token."""

    layer: int = -1  # -1 = last hidden layer, -2 = penultimate (clip skip 2)
    final_norm: bool = True  # apply final_layer_norm to the chosen layer (SD1/SD2 yes, SDXL no)
    pad_token: str = "<|endoftext|>"  # SD1: end-of-text; OpenCLIP (SD2, SDXL's 2nd): "!"


@dataclass(frozen=True)
class UNetConfig:
    """LDM `UNetModel` (openaimodel.py). `transformer_depth[i] == 0` means no attention at level i."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    transformer_depth_middle: int = 1
    num_heads: int | None = 8  # fixed head count (SD1) ...
    head_dim: int | None = None  # ... or fixed head size (SD2/SDXL: 64); exactly one is set
    context_dim: int = 768
    use_linear_in_transformer: bool = False  # SD2/SDXL project in/out with Linear, SD1 with 1x1 conv
    adm_in_channels: int | None = None  # SDXL: pooled text + 6 size/crop embeddings = 2816
    norm_groups: int = 32

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(heads, head_dim) of a transformer with `channels` channels."""
        if self.head_dim is not None:
            return channels // self.head_dim, self.head_dim
        assert self.num_heads is not None
        return self.num_heads, channels // self.num_heads


@dataclass(frozen=True)
class VAEConfig:
    """LDM `AutoencoderKL` (ldm/modules/diffusionmodules/model.py Encoder/Decoder)."""

    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    scaling_factor: float = 0.18215
    norm_groups: int = 32

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class ModelConfig:
    """A whole Stable Diffusion model: text encoder(s), UNet, VAE and how they are used."""

    family: str  # "sd1", "sd2", "sdxl", "shapes"
    text_encoders: tuple[CLIPConfig, ...]
    prompt_encodings: tuple[PromptEncoding, ...]
    unet: UNetConfig
    vae: VAEConfig
    prediction: str = "eps"  # "eps" or "v"
    native_size: int = 512

    @property
    def is_inpainting(self) -> bool:
        return self.unet.in_channels == 9


CLIP_L = CLIPConfig()
OPENCLIP_H = CLIPConfig(width=1024, layers=24, heads=16, mlp_dim=4096, activation="gelu")
OPENCLIP_BIGG = CLIPConfig(width=1280, layers=32, heads=20, mlp_dim=5120, activation="gelu",
                           projection_dim=1280)

SD15 = ModelConfig(
    family="sd1",
    text_encoders=(CLIP_L,),
    prompt_encodings=(PromptEncoding(),),
    unet=UNetConfig(),
    vae=VAEConfig(),
)
# SD2.x as single files store it: the OpenCLIP tower has 24 layers and the penultimate is used.
SD2 = ModelConfig(
    family="sd2",
    text_encoders=(OPENCLIP_H,),
    prompt_encodings=(PromptEncoding(layer=-2, pad_token="!"),),
    unet=UNetConfig(num_heads=None, head_dim=64, context_dim=1024, use_linear_in_transformer=True),
    vae=VAEConfig(),
    prediction="v",
    native_size=768,
)
SDXL = ModelConfig(
    family="sdxl",
    text_encoders=(CLIP_L, OPENCLIP_BIGG),
    prompt_encodings=(PromptEncoding(layer=-2, final_norm=False),
                      PromptEncoding(layer=-2, final_norm=False, pad_token="!")),
    unet=UNetConfig(channel_mult=(1, 2, 4), transformer_depth=(0, 2, 10), transformer_depth_middle=10,
                    num_heads=None, head_dim=64, context_dim=2048, use_linear_in_transformer=True,
                    adm_in_channels=2816),
    vae=VAEConfig(scaling_factor=0.13025),
    native_size=1024,
)
PRESETS = {"sd1": SD15, "sd15": SD15, "sd2": SD2, "sdxl": SDXL}


def inpainting(config: ModelConfig) -> ModelConfig:
    """The 9-input-channel inpainting variant (latents + mask + masked-image latents)."""
    return replace(config, unet=replace(config.unet, in_channels=9))


# The project's own small model (trained on the synthetic shapes data, src/pocketdiffusion/data/):
# the same architecture classes at toy size, 128x128 pixels (16x16 latents). vocab_size is the
# size of the BPE vocabulary built from the captions (data/vocab.py).
SHAPES_VOCAB_SIZE = 1024
SHAPES = ModelConfig(
    family="shapes",
    text_encoders=(CLIPConfig(vocab_size=SHAPES_VOCAB_SIZE, width=256, layers=3, heads=4, mlp_dim=1024,
                              activation="gelu", eos_token_id=SHAPES_VOCAB_SIZE - 1),),
    prompt_encodings=(PromptEncoding(),),
    unet=UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, transformer_depth=(0, 1, 1),
                    transformer_depth_middle=1, num_heads=None, head_dim=32, context_dim=256,
                    use_linear_in_transformer=True),
    vae=VAEConfig(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, scaling_factor=1.0, norm_groups=8),
    native_size=128,
)
PRESETS["shapes"] = SHAPES


def config_to_dict(config: ModelConfig) -> dict:
    """A ModelConfig as plain JSON-able data (tuples become lists)."""
    return asdict(config)


def config_from_dict(data: dict) -> ModelConfig:
    """The inverse of config_to_dict; a TypeError/ValueError names what does not fit."""
    def tupled(d: dict) -> dict:
        return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return ModelConfig(
        family=data["family"],
        text_encoders=tuple(CLIPConfig(**tupled(d)) for d in data["text_encoders"]),
        prompt_encodings=tuple(PromptEncoding(**d) for d in data["prompt_encodings"]),
        unet=UNetConfig(**tupled(data["unet"])),
        vae=VAEConfig(**tupled(data["vae"])),
        prediction=data["prediction"],
        native_size=data["native_size"],
    )
