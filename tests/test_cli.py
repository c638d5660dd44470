"""The `pocketdiffusion` command line, run in-process (`main([...])`) against tiny SD1 and SD1
inpainting diffusers folders written once per session."""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import warnings
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ckpt_fixtures as fx
import pocketdiffusion
from pocketdiffusion import catalog, cli
from pocketdiffusion.cli import MODEL_ENV, build_parser, main
from pocketdiffusion.cli_from import defaults_from_parameters
from pocketdiffusion.pipelines import request as request_module
from pocketdiffusion.pipelines.metadata import parse_parameters, read_png_infotext, read_png_parameters
from pocketdiffusion.pipelines.outpaint import OUTPAINT_MASK_BLUR
from pocketdiffusion.pipelines.pipeline import Run
from pocketdiffusion.sampling import SAMPLERS

FAST = ["--steps", "2", "--width", "64", "--height", "64", "--device", "cpu"]


@pytest.fixture(scope="session")
def sd1(tmp_path_factory) -> str:
    config = fx.tiny_config("sd1")
    return str(fx.write_diffusers_folder(tmp_path_factory.mktemp("models") / "tiny_sd1", config,
                                         fx.diffusers_models(config)))


@pytest.fixture(scope="session")
def sd1_inpaint(tmp_path_factory) -> str:
    config = fx.tiny_config("sd1_inpaint")
    return str(fx.write_diffusers_folder(tmp_path_factory.mktemp("models") / "tiny_sd1_inpaint", config,
                                         fx.diffusers_models(config, seed=3)))


@pytest.fixture(autouse=True)
def _no_model_from_environment(monkeypatch):
    monkeypatch.delenv(MODEL_ENV, raising=False)


def cli_run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def written(out: str) -> list[Path]:
    return [Path(line) for line in out.splitlines()]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def noise_image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(array).save(path)
    return path


def forbid_model_loading(monkeypatch) -> None:
    """Make any model load fail the test: the input checks must come first."""
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded although the input was already known to be bad")
    monkeypatch.setattr(pocketdiffusion, "load", fail)


# ---- generate / info / --from ----------------------------------------------------------------------

def test_generate_writes_a_png_whose_parameters_read_back(capsys, tmp_path, sd1):
    code, out, err = cli_run(capsys, "generate", "a red apple", "--negative", "blurry", "--seed", "42",
                             "--cfg", "6", "--model", sd1, *FAST, "--outdir", tmp_path)
    assert code == 0, err
    [path] = written(out)
    assert path.parent == tmp_path and path.name == "00000-42-a_red_apple.png"
    params = read_png_parameters(path)
    assert {k: params[k] for k in ("Prompt", "Negative prompt", "Steps", "Sampler", "CFG scale", "Seed",
                                   "Size-1", "Size-2", "Model")} == {
        "Prompt": "a red apple", "Negative prompt": "blurry", "Steps": "2", "Sampler": "Euler",
        "CFG scale": "6.0", "Seed": "42", "Size-1": "64", "Size-2": "64", "Model": "tiny_sd1"}
    assert Image.open(path).size == (64, 64)
    assert "generating" in err and "2/2" in err  # the progress bar, on stderr


def test_info_prints_the_stored_infotext_and_its_fields(capsys, tmp_path, sd1):
    _, out, _ = cli_run(capsys, "generate", "a cat", "--model", sd1, *FAST, "--outdir", tmp_path, "--quiet")
    [path] = written(out)
    code, text, err = cli_run(capsys, "info", path)
    assert code == 0 and err == ""
    assert text == read_png_infotext(path) + "\n"
    code, text, _ = cli_run(capsys, "info", path, "--json")
    assert code == 0 and json.loads(text) == parse_parameters(read_png_infotext(path))


def test_from_reproduces_an_image_bit_for_bit(capsys, tmp_path, sd1):
    # A sampler that A1111 >= 1.9 stores as `Sampler: DPM++ 2M, Schedule type: Karras`.
    _, out, _ = cli_run(capsys, "generate", "a dog on a sofa", "--negative", "cat", "--seed", "7", "--cfg", "5",
                        "--sampler", "DPM++ 2M Karras", "--clip-skip", "2", "--model", sd1, *FAST,
                        "--outdir", tmp_path, "--quiet")
    [original] = written(out)
    params = read_png_parameters(original)
    assert params["Schedule type"] == "Karras" and params["Clip skip"] == "2"

    code, out, err = cli_run(capsys, "generate", "--from", original, "--model", sd1, "--device", "cpu",
                             "--out", tmp_path / "again.png", "--quiet")
    assert code == 0, err
    [again] = written(out)
    assert np.array_equal(pixels(again), pixels(original))
    assert read_png_parameters(again) == params

    # Options on the command line win over the image's.
    code, out, _ = cli_run(capsys, "generate", "--from", original, "--seed", "8", "--steps", "3", "--model", sd1,
                           "--device", "cpu", "--out", tmp_path / "other.png", "--quiet")
    changed = read_png_parameters(written(out)[0])
    assert (changed["Seed"], changed["Steps"], changed["Prompt"]) == ("8", "3", "a dog on a sofa")


