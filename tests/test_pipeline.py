"""The public generation API on tiny random models written as diffusers folders: what users call
(`load`, `Pipeline.generate/edit/inpaint/outpaint/run`), what they get back (PIL images, Steps,
seeds, A1111 parameters) and the clear errors they get for bad input.

Tiny models: 32x32 pictures (48x48 where a blurred mask needs room), 4-6 steps; each folder is
written and loaded once per session."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import pocketdiffusion
from ckpt_fixtures import diffusers_models, tiny_config, write_diffusers_folder
from pocketdiffusion import GenerationRequest
from pocketdiffusion.errors import CheckpointError, PocketDiffusionError
from pocketdiffusion.pipelines.base import decode_latents, encode_images, make_generators
from pocketdiffusion.pipelines.images import blur_mask, mask_to_array, to_pil, to_tensor
from pocketdiffusion.pipelines.metadata import format_parameters, parse_parameters
from pocketdiffusion.pipelines.outpaint import canvas_sides, extend_canvas
from pocketdiffusion.pipelines.request import InvalidRequest
from pocketdiffusion.sampling import NonFiniteLatentsError

SIZE = 32
INPAINT = 48  # the default mask blur (4) reaches ~10 pixels: inpainting pictures need room
STEPS = 4
FAST = {"steps": STEPS, "width": SIZE, "height": SIZE}
PROMPT = "a red apple on a table"


# ---- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    out = {}
    for kind in ("sd1", "sd1_inpaint", "sdxl"):
        config = tiny_config(kind)
        out[kind] = write_diffusers_folder(root / kind, config, diffusers_models(config))
    return out


@pytest.fixture(scope="session")
def pipes(folders):
    return {kind: pocketdiffusion.load(folder, device="cpu") for kind, folder in folders.items()}


@pytest.fixture
def sd1(pipes):
    return pipes["sd1"]


def picture(width: int = SIZE, height: int = SIZE) -> Image.Image:
    """A deterministic colourful picture (gradients and a disc) to edit."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    disc = ((x - width / 3) ** 2 + (y - height / 2) ** 2 < (min(width, height) / 4) ** 2)
    rgb = np.stack([x / width * 255, y / height * 255, np.where(disc, 230.0, 40.0)], axis=-1)
    return Image.fromarray(rgb.round().astype(np.uint8))


