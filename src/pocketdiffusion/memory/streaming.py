"""Weight streaming, block by block: the "minimal" memory mode (DESIGN.md, Memory).

The big weights stay out of the models. Each *group* (a big UNet layer: a ResBlock's conv,
embedding or skip, a transformer block's attention or feed-forward, nested in the group of its
block's norms and projections; a CLIP layer; a VAE ResnetBlock, attention or resampler) gets its
weights just before it runs and gives them back just after, so only one group's weights (two on
CUDA: the next one is on its way) are live at a time, beside the groups it nests in. The small layers around them (the UNet's time embedding and
output, CLIP's position embedding and final norm, the VAE's in/out convs) stay resident: they are
few bytes. CLIP's token embedding is big (49408 rows) but a prompt reads 77 of its rows: those rows
alone are read on each call (`RowGather`; from the file on the CPU, from host memory on CUDA). A placeholder keeps the
dtype and device that `next(model.parameters())` (how the pipelines find them) reports.

Where a group's weights come from (a *transport*):
- CPU, `MmapTransport`: the memory-mapped weight file itself. A weight stored in the run dtype is
  a zero-copy view of the file; after the group its pages are dropped from the process
  (MADV_DONTNEED) and come back from the page cache next time; the next group's pages are read
  ahead (MADV_WILLNEED) while the current one runs.
- CUDA, `HostTransport`: pinned CPU memory filled once at load. While group n runs, a side
  stream copies group n+1 to the GPU; the compute stream waits on that copy's event only when
  group n+1 starts (diffusers' hooks/group_offloading.py with `use_stream=True`, per block).

Which group comes next is learned, not assumed: the streamer records, within one call of a root
model, which group followed which, and prefetches that successor from the next call on. A wrong
guess (clip skip stops the text encoder early, a VAE runs another tile size) costs only the
wasted prefetch: a group that was not prefetched is fetched on the spot. Results never depend on
the schedule, only on the values, which are read by the same code as a resident load.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..checkpoints.stream import StreamedWeights

# A streamed weight's group: the prefix of its target name that names the group's module.
# The most specific rule first. The UNet's big layers are groups of their own: a ResBlock's convs,
# its embedding projection and its skip conv, a transformer block's two attentions and its
# feed-forward; each nests in the group of its block's norms (and a transformer block's in its
# transformer's, with the norm and projections). Two groups are on the device at a time on CUDA
# (the next one is prefetched): with whole blocks as groups that was two of SD1.5's 2560->1280
# ResBlocks, ~190 MiB, most of the minimal mode's peak; with layers, at most two convs (~85 MiB).
_UNET_BLOCK = r"^unet\.(input_blocks\.\d+\.\d+|middle_block\.\d+|output_blocks\.\d+\.\d+)\."
GROUP_RULES = (
    re.compile(_UNET_BLOCK + r"transformer_blocks\.\d+\.(attn1|attn2|ff)\."),
    re.compile(_UNET_BLOCK + r"(in_layers\.2|emb_layers\.1|out_layers\.3|skip_connection)\."),
    re.compile(_UNET_BLOCK + r"transformer_blocks\.\d+\."),
    re.compile(_UNET_BLOCK),
    re.compile(r"^text_encoders\.\d+\.text_model\.encoder\.layers\.\d+\."),
    re.compile(r"^vae\.(encoder|decoder)\.((down|up)\.\d+\.(block\.\d+|downsample|upsample)|mid\.\w+)\."),
)
# Weights that are neither resident nor streamed whole: a text encoder's token embedding, of which
# a prompt needs 77 rows, read from the mapped file on each call (`RowGather`). Resident, CLIP-L's
# table was 145 MiB in fp32, a third of minimal's predicted peak at SD1.5 512x512 on the CPU.
GATHERED = re.compile(r"^text_encoders\.\d+\.text_model\.embeddings\.token_embedding\.weight$")
# The modules whose one call is one pass over their groups (and so one learned order).
ROOTS = ("unet", "text_encoders.*", "vae.encoder", "vae.decoder")


def stream_group(target: str) -> str | None:
    """The group of a weight ("unet.input_blocks.1.0.in_layers.2.weight" -> "unet.input_blocks.1.0"),
    or None for a weight that stays resident."""
    for rule in GROUP_RULES:
        match = rule.match(target)
        if match:
            return match.group(0)[:-1]
    return None


def gathers_rows(target: str) -> bool:
    """Whether the minimal mode reads only the needed rows of `target`, on each call."""
    return GATHERED.match(target) is not None


class RowGather:
    """An embedding whose table stays off the device (in the mapped file on the CPU, in host memory
    on CUDA): before each call, the rows its ids name are read (`read_rows(target, rows)`) and
    the ids renumbered into them; after it, the placeholder is back. `F.embedding` copies rows,
    so picking row `inverse[i]` of the gathered rows gives the very values of row `ids[i]`."""

    def __init__(self, owner: nn.Module, attribute: str, target: str, read_rows):
        self.owner, self.attribute, self.target, self.read_rows = owner, attribute, target, read_rows
        self.placeholder = owner._parameters[attribute]
        owner.register_forward_pre_hook(self._enter)
        owner.register_forward_hook(self._exit)

    def _enter(self, _module: nn.Module, args: tuple) -> tuple:
        ids, *rest = args
        rows, inverse = torch.unique(ids, return_inverse=True)
        self.owner._parameters[self.attribute] = nn.Parameter(self.read_rows(self.target, rows),
                                                              requires_grad=False)
        return (inverse, *rest)

    def _exit(self, _module: nn.Module, _args: tuple, _output: torch.Tensor) -> None:
        self.owner._parameters[self.attribute] = self.placeholder


@dataclass
class Group:
    """One streamed module and the weights it needs while it runs."""

    name: str
    slots: list[tuple[nn.Module, str, str]] = field(default_factory=list)  # (owner, attribute, target)
    placeholder: dict[str, torch.Tensor] = field(default_factory=dict)  # target -> its empty stand-in

    @property
    def targets(self) -> list[str]:
        return [target for _, _, target in self.slots]

    def put(self, tensors: dict[str, torch.Tensor]) -> None:
        for owner, attribute, target in self.slots:
            owner._parameters[attribute] = nn.Parameter(tensors[target], requires_grad=False)

    def clear(self) -> None:
        for owner, attribute, target in self.slots:
            owner._parameters[attribute] = self.placeholder[target]


class MmapTransport:
    """CPU: a group's weights are read from the mapped file when it starts, dropped when it ends."""

    def __init__(self, weights: StreamedWeights):
        self.weights = weights

    def start(self, group: Group) -> None:
        self.weights.prefetch(group.targets)  # a hint: the pages go to the page cache, not to RSS

    def finish(self, group: Group, handle: Any) -> dict[str, torch.Tensor]:
        return self.weights.read(group.targets)

    def release(self, group: Group) -> None:
        self.weights.release(group.targets)