def test_from_maps_a1111_schedules_and_reads_only_what_is_not_given():
    warnings = []
    params = {"Prompt": "p", "Negative prompt": "", "Steps": "20", "Sampler": "DPM++ 2M", "Schedule type": "Karras",
              "CFG scale": "7", "Seed": "3", "Size-1": "512", "Size-2": "768", "Clip skip": "1"}
    wanted = {"prompt", "steps", "sampler", "seed", "cfg", "width", "height", "clip_skip"}
    values = defaults_from_parameters(params, wanted, "--from 'x.png'", warnings.append)
    assert values == {"prompt": "p", "steps": 20, "sampler": "DPM++ 2M Karras", "seed": 3, "cfg": 7.0,
                      "width": 512, "height": 768}  # clip skip 1 is the model's default: left out
    assert warnings == []

    # Any sampler runs over Karras sigmas when the image says so ("Euler a" + "Schedule type: Karras").
    values = defaults_from_parameters(params | {"Sampler": "Euler a"}, {"sampler"}, "--from 'x.png'",
                                      warnings.append)
    assert values == {"sampler": "Euler a Karras"} and warnings == []

    # Fields that are not wanted (given on the command line) are not even read.
    bad = params | {"Steps": "many", "Sampler": "DPM2 a"}
    assert defaults_from_parameters(bad, {"seed"}, "src", warnings.append) == {"seed": 3}
    with pytest.raises(ValueError, match="'Steps: many', which is not a whole number; pass --steps"):
        defaults_from_parameters(bad, {"steps"}, "src", warnings.append)
    with pytest.raises(ValueError, match="sampler 'DPM2 a'.*--sampler"):
        defaults_from_parameters(bad, {"sampler"}, "src", warnings.append)


# ---- edit / inpaint / outpaint ---------------------------------------------------------------------

def test_edit_works_at_the_image_size_or_the_given_one(capsys, tmp_path, sd1):
    image = noise_image(tmp_path / "photo.png", 72, 56)
    steps = ["--steps", "2", "--device", "cpu", "--quiet"]
    code, out, err = cli_run(capsys, "edit", image, "a watercolor", "--strength", "0.5", "--model", sd1, *steps,
                             "--outdir", tmp_path / "out")
    assert code == 0, err
    [path] = written(out)
    assert Image.open(path).size == (72, 56)
    assert read_png_parameters(path)["Denoising strength"] == "0.5"
    code, out, _ = cli_run(capsys, "edit", image, "a watercolor", "--model", sd1, *FAST, "--resize-mode", "crop",
                           "--outdir", tmp_path / "out", "--quiet")
    assert code == 0 and Image.open(written(out)[0]).size == (64, 64)


def test_inpaint_and_outpaint_write_images_of_the_right_size(capsys, tmp_path, sd1_inpaint):
    image = noise_image(tmp_path / "photo.png", 64, 64)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(tmp_path / "mask.png")
    for extra in ([], ["--only-masked", "--padding", "8", "--mask-blur", "2", "--fill", "latent_noise"]):
        code, out, err = cli_run(capsys, "inpaint", image, tmp_path / "mask.png", "a cat", "--model", sd1_inpaint,
                                 *FAST, *extra, "--outdir", tmp_path / "out", "--quiet")
        assert code == 0, err
        [path] = written(out)
        assert Image.open(path).size == (64, 64)
        params = read_png_parameters(path)
        assert params["Mask blur"] == ("2" if extra else "4")
        assert params.get("Inpaint area") == ("Only masked" if extra else None)

    code, out, err = cli_run(capsys, "outpaint", image, "a beach", "--left", "16", "--bottom", "8", "--steps", "2",
                             "--device", "cpu", "--model", sd1_inpaint, "--outdir", tmp_path / "out", "--quiet")
    assert code == 0, err
    [path] = written(out)
    assert Image.open(path).size == (80, 72)
    assert read_png_parameters(path)["Size-1"] == "80"
    # The command does what the library's one-call form does.
    pipe = pocketdiffusion.load(sd1_inpaint, device="cpu")
    [expected] = pipe.outpaint(Image.open(image), "a beach", left=16, bottom=8, steps=2, seed=0)
    assert np.array_equal(pixels(path), np.asarray(expected))


