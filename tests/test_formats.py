"""checkpoints/formats.py on real files written by the tests: safetensors (by the `safetensors`
package itself), torch.save zip and legacy pickles, sharded indexes, diffusers folders, and the
broken files users end up with (truncated, corrupt, malicious, wrong type)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pocketdiffusion.checkpoints.formats import (
    SafetensorsSource,
    ShardedSource,
    TorchPickleSource,
    find_component_weights,
    open_weights,
    read_json,
)
from pocketdiffusion.errors import CheckpointError

PNG_BYTES = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00"


def _state_dict() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=generator),
        "conv.bias": torch.randn(4, generator=generator).half(),
        "norm.weight": torch.randn(7, generator=generator).bfloat16(),
        "position_ids": torch.arange(11).reshape(1, 11),
    }


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality for every dtype (torch.equal lacks float8 kernels)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a_bytes, b_bytes = (t.contiguous().reshape(-1).view(torch.uint8) for t in (a, b))
    return torch.equal(a_bytes, b_bytes)


def _header_keys(path: Path) -> list[str]:
    """Tensor names in the order the safetensors writer put them in the header."""
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    return [key for key in header if key != "__metadata__"]


def _write_raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    """A hand-made safetensors file, for headers the real writer would never produce."""
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # the writer pads the header to 8 bytes, as we do
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data)
    return path


def _checkpoint_error(path: Path, *fragments: str) -> str:
    """Open `path`, expect a CheckpointError naming the file and containing `fragments`."""
    with pytest.raises(CheckpointError) as info:
        open_weights(path)
    message = str(info.value)
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ---------------------------------------------------------------------------- safetensors


def test_safetensors_written_by_the_reference_writer_reads_back_exactly(tmp_path):
    tensors = {
        **_state_dict(),
        "f64": torch.randn(2, 2, dtype=torch.float64),
        "i32": torch.tensor([-3, 7], dtype=torch.int32),
        "i16": torch.tensor([[-1, 2]], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "f8_e4m3": torch.randn(5).to(torch.float8_e4m3fn),
        "f8_e5m2": torch.randn(5).to(torch.float8_e5m2),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "modelspec.title": "tiny"})

    with open_weights(path) as source:
        assert isinstance(source, SafetensorsSource)
        assert source.keys() == _header_keys(path)
        assert sorted(source.keys()) == sorted(tensors)
        assert source.metadata == {"format": "pt", "modelspec.title": "tiny"}
        assert source.skipped == []
        assert source.shapes() == {key: tuple(tensors[key].shape) for key in source.keys()}
        for key, expected in tensors.items():
            assert source.dtype(key) == expected.dtype, key
            assert source.nbytes(key) == expected.numel() * expected.element_size()
            assert _same_bytes(source.get(key), expected), key


def test_get_converts_into_memory_it_owns(tmp_path):
    tensors = _state_dict()
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)
    with open_weights(path) as source:
        half = source.get("conv.weight", dtype=torch.float16)
        assert half.dtype == torch.float16
        assert torch.equal(half, tensors["conv.weight"].half())
        as_float = source.get("norm.weight", dtype=torch.float32, device="cpu")
        assert torch.equal(as_float, tensors["norm.weight"].float())
        half.fill_(0)  # a converted tensor is a copy: the file's values are untouched
        assert torch.equal(source.get("conv.weight"), tensors["conv.weight"])
        with pytest.raises(TypeError, match="torch.dtype"):
            source.get("conv.weight", dtype="float16")
        with pytest.raises(ValueError, match="device"):
            source.get("conv.weight", device="warp-drive")


def test_zero_copy_view_is_private_and_survives_close(tmp_path):
    big = torch.arange(3 * 4096, dtype=torch.float32)  # spans whole pages, so pages can be dropped
    path = tmp_path / "model.safetensors"
    save_file({"big": big, "small": torch.ones(3)}, path)
    on_disk = path.read_bytes()
    source = open_weights(path)

    view = source.get("big")
    again = source.get("big")
    assert view.data_ptr() == again.data_ptr()  # both read the mapping, nothing was copied

    view.add_(1)  # copy-on-write: the process gets private pages, the file never changes
    assert path.read_bytes() == on_disk
    assert torch.equal(again, big + 1)
    # A converted read of the same tensor must not drop (and so revert) the written pages.
    converted = source.get("big", dtype=torch.float64)
    assert torch.equal(converted, (big + 1).double())
    assert torch.equal(view, big + 1)

    source.close()
    assert torch.equal(view, big + 1)  # the mapping lives as long as a view does
    with pytest.raises(CheckpointError, match="closed"):
        source.get("small")
    with pytest.raises(KeyError, match="did you mean 'big'"):
        source.shape("bigg")


def test_misaligned_tensor_is_copied_to_aligned_memory(tmp_path):
    values = torch.tensor([1.5, -2.0, 3.25])
    header = {
        "flag": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "values": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]},
    }
    data = b"\x07" + values.numpy().tobytes()
    path = _write_raw_safetensors(tmp_path / "odd.safetensors", header, data)
    with open_weights(path) as source:
        read = source.get("values")
        assert read.data_ptr() % 4 == 0
        assert torch.equal(read, values)
        assert torch.equal(source.get("values", dtype=torch.float16), values.half())
        assert source.get("flag").item() == 7


def _record(dtype: str, shape: list[int], offsets: list[int]) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


@pytest.mark.parametrize(
    "header, data, fragments",
    [
        ({"w": _record("F4X", [2], [0, 8])}, bytes(8), ["unknown dtype 'F4X'", "BF16"]),
        ({"w": _record("F32", [3], [0, 8])}, bytes(8), ["span 8 bytes", "needs 12"]),
        ({"w": _record("F32", [-2], [0, 8])}, bytes(8), ["non-negative"]),
        ({"w": _record("F32", [2], [8, 0])}, bytes(8), ["begin <= end"]),
        (
            {"w": _record("F32", [2], [0, 8]), "v": _record("F32", [2], [4, 12])},
            bytes(12),
            ["'w' and 'v' overlap"],
        ),
        ({"w": _record("F32", [2], [0, 8]), "__metadata__": ["x"]}, bytes(8), ["__metadata__"]),
        ({"w": [1, 2]}, bytes(8), ["'w'", "dtype, shape, data_offsets"]),
    ],
    ids=["unknown-dtype", "size-mismatch", "negative-shape", "reversed-offsets", "overlap",
         "bad-metadata", "bad-record"],
)
def test_invalid_safetensors_headers_are_named(tmp_path, header, data, fragments):
    _checkpoint_error(_write_raw_safetensors(tmp_path / "bad.safetensors", header, data), *fragments)


def test_truncated_safetensors_is_detected_at_open(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_state_dict(), path)
    path.write_bytes(path.read_bytes()[:-5])
    _checkpoint_error(path, "truncated", "5 bytes missing")


def test_corrupt_header_length_and_garbage_json(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_state_dict(), path)
    raw = path.read_bytes()
    path.write_bytes((10**12).to_bytes(8, "little") + raw[8:])
    _checkpoint_error(path, "header length (1000000000000 bytes) is beyond the file size")

    garbage = b'{"w": {"dtype": "F32", "shape": [1], "data_off'
    path.write_bytes(len(garbage).to_bytes(8, "little") + garbage + bytes(4))
    _checkpoint_error(path, "not valid JSON")

    _write_raw_safetensors(path, {}, b"")
    path.write_bytes(path.read_bytes()[:8] + b"[1, 2]  ")
    _checkpoint_error(path, "must be a JSON object")

    path.write_bytes(b"\x01\x00")
    _checkpoint_error(path, "too small for a safetensors file")


# ---------------------------------------------------------------------------- torch pickles


def test_torch_zip_file_reads_lazily_mapped(tmp_path):
    tensors = _state_dict()
    path = tmp_path / "model.pt"
    torch.save(tensors, path)
    with open_weights(path) as source:
        assert isinstance(source, TorchPickleSource)
        assert source.keys() == list(tensors)
        assert source.metadata == {} and source.skipped == []
        assert source.shapes() == {key: tuple(t.shape) for key, t in tensors.items()}
        for key, expected in tensors.items():
            assert source.dtype(key) == expected.dtype
            assert _same_bytes(source.get(key), expected)
        assert torch.equal(source.get("conv.weight", dtype=torch.float16), tensors["conv.weight"].half())


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "module"])
def test_common_nestings_are_unwrapped_and_extras_skipped(tmp_path, wrapper):
    tensors = _state_dict()
    path = tmp_path / "model.ckpt"
    torch.save({wrapper: {**tensors, "ema_decay": 0.999}, "global_step": 5, "epoch": 2}, path)
    with open_weights(path) as source:
        assert source.keys() == list(tensors)
        assert source.skipped == ["global_step", "epoch", f"{wrapper}.ema_decay"]
        assert torch.equal(source.get("conv.weight"), tensors["conv.weight"])


def test_legacy_pickle_format(tmp_path):
    tensors = _state_dict()
    path = tmp_path / "model.pth"
    torch.save({"state_dict": tensors, "global_step": 5}, path, _use_new_zipfile_serialization=False)
    assert not path.read_bytes().startswith(b"PK")
    with open_weights(path) as source:
        assert source.keys() == list(tensors) and source.skipped == ["global_step"]
        for key, expected in tensors.items():
            assert _same_bytes(source.get(key), expected)


class _RunsCodeWhenUnpickled:
    """Unpickling this calls os.system, which would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the raw pickle
