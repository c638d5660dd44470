"""load() against the reference implementations, on the formats users have.

Single files: our random models written in the LDM layout, then read twice: by our loader and by
diffusers' own single-file converters into diffusers/transformers models; the outputs must
agree. Diffusers folders: random diffusers/transformers models saved with save_pretrained, then
loaded by us; the outputs must agree. A round trip through our own key maps would prove nothing,
so the reference side never uses them.
"""
from __future__ import annotations

import importlib
import pickle

import pytest
import torch

import ckpt_fixtures as fx
from pocketdiffusion.checkpoints import Components, load
from pocketdiffusion.checkpoints.keymaps import map_state_dict
from pocketdiffusion.errors import CheckpointError, TokenizerFilesMissing
from pocketdiffusion.models.unet import sdxl_label_vector
from reference_clip import final_layer_norm

BOUND = 1e-4  # max-abs error relative to the reference's max |value|, fp32
KINDS = ["sd1", "sd2", "sdxl", "sd1_inpaint"]


def rel_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    return ((ours.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


def token_ids(clip, pad_id: int) -> torch.Tensor:
    """Two prompts as a tokenizer lays them out: BOS, words, EOS, padding."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.full((2, clip.context_length), pad_id, dtype=torch.long)
    for row, length in enumerate((5, 11)):
        ids[row, 0] = clip.vocab_size - 2  # BOS
        ids[row, 1:length + 1] = torch.randint(0, clip.vocab_size - 2, (length,), generator=generator)
        ids[row, length + 1] = clip.eos_token_id
    return ids


@torch.no_grad()
def compare(ours: Components, reference: dict) -> dict[str, float]:
    """Max relative error of every component's outputs on the same inputs."""
    config, errors = ours.config, {}
    generator = torch.Generator().manual_seed(5)
    pooled = None
    for i, (clip, encoding) in enumerate(zip(config.text_encoders, config.prompt_encodings)):
        ids = token_ids(clip, pad_id=clip.eos_token_id if i == 0 else 0)
        hf = reference["text_encoders"][i](ids, output_hidden_states=True)
        hidden, pooled_ours = ours.text_encoders[i](ids, layer=encoding.layer, final_norm=encoding.final_norm,
                                                    pooled=True)
        expected = hf.hidden_states[encoding.layer]
        if encoding.final_norm:
            expected = final_layer_norm(reference["text_encoders"][i])(expected)
        errors[f"text_encoder_{i}.hidden"] = rel_error(hidden, expected)
        pooled_ref = hf.text_embeds if clip.projection_dim else hf.pooler_output
        errors[f"text_encoder_{i}.pooled"] = rel_error(pooled_ours, pooled_ref)
        last, _ = ours.text_encoders[i](ids)
        errors[f"text_encoder_{i}.last"] = rel_error(last, hf.last_hidden_state)
        pooled = pooled_ours

    unet = config.unet
    x = torch.randn(2, unet.in_channels, 16, 8, generator=generator)
    t = torch.tensor([999.0, 37.0])
    context = torch.randn(2, 7, unet.context_dim, generator=generator)
    kwargs, y = {}, None
    if unet.adm_in_channels is not None:
        pooled = torch.randn(2, pooled.shape[1], generator=generator)
        time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 1344, 64, 32, 768, 1344]])
        y = sdxl_label_vector(pooled, time_ids)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    expected = reference["unet"](x, t, encoder_hidden_states=context, **kwargs).sample
    errors["unet"] = rel_error(ours.unet(x, t, context, y), expected)

    image = torch.rand(1, 3, 16, 16, generator=generator) * 2 - 1
    mean, logvar = ours.vae.encode(image)
    distribution = reference["vae"].encode(image).latent_dist
    errors["vae.encode.mean"] = rel_error(mean, distribution.mean)
    errors["vae.encode.logvar"] = rel_error(logvar, distribution.logvar)
    z = torch.randn(1, config.vae.embed_dim, 4, 4, generator=generator)
    errors["vae.decode"] = rel_error(ours.vae.decode(z), reference["vae"].decode(z).sample)
    print({k: f"{v:.1e}" for k, v in errors.items()})
    return errors


