"""Where a component waits between its uses (DESIGN.md, Memory: "the denoiser stays resident, the
text encoder and the VAE are loaded for their one use and released").

On CUDA the `balanced` and `low` plans keep the UNet on the device and *park* the VAE in pinned
host memory: the loader puts its weights there (they never touch the device at load), and
`HostParking.use(...)` copies the half that runs (the decoder, or the encoder) to the device for
one use and drops the device copies after, so the UNet's steps never share the device with it.
(The text encoders are streamed layer by layer instead, memory/streaming.py: SDXL's two take
1.5 GiB, too much to bring whole beside a resident UNet.) For SD1.5 in fp16 the decoder is 95 MiB,
copied in ~4 ms per image from pinned memory.

The host tensors are never changed (inference only), so releasing is dropping a reference, not
copying back; the copies are enqueued on the compute stream, so no event is needed.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

def _slots(module: nn.Module) -> Iterator[tuple[nn.Module, str, bool]]:
    """Every (owner, attribute, is_parameter) holding a tensor of `module`."""
    for owner in module.modules():
        for name, value in owner._parameters.items():
            if value is not None:
                yield owner, name, True
        for name, value in owner._buffers.items():
            if value is not None:
                yield owner, name, False


class HostParking:
    """Modules kept in (pinned) host memory, brought to `device` only inside `use(...)`."""

    def __init__(self, device: torch.device | str, modules: list[nn.Module]):
        self.device = torch.device(device)
        self.modules = list(modules)
        self._parked_ids = {id(sub) for module in self.modules for sub in module.modules()}
        for module in self.modules:
            for owner, name, is_parameter in _slots(module):
                value = (owner._parameters if is_parameter else owner._buffers)[name]
                if value.device.type != "cpu":
                    raise ValueError(f"HostParking takes modules whose weights are on the host; {name} is on "
                                     f"{value.device} (load them with host_components=...)")
                if self.device.type == "cuda" and not value.is_pinned():
                    value = value.pin_memory()  # async copies, and ~2x the pageable bandwidth
                self._set(owner, name, is_parameter, value)

    @staticmethod
    def _set(owner: nn.Module, name: str, is_parameter: bool, value: torch.Tensor) -> None:
        if is_parameter:
            owner._parameters[name] = nn.Parameter(value, requires_grad=False)
        else:
            owner._buffers[name] = value

    @contextmanager
    def use(self, *modules: nn.Module) -> Iterator[None]:
        """`modules` (parked ones or parts of them, e.g. the VAE's decoder; others pass through
        untouched) on the device for the block."""
        parked = [m for m in modules if id(m) in self._parked_ids]
        moved: list[tuple[nn.Module, str, bool, torch.Tensor]] = []
        try:
            for module in parked:
                for owner, name, is_parameter in _slots(module):
                    host = (owner._parameters if is_parameter else owner._buffers)[name]
                    if host.device.type != "cpu":
                        continue  # already brought by an enclosing use()
                    moved.append((owner, name, is_parameter, host))
                    self._set(owner, name, is_parameter, host.to(self.device, non_blocking=True))
            yield
        finally:
            for owner, name, is_parameter, host in moved:
                self._set(owner, name, is_parameter, host)

    def parked_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for m in self.modules for t in [*m.parameters(), *m.buffers()])
