"""CUDA graphs around the model call: the eager SD UNet is host-bound on a fast GPU (launching
one SD1.5 call at 512x512 takes the CPU ~19 ms while its kernels run ~13 ms, docs/BENCHMARKS.md),
so every step waits on Python. A captured graph replays all of a call's ~1000 kernel launches
with one host call, and the sampler's own host work then runs while the GPU computes.

`GraphedModel(model)` is a drop-in for the sampling contract `model(x_in, t, **cond)`: the first
call with a new signature (shapes and dtypes of every tensor argument, values of the others)
warms the model up on a side stream (cuDNN autotuning, lazily built tables) and captures it;
later calls copy their tensors into the graph's static inputs and replay. Graphs are kept per
signature (a few, least recently used first out) in one shared memory pool, so a new
resolution captures once and repeated generations reuse the graph, including new prompts:
the conditioning tensors are inputs too, not constants baked into the graph.

Two lifetimes (`per_run`):
- False (`fast`, compiled): two calls on a side stream (they compile), then the capture; the
  graphs stay for the next runs, so their pool keeps the UNet's activations reserved between
  generations (fast's memory, memory/estimate.py).
- True (balanced/low on CUDA, eager): a signature's first call ever runs eagerly on the current
  stream and returns its real output (the warm-up costs no extra call), the allocator's cache is
  emptied (else the capture's pool would stack on the eager call's cached blocks), and the second
  call captures. The pipeline calls `end_run()` after the denoising loop, which releases them, so
  the decoder gets the pool's memory back: these plans keep their eager peak, and each later
  generation captures anew at its first step (about one eager call's host time).

The decode borrows the kept graphs' pool (`lend_pool()`, fast): between replays the pool's blocks
hold nothing anyone reads (the graphs' activations live only inside a replay), so the eager
decode after the steps allocates from them instead of growing the general pool beside them
(SD1.5 fast: the graphs keep ~148 MiB, the decode needs ~500).

Requirements (the plans guarantee them): CUDA tensors, weights that stay where they are (no
offloading or streaming: a graph holds raw device pointers), no host syncs inside the model.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch

MAX_GRAPHS = 4        # signatures kept (a resolution and a CFG layout each); older ones are freed
WARMUP_CALLS = 2      # eager calls before capture: cuDNN picks its algorithms, caches fill


def clear_cublas_workspaces() -> None:
    """Free the cuBLAS workspaces PyTorch keeps per (handle, stream): measured on the H100, balanced's
    per-generation graphs left the capture stream's 32 MiB allocated after their release (1866 MiB
    allocated in the decode against 1834 eager). A private binding: without it, nothing is freed."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()


