"""Probe (session 5; kept so that its figures in docs/BENCHMARKS.md can be reproduced): torch.compile(UNetModel.forward).aot_compile of fast's UNet; a second process
loads it (no Dynamo trace, no Inductor): time to full speed.

    python bench/probes/aot_compile_warm_start.py   (from the repository root, on a GPU; run 13: docs/bench/h100_s5run13_aot_child.txt)
"""
import json, os, subprocess, sys, time
from pathlib import Path
T0 = time.perf_counter()
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/
from memory_gpu import write_model, PROMPT, NEGATIVE
folder = Path("/tmp/m/sd15")
if not (folder / "model_index.json").exists():
    folder.mkdir(parents=True, exist_ok=True); write_model(folder, "sd15")
import pocketdiffusion
from pocketdiffusion.speed import GraphedModel
from pocketdiffusion.pipelines.base import _unet_call
path = "/tmp/unet_aot.pt"
role = sys.argv[1] if len(sys.argv) > 1 else "parent"
res = {"role": role}
t = time.perf_counter()
pipe = pocketdiffusion.load(str(folder), device="cuda", memory="fast")
res["load_s"] = time.perf_counter() - t
unet = pipe.parts.unet
with torch.inference_mode():  # the pipeline's tensors are inference tensors: the guards check that
    x = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    tt = torch.tensor([500.0, 500.0], device="cuda")
    ctx = torch.randn(2, 77, 768, device="cuda", dtype=torch.float16)
    if role == "parent":
        t = time.perf_counter()
        from pocketdiffusion.models.unet import UNetModel
        if hasattr(torch._dynamo.config, "enable_aot_compile"):
            torch._dynamo.config.enable_aot_compile = True
        res["has_flag"] = hasattr(torch._dynamo.config, "enable_aot_compile")
        fn = torch.compile(UNetModel.forward, fullgraph=True, dynamic=False).aot_compile(((unet, x, tt, ctx), {"y": None}))
        res["aot_compile_s"] = time.perf_counter() - t
        fn.save_compiled_function(path)
        res["artifact_mib"] = os.path.getsize(path) / 2 ** 20
        res["max_abs_vs_eager"] = float((fn(unet, x, tt, ctx, y=None) - unet(x, tt, ctx)).abs().max())
    else:
        t = time.perf_counter()
        with open(path, "rb") as f:
            fn = torch.compiler.load_compiled_function(f)
        res["load_fn_s"] = time.perf_counter() - t
        compiled = lambda x_in, t_in, context, y=None: fn(unet, x_in.contiguous(memory_format=torch.channels_last), t_in, context, y=y)
        pipe.model_call = GraphedModel(_unet_call(compiled))
        t = time.perf_counter()
        pipe.generate(PROMPT, NEGATIVE, steps=30, cfg=7.5, sampler="euler", seed=0, width=512, height=512)
        torch.cuda.synchronize()
        res["first_image_s"] = time.perf_counter() - t
        res["start_to_full_speed_s"] = time.perf_counter() - T0
        t = time.perf_counter()
        pipe.generate(PROMPT, NEGATIVE, steps=30, cfg=7.5, sampler="euler", seed=0, width=512, height=512)
        torch.cuda.synchronize()
        res["second_image_s"] = time.perf_counter() - t
        res["max_abs_vs_eager"] = float((fn(unet, x, tt, ctx, y=None) - unet(x, tt, ctx)).abs().max())
print(json.dumps(res), flush=True)
if role == "parent":
    for i in range(2):
        done = subprocess.run([sys.executable, "-X", "faulthandler", __file__, "child"], capture_output=True, text=True)
        print("child rc", done.returncode, done.stdout[-1500:], done.stderr[-1200:] if done.returncode else "", flush=True)
    Path(os.environ.get("OUT", "/tmp"), f"aot_child{i}.txt").write_text(done.stdout + done.stderr[-3000:])
