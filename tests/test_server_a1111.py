"""The AUTOMATIC1111-compatible endpoints, called over HTTP on a real server with the default
model, as an A1111 client script calls them."""
from __future__ import annotations

import io
import json
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pocketdiffusion.pipelines.metadata import read_png_parameters
from server_process import b64_png, http_client, image_of, serving

FAST = {"steps": 3, "width": 64, "height": 64}
LONG_STEPS = 150  # the server's default ceiling: many seconds at 64 px, time to interrupt

server = serving()
client = http_client()


def txt2img(client, **fields):
    response = client.post("/sdapi/v1/txt2img", json=FAST | fields)
    assert response.status_code == 200, response.text
    body = response.json()
    return body, json.loads(body["info"])


def test_txt2img_returns_pngs_carrying_their_parameters(client):
    body, info = txt2img(client, prompt="a red circle", seed=11, batch_size=2, sampler_name="Euler a")
    assert len(body["images"]) == 2
    assert info["all_seeds"] == [11, 12] and info["seed"] == 11
    assert info["warnings"] == [] and info["interrupted"] is False
    for index, b64 in enumerate(body["images"]):
        image = image_of(b64)
        assert image.format == "PNG" and image.size == (64, 64)
        params = read_png_parameters(io.BytesIO(__import__("base64").b64decode(b64)))
        assert params["Prompt"] == "a red circle"
        assert params["Seed"] == str(11 + index)
        assert params["Sampler"] == "Euler a"
        assert info["infotexts"][index].startswith("a red circle\n")
    assert body["parameters"]["prompt"] == "a red circle" and body["parameters"]["seed"] == 11


def test_a_random_seed_is_reported_and_reproduces_the_image(client):
    body, info = txt2img(client, prompt="a blue square", seed=-1)
    seed = info["seed"]
    assert isinstance(seed, int) and seed >= 0
    again, _ = txt2img(client, prompt="a blue square", seed=seed)
    assert np.array_equal(np.asarray(image_of(body["images"][0])), np.asarray(image_of(again["images"][0])))
    other, _ = txt2img(client, prompt="a blue square", seed=seed + 1)
    assert not np.array_equal(np.asarray(image_of(body["images"][0])), np.asarray(image_of(other["images"][0])))


def test_unknown_fields_are_ignored_with_a_warning_not_a_422(client):
    _, info = txt2img(client, prompt="x", enable_hr=True, my_extension={"strength": 2},
                      restore_faces=False, subseed=-1, styles=[])
    warned = " ".join(info["warnings"])
    assert "enable_hr" in warned and "my_extension" in warned
    assert "restore_faces" not in warned and "subseed" not in warned  # at A1111's "off" value


def test_scheduler_karras_is_applied(client):
    _, info = txt2img(client, prompt="x", sampler_name="DPM++ 2M", scheduler="Karras")
    assert "Schedule type: Karras" in info["infotexts"][0]


def _picture() -> Image.Image:
    image = Image.new("RGB", (64, 64), (30, 60, 200))
    ImageDraw.Draw(image).ellipse((8, 8, 40, 40), fill=(220, 30, 30))
    return image


def _box_mask() -> Image.Image:
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 47, 47), fill=255)
    return mask


@pytest.mark.parametrize("invert", [0, 1])
def test_img2img_with_a_mask_repaints_only_the_masked_pixels(client, invert):
    picture, mask = _picture(), _box_mask()
    response = client.post("/sdapi/v1/img2img", json={
        "init_images": [b64_png(picture)], "mask": "data:image/png;base64," + b64_png(mask), "mask_blur": 0,
        "inpainting_fill": 1, "inpaint_full_res": False, "inpainting_mask_invert": invert,
        "denoising_strength": 1.0, "prompt": "a green triangle", "steps": 3, "seed": 5})
    assert response.status_code == 200, response.text
    result = np.asarray(image_of(response.json()["images"][0]).convert("RGB")).astype(int)
    original = np.asarray(picture).astype(int)
    repainted = np.asarray(mask) > 0
    if invert:
        repainted = ~repainted
    assert np.array_equal(result[~repainted], original[~repainted])
    assert np.abs(result[repainted] - original[repainted]).mean() > 5
    info = json.loads(response.json()["info"])
    assert info["denoising_strength"] == 1.0 and "Mask blur: 0" in info["infotexts"][0]


