"""The web editor in a real headless Chromium (Playwright driving Debian's `chromium`): type a
prompt, generate, brush a mask, inpaint, and check that the result changed only inside the
mask; download it and read its metadata; outpaint by dragging an edge; restore parameters from
a PNG. A screenshot is kept in test-artifacts/."""
from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pocketdiffusion.pipelines.metadata import read_png_parameters
from server_process import serving

sync_api = pytest.importorskip("playwright.sync_api", reason="the Python package playwright is not installed")
CHROMIUM = os.environ.get("POCKETDIFFUSION_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's `chromium` (apt-get install chromium), as .ci/run "
                "does, or point POCKETDIFFUSION_CHROMIUM at one", allow_module_level=True)

ARTIFACTS = Path(os.environ.get("POCKETDIFFUSION_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent /
                                "test-artifacts"))
# This machine has no network beyond loopback: Chromium's own background calls would only fail.
CHROMIUM_ARGS = ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
PROMPT = "a red circle on a blue background"
INPAINT_PROMPT = "a yellow square on a green background"
STROKE = ((0.3, 0.5), (0.7, 0.5))  # the mask stroke, as fractions of the picture
BRUSH = 12  # the editor's default brush diameter, in picture pixels
MASK_BLUR = 4  # the editor's default


server = serving()


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(server.url + "/")
        yield page
        assert errors == [], f"the page raised: {errors}"
        browser.close()


def download(page) -> bytes:
    with page.expect_download() as info:
        page.click("#download")
    return Path(info.value.path()).read_bytes()


def wait_for_results(page, count: int) -> None:
    # Locator waits, not wait_for_function: the page's CSP forbids the eval that one needs.
    page.locator("#history img").nth(count - 1).wait_for(timeout=120_000)
    assert page.locator("#message").inner_text() == ""


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def distance_to_stroke(width: int, height: int) -> np.ndarray:
    """(H, W) distance of each pixel centre to the stroke's segment, in pixels."""
    (x0, y0), (x1, y1) = [(fx * width, fy * height) for fx, fy in STROKE]
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    t = np.clip(((xs - x0) * (x1 - x0) + (ys - y0) * (y1 - y0)) / ((x1 - x0) ** 2 + (y1 - y0) ** 2), 0, 1)
    return np.hypot(xs - (x0 + t * (x1 - x0)), ys - (y0 + t * (y1 - y0)))


def test_summon_then_inpaint_in_the_browser(page, tmp_path):
    """The whole loop in one test (pytest-xdist may run tests of one file in different workers,
    so a second test could not count on this one's picture)."""
    page.locator("#model option").first.wait_for(state="attached")
    page.fill("#prompt", PROMPT)
    page.fill("#steps", "6")
    page.fill("#seed", "5")
    page.click("#generate")
    wait_for_results(page, 1)
    assert page.locator("#progress").evaluate("p => p.value") == 1
    first = download(page)
    params = read_png_parameters(io.BytesIO(first))
    assert params["Prompt"] == PROMPT and params["Seed"] == "5" and params["Steps"] == "6"

    box = page.locator("#mask-canvas").bounding_box()
    (fx0, fy0), (fx1, fy1) = STROKE
    page.mouse.move(box["x"] + fx0 * box["width"], box["y"] + fy0 * box["height"])
    page.mouse.down()
    page.mouse.move(box["x"] + fx1 * box["width"], box["y"] + fy1 * box["height"], steps=12)
    page.mouse.up()
    page.fill("#strength", "1")
    page.fill("#prompt", INPAINT_PROMPT)
    page.click("#edit")
    wait_for_results(page, 2)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "editor.png"), full_page=True)

    second = download(page)
    params = read_png_parameters(io.BytesIO(second))
    assert params["Prompt"] == INPAINT_PROMPT and params["Denoising strength"] == "1.0"
    assert params["Mask blur"] == str(MASK_BLUR)
    before, after = pixels(first), pixels(second)
    assert before.shape == after.shape
    distance = distance_to_stroke(before.shape[1], before.shape[0])
    # Beyond the brush, its anti-aliased edge and the mask blur's reach, every pixel is kept exactly.
    outside = distance > BRUSH / 2 + 1 + 3 * MASK_BLUR
    assert outside.mean() > 0.5
    assert np.array_equal(after[outside], before[outside])
    inside = distance < BRUSH / 2 - 1
    assert np.abs(after[inside] - before[inside]).mean() > 20, "the masked stroke was not repainted"

    # Outpainting: drag the right edge 32 picture pixels outward, then edit.
    handle = page.locator(".handle[data-side=right]").bounding_box()
    scale = box["width"] / before.shape[1]
    x, y = handle["x"] + handle["width"] / 2, handle["y"] + handle["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 32 * scale, y, steps=8)
    page.mouse.up()
    assert "right 32" in page.locator("#outpaint-info").inner_text()
    page.click("#edit")
    wait_for_results(page, 3)
    wider = pixels(download(page))
    assert wider.shape == (after.shape[0], after.shape[1] + 32, 3)
    assert np.array_equal(wider[:, :after.shape[1] - 8], after[:, :-8])  # kept beyond the blended seam
    assert page.locator("#outpaint-info").inner_text() == ""

    # A PNG opened (or dropped) brings back its parameters and its picture; undo takes it back.
    page.fill("#prompt", "something else")
    page.fill("#seed", "")
    png = tmp_path / "first.png"
    png.write_bytes(first)
    page.set_input_files("#open-image", str(png))
    sync_api.expect(page.locator("#prompt")).to_have_value(PROMPT)
    assert page.input_value("#seed") == "5" and page.input_value("#steps") == "6"
    assert page.locator("#message").inner_text() == "parameters restored"
    assert np.array_equal(canvas_pixels(page), before)
    page.click("#undo")
    assert np.array_equal(canvas_pixels(page), wider)


def canvas_pixels(page) -> np.ndarray:
    data_url = page.locator("#image-canvas").evaluate("canvas => canvas.toDataURL('image/png')")
    return pixels(base64.b64decode(data_url.split(",", 1)[1]))
