"""Probe (session 5; kept so that its figures in docs/BENCHMARKS.md can be reproduced): AOTInductor package of the SD1.5 UNet; compile time, second-process
load time, call time replayed from a CUDA graph vs torch.compile.

    python bench/probes/aoti_package.py   (from the repository root, on a GPU; runs 1 and 4: docs/bench/h100_s5run4_aoti_probe.json)
"""
import json, os, subprocess, sys, tempfile, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/
from memory_gpu import write_model

out = Path(os.environ.get("OUT", "/tmp"))
folder = Path(tempfile.mkdtemp(prefix="sd15_"))
write_model(folder, "sd15")
pkg = Path("/tmp/aoti_pkg/unet.pt2"); pkg.parent.mkdir(exist_ok=True)
res = {}

import pocketdiffusion
pipe = pocketdiffusion.load(str(folder), device="cuda", memory="balanced")
unet = pipe.parts.unet.eval()
unet.to(memory_format=torch.channels_last)

class Wrap(torch.nn.Module):
    def __init__(self, u):
        super().__init__(); self.u = u
    def forward(self, x, t, context):
        return self.u(x.contiguous(memory_format=torch.channels_last), t, context, y=None)

w = Wrap(unet)
x = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float16)
t = torch.tensor([500.0, 500.0], device="cuda")
ctx = torch.randn(2, 77, 768, device="cuda", dtype=torch.float16)
t0 = time.perf_counter()
with torch.inference_mode():
    pass
ep = torch.export.export(w, (x, t, ctx))
res["export_s"] = time.perf_counter() - t0
t0 = time.perf_counter()
path = pkg.exists() or torch._inductor.aoti_compile_and_package(ep, package_path=str(pkg), inductor_configs={
    "aot_inductor.package_constants_in_so": False, "conv_1x1_as_mm": True})
res["aoti_compile_s"] = time.perf_counter() - t0
res["pkg_mib"] = pkg.stat().st_size / 2**20
print(res, flush=True)
torch.save({k: v for k, v in unet.state_dict().items()}, "/tmp/unet_sd.pt")  # for the child (channels_last kept)
del pipe, unet, w, ep
torch.cuda.empty_cache()

CHILD = r'''
import json, sys, time
t0 = time.perf_counter()
import torch
t_torch = time.perf_counter() - t0
sd = torch.load("/tmp/unet_sd.pt", map_location="cuda")
torch.cuda.synchronize()
t_sd = time.perf_counter() - t0
import torch._inductor
t_ind = time.perf_counter() - t0
runner = torch._inductor.aoti_load_package(sys.argv[1])
t_pkg = time.perf_counter() - t0
fqns = runner.get_constant_fqns()
m = {f: sd["u." + f] if ("u." + f) in sd else sd[f.removeprefix("u.")] for f in fqns}
runner.load_constants(m, check_full_update=True, user_managed=True)
t_const = time.perf_counter() - t0
x = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float16)
t = torch.tensor([500.0, 500.0], device="cuda")
ctx = torch.randn(2, 77, 768, device="cuda", dtype=torch.float16)
with torch.inference_mode():
    y = runner(x, t, ctx)
    torch.cuda.synchronize()
    t_first = time.perf_counter() - t0
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2): runner(x, t, ctx)
    torch.cuda.current_stream().wait_stream(s); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = runner(x, t, ctx)
    torch.cuda.synchronize()
    t_graph = time.perf_counter() - t0
    eager = []
    for _ in range(3):
        torch.cuda.synchronize(); a = time.perf_counter()
        for _ in range(30): runner(x, t, ctx)
        torch.cuda.synchronize(); eager.append(1000 * (time.perf_counter() - a) / 30)
    rep = []
    for _ in range(3):
        torch.cuda.synchronize(); a = time.perf_counter()
        for _ in range(30): g.replay()
        torch.cuda.synchronize(); rep.append(1000 * (time.perf_counter() - a) / 30)
out0 = out.clone()
print(json.dumps({"import_torch_s": t_torch, "weights_s": t_sd, "import_inductor_s": t_ind, "pkg_load_s": t_pkg,
  "constants_s": t_const, "first_call_s": t_first, "graph_captured_s": t_graph, "runner_ms": min(eager),
  "replay_ms": min(rep), "reserved_mib": torch.cuda.max_memory_reserved() / 2**20,
  "output_shape": list(out0.shape), "finite": bool(out0.isfinite().all())}))
'''
for i in range(2):
    done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", CHILD, str(pkg)], capture_output=True, text=True)
    print("rc", done.returncode, done.stdout[-3000:], done.stderr[-3000:], flush=True)
    try:
        res[f"child{i}"] = json.loads(done.stdout.strip().splitlines()[-1])
    except Exception as e:
        res[f"child{i}"] = {"error": done.stderr[-1500:]}
(out / "aoti_probe.json").write_text(json.dumps(res, indent=1))
print(json.dumps(res, indent=1))
