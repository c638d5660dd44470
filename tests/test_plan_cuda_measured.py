"""The planner's CUDA predictions against the peaks measured on the device machine (issue 5:
within 10%). The measurements are the H200 runs recorded in docs/bench (bench/memory_gpu.py,
max_memory_reserved over the timed images); each row here names its run and the plan it measured,
which is the plan `plan_for` returns today. Rerun the benchmark and update a row when a plan
changes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pocketdiffusion.config import SD15, SDXL
from pocketdiffusion.memory.estimate import predict
from pocketdiffusion.memory.plan import plan_for

BENCH = Path(__file__).resolve().parent.parent / "docs" / "bench"
MIB = 2 ** 20
CONFIGS = {"sd15": SD15, "sdxl": SDXL}
# (file, row label, size): the rows measured with the plans as committed
MEASURED = [
    ("h200_run6_sd15.json", "balanced", 512),
    ("h200_run6_sd15.json", "low", 512),
    ("h200_run6_sd15.json", "minimal", 512),
    ("h200_run5_sd15.json", "fast", 512),
    ("h200_run4_growth.json", "balanced", 768),
    ("h200_run4_growth.json", "balanced", 1024),
    ("h200_run4_growth.json", "balanced", 2048),
    ("h200_run4_sdxl.json", "balanced", 1024),
]


def _measured(file: str, which: str, size: int) -> dict:
    rows = [r for r in json.loads((BENCH / file).read_text()) if r["which"] == which and r["size"] == size]
    assert rows and "error" not in rows[0], f"{file} has no {which} row at {size}"
    return rows[0]


@pytest.mark.parametrize("file, which, size", MEASURED, ids=[f"{w}-{s}-{f.split('_')[1]}" for f, w, s in MEASURED])
def test_cuda_prediction_within_10_percent_of_the_measured_peak(file, which, size):
    row = _measured(file, which, size)
    predicted = predict(CONFIGS[row["arch"]], plan_for(which, "cuda"), "cuda", size, size).peak
    measured = row["reserved"]
    assert abs(predicted - measured) <= 0.10 * measured, \
        f"{which} {row['arch']} {size}: predicted {predicted / MIB:.0f} MiB, measured {measured / MIB:.0f} MiB"