class HostTransport:
    """A group's weights are copied from CPU memory (pinned, on CUDA) to the device when it runs.

    Each group's weights sit packed in a few host buffers (`Pack`), so a group is a few copies,
    not one per tensor: SD1.5's UNet has ~690 tensors, and as many small copies a step left the
    minimal mode's copies at ~34 GB/s. On CUDA the copy runs on a side stream: `start` enqueues it
    and records an event, `finish` makes the compute stream wait for that event. Elsewhere (the
    CPU, tests) it copies synchronously."""

    def __init__(self, packs: dict[str, "Pack"], device: torch.device):
        self.packs, self.device = packs, device
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def start(self, group: Group) -> tuple[dict[str, torch.Tensor], Any]:
        pack = self.packs[group.name]
        if self.copy_stream is None:
            return pack.views([b.to(self.device, copy=True) for b in pack.buffers]), None
        # The device buffer comes from the compute stream's pool, not the copy stream's: the caching
        # allocator keeps a pool per stream, and buffers born on the side stream and freed on the
        # compute one left the minimal mode's reserved peak at 3x its allocated peak (948 vs 313 MiB,
        # SD1.5 512x512, docs/BENCHMARKS.md). A buffer may be memory the compute stream freed
        # moments ago and still reads in queued kernels, so the copy waits for the compute stream's
        # work queued so far: that is group n-1's, while the copy overlaps group n.
        compute = torch.cuda.current_stream(self.device)
        buffers = [torch.empty_like(b, device=self.device) for b in pack.buffers]
        self.copy_stream.wait_stream(compute)
        with torch.cuda.stream(self.copy_stream):
            for buffer, host in zip(buffers, pack.buffers):
                buffer.copy_(host, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.copy_stream)
        return pack.views(buffers), copied

    def finish(self, group: Group, handle: Any) -> dict[str, torch.Tensor]:
        tensors, copied = handle if handle is not None else self.start(group)
        if copied is not None:
            torch.cuda.current_stream(self.device).wait_event(copied)
        return tensors

    def release(self, group: Group) -> None:
        """Nothing to give back here: the device copy is freed with its last view (Group.clear
        drops them), and the pinned host pack stays for the next pass."""


