"""PyTorch pickles (.ckpt / .pt / .pth / .bin), read only through torch's weights-only loader.

A pickle can run arbitrary code when it is loaded, so these files are only ever opened with
``torch.load(weights_only=True)``, which accepts tensors and plain containers and refuses
everything else before executing it. Zip-format files (everything torch.save has written since
PyTorch 1.6) are memory-mapped; the legacy format cannot be and is read into memory.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

from pocketdiffusion.checkpoints.formats_base import TensorSource, conversion_target
from pocketdiffusion.errors import CheckpointError

ZIP_MAGIC = b"PK\x03\x04"
# Top-level keys under which training code nests the weights: LDM / Lightning .ckpt files use
# "state_dict"; many training scripts save {"model": ...} or DataParallel's {"module": ...}.
STATE_DICT_WRAPPERS = ("state_dict", "model", "module")


class TorchPickleSource(TensorSource):
    """The tensors of a PyTorch checkpoint, unwrapped from the usual nestings.

    `skipped` lists the entries that are not tensors ("global_step", "optimizer_states", ...,
    nested ones as dotted paths): they are ignored, and named only so a caller can report them.
    `get()` without a conversion returns the loaded tensor itself (a view of the mapped file
    for zip-format files); with a conversion it returns a new tensor.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.metadata = {}
        with open(self.path, "rb") as file:
            is_zip = file.read(len(ZIP_MAGIC)) == ZIP_MAGIC
        loaded = _load_weights_only(self.path, mmap=is_zip)
        self._tensors, self.skipped = _unwrap_state_dict(loaded, self.path)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: object) -> bool:
        return key in self._tensors

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensor(key).shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensor(key).dtype

    def get(
        self,
        key: str,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        tensor = self._tensor(key)
        target = conversion_target(tensor.dtype, dtype, device)
        if target is None:
            return tensor
        return tensor.to(dtype=target[0], device=target[1])

    def close(self) -> None:
        # Dropping our references lets torch unmap the file (or free the legacy copy) once no
        # tensor returned by get() is alive any more.
        self._tensors = {}

    def _tensor(self, key: str) -> torch.Tensor:
        try:
            return self._tensors[key]
        except KeyError:
            raise self._missing_key(key) from None


def _load_weights_only(path: Path, mmap: bool) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise _unreadable(path, error) from None
        # torch wraps the reason ("unsupported GLOBAL posix.system ...") in a long message
        # about weights_only; the reason itself is the exception it was raised from.
        reason = _first_line(error.__context__ or error)
        raise CheckpointError(
            f"{path} was refused for safety: it contains code or Python objects that are not "
            f"plain tensors ({reason}), which an ordinary pickle load would execute. Nothing "
            f"in it was run. If you trust its source, convert it to .safetensors with another "
            f"tool and load that: safetensors files hold only tensors. (A damaged file can also "
            f"end up here.)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        if "TorchScript" in str(error):
            raise CheckpointError(
                f"{path} is a TorchScript archive (a compiled program), not a checkpoint of "
                f"weights; use the original .ckpt/.safetensors weights instead"
            ) from None
        raise _unreadable(path, error) from None


def _unreadable(path: Path, error: BaseException) -> CheckpointError:
    return CheckpointError(
        f"{path} could not be read as a PyTorch checkpoint: the file is damaged or truncated "
        f"(an interrupted download?): {type(error).__name__}: {_first_line(error)}"
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _unwrap_state_dict(loaded: object, path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Find the {name: tensor} dict inside a loaded checkpoint; return it and the skipped names."""
    if not isinstance(loaded, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(loaded).__name__}, not a dict of tensors (a state dict)"
        )
    current, prefix, skipped = loaded, "", []
    while True:
        wrapper = next((w for w in STATE_DICT_WRAPPERS if isinstance(current.get(w), Mapping)), None)
        if wrapper is None:
            break
        skipped += [f"{prefix}{name}" for name in current if name != wrapper]
        current, prefix = current[wrapper], f"{prefix}{wrapper}."
    tensors = {}
    for name, value in current.items():
        if isinstance(name, str) and isinstance(value, torch.Tensor):
            tensors[name] = value
        else:
            skipped.append(f"{prefix}{name}")
    if not tensors:
        found = ", ".join(map(repr, list(loaded)[:10])) or "nothing"
        raise CheckpointError(f"{path} contains no tensors (its top level holds {found})")
    return tensors, skipped
