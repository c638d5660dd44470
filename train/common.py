"""What the three training stages share: device and precision policy, the synthetic data stream,
wall-clock budgets, the learning-rate schedule, the EMA, the training loop and checkpoints.

GPU efficiency rules followed here: data is drawn in DataLoader worker processes (scenes, token
ids, masks, all small) and rendered on the GPU; copies to the GPU are from pinned memory and
non-blocking; the loop never reads a GPU value on the host except when it logs (every
`log_every` steps) or saves a checkpoint, so the host runs ahead of the GPU.
"""
from __future__ import annotations

import copy
import functools
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pocketdiffusion.data import shapes
from pocketdiffusion.models.tokenizer import EOS_TOKEN, CLIPTokenizer

CONTEXT_LENGTH = 77  # CLIP's token window; captions are padded to it with end-of-text


@dataclass(frozen=True)
class Settings:
    """How a run executes (not what it learns): device, image size, data workers, logging."""

    device: torch.device
    size: int = 128                  # image side in pixels (SHAPES is native 128)
    seed: int = 0
    workers: int = 0                 # DataLoader worker processes; 0 = draw data in this process
    log_every: int = 100             # steps between loss reports (each one reads the GPU)
    max_steps: int | None = None     # a cap per stage on top of the wall clock (tests)
    ckpt_every_seconds: float = 120.0
    channels_last: bool = False      # NHWC convolutions for the VAE (CUDA only)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def setup_backends(device: torch.device) -> None:
    """TF32 for the fp32 matmuls/convs left outside autocast; cuDNN autotuning (fixed shapes)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def autocast(settings: Settings):
    """bf16 autocast on CUDA (no loss scaling needed); plain fp32 on the CPU."""
    return torch.autocast(device_type=settings.device.type, dtype=torch.bfloat16, enabled=settings.cuda)


@functools.lru_cache(maxsize=1)
def shapes_tokenizer() -> CLIPTokenizer:
    """The BPE tokenizer of the shapes captions (1024 entries, end-of-text = 1023), padding with
    end-of-text to 77 tokens as SD1's CLIP does. Built once per process (workers inherit it)."""
    from pocketdiffusion.data.vocab import build_shapes_vocab

    vocab, merges = build_shapes_vocab()
    return CLIPTokenizer(vocab, merges, pad_token=EOS_TOKEN, context_length=CONTEXT_LENGTH)


# ---- data ----------------------------------------------------------------------------------------

@dataclass
class SceneBatch:
    """One batch drawn on the CPU: the scenes packed as small tensors (what `render_on_device`
    needs), the captions' token ids and the inpainting masks. Moves to the GPU in one go."""

    background: torch.Tensor            # (B, 3) float32 RGB 0..255
    color: torch.Tensor                 # (B, slots, 3) float32 RGB of each object slot
    geometry: torch.Tensor              # (B, slots, 3) float32: centre x, centre y, half extent
    shape_rows: list[torch.Tensor]      # per shape in shapes.SHAPES: (N,) batch index of its objects
    shape_cols: list[torch.Tensor]      # ... and their slot index
    tokens: torch.Tensor | None = None  # (B, 77) int64
    masks: torch.Tensor | None = None   # (B, H, W) uint8, 255 = repaint

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "SceneBatch":
        return SceneBatch(fn(self.background), fn(self.color), fn(self.geometry),
                          [fn(t) for t in self.shape_rows], [fn(t) for t in self.shape_cols],
                          None if self.tokens is None else fn(self.tokens),
                          None if self.masks is None else fn(self.masks))

    def pin_memory(self) -> "SceneBatch":  # called by DataLoader(pin_memory=True)
        return self._map(lambda t: t.pin_memory())

    def to(self, device: torch.device) -> "SceneBatch":
        return self._map(lambda t: t.to(device, non_blocking=True))

    def __len__(self) -> int:
        return self.background.shape[0]