def square_mask(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    mask = np.zeros((height, width), dtype=np.uint8)
    left, top, right, bottom = box
    mask[top:bottom, left:right] = 255
    return Image.fromarray(mask)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def run_steps(pipe, **fields):
    run = pipe.run(GenerationRequest(**fields))
    steps = list(run)
    return run, steps


# ---- the API contract -----------------------------------------------------------------------------

def test_generate_returns_pil_images_of_the_requested_size(sd1):
    images = sd1.generate(PROMPT, negative_prompt="blurry", steps=STEPS, cfg=7.5, sampler="euler", seed=0,
                          width=48, height=32)
    assert isinstance(images, list) and len(images) == 1
    assert isinstance(images[0], Image.Image) and images[0].mode == "RGB" and images[0].size == (48, 32)
    assert pixels(images[0]).std() > 1  # a picture, not a blank


def test_edit_inpaint_and_outpaint_return_images(sd1):
    image = picture()
    edited = sd1.edit(image, PROMPT, strength=0.5, steps=STEPS, seed=1)
    assert [im.size for im in edited] == [image.size]
    mask = square_mask(SIZE, SIZE, (8, 8, 24, 24))
    inpainted = sd1.inpaint(image, mask, PROMPT, steps=STEPS, seed=1)
    assert [im.size for im in inpainted] == [image.size]
    grown = sd1.outpaint(image, PROMPT, left=16, bottom=8, steps=STEPS, seed=1)
    assert [im.size for im in grown] == [(SIZE + 16, SIZE + 8)]


@pytest.mark.parametrize("size, requested", [
    ((32, 32), {"left": 16, "right": 0, "top": 8, "bottom": 16}),
    ((36, 28), {"left": 16, "right": 0, "top": 8, "bottom": 16}),  # the canvas is rounded up to 8s
    ((36, 28), {"left": 0, "right": 0, "top": 0, "bottom": 8}),  # one side: the width grows on the right
])
def test_outpaint_keeps_the_original_outside_the_overlap_bit_exactly(sd1, size, requested):
    image = picture(*size)
    out = sd1.outpaint(image, PROMPT, steps=STEPS, seed=3, **requested)[0]
    sides = canvas_sides(*size, **requested)
    assert all(sides[k] - requested[k] in range(8) for k in sides)
    assert out.size == (size[0] + sides["left"] + sides["right"], size[1] + sides["top"] + sides["bottom"])
    assert out.width % 8 == 0 and out.height % 8 == 0
    canvas, mask = extend_canvas(image, **requested)
    assert canvas.size == mask.size == out.size
    where = np.s_[sides["top"]:sides["top"] + size[1], sides["left"]:sides["left"] + size[0]]
    assert np.array_equal(pixels(canvas)[where], pixels(image))
    keep = np.asarray(mask)[where] == 0
    assert keep.sum() > 0.3 * keep.size
    assert np.array_equal(pixels(out)[where][keep], pixels(image)[keep])
    new_area = np.ones((out.height, out.width), bool)
    new_area[where] = False
    assert np.abs(pixels(out)[new_area] - pixels(canvas)[new_area]).mean() > 2  # the border was painted


def test_outpaint_mask_fades_across_the_overlap():
    _, mask = extend_canvas(picture(), right=16)
    row = np.asarray(mask)[10]
    assert (row[:SIZE - 8] == 0).all() and (row[SIZE:] == 255).all()
    seam = row[SIZE - 8:SIZE]
    assert (np.diff(seam.astype(int)) > 0).all() and 0 < seam[0] < seam[-1] < 255


def test_outpaint_rejects_bad_sides(sd1):
    with pytest.raises(InvalidRequest, match="left"):
        sd1.outpaint(picture(), PROMPT, left=-8)
    with pytest.raises(InvalidRequest, match="at least one"):
        sd1.outpaint(picture(), PROMPT)


def test_run_yields_one_step_per_denoising_step_and_a_result(sd1):
    request = GenerationRequest(prompt=PROMPT, seed=5, batch_size=2, **FAST)
    run = sd1.run(request)
    request.steps, request.prompt = 1, "changed after the run was made"  # the run keeps its own copy
    steps = list(run)
    assert [s.index for s in steps] == list(range(STEPS)) and {s.total for s in steps} == {STEPS}
    latent_side = SIZE // sd1.parts.vae.downscale
    for step in steps:
        assert step.latents.shape == step.denoised.shape == (2, 4, latent_side, latent_side)
        assert bool(torch.isfinite(step.latents).all())
    sigmas = [s.sigma for s in steps]
    assert sigmas == sorted(sigmas, reverse=True) and sigmas[-1] > 0
    previews = steps[-1].preview()
    assert len(previews) == 2 and all(isinstance(p, Image.Image) and p.mode == "RGB" for p in previews)
    result = run.result
    assert result is not None and len(result.images) == 2 and result.seeds == [5, 6]
    assert [p["Seed"] for p in result.parameters] == [5, 6]
    assert result.request.prompt == PROMPT
    assert run.wait() is result  # a finished run is not run again


def test_the_loop_body_runs_outside_inference_mode(sd1):
    states = []
    for _ in sd1.run(GenerationRequest(prompt=PROMPT, **FAST)):
        states.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
    assert states == [(False, True)] * STEPS
    iterator = iter(sd1.run(GenerationRequest(prompt=PROMPT, **FAST)))
    next(iterator)
    iterator.close()  # cancelled from the outside, mid-run
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()


def test_breaking_the_loop_cancels_and_the_pipeline_stays_usable(sd1):
    reference = sd1.generate(PROMPT, seed=9, **FAST)[0]
    run = sd1.run(GenerationRequest(prompt=PROMPT, seed=9, **FAST))
    seen = 0
    for step in run:
        seen += 1
        if step.index == 1:
            break
    assert seen == 2 and run.result is None
    assert np.array_equal(pixels(sd1.generate(PROMPT, seed=9, **FAST)[0]), pixels(reference))


# ---- seeds ----------------------------------------------------------------------------------------

def test_same_seed_same_image_other_seed_other_image(sd1):
    a, b, c = (sd1.generate(PROMPT, seed=s, **FAST)[0] for s in (11, 11, 12))
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))