# ---- output files ---------------------------------------------------------------------------------

def test_outdir_naming_never_overwrites(capsys, tmp_path, sd1):
    paths = []
    for _ in range(2):
        _, out, _ = cli_run(capsys, "generate", "a cat", "--model", sd1, *FAST, "--outdir", tmp_path, "--quiet")
        paths += written(out)
    first_bytes = paths[0].read_bytes()
    _, out, _ = cli_run(capsys, "generate", "a cat", "--model", sd1, *FAST, "--outdir", tmp_path,
                        "--batch-size", "2", "--overwrite", "--quiet")
    paths += written(out)
    assert [p.name for p in paths] == ["00000-0-a_cat.png", "00001-0-a_cat.png", "00002-0-a_cat.png",
                                       "00003-1-a_cat.png"]
    assert paths[0].read_bytes() == first_bytes
    assert sorted(tmp_path.iterdir()) == sorted(paths)  # and no temp files left behind


def test_out_refuses_an_existing_file_before_generating(capsys, tmp_path, sd1, monkeypatch):
    target = tmp_path / "image.png"
    target.write_bytes(b"precious")
    with monkeypatch.context() as patch:
        forbid_model_loading(patch)
        code, out, err = cli_run(capsys, "generate", "a cat", "--model", sd1, *FAST, "--out", target)
        assert code == 2 and out == ""
        assert err == f"pocketdiffusion: error: '{target}' already exists; pass --overwrite to replace it, or " \
                      "pick another --out name\n"
        assert target.read_bytes() == b"precious"
        # With several images the numbered names are checked too.
        (tmp_path / "many-2.png").write_bytes(b"precious")
        code, _, err = cli_run(capsys, "generate", "a cat", "--model", sd1, *FAST, "--batch-count", "2",
                               "--out", tmp_path / "many.png")
        assert code == 2 and "many-2.png' already exists" in err

    code, out, _ = cli_run(capsys, "generate", "a cat", "--model", sd1, *FAST, "--out", target, "--overwrite",
                           "--quiet")
    assert code == 0 and written(out) == [target] and read_png_parameters(target)["Prompt"] == "a cat"
    code, out, _ = cli_run(capsys, "generate", "a cat", "--model", sd1, *FAST, "--batch-size", "2",
                           "--out", tmp_path / "pair.png", "--quiet")
    assert written(out) == [tmp_path / "pair-1.png", tmp_path / "pair-2.png"]
    assert [read_png_parameters(p)["Seed"] for p in written(out)] == ["0", "1"]


def test_quiet_prints_only_the_written_paths(capsys, tmp_path, sd1):
    code, out, err = cli_run(capsys, "generate", "a cat", "--model", sd1, *FAST, "--batch-count", "2",
                             "--outdir", tmp_path, "--quiet")
    assert code == 0 and err == ""
    assert out == "".join(f"{p}\n" for p in sorted(tmp_path.iterdir()))
    code, out, err = cli_run(capsys, "generate", "a cat", "--model", sd1, *FAST, "--outdir", tmp_path)
    assert code == 0 and written(out) == [tmp_path / "00002-0-a_cat.png"]
    assert "loading" in err and "generating" in err


def test_the_environment_variable_names_the_default_model(capsys, tmp_path, sd1, monkeypatch):
    monkeypatch.setenv(MODEL_ENV, sd1)
    code, out, err = cli_run(capsys, "generate", "a cat", *FAST, "--outdir", tmp_path, "--quiet")
    assert code == 0, err
    assert read_png_parameters(written(out)[0])["Model"] == "tiny_sd1"


