"""The `TensorSource` contract shared by every weights-file reader.

A source is a lazy, read-only ``{key: tensor}`` view of one weights file (or of the shards of
one sharded checkpoint): names, shapes and dtypes come from the file's index without reading
tensor data, and `get()` reads one tensor at a time, so a loader can convert and place weights
one by one and never hold a second full copy of the model.
"""

from __future__ import annotations

import abc
import difflib
from pathlib import Path
from typing import Iterator

import torch

CPU = torch.device("cpu")


class TensorSource(abc.ABC):
    """A lazy ``{key: tensor}`` view of one weights file (or several shards).

    Attributes:
        path: the file that was opened (for a sharded checkpoint: its index file).
        metadata: the safetensors ``__metadata__`` strings (empty for other formats).
        skipped: entries of a pickled checkpoint that are not tensors (``"global_step"``,
            ``"optimizer_states"``, ...), kept only so callers can report them; empty for
            safetensors.
    """

    path: Path
    metadata: dict[str, str]
    skipped: list[str]

    @abc.abstractmethod
    def keys(self) -> list[str]:
        """Tensor names, in file order."""

    @abc.abstractmethod
    def shape(self, key: str) -> tuple[int, ...]:
        """The stored shape of `key`, without reading its data."""

    @abc.abstractmethod
    def dtype(self, key: str) -> torch.dtype:
        """The stored dtype of `key`, without reading its data."""

    @abc.abstractmethod
    def get(
        self,
        key: str,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Read one tensor, converted to `dtype` / `device` (None: keep the stored one / CPU).

        When a conversion happens the result owns its memory. When none is needed the result
        may be a zero-copy view of the file (see the concrete source for what that means).
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Release the file. Tensors already returned stay valid."""

    def prefetch(self, key: str) -> None:
        """Hint that `key` is read soon (weight streaming); a no-op where the format can't tell."""

    def release(self, key: str) -> None:
        """Weight streaming is done with `key` for now: drop its file pages from this process.
        Only call it once every tensor `get(key)` returned is gone. A no-op by default."""

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """``{key: shape}`` for every tensor, in file order (what `detect` needs)."""
        return {key: self.shape(key) for key in self.keys()}

    def nbytes(self, key: str) -> int:
        """Stored size of `key` in bytes, without reading its data (for memory planning)."""
        numel = 1
        for size in self.shape(key):
            numel *= size
        return numel * self.dtype(key).itemsize

    def __contains__(self, key: object) -> bool:
        return key in set(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __enter__(self) -> "TensorSource":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {len(self)} tensors)"

    def _missing_key(self, key: object) -> KeyError:
        """A KeyError that names the file and the closest existing keys (typos, prefixes)."""
        names = self.keys()
        close = difflib.get_close_matches(str(key), names, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        return KeyError(f"{key!r} is not a tensor in {self.path} ({len(names)} tensors){hint}")


def conversion_target(
    stored_dtype: torch.dtype,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
) -> tuple[torch.dtype, torch.device] | None:
    """The (dtype, device) a CPU tensor of `stored_dtype` must be copied to, or None if it can
    be returned as it is. Rejects arguments that are not a dtype / device with a clear error."""
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.float16, got {dtype!r}")
    try:
        target_device = CPU if device is None else torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}"
        ) from error
    target_dtype = stored_dtype if dtype is None else dtype
    if target_dtype == stored_dtype and target_device.type == "cpu":
        return None
    return target_dtype, target_device