def test_img2img_reworks_the_init_image_at_its_size(client):
    response = client.post("/sdapi/v1/img2img", json={
        "init_images": [b64_png(_picture())], "denoising_strength": 0.5, "prompt": "x", "steps": 4})
    assert response.status_code == 200, response.text
    result = image_of(response.json()["images"][0])
    assert result.size == (64, 64)
    assert not np.array_equal(np.asarray(result.convert("RGB")), np.asarray(_picture()))


@pytest.mark.parametrize("body, status, words", [
    ({"init_images": ["not base64!!"]}, 400, ["init_images[0]", "base64"]),
    ({"init_images": ["aGVsbG8gd29ybGQ="]}, 400, ["init_images[0]", "not an image"]),
    ({"init_images": []}, 400, ["init_images"]),
    ({"init_images": ["@img"], "mask": "@small-mask"}, 400, ["mask size", "differs"]),
    ({"init_images": ["@img"], "resize_mode": 7}, 400, ["resize_mode=7"]),
    ({"init_images": ["@img"], "denoising_strength": 1.5}, 400, ["strength"]),
])
def test_img2img_bad_input_is_a_clear_4xx(client, body, status, words):
    replacements = {"@img": b64_png(_picture()), "@small-mask": b64_png(Image.new("L", (32, 32), 255))}
    body = {key: ([replacements.get(v, v) for v in value] if isinstance(value, list)
                  else replacements.get(value, value)) for key, value in body.items()}
    response = client.post("/sdapi/v1/img2img", json=body | {"steps": 2})
    assert response.status_code == status, response.text
    for word in words:
        assert word in response.json()["detail"]


@pytest.mark.parametrize("fields, words", [
    ({"width": 65}, ["width=65", "multiple of 8"]),
    ({"steps": 151}, ["steps=151", "at most 150"]),
    ({"batch_size": 8, "n_iter": 4}, ["32 images", "at most 16"]),
    ({"width": 4096}, ["width=4096", "2048"]),
    ({"sampler_name": "Plasma 9000"}, ["sampler_name", "Plasma 9000"]),
    ({"cfg_scale": -1}, ["cfg"]),
    ({"seed": 2 ** 64}, ["seed"]),
    ({"override_settings": {"sd_model_checkpoint": "/etc/passwd"}}, ["not offered", "shapes"]),
])
def test_txt2img_bad_input_is_a_400_naming_the_field(client, fields, words):
    response = client.post("/sdapi/v1/txt2img", json=FAST | fields)
    assert response.status_code == 400, response.text
    for word in words:
        assert word in response.json()["detail"]


def test_a_field_of_the_wrong_type_is_a_422(client):
    response = client.post("/sdapi/v1/txt2img", json={"prompt": ["a", "list"], "steps": 2})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][-1] == "prompt"


def test_samplers_models_and_options(client):
    samplers = client.get("/sdapi/v1/samplers").json()
    names = {s["name"] for s in samplers}
    assert {"Euler", "Euler a", "DPM++ 2M", "DDIM", "UniPC"} <= names
    models = {m["title"] for m in client.get("/sdapi/v1/sd-models").json()}
    assert {"shapes", "shapes-inpainting"} <= models
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "shapes"
    try:
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "shapes-inpainting"}).status_code == 200
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "shapes-inpainting"
        _, info = txt2img(client, prompt="x")
        assert info["sd_model_name"] == "shapes-inpainting"
        refused = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "../models/x.safetensors"})
        assert refused.status_code == 400 and "not offered" in refused.json()["detail"]
    finally:
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "shapes"})
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "shapes"


