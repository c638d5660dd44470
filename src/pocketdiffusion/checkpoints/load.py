"""load(path) -> Components: a single file or a diffusers folder, as our models.

The discipline of nanoGPT's `from_pretrained`: every tensor of the source is consumed exactly
once (mapped to a parameter, or discarded by a named rule in keymaps.py), every parameter of the
models is assigned exactly once with its exact shape; anything else is one CheckpointError that
lists all the problems. The check runs on shapes alone (the mappers run on meta tensors) before
any weight is read, so a bad file fails in milliseconds.

Memory: the models are built on the meta device (no allocation), then the weights are read one
tensor at a time, converted to the target dtype/device and put in place, so the peak is the
model in its target dtype plus one tensor. A memory plan may first swap layers of the meta models
(`swap_layers`: int8 in memory/quant.py, 16-bit storage in memory/store16.py); such a layer takes
its weight through `load_weight` as the weight is read, and the file's pages of that tensor are
dropped at once, so a quantized model never holds its float weights all together.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import CheckpointError
from ..models.clip import CLIPTextModel
from ..models.ops import DEFAULT_OPS, Ops
from ..models.tokenizer import CLIPTokenizer, locate_clip_vocab
from ..models.unet import UNetModel
from ..models.vae import AutoencoderKL
from .detect import detect, needs_prediction_probe, with_prediction
from .formats import TensorSource, find_component_weights, open_weights, read_json
from .keymaps import UNET, VAE, Mapped, UnexpectedKey, discard_reason, map_hf_clip_key, map_ldm_key, \
    meta_like, text_encoder
from .keymaps_diffusers import diffusers_discard_reason, map_diffusers_unet_key, map_diffusers_vae_key
from .store import identity_key, is_store, no_discard, store_config
from .stream import StreamedWeights, Streaming

MAX_LISTED = 10  # problems listed per kind in one error
DIFFUSERS_TEXT_FOLDERS = ("text_encoder", "text_encoder_2")
# Where the tokenizer files are usually found when the model has none next to it.
HF_TOKENIZER_REPOS = {
    "sd1": ("openai/clip-vit-large-patch14",),
    "sd2": ("stabilityai/stable-diffusion-2-1",),
    "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0",),
}


@dataclass
class Components:
    """The loaded model: text encoder(s), UNet and VAE in eval mode without gradients, and how
    to use them (`config`). `tokenizers` are read on first use, so weights load without them."""

    config: ModelConfig
    text_encoders: list[CLIPTextModel]
    unet: UNetModel
    vae: AutoencoderKL
    source: str
    # Tokenizers handed over at construction (in-memory models, tests); None: found on first use.
    given_tokenizers: list[CLIPTokenizer] | None = field(default=None, repr=False)
    # Where idle components wait between uses (memory/residency.py's HostParking); None: where loaded.
    residency: Any = field(default=None, repr=False)

    def in_use(self, *modules: nn.Module) -> ContextManager:
        """`modules` on their run device for the block (parked ones are brought and sent back)."""
        return self.residency.use(*modules) if self.residency is not None else contextlib.nullcontext()

    @property
    def tokenizers(self) -> list[CLIPTokenizer]:
        """One CLIPTokenizer per text encoder. Raises TokenizerFilesMissing (naming where
        vocab.json and merges.txt were looked for) when they are neither in the model's
        folder (`tokenizer/`, `tokenizer_2/`) nor in the Hugging Face cache."""
        if self.given_tokenizers is None:
            self.given_tokenizers = [self._tokenizer(i) for i in range(len(self.text_encoders))]
        return self.given_tokenizers

    def _tokenizer(self, index: int) -> CLIPTokenizer:
        clip, encoding = self.config.text_encoders[index], self.config.prompt_encodings[index]
        subfolder = "tokenizer" if index == 0 else f"tokenizer_{index + 1}"
        vocab, merges = locate_clip_vocab(self.source, subfolder,
                                          HF_TOKENIZER_REPOS.get(self.config.family, ()))
        tokenizer = CLIPTokenizer.from_files(vocab, merges, pad_token=encoding.pad_token,
                                             context_length=clip.context_length)
        if tokenizer.vocab_size > clip.vocab_size:
            raise CheckpointError(f"the tokenizer at {vocab} has {tokenizer.vocab_size} tokens but text "
                                  f"encoder {index} embeds only {clip.vocab_size}: they do not belong together")
        return tokenizer


def load(path: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
         *, prediction: str | None = None, config: ModelConfig | None = None, ops: Ops = DEFAULT_OPS,
         unet_subfolder: str = "unet", streaming: Streaming | None = None,
         host_components: tuple[str, ...] = (),
         swap_layers: Callable[[dict[str, nn.Module]], None] | None = None) -> Components:
    """Load a Stable Diffusion 1.x / 2.x / XL model (base or inpainting).

    `path`: a single `.safetensors` / `.ckpt` file in the LDM layout (what A1111, ComfyUI and
    civitai use) or a diffusers folder (with unet/, vae/, text_encoder/...).
    `device` (default CPU) and `dtype` (default float32 on CPU, float16 elsewhere) are where and
    in which precision the weights are placed. `prediction` ("eps" or "v") overrides what the
    files say (and skips the SD2 eps/v probe). `config` skips detection altogether. `ops` is the
    layer family the models are built from (its layers must keep torch's parameter names).
    `unet_subfolder` picks another UNet of a diffusers folder (the embedded model keeps its
    inpainting UNet in `unet_inpaint/` beside the shared text encoder and VAE).
    `streaming` (the "minimal" memory mode, memory/streaming.py) leaves the weights it claims
    in their files, read when their block runs (checkpoints/stream.py).
    `swap_layers(models)` changes the models' layers on the meta device before any weight is read
    ({"unet": ..., "vae": ..., "text_encoders.0": ...}); a layer with `load_weight(tensor)` (and
    `weight_shape`, `stored_buffers`) is given its float weight, in `dtype`, through it.
    `host_components` ("text_encoders", "vae") are placed in CPU memory whatever `device` is
    (in `dtype`): a plan that parks them there between uses (memory/residency.py) never has
    them on the device at load.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or Path to a model file or folder, got {type(path).__name__}")
    if config is not None and not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    if prediction is not None and prediction not in ("eps", "v"):
        raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
    device = _resolve_device(device)
    dtype = _resolve_dtype(dtype, device)
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")

    given_config = config is not None
    sources: list[WeightSource] = []
    streamed = StreamedWeights(dtype) if streaming is not None else None
    installed = False
    try:
        probe = False
        if path.is_dir():
            config = _open_diffusers(path, sources, prediction, config, unet_subfolder)
        else:
            if unet_subfolder != "unet":
                raise CheckpointError(f"unet_subfolder={unet_subfolder!r} applies to diffusers folders; "
                                      f"{path} is a single file")
            config = _open_single_file(path, sources, prediction, config)
            probe = (not given_config and not is_store(sources[0].tensors)  # a store's header says eps or v
                     and needs_prediction_probe(sources[0].tensors.shapes(), config, prediction))
        if prediction is not None:
            config = with_prediction(config, prediction)
        models = _build_on_meta(config, ops)
        if swap_layers is not None:
            swap_layers(models)
        slots = _slots(models)
        if streaming is not None:
            both = [target for target, slot in slots.items() if slot.through_layer and streaming.streams(target)]
            if both:
                raise ValueError(f"{both[0]} is both streamed and taken by a swapped layer: a streamed weight is "
                                 "put in place as it is read, never through a layer's load_weight")
        _check_plan(sources, slots, f"the {config.family} architecture "
                    f"{'given as config' if given_config else 'detected from its shapes'}")
        for source in sources:
            _load_source(source, slots, device, dtype, streaming, streamed, host_components)
        if streamed is not None:
            _put_placeholders(streamed, slots, device, dtype)
            _check_all_materialized(models)
            streaming.install(models, streamed)  # before the eps/v probe below runs the UNet
            installed = True
    finally:
        for source in sources:  # a streamed model's files stay open: its weights are read from them
            if not (installed and streamed.uses(source)):
                source.tensors.close()
    _check_all_materialized(models)

    unet = models[UNET]
    if probe:
        config = with_prediction(config, "v" if probe_v_prediction(unet) else "eps")
    return Components(config=config, text_encoders=[models[text_encoder(i)] for i in range(len(config.text_encoders))],
                      unet=unet, vae=models[VAE], source=str(path))


def read_config(path: str | os.PathLike, unet_subfolder: str = "unet") -> ModelConfig:
    """The ModelConfig of a model, from its tensor shapes and config files, reading no weight
    (for the planner). An SD2 single file that does not say eps or v is reported as detected."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    sources: list[WeightSource] = []
    try:
        if path.is_dir():
            return _open_diffusers(path, sources, None, None, unet_subfolder)
        return _open_single_file(path, sources, None, None)
    finally:
        for source in sources:
            source.tensors.close()


# ---- sources ------------------------------------------------------------------------------------

@dataclass
class WeightSource:
    """One weights file and how its keys become our parameters."""

    label: str  # for messages: the file name, or "unet/diffusion_pytorch_model.safetensors"
    tensors: TensorSource
    mapper: Callable[[str, torch.Tensor], Mapped]
    discard: Callable[[str], str | None]


def _open_single_file(path: Path, sources: list[WeightSource], prediction: str | None,
                      config: ModelConfig | None) -> ModelConfig:
    tensors = open_weights(path)
    if is_store(tensors):  # `pocketdiffusion convert`'s output: our names, the config in the header
        sources.append(WeightSource(path.name, tensors, identity_key, no_discard))
        return config if config is not None else store_config(tensors)
    sources.append(WeightSource(path.name, tensors, map_ldm_key, discard_reason))
    return config if config is not None else detect(tensors.shapes(), prediction=prediction)


def _open_diffusers(folder: Path, sources: list[WeightSource], prediction: str | None,
                    config: ModelConfig | None, unet_subfolder: str = "unet") -> ModelConfig:
    present = {entry.name for entry in folder.iterdir()}
    if not present & {"model_index.json", "unet", "vae", "text_encoder"}:
        raise CheckpointError(f"{folder} is not a diffusers model folder: it has no model_index.json, "
                              "unet/, vae/ or text_encoder/ (for a single .safetensors/.ckpt file, pass the file)")
    if "text_encoder" not in present and "text_encoder_2" in present:
        raise CheckpointError(f"{folder} has text_encoder_2/ but no text_encoder/: an SDXL refiner, "
                              "which is not supported")
    for component in (unet_subfolder, "vae", "text_encoder"):
        if not (folder / component).is_dir():
            listed = ""
            if "model_index.json" in present:
                index = read_json(folder / "model_index.json")
                listed = f" (model_index.json lists: {', '.join(k for k in index if not k.startswith('_'))})"
            raise CheckpointError(f"the diffusers folder {folder} has no {component}/ folder{listed}; "
                                  "a Stable Diffusion folder needs unet/, vae/ and text_encoder/")
    texts = [name for name in DIFFUSERS_TEXT_FOLDERS if (folder / name).is_dir()]
    configs = {name: read_json(folder / name / "config.json") for name in ["vae"] + texts}
    configs["unet"] = read_json(folder / unet_subfolder / "config.json")
    optional = {"scheduler": "scheduler/scheduler_config.json", "tokenizer": "tokenizer/special_tokens_map.json",
                "tokenizer_2": "tokenizer_2/special_tokens_map.json"}
    for name, relative in optional.items():
        if (folder / relative).is_file():
            configs[name] = read_json(folder / relative)

    text_files = {name: find_component_weights(folder / name, ("model", "pytorch_model")) for name in texts}
    for index, name in enumerate(texts):
        tensors = open_weights(text_files[name])
        sources.append(WeightSource(f"{name}/{text_files[name].name}", tensors,
                                    functools.partial(map_hf_clip_key, index=index), diffusers_discard_reason))
    if config is None:
        shapes = {f"{name}/{key}": shape for name, source in zip(texts, sources)
                  for key, shape in source.tensors.shapes().items()}
        config = detect(shapes, prediction=prediction, diffusers_configs=configs)
    for name, mapper in ((unet_subfolder, functools.partial(map_diffusers_unet_key, config=config.unet)),
                         ("vae", functools.partial(map_diffusers_vae_key, config=config.vae))):
        weights = find_component_weights(folder / name)
        sources.append(WeightSource(f"{name}/{weights.name}", open_weights(weights), mapper,
                                    diffusers_discard_reason))
    return config


# ---- models and their parameter slots -----------------------------------------------------------

_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_",
                   "kaiming_normal_", "xavier_uniform_", "xavier_normal_")


@contextlib.contextmanager
def _without_initialisation():
    """Skip torch's random parameter initialisation while the meta models are built: every
    weight is about to be replaced, and on the meta device the init functions go through
    torch._refs, whose first use imports torch._dynamo (measured: 0.7 s of a 0.9 s store load).
    Layers call them as `init.<name>(...)`, looked up at call time, so replacing them here for
    the duration of the build is enough."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(nn.init, name, _keep)
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


def _keep(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return tensor


def _build_on_meta(config: ModelConfig, ops: Ops) -> dict[str, nn.Module]:
    """Our models for `config`, on the meta device: shapes without memory."""
    try:
        with torch.device("meta"), _without_initialisation():
            models: dict[str, nn.Module] = {UNET: UNetModel(config.unet, ops), VAE: AutoencoderKL(config.vae, ops)}
            for index, clip in enumerate(config.text_encoders):
                models[text_encoder(index)] = CLIPTextModel(clip, ops)
    except ValueError as error:  # the models' own config checks: say it is the checkpoint's architecture
        raise CheckpointError(f"cannot build the models of this checkpoint's architecture: {error}") from None
    for model in models.values():
        model.eval()
    return models


@dataclass
class Slot:
    module: nn.Module
    name: str
    is_parameter: bool
    shape: tuple[int, ...]
    through_layer: bool = False  # given to `module.load_weight` (a swapped layer's stored form)


def _slots(models: dict[str, nn.Module]) -> dict[str, Slot]:
    """{target key: where it goes} for every parameter and persistent buffer (the state dict); a
    swapped layer's stored buffers are one `<name>.weight` slot, filled through its `load_weight`."""
    slots = {}
    for component, model in models.items():
        for module_name, module in model.named_modules():
            prefix = f"{component}.{module_name}." if module_name else f"{component}."
            stored: tuple[str, ...] = ()
            if callable(getattr(module, "load_weight", None)):
                stored = tuple(module.stored_buffers)
                slots[prefix + "weight"] = Slot(module, "weight", False, tuple(module.weight_shape), True)
            for name, tensor in module._parameters.items():
                if tensor is not None:
                    slots[prefix + name] = Slot(module, name, True, tuple(tensor.shape))
            for name, tensor in module._buffers.items():
                if tensor is not None and name not in module._non_persistent_buffers_set and name not in stored:
                    slots[prefix + name] = Slot(module, name, False, tuple(tensor.shape))
    return slots


# ---- the exactly-once check ---------------------------------------------------------------------

def _listing(title: str, items: list[str]) -> str:
    """`title` with {n} filled in, then up to MAX_LISTED items, one per line."""
    shown = "\n  ".join(items[:MAX_LISTED])
    more = f"\n  ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"{title.format(n=len(items))}:\n  {shown}{more}"


def _check_plan(sources: list[WeightSource], slots: dict[str, Slot], architecture: str) -> None:
    """Map every key on shapes alone; raise one CheckpointError listing every problem."""
    assigned: dict[str, str] = {}  # target -> "label: key" it comes from
    unexpected, mismatched, duplicated = [], [], []
    for source in sources:
        for key in source.tensors.keys():
            if source.discard(key) is not None:
                continue
            origin = f"{source.label}: {key}"
            stored_dtype = source.tensors.dtype(key)
            try:
                mapped = source.mapper(key, meta_like(source.tensors.shape(key), stored_dtype))
            except UnexpectedKey as error:
                unexpected.append(f"{source.label}: {error}")
                continue
            for target, tensor in mapped:
                slot = slots.get(target)
                if slot is None:
                    unexpected.append(f"{origin} -> {target}, which the model does not have")
                elif target in assigned:
                    duplicated.append(f"{target} <- {assigned[target]} and {origin}")
                else:
                    assigned[target] = origin
                    if tuple(tensor.shape) != slot.shape:
                        mismatched.append(f"{origin} -> {target}: the file has {tuple(tensor.shape)}, "
                                          f"the model expects {slot.shape}")
                    elif not stored_dtype.is_floating_point:
                        mismatched.append(f"{origin} -> {target}: stored as {stored_dtype}, "
                                          "expected floating-point weights")
    missing = [target for target in slots if target not in assigned]
    if unexpected or mismatched or duplicated or missing:
        parts = [_listing(title, items) for title, items in (
            ("missing: {n} model parameter(s) that no tensor maps to", missing),
            ("unexpected: {n} tensor(s) that no parameter takes", unexpected),
            ("wrong shape or type: {n} tensor(s)", mismatched),
            ("given twice: {n} parameter(s)", duplicated)) if items]
        where = ", ".join(source.label for source in sources)
        raise CheckpointError(f"{where} does not fit {architecture}:\n" + "\n".join(parts))


# ---- reading ------------------------------------------------------------------------------------

def _load_source(source: WeightSource, slots: dict[str, Slot], device: torch.device, dtype: torch.dtype,
                 streaming: Streaming | None = None, streamed: StreamedWeights | None = None,
                 host_components: tuple[str, ...] = ()) -> None:
    """Read, map, convert and place the source's tensors one at a time (those `streaming`
    claims are only recorded in `streamed`; those of `host_components` go to CPU memory)."""
    for key in source.tensors.keys():
        if source.discard(key) is not None:
            continue
        skip: set[str] = set()
        if streaming is not None:
            targets = [t for t, _ in source.mapper(key, meta_like(source.tensors.shape(key),
                                                                  source.tensors.dtype(key)))]
            skip = {t for t in targets if streaming.streams(t)}
            streamed.add(source, key, skip)
            if len(skip) == len(targets):
                continue
        floating = source.tensors.dtype(key).is_floating_point
        place = device
        if host_components:
            mapped = source.mapper(key, meta_like(source.tensors.shape(key), source.tensors.dtype(key)))
            if mapped and mapped[0][0].split(".", 1)[0] in host_components:
                place = torch.device("cpu")
        tensor = source.tensors.get(key, dtype=dtype if floating else None, device=place)
        kept = False  # whether a slot holds the tensor itself (possibly a view of the mapped file)
        for target, value in source.mapper(key, tensor):
            if target in skip:
                continue
            slot = slots[target]
            if slot.through_layer:
                slot.module.load_weight(value)  # its own converted copy
            elif slot.is_parameter:
                slot.module._parameters[slot.name] = nn.Parameter(value, requires_grad=False)
                kept = True
            else:
                slot.module._buffers[slot.name] = value
                kept = True
        del tensor
        if not kept and not skip:
            value = None  # the last view of the file's bytes, before its pages go
            source.tensors.release(key)  # only converted copies were kept: the file's pages can go


def _put_placeholders(streamed: StreamedWeights, slots: dict[str, Slot], device: torch.device,
                      dtype: torch.dtype) -> None:
    """An empty tensor of the run dtype and device in each streamed slot: `next(parameters())`
    still tells where and in which precision the model runs, and a layer used outside its
    streamed block fails loudly (an empty weight) instead of computing with stale values."""
    placeholder = torch.empty(0, dtype=dtype, device=device)
    for target in streamed.targets:
        slot = slots[target]
        if slot.is_parameter:
            slot.module._parameters[slot.name] = nn.Parameter(placeholder, requires_grad=False)
        else:
            slot.module._buffers[slot.name] = placeholder


def _check_all_materialized(models: dict[str, nn.Module]) -> None:
    """A tensor still on meta is a model bug (e.g. a non-persistent buffer created in __init__),
    not a file problem: say so rather than fail later with a meta-tensor error."""
    for component, model in models.items():
        left = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if left:
            raise RuntimeError(f"{component}: {', '.join(left[:MAX_LISTED])} were never loaded; a model "
                               "built on the meta device must keep every tensor in its state dict")


def _resolve_device(device) -> torch.device:
    try:
        return torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from None


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.float16
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype such as torch.float16, got {dtype!r}")
    return dtype


# ---- eps or v -----------------------------------------------------------------------------------

@torch.no_grad()
def probe_v_prediction(unet: UNetModel) -> bool:
    """Whether an SD2 UNet predicts v, from one forward pass (A1111's
    `is_using_v_parameterization_for_sd2`, modules/sd_models_config.py): at t=999 the input is
    almost pure noise, so an eps model returns about its input while a v model returns about
    minus the clean image; on a constant 0.5 input, out - in averages below -1 only for v."""
    weight = next(unet.parameters())
    cfg = unet.config
    side = max(8, 2 ** (len(cfg.channel_mult) - 1))
    x = torch.full((1, cfg.in_channels, side, side), 0.5, device=weight.device, dtype=weight.dtype)
    context = torch.full((1, 2, cfg.context_dim), 0.5, device=weight.device, dtype=weight.dtype)
    y = None if cfg.adm_in_channels is None else torch.zeros(1, cfg.adm_in_channels, device=weight.device,
                                                                dtype=weight.dtype)
    out = unet(x, torch.tensor([999.0], device=weight.device), context, y)
    return (out.float() - x[:, : out.shape[1]].float()).mean().item() < -1
