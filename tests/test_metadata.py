"""A1111 infotext writing/reading, PNG output with the `parameters` chunk, output naming."""
from __future__ import annotations

import hashlib
import io
import os
import random
import struct
import zlib

import pytest
from PIL import Image, PngImagePlugin

from pocketdiffusion.pipelines import metadata
from pocketdiffusion.pipelines.metadata import (
    ImageMetadataError,
    format_parameters,
    model_hash,
    parse_parameters,
    read_png_infotext,
    read_png_parameters,
)
from pocketdiffusion.pipelines.output import next_output_path, prompt_slug, save_png

BASE = {
    "Steps": 30, "Sampler": "Euler a", "Schedule type": "Karras", "CFG scale": 7.5, "Seed": 42,
    "Size": "512x768", "Model hash": "abcdef1234", "Model": "name",
}


def _params(prompt="a red circle", negative="", **extra):
    return {"Prompt": prompt, "Negative prompt": negative, **BASE, **extra}


def _expected_parse(params):
    """What A1111's parser returns for `params`: text values, WxH split in two, Clip skip 1."""
    expected = {"Prompt": params["Prompt"], "Negative prompt": params.get("Negative prompt") or ""}
    for key, value in params.items():
        if key in expected or value is None:
            continue
        if isinstance(value, tuple):
            value = f"{value[0]}x{value[1]}"
        if key in ("Size", "Seed resize from"):
            expected[f"{key}-1"], expected[f"{key}-2"] = str(value).split("x")
        else:
            expected[key] = str(value)
    expected.setdefault("Clip skip", "1")
    return expected


# --- format_parameters ------------------------------------------------------------------------

def test_format_writes_a1111_lines_in_a1111_order():
    params = {  # deliberately out of order: the output order is A1111's, not the dict's
        "Version": metadata.INFOTEXT_VERSION, "Mask blur": 4, "Clip skip": 2, "Denoising strength": 0.75,
        "Model": "name", "Model hash": "abcdef1234", "Size": (512, 768), "Seed": 42, "CFG scale": 7.5,
        "Schedule type": "Karras", "Sampler": "Euler a", "Steps": 30,
        "Negative prompt": "blurry", "Prompt": "a red circle",
    }
    assert format_parameters(params) == (
        "a red circle\n"
        "Negative prompt: blurry\n"
        "Steps: 30, Sampler: Euler a, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 512x768, "
        "Model hash: abcdef1234, Model: name, Denoising strength: 0.75, Clip skip: 2, Mask blur: 4, "
        "Version: pocketdiffusion 0.1.0"
    )


def test_format_omits_empty_negative_none_values_and_default_clip_skip():
    text = format_parameters(_params(negative="", **{"Clip skip": 1, "Denoising strength": None}))
    assert text == (
        "a red circle\nSteps: 30, Sampler: Euler a, Schedule type: Karras, CFG scale: 7.5, Seed: 42, "
        "Size: 512x768, Model hash: abcdef1234, Model: name"
    )


def test_format_quotes_values_like_a1111():
    text = format_parameters(_params(**{
        "Lora hashes": "add_detail: 7c6bad76eb54, film: 0a1b2c3d4e5f",  # ',' and ':' -> JSON quoted
        "Model": "日本語モデル",  # no separator: raw, and never \u-escaped (ensure_ascii=False)
        "VAE": 'vae "fixed"',  # '"' -> quoted, or A1111 would read it back changed
        "Tiling": "Tiling",  # A1111 writes a field equal to its name as the bare name
    }))
    assert text.splitlines()[-1] == (
        "Steps: 30, Sampler: Euler a, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 512x768, "
        'Model hash: abcdef1234, Model: 日本語モデル, VAE: "vae \\"fixed\\"", Tiling, '
        'Lora hashes: "add_detail: 7c6bad76eb54, film: 0a1b2c3d4e5f"'
    )


@pytest.mark.parametrize("bad, message", [
    ("not a dict", "must be a dict"),
    ({**BASE}, "Prompt"),
    ({**_params(), "Negative prompt": 3}, "Negative prompt"),
    ({**_params(), "Bad: key": 1}, "cannot be written"),
    ({**_params(), 7: 1}, "cannot be written"),
    ({"Prompt": "x", "Steps": 20, "Seed": 1}, "at least 3"),
    ({**_params(), "Size": (512, "768")}, "WIDTHxHEIGHT"),
])
def test_format_rejects_bad_input_clearly(bad, message):
    with pytest.raises((TypeError, ValueError), match=message):
        format_parameters(bad)