def assert_parity(errors: dict[str, float]) -> None:
    failing = {k: v for k, v in errors.items() if not v <= BOUND}
    assert not failing, failing


# ---- single files -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_single_file_matches_diffusers_single_file_converters(kind, tmp_path):
    config = fx.tiny_config(kind)
    path = fx.write_single_file(tmp_path / "model.safetensors", fx.ldm_state_dict(fx.our_models(config), config.family))
    ours = load(path, prediction="eps" if config.family == "sd2" else None)
    reference = fx.diffusers_from_single_file(path, config, tmp_path)
    assert (ours.config.unet, ours.config.vae, ours.config.text_encoders) == \
        (config.unet, config.vae, config.text_encoders)
    assert ours.config.prompt_encodings == config.prompt_encodings
    assert ours.config.is_inpainting == (kind == "sd1_inpaint")
    assert_parity(compare(ours, reference))


@pytest.mark.parametrize("kind,suffix,dtype", [
    ("sd1", ".safetensors", torch.float16),
    ("sdxl", ".safetensors", torch.bfloat16),
    ("sd2", ".ckpt", torch.float32),
    ("sdxl", ".ckpt", torch.float16),
])
def test_single_file_storage_formats(kind, suffix, dtype, tmp_path):
    """Half-precision files and Lightning .ckpt pickles: the weights come out the same numbers
    (upcast to fp32 on both sides) and the outputs agree."""
    config = fx.tiny_config(kind)
    path = fx.write_single_file(tmp_path / f"model{suffix}", fx.ldm_state_dict(fx.our_models(config), config.family),
                                dtype=dtype)
    ours = load(path, prediction="eps")
    assert_parity(compare(ours, fx.diffusers_from_single_file(path, config, tmp_path)))


# ---- diffusers folders ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_diffusers_folder_matches_diffusers_models(kind, tmp_path):
    # Two heads in the 64-wide encoders: only the folder's config.json can say so.
    config = fx.tiny_config(kind, clip_heads=2)
    models = fx.diffusers_models(config)
    prediction_type = "v_prediction" if config.family == "sd2" else "epsilon"
    folder = fx.write_diffusers_folder(tmp_path / "model", config, models, prediction_type=prediction_type)
    ours = load(folder)
    assert ours.config.family == config.family
    assert (ours.config.unet, ours.config.vae, ours.config.text_encoders) == \
        (config.unet, config.vae, config.text_encoders)
    assert ours.config.prediction == ("v" if config.family == "sd2" else "eps")
    if config.family == "sd2":
        assert ours.config.prompt_encodings[0].layer == -1  # the folder's tower is already cut
    assert_parity(compare(ours, models))


def test_a_second_unet_subfolder_shares_the_text_encoder_and_vae(tmp_path):
    """The embedded model ships its inpainting UNet as unet_inpaint/ beside the base one."""
    base = fx.tiny_config("sd1", clip_heads=2)
    models = fx.diffusers_models(base)
    folder = fx.write_diffusers_folder(tmp_path / "model", base, models)
    inpainting = fx.tiny_config("sd1_inpaint", clip_heads=2)
    fx.diffusers_models(inpainting, seed=3)["unet"].save_pretrained(folder / "unet_inpaint")
    assert load(folder).config.unet.in_channels == 4
    loaded = load(folder, unet_subfolder="unet_inpaint")
    assert loaded.config.unet.in_channels == 9 and loaded.config.is_inpainting
    with pytest.raises(CheckpointError, match="no unet_missing/ folder"):
        load(folder, unet_subfolder="unet_missing")
    with pytest.raises(CheckpointError, match="applies to diffusers folders"):
        load(fx.write_single_file(tmp_path / "m.safetensors", fx.ldm_state_dict(fx.our_models(base), "sd1")),
             unet_subfolder="unet_inpaint")


def test_diffusers_folder_with_pickled_bin_weights(tmp_path):
    config = fx.tiny_config("sdxl", clip_heads=2)
    models = fx.diffusers_models(config, seed=7)
    folder = fx.write_diffusers_folder(tmp_path / "model", config, models, safe_serialization=False)
    assert (folder / "unet" / "diffusion_pytorch_model.bin").is_file()
    assert (folder / "text_encoder_2" / "pytorch_model.bin").is_file()
    assert_parity(compare(load(folder), models))


