"""memory="minimal" end to end: `pocketdiffusion.load` and `--memory minimal` stream the weights
and give the balanced mode's image (the embedded model at 128x128 decodes in one VAE tile, so the
pictures are equal pixel for pixel)."""
from __future__ import annotations

import numpy as np
from PIL import Image

import pocketdiffusion
from pocketdiffusion.cli import main


def test_load_minimal_streams_and_matches_balanced():
    balanced = pocketdiffusion.load("shapes", device="cpu", memory="balanced")
    minimal = pocketdiffusion.load("shapes", device="cpu", memory="minimal")
    assert minimal.plan.mode == "minimal" and minimal.plan.stream_weights and minimal.plan.vae_tile_above == 0
    streamed = minimal.parts.unet.input_blocks[1][0].in_layers[2].weight
    assert streamed.numel() == 0  # a placeholder between uses: the weights stay in the file
    prompt = dict(prompt="a red circle on a blue background", steps=3, seed=7)
    expected = np.asarray(balanced.generate(**prompt)[0])
    got = np.asarray(minimal.generate(**prompt)[0])
    assert np.array_equal(expected, got)


def test_cli_memory_minimal(tmp_path, capsys):
    out = tmp_path / "minimal.png"
    assert main(["generate", "a green square", "--model", "shapes", "--device", "cpu", "--memory", "minimal",
                 "--steps", "2", "--seed", "3", "--out", str(out), "--quiet"]) == 0
    assert Image.open(out).size == (128, 128)
    assert main(["generate", "x", "--model", "shapes", "--memory", "tiny"]) == 2
    assert "minimal" in capsys.readouterr().err  # argparse lists the choices
