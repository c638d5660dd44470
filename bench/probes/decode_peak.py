"""Probe (session 5; kept so that its figures in docs/BENCHMARKS.md can be reproduced): where fast's decode peak comes from (SD1.5 512, H100).

    python bench/probes/decode_peak.py   (from the repository root, on a GPU; run 7: docs/bench/h100_s5run7_decode_probe.json)
"""
import json, os, sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/
from memory_gpu import write_model, PROMPT, NEGATIVE
folder = Path("/tmp/m/sd15")
if not (folder / "model_index.json").exists():
    folder.mkdir(parents=True, exist_ok=True); write_model(folder, "sd15")
import pocketdiffusion
import pocketdiffusion.pipelines.stages as stages
MIB = 2 ** 20
pipe = pocketdiffusion.load(str(folder), device="cuda", memory="fast")
gen = lambda: pipe.generate(PROMPT, NEGATIVE, steps=30, cfg=7.5, sampler="euler", seed=0, width=512, height=512)
gen()
res = {}
def peak(label):
    torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    gen(); torch.cuda.synchronize()
    res[label] = {"reserved": torch.cuda.max_memory_reserved() / MIB, "allocated": torch.cuda.max_memory_allocated() / MIB}
    print(label, res[label], flush=True)
peak("as is")
rows = []
def post(name):
    def hook(module, args, out):
        torch.cuda.synchronize()
        rows.append((name, torch.cuda.memory_allocated() / MIB, torch.cuda.max_memory_allocated() / MIB,
                     torch.cuda.memory_reserved() / MIB))
    return hook
handles = [m.register_forward_hook(post(n)) for n, m in pipe.parts.vae.decoder.named_modules() if n.count(".") <= 3 and n]
peak("hooked")
for h in handles: h.remove()
res["decoder_rows"] = rows
for r in rows: print("%-40s alloc %7.1f  peak %7.1f  reserved %7.1f" % r)
orig = stages.decode_latents
def emptied(*a, **k):
    torch.cuda.empty_cache()
    return orig(*a, **k)
stages.decode_latents = emptied
peak("empty_cache before decode")
os.environ.get("OUT") and Path(os.environ["OUT"], "decode_probe.json").write_text(json.dumps(res, indent=1))
