"""Reading the weights files users actually have: lazily, safely, with clear errors.

`open_weights(path)` recognises a file by its first bytes (falling back to its extension only to
explain what is wrong) and returns a `TensorSource`, a lazy ``{key: tensor}`` view:

- ``.safetensors``: our own strict, mmap-based reader (formats_safetensors.py);
- ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin``: PyTorch pickles, zip or legacy, through torch's
  weights-only loader only (formats_torch.py);
- ``*.safetensors.index.json`` / ``*.bin.index.json``: a sharded diffusers/transformers
  checkpoint, seen as one source over all its shards.

`find_component_weights` picks the weights file inside a diffusers component folder, and
`read_json` reads its config files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from pocketdiffusion.checkpoints.formats_base import TensorSource
from pocketdiffusion.checkpoints.formats_safetensors import SafetensorsSource
from pocketdiffusion.checkpoints.formats_torch import ZIP_MAGIC, TorchPickleSource
from pocketdiffusion.errors import CheckpointError

__all__ = [
    "TensorSource",
    "SafetensorsSource",
    "TorchPickleSource",
    "ShardedSource",
    "open_weights",
    "find_component_weights",
    "read_json",
    "SUPPORTED_FORMATS",
]

SUPPORTED_FORMATS = (
    ".safetensors; .ckpt/.pt/.pth/.bin (PyTorch zip or legacy pickle, tensors only); "
    "sharded *.safetensors.index.json / *.bin.index.json"
)
# First bytes of files people pass by mistake, to say what the file is instead.
KNOWN_NON_WEIGHTS = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GGUF": "a GGUF file (llama.cpp / stable-diffusion.cpp)",
    b"\x1f\x8b": "a gzip archive",
    b"<": "an HTML/XML page (a download that returned a web page?)",
}


def open_weights(path: str | os.PathLike) -> TensorSource:
    """Open a weights file as a lazy `TensorSource`; raise CheckpointError if it can't be read."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or Path to a weights file, got {type(path).__name__}")
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a folder, not a weights file; inside a diffusers folder pass a "
            f"component's file (see find_component_weights), "
            f"e.g. unet/diffusion_pytorch_model.safetensors"
        )
    if not path.is_file():
        raise CheckpointError(f"{path} is not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): an interrupted download or copy?")
    try:
        with open(path, "rb") as file:
            head = file.read(16)
    except OSError as error:
        raise CheckpointError(f"{path} cannot be read: {error.strerror or error}") from None

    kind = _sniff(path, head, size)
    if kind == "torch" and path.suffix == ".safetensors":
        raise CheckpointError(
            f"{path} is named .safetensors but is a PyTorch pickle; rename it to .ckpt to load it "
            f"as one"
        )
    if kind == "torch":
        return TorchPickleSource(path)
    if kind == "safetensors":
        return SafetensorsSource(path)
    if kind == "index":
        return ShardedSource(path)
    raise CheckpointError(
        f"{path} is {_describe_unknown(head)}, not a weights file; supported: {SUPPORTED_FORMATS}"
    )


def _sniff(path: Path, head: bytes, size: int) -> str | None:
    """'torch', 'safetensors', 'index' or None, from the first bytes (and the name as a hint)."""
    if head.startswith(ZIP_MAGIC) or _is_pickle(head):
        return "torch"
    header_length = int.from_bytes(head[:8], "little")
    if len(head) > 8 and head[8:9] == b"{" and header_length <= size - 8:
        return "safetensors"
    if path.suffix == ".json":
        return "index"
    if path.suffix == ".safetensors":
        return "safetensors"  # not valid, but its reader says precisely what is wrong
    return None


def _is_pickle(head: bytes) -> bool:
    # Every pickle of protocol 2+ starts with PROTO (0x80) and the protocol number; the legacy
    # torch format starts with a pickled magic number, so it matches too.
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _describe_unknown(head: bytes) -> str:
    for magic, description in KNOWN_NON_WEIGHTS.items():
        if head.startswith(magic):
            return description
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "a file of an unknown format"
    return "a text file"


