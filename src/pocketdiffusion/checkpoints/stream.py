"""The loader's side of weight streaming (the "minimal" memory mode, memory/streaming.py).

`load(..., streaming=...)` does not read the weights that `streaming.streams(target)` claims: it
records where each of them lives (`StreamedWeights`: its file, its key there and the pure key
mapper that turns the stored tensor into ours), leaves an empty placeholder in the model, keeps
those files open and hands both to `streaming.install`. Reading a group of weights later runs
exactly the code the resident load runs (`get` with the same dtype, then the same mapper), so a
streamed model computes with the same values, bit for bit.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from .load import WeightSource


class Streaming(Protocol):
    """What `load` asks of a streaming policy."""

    def streams(self, target: str) -> bool:
        """Whether the weight named `target` ("unet.input_blocks.1.0.in_layers.2.weight") is
        streamed rather than loaded."""

    def install(self, models: dict[str, nn.Module], weights: "StreamedWeights") -> None:
        """Make `models` fetch their streamed weights from `weights` when they run."""


class StreamedWeights:
    """Where each streamed weight lives in the (still open) weight files, read on demand."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype  # the run dtype, as the resident load converts to
        self._where: dict[str, tuple["WeightSource", str]] = {}  # target -> (source, its key)

    def add(self, source: "WeightSource", key: str, targets: Iterable[str]) -> None:
        for target in targets:
            self._where[target] = (source, key)

    @property
    def targets(self) -> list[str]:
        return list(self._where)

    def uses(self, source: "WeightSource") -> bool:
        return any(s is source for s, _ in self._where.values())

    def _keys(self, targets: Iterable[str]) -> dict[tuple[int, str], tuple["WeightSource", str]]:
        """The distinct (source, key) pairs behind `targets`, in the order first needed (one
        stored tensor can feed several targets: OpenCLIP's stacked q/k/v)."""
        keys = {}
        for target in targets:
            source, key = self._where[target]
            keys.setdefault((id(source), key), (source, key))
        return keys

    def read(self, targets: Iterable[str]) -> dict[str, torch.Tensor]:
        """{target: tensor} on the CPU in the run dtype: zero-copy views of the mapped file where
        the file already holds that dtype, converted copies otherwise."""
        wanted = set(targets)
        out: dict[str, torch.Tensor] = {}
        for source, key in self._keys(wanted).values():
            floating = source.tensors.dtype(key).is_floating_point
            tensor = source.tensors.get(key, dtype=self.dtype if floating else None)
            for target, value in source.mapper(key, tensor):
                if target in wanted:
                    out[target] = value
        return out

    def read_rows(self, target: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows `rows` (1-D long) of the 2-D weight `target`, in the run dtype, without reading the
        rest (a text encoder's token embedding: a prompt needs 77 of its 49408 rows). The stored
        tensor is taken as it lies in the file (a zero-copy view where the format maps it), the
        rows are gathered and only they are converted: the elementwise conversion gives the same
        values as converting the whole table first, as `read` does. The table's mapper must be a
        rename (it is for every embedding: checkpoints/keymaps.py), so the view passes through it."""
        source, key = self._where[target]
        table = dict(source.mapper(key, source.tensors.get(key)))[target]
        picked = table.index_select(0, rows)
        del table  # the view's buffer export, before its pages are dropped
        source.tensors.release(key)
        return picked.to(self.dtype) if picked.is_floating_point() else picked

    def prefetch(self, targets: Iterable[str]) -> None:
        for source, key in self._keys(targets).values():
            source.tensors.prefetch(key)

    def release(self, targets: Iterable[str]) -> None:
        """Drop the file pages of `targets` from this process; call once their tensors are gone."""
        for source, key in self._keys(targets).values():
            source.tensors.release(key)

    def close(self) -> None:
        for source in {id(s): s for s, _ in self._where.values()}.values():
            source.tensors.close()