@pytest.mark.parametrize("layout", ["zip", "legacy", "raw-pickle"])
def test_pickle_that_runs_code_is_refused_and_never_executed(tmp_path, layout):
    marker = tmp_path / "executed"
    payload = {"weight": torch.ones(2), "payload": _RunsCodeWhenUnpickled(marker)}
    path = tmp_path / "model.ckpt"
    if layout == "zip":
        torch.save(payload, path)
    elif layout == "legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(payload))
    _checkpoint_error(path, "refused for safety", "not plain tensors", "safetensors")
    assert not marker.exists()
    # Control: the payload really is live, so the refusal above is what kept it from running.
    pickle.loads(pickle.dumps(_RunsCodeWhenUnpickled(marker)))
    assert marker.exists()


def test_damaged_torch_files(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save(_state_dict(), path)
    path.write_bytes(path.read_bytes()[:-100])
    _checkpoint_error(path, "damaged or truncated")

    torch.save([torch.ones(1)], path)
    _checkpoint_error(path, "holds a list, not a dict of tensors")

    torch.save({"global_step": 5, "optimizer": {"lr": 0.1}}, path)
    _checkpoint_error(path, "contains no tensors", "'global_step'")

    renamed = tmp_path / "model.safetensors"
    torch.save(_state_dict(), renamed)
    _checkpoint_error(renamed, "is a PyTorch pickle", "rename it to .ckpt")


# ---------------------------------------------------------------------------- shards


@pytest.mark.parametrize("extension", ["safetensors", "bin"])
def test_sharded_index_is_one_source(tmp_path, extension):
    tensors = _state_dict()
    keys = list(tensors)
    # Listed second shard first: keys() follows the index, not the shard files.
    shards = {f"model-0000{i + 1}-of-00002.{extension}": keys[i * 2 : i * 2 + 2] for i in (1, 0)}
    for name, shard_keys in shards.items():
        part = {key: tensors[key] for key in shard_keys}
        if extension == "safetensors":
            save_file(part, tmp_path / name, metadata={"format": "pt"})
        else:
            torch.save(part, tmp_path / name)
    weight_map = {key: name for name, shard_keys in shards.items() for key in shard_keys}
    index = tmp_path / f"model.{extension}.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 123}, "weight_map": weight_map}))

    with open_weights(index) as source:
        assert isinstance(source, ShardedSource)
        assert source.keys() == list(weight_map)
        assert set(source.keys()) == set(tensors) and "conv.bias" in source
        for key, expected in tensors.items():
            assert source.shape(key) == tuple(expected.shape) and source.dtype(key) == expected.dtype
            assert _same_bytes(source.get(key), expected)
        assert torch.equal(source.get("conv.bias", dtype=torch.float32), tensors["conv.bias"].float())
        assert source.metadata == ({"format": "pt"} if extension == "safetensors" else {})

    (tmp_path / f"model-00002-of-00002.{extension}").unlink()
    _checkpoint_error(index, "model-00002-of-00002", "missing")

    index.write_text(json.dumps({"weight_map": {"not.there": f"model-00001-of-00002.{extension}"}}))
    _checkpoint_error(index, "'not.there'", "no such tensor")

    index.write_text(json.dumps({"metadata": {}}))
    _checkpoint_error(index, "weight_map")


# ---------------------------------------------------------------------------- other bad input


def test_files_that_are_not_weights(tmp_path):
    _checkpoint_error(tmp_path / "nowhere.safetensors", "no such file")
    _checkpoint_error(tmp_path, "is a folder")
    empty = tmp_path / "model.ckpt"
    empty.write_bytes(b"")
    _checkpoint_error(empty, "empty")
    image = tmp_path / "photo.png"
    image.write_bytes(PNG_BYTES)
    _checkpoint_error(image, "a PNG image", "supported", ".safetensors", ".ckpt")
    misnamed_image = tmp_path / "photo.safetensors"
    misnamed_image.write_bytes(PNG_BYTES)
    _checkpoint_error(misnamed_image, "beyond the file size")
    text = tmp_path / "notes.txt"
    text.write_text("a prompt, not a model\n")
    _checkpoint_error(text, "a text file", "supported")
    with pytest.raises(TypeError, match="path"):
        open_weights(42)


# ---------------------------------------------------------------------------- folders and json


UNET = "diffusion_pytorch_model"


def _touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"x")


