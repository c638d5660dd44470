"""The planner: budgets read or refused, the fastest fitting plan chosen with its reason, the
prediction's arithmetic, and `pocketdiffusion plan`. (Predictions against measured peaks:
test_plan_measured.py.)"""
from __future__ import annotations

import pytest
import torch

import ckpt_fixtures as fx
from pocketdiffusion.cli import main
from pocketdiffusion.config import SD15
from pocketdiffusion.memory.estimate import MIB, LiveBytes, predict
from pocketdiffusion.memory.plan import MODES, lower_plan, plan_for
from pocketdiffusion.memory.planner import PlanError, choose_plan, free_memory, parse_budget


@pytest.mark.parametrize("text,expected", [("1.5GB", 1.5 * 2 ** 30), ("800MB", 800 * 2 ** 20), ("2GiB", 2 ** 31),
                                           ("512 mib", 512 * 2 ** 20), ("1g", 2 ** 30), ("4096", 4096),
                                           (".5T", 2 ** 39)])
def test_budgets(text, expected):
    assert parse_budget(text) == int(expected)


@pytest.mark.parametrize("text", ["", "GB", "1.5XB", "-1GB", "1,5GB", "1.5 G B", "0MB", "2iB"])
def test_bad_budgets_say_what_is_expected(text):
    with pytest.raises(PlanError, match="expected .*1.5GB, 800MB or 2GiB|expected a positive size"):
        parse_budget(text)


def test_the_fastest_plan_that_fits_is_chosen():
    config = fx.tiny_config("sd1")
    listed = choose_plan(config, "cpu", 256, 256, budget=2 ** 40).candidates
    peaks = {label: p.peak for label, p in listed}
    assert list(peaks)[0] == "balanced" and list(peaks)[-1] == "minimal"
    assert peaks["minimal"] < peaks["low"] < peaks["balanced"]
    for label, peak in peaks.items():  # a budget of exactly a plan's peak picks it, or a faster one
        choice = choose_plan(config, "cpu", 256, 256, budget=peak)
        assert choice.prediction.peak <= peak
        chosen = next(l for l, p in listed if p.peak == choice.prediction.peak)
        assert list(peaks).index(chosen) <= list(peaks).index(label)
        assert chosen in choice.reason and "fastest plan that fits" in choice.reason
    tight = choose_plan(config, "cpu", 256, 256, budget=peaks["minimal"])
    assert tight.plan.mode == "minimal" and tight.plan.stream_weights
    assert "faster plans need more: balanced" in tight.reason
    with pytest.raises(PlanError, match=r"too small for any plan .* the smallest, minimal, needs \d+ MiB"):
        choose_plan(config, "cpu", 256, 256, budget=peaks["minimal"] - 1)
    with pytest.raises(PlanError, match="multiple of"):
        choose_plan(config, "cpu", 102, 256, budget=2 ** 30)
    assert choose_plan(config, "cpu", 64, 64).budget_source == "available RAM"
    assert free_memory("cpu") > 0


def test_prediction_arithmetic_on_sd15():
    """Full-size SD1.5 on meta: the weights of each mode and the phases that dominate."""
    balanced = predict(SD15, plan_for("balanced", "cpu"), "cpu", 512, 512)
    low = predict(SD15, plan_for("low", "cpu"), "cpu", 512, 512)
    minimal = predict(SD15, plan_for("minimal", "cpu"), "cpu", 512, 512)
    unet = 859_520_964  # SD1.5's UNet parameters (VAE 83.7M and CLIP-L 123.1M stream on the CPU)
    # balanced: the UNet stored in fp16 plus one fp32 upcast buffer of its largest layer (~112 MiB)
    assert 2 * unet < balanced.weights < 2 * unet + 160 * 2 ** 20
    assert low.weights < 0.6 * balanced.weights  # int8 instead of fp16, and the same kind of buffer
    assert minimal.weights < 0.01 * balanced.weights  # the resident few: embeddings, in/out layers
    assert balanced.peak == balanced.weights + max(balanced.text, balanced.unet, balanced.vae) + balanced.overhead
    assert balanced.largest_phase == "UNet step"  # the decode runs in tiles
    assert minimal.vae <= balanced.vae  # tiled in both
    cuda = predict(SD15, plan_for("balanced", "cuda"), "cuda", 512, 512)
    assert cuda.weights == pytest.approx(2 * unet, rel=1e-3)  # only the fp16 UNet resident on CUDA


def test_live_bytes_counts_storages_not_views():
    with torch.inference_mode(), LiveBytes() as counter:
        a = torch.empty(1024, 256, device="meta")  # 1 MiB
        view = a.t()  # no memory
        b = a + 1  # 1 MiB
        del a, view
        c = b.mul_(2)  # in place: no memory
        del b, c
    assert counter.peak == 2 * MIB and counter.live == 0


def test_lower_plan_never_leaves_minimal_for_a_bigger_plan():
    assert "minimal" in MODES
    minimal = plan_for("minimal", "cuda")
    assert minimal.stream_weights and minimal.vae_tile_above == 0
    assert lower_plan(minimal) is None


def test_plan_command(capsys):
    assert main(["plan", "shapes", "--budget", "1GB", "--size", "256x256", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "plan:      memory=balanced" in out and "fastest plan that fits" in out
    assert "minimal" in out.split("all plans")[1]
    assert main(["plan", "shapes", "--budget", "1 parsec", "--device", "cpu"]) == 2
    assert "budget '1 parsec' is not a size: expected" in capsys.readouterr().err
    assert main(["plan", "shapes", "--budget", "1MB", "--device", "cpu"]) == 2
    assert "too small for any plan" in capsys.readouterr().err
    assert main(["plan", "shapes", "--size", "big", "--device", "cpu"]) == 2
    assert "expected WIDTHxHEIGHT" in capsys.readouterr().err