PACK_ALIGN = 256  # bytes: every tensor of a pack starts on a boundary fit for vectorized loads
# Small tensors share fixed-size chunks; a tensor larger than a chunk gets a buffer of its own.
# One size class for the shared chunks keeps the allocator's reserve close to what is live: with
# one buffer per group (7-95 MiB each) the minimal mode reserved 392 MiB for 313 allocated.
PACK_CHUNK = 8 * 2 ** 20
PACK_STEP = 2 * 2 ** 20
PACK_SMALL = 2 ** 20  # the CUDA caching allocator's small-block limit


def _chunk_bytes(size: int) -> int:
    """A pack buffer's size for `size` bytes of tensors: a big tensor's own; a group's last, partly
    filled chunk only as large as needed, in the CUDA allocator's 2 MiB steps; a small group's
    (a block's norms: a few KiB) in 512-byte steps, so that it comes from the allocator's pool of
    small blocks instead of taking 2 MiB."""
    if size > PACK_CHUNK:
        return size
    if size <= PACK_SMALL:
        return -(-size // 512) * 512
    return min(PACK_CHUNK, -(-size // PACK_STEP) * PACK_STEP)


def pack_layout(nbytes: list[int]) -> tuple[list[tuple[int, int]], list[int]]:
    """Where tensors of these byte sizes go in a pack: ((buffer index, offset) of each, the bytes
    used in each buffer). Small tensors share PACK_CHUNK chunks, aligned; a bigger one is alone."""
    places, sizes, used = [], [], None  # used: the index of the chunk being filled
    for size in nbytes:
        if size > PACK_CHUNK:
            places.append((len(sizes), 0))
            sizes.append(size)
            continue
        offset = -(-sizes[used] // PACK_ALIGN) * PACK_ALIGN if used is not None else PACK_CHUNK
        if offset + size > PACK_CHUNK:
            used, offset = len(sizes), 0
            sizes.append(0)
        places.append((used, offset))
        sizes[used] = offset + size
    return places, sizes


def packed_bytes(nbytes: list[int]) -> int:
    """The device bytes of one group's pack (its buffers as allocated): the planner's figure."""
    return sum(_chunk_bytes(size) for size in pack_layout(nbytes)[1])


@dataclass
class Pack:
    """A group's weights in a few byte buffers: target -> (buffer index, offset, dtype, shape)."""

    buffers: list[torch.Tensor]  # uint8: PACK_CHUNK bytes each, or one big tensor's exact size
    layout: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]]

    def views(self, buffers: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors inside `buffers` (this pack's bytes, on any device)."""
        out = {}
        for target, (index, offset, dtype, shape) in self.layout.items():
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            out[target] = buffers[index][offset:offset + nbytes].view(dtype).view(shape)
        return out

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor], pin: bool) -> "Pack":
        places, sizes = pack_layout([t.numel() * t.element_size() for t in tensors.values()])
        layout = {target: (index, offset, tensor.dtype, tuple(tensor.shape))
                  for (target, tensor), (index, offset) in zip(tensors.items(), places)}
        buffers = [torch.empty(_chunk_bytes(size), dtype=torch.uint8, pin_memory=pin) for size in sizes]
        pack = cls(buffers, layout)
        for target, view in pack.views(buffers).items():
            view.copy_(tensors[target])
        return pack


class Streamer:
    """Forward hooks that fetch each group's weights before it runs and drop them after, and
    prefetch the group that followed it last time."""

    def __init__(self, groups: dict[str, Group], roots: list[nn.Module], modules: dict[str, nn.Module],
                 transport: MmapTransport | HostTransport):
        self.groups, self.transport = groups, transport
        self.successor: dict[str, str] = {}
        self.previous: str | None = None
        self.loaded: set[str] = set()
        self.pending: dict[str, Any] = {}  # group name -> the transport's handle of its prefetch
        self.fetched: list[str] = []  # every group fetched, in order (for tests and the planner)
        for name, group in groups.items():
            module = modules[name]
            module.register_forward_pre_hook(lambda _m, _a, group=group: self._enter(group))
            module.register_forward_hook(lambda _m, _a, _o, group=group: self._exit(group))
        for root in roots:
            # A pass starts and ends clean: nothing loaded or in flight is carried over (nor is what
            # an exception in the middle of the last pass left behind).
            root.register_forward_pre_hook(lambda _m, _a: self.reset())
            root.register_forward_hook(lambda _m, _a, _o: self.reset())

    def _enter(self, group: Group) -> None:
        if self.previous is not None and self.previous != group.name:
            self.successor[self.previous] = group.name
        self.previous = group.name
        if group.name not in self.loaded:
            handle = self.pending.pop(group.name, None)
            group.put(self.transport.finish(group, handle))
            self.loaded.add(group.name)
            self.fetched.append(group.name)
        following = self.successor.get(group.name)
        if following is not None and following not in self.loaded and following not in self.pending:
            self.pending[following] = self.transport.start(self.groups[following])

    def _exit(self, group: Group) -> None:
        group.clear()  # drops the last reference to the group's weights
        self.loaded.discard(group.name)
        self.transport.release(group)

    def reset(self) -> None:
        for name in list(self.loaded):
            self._exit(self.groups[name])
        self.pending.clear()
        self.previous = None


class BlockStreaming:
    """The "minimal" mode's policy for `checkpoints.load(..., streaming=...)`: which weights
    stream (`stream_group`) and, once loaded, the hooks and transport for `device`."""

    def __init__(self, device: torch.device | str, from_host: bool | None = None,
                 components: tuple[str, ...] | None = None):
        self.device = torch.device(device)
        # Which components stream (None: all; CUDA's balanced plan streams only the text encoders).
        self.components = components
        # Where the weights wait: host memory (CUDA's way; also on the CPU for tests of that
        # path), or the mapped file (the CPU's way). None: as the device goes.
        self.from_host = self.device.type != "cpu" if from_host is None else from_host
        self.streamer: Streamer | None = None
        self.gathers: list[RowGather] = []

    def streams(self, target: str) -> bool:
        if self.components is not None and target.split(".", 1)[0] not in self.components:
            return False
        return stream_group(target) is not None or gathers_rows(target)

    def install(self, models: dict[str, nn.Module], weights: StreamedWeights) -> None:
        modules = {f"{component}.{name}" if name else component: module
                   for component, model in models.items() for name, module in model.named_modules()}
        groups: dict[str, Group] = {}
        gathered: list[tuple[nn.Module, str, str]] = []
        for target in weights.targets:
            name = stream_group(target)
            owner_name, _, attribute = target.rpartition(".")
            owner = modules[owner_name]
            if name is None:  # a gathered embedding (`streams`)
                gathered.append((owner, attribute, target))
                continue
            group = groups.setdefault(name, Group(name))
            group.slots.append((owner, attribute, target))
            group.placeholder[target] = owner._parameters[attribute]
        roots = [module for name, module in modules.items()
                 if any(re.fullmatch(pattern.replace(".", r"\.").replace("*", r"\d+"), name) for pattern in ROOTS)
                 and (self.components is None or name.split(".", 1)[0] in self.components)]
        if not self.from_host:
            transport: MmapTransport | HostTransport = MmapTransport(weights)
            read_rows = weights.read_rows
        else:
            tables = {target: weights.read([target])[target].clone() for _, _, target in gathered}
            transport = HostTransport(pack_groups(weights, groups, pin=self.device.type == "cuda"), self.device)

            def read_rows(target: str, rows: torch.Tensor) -> torch.Tensor:
                return tables[target][rows.cpu()].to(self.device)
        self.gathers = [RowGather(owner, attribute, target, read_rows) for owner, attribute, target in gathered]
        self.streamer = Streamer(groups, roots, modules, transport)


def pack_groups(weights: StreamedWeights, groups: dict[str, Group], pin: bool) -> dict[str, Pack]:
    """Every group's weights packed in (pinned) host buffers, read group by group so that the
    file's pages never pile up; the files are closed after."""
    packs = {}
    for group in groups.values():
        packs[group.name] = Pack.of(weights.read(group.targets), pin)
        weights.release(group.targets)
    weights.close()  # everything streamed or gathered is in host memory now
    return packs
