"""Weight streaming (memory="minimal"): the streamed models compute exactly what the resident
ones do (fp32 on the CPU, bit for bit), fetch their groups in execution order, prefetch the
learned successor, survive a wrong guess and an exception mid-pass, and hold no weights between
calls."""
from __future__ import annotations

import pytest
import torch

import ckpt_fixtures as fx
from pocketdiffusion.checkpoints import load
from pocketdiffusion.memory.streaming import PACK_ALIGN, PACK_CHUNK, BlockStreaming, HostTransport, Pack, stream_group


def _write(tmp_path, kind="sd1", suffix=".safetensors", dtype=torch.float32):
    config = fx.tiny_config(kind)
    state = fx.ldm_state_dict(fx.our_models(config, seed=3), config.family)
    return fx.write_single_file(tmp_path / f"model{suffix}", state, dtype=dtype)


def _inputs(parts, batch=2):
    cfg = parts.config.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, 16, 16, generator=g)
    context = torch.randn(batch, 77, cfg.context_dim, generator=g)
    y = None if cfg.adm_in_channels is None else torch.randn(batch, cfg.adm_in_channels, generator=g)
    ids = torch.randint(0, parts.config.text_encoders[0].vocab_size - 1, (batch, 77), generator=g)
    return x, context, y, ids


@torch.inference_mode()
def _outputs(parts):
    x, context, y, ids = _inputs(parts)
    unet = parts.unet(x, torch.tensor([10.0, 700.0]), context, y)
    texts = [te(ids[:, :te.config.context_length], layer=-2, pooled=True) for te in parts.text_encoders]
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mean, logvar = parts.vae.encode(pixels)
    return [unet, *[t for pair in texts for t in pair], mean, logvar, parts.vae.decode(mean)]


@pytest.mark.parametrize("kind,suffix,dtype", [("sd1", ".safetensors", torch.float32),
                                               ("sd1", ".safetensors", torch.float16),
                                               ("sdxl", ".safetensors", torch.float32),
                                               ("sd2", ".ckpt", torch.float32)])
def test_streamed_equals_resident_bit_for_bit(tmp_path, kind, suffix, dtype):
    path = _write(tmp_path, kind, suffix, dtype)
    resident = load(path, dtype=torch.float32, prediction="eps")
    policy = BlockStreaming("cpu")
    streamed = load(path, dtype=torch.float32, prediction="eps", streaming=policy)
    expected = _outputs(resident)
    for _ in range(2):  # the second pass runs on the learned order, with prefetches
        got = _outputs(streamed)
        assert all(torch.equal(a, b) for a, b in zip(expected, got))
    streamer = policy.streamer
    assert not streamer.loaded and not streamer.pending  # nothing held between calls
    # every streamed weight is an empty placeholder again, of the run dtype
    weight = streamed.unet.input_blocks[1][0].in_layers[2].weight
    assert weight.numel() == 0 and weight.dtype == torch.float32
    assert next(streamed.unet.parameters()).numel() > 0  # the resident first parameter


def test_groups_are_fetched_in_execution_order_and_the_successor_prefetched(tmp_path):
    path = _write(tmp_path)
    policy = BlockStreaming("cpu")
    parts = load(path, dtype=torch.float32, streaming=policy)
    streamer = policy.streamer
    x, context, _, _ = _inputs(parts)
    started = []
    transport = streamer.transport
    original_start = transport.start
    transport.start = lambda group: (started.append(group.name), original_start(group))[1]
    with torch.inference_mode():
        parts.unet(x, 5.0, context)
        first = list(streamer.fetched)
        assert first[0] == "unet.input_blocks.0.0" and first[-1].startswith("unet.output_blocks.")
        middle = first.index("unet.middle_block.0")
        # a layer's group comes right after its block's (nested in it), in the order they run;
        # a transformer block's after its transformer's
        block = "unet.middle_block.1.transformer_blocks.0"
        assert first[middle:middle + 11] == [
            "unet.middle_block.0", *(f"unet.middle_block.0.{layer}" for layer in ("in_layers.2", "emb_layers.1",
                                                                                   "out_layers.3")),
            "unet.middle_block.1", block, f"{block}.attn1", f"{block}.attn2", f"{block}.ff",
            "unet.middle_block.2", "unet.middle_block.2.in_layers.2"]
        assert all(g.startswith("unet.input_blocks.") for g in first[:middle])
        assert not started  # the first pass knows no order yet: nothing prefetched
        parts.unet(x, 5.0, context)
    assert streamer.fetched[len(first):] == first  # the same order again
    # on the second pass each group after the first was prefetched while its predecessor ran
    assert started == first[1:]