def test_ctrl_c_exits_130_without_a_file(capsys, tmp_path, sd1, monkeypatch):
    real_iter = Run.__iter__

    def interrupted_after_one_step(run):
        for step in real_iter(run):
            yield step
            raise KeyboardInterrupt
    monkeypatch.setattr(Run, "__iter__", interrupted_after_one_step)
    code, out, err = cli_run(capsys, "generate", "a cat", "--model", sd1, *FAST, "--outdir", tmp_path / "out")
    assert code == 130 and out == "" and err.rstrip().endswith("pocketdiffusion: interrupted")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_bug_keeps_its_traceback(tmp_path, sd1, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("an internal bug")
    monkeypatch.setattr(pocketdiffusion, "load", broken)
    with pytest.raises(RuntimeError, match="an internal bug"):
        main(["generate", "a cat", "--model", sd1, *FAST, "--outdir", str(tmp_path)])


# ---- bad input --------------------------------------------------------------------------------------

@pytest.fixture()
def files(tmp_path) -> dict[str, Path]:
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    bare = tmp_path / "bare.png"
    Image.new("RGB", (64, 64)).save(bare)  # an image without parameters
    return {"text": text, "bare": bare, "missing": tmp_path / "missing.png", "out": tmp_path / "out"}


BAD_INPUT = {
    "missing model": (["generate", "a cat", *FAST], "no model given: pass --model with a .safetensors/.ckpt file"),
    "model not found": (["generate", "a cat", "--model", "{missing}", *FAST], "--model '{missing}' does not exist"),
    "bad sampler": (["generate", "a cat", "--model", "{sd1}", *FAST, "--sampler", "warp"], "unknown sampler 'warp'"),
    "bad size": (["generate", "a cat", "--model", "{sd1}", *FAST, "--width", "65"],
                 "--width=65: expected a positive multiple of 8"),
    "bad steps": (["generate", "a cat", "--model", "{sd1}", *FAST, "--steps", "0"], "--steps=0: expected"),
    "no prompt": (["generate", "--model", "{sd1}", *FAST], "generate needs a PROMPT (or --from IMAGE.png"),
    "non-image IMAGE": (["edit", "{text}", "a cat", "--model", "{sd1}", *FAST], "IMAGE '{text}' is not an image"),
    "non-image MASK": (["inpaint", "{bare}", "{text}", "a cat", "--model", "{sd1}", *FAST],
                       "MASK '{text}' is not an image"),
    "missing IMAGE": (["edit", "{missing}", "a cat", "--model", "{sd1}", *FAST], "IMAGE '{missing}' does not exist"),
    "no side to outpaint": (["outpaint", "{bare}", "a cat", "--model", "{sd1}", *FAST],
                            "outpaint needs at least one of left, right, top, bottom > 0"),
    "info without parameters": (["info", "{bare}"], "has no generation parameters"),
    "info of a missing file": (["info", "{missing}"], "IMAGE '{missing}' does not exist"),
    "--from without parameters": (["generate", "--from", "{bare}", "--model", "{sd1}", *FAST],
                                  "has no generation parameters"),
    "--out not a png": (["generate", "a", "--model", "{sd1}", *FAST, "--out", "{out}.jpg"],
                        "expected a file name ending in .png"),
    "inspect a non-model": (["inspect", "{bare}"], "is a PNG image, not a weights file"),
}


@pytest.mark.parametrize("case", BAD_INPUT, ids=list(BAD_INPUT))
def test_bad_input_exits_2_with_one_line(case, capsys, files, sd1, monkeypatch):
    argv, expected = BAD_INPUT[case]
    names = {key: str(value) for key, value in files.items()} | {"sd1": sd1}
    if case == "missing model":  # an installation without the embedded model (a source checkout before training)
        monkeypatch.setattr(catalog, "ASSETS", files["missing"].parent / "no-assets")
    forbid_model_loading(monkeypatch)
    code, out, err = cli_run(capsys, *(a.format(**names) for a in argv))
    assert code == 2 and out == ""
    assert err.startswith("pocketdiffusion: error: ") and err.count("\n") == 1, err
    assert expected.format(**names) in err


def test_usage_errors_are_argparse_errors(capsys):
    code, _, err = cli_run(capsys, "generate", "a cat", "--steps", "many")
    assert code == 2 and "argument --steps: invalid int value: 'many'" in err
    code, _, err = cli_run(capsys, "edit", "x.png", "p", "--resize-mode", "squash")
    assert code == 2 and "invalid choice: 'squash'" in err


# ---- inspect ----------------------------------------------------------------------------------------

def test_inspect_describes_a_diffusers_folder(capsys, sd1, sd1_inpaint):
    # every weight resident and a parameter (the CPU plans stream the text encoder and the VAE and
    # keep the UNet's big weights as 16-bit buffers)
    from pocketdiffusion.checkpoints import load as load_components
    loaded = load_components(sd1, device="cpu")
    counts = [sum(p.numel() for p in m.parameters()) for m in (*loaded.text_encoders, loaded.unet, loaded.vae)]
    code, text, err = cli_run(capsys, "inspect", sd1)
    assert code == 0, err
    for line in ("family:      sd1", "prediction:  eps", "inpainting:  no", "native size: 512x512",
                 f"parameters:  {sum(counts):,}", f"unet (UNetModel): {counts[1]:,} parameters",
                 "  model_channels: 32", "  prompt encoding: layer=-1"):
        assert line in text
    code, text, _ = cli_run(capsys, "inspect", sd1_inpaint, "--prediction", "v", "--json")
    report = json.loads(text)
    assert (report["inpainting"], report["prediction"], report["weights_read"]) == (True, "v", True)
    assert report["components"][1]["config"]["in_channels"] == 9


def test_inspect_reads_a_single_file_from_its_shapes_only(capsys, tmp_path):
    config = fx.tiny_config("sd1")
    models = fx.our_models(config)
    path = fx.write_single_file(tmp_path / "tiny.safetensors", fx.ldm_state_dict(models, "sd1"))
    code, text, err = cli_run(capsys, "inspect", path, "--json")
    assert code == 0, err
    report = json.loads(text)
    assert (report["family"], report["format"], report["weights_read"]) == ("sd1", "single file (.safetensors)", False)
    expected = [sum(p.numel() for p in m.parameters()) for m in (*models["text_encoders"], models["unet"],
                                                                 models["vae"])]
    assert [c["parameters"] for c in report["components"]] == expected


def test_inspect_runs_an_sd2_file_that_does_not_say_eps_or_v(capsys, tmp_path):
    config = fx.tiny_config("sd2")
    path = fx.write_single_file(tmp_path / "tiny_sd2.safetensors", fx.ldm_state_dict(fx.our_models(config), "sd2"))
    code, text, err = cli_run(capsys, "inspect", path, "--json")
    assert code == 0, err
    report = json.loads(text)
    assert (report["family"], report["prediction_probed"], report["weights_read"]) == ("sd2", True, True)
    assert report["prediction"] in ("eps", "v")
    code, text, _ = cli_run(capsys, "inspect", path, "--prediction", "eps", "--json")
    report = json.loads(text)
    assert (report["prediction"], report["prediction_probed"], report["weights_read"]) == ("eps", False, False)
    assert report["native_size"] == [512, 512]  # SD2's eps model is the 512 one


# ---- help -------------------------------------------------------------------------------------------

def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_subcommand_help_explains_every_option_with_its_default(capsys):
    commands = _subcommands(build_parser())
    assert set(commands) == {"generate", "edit", "inpaint", "outpaint", "info", "inspect", "models", "convert", "plan",
                             "serve"}
    for name, parser in commands.items():
        assert main([name, "--help"]) == 0
        shown = " ".join(capsys.readouterr().out.split())  # undo the line wrapping
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
            for flag in action.option_strings:
                assert flag in shown, f"{name} --help does not show {flag}"
            if action.option_strings:
                assert "default" in action.help, f"{name} {action.option_strings[0]} does not state its default"
            else:
                assert action.metavar in shown


def test_the_parser_copies_agree_with_the_library():
    assert cli.RESIZE_MODES == request_module.RESIZE_MODES
    assert cli.INPAINT_FILLS == request_module.INPAINT_FILLS
    assert cli.PROMPT_SYNTAXES == request_module.PROMPT_SYNTAXES
    assert set(cli.SAMPLER_NAMES) == set(SAMPLERS)
    assert cli.INPAINT_MASK_BLUR == request_module.GenerationRequest().mask_blur
    assert cli.OUTPAINT_MASK_BLUR == OUTPAINT_MASK_BLUR


def test_help_runs_as_a_module_and_as_the_installed_command():
    script = shutil.which("pocketdiffusion")
    assert script is not None, "the pocketdiffusion console script is not installed (pip install -e .)"
    for command in ([sys.executable, "-m", "pocketdiffusion", "--help"], [script, "--help"]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("usage: pocketdiffusion") and "inpaint" in done.stdout
        assert done.stderr == ""



def test_warnings_such_as_the_memory_fallback_print_as_one_line(sd1, capsys, tmp_path, monkeypatch):
    from pocketdiffusion.memory.plan import MemoryFallbackWarning
    original = Run.__iter__

    def iterate_with_a_warning(self):
        warnings.warn("out of memory with memory='balanced'; retrying once with memory='low'",
                      MemoryFallbackWarning)
        yield from original(self)
    monkeypatch.setattr(Run, "__iter__", iterate_with_a_warning)
    code, out, err = cli_run(capsys, "generate", "a cat", "--model", sd1, "--steps", "2", "--width", "64",
                             "--height", "64", "--device", "cpu", "--quiet", "--outdir", tmp_path)
    assert code == 0
    assert "pocketdiffusion: out of memory with memory='balanced'; retrying once with memory='low'\n" in err
    assert "Warning" not in err
