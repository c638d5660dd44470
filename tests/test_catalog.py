"""Model names: the embedded default model, local model folders, `pocketdiffusion models`."""
from __future__ import annotations

import json
import shutil

import pytest

import ckpt_fixtures as fx
import pocketdiffusion
from pocketdiffusion import catalog
from pocketdiffusion.cli import main


@pytest.fixture()
def models_dir(tmp_path, monkeypatch):
    """A model folder holding a diffusers folder, a single file and a file that is not a model."""
    folder = tmp_path / "models"
    config = fx.tiny_config("sd1")
    fx.write_diffusers_folder(folder / "tiny-folder", config, fx.diffusers_models(config))
    fx.write_single_file(folder / "tiny-file.safetensors", fx.ldm_state_dict(fx.our_models(config), "sd1"))
    (folder / "notes.txt").write_text("not a model")
    monkeypatch.setenv(catalog.MODELS_DIR_ENV, str(folder))
    monkeypatch.chdir(tmp_path)  # ./models is searched too: the same folder, listed once per entry
    return folder


def test_local_models_are_listed_and_resolve_by_name(models_dir):
    names = [m.name for m in catalog.local_models()]
    assert names.count("tiny-folder") >= 1 and names.count("tiny-file") >= 1 and "notes" not in names
    assert catalog.resolve("tiny-file").path == models_dir / "tiny-file.safetensors"
    assert catalog.resolve("tiny-folder").path == models_dir / "tiny-folder"
    pipe = pocketdiffusion.load("tiny-folder", device="cpu")
    assert pipe.name == "tiny-folder"
    assert pipe.generate("a cat", steps=2, width=64, height=64)[0].size == (64, 64)


def test_models_command_lists_them(models_dir, capsys):
    assert main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {"tiny-folder", "tiny-file"} <= {m["name"] for m in listed}
    assert main(["models"]) == 0
    assert "tiny-file" in capsys.readouterr().out


def test_a_missing_embedded_model_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(catalog, "ASSETS", tmp_path / "no-assets")
    assert not catalog.embedded_available()
    with pytest.raises(FileNotFoundError, match="embedded model 'shapes' is not in this installation"):
        pocketdiffusion.load()
    with pytest.raises(FileNotFoundError, match="shapes-inpainting"):
        catalog.resolve("shapes-inpainting")


def test_embedded_names_pick_the_unet_subfolder(monkeypatch, tmp_path):
    config = fx.tiny_config("sd1")
    folder = fx.write_diffusers_folder(tmp_path / "assets" / "shapes", config, fx.diffusers_models(config))
    shutil.copytree(folder / "unet", folder / "unet_inpaint")
    monkeypatch.setattr(catalog, "ASSETS", tmp_path / "assets")
    assert catalog.resolve("shapes") == catalog.ModelRef("shapes", folder, "unet", embedded=True)
    assert catalog.resolve("shapes-inpainting").unet_subfolder == "unet_inpaint"
    assert [m.name for m in catalog.all_models()][:2] == ["shapes", "shapes-inpainting"]
