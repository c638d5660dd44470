"""Probe (session 6): where a warm start of `fast` spends its time (the saved compiled UNet already
in the cache): wall-clock phases from before `import torch`, and cProfile's cumulative top of the
load and of the first image.

    python bench/probes/warm_start_profile.py --folder /tmp/m/sd15 [--out profile.txt]

Run it twice (or after bench/memory_gpu.py's fast row): the first run compiles and saves.
"""
import time

started = time.perf_counter()
import argparse  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import pstats  # noqa: E402

import torch  # noqa: E402

imported_torch = time.perf_counter()
import pocketdiffusion  # noqa: E402

imported = time.perf_counter()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--folder", required=True)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    profile = cProfile.Profile()
    profile.enable()
    pipe = pocketdiffusion.load(args.folder, device="cuda", memory="fast")
    torch.cuda.synchronize()
    loaded = time.perf_counter()
    pipe.generate("a photo of an astronaut", "blurry", steps=30, cfg=7.5, sampler="euler", seed=0,
                  width=512, height=512)
    torch.cuda.synchronize()
    first = time.perf_counter()
    profile.disable()
    pipe.generate("a photo of an astronaut", "blurry", steps=30, cfg=7.5, sampler="euler", seed=0,
                  width=512, height=512)
    torch.cuda.synchronize()
    second = time.perf_counter()
    lines = [f"import torch {imported_torch - started:.2f} s, import pocketdiffusion {imported - imported_torch:.2f} s, "
             f"load {loaded - imported:.2f} s, first image {first - loaded:.2f} s, second image {second - first:.3f} s, "
             f"start to full speed {first - started:.2f} s"]
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(60)
    lines.append(text.getvalue())
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
    lines.append(text.getvalue())
    report = "\n".join(lines)
    print(report[:6000])
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