# --- parse_parameters -------------------------------------------------------------------------

ROUND_TRIP_CASES = [
    _params(),
    _params(negative="blurry, lowres"),
    _params("masterpiece, best quality, (a red circle:1.2), [white:black:0.5]", "ugly: very, (bad:1.4)"),
    _params('a sign saying "hello, world"', 'text "watermark"'),
    _params("line one,\nline two: more\n\nline four", "neg one\nneg two, with comma"),
    _params("一只红色的圆 🎨, café au lait — ünïcödé", "γράμματα, ошибка"),
    _params("", "only a negative prompt"),
    _params("trailing comma,", ""),
    _params("a cat", None, **{"Clip skip": 2, "Denoising strength": 0.6, "Mask blur": 4,
                              "Seed resize from": "640x448", "Version": metadata.INFOTEXT_VERSION}),
    _params("a dog", "", **{
        "Lora hashes": "add_detail: 7c6bad76eb54, film: 0a1b", "Model": 'my "best", model: v2',
        "Hires prompt": "line1\nline2, and \\ backslash", "Hires upscaler": " padded ", "Empty": "",
        "Model hash": None, "Size": (1024, 576), "Schedule type": None, "NGMS": 0.5,
    }),
]


@pytest.mark.parametrize("params", ROUND_TRIP_CASES)
def test_format_then_parse_round_trips(params):
    text = format_parameters(params)
    parsed = parse_parameters(text)
    assert parsed == _expected_parse(params)
    assert format_parameters(parsed) == text  # a parsed dict formats back to the same text


A1111_SAMPLE = (  # hand-written in A1111 v1.10's format, with its quoting and extras
    "masterpiece, best quality, (a red circle:1.2) on a white background,\n"
    "BREAK soft lighting <lora:add_detail:0.5>\n"
    "Negative prompt: lowres, bad anatomy, (worst quality:1.4)\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 965400086, "
    "Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.7, "
    'Clip skip: 2, Hires upscale: 2, Hires upscaler: Latent, Lora hashes: "add_detail: 7c6bad76eb54", '
    'TI hashes: "easynegative: c74b4e810b03, bad-hands-5: aa7651be15", Version: v1.10.1'
)


def test_parse_handwritten_a1111_infotext():
    assert parse_parameters(A1111_SAMPLE) == {
        "Prompt": "masterpiece, best quality, (a red circle:1.2) on a white background,\n"
                  "BREAK soft lighting <lora:add_detail:0.5>",
        "Negative prompt": "lowres, bad anatomy, (worst quality:1.4)",
        "Steps": "20", "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "7",
        "Seed": "965400086", "Size-1": "512", "Size-2": "768", "Model hash": "6ce0161689",
        "Model": "v1-5-pruned-emaonly", "Denoising strength": "0.7", "Clip skip": "2",
        "Hires upscale": "2", "Hires upscaler": "Latent", "Lora hashes": "add_detail: 7c6bad76eb54",
        "TI hashes": "easynegative: c74b4e810b03, bad-hands-5: aa7651be15", "Version": "v1.10.1",
    }
    assert format_parameters(parse_parameters(A1111_SAMPLE)) == A1111_SAMPLE


def test_parse_short_last_line_is_prompt_and_clip_skip_defaults_to_1():
    # A1111 reads a last line with fewer than 3 fields as prompt text (old or hand-made infotexts).
    assert parse_parameters("a cat\nSteps: 20, Seed: 1") == {
        "Prompt": "a cat\nSteps: 20, Seed: 1", "Negative prompt": "", "Clip skip": "1",
    }
    assert parse_parameters("") == {"Prompt": "", "Negative prompt": "", "Clip skip": "1"}
    with pytest.raises(TypeError, match="must be str"):
        parse_parameters(b"a cat")


# --- PNG output and reading back --------------------------------------------------------------

def _image(mode="RGB", size=(16, 12)):
    return Image.new(mode, size, (200, 30, 40) if mode == "RGB" else 128)


