"""The native job API over HTTP on a real server: submit, follow the event stream, cancel,
fetch results; and the queue under 32 concurrent clients."""
from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from pocketdiffusion.pipelines.metadata import read_png_parameters
from server_process import b64_png, http_client, serving

FAST = {"steps": 3, "width": 64, "height": 64}
LONG = {"steps": 150, "width": 64, "height": 64}

server = serving()
client = http_client()


def submit(client, **fields) -> dict:
    response = client.post("/api/v1/jobs", json=fields)
    assert response.status_code == 202, response.text
    return response.json()


def events(client, job_id: str) -> list[tuple[str, dict]]:
    """The whole event stream of a job, parsed."""
    found = []
    with client.stream("GET", f"/api/v1/jobs/{job_id}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for block in response.read().decode().split("\n\n"):
            lines = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
            if lines:
                found.append((lines["event"], json.loads(lines["data"])))
    return found


def wait_state(client, job_id: str, states: tuple[str, ...], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never reached {states}")


def png_of(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_a_job_streams_its_steps_with_previews_then_its_result(client):
    job = submit(client, prompt="a yellow star", seed=21, steps=6, width=64, height=64)
    assert job["state"] in ("queued", "running") and job["images"] == []
    stream = events(client, job["id"])
    kinds = [kind for kind, _ in stream]
    assert kinds[-1] == "done" and "step" in kinds
    steps = [data for kind, data in stream if kind == "step"]
    assert [s["step"] for s in steps] == sorted(s["step"] for s in steps) and steps[-1]["step"] == 6
    assert all(s["total"] == 6 for s in steps)
    previews = [s["preview"] for s in steps if "preview" in s]
    assert previews, "no step carried a preview"
    for preview in previews:
        assert preview.startswith("data:image/png;base64,")
        assert png_of(base64.b64decode(preview.split(",", 1)[1])).format == "PNG"
    done = stream[-1][1]
    assert done["state"] == "done" and done["seeds"] == [21] and len(done["images"]) == 1
    assert done["prompt"] == "a yellow star" and "Seed: 21" in done["infotexts"][0]

    image = client.get(done["images"][0])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert "attachment" in image.headers["content-disposition"]
    params = read_png_parameters(io.BytesIO(image.content))
    assert params["Prompt"] == "a yellow star" and params["Seed"] == "21" and params["Size-1"] == "64"

    result = client.get(f"/api/v1/jobs/{job['id']}/result").json()
    assert result["seeds"] == [21] and result["parameters"][0]["Seed"] == 21
    assert base64.b64decode(result["images"][0]) == image.content


def test_the_stream_of_a_finished_job_says_it_is_done(client):
    job = submit(client, prompt="x", **FAST)
    wait_state(client, job["id"], ("done",))
    assert events(client, job["id"])[-1][0] == "done"


def test_cancel_drops_a_queued_job_and_stops_a_running_one_within_a_step(client):
    running = submit(client, prompt="long", **LONG)
    wait_state(client, running["id"], ("running",))
    queued = submit(client, prompt="queued", **FAST)
    assert queued["state"] == "queued" and queued["position"] == 0

    dropped = client.post(f"/api/v1/jobs/{queued['id']}/cancel").json()
    assert dropped["state"] == "cancelled" and dropped["step"] == 0
    assert events(client, queued["id"])[-1][0] == "cancelled"

    stopped = client.post(f"/api/v1/jobs/{running['id']}/cancel")
    assert stopped.status_code == 200
    stream = events(client, running["id"])
    assert stream[-1][0] == "cancelled"
    final = stream[-1][1]
    assert final["step"] <= final["cancelled_at_step"] + 1 < 150
    assert client.get(f"/api/v1/jobs/{running['id']}/images/0").status_code == 409

    after = submit(client, prompt="after", **FAST)  # the queue goes on
    assert wait_state(client, after["id"], ("done",))["seeds"] == [0]


def test_outpainting_extends_the_canvas_and_keeps_the_original(client):
    picture = Image.new("RGB", (64, 64), (20, 120, 40))
    ImageDraw.Draw(picture).rectangle((10, 10, 30, 50), fill=(240, 240, 0))
    job = submit(client, prompt="grass", init_image=b64_png(picture), outpaint={"right": 32}, steps=3)
    done = wait_state(client, job["id"], ("done", "failed"))
    assert done["state"] == "done", done["error"]
    result = png_of(client.get(done["images"][0]).content).convert("RGB")
    assert result.size == (96, 64)
    kept = np.asarray(result)[:, :64 - 8]  # all but the 8-pixel seam the outpainting blends over
    assert np.array_equal(kept, np.asarray(picture)[:, :64 - 8])


def test_inpainting_with_a_brushed_rgba_mask(client):
    picture = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(mask).ellipse((20, 20, 44, 44), fill=(255, 40, 40, 255))  # the editor's brushed layer
    job = submit(client, prompt="a blue dot", init_image=b64_png(picture), mask=b64_png(mask), mask_blur=0,
                 steps=3, seed=4)
    done = wait_state(client, job["id"], ("done", "failed"))
    assert done["state"] == "done", done["error"]
    result = np.asarray(png_of(client.get(done["images"][0]).content).convert("RGB"))
    outside = np.asarray(mask)[..., 3] == 0
    assert np.array_equal(result[outside], np.asarray(picture)[outside])
    assert not np.array_equal(result[~outside], np.asarray(picture)[~outside])
    assert "Mask blur: 0" in done["infotexts"][0]


@pytest.mark.parametrize("body, status, words", [
    ({"prompt": "x", "stepz": 3}, 422, ["stepz"]),
    ({"outpaint": {"right": 8}}, 400, ["outpaint", "init_image"]),
    ({"mask": "@img"}, 400, ["mask", "init_image"]),
    ({"init_image": "@img", "outpaint": {"left": 0}}, 400, ["at least one"]),
    ({"init_image": "@img", "mask": "@img", "outpaint": {"top": 8}}, 400, ["no mask"]),
    ({"init_image": "%%%"}, 400, ["init_image", "base64"]),
    ({"model": "shapes/../../etc"}, 400, ["not offered"]),
    ({"sampler": "nope"}, 400, ["nope"]),
    ({"steps": 0}, 400, ["steps=0"]),
])
def test_bad_job_requests_are_refused_before_queueing(client, body, status, words):
    image = b64_png(Image.new("RGB", (64, 64)))
    body = {key: image if value == "@img" else value for key, value in body.items()}
    before = len(client.get("/api/v1/jobs").json())
    response = client.post("/api/v1/jobs", json=body)
    assert response.status_code == status, response.text
    detail = json.dumps(response.json()["detail"])
    for word in words:
        assert word in detail
    assert len(client.get("/api/v1/jobs").json()) == before


def test_unknown_jobs_and_images_are_404(client):
    assert client.get("/api/v1/jobs/nope").status_code == 404
    assert client.get("/api/v1/jobs/nope/events").status_code == 404
    assert client.post("/api/v1/jobs/nope/cancel").status_code == 404
    job = submit(client, prompt="x", **FAST)
    wait_state(client, job["id"], ("done",))
    assert client.get(f"/api/v1/jobs/{job['id']}/images/1").status_code == 404


def test_the_server_reports_its_model_memory_plan_and_queue(client):
    server = client.get("/api/v1/server").json()
    assert server["model"] == "shapes" and "shapes-inpainting" in server["models"]
    (worker,) = server["workers"]
    assert worker["model"] == "shapes" and worker["plan"]["mode"] == "balanced" and worker["device"] == "cpu"
    assert server["limits"]["max_steps"] == 150


def test_32_concurrent_clients_are_all_answered_each_with_its_own_result(server):
    """From this process (the server is another), 32 clients at once, half through the A1111
    API and half through jobs: none lost, none mixed up (each result names its own seed and
    prompt, and equal requests give equal pixels)."""
    def a1111(i: int) -> tuple[int, str, dict, bytes]:
        with httpx.Client(base_url=server.url, timeout=300) as c:
            r = c.post("/sdapi/v1/txt2img", json={"prompt": f"client {i % 16}", "seed": 1000 + i % 16,
                                                  "steps": 2, "width": 64, "height": 64})
            assert r.status_code == 200, r.text
            png = base64.b64decode(r.json()["images"][0])
            return i, f"client {i % 16}", json.loads(r.json()["info"]), png

    def native(i: int) -> tuple[int, str, dict, bytes]:
        with httpx.Client(base_url=server.url, timeout=300) as c:
            r = c.post("/api/v1/jobs", json={"prompt": f"client {i % 16}", "seed": 1000 + i % 16, "steps": 2,
                                             "width": 64, "height": 64, "cfg": 7.0})
            assert r.status_code == 202, r.text
            job = wait_state(c, r.json()["id"], ("done", "failed"), timeout=300)
            png = c.get(job["images"][0]).content
            return i, f"client {i % 16}", {"seed": job["seeds"][0], "prompt": job["prompt"]}, png

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda i: (a1111 if i < 16 else native)(i), range(32)))
    assert len(answers) == 32
    pixels: dict[int, bytes] = {}
    for i, prompt, info, png in answers:
        params = read_png_parameters(io.BytesIO(png))
        assert info["seed"] == 1000 + i % 16 and info["prompt"] == prompt
        assert params["Seed"] == str(1000 + i % 16) and params["Prompt"] == prompt
        picture = np.asarray(png_of(png).convert("RGB")).tobytes()
        assert pixels.setdefault(i % 16, picture) == picture  # the A1111 twin made the same image
    assert len(set(pixels.values())) == 16
