"""The minimal mode's token embedding on the CPU: only the rows a prompt names are read from the
mapped file (memory/streaming.py RowGather), the text encoders compute exactly what the resident
ones do (fp32, bit for bit), and the planner no longer counts the table as resident."""
from __future__ import annotations

import pytest
import torch

import ckpt_fixtures as fx
from pocketdiffusion.checkpoints import load
from pocketdiffusion.config import SD15
from pocketdiffusion.memory.estimate import predict
from pocketdiffusion.memory.plan import plan_for
from pocketdiffusion.memory.streaming import BlockStreaming, gathers_rows

TABLE = "text_encoders.0.text_model.embeddings.token_embedding.weight"


def _write(tmp_path, kind="sd1", dtype=torch.float32):
    config = fx.tiny_config(kind)
    state = fx.ldm_state_dict(fx.our_models(config, seed=4), config.family)
    return fx.write_single_file(tmp_path / "model.safetensors", state, dtype=dtype)


@pytest.mark.parametrize("kind,dtype", [("sd1", torch.float32), ("sd1", torch.float16), ("sdxl", torch.float32)])
def test_gathered_embedding_equals_resident_bit_for_bit(tmp_path, kind, dtype):
    path = _write(tmp_path, kind, dtype)  # fp16 file: the rows are converted to fp32 one by one
    resident = load(path, dtype=torch.float32, prediction="eps")
    policy = BlockStreaming("cpu")
    streamed = load(path, dtype=torch.float32, prediction="eps", streaming=policy)
    assert len(policy.gathers) == len(resident.text_encoders)
    g = torch.Generator().manual_seed(0)
    vocab = resident.config.text_encoders[0].vocab_size
    ids = torch.randint(0, vocab, (2, 77), generator=g)
    ids[0, :10] = 7  # repeated ids, and a row's largest id as end-of-text (the legacy pooling)
    with torch.inference_mode():
        for expected_te, got_te in zip(resident.text_encoders, streamed.text_encoders):
            n = expected_te.config.context_length
            for layer in (-1, -2, 0):
                expected = expected_te(ids[:, :n], layer=layer, pooled=True)
                got = got_te(ids[:, :n], layer=layer, pooled=True)
                assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
            # the embedding module alone, on int32 ids too
            table = expected_te.text_model.embeddings.token_embedding
            gathered = got_te.text_model.embeddings.token_embedding
            assert torch.equal(table(ids.int()), gathered(ids.int()))
            assert gathered.weight.numel() == 0  # the placeholder is back between calls


def test_only_the_named_rows_are_read(tmp_path):
    policy = BlockStreaming("cpu")
    parts = load(_write(tmp_path), dtype=torch.float32, streaming=policy)
    gather = policy.gathers[0]
    reads = []
    original = gather.read_rows
    gather.read_rows = lambda target, rows: (reads.append((target, rows.tolist())), original(target, rows))[1]
    ids = torch.tensor([[5, 9, 5, 2, 9, 9]])
    with torch.inference_mode():
        parts.text_encoders[0](ids)
    assert reads == [(TABLE, [2, 5, 9])]  # each distinct id once, never the whole table


def test_the_planner_leaves_the_table_in_the_file():
    assert gathers_rows(TABLE)
    assert not gathers_rows("text_encoders.0.text_model.embeddings.position_embedding.weight")
    clip = SD15.text_encoders[0]
    table = clip.vocab_size * clip.width * 4  # fp32: 145 MiB
    minimal = predict(SD15, plan_for("minimal", "cpu"), "cpu", 512, 512)
    assert minimal.weights < 16 * 2 ** 20 < table  # what stays resident: the small layers only
    on_cuda = predict(SD15, plan_for("minimal", "cuda"), "cuda", 512, 512)
    assert on_cuda.weights < 16 * 2 ** 20 < table // 2  # on CUDA the table waits in host memory