def test_a_batch_gives_consecutive_seeds_each_reproducible_alone(sd1):
    run, _ = run_steps(sd1, prompt=PROMPT, seed=20, batch_size=2, **FAST)
    assert run.result.seeds == [20, 21]
    for seed, image in zip(run.result.seeds, run.result.images):
        alone = sd1.generate(PROMPT, seed=seed, **FAST)[0]
        assert np.array_equal(pixels(image), pixels(alone))


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m_sde"])
def test_a_batch_of_a_noise_drawing_sampler_is_reproducible_per_image(sd1, sampler):
    """Ancestral/SDE samplers draw fresh noise each step: each image must draw it from its own seed."""
    run, _ = run_steps(sd1, prompt=PROMPT, seed=30, batch_size=2, sampler=sampler, **FAST)
    for seed, image in zip(run.result.seeds, run.result.images):
        alone = sd1.generate(PROMPT, seed=seed, sampler=sampler, **FAST)[0]
        assert np.array_equal(pixels(image), pixels(alone))


def test_batch_count_continues_the_seeds(sd1):
    run, steps = run_steps(sd1, prompt=PROMPT, seed=40, batch_size=2, batch_count=2, **FAST)
    assert run.result.seeds == [40, 41, 42, 43] and len(run.result.images) == 4
    assert [s.index for s in steps] == list(range(2 * STEPS)) and {s.total for s in steps} == {2 * STEPS}
    assert [s.batch for s in steps] == [0] * STEPS + [1] * STEPS
    third = sd1.generate(PROMPT, seed=42, **FAST)[0]
    assert np.array_equal(pixels(run.result.images[2]), pixels(third))


def test_seed_none_picks_a_reported_seed_that_reproduces_the_image(sd1):
    run, _ = run_steps(sd1, prompt=PROMPT, seed=None, **FAST)
    seed = run.result.seeds[0]
    assert isinstance(seed, int) and run.result.parameters[0]["Seed"] == seed
    again = sd1.generate(PROMPT, seed=seed, **FAST)[0]
    assert np.array_equal(pixels(again), pixels(run.result.images[0]))


# ---- samplers -------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler, a1111_name, karras", [
    ("euler", "Euler", None), ("euler_a", "Euler a", None), ("heun", "Heun", None), ("ddim", "DDIM", None),
    ("dpmpp_2m", "DPM++ 2M", None), ("dpmpp_2m_sde", "DPM++ 2M SDE", None), ("dpmpp_sde", "DPM++ SDE", None),
    ("unipc", "UniPC", None), ("lcm", "LCM", None), ("Euler a", "Euler a", None),
    ("DPM++ 2M Karras", "DPM++ 2M", "Karras"), ("DPM++ 2M SDE", "DPM++ 2M SDE", None),
    ("DPM++ SDE Karras", "DPM++ SDE", "Karras"), ("UniPC", "UniPC", None), ("LCM", "LCM", None),
    ("Heun", "Heun", None), ("DDIM", "DDIM", None),
])
def test_every_sampler_runs_end_to_end(sd1, sampler, a1111_name, karras):
    run, steps = run_steps(sd1, prompt=PROMPT, sampler=sampler, seed=2, **FAST)
    assert len(steps) == STEPS
    assert all(bool(torch.isfinite(s.latents).all() and torch.isfinite(s.denoised).all()) for s in steps)
    assert pixels(run.result.images[0]).std() > 1
    params = run.result.parameters[0]
    assert (params["Sampler"], params["Schedule type"]) == (a1111_name, karras)


# ---- img2img --------------------------------------------------------------------------------------