def test_diffusers_folder_tokenizers_and_pad_tokens(tmp_path):
    config = fx.tiny_config("sdxl", clip_heads=2)
    folder = fx.write_diffusers_folder(tmp_path / "model", config, fx.diffusers_models(config))
    ours = load(folder)
    first, second = ours.tokenizers
    assert (first.pad_token, second.pad_token) == ("<|endoftext|>", "!")
    ids = second(["a photo of a cat"])
    assert ids.shape == (1, 77) and ids[0, -1] == second.encoder["!"]
    hidden, pooled = ours.text_encoders[1](ids, pooled=True)
    assert hidden.shape == (1, 77, 128) and pooled.shape == (1, fx.POOLED_DIM)


# ---- what load() promises -------------------------------------------------------------------------

def sd1_file(tmp_path, state=None, name="model.safetensors"):
    config = fx.tiny_config("sd1")
    if state is None:
        state = fx.ldm_state_dict(fx.our_models(config), "sd1")
    return fx.write_single_file(tmp_path / name, state)


def test_models_are_eval_without_grad_in_the_requested_dtype(tmp_path):
    path = sd1_file(tmp_path)
    default = load(path)
    half = load(path, dtype=torch.float16)
    for components, dtype in ((default, torch.float32), (half, torch.float16)):
        models = [components.unet, components.vae, *components.text_encoders]
        for model in models:
            assert not model.training
            for name, param in model.named_parameters():
                assert param.dtype == dtype and not param.requires_grad and param.device.type == "cpu", name
    assert default.source == str(path)


def test_every_key_is_read_once_and_discarded_keys_never(tmp_path, monkeypatch):
    """Weights are read one tensor at a time, each once; EMA copies and schedule buffers are
    skipped without being read."""
    # the module, not the function of the same name that the package exports
    load_module = importlib.import_module("pocketdiffusion.checkpoints.load")

    path = sd1_file(tmp_path)
    reads: list[str] = []
    real_open = load_module.open_weights

    def counting_open(p):
        source = real_open(p)
        real_get = source.get

        def get(key, dtype=None, device=None):
            reads.append(key)
            return real_get(key, dtype=dtype, device=device)

        source.get = get
        return source

    monkeypatch.setattr(load_module, "open_weights", counting_open)
    load(path)
    keys = list(fx.read_single_file(path))
    discarded = {"betas", "alphas_cumprod", "model_ema.decay", "model_ema.num_updates",
                 "cond_stage_model.transformer.text_model.embeddings.position_ids"}
    assert sorted(reads) == sorted(k for k in keys if k not in discarded)


@pytest.mark.parametrize("marker,prediction,expected", [(True, None, "v"), (True, "eps", "eps"), (False, "v", "v")])
def test_prediction_from_v_pred_key_or_argument(marker, prediction, expected, tmp_path):
    config = fx.tiny_config("sdxl")
    state = fx.ldm_state_dict(fx.our_models(config), "sdxl")
    if marker:
        state["v_pred"] = torch.tensor([])  # ComfyUI's marker for v-prediction SDXL models
    assert load(fx.write_single_file(tmp_path / "m.safetensors", state), prediction=prediction).config.prediction \
        == expected


@pytest.mark.parametrize("bias,expected", [(-5.0, "v"), (0.0, "eps")])
def test_sd2_single_file_prediction_probe(bias, expected, tmp_path):
    """A1111's rule: at t=999 on a constant 0.5 input, out - in averages below -1 only for v.
    A UNet whose output conv is a constant `bias` returns exactly that constant."""
    config = fx.tiny_config("sd2")
    models = fx.our_models(config)
    with torch.no_grad():
        models["unet"].out[2].weight.zero_()
        models["unet"].out[2].bias.fill_(bias)
    path = fx.write_single_file(tmp_path / "m.safetensors", fx.ldm_state_dict(models, "sd2"))
    detected = load(path).config
    assert detected.prediction == expected
    assert detected.native_size == (768 if expected == "v" else 512)
    assert load(path, prediction="eps").config.prediction == "eps"  # the argument skips the probe