class _Captured:
    """One graph: its static inputs (same structure as the call's arguments) and output."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list[torch.Tensor], output: torch.Tensor):
        self.graph, self.inputs, self.output = graph, inputs, output

    def __call__(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        for static, value in zip(self.inputs, tensors):
            static.copy_(value)
        self.graph.replay()
        # A copy: the caller may hold this output across the next replay (CFG run as two calls).
        return self.output.clone()


class GraphedModel:
    """`model(x_in, t, **cond)` replayed from CUDA graphs, one per call signature."""

    def __init__(self, model: Callable[..., torch.Tensor], max_graphs: int = MAX_GRAPHS, *,
                 per_run: bool = False):
        if not callable(model):
            raise TypeError(f"GraphedModel wraps a callable model(x_in, t, **cond), got {type(model).__name__}")
        self.model = model
        self.max_graphs = max_graphs
        self.per_run = per_run
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self._seen: set[tuple] = set()  # signatures whose eager first call has run (per_run)
        self._pool = None
        self._stream = None  # the stream every graph is captured on: the pool's blocks are its
        self.captures = 0  # how many graphs were captured (a test and the benchmark read it)

    def end_run(self) -> None:
        """The pipeline's call after each run's denoising loop: per-run graphs are released."""
        if self.per_run:
            self.release()

    def release(self) -> None:
        """Free every graph and its memory pool (the next call of a signature captures anew)."""
        if not self._graphs:
            return
        torch.cuda.synchronize()  # the last replay's kernels still read the pool
        # `_seen` stays: a signature warmed up once (cuDNN's choices made, lazy state built) is
        # captured at its first call of the next generation, without another eager call.
        self._graphs.clear()
        self._pool = self._stream = None
        clear_cublas_workspaces()  # the capture stream's, which held on to a block of the pool
        torch.cuda.empty_cache()

    @contextlib.contextmanager
    def lend_pool(self) -> Iterator[None]:
        """Run the body on the capture stream with this thread's allocations routed into the kept
        graphs' pool (a no-op without kept graphs, for per-run graphs, or on a PyTorch without
        `torch.cuda.use_mem_pool`). Whatever the body allocates must be dead when it ends: the
        next replay overwrites those blocks. The pipeline's decode qualifies: it returns host images.

        Why the capture stream: the allocator hands a free block only to the stream it was last
        used on, and the pool's blocks are the capture stream's."""
        pool, stream = self._pool, self._stream
        if self.per_run or not self._graphs or not isinstance(pool, getattr(torch.cuda, "MemPool", ())):
            yield
            return
        outer = torch.cuda.current_stream(stream.device)
        stream.wait_stream(outer)  # the last replay and the latents it wrote come first
        try:
            with torch.cuda.stream(stream), torch.cuda.use_mem_pool(pool, device=stream.device):
                yield
        finally:
            outer.wait_stream(stream)

    def __call__(self, x_in: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        names = sorted(cond)
        tensors = [x_in, t] + [cond[n] for n in names if isinstance(cond[n], torch.Tensor)]
        if any(not v.is_cuda for v in tensors):
            raise ValueError("GraphedModel needs CUDA tensors (CUDA graphs); got a tensor on "
                             f"{next(v.device for v in tensors if not v.is_cuda)}: use the eager model there")
        key = tuple((tuple(v.shape), v.dtype, v.device) for v in tensors) + tuple(
            (n, None if isinstance(cond[n], torch.Tensor) else cond[n]) for n in names)
        captured = self._graphs.get(key)
        if captured is None and self.per_run and key not in self._seen:
            self._seen.add(key)
            return self.model(x_in, t, **cond)  # the warm-up, and this step's real output
        if captured is None:
            captured = self._capture(x_in, t, cond, names)
            self._graphs[key] = captured
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        return captured(tensors)

    def _capture(self, x_in: torch.Tensor, t: torch.Tensor, cond: dict[str, Any], names: list[str]) -> _Captured:
        # Static inputs: contiguous copies (an expanded context becomes a real buffer once).
        static = {"x_in": x_in.clone(memory_format=torch.contiguous_format), "t": t.clone()}
        static_cond = {n: cond[n].clone(memory_format=torch.contiguous_format)
                       if isinstance(cond[n], torch.Tensor) else cond[n] for n in names}

        def call() -> torch.Tensor:
            return self.model(static["x_in"], static["t"], **static_cond)

        if self._stream is None:
            self._stream = torch.cuda.Stream(device=x_in.device)
        if not self.per_run:  # the first call of a per-run signature was its warm-up
            side = self._stream
            side.wait_stream(torch.cuda.current_stream(x_in.device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_CALLS):
                    call()
            torch.cuda.current_stream(x_in.device).wait_stream(side)
        # The warm-up's activations sit in the allocator's cache, which the capture's private pool
        # cannot use, and so does the cuBLAS workspace of each stream that ran a matmul (32 MiB
        # each on Hopper, kept per stream for good): give them back before capturing. The capture
        # stream gets its own workspace inside the graph's pool; eager work after makes a new one.
        torch.cuda.synchronize(x_in.device)
        clear_cublas_workspaces()
        torch.cuda.empty_cache()
        if self._pool is None:  # a MemPool where PyTorch has them: lend_pool() routes the decode into it
            self._pool = torch.cuda.MemPool() if hasattr(torch.cuda, "use_mem_pool") else torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=getattr(self._pool, "id", self._pool), stream=self._stream):
            output = call()
        self.captures += 1
        inputs = [static["x_in"], static["t"]] + [
            static_cond[n] for n in names if isinstance(static_cond[n], torch.Tensor)]
        return _Captured(graph, inputs, output)