def test_img2img_strength_zero_runs_no_step_and_returns_the_vae_round_trip(sd1):
    image = picture()
    run, steps = run_steps(sd1, prompt=PROMPT, init_image=image, strength=0.0, seed=4, steps=STEPS)
    assert steps == [] and run.total_steps == 0
    latents = encode_images(sd1.parts, to_tensor(image), make_generators([4]))
    expected = to_pil(decode_latents(sd1.parts, latents))[0]
    assert np.array_equal(pixels(run.result.images[0]), pixels(expected))
    assert run.result.parameters[0]["Denoising strength"] == 0.0


@pytest.mark.parametrize("strength, expected_steps", [(0.5, 3), (1.0, 6), (0.34, 2)])
def test_img2img_strength_runs_its_share_of_the_steps(sd1, strength, expected_steps):
    run, steps = run_steps(sd1, prompt=PROMPT, init_image=picture(), strength=strength, seed=4, steps=6)
    assert len(steps) == expected_steps and run.total_steps == expected_steps
    assert {s.total for s in steps} <= {expected_steps}
    assert run.result.images[0].size == (SIZE, SIZE)


def test_img2img_resize_modes_give_the_requested_size(sd1):
    wide = picture(64, 32)
    outputs = {}
    for mode in ("just_resize", "crop", "fill"):
        images = sd1.edit(wide, PROMPT, strength=0.5, resize_mode=mode, **FAST)
        assert [im.size for im in images] == [(SIZE, SIZE)]
        outputs[mode] = pixels(images[0])
    assert not np.array_equal(outputs["crop"], outputs["fill"])
    assert not np.array_equal(outputs["crop"], outputs["just_resize"])


def test_img2img_without_a_size_works_at_the_image_size(sd1):
    image = picture(44, 20)  # worked at 40x16, returned at the image's size
    assert sd1.edit(image, PROMPT, strength=0.5, steps=STEPS)[0].size == (40, 16)


# ---- inpainting -----------------------------------------------------------------------------------

def _kept(mask: Image.Image, blur: int = 4) -> np.ndarray:
    """Where the blurred mask is exactly 0: the pixels inpainting must keep bit for bit."""
    return mask_to_array(blur_mask(mask, blur)) == 0


@pytest.mark.parametrize("kind", ["sd1", "sd1_inpaint"])
def test_inpainting_keeps_unmasked_pixels_and_changes_the_masked_area(pipes, kind):
    image, mask = picture(INPAINT, INPAINT), square_mask(INPAINT, INPAINT, (16, 16, 32, 32))
    out = pipes[kind].inpaint(image, mask, PROMPT, steps=STEPS, seed=6)[0]
    keep = _kept(mask)
    assert 0 < keep.sum() < keep.size
    assert np.array_equal(pixels(out)[keep], pixels(image)[keep])
    inside = np.asarray(mask) == 255
    assert np.abs(pixels(out)[inside] - pixels(image)[inside]).mean() > 5


def test_inpainting_only_masked_changes_only_the_mask_and_returns_the_full_image(sd1):
    image = picture(80, 80)
    mask = square_mask(80, 80, (52, 8, 68, 24))
    out = sd1.inpaint(image, mask, PROMPT, inpaint_only_masked=True, only_masked_padding=8, seed=2, **FAST)[0]
    assert out.size == image.size
    keep = _kept(mask)
    assert np.array_equal(pixels(out)[keep], pixels(image)[keep])
    inside = np.asarray(mask) == 255
    assert np.abs(pixels(out)[inside] - pixels(image)[inside]).mean() > 5
    run, _ = run_steps(sd1, prompt=PROMPT, init_image=image, mask=mask, inpaint_only_masked=True, **FAST)
    assert run.result.parameters[0]["Inpaint area"] == "Only masked"


@pytest.mark.parametrize("kind", ["sd1", "sd1_inpaint"])
def test_inpainting_latent_noise_fill(pipes, kind):
    image, mask = picture(INPAINT, INPAINT), square_mask(INPAINT, INPAINT, (12, 20, 28, 36))
    noise_fill = pipes[kind].inpaint(image, mask, PROMPT, strength=0.75, inpainting_fill="latent_noise",
                                     steps=STEPS, seed=6)[0]
    original_fill = pipes[kind].inpaint(image, mask, PROMPT, strength=0.75, steps=STEPS, seed=6)[0]
    keep = _kept(mask)
    assert np.array_equal(pixels(noise_fill)[keep], pixels(image)[keep])
    assert not np.array_equal(pixels(noise_fill), pixels(original_fill))