def pack_scenes(scenes: list[shapes.Scene]) -> SceneBatch:
    """Scenes -> the tensors of `shapes.render_batch`'s preamble, built on the CPU (in a worker)."""
    slots = max(len(s.objects) for s in scenes)
    batch = len(scenes)
    geometry = torch.zeros((batch, slots, 3), dtype=torch.float64)  # float64 then float32, as render_batch
    color = torch.zeros((batch, slots, 3), dtype=torch.float32)
    rows: list[list[int]] = [[] for _ in shapes.SHAPES]
    cols: list[list[int]] = [[] for _ in shapes.SHAPES]
    for b, scene in enumerate(scenes):
        for k, obj in enumerate(scene.objects):
            index = shapes.SHAPES.index(obj.shape)
            rows[index].append(b)
            cols[index].append(k)
            geometry[b, k] = torch.tensor([obj.x, obj.y, obj.extent / 2], dtype=torch.float64)
            color[b, k] = torch.tensor(shapes.COLORS[obj.color], dtype=torch.float32)
    background = torch.tensor([shapes.COLORS[s.background] for s in scenes], dtype=torch.float32)
    return SceneBatch(background, color, geometry.to(torch.float32),
                      [torch.tensor(r, dtype=torch.long) for r in rows],
                      [torch.tensor(c, dtype=torch.long) for c in cols])


def render_on_device(batch: SceneBatch, size: int) -> torch.Tensor:
    """`shapes.render_batch` on tensors already on the device: the same arithmetic, hence the same
    pixels, but no host sync (render_batch finds each shape's objects with `torch.nonzero` and
    copies its inputs with blocking transfers, each a GPU sync). (B, 3, size, size) in [-1, 1]."""
    device, count, slots = batch.background.device, len(batch), batch.color.shape[1]
    pixels = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    alpha = torch.zeros((count, slots, size, size), device=device)  # (B, slots, H, W)
    for index, name in enumerate(shapes.SHAPES):
        rows, cols = batch.shape_rows[index], batch.shape_cols[index]
        if rows.numel() == 0:  # the count is known on the host: no sync
            continue
        x, y, half = batch.geometry[rows, cols].unbind(-1)  # (N,) each
        u = (pixels[None, None, :] - x[:, None, None]) / half[:, None, None]  # (N, 1, W)
        v = (pixels[None, :, None] - y[:, None, None]) / half[:, None, None]  # (N, H, 1)
        distance = shapes.SHAPE_SDFS[name](u, v, shapes.TORCH_MATH)  # (N, H, W), shape units
        alpha[rows, cols] = shapes.coverage(distance, (half * size)[:, None, None], shapes.TORCH_MATH)
    canvas = batch.background[:, :, None, None].expand(count, 3, size, size)  # (B, 3, H, W)
    for k in range(slots):
        a = alpha[:, k, None]  # (B, 1, H, W)
        canvas = canvas * (1 - a) + batch.color[:, k, :, None, None] * a
    return canvas.round().clamp(0, 255) / 127.5 - 1.0


def masks_on_device(batch: SceneBatch) -> torch.Tensor:
    """(B, 1, H, W) float: 1 = repaint, binarised at half as the pipelines binarise masks."""
    assert batch.masks is not None, "this batch was drawn without masks"
    return (batch.masks >= 128).to(torch.float32)[:, None]


class ShapesStream(IterableDataset):
    """An endless stream of SceneBatches. Each worker draws from its own numpy generator seeded
    with (seed, stream id, worker id), so runs are reproducible for a given worker count."""

    def __init__(self, batch_size: int, seed: int, stream: int, *, size: int = 128, captions: bool = False,
                 caption_dropout: float = 0.0, masks: bool = False, full_mask_fraction: float = 0.0):
        super().__init__()
        self.batch_size, self.seed, self.stream, self.size = batch_size, seed, stream, size
        self.captions, self.caption_dropout = captions, caption_dropout
        self.masks, self.full_mask_fraction = masks, full_mask_fraction

    def __iter__(self) -> Iterator[SceneBatch]:
        worker = get_worker_info()
        rng = np.random.default_rng([self.seed, self.stream, worker.id if worker is not None else 0])
        while True:
            yield self.draw(rng)

    def draw(self, rng: np.random.Generator) -> SceneBatch:
        scenes = [shapes.sample_scene(rng) for _ in range(self.batch_size)]
        batch = pack_scenes(scenes)
        if self.captions:
            # Caption dropout to "" is what classifier-free guidance's unconditional branch reads.
            texts = ["" if rng.random() < self.caption_dropout else shapes.caption(scene, rng) for scene in scenes]
            batch.tokens = shapes_tokenizer()(texts)
        if self.masks:
            full = np.full((self.size, self.size), 255, dtype=np.uint8)
            batch.masks = torch.from_numpy(np.stack([
                full if rng.random() < self.full_mask_fraction else shapes.random_mask(rng, self.size)
                for _ in range(self.batch_size)]))
        return batch


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # many workers share the cores; numpy/torch threads would fight


