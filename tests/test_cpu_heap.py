"""The CPU heap's phases (memory/cpu_heap.py): which glibc settings each UNet call runs under (a
recording stand-in for libc), and in a fresh process with the real glibc, that a call reusing the
heap takes a fraction of the page faults of one that hands its blocks back, and leaves nothing
resident behind it."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from pocketdiffusion.memory import cpu_heap


class RecordingLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("trim",))
        return 1


class Fails(nn.Module):
    def forward(self, x):
        if x.sum() < 0:
            raise RuntimeError("out of memory")
        return x * 2


@pytest.fixture
def libc(monkeypatch):
    fake = RecordingLibc()
    monkeypatch.setattr(cpu_heap, "_libc", fake)
    monkeypatch.setattr(cpu_heap, "_configured", False)
    monkeypatch.setattr(cpu_heap, "_reusing", 0)
    return fake


def test_reuse_starts_at_the_second_call_and_always_ends(libc):
    module = Fails()
    assert cpu_heap.reuse_during(module)
    assert libc.calls == [("mallopt", cpu_heap.M_MMAP_THRESHOLD, cpu_heap.MMAP_THRESHOLD)]
    libc.calls.clear()
    module(torch.ones(2))  # the first call creates what lives on: no reuse, a trim after
    assert libc.calls == [("trim",)]
    libc.calls.clear()
    module(torch.ones(2))
    reuse = [("mallopt", cpu_heap.M_MMAP_MAX, 0), ("mallopt", cpu_heap.M_TRIM_THRESHOLD, cpu_heap.NEVER_TRIM)]
    give_back = [("mallopt", cpu_heap.M_MMAP_MAX, cpu_heap.MMAP_MAX),
                 ("mallopt", cpu_heap.M_TRIM_THRESHOLD, cpu_heap.TRIM_THRESHOLD), ("trim",)]
    assert libc.calls == reuse + give_back
    libc.calls.clear()
    with pytest.raises(RuntimeError, match="out of memory"):
        module(-torch.ones(2))
    assert libc.calls == reuse + give_back and cpu_heap._reusing == 0  # an exception gives back too


def test_trim_after_each_call_but_not_inside_a_reuse_phase(libc):
    module = nn.Identity()
    assert cpu_heap.trim_after(module)
    libc.calls.clear()
    module(torch.ones(1))
    assert libc.calls == [("trim",)]
    libc.calls.clear()
    cpu_heap._enter_reuse()
    module(torch.ones(1))  # e.g. a layer inside the UNet: the phase's end trims
    cpu_heap._leave_reuse()
    assert ("trim",) in libc.calls and libc.calls.count(("trim",)) == 1


def test_no_glibc_installs_nothing(monkeypatch):
    monkeypatch.setattr(cpu_heap, "_libc", False)
    module = nn.Identity()
    assert not cpu_heap.reuse_during(module) and not cpu_heap.trim_after(module)
    assert not module._forward_hooks and not module._forward_pre_hooks


CHURN = r"""
import json, sys
import torch
from torch import nn
from pocketdiffusion.memory import cpu_heap

def faults():
    with open("/proc/self/stat") as f:
        return int(f.read().split(")")[1].split()[7])

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

class Churn(nn.Module):  # a step's pattern: many short-lived tensors far above the mmap threshold
    def forward(self, x):
        for _ in range(24):
            x = (x * 1.0001).relu()
        return x

torch.set_num_threads(1)
module = Churn()
if sys.argv[1] == "reuse":
    cpu_heap.reuse_during(module)
else:
    cpu_heap.return_freed_memory_to_os()
x = torch.rand(2 * 2 ** 20)  # 8 MiB
counts, start = [], rss()
with torch.inference_mode():
    for _ in range(4):
        before = faults()
        module(x)
        counts.append(faults() - before)
print(json.dumps({"faults": counts, "left": rss() - start}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and /proc")
def test_a_reusing_call_takes_a_fraction_of_the_page_faults():
    runs = {}
    for mode in ("reuse", "give back"):
        done = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    handing_back = min(runs["give back"]["faults"][1:])
    reusing = max(runs["reuse"]["faults"][2:])  # from the second reusing call on
    # 24 fresh 8 MiB tensors a call (measured 98k faults) against about two, reused (10k)
    assert reusing < 0.25 * handing_back, runs
    # given back after each call: at most the last output (born in the heap) is left over
    assert runs["reuse"]["left"] < 12 * 2 ** 20, runs