def test_inpainting_an_image_of_any_size_keeps_its_size_and_unmasked_pixels(sd1):
    image = picture(INPAINT + 4, INPAINT - 4)
    mask = square_mask(*image.size, (16, 12, 32, 28))
    out = sd1.inpaint(image, mask, PROMPT, steps=STEPS, seed=6)[0]
    assert out.size == image.size
    keep = _kept(mask)
    assert np.array_equal(pixels(out)[keep], pixels(image)[keep])


def test_an_empty_mask_returns_the_image_unchanged(pipes):
    image = picture()
    for kind in ("sd1", "sd1_inpaint"):
        out = pipes[kind].inpaint(image, Image.new("L", image.size, 0), PROMPT, steps=STEPS, seed=1)[0]
        assert np.array_equal(pixels(out), pixels(image)), kind


def test_an_rgba_mask_paints_where_it_is_opaque(sd1):
    image = picture()
    gray = square_mask(SIZE, SIZE, (8, 4, 20, 20))
    rgba = np.zeros((SIZE, SIZE, 4), dtype=np.uint8)
    rgba[..., 3] = np.asarray(gray)  # a brushed layer: black strokes, alpha = painted
    from_alpha = sd1.inpaint(image, Image.fromarray(rgba, "RGBA"), PROMPT, steps=STEPS, seed=8)[0]
    from_gray = sd1.inpaint(image, gray, PROMPT, steps=STEPS, seed=8)[0]
    assert np.array_equal(pixels(from_alpha), pixels(from_gray))


def test_an_inpainting_model_also_does_txt2img_and_img2img(pipes):
    pipe = pipes["sd1_inpaint"]
    assert pixels(pipe.generate(PROMPT, seed=1, **FAST)[0]).std() > 1
    assert pipe.edit(picture(), PROMPT, strength=0.5, steps=STEPS)[0].size == (SIZE, SIZE)


# ---- conditioning ---------------------------------------------------------------------------------

def test_sdxl_micro_conditioning_changes_the_picture(pipes):
    sdxl = pipes["sdxl"]
    run, steps = run_steps(sdxl, prompt=PROMPT, seed=1, **FAST)
    base = pixels(run.result.images[0])
    assert base.std() > 1 and steps[-1].preview()[0].mode == "RGB"
    for option in ({"original_size": (256, 256)}, {"crop_top_left": (16, 8)}, {"target_size": (128, 96)}):
        changed = pixels(sdxl.generate(PROMPT, seed=1, **FAST, **option)[0])
        assert not np.array_equal(base, changed), option
    explicit = sdxl.generate(PROMPT, seed=1, original_size=(SIZE, SIZE), crop_top_left=(0, 0),
                             target_size=(SIZE, SIZE), **FAST)[0]
    assert np.array_equal(pixels(explicit), base)  # the defaults are (height, width), (0, 0), (height, width)


def test_clip_skip_changes_the_picture_and_an_empty_prompt_is_allowed(sd1):
    base = pixels(sd1.generate(PROMPT, seed=1, **FAST)[0])
    assert np.array_equal(pixels(sd1.generate(PROMPT, seed=1, clip_skip=1, **FAST)[0]), base)
    assert not np.array_equal(pixels(sd1.generate(PROMPT, seed=1, clip_skip=2, **FAST)[0]), base)
    empty = pixels(sd1.generate("", seed=1, **FAST)[0])
    assert empty.std() > 1 and not np.array_equal(empty, base)


# ---- parameters -----------------------------------------------------------------------------------