class ShardedSource(TensorSource):
    """One source over the shards listed in a ``*.index.json`` file's ``weight_map``.

    All shards are opened (and so validated) up front: a missing or truncated shard is
    reported when the checkpoint is opened, not halfway through loading it.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        weight_map = _read_weight_map(self.path)
        self._shards: dict[str, TensorSource] = {}
        try:
            for shard_name in dict.fromkeys(weight_map.values()):  # first-appearance order
                self._shards[shard_name] = self._open_shard(shard_name)
            self._key_to_shard = {key: self._shards[name] for key, name in weight_map.items()}
            for key, name in weight_map.items():
                if key not in self._shards[name]:
                    raise CheckpointError(
                        f"{self.path} lists tensor {key!r} in shard {name!r}, but that shard has "
                        f"no such tensor; the index and the shards do not match"
                    )
        except BaseException:
            self.close()
            raise
        self.metadata = {k: v for shard in self._shards.values() for k, v in shard.metadata.items()}
        self.skipped = [item for shard in self._shards.values() for item in shard.skipped]

    def _open_shard(self, shard_name: str) -> TensorSource:
        shard_path = self.path.parent / shard_name
        if not shard_path.is_file():
            raise CheckpointError(
                f"{self.path}: shard {shard_name!r} is missing (looked for {shard_path}); "
                f"download every file the index lists"
            )
        if shard_path.suffix == ".json":
            raise CheckpointError(f"{self.path}: shard {shard_name!r} is itself an index file")
        return open_weights(shard_path)

    def keys(self) -> list[str]:
        return list(self._key_to_shard)

    def __contains__(self, key: object) -> bool:
        return key in self._key_to_shard

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shard(key).shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self._shard(key).dtype(key)

    def get(
        self,
        key: str,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        return self._shard(key).get(key, dtype=dtype, device=device)

    def prefetch(self, key: str) -> None:
        self._shard(key).prefetch(key)

    def release(self, key: str) -> None:
        self._shard(key).release(key)

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()

    def _shard(self, key: str) -> TensorSource:
        try:
            return self._key_to_shard[key]
        except KeyError:
            raise self._missing_key(key) from None


def _read_weight_map(path: Path) -> dict[str, str]:
    index = read_json(path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"{path} is not a sharded weights index: it needs a non-empty \"weight_map\" object "
            f"{{tensor name: shard file name}}"
        )
    for key, shard_name in weight_map.items():
        if not isinstance(shard_name, str) or not shard_name:
            raise CheckpointError(
                f"{path}: weight_map[{key!r}] must be a shard file name, got {shard_name!r}"
            )
    return weight_map


def _component_weight_candidates(names: tuple[str, ...]) -> list[str]:
    """File names to try, best first: safetensors before .bin (no pickle, mmap-able); within a
    format, one file, then a sharded index, then diffusers' fp16 "variant" of each."""
    patterns = []
    for extension in ("safetensors", "bin"):
        patterns += [
            "{name}." + extension,
            "{name}." + extension + ".index.json",
            "{name}.fp16." + extension,
            "{name}." + extension + ".index.fp16.json",
        ]
    return [pattern.format(name=name) for pattern in patterns for name in names]


def find_component_weights(
    folder: str | os.PathLike, names: tuple[str, ...] = ("diffusion_pytorch_model", "model")
) -> Path:
    """The weights file of a diffusers component folder (unet/, vae/, text_encoder/).

    Prefers .safetensors (a single file or a sharded index, the fp16 variant only when no plain
    one exists) over .bin; raises CheckpointError listing what was looked for if none exists.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder} is not a folder (expected a diffusers component folder such as unet/)"
        )
    if isinstance(names, str):
        names = (names,)
    candidates = _component_weight_candidates(tuple(names))
    for candidate in candidates:
        if (folder / candidate).is_file():
            return folder / candidate
    present = sorted(entry.name for entry in folder.iterdir())
    raise CheckpointError(
        f"{folder} has no weights file; looked for {', '.join(candidates)}; "
        f"the folder holds: {', '.join(present) if present else 'nothing'}"
    )


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from config.json / scheduler_config.json / model_index.json / an index."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder, expected a JSON file") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not a JSON text file (it is not UTF-8)") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(
            f"{path} is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object {{...}}, got {type(data).__name__}")
    return data