@pytest.mark.parametrize(
    "present, expected",
    [
        ([f"{UNET}.bin", f"{UNET}.safetensors"], f"{UNET}.safetensors"),
        ([f"{UNET}.fp16.safetensors", f"{UNET}.safetensors"], f"{UNET}.safetensors"),
        ([f"{UNET}.fp16.safetensors", f"{UNET}.bin"], f"{UNET}.fp16.safetensors"),
        ([f"{UNET}.safetensors.index.json", f"{UNET}.fp16.safetensors"],
         f"{UNET}.safetensors.index.json"),
        ([f"{UNET}.safetensors.index.fp16.json", f"{UNET}.bin"], f"{UNET}.safetensors.index.fp16.json"),
        ([f"{UNET}.bin"], f"{UNET}.bin"),
        (["model.bin", "model.safetensors"], "model.safetensors"),
        (["model.safetensors", f"{UNET}.bin"], "model.safetensors"),
        (["pytorch_model.bin.index.json"], None),
    ],
)
def test_find_component_weights_prefers_safetensors(tmp_path, present, expected):
    folder = tmp_path / "unet"
    _touch(folder, *present)
    if expected is not None:
        assert find_component_weights(folder) == folder / expected
        return
    with pytest.raises(CheckpointError) as info:
        find_component_weights(folder)
    message = str(info.value)
    assert "diffusion_pytorch_model.safetensors" in message and "model.bin" in message
    assert "pytorch_model.bin.index.json" in message  # what the folder holds instead
    found = find_component_weights(folder, names=("pytorch_model",))
    assert found == folder / "pytorch_model.bin.index.json"