def test_parameters_are_a1111_fields_that_round_trip(sd1, folders):
    run, _ = run_steps(sd1, prompt="a cat, (red:1.2)", negative_prompt="blurry", sampler="DPM++ 2M Karras",
                       cfg=6.5, seed=77, **FAST)
    params = run.result.parameters[0]
    assert params["Prompt"] == "a cat, (red:1.2)" and params["Negative prompt"] == "blurry"
    assert (params["Steps"], params["Sampler"], params["Schedule type"]) == (STEPS, "DPM++ 2M", "Karras")
    assert (params["CFG scale"], params["Seed"], params["Size"], params["Model"]) == (6.5, 77, f"{SIZE}x{SIZE}", "sd1")
    assert params["Denoising strength"] is None
    text = format_parameters(params)
    parsed = parse_parameters(text)
    for key in ("Prompt", "Negative prompt", "Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Model"):
        assert parsed[key] == str(params[key]), key
    assert (parsed["Size-1"], parsed["Size-2"]) == (str(SIZE), str(SIZE))
    assert "Denoising strength" not in parsed
    assert format_parameters(parsed) == text

    run, _ = run_steps(sd1, prompt=PROMPT, init_image=picture(), strength=0.5, **FAST)
    parsed = parse_parameters(format_parameters(run.result.parameters[0]))
    assert parsed["Denoising strength"] == "0.5" and parsed["Sampler"] == "Euler"
    assert "Schedule type" not in parsed  # euler's own schedule, not Karras


# ---- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, expected", [
    ("sampler", "euler_b", "unknown sampler 'euler_b'"),
    ("steps", 0, "steps=0: expected a whole number"),
    ("steps", 4.0, "steps=4.0: expected a whole number"),
    ("steps", "4", "steps='4': expected a whole number"),
    ("cfg", -1.0, "cfg=-1.0: expected a number"),
    ("cfg", float("nan"), "cfg=nan"),
    ("width", 65, "width=65: expected a positive multiple of 8"),
    ("height", 100, "height=100: expected a positive multiple of 8"),
    ("batch_size", 0, "batch_size=0"),
    ("batch_count", 0, "batch_count=0"),
    ("seed", -1, "seed=-1"),
    ("clip_skip", 0, "clip_skip=0"),
    ("original_size", (64,), "original_size=(64,): expected"),
    ("crop_top_left", "0,0", "crop_top_left='0,0': expected"),
    ("prompt", None, "prompt=None: expected a string"),
    ("target_size", (64, -1), "target_size=(64, -1): expected (height, width)"),
    ("inpaint_only_masked", "yes", "inpaint_only_masked='yes': expected True or False"),
    ("resize_mode", "stretch", "resize_mode='stretch': expected one of"),
    ("inpainting_fill", "noise", "inpainting_fill='noise': expected one of"),
])
def test_bad_request_fields_are_named(sd1, field, value, expected):
    options = {**FAST, field: value}
    with pytest.raises(InvalidRequest) as error:
        sd1.generate(options.pop("prompt", PROMPT), **options)
    assert expected in str(error.value)
    assert isinstance(error.value, ValueError) and isinstance(error.value, PocketDiffusionError)


@pytest.mark.parametrize("strength", [-0.1, 1.5])
def test_strength_outside_zero_one_is_refused(sd1, strength):
    with pytest.raises(InvalidRequest, match=rf"strength={strength}: expected a number in \[0, 1\]"):
        sd1.edit(picture(), PROMPT, strength=strength, steps=STEPS)