def test_tokenizers_resolve_lazily(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hub_cache"))
    path = sd1_file(tmp_path)
    components = load(path)  # weights load without any vocabulary
    with pytest.raises(TokenizerFilesMissing, match="vocab.json"):
        components.tokenizers
    fx.write_tokenizer(tmp_path / "tokenizer", "<|endoftext|>")
    (tokenizer,) = load(path).tokenizers
    ids = tokenizer("a red apple")
    assert ids[0, 0] == fx.VOCAB_SIZE - 2 and tokenizer.pad_token == "<|endoftext|>"
    hidden, _ = components.text_encoders[0](ids)
    assert hidden.shape == (1, 77, 64)


# ---- bad input --------------------------------------------------------------------------------------

def test_a_file_of_another_architecture_is_named(tmp_path):
    sd3 = {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(6, 2),
           "first_stage_model.decoder.conv_in.weight": torch.zeros(2, 2, 3, 3)}
    with pytest.raises(CheckpointError, match="not an SD1/SD2/SDXL checkpoint.*Stable Diffusion 3"):
        load(fx.write_single_file(tmp_path / "sd3.safetensors", sd3))
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}
    with pytest.raises(CheckpointError, match="LoRA"):
        load(fx.write_single_file(tmp_path / "lora.safetensors", lora))
    with pytest.raises(CheckpointError, match="not an SD1/SD2/SDXL checkpoint.*weird.key"):
        load(fx.write_single_file(tmp_path / "random.safetensors", {"weird.key": torch.zeros(3)}))


def test_missing_unexpected_and_misshapen_tensors_are_listed_together(tmp_path):
    config = fx.tiny_config("sd1")
    state = fx.ldm_state_dict(fx.our_models(config), "sd1")
    del state["model.diffusion_model.output_blocks.1.0.skip_connection.bias"]
    state["model.diffusion_model.mystery.weight"] = torch.zeros(3)
    state["some_training_state"] = torch.zeros(1)
    state["first_stage_model.decoder.conv_out.bias"] = torch.zeros(4)  # expected (3,)
    with pytest.raises(CheckpointError) as error:
        load(fx.write_single_file(tmp_path / "bad.safetensors", state))
    message = str(error.value)
    assert "missing: 1 model parameter(s)" in message
    assert "unet.output_blocks.1.0.skip_connection.bias" in message
    assert "unexpected: 2 tensor(s)" in message
    assert "model.diffusion_model.mystery.weight" in message and "some_training_state" in message
    assert "first_stage_model.decoder.conv_out.bias -> vae.decoder.conv_out.bias: the file has (4,), " \
           "the model expects (3,)" in message


def test_a_config_that_does_not_fit_the_file(tmp_path):
    path = sd1_file(tmp_path)
    with pytest.raises(CheckpointError, match="(?s)does not fit the sdxl architecture given as config.*"
                                              "missing: 2.. model param.*unexpected: 1.. tensor.*wrong shape"):
        load(path, config=fx.tiny_config("sdxl"))


def test_a_wrong_openclip_projection_is_named(tmp_path):
    config = fx.tiny_config("sdxl")
    state = fx.ldm_state_dict(fx.our_models(config), "sdxl")
    key = "conditioner.embedders.1.model.text_projection"
    state[key] = state[key].t().contiguous()  # stored the wrong way round: (P, C)
    with pytest.raises(CheckpointError, match="text_projection"):
        load(fx.write_single_file(tmp_path / "bad.safetensors", state))


def test_bad_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a diffusers model folder"):
        load(tmp_path / "empty")
    only_index = tmp_path / "only_index"
    only_index.mkdir()
    (only_index / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", '
                                                 '"unet": ["diffusers", "UNet2DConditionModel"]}')
    with pytest.raises(CheckpointError, match="no unet/ folder.*model_index.json lists: unet"):
        load(only_index)
    config = fx.tiny_config("sd1", clip_heads=1)
    folder = fx.write_diffusers_folder(tmp_path / "no_weights", config, fx.diffusers_models(config))
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="vae has no weights file"):
        load(folder)


def test_truncated_file_and_malicious_pickle(tmp_path):
    path = sd1_file(tmp_path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load(truncated)

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"state_dict": {"x": Payload()}}, protocol=2))
    with pytest.raises(CheckpointError):
        load(evil)
    assert not marker.exists()