def test_find_component_weights_rejects_a_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        find_component_weights(tmp_path / "vae")


def test_read_json(tmp_path):
    config = tmp_path / "config.json"
    config.write_text('{"in_channels": 4, "sample_size": 64}')
    assert read_json(config) == {"in_channels": 4, "sample_size": 64}
    config.write_text('{"in_channels": 4,\n "sample_size": }')
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON: .* line 2"):
        read_json(config)
    config.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="JSON object"):
        read_json(config)
    with pytest.raises(CheckpointError, match="no such file"):
        read_json(tmp_path / "scheduler_config.json")


# ---------------------------------------------------------------------------- memory

_MEMORY_PROBE = textwrap.dedent(
    """
    import json, sys, threading, time
    import psutil, torch

    process = psutil.Process()
    baseline = process.memory_info().rss  # a process that has only imported torch
    peak = baseline
    sampling = True

    def sample():
        global peak
        while sampling:
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.0005)

    from pocketdiffusion.checkpoints.formats import open_weights

    sampler = threading.Thread(target=sample)
    sampler.start()
    source = open_weights(sys.argv[1])
    halves = []
    for key in source.keys():
        halves.append(source.get(key, dtype=torch.float16))
        peak = max(peak, process.memory_info().rss)
    sampling = False
    sampler.join()
    converted_peak = peak - baseline

    # Control: touching zero-copy views does map the file into this process, so the
    # measurement above would have seen the fp32 pages had they been kept.
    before_views = process.memory_info().rss
    views = [source.get(key) for key in source.keys()]
    checksum = sum(float(view.sum()) for view in views)
    views_growth = process.memory_info().rss - before_views
    print(json.dumps({
        "converted_peak": converted_peak,
        "fp16_total": sum(h.numel() * h.element_size() for h in halves),
        "views_growth": views_growth,
        "checksum": checksum,
    }))
    """
)


@pytest.mark.slow
def test_converting_fp32_file_to_fp16_keeps_rss_near_the_fp16_size(tmp_path):
    path = tmp_path / "big.safetensors"
    # 20 tensors of 10 MiB (fp32): the per-tensor transient is small next to the 100 MiB result.
    tensors = {f"block.{i}.weight": torch.full((1280, 2048), float(i)) for i in range(20)}
    file_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    save_file(tensors, path)
    del tensors

    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["fp16_total"] == file_bytes // 2
    assert measured["checksum"] == sum(float(i) * 1280 * 2048 for i in range(20))
    assert measured["views_growth"] >= 0.8 * file_bytes, measured
    assert measured["converted_peak"] <= 1.35 * measured["fp16_total"], measured