def stream_batches(stream: ShapesStream, settings: Settings) -> Iterator[SceneBatch]:
    """SceneBatches on the device: from `settings.workers` processes (pinned) or drawn in-process."""
    if stream.captions:
        shapes_tokenizer()  # build it here (a few seconds) so that forked workers inherit it
    if settings.workers == 0:
        return (batch.to(settings.device) for batch in stream)
    loader = DataLoader(stream, batch_size=None, num_workers=settings.workers, pin_memory=settings.cuda,
                        prefetch_factor=4, worker_init_fn=_worker_init)
    return (batch.to(settings.device) for batch in loader)


def fixed_batch(batch_size: int, seed: int, stream: int, settings: Settings, **options) -> SceneBatch:
    """One reproducible batch (evaluation, latent statistics), drawn in this process."""
    generator = ShapesStream(batch_size, seed, stream, size=settings.size, **options)
    return generator.draw(np.random.default_rng([seed, stream, 10_000])).to(settings.device)


# ---- schedule, budget, EMA -----------------------------------------------------------------------

@dataclass(frozen=True)
class LRSchedule:
    """Linear warm-up over `warmup_steps`, then cosine to zero over the stage's wall-clock budget
    (the number of steps a budget buys is not known in advance)."""

    peak: float
    warmup_steps: int

    def at(self, steps_in_cycle: int, progress: float) -> float:
        warm = min(1.0, (steps_in_cycle + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        return self.peak * warm * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


class Budget:
    """A stage's allowance: `seconds` more of wall-clock training on top of `spent` seconds already
    done in this cycle (a resumed run), and optionally at most `max_steps` steps in this run."""

    def __init__(self, seconds: float, *, spent: float = 0.0, max_steps: int | None = None):
        if seconds < 0 or spent < 0:
            raise ValueError(f"a budget needs seconds >= 0 and spent >= 0, got {seconds}, {spent}")
        self.seconds, self.spent, self.max_steps = seconds, spent, max_steps
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def progress(self, steps: int) -> float:
        """Fraction of the cycle done: by the clock, or by steps under a step cap."""
        by_time = (self.spent + self.elapsed()) / max(self.spent + self.seconds, 1e-9)
        if self.max_steps is not None:
            return max(by_time, steps / max(self.max_steps, 1))
        return by_time

    def exhausted(self, steps: int) -> bool:
        if self.max_steps is not None and steps >= self.max_steps:
            return True
        return steps > 0 and self.elapsed() >= self.seconds  # at least one step, always


class EMA:
    """An exponential moving average of a module's parameters, in a frozen copy of the module.
    The decay ramps up as (1 + step) / (10 + step) to `decay` (diffusers' EMAModel warm-up), so a
    short run is not dominated by its random initialisation."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._source = [p for p in model.parameters()]
        self._target = [p for p in self.model.parameters()]

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self._target, [p.detach() for p in self._source], 1.0 - decay)


# ---- the loop ------------------------------------------------------------------------------------

@dataclass
class LoopState:
    """What a checkpoint needs to continue a stage."""

    step: int = 0                # optimizer steps taken in total
    cycle_start: int = 0         # step at which the current LR cycle began (warm-up restarts there)
    seconds: float = 0.0         # training seconds spent in the current cycle
    done: bool = False           # the cycle ran to the end of its budget
    history: list[dict] = field(default_factory=list)  # the loss reports


def run_loop(stage: str, *, state: LoopState, seconds: float, hyper, optimizer: torch.optim.Optimizer,
             loss_fn: Callable[[SceneBatch], torch.Tensor], batches: Iterator[SceneBatch], settings: Settings,
             ema: EMA | None = None, save: Callable[[], None] | None = None) -> None:
    """Train for `seconds` more of wall clock (on top of `state.seconds` already spent): set the LR,
    loss, backward, clip, step, EMA; report the mean loss and throughput every
    `settings.log_every` steps; save every `ckpt_every_seconds`. `hyper`: the stage's
    hyperparameters (batch_size, lr, warmup_steps, grad_clip; every stage's Hyper has them)."""
    budget = Budget(seconds, spent=state.seconds, max_steps=settings.max_steps)
    schedule = LRSchedule(hyper.lr, hyper.warmup_steps)
    batch_size, grad_clip = hyper.batch_size, hyper.grad_clip
    params = [p for group in optimizer.param_groups for p in group["params"]]
    loss_sum = torch.zeros((), device=settings.device)
    since_report, report_time, last_save = 0, time.monotonic(), time.monotonic()

    def report() -> None:
        nonlocal since_report, report_time
        now = time.monotonic()
        mean = loss_sum.item() / since_report  # the one host sync
        rate = since_report * batch_size / max(now - report_time, 1e-9)
        state.seconds = budget.spent + budget.elapsed()
        state.history.append({"step": state.step, "loss": round(mean, 6), "img_per_s": round(rate, 1),
                              "lr": optimizer.param_groups[0]["lr"], "seconds": round(state.seconds, 1)})
        print(f"[{stage}] step {state.step:6d}  loss {mean:.5f}  {rate:8.1f} img/s  "
              f"lr {optimizer.param_groups[0]['lr']:.2e}  {state.seconds:6.1f}s", flush=True)
        loss_sum.zero_()
        since_report, report_time = 0, now

    steps_this_run = 0
    while not budget.exhausted(steps_this_run):
        lr = schedule.at(state.step - state.cycle_start, budget.progress(steps_this_run))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = loss_fn(next(batches))
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)  # no sync: norm stays on GPU
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        steps_this_run += 1
        if ema is not None:
            ema.update(state.step)
        loss_sum += loss.detach()
        since_report += 1
        if since_report >= settings.log_every:
            report()
        if save is not None and time.monotonic() - last_save >= settings.ckpt_every_seconds:
            state.seconds = budget.spent + budget.elapsed()
            save()
            last_save = time.monotonic()
    if since_report:
        report()
    state.seconds = budget.spent + budget.elapsed()
    state.done = True


def make_optimizer(params, lr: float, settings: Settings, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW; the fused CUDA kernel on the GPU (one launch for all parameters)."""
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay,
                             fused=settings.cuda or None)


# ---- checkpoints ---------------------------------------------------------------------------------

def save_checkpoint(path: Path, payload: dict) -> None:
    """torch.save to a side file, then rename: a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path | None) -> dict | None:
    """A checkpoint written by save_checkpoint, or None when there is none. Tensors only
    (weights_only): a checkpoint cannot run code."""
    if path is None or not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which and why
        raise ValueError(f"{path} is not a readable training checkpoint: {error}") from None


def stage_payload(models: nn.Module, optimizer: torch.optim.Optimizer, state: LoopState,
                  ema: EMA | None = None, **metrics) -> dict:
    """fp32 state dicts (models, EMA, optimizer), the loop state and the stage's metrics."""
    return {"models": {k: v.detach().cpu() for k, v in models.state_dict().items()},
            "ema": None if ema is None else {k: v.detach().cpu() for k, v in ema.model.state_dict().items()},
            "optimizer": optimizer.state_dict(), "state": asdict(state), "metrics": metrics}


def stage_record(state: LoopState, **metrics) -> dict:
    """A stage's entry in train_log.json."""
    return {"steps": state.step, "seconds": round(state.seconds, 1), "losses": state.history, **metrics}


def restore_state(payload: dict | None, extend: bool) -> LoopState:
    """The loop state of a checkpoint; with `extend`, a finished cycle restarts (new budget, warm-up)."""
    if payload is None:
        return LoopState()
    state = LoopState(**payload["state"])
    if extend and state.done:
        state.done, state.seconds, state.cycle_start = False, 0.0, state.step
    return state