def test_a_wrong_guess_and_an_exception_mid_pass_are_harmless(tmp_path):
    path = _write(tmp_path)
    resident = load(path, dtype=torch.float32)
    policy = BlockStreaming("cpu")
    parts = load(path, dtype=torch.float32, streaming=policy)
    ids = torch.randint(0, 100, (1, 77))
    with torch.inference_mode():
        parts.text_encoders[0](ids, pooled=True)  # learns layer 0 -> layer 1
        # layer=1 without pooling stops after layer 0: the prefetch of layer 1 is never used
        short, _ = parts.text_encoders[0](ids, layer=1)
        assert torch.equal(short, resident.text_encoders[0](ids, layer=1)[0])
        assert not policy.streamer.pending and not policy.streamer.loaded
        with pytest.raises(ValueError, match="UNet input must be"):
            parts.unet(torch.zeros(1, 3, 16, 16), 1.0, torch.zeros(1, 77, 64))
        x, context, _, _ = _inputs(parts)
        broken = parts.unet.middle_block[1]
        original = broken.forward
        broken.forward = lambda *a: (_ for _ in ()).throw(RuntimeError("boom"))
        with pytest.raises(RuntimeError, match="boom"):
            parts.unet(x, 5.0, context)
        assert policy.streamer.loaded  # the failed pass left its groups loaded ...
        broken.forward = original
        out = parts.unet(x, 5.0, context)  # ... and the next pass starts clean
        assert torch.equal(out, resident.unet(x, 5.0, context))
        assert not policy.streamer.loaded


def test_host_transport_copies_exactly(tmp_path):
    """The CUDA transport's code path without a GPU: weights held in CPU memory, copied per group."""
    path = _write(tmp_path)
    resident = load(path, dtype=torch.float32)
    policy = BlockStreaming("cpu", from_host=True)
    parts = load(path, dtype=torch.float32, streaming=policy)
    transport = policy.streamer.transport
    assert isinstance(transport, HostTransport)
    # packed buffers per group (a few copies per group, not one per tensor), aligned offsets
    assert set(transport.packs) == set(policy.streamer.groups)
    offsets = [offset for pack in transport.packs.values() for _, offset, _, _ in pack.layout.values()]
    assert offsets and all(offset % PACK_ALIGN == 0 for offset in offsets)
    assert sum(len(p.buffers) for p in transport.packs.values()) < len(offsets)
    expected = _outputs(resident)
    for _ in range(2):
        assert all(torch.equal(a, b) for a, b in zip(expected, _outputs(parts)))


def test_which_weights_stream():
    # The UNet's big layers are groups of their own, nested in their block's (norms, projections)
    assert stream_group("unet.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight") == \
        "unet.input_blocks.4.1.transformer_blocks.0.attn1"
    assert stream_group("unet.input_blocks.4.1.transformer_blocks.0.ff.net.0.proj.weight") == \
        "unet.input_blocks.4.1.transformer_blocks.0.ff"
    assert stream_group("unet.input_blocks.4.1.transformer_blocks.0.norm2.weight") == \
        "unet.input_blocks.4.1.transformer_blocks.0"
    assert stream_group("unet.input_blocks.4.1.proj_in.weight") == "unet.input_blocks.4.1"
    assert stream_group("unet.middle_block.2.in_layers.0.weight") == "unet.middle_block.2"
    assert stream_group("unet.middle_block.2.in_layers.2.weight") == "unet.middle_block.2.in_layers.2"
    assert stream_group("unet.output_blocks.3.0.skip_connection.bias") == "unet.output_blocks.3.0.skip_connection"
    assert stream_group("unet.output_blocks.3.0.emb_layers.1.weight") == "unet.output_blocks.3.0.emb_layers.1"
    assert stream_group("text_encoders.1.text_model.encoder.layers.7.mlp.fc1.weight") == \
        "text_encoders.1.text_model.encoder.layers.7"
    assert stream_group("vae.decoder.up.3.block.2.conv1.weight") == "vae.decoder.up.3.block.2"
    assert stream_group("vae.decoder.up.3.upsample.conv.weight") == "vae.decoder.up.3.upsample"
    assert stream_group("vae.encoder.mid.attn_1.q.weight") == "vae.encoder.mid.attn_1"
    for resident in ("unet.time_embed.0.weight", "unet.out.2.weight", "vae.decoder.conv_in.weight",
                     "text_encoders.0.text_model.embeddings.token_embedding.weight", "vae.post_quant_conv.weight"):
        assert stream_group(resident) is None


def test_packs_share_chunks_and_give_big_tensors_their_own():
    big = torch.arange(PACK_CHUNK // 2 + 8, dtype=torch.float16)  # > one chunk in bytes
    smalls = {f"s{i}": torch.full((1000 + i,), float(i)) for i in range(5)}
    pack = Pack.of({"a": smalls["s0"], "big": big, **{k: v for k, v in smalls.items() if k != "s0"}, "a2": big[:3]},
                   pin=False)
    views = pack.views([b.clone() for b in pack.buffers])
    assert torch.equal(views["big"], big) and all(torch.equal(views[k], v) for k, v in smalls.items() if k != "s0")
    assert torch.equal(views["a"], smalls["s0"]) and torch.equal(views["a2"], big[:3])
    sizes = sorted(b.numel() for b in pack.buffers)
    # the small ones share one chunk, under 1 MiB cut to 512-byte steps (the allocator's small blocks)
    assert sizes == [20992, big.numel() * 2] and 20992 % 512 == 0
    one_and_a_half = Pack.of({"x": torch.zeros(3 * 2 ** 18, dtype=torch.float16)}, pin=False)  # 1.5 MiB: in 2 MiB steps
    assert [b.numel() for b in one_and_a_half.buffers] == [2 * 2 ** 20]
    many = {f"m{i}": torch.zeros(2 ** 20 // 4 * 3) for i in range(4)}  # 3 MiB each: 2 per 8 MiB chunk
    assert sorted(b.numel() for b in Pack.of(many, pin=False).buffers) == [6 * 2 ** 20] * 2  # 2 per chunk