def test_png_info_reads_back_what_txt2img_wrote(client):
    body, info = txt2img(client, prompt="a tiny (star:1.2)", negative_prompt="blur", seed=77)
    response = client.post("/sdapi/v1/png-info", json={"image": body["images"][0]})
    assert response.status_code == 200
    read = response.json()
    assert read["info"] == info["infotexts"][0]
    assert read["parameters"]["Prompt"] == "a tiny (star:1.2)" and read["parameters"]["Seed"] == "77"
    assert read["parameters"]["Negative prompt"] == "blur"
    plain = client.post("/sdapi/v1/png-info", json={"image": b64_png(_picture())}).json()
    assert plain["info"] == "" and plain["parameters"] == {}
    assert client.post("/sdapi/v1/png-info", json={"image": "aGVsbG8="}).status_code == 400


def _wait_for_step(client, at_least: int, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = client.get("/sdapi/v1/progress").json()
        if progress["state"]["sampling_step"] >= at_least:
            return progress
        time.sleep(0.02)
    raise AssertionError("the job did not reach its step in time")


def _job_with_prompt(client, prompt: str) -> dict:
    (job,) = [job for job in client.get("/api/v1/jobs").json() if job["prompt"] == prompt]
    return job


def _in_background(client, path, body) -> dict:
    box: dict = {}

    def call():
        box["response"] = client.post(path, json=body)
    box["thread"] = threading.Thread(target=call)
    box["thread"].start()
    return box


def test_progress_shows_the_preview_and_interrupt_stops_within_a_step(client):
    long = _in_background(client, "/sdapi/v1/txt2img", FAST | {"steps": LONG_STEPS, "prompt": "long"})
    progress = _wait_for_step(client, 2)
    queued = _in_background(client, "/sdapi/v1/txt2img", FAST | {"prompt": "after", "seed": 3})
    assert progress["state"]["sampling_steps"] == LONG_STEPS
    assert 0 < progress["progress"] < 1
    assert image_of(progress["current_image"]).format == "PNG"
    assert client.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["current_image"] is None

    assert client.post("/sdapi/v1/interrupt").status_code == 200
    interrupted = time.monotonic()
    long["thread"].join(60)
    body = long["response"].json()
    info = json.loads(body["info"])
    assert long["response"].status_code == 200 and info["interrupted"] is True and body["images"] == []
    stopped = _job_with_prompt(client, "long")
    assert stopped["state"] == "cancelled"
    assert stopped["total"] == LONG_STEPS
    # It finished the step running when the interrupt arrived, and stopped.
    assert stopped["cancelled_at_step"] >= 2 and stopped["step"] <= stopped["cancelled_at_step"] + 1
    assert time.monotonic() - interrupted < 10  # far less than the rest of the 150 steps

    queued["thread"].join(60)  # the next job proceeds
    assert queued["response"].status_code == 200
    assert json.loads(queued["response"].json()["info"])["prompt"] == "after"
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["state"]["job_count"] == 0 and idle["current_image"] is None


def test_a_client_that_disconnects_mid_job_does_not_stall_the_queue(server, client):
    host, port = server.url.removeprefix("http://").split(":")
    payload = json.dumps(FAST | {"steps": LONG_STEPS, "prompt": "abandoned"}).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: " + host.encode() +
                     b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(payload)).encode() +
                     b"\r\n\r\n" + payload)
        _wait_for_step(client, 1)
    started = time.monotonic()
    _, info = txt2img(client, prompt="next")
    assert info["prompt"] == "next"
    abandoned = _job_with_prompt(client, "abandoned")
    assert abandoned["state"] == "cancelled" and abandoned["step"] < LONG_STEPS
    assert time.monotonic() - started < 30