def test_bad_arguments(tmp_path):
    path = sd1_file(tmp_path)
    with pytest.raises(TypeError, match="path"):
        load(123)
    with pytest.raises(CheckpointError, match="no such file"):
        load(tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match="prediction"):
        load(path, prediction="x0")
    with pytest.raises(TypeError, match="dtype"):
        load(path, dtype="float16")
    with pytest.raises(TypeError, match="dtype"):
        load(path, dtype=torch.int8)
    with pytest.raises(TypeError, match="ModelConfig"):
        load(path, config={"family": "sd1"})
    with pytest.raises(ValueError, match="device"):
        load(path, device="gpu:0")


# ---- older layouts --------------------------------------------------------------------------------

def test_legacy_single_file_layouts(tmp_path):
    """Very old SD1 files lack transformers' `text_model.` level; some converted files store the
    VAE attention projections as (C, C) matrices instead of 1x1 convs. The reference is diffusers
    reading the same weights in today's layout."""
    config = fx.tiny_config("sd1")
    state = fx.ldm_state_dict(fx.our_models(config), "sd1")
    reference = fx.diffusers_from_single_file(fx.write_single_file(tmp_path / "new.safetensors", state),
                                              config, tmp_path)
    legacy = {}
    for key, value in state.items():
        key = key.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")
        if ".mid.attn_1." in key and value.ndim == 4:
            value = value[:, :, 0, 0]  # (C, C, 1, 1) -> (C, C)
        legacy[key] = value
    assert_parity(compare(load(fx.write_single_file(tmp_path / "old.safetensors", legacy)), reference))


def test_legacy_diffusers_layouts(tmp_path):
    """diffusers < 0.14 named the VAE attention query/key/value/proj_attn; transformers < 5.6
    saved CLIPTextModel with its `text_model.` level, and older ones the position_ids buffer."""
    config = fx.tiny_config("sd1", clip_heads=1)
    models = fx.diffusers_models(config)
    folder = fx.write_diffusers_folder(tmp_path / "model", config, models)
    text_weights = folder / "text_encoder" / "model.safetensors"
    text_state = {"text_model." + k: v for k, v in fx.load_file(str(text_weights)).items()}
    text_state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    fx.save_file(text_state, str(text_weights))
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in fx.load_file(str(weights)).items():
        for new, old in old_names.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        state[key] = value
    assert any(".query." in k for k in state)
    fx.save_file(state, str(weights))
    assert_parity(compare(load(folder), models))


def test_a_parameter_given_twice_is_named(tmp_path):
    config = fx.tiny_config("sd1")
    state = fx.ldm_state_dict(fx.our_models(config), "sd1")
    key = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    state["cond_stage_model.transformer.final_layer_norm.weight"] = state[key].clone()  # old and new layout
    with pytest.raises(CheckpointError, match="(?s)given twice: 1 parameter.*text_encoders.0.text_model.final_layer_norm"
                                              ".weight <- model.safetensors: cond_stage_model"):
        load(fx.write_single_file(tmp_path / "model.safetensors", state))


def test_whole_dict_mapping_of_a_single_file():
    """keymaps.map_state_dict turns a whole LDM dict into our parameters, values untouched
    except the OpenCLIP split and transpose."""
    config = fx.tiny_config("sdxl")
    models = fx.our_models(config)
    mapped = map_state_dict(fx.ldm_state_dict(models, "sdxl"))
    expected = {f"unet.{k}": v for k, v in models["unet"].state_dict().items()}
    expected.update({f"vae.{k}": v for k, v in models["vae"].state_dict().items()})
    for i, encoder in enumerate(models["text_encoders"]):
        expected.update({f"text_encoders.{i}.{k}": v for k, v in encoder.state_dict().items()})
    assert mapped.keys() == expected.keys()
    assert all(torch.equal(mapped[k], expected[k]) for k in expected)
    with pytest.raises(CheckpointError, match="two tensors map to"):
        map_state_dict({"cond_stage_model.transformer.text_model.final_layer_norm.bias": torch.zeros(2),
                        "cond_stage_model.transformer.final_layer_norm.bias": torch.zeros(2)})
