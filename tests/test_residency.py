"""Parking idle components in host memory (memory/residency.py). The CUDA behaviour (pinned host
copies, nothing of the text encoder or VAE on the device while the UNet runs) is tested on the
device machine in tests/test_cuda_memory.py; here the mechanics, with "meta" as the device."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pocketdiffusion.memory.plan import plan_for
from pocketdiffusion.memory.residency import HostParking


def _module():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    return module.eval()


def test_use_brings_the_weights_and_puts_the_same_host_tensors_back():
    module, other = _module(), nn.Linear(2, 2)
    parking = HostParking("meta", [module])
    host = {name: t for name, t in [*module.named_parameters(), *module.named_buffers()]}
    with parking.use(module[2], other):  # a part of a parked module; a module that is not parked
        assert module[2].weight.device.type == "meta" and module[0].weight.device.type == "cpu"
        assert other.weight.device.type == "cpu"
        with parking.use(module):  # nested: the inner use brings the rest and releases only that
            assert all(t.device.type == "meta" for t in [*module.parameters(), *module.buffers()])
        assert module[2].weight.device.type == "meta" and module[0].weight.device.type == "cpu"
    after = {name: t for name, t in [*module.named_parameters(), *module.named_buffers()]}
    assert all(after[name] is host[name] or torch.equal(after[name], host[name]) for name in host)
    assert all(t.device.type == "cpu" for t in after.values())
    assert all(not p.requires_grad for p in module.parameters())
    assert parking.parked_bytes() == sum(t.numel() * t.element_size() for t in host.values())


def test_an_error_inside_use_still_puts_the_weights_back():
    module = _module()
    parking = HostParking("meta", [module])
    with pytest.raises(RuntimeError, match="boom"), parking.use(module):
        raise RuntimeError("boom")
    assert all(t.device.type == "cpu" for t in module.parameters())


def test_weights_already_on_a_device_are_refused():
    module = _module().to("meta")
    with pytest.raises(ValueError, match="on the host"):
        HostParking("cuda", [module])


def test_which_plans_park_or_stream_on_cuda():
    fast = plan_for("fast", "cuda")  # speed: the VAE parked whole, decoding untiled; graphs + compile
    assert fast.park_idle and fast.stream_text and not fast.stream_vae and fast.cuda_graphs and fast.compile
    for mode in ("balanced", "low"):  # memory: both the text encoders and the VAE stream, tiled decode
        plan = plan_for(mode, "cuda")
        assert plan.stream_text and plan.stream_vae and not plan.park_idle
        assert plan.cuda_graphs and plan.graphs_per_run  # captured per generation, freed before the decode
        assert plan.vae_tile_above == 256 * 256
    assert not plan_for("minimal", "cuda").park_idle  # everything streamed instead
    assert not plan_for("balanced", "cpu").park_idle  # nowhere to park on the CPU


def test_the_plan_command_says_where_the_weights_live():
    from pocketdiffusion.cli_plan import describe_residency, describe_tiling
    assert describe_residency(plan_for("balanced", "cuda")) == (
        "UNet resident, CUDA graphs captured per generation; text encoders and VAE streamed")
    assert describe_residency(plan_for("low", "cuda")).startswith(
        "UNet int8, CUDA graphs captured per generation; text encoders and VAE streamed")
    assert describe_residency(plan_for("balanced", "cpu")).startswith("UNet stored 16-bit; ")
    fast = describe_residency(plan_for("fast", "cuda"))
    assert "compiled, CUDA graphs" in fast and "VAE parked in host memory" in fast
    assert describe_residency(plan_for("minimal", "cuda")) == "all weights streamed block by block"
    assert describe_tiling(plan_for("balanced", "cuda")) == "VAE tiled above 256x256"
    assert describe_tiling(plan_for("minimal", "cuda")) == "VAE tiled"