def test_a_huge_request_is_refused_before_anything_runs(sd1, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the UNet ran for a request that should have been refused")
    monkeypatch.setattr(sd1.parts.unet, "forward", fail)
    with pytest.raises(InvalidRequest, match="width=100000: expected at most 8192"):
        sd1.run(GenerationRequest(prompt=PROMPT, width=100000, height=100000))
    huge_image = Image.new("RGB", (9000, 16))
    with pytest.raises(InvalidRequest, match="9000x16"):
        sd1.edit(huge_image, PROMPT)


def test_mask_problems_are_explained(sd1):
    image = picture()
    with pytest.raises(InvalidRequest, match="mask size 16x24 differs from the image size 32x32"):
        sd1.inpaint(image, square_mask(16, 24, (0, 0, 8, 8)), PROMPT, **FAST)
    with pytest.raises(InvalidRequest, match="without an image"):
        sd1.run(GenerationRequest(prompt=PROMPT, mask=square_mask(SIZE, SIZE, (0, 0, 8, 8)), **FAST))
    with pytest.raises(InvalidRequest, match="at least 8x8"):
        sd1.edit(Image.new("RGB", (4, 4)), PROMPT)


@pytest.mark.parametrize("not_an_image", ["photo.png", np.zeros((64, 64, 3), np.uint8), torch.zeros(3, 64, 64)])
def test_non_images_are_refused_with_what_is_expected(sd1, not_an_image):
    kind = type(not_an_image).__name__
    with pytest.raises(TypeError, match=f"image must be a PIL image.*got {kind}"):
        sd1.edit(not_an_image, PROMPT)
    with pytest.raises(TypeError, match=f"mask must be a PIL image.*got {kind}"):
        sd1.inpaint(picture(), not_an_image, PROMPT)
    with pytest.raises(TypeError, match=f"image must be a PIL image.*got {kind}"):
        sd1.outpaint(not_an_image, PROMPT, left=8)
    with pytest.raises(InvalidRequest) as error:
        sd1.run(GenerationRequest(prompt=PROMPT, init_image=not_an_image))
    message = str(error.value)
    assert "init_image" in message and "a PIL image" in message and kind in message and len(message) < 200


@pytest.mark.parametrize("call", ["generate", "run"])
def test_nan_latents_name_the_step(sd1, monkeypatch, call):
    unet = sd1.parts.unet
    forward = unet.forward
    calls = []

    def nan_at_step_3(x, *args, **kwargs):
        calls.append(1)
        out = forward(x, *args, **kwargs)
        return out * math.nan if len(calls) == 3 else out  # euler + batched CFG: one UNet call per step

    monkeypatch.setattr(unet, "forward", nan_at_step_3)
    request = GenerationRequest(prompt=PROMPT, seed=1, **FAST)
    with pytest.raises(NonFiniteLatentsError, match=f"step 3 of {STEPS}") as error:
        if call == "generate":
            sd1.generate(PROMPT, seed=1, **FAST)
        else:
            run = sd1.run(request)
            for _ in run:
                pass
    assert isinstance(error.value, PocketDiffusionError)
    if call == "run":
        assert run.result is None
    monkeypatch.undo()
    assert pixels(sd1.generate(PROMPT, seed=1, **FAST)[0]).std() > 1  # usable right after


def test_unknown_options_are_named(sd1):
    with pytest.raises(TypeError, match="'stepz'.*did you mean 'steps'"):
        sd1.generate(PROMPT, stepz=4)
    with pytest.raises(TypeError, match="'denoise'"):
        sd1.edit(picture(), PROMPT, denoise=0.5)
    with pytest.raises(TypeError, match="GenerationRequest"):
        sd1.run({"prompt": PROMPT})


def test_load_refuses_bad_arguments(folders, tmp_path):
    with pytest.raises(ValueError, match="memory='turbo'.*balanced"):
        pocketdiffusion.load(folders["sd1"], memory="turbo")
    missing = tmp_path / "no_such_model.safetensors"
    with pytest.raises(CheckpointError, match="no_such_model.safetensors.*no such file"):
        pocketdiffusion.load(missing)
    with pytest.raises(TypeError, match="model path or name, got NoneType"):
        pocketdiffusion.load(None)
    with pytest.raises(TypeError, match="model path or name, got int"):
        pocketdiffusion.load(42)


def test_the_public_names_resolve():
    assert pocketdiffusion.GenerationRequest is GenerationRequest
    assert pocketdiffusion.Pipeline.__name__ == "Pipeline" and pocketdiffusion.Step.__name__ == "Step"
    with pytest.raises(AttributeError, match="no attribute 'Pipe'"):
        pocketdiffusion.Pipe


def test_low_memory_mode_quantizes_the_unet_and_stays_close(folders):
    from pocketdiffusion.memory.quant import Int8Conv2d
    balanced = pocketdiffusion.load(folders["sd1"], device="cpu")
    low = pocketdiffusion.load(folders["sd1"], device="cpu", memory="low")
    fp32 = pocketdiffusion.load(folders["sd1"], device="cpu", dtype=torch.float32)
    assert low.plan.quantize_unet and not balanced.plan.quantize_unet
    assert isinstance(low.parts.unet.input_blocks[1][0].in_layers[2], Int8Conv2d)
    weights = lambda m: sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])  # noqa: E731
    # int8 against fp32: a quarter, plus the small layers and the scales (balanced stores fp16 on the CPU)
    assert weights(low.parts.unet) < 0.4 * weights(fp32.parts.unet)
    assert weights(low.parts.unet) < 0.7 * weights(balanced.parts.unet)
    a = pixels(balanced.generate(PROMPT, seed=3, **FAST)[0]).astype(float)
    b = pixels(low.generate(PROMPT, seed=3, **FAST)[0]).astype(float)
    psnr = 10 * np.log10(255 ** 2 / max(((a - b) ** 2).mean(), 1e-12))
    assert psnr >= 25, psnr


