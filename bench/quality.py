"""Prompt following of a shapes model: generate the held-out prompts (data/shapes.py
`heldout_prompts`, fixed seeds 0..n-1) and grade each picture with the deterministic classifier
(data/classify.py). Prints the accuracy per attribute (colour, shape, background, position, size,
relation).

    python bench/quality.py [--model shapes] [--n 200] [--steps 20] [--cfg 7.5] [--sampler euler] [--memory low]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import pocketdiffusion
from pocketdiffusion.data.classify import score
from pocketdiffusion.data.shapes import heldout_prompts


def evaluate(pipe, n: int, **settings) -> dict[str, float]:
    prompts = heldout_prompts(n)
    images = []
    for seed, (prompt, _) in enumerate(prompts):
        images.append(np.asarray(pipe.generate(prompt, seed=seed, **settings)[0]))
    return score([spec for _, spec in prompts], images)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--memory", default="balanced", help="memory mode (balanced, low, ...)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (1 when the machine is busy)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = pocketdiffusion.load(args.model, device="cpu", memory=args.memory)
    t0 = time.perf_counter()
    scores = evaluate(pipe, args.n, steps=args.steps, cfg=args.cfg, sampler=args.sampler)
    print(json.dumps({"model": args.model, "n": args.n, "steps": args.steps, "cfg": args.cfg,
                      "sampler": args.sampler, "memory": args.memory, "seconds": round(time.perf_counter() - t0, 1),
                      **{k: round(v, 4) for k, v in scores.items()}}))


if __name__ == "__main__":
    main()