def test_save_png_is_readable_and_carries_the_parameters(tmp_path):
    params = ROUND_TRIP_CASES[2]
    path = save_png(_image(), params, tmp_path / "out.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (16, 12)
        assert image.getpixel((3, 3)) == (200, 30, 40)
        assert image.text["parameters"] == format_parameters(params)
    assert read_png_infotext(path) == format_parameters(params)
    assert read_png_parameters(path) == _expected_parse(params)
    with open(path, "rb") as f:  # a file object works too
        assert read_png_parameters(f) == _expected_parse(params)
    assert sorted(os.listdir(tmp_path)) == ["out.png"]  # no temp file left


def test_unicode_parameters_go_to_an_itxt_chunk(tmp_path):
    params = ROUND_TRIP_CASES[5]
    path = save_png(_image(), params, tmp_path / "sub" / "dir" / "u.png")  # folders created
    assert b"iTXt" in path.read_bytes() and b"tEXt" not in path.read_bytes()
    assert read_png_parameters(path) == _expected_parse(params)


def _parameters_info(text: str) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    return info


def _png_with_text_after_idat(text: str) -> bytes:
    """A valid PNG whose tEXt chunk follows the pixel data (the spec allows it; Pillow never writes it)."""
    buffer = io.BytesIO()
    _image().save(buffer, format="PNG")
    data = buffer.getvalue()
    iend = data.rindex(b"IEND") - 4  # the chunk starts with its 4-byte length
    body = b"tEXt" + b"parameters\0" + text.encode("latin-1")
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
    return data[:iend] + chunk + data[iend:]


def test_read_finds_parameters_after_the_pixel_data(tmp_path):
    text = format_parameters(_params())
    assert read_png_parameters(io.BytesIO(_png_with_text_after_idat(text))) == _expected_parse(_params())


def test_parameters_before_the_pixel_data_survive_a_truncated_file(tmp_path):
    # The chunk is whole and CRC-checked; the settings of a half-downloaded image are still good.
    noise = Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3))
    whole = io.BytesIO()
    noise.save(whole, format="PNG", pnginfo=_parameters_info(format_parameters(_params())))
    cut = io.BytesIO(whole.getvalue()[: len(whole.getvalue()) // 2])
    assert read_png_parameters(cut) == _expected_parse(_params())


def test_read_errors_are_clear(tmp_path):
    plain = tmp_path / "plain.png"
    _image().save(plain)
    with pytest.raises(ImageMetadataError, match="has no generation parameters"):
        read_png_parameters(plain)

    comfy = tmp_path / "comfy.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", '{"3": {"class_type": "KSampler"}}')
    info.add_text("workflow", '{"nodes": []}')
    _image().save(comfy, pnginfo=info)
    with pytest.raises(ImageMetadataError, match="ComfyUI node graph"):
        read_png_parameters(comfy)

    jpeg = tmp_path / "photo.jpg"
    _image().save(jpeg, format="JPEG")
    with pytest.raises(ImageMetadataError, match="JPEG image; generation parameters are read from PNG"):
        read_png_parameters(jpeg)

    not_image = tmp_path / "notes.png"
    not_image.write_text("these are not pixels")
    with pytest.raises(ImageMetadataError, match="not a readable image"):
        read_png_parameters(not_image)

    noise = Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3))  # incompressible
    whole = io.BytesIO()
    noise.save(whole, format="PNG")
    truncated = tmp_path / "truncated.png"  # header intact, pixel data cut off halfway
    truncated.write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    with pytest.raises(ImageMetadataError, match="truncated or corrupt"):
        read_png_parameters(truncated)

    with pytest.raises(FileNotFoundError):
        read_png_parameters(tmp_path / "missing.png")
    with pytest.raises(ImageMetadataError, match="is a folder"):
        read_png_parameters(tmp_path)
    with pytest.raises(TypeError, match="image path or a binary file"):
        read_png_parameters(12)


def _failing_save(exc):
    def save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\n half an image")  # some bytes reach the disk first
        raise exc
    return save


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_save_leaves_no_file_and_no_temp_file(tmp_path, monkeypatch, exc):
    monkeypatch.setattr(Image.Image, "save", _failing_save(exc))
    with pytest.raises(type(exc)):
        save_png(_image(), _params(), tmp_path / "out.png")
    assert os.listdir(tmp_path) == []


