"""The training scripts (train/) at toy scale on the CPU: every stage runs a few steps, the export
writes diffusers folders, and those folders load in our loader AND in diffusers/transformers with
the same numbers (so the format is proven, not assumed). Plus the pieces whose mistakes would
not crash but silently train the wrong thing: the sync-free text encoding and renderer, the
inpainting UNet's initialisation, the data stream, the schedules."""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

# `train/` is a top-level folder of the repository (a dev tool, not part of the package).
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pocketdiffusion.checkpoints import load  # noqa: E402
from pocketdiffusion.config import SHAPES  # noqa: E402
from pocketdiffusion.data import shapes  # noqa: E402
from pocketdiffusion.models.clip import CLIPTextModel  # noqa: E402
from pocketdiffusion.models.unet import UNetModel  # noqa: E402
from train import run_all  # noqa: E402
from train.common import (Budget, LRSchedule, Settings, ShapesStream, masks_on_device, pack_scenes,  # noqa: E402
                          render_on_device, shapes_tokenizer)
from train.export import (INPAINT_FOLDER, BASE_FOLDER, weights_from_checkpoints,  # noqa: E402
                          write_model_folder)
from train.inpaint import inpaint_conditioning, inpainting_unet_from  # noqa: E402
from train.unet import NoiseSchedule, encode_text  # noqa: E402

PARITY_BOUND = 1e-4  # max-abs error relative to max |reference|, fp32
TINY_RUN = ["--device", "cpu", "--size", "64", "--vae-batch", "2", "--unet-batch", "2", "--inpaint-batch", "2",
            "--max-steps", "3", "--latent-stat-images", "4", "--eval-images", "2", "--log-every", "2",
            "--eval-prompts", "2", "--eval-steps", "2", "--seconds", "600"]
