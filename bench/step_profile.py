"""Where a denoising step's time goes (SD1.5 architecture, random full-size weights, fp16,
512x512, CFG batch 2): the UNet alone back to back, the UNet with a sync after every call, the
host time to launch one UNet call, our pipeline's loop per step, and a profiler table of the
loop's host-side calls (syncs and copies show up as cudaStreamSynchronize / cudaMemcpyAsync).

    python bench/step_profile.py [--memory fast]
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_overhead import pure_unet_ms, unet_inputs  # noqa: E402
from reference_models import build_reference, save_diffusers_folder  # noqa: E402

import pocketdiffusion  # noqa: E402
from pocketdiffusion.data.bpe import train_bpe, write_bpe  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse on the moon"


def launch_ms(fn) -> float:
    """Host time of one call issued onto an idle GPU (the queue never fills: pure launch cost)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return 1000 * (t1 - t0)


def main() -> None:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memory", default="balanced", help="the memory mode whose loop is profiled (fast: CUDA graphs)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        unet, vae, encoders = build_reference("sd15", "cuda")
        save_diffusers_folder(Path(tmp), "sd15", unet, vae, encoders)
        vocab, merges = train_bpe([PROMPT] * 4, 40)
        write_bpe(vocab, merges, Path(tmp) / "tokenizer")
        del unet, vae, encoders
        torch.cuda.empty_cache()
        pipe = pocketdiffusion.load(tmp, device="cuda", memory=args.memory)
        x, t, ctx = unet_inputs()
        call = lambda: pipe.model_call(x, t, context=ctx)  # noqa: E731  (the call the loop makes)

        def call_and_sync():
            call()
            torch.cuda.synchronize()

        with torch.inference_mode():
            back_to_back = pure_unet_ms(call, 30)
            synced = pure_unet_ms(call_and_sync, 30)
            launches = sorted(launch_ms(call) for _ in range(10))
        request = pocketdiffusion.GenerationRequest(prompt=PROMPT, steps=30, cfg=7.5, seed=0, width=512, height=512)
        pipe.generate(PROMPT, steps=30, width=512, height=512)  # warm-up
        times = []
        run = pipe.run(request)
        for step in run:
            if step.index in (0, 29):
                torch.cuda.synchronize()
                times.append(time.perf_counter())
        loop = 1000 * (times[1] - times[0]) / 29
        print(f"UNet back to back {back_to_back:.2f} ms/call; synced each call {synced:.2f}; "
              f"host launch of one call {launches[len(launches) // 2]:.2f} ms (median of 10); "
              f"pipeline loop {loop:.2f} ms/step", flush=True)
        stamps = []  # host time at each yield, no syncs: a sync inside the loop shows as a long gap
        for step in pipe.run(request):
            stamps.append(time.perf_counter())
        torch.cuda.synchronize()
        print("host ms between yields:", " ".join(f"{1000 * (b - a):.1f}" for a, b in zip(stamps, stamps[1:])),
              flush=True)
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for step in pipe.run(request):
                pass
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25), flush=True)
        names = {e.key: (e.count, e.self_cpu_time_total / 1000) for e in prof.key_averages()}
        for key in ("cudaStreamSynchronize", "cudaMemcpyAsync", "cudaDeviceSynchronize", "aten::item",
                    "aten::_local_scalar_dense", "aten::copy_", "aten::to", "aten::nonzero", "cudaGraphLaunch",
                    "cudaStreamWaitEvent", "cudaEventSynchronize"):
            if key in names:
                print(f"{key}: {names[key][0]} calls, {names[key][1]:.1f} ms host", flush=True)


if __name__ == "__main__":
    main()
