"""Our own safetensors reader: strict validation at open time, mmap reads, pages dropped after use.

Why not the `safetensors` package: we need control over memory (one tensor mapped at a time,
its file pages dropped from this process as soon as it has been converted, so loading a 4 GB
fp32 file into an fp16 model peaks near the fp16 size) and over errors (every broken file is
named and explained, and a truncated file is caught when it is opened, not halfway through a
load).

Format (https://github.com/huggingface/safetensors#format): an 8-byte little-endian header
length N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {str: str}}``, then the data; offsets are relative to the end of the header.
"""

from __future__ import annotations

import json
import math
import mmap
from dataclasses import dataclass
from pathlib import Path

import torch

from pocketdiffusion.checkpoints.formats_base import TensorSource, conversion_target
from pocketdiffusion.errors import CheckpointError

HEADER_LENGTH_BYTES = 8
# The reference implementation refuses headers above 100 MB; a real one is a few hundred KB.
MAX_HEADER_BYTES = 100_000_000
METADATA_KEY = "__metadata__"


def _safetensors_dtypes() -> dict[str, torch.dtype]:
    """safetensors dtype names -> torch dtypes, limited to those this torch build has."""
    names = {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
        "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
        "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
        "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    }  # fmt: skip
    return {name: getattr(torch, attr) for name, attr in names.items() if hasattr(torch, attr)}


SAFETENSORS_DTYPES = _safetensors_dtypes()


@dataclass(frozen=True)
class _Entry:
    """Where one tensor lives in the file. `begin`/`end` are absolute file offsets."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


class SafetensorsSource(TensorSource):
    """A `.safetensors` file, validated at open time and mapped copy-on-write.

    Zero-copy reads: `get(key)` without a conversion returns a view of the mapped file. The
    mapping is private copy-on-write (``mmap.ACCESS_COPY``): writing into such a view never
    reaches the file on disk, it only gives this process its own copy of the touched pages.
    (A read-only mapping would make torch warn that the buffer is not writable, and an
    in-place write would then kill the process with SIGSEGV instead of failing cleanly.)
    A view keeps the mapping alive: `close()` releases the file at once when no view exists,
    otherwise when the last view is garbage-collected.

    Converted reads: `get(key, dtype=..., device=...)` copies the tensor and then tells the
    kernel that this process no longer needs the pages it read (``MADV_DONTNEED``), so they
    stop counting towards its resident memory.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.skipped = []
        with open(self.path, "rb") as file:
            file_size = self.path.stat().st_size
            header, data_start = _read_header(file, self.path, file_size)
            self.metadata = _parse_metadata(header.pop(METADATA_KEY, {}), self.path)
            self._entries = _parse_entries(header, self.path, data_start, file_size)
            # The mapping holds its own descriptor, so the file object can close right away.
            self._mmap: mmap.mmap | None = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
        # Keys handed out as zero-copy views: their pages may hold the caller's writes, and
        # MADV_DONTNEED on a private mapping would silently revert them, so they are never dropped.
        self._viewed_keys: set[str] = set()

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key).shape

    def dtype(self, key: str) -> torch.dtype:
        return self._entry(key).dtype

    def get(
        self,
        key: str,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        entry = self._entry(key)
        target = conversion_target(entry.dtype, dtype, device)
        if self._mmap is None:
            raise CheckpointError(f"{self.path} was closed; open it again to read {key!r}")
        if entry.begin == entry.end:  # no bytes to map (a shape with a 0 in it)
            stored = torch.empty(entry.shape, dtype=entry.dtype)
            return stored if target is None else stored.to(dtype=target[0], device=target[1])

        stored, is_view = self._read(entry)
        if target is None:
            if is_view:
                self._viewed_keys.add(key)
            else:
                self._drop_pages(entry, key)
            return stored
        converted = stored.to(dtype=target[0], device=target[1])
        del stored  # release the buffer export before dropping the pages it covered
        self._drop_pages(entry, key)
        return converted

    def prefetch(self, key: str) -> None:
        """Ask the kernel to read `key`'s pages ahead (MADV_WILLNEED): into the page cache, not
        into this process's RSS, so a streamed block's weights are on their way while the block
        before it runs."""
        entry = self._entry(key)
        if self._mmap is None or entry.begin == entry.end or not hasattr(mmap, "MADV_WILLNEED"):
            return
        start = entry.begin // mmap.PAGESIZE * mmap.PAGESIZE
        self._mmap.madvise(mmap.MADV_WILLNEED, start, entry.end - start)

    def release(self, key: str) -> None:
        """Drop `key`'s pages from this process even if they were handed out as a zero-copy view:
        the streaming caller promises the views are gone (and weights are never written), so
        nothing of value is dropped; the next `get` faults them back in from the page cache."""
        if self._mmap is None:
            return
        self._viewed_keys.discard(key)
        self._drop_pages(self._entry(key), key)

    def close(self) -> None:
        if self._mmap is None:
            return
        try:
            self._mmap.close()
        except BufferError:
            # Zero-copy views still point into the mapping; each holds a reference to it, and
            # the mapping is unmapped when the last of them is garbage-collected.
            pass
        self._mmap = None

    def _entry(self, key: str) -> _Entry:
        try:
            return self._entries[key]
        except KeyError:
            raise self._missing_key(key) from None

    def _read(self, entry: _Entry) -> tuple[torch.Tensor, bool]:
        """The tensor's bytes as a tensor of its stored dtype and shape; True if it is a view
        of the mapping, False if it had to be copied out."""
        # A memoryview slice (rather than the mmap object itself) is an exported buffer: while
        # a tensor holds it, mmap.close() refuses to unmap, so no tensor ever points at freed
        # memory.
        window = memoryview(self._mmap)[entry.begin : entry.end]
        if entry.begin % entry.dtype.itemsize == 0:
            return torch.frombuffer(window, dtype=entry.dtype).reshape(entry.shape), True
        # Typed loads from a misaligned address are undefined behaviour on some CPUs, so a
        # tensor whose offset is not a multiple of its item size is copied to aligned memory.
        raw = torch.frombuffer(window, dtype=torch.uint8)
        return raw.clone().view(entry.dtype).reshape(entry.shape), False

    def _drop_pages(self, entry: _Entry, key: str) -> None:
        """Drop the pages that lie wholly inside this tensor's bytes from this process (the
        partial pages at both ends are shared with the neighbours and are kept)."""
        if key in self._viewed_keys:
            return  # a zero-copy view of this tensor may hold the caller's writes
        if not hasattr(self._mmap, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return  # e.g. Windows: the pages stay until close(), as with any mmap
        start = math.ceil(entry.begin / mmap.PAGESIZE) * mmap.PAGESIZE
        stop = entry.end // mmap.PAGESIZE * mmap.PAGESIZE
        if stop > start:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, stop - start)


def _read_header(file, path: Path, file_size: int) -> tuple[dict, int]:
    """Read and parse the JSON header; return it and the absolute offset where data starts."""
    if file_size < HEADER_LENGTH_BYTES:
        raise CheckpointError(
            f"{path}: {file_size} bytes is too small for a safetensors file "
            f"(it starts with an {HEADER_LENGTH_BYTES}-byte header length); the file is truncated"
        )
    header_length = int.from_bytes(file.read(HEADER_LENGTH_BYTES), "little")
    if header_length > file_size - HEADER_LENGTH_BYTES:
        raise CheckpointError(
            f"{path}: the safetensors header length ({header_length} bytes) is beyond the file "
            f"size ({file_size} bytes): the file is truncated or is not a safetensors file"
        )
    if header_length > MAX_HEADER_BYTES:
        raise CheckpointError(
            f"{path}: the safetensors header length ({header_length} bytes) is implausibly large "
            f"(at most {MAX_HEADER_BYTES}); the file is corrupt or is not a safetensors file"
        )
    raw = file.read(header_length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"{path}: the safetensors header is not valid JSON ({error}); the file is corrupt "
            f"or is not a safetensors file"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: the safetensors header must be a JSON object, got {type(header).__name__}"
        )
    return header, HEADER_LENGTH_BYTES + header_length


def _parse_metadata(metadata: object, path: Path) -> dict[str, str]:
    if not isinstance(metadata, dict):
        raise CheckpointError(
            f"{path}: {METADATA_KEY} must be a JSON object of strings, got {type(metadata).__name__}"
        )
    # The format says str -> str; some writers store numbers. Metadata is informational, so
    # rather than refuse a whole model over it, non-strings are kept in their JSON spelling.
    return {
        str(name): value if isinstance(value, str) else json.dumps(value)
        for name, value in metadata.items()
    }


def _parse_entries(header: dict, path: Path, data_start: int, file_size: int) -> dict[str, _Entry]:
    """Validate every tensor record against the file; the result keeps the header's order."""
    entries: dict[str, _Entry] = {}
    data_end = data_start
    for key, record in header.items():
        entry = _parse_entry(key, record, path, data_start)
        entries[key] = entry
        data_end = max(data_end, entry.end)
    if data_end > file_size:
        raise CheckpointError(
            f"{path}: the file is truncated: its header describes {data_end} bytes of file but "
            f"it has only {file_size} ({data_end - file_size} bytes missing; an interrupted "
            f"download or copy?)"
        )
    _check_no_overlap(entries, path)
    return entries


def _parse_entry(key: str, record: object, path: Path, data_start: int) -> _Entry:
    def invalid(problem: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {key!r}: {problem}")

    if not isinstance(record, dict):
        raise invalid(f"expected {{dtype, shape, data_offsets}}, got {record!r:.100}")
    dtype_name = record.get("dtype")
    if dtype_name not in SAFETENSORS_DTYPES:
        raise invalid(
            f"unknown dtype {dtype_name!r}; supported: {', '.join(SAFETENSORS_DTYPES)}"
        )
    dtype = SAFETENSORS_DTYPES[dtype_name]
    shape = record.get("shape")
    if not isinstance(shape, list) or not all(_is_count(size) for size in shape):
        raise invalid(f"shape must be a list of non-negative integers, got {shape!r:.100}")
    offsets = record.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(offset) for offset in offsets)
        or offsets[0] > offsets[1]
    ):
        raise invalid(f"data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r:.100}")
    expected_bytes = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != expected_bytes:
        raise invalid(
            f"data_offsets {offsets} span {offsets[1] - offsets[0]} bytes but shape {shape} of "
            f"{dtype_name} needs {expected_bytes}"
        )
    return _Entry(dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_no_overlap(entries: dict[str, _Entry], path: Path) -> None:
    previous_key, previous_end = None, 0
    for key, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin == entry.end:
            continue  # an empty tensor occupies no bytes
        if previous_key is not None and entry.begin < previous_end:
            raise CheckpointError(
                f"{path}: tensors {previous_key!r} and {key!r} overlap in the file "
                f"(one ends at byte {previous_end}, the other starts at {entry.begin}); "
                f"the file is corrupt"
            )
        previous_key, previous_end = key, entry.end
