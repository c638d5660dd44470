"""`pocketdiffusion convert`: the store loads back to the same models, with no detection."""
from __future__ import annotations

import pytest
import torch

import ckpt_fixtures as fx
from pocketdiffusion.checkpoints import load
from pocketdiffusion.checkpoints.formats import open_weights
from pocketdiffusion.checkpoints.store import STORE_FORMAT, convert
from pocketdiffusion.cli import main


def state(parts) -> dict[str, torch.Tensor]:
    models = [("text_encoders.%d" % i, m) for i, m in enumerate(parts.text_encoders)]
    return {f"{name}.{k}": v for name, m in [*models, ("unet", parts.unet), ("vae", parts.vae)]
            for k, v in m.state_dict().items()}


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl", "sd1_inpaint"])
def test_store_round_trip(kind, tmp_path):
    config = fx.tiny_config(kind, clip_heads=2)
    prediction = "v_prediction" if config.family == "sd2" else "epsilon"
    folder = fx.write_diffusers_folder(tmp_path / "model", config, fx.diffusers_models(config),
                                       prediction_type=prediction)
    out = convert(folder, tmp_path / "store.safetensors")
    with open_weights(out) as tensors:
        assert tensors.metadata["format"] == STORE_FORMAT
        keys = tensors.keys()
        # execution order: text encoders, then the UNet, then the VAE
        first = {prefix: next(i for i, k in enumerate(keys) if k.startswith(prefix))
                 for prefix in ("text_encoders.0.", "unet.", "vae.")}
        assert first["text_encoders.0."] < first["unet."] < first["vae."]
        assert all(t == torch.float16 for t in map(tensors.dtype, keys))
    source, stored = load(folder, dtype=torch.float16), load(out, dtype=torch.float16)
    assert stored.config == source.config
    a, b = state(source), state(stored)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_convert_command_and_refusals(tmp_path, capsys):
    config = fx.tiny_config("sd1")
    folder = fx.write_diffusers_folder(tmp_path / "model", config, fx.diffusers_models(config))
    out = tmp_path / "store.safetensors"
    assert main(["convert", str(folder), str(out), "--dtype", "fp32"]) == 0
    assert str(out) in capsys.readouterr().out
    assert load(out).config.unet == config.unet
    before = out.read_bytes()
    assert main(["convert", str(folder), str(out)]) == 2  # exists: refused, unchanged
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["convert", str(folder), str(out), "--overwrite"]) == 0
    assert main(["convert", str(folder), str(tmp_path / "store.ckpt")]) == 2
    assert ".safetensors" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*.tmp"))


def test_convert_refuses_bad_arguments(tmp_path):
    from pocketdiffusion.errors import CheckpointError
    with pytest.raises(ValueError, match="dtype must be float16, bfloat16 or float32"):
        convert(tmp_path, tmp_path / "s.safetensors", dtype=torch.int8)
    with pytest.raises(CheckpointError, match="no such file or folder"):
        convert(tmp_path / "missing.safetensors", tmp_path / "s.safetensors")
    assert not list(tmp_path.iterdir())  # nothing half-written