CPU = Settings(device=torch.device("cpu"), size=64)


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One toy end-to-end run: 3 steps per stage, export, verification, pack."""
    out = tmp_path_factory.mktemp("run")
    log = run_all.main(["--out", str(out), "--pack", str(out / "pack"), *TINY_RUN])
    return out, log


# ---- the end-to-end run ------------------------------------------------------------------------

@pytest.mark.slow
def test_run_writes_log_checkpoints_and_export(run):
    out, log = run
    written = json.loads((out / "train_log.json").read_text())
    assert written["seed"] == 0 and "train.run_all" in written["command"]
    for stage in ("vae", "unet", "inpaint"):
        assert written["stages"][stage]["steps"] == 3
        assert all(np.isfinite(entry["loss"]) for entry in written["stages"][stage]["losses"])
        assert (out / "ckpt" / f"{stage}.pt").is_file()
    vae = written["stages"]["vae"]
    assert vae["scaling_factor"] > 0 and np.isfinite(vae["psnr"])
    export = written["export"]
    assert export["errors"] == []
    assert export["within_size_limit"] and export["total_bytes"] <= 40e6
    for name in (BASE_FOLDER, INPAINT_FOLDER):
        assert max(export[name]["files"].values()) <= 15 * 2**20
    assert set(export["heldout_scores"]) >= {"all", "color", "shape"}
    pieces = sorted((out / "pack").glob("shapes-export.tar.part*"))
    assert pieces and all(p.stat().st_size <= 15 * 2**20 for p in pieces)
    assert (out / "pack" / "train_log.json").is_file() and (out / "samples.png").is_file()


@pytest.mark.slow
def test_export_loads_in_our_loader_with_the_ema_weights(run):
    out, log = run
    ckpt = torch.load(out / "ckpt" / "unet.pt", weights_only=True)
    for name, channels in ((BASE_FOLDER, 4), (INPAINT_FOLDER, 9)):
        parts = load(out / name)  # raises unless every key is consumed exactly once
        assert parts.unet.config.in_channels == channels
        assert parts.config.native_size == 128
        assert parts.vae.scaling_factor == log["stages"]["vae"]["scaling_factor"]
        assert parts.tokenizers[0]("a red circle").tolist() == shapes_tokenizer()("a red circle").tolist()
        ema_token_embedding = ckpt["ema"]["text_encoder.text_model.embeddings.token_embedding.weight"]
        exported = parts.text_encoders[0].text_model.embeddings.token_embedding.weight
        assert torch.equal(exported, ema_token_embedding.half().float())  # the EMA, in fp16
    base = load(out / BASE_FOLDER)
    assert torch.equal(base.unet.out[2].weight, ckpt["ema"]["unet.out.2.weight"].half().float())


@pytest.mark.slow
def test_export_loads_in_diffusers_with_the_same_numbers(run):
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel

    out, _ = run
    for name, pipeline_class in ((BASE_FOLDER, StableDiffusionPipeline),
                                 (INPAINT_FOLDER, StableDiffusionInpaintPipeline)):
        ours = load(out / name)
        reference = pipeline_class.from_pretrained(out / name, torch_dtype=torch.float32)
        strict_unet = UNet2DConditionModel.from_pretrained(out / name / "unet")  # no missing/unexpected keys
        assert strict_unet.config.in_channels == ours.unet.config.in_channels

        tokens = shapes_tokenizer()(["a small red star on a blue background", ""])
        assert reference.tokenizer(["a small red star on a blue background", ""], padding="max_length",
                                   max_length=77, return_tensors="pt").input_ids.tolist() == tokens.tolist()
        with torch.no_grad():
            context = ours.text_encoders[0](tokens)[0]
            context_ref = reference.text_encoder(tokens).last_hidden_state
            assert relative_error(context, context_ref) <= PARITY_BOUND

            generator = torch.Generator().manual_seed(0)
            x = torch.randn(2, ours.unet.config.in_channels, 16, 16, generator=generator)
            t = torch.tensor([999.0, 10.0])
            assert relative_error(ours.unet(x, t, context), reference.unet(x, t, context_ref).sample) <= PARITY_BOUND
            assert relative_error(ours.unet(x, t, context), strict_unet(x, t, context_ref).sample) <= PARITY_BOUND

            latents = torch.randn(1, 4, 16, 16, generator=generator)
            assert relative_error(ours.vae.decode(latents), reference.vae.decode(latents).sample) <= PARITY_BOUND
        assert reference.vae.config.scaling_factor == ours.vae.scaling_factor
        assert reference.scheduler.config.timestep_spacing == "leading"


@pytest.mark.slow
def test_sharded_export_loads_in_both(run, tmp_path):
    from diffusers import UNet2DConditionModel

    out, _ = run
    weights = weights_from_checkpoints(out / "ckpt")
    files = write_model_folder(tmp_path / "sharded", weights, inpaint=False, max_file_bytes=4 * 2**20)
    assert "unet/diffusion_pytorch_model.safetensors.index.json" in files
    assert "unet/diffusion_pytorch_model-00001-of-00004.safetensors" in files
    assert max(files.values()) <= 4 * 2**20
    sharded = load(tmp_path / "sharded").unet
    single = load(out / BASE_FOLDER).unet
    for (key, a), (_, b) in zip(sharded.state_dict().items(), single.state_dict().items()):
        assert torch.equal(a, b), key
    UNet2DConditionModel.from_pretrained(tmp_path / "sharded" / "unet")  # diffusers reads the index too


@pytest.mark.slow
def test_resume_reuses_finished_stages_and_extend_trains_more(run, tmp_path):
    out, _ = run
    args = ["--resume", str(out), "--stop-after", "inpaint", *TINY_RUN]
    again = run_all.main(["--out", str(tmp_path / "again"), *args])
    assert [again["stages"][s]["steps"] for s in ("vae", "unet", "inpaint")] == [3, 3, 3]
    more = run_all.main(["--out", str(tmp_path / "more"), "--extend", "unet", *args])
    assert [more["stages"][s]["steps"] for s in ("vae", "unet", "inpaint")] == [3, 6, 3]


def test_bad_arguments_fail_fast_with_a_message(tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()  # a valid --resume folder, for the cases that need one
    for argv, message in ((["--seconds", "0"], "--seconds must be positive"),
                          (["--resume", str(tmp_path / "nowhere")], "no ckpt/ folder"),
                          (["--extend", "unet"], "--extend needs --resume"),
                          (["--extend", "clip", "--resume", str(tmp_path)], "--extend takes stages"),
                          (["--size", "60"], "--size must be a multiple of 8")):
        with pytest.raises(SystemExit):
            run_all.parse_args(["--out", str(tmp_path), "--device", "cpu", *argv])
        assert message in capsys.readouterr().err


# ---- the pieces ----------------------------------------------------------------------------------

def test_sync_free_text_encoding_equals_the_model_forward():
    encoder = CLIPTextModel(SHAPES.text_encoders[0]).eval()
    tokens = shapes_tokenizer()(["a red circle on a blue background", ""])
    with torch.no_grad():
        assert torch.equal(encode_text(encoder, tokens), encoder(tokens)[0])


def test_sync_free_renderer_gives_render_batch_pixels():
    scenes = [shapes.sample_scene(np.random.default_rng(i), two_object_prob=0.5) for i in range(12)]
    assert torch.equal(render_on_device(pack_scenes(scenes), 64), shapes.render_batch(scenes, 64))


def test_inpainting_unet_starts_as_the_base_unet():
    config = replace(SHAPES.unet, model_channels=32, context_dim=32, norm_groups=8, head_dim=16)
    base = UNetModel(config).eval()
    unet = inpainting_unet_from(base).eval()
    assert unet.config.in_channels == 9
    x = torch.randn(2, 9, 8, 8)
    context = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert torch.allclose(unet(x, torch.tensor([5.0, 500.0]), context),
                              base(x[:, :4], torch.tensor([5.0, 500.0]), context), atol=1e-6)


def test_inpaint_conditioning_is_mask_then_masked_image_latents():
    class PixelMeanEncoder(torch.nn.Module):  # "latents" = the pixels pooled 8x: easy to check
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def encode(self, x):
            pooled = torch.nn.functional.avg_pool2d(x, 8)
            return torch.cat([pooled, pooled[:, :1]], dim=1), None

    images = torch.rand(1, 3, 16, 16) * 2 - 1
    masks = torch.zeros(1, 1, 16, 16)
    masks[..., :8] = 1  # repaint the left half
    latents, extra = inpaint_conditioning(PixelMeanEncoder(), images, masks, scaling_factor=2.0)
    assert extra.shape == (1, 5, 2, 2)
    assert torch.equal(extra[:, 0], torch.tensor([[[1.0, 0.0], [1.0, 0.0]]]))  # mask first, 1 = repaint
    assert torch.equal(extra[:, 1:, :, 0], torch.zeros(1, 4, 2))  # masked pixels are 0 (grey)
    assert torch.allclose(extra[:, 1:, :, 1], latents[..., 1])  # kept pixels unchanged


def test_stream_draws_captions_dropout_and_full_masks():
    stream = ShapesStream(64, seed=0, stream=7, size=32, captions=True, caption_dropout=0.5, masks=True,
                          full_mask_fraction=0.5)
    batch = stream.draw(np.random.default_rng(0))
    tokenizer = shapes_tokenizer()
    empty = tokenizer([""])[0]
    dropped = (batch.tokens == empty).all(dim=1)
    assert 10 < int(dropped.sum()) < 54  # about half of 64
    masks = masks_on_device(batch)
    assert masks.shape == (64, 1, 32, 32) and set(masks.unique().tolist()) <= {0.0, 1.0}
    full = masks.flatten(1).all(dim=1)
    assert 10 < int(full.sum()) < 54
    partial = masks[~full].flatten(1).mean(dim=1)
    assert bool(((partial >= 0.15) & (partial <= 0.6)).all())


def test_noise_schedule_targets_and_min_snr_weights():
    torch.manual_seed(0)
    schedule = NoiseSchedule(torch.device("cpu"), min_snr_gamma=5.0, noise_offset=0.0)
    latents = torch.randn(512, 4, 2, 2)
    noisy, t, target, weights = schedule.noised(latents)
    ac = schedule.alphas_cumprod[t][:, None, None, None]
    assert torch.allclose(noisy, ac.sqrt() * latents + (1 - ac).sqrt() * target, atol=1e-6)
    snr = schedule.alphas_cumprod[t] / (1 - schedule.alphas_cumprod[t])
    assert torch.allclose(weights[snr <= 5], torch.ones(int((snr <= 5).sum())))
    assert bool((weights[snr > 5] < 1).all()) and 0 <= int(t.min()) and int(t.max()) <= 999


def test_lr_schedule_and_budget():
    schedule = LRSchedule(peak=1e-3, warmup_steps=10)
    assert schedule.at(0, 0.0) == pytest.approx(1e-4)
    assert schedule.at(9, 0.0) == pytest.approx(1e-3)
    assert schedule.at(100, 0.5) == pytest.approx(5e-4)
    assert schedule.at(100, 1.0) == pytest.approx(0.0)
    capped = Budget(1000.0, max_steps=4)
    assert not capped.exhausted(3) and capped.exhausted(4) and capped.progress(2) == pytest.approx(0.5)
    assert not Budget(0.0).exhausted(0) and Budget(0.0).exhausted(1)  # always at least one step
    with pytest.raises(ValueError):
        Budget(-1.0)


def test_vae_edge_weights_mark_outlines_only():
    """The extra loss weight sits on the pixels next to a colour step, nowhere else."""
    from train.vae import edge_weights
    image = -torch.ones(1, 3, 16, 16)
    image[:, :, 4:12, 4:12] = 1.0  # a square
    weights = edge_weights(image, 4.0)[0, 0]
    outline = torch.zeros(16, 16, dtype=torch.bool)
    outline[3:13, 3:13] = True
    outline[5:11, 5:11] = False  # one pixel each side of the square's edge
    assert torch.equal(weights == 5.0, outline) and torch.equal(weights == 1.0, ~outline)


def test_shares_parse_and_bad_shares_are_refused(tmp_path, capsys):
    assert run_all.parse_shares("vae=0.3,unet=0.55") == {"vae": 0.3, "unet": 0.55, "inpaint": 0.15}
    for bad, message in (("gan=1", "unknown stage 'gan'"), ("vae=x", "expected a number"),
                         ("vae=0", "a share must be positive")):
        with pytest.raises(SystemExit):
            run_all.parse_args(["--out", str(tmp_path), "--shares", bad])
        assert message in capsys.readouterr().err
