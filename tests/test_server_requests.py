"""How request bodies become GenerationRequests: A1111's field names and codes, the native
fields, the image decoding and the limits. In-process, no server."""
from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from pocketdiffusion.server.a1111_request import Img2ImgRequest, Txt2ImgRequest, to_generation as from_a1111
from pocketdiffusion.server.codec import decode_image, png_bytes
from pocketdiffusion.server.errors import RequestError
from pocketdiffusion.server.models import ModelList
from pocketdiffusion.server.native_request import JobRequest, to_generation as from_native
from pocketdiffusion.server.settings import Limits

LIMITS = Limits()


@pytest.fixture(scope="module")
def models():
    return ModelList("shapes")


def b64(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def test_a1111_txt2img_fields_map_onto_the_request(models):
    body = Txt2ImgRequest(prompt="p", negative_prompt="n", seed=-1, sampler_name="DPM++ 2M", scheduler="karras",
                          batch_size=2, n_iter=3, steps=12, cfg_scale=5.5, width=64, height=128,
                          override_settings={"CLIP_stop_at_last_layers": 2, "sd_model_checkpoint": "shapes-inpainting",
                                             "sd_vae": "x"})
    request, model, warnings = from_a1111(body, models, "shapes", LIMITS)
    assert (request.prompt, request.negative_prompt, request.seed, request.sampler) == ("p", "n", None,
                                                                                         "DPM++ 2M Karras")
    assert (request.batch_size, request.batch_count, request.steps, request.cfg) == (2, 3, 12, 5.5)
    assert (request.width, request.height, request.clip_skip, model) == (64, 128, 2, "shapes-inpainting")
    assert warnings == ["override_settings['sd_vae'] ignored: pocketdiffusion does not have this option"]


def test_a1111_defaults_are_a1111s(models):
    request, model, warnings = from_a1111(Txt2ImgRequest(), models, "shapes", LIMITS)
    assert (request.steps, request.cfg, request.sampler, request.seed, model, warnings) == (50, 7.0, "Euler",
                                                                                           None, "shapes", [])


@pytest.mark.parametrize("fill, expected, warned", [(0, "original", True), (1, "original", False),
                                                     (2, "latent_noise", False), (3, "latent_noise", True)])
def test_a1111_inpainting_fill_codes(models, fill, expected, warned):
    image = b64(Image.new("RGB", (64, 64)))
    body = Img2ImgRequest(init_images=[image], mask=image, inpainting_fill=fill, inpaint_full_res=False,
                          inpaint_full_res_padding=12, mask_blur=2, denoising_strength=0.4, resize_mode=2)
    request, _, warnings = from_a1111(body, models, "shapes", LIMITS)
    assert request.inpainting_fill == expected and bool(warnings) == warned
    assert (request.mode, request.strength, request.mask_blur, request.resize_mode) == ("inpaint", 0.4, 2, "fill")
    assert (request.inpaint_only_masked, request.only_masked_padding) == (False, 12)


def test_a1111_img2img_defaults_inpaint_only_the_masked_area_as_a1111_does(models):
    image = b64(Image.new("RGB", (64, 64)))
    request, _, warnings = from_a1111(Img2ImgRequest(init_images=[image], mask=image), models, "shapes", LIMITS)
    assert request.inpaint_only_masked is True and request.only_masked_padding == 0 and warnings == []


def test_a1111_inverted_mask(models):
    mask = Image.new("L", (8, 8), 0)
    mask.putpixel((0, 0), 255)
    body = Img2ImgRequest(init_images=[b64(Image.new("RGB", (8, 8)))], mask=b64(mask), inpainting_mask_invert=1)
    request, _, _ = from_a1111(body, models, "shapes", LIMITS)
    assert request.mask.getpixel((0, 0)) == 0 and request.mask.getpixel((1, 1)) == 255


def test_native_defaults_follow_the_python_api(models):
    image = b64(Image.new("RGB", (64, 64)))
    plain, _ = from_native(JobRequest(init_image=image), models, "shapes", LIMITS)
    assert (plain.mode, plain.strength) == ("img2img", 0.75)
    inpaint, _ = from_native(JobRequest(init_image=image, mask=image), models, "shapes", LIMITS)
    assert (inpaint.mode, inpaint.strength, inpaint.mask_blur, inpaint.inpainting_fill) == ("inpaint", 1.0, 4,
                                                                                           "original")
    outpaint, _ = from_native(JobRequest(init_image=image, outpaint={"left": 5}), models, "shapes", LIMITS)
    assert outpaint.init_image.size == (72, 64) and outpaint.mask.size == (72, 64)
    assert (outpaint.mask_blur, outpaint.inpainting_fill) == (0, "latent_noise")


def test_an_outpainted_canvas_obeys_the_size_limit(models):
    image = b64(Image.new("RGB", (200, 64)))
    with pytest.raises(RequestError, match="256"):
        from_native(JobRequest(init_image=image, outpaint={"right": 100}), models, "shapes", Limits(max_side=256))


@pytest.mark.parametrize("data, words", [
    ("", ["empty string"]), (5, ["int"]), ("###", ["not valid base64"]),
    (base64.b64encode(b"GIF89a not really").decode(), ["not an image"]),
])
def test_decode_image_says_what_is_wrong(data, words):
    with pytest.raises(RequestError) as caught:
        decode_image(data, "field", 2048)
    assert caught.value.status == 400
    for word in ["field", *words]:
        assert word in str(caught.value)


def test_decode_image_checks_the_size_before_decoding_and_reports_truncation():
    header_only = png_bytes(Image.new("L", (4000, 10)))
    with pytest.raises(RequestError, match="4000x10") as caught:
        decode_image(base64.b64encode(header_only).decode(), "img", 2048)
    assert caught.value.status == 413
    truncated = png_bytes(Image.effect_noise((64, 64), 50))[:300]
    with pytest.raises(RequestError, match="truncated or corrupt"):
        decode_image(base64.b64encode(truncated).decode(), "img", 2048)


def test_decode_image_takes_data_urls_and_jpeg():
    image = decode_image("data:image/jpeg;base64," + b64(Image.new("RGB", (16, 8)), "JPEG"), "img", 2048)
    assert image.size == (16, 8) and image.format == "JPEG"


def test_model_names_only(models):
    assert models.check(None) == "shapes" and models.check("shapes-inpainting [abc123]") == "shapes-inpainting"
    for name in ("/etc/passwd", "../shapes", "src/pocketdiffusion/assets/shapes"):
        with pytest.raises(RequestError, match="not offered"):
            models.check(name)