def test_failed_overwrite_keeps_the_old_file_intact(tmp_path, monkeypatch):
    path = save_png(_image(), _params("old"), tmp_path / "out.png")
    before = path.read_bytes()
    monkeypatch.setattr(Image.Image, "save", _failing_save(OSError(5, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):
        save_png(_image(), _params("new"), path, overwrite=True)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["out.png"]


def test_existing_file_is_never_overwritten_silently(tmp_path):
    path = tmp_path / "out.png"
    path.write_bytes(b"someone else's image")
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        save_png(_image(), _params(), path)
    assert path.read_bytes() == b"someone else's image"

    save_png(_image(), _params("replaced"), path, overwrite=True)
    assert read_png_parameters(path)["Prompt"] == "replaced"
    assert os.listdir(tmp_path) == ["out.png"]


def test_a_file_created_while_saving_is_not_clobbered(tmp_path, monkeypatch):
    path = tmp_path / "out.png"
    real_save = Image.Image.save

    def racing_save(self, fp, *args, **kwargs):
        path.write_bytes(b"the other writer won")  # appears after save_png's existence check
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", racing_save)
    with pytest.raises(FileExistsError, match="created while saving"):
        save_png(_image(), _params(), path)
    assert path.read_bytes() == b"the other writer won" and os.listdir(tmp_path) == ["out.png"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_saved_png_gets_normal_permissions(tmp_path):
    reference = tmp_path / "reference.png"
    reference.write_bytes(b"")  # what open() gives under the current umask
    path = save_png(_image(), _params(), tmp_path / "out.png")
    assert path.stat().st_mode == reference.stat().st_mode


def test_save_png_rejects_bad_input_before_writing(tmp_path):
    with pytest.raises(TypeError, match="PIL.Image.Image"):
        save_png("pixels", _params(), tmp_path / "a.png")
    with pytest.raises(ValueError, match="must end in '.png'"):
        save_png(_image(), _params(), tmp_path / "a.jpg")
    with pytest.raises(ValueError, match="Prompt"):
        save_png(_image(), {"Steps": 20}, tmp_path / "a.png")
    with pytest.raises(ValueError, match="CMYK image cannot be stored as PNG"):
        save_png(Image.new("CMYK", (4, 4)), _params(), tmp_path / "a.png")
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder"):
        save_png(_image(), _params(), tmp_path / "folder.png", overwrite=True)
    assert os.listdir(tmp_path) == ["folder.png"]


def test_other_png_modes_round_trip(tmp_path):
    for mode in ("RGBA", "L"):
        path = save_png(_image(mode), _params(mode), tmp_path / f"{mode}.png")
        with Image.open(path) as image:
            assert image.mode == mode
        assert read_png_parameters(path)["Prompt"] == mode


# --- output naming ----------------------------------------------------------------------------

def test_next_output_path_counts_up_from_the_highest_counter(tmp_path):
    folder = tmp_path / "outputs" / "txt2img"
    first = next_output_path(folder, 42, "a red circle on a white background")
    assert folder.is_dir() and first == folder / "00000-42-a_red_circle_on_a_white_background.png"

    for name in ("00003-1-x.png", "00011-7.jpg", "2024-05-01.png", "notes.txt", "0009-short.png"):
        (folder / name).write_bytes(b"")
    (folder / "00008-5-dir").mkdir()
    path = next_output_path(folder, 42, "a red circle on", ext=".png")
    assert path.name == "00012-42-a_red_circle_on.png" and not path.exists()
    assert next_output_path(folder, 7, "", ext="webp").name == "00012-7.webp"


def test_prompt_slug_is_filesystem_safe_and_short():
    assert prompt_slug("a red circle, (masterpiece:1.2) / <lora:x:0.5>?*") == (
        "a_red_circle_masterpiece_1_2_lora_x_0_5"
    )
    assert prompt_slug("一只猫 sitting\non a mat") == "一只猫_sitting_on_a_mat"
    assert prompt_slug("..//\\:") == ""
    long = prompt_slug("word " * 40)
    assert len(long) <= 60 and long.endswith("word") and "__" not in long
    assert prompt_slug("x" * 100) == "x" * 60


@pytest.mark.parametrize("seed, ext, error", [(-1, "png", ValueError), (True, "png", ValueError),
                                              ("42", "png", ValueError), (1, "p/ng", ValueError)])
def test_next_output_path_rejects_bad_input(tmp_path, seed, ext, error):
    with pytest.raises(error):
        next_output_path(tmp_path, seed, "a cat", ext=ext)


def test_next_output_path_refuses_a_file_as_folder(tmp_path):
    file = tmp_path / "file"
    file.write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="expected the output folder"):
        next_output_path(file, 1, "a cat")


# --- model hash -------------------------------------------------------------------------------

def test_model_hash_is_a1111_short_sha256_read_in_chunks(tmp_path, monkeypatch):
    data = bytes(range(256)) * 41 + b"tail"
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    monkeypatch.setattr(metadata, "_HASH_CHUNK_BYTES", 1000)  # many chunks, a short last one
    assert model_hash(path) == hashlib.sha256(data).hexdigest()[:10]
    assert model_hash(str(path)) == hashlib.sha256(data).hexdigest()[:10]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model_hash(tmp_path / "missing.ckpt")
    with pytest.raises(IsADirectoryError, match="single model file"):
        model_hash(tmp_path)