def test_the_plan_tiles_the_vae_above_its_threshold(folders):
    """A plan that tiles every image gives (nearly) the untiled picture, with the kept pixels of
    inpainting still exact."""
    whole = pocketdiffusion.load(folders["sd1"], device="cpu")
    tiled = pocketdiffusion.load(folders["sd1"], device="cpu")
    tiled.plan = tiled.plan.with_(vae_tile_above=0, vae_tile=16, vae_tile_overlap=8)
    size = {"steps": STEPS, "width": 96, "height": 96}
    a = pixels(whole.generate(PROMPT, seed=5, **size)[0]).astype(float)
    b = pixels(tiled.generate(PROMPT, seed=5, **size)[0]).astype(float)
    assert not np.array_equal(a, b)  # the tiled path really ran
    psnr = 10 * np.log10(255 ** 2 / max(((a - b) ** 2).mean(), 1e-12))
    assert psnr >= 20, psnr
    image, mask = picture(96, 96), square_mask(96, 96, (24, 24, 64, 64))
    out = tiled.inpaint(image, mask, PROMPT, steps=STEPS, seed=2, mask_blur=0)[0]
    keep = _kept(mask)
    assert np.array_equal(pixels(out)[keep], pixels(image)[keep])


def test_an_out_of_memory_is_retried_once_on_the_next_lower_plan(folders):
    from pocketdiffusion.memory.plan import MemoryFallbackWarning
    from pocketdiffusion.memory.quant import Int8Conv2d
    # fp32 weights, so that quantizing them on the fly gives low's very int8 weights (balanced's fp16
    # store on the CPU would quantize its fp16-rounded ones)
    pipe = pocketdiffusion.load(folders["sd1"], device="cpu", dtype=torch.float32)
    expected = pocketdiffusion.load(folders["sd1"], device="cpu", memory="low").generate(PROMPT, seed=4, **FAST)[0]
    unet, calls = pipe.parts.unet, {"n": 0}
    original = unet.forward

    def forward_that_runs_out_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second step of the first attempt
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(*args, **kwargs)
    unet.forward = forward_that_runs_out_once
    with pytest.warns(MemoryFallbackWarning, match="out of memory with memory='balanced'; retrying once with "
                                                   "memory='low'"):
        image = pipe.generate(PROMPT, seed=4, **FAST)[0]
    assert pipe.plan.mode == "low" and isinstance(unet.input_blocks[1][0].in_layers[2], Int8Conv2d)
    assert np.array_equal(pixels(image), pixels(expected))  # the whole batch ran again on the lower plan

    # A second out-of-memory in the same run, or an error that is not one, is raised as it is.
    calls["n"] = 0

    def always_out(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")
    unet.forward = always_out
    with pytest.warns(MemoryFallbackWarning), pytest.raises(torch.OutOfMemoryError):
        pipe.generate(PROMPT, seed=4, **FAST)
    assert pipe.plan.vae_tile_above == 0
    unet.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a shape bug"))
    with pytest.raises(RuntimeError, match="a shape bug"):
        pipe.generate(PROMPT, seed=4, **FAST)


def test_lower_plans():
    from pocketdiffusion.memory.plan import MemoryPlan, is_out_of_memory, lower_plan
    first = lower_plan(MemoryPlan())
    assert first.mode == "low" and first.quantize_unet
    assert lower_plan(first).vae_tile_above == 0 and lower_plan(lower_plan(first)) is None
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and not is_out_of_memory(ValueError("x"))
