"""Prompt handling: A1111's syntax (parser examples copied from A1111's own docstring), chunking
and weighting checked by hand, and the plain mode against diffusers' `encode_prompt` on tiny
StableDiffusionPipeline / StableDiffusionXLPipeline instances sharing our text encoders' weights."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import CLIPTextModel as HFCLIPTextModel
from transformers import CLIPTextModelWithProjection as HFCLIPTextModelWithProjection
from transformers import CLIPTokenizer as HFCLIPTokenizer

from pocketdiffusion.config import CLIPConfig, PromptEncoding
from pocketdiffusion.data import train_bpe, write_bpe
from pocketdiffusion.models.clip import CLIPTextModel
from pocketdiffusion.models.tokenizer import EOS_TOKEN, CLIPTokenizer
from pocketdiffusion.pipelines.prompts import (PromptChunk, apply_emphasis, clip_encoder_call,
                                               encode_prompt_chunks, encode_prompt_pair,
                                               encode_prompt_plain, parse_prompt_attention,
                                               tokenize_weighted)

from reference_clip import hf_text_config, randomize_

WORDS = ["red", "green", "blue", "star", "circle", "square", "big", "small", "on", "a", "sky",
         "house", "hill", "sun", "blurry", "ugly", "photo", "of"]
CORPUS = [f"a {size} {color} {shape}, on a {bg} sky, photo of a house on a hill, sun"
          for size in ("big", "small") for color in ("red", "green", "blue")
          for shape in ("star", "circle", "square") for bg in ("red", "blue")]
CORPUS += ["blurry, ugly, blurry, ugly"] * 4

SD1_ENCODING = PromptEncoding()
SD2_ENCODING = PromptEncoding(layer=-2, pad_token="!")
SDXL_ENCODINGS = (PromptEncoding(layer=-2, final_norm=False),
                  PromptEncoding(layer=-2, final_norm=False, pad_token="!"))


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@pytest.fixture(scope="module")
def vocab_folder(tmp_path_factory):
    vocab, merges = train_bpe(CORPUS, num_merges=200)
    return write_bpe(vocab, merges, tmp_path_factory.mktemp("bpe") / "tokenizer")


@pytest.fixture(scope="module")
def tok(vocab_folder):
    tokenizer = CLIPTokenizer.from_folder(vocab_folder.parent)
    for word in WORDS + [","]:
        assert len(tokenizer.encode(word)) == 1, word  # the tests count tokens by words
    return tokenizer


@pytest.fixture(scope="module")
def tok_bang(vocab_folder):
    return CLIPTokenizer.from_folder(vocab_folder.parent, pad_token="!")


def clip_config(tokenizer, *, width=32, projection_dim=None, activation="quick_gelu") -> CLIPConfig:
    return CLIPConfig(vocab_size=tokenizer.vocab_size, width=width, layers=3, heads=2, mlp_dim=2 * width,
                      activation=activation, projection_dim=projection_dim, eos_token_id=tokenizer.eos_id)


def our_model(config: CLIPConfig, seed: int) -> CLIPTextModel:
    return randomize_(CLIPTextModel(config), seed=seed).eval()


def ids_of(tokenizer, n_words: int, start: int = 0) -> tuple[str, list[int]]:
    words = [WORDS[(start + i) % len(WORDS)] for i in range(n_words)]
    return " ".join(words), [tokenizer.encode(w)[0] for w in words]


# ---- parse_prompt_attention ----------------------------------------------------------------------
A1111_DOCSTRING_EXAMPLES = [  # modules/prompt_parser.py, parse_prompt_attention's doctest
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
      ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]


@pytest.mark.parametrize("text, expected", A1111_DOCSTRING_EXAMPLES)
def test_parse_matches_a1111_docstring(text, expected):
    assert parse_prompt_attention(text) == expected  # exact floats: same operations, same order


@pytest.mark.parametrize("text, expected", [
    ("[small] ((big))", [("small", 1 / 1.1), (" ", 1.0), ("big", 1.1 * 1.1)]),
    ("(word: 1.3 )", [("word", 1.3)]),
    ("(a:2)(b:2) c", [("ab", 2.0), (" c", 1.0)]),  # equal neighbours merge
    ("a) b]", [("a) b]", 1.0)]),  # closing brackets never opened are text
    ("[unbalanced", [("unbalanced", 1 / 1.1)]),
    ("\\\\ \\) \\[", [("\\ ) [", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAKfast break BREAK", [("BREAKfast break", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),  # A1111: bracketed BREAK is text
    ("", [("", 1.0)]),
])
def test_parse_rules(text, expected):
    got = parse_prompt_attention(text)
    assert [f for f, _ in got] == [f for f, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], abs=1e-12)


def test_parse_bad_input():
    with pytest.raises(TypeError, match="text must be a str"):
        parse_prompt_attention(None)
    with pytest.raises(ValueError, match="'1.2.3' is not a number"):
        parse_prompt_attention("(a:1.2.3)")


# ---- tokenize_weighted ---------------------------------------------------------------------------
def test_chunk_layout_and_weights(tok, tok_bang):
    ids = tok.encode("a big red star")
    for tokenizer in (tok, tok_bang):
        (chunk,) = tokenize_weighted(tokenizer, "a big (red:1.5) star")
        assert len(chunk.tokens) == len(chunk.weights) == 77
        assert chunk.tokens[:6] == [tok.bos_id] + ids + [tok.eos_id]
        assert chunk.tokens[6:] == [tokenizer.pad_id] * 71  # EOS for SD1, "!" for OpenCLIP
        assert chunk.weights == [1.0] * 3 + [1.5] + [1.0] * 73
    assert tok_bang.pad_id != tok.eos_id


def test_empty_prompt_is_one_chunk_of_padding(tok, tok_bang):
    for tokenizer in (tok, tok_bang):
        (chunk,) = tokenize_weighted(tokenizer, "")
        assert chunk.tokens == [tok.bos_id, tok.eos_id] + [tokenizer.pad_id] * 75
        assert chunk.weights == [1.0] * 77


def test_escaped_parentheses_are_text(tok):
    (chunk,) = tokenize_weighted(tok, "a \\(red\\) star")
    literal = tok.encode("a (red) star")
    assert chunk.tokens[1:1 + len(literal)] == literal
    assert set(chunk.weights) == {1.0}
    (plain,) = tokenize_weighted(tok, "a (red) star", parse_attention=False)  # emphasis "None"
    assert plain.tokens == chunk.tokens and plain.weights == chunk.weights


@pytest.mark.parametrize("n_words, sizes", [(75, [75]), (76, [75, 1]), (150, [75, 75]), (200, [75, 75, 50])])
def test_chunks_of_75(tok, n_words, sizes):
    text, ids = ids_of(tok, n_words)
    chunks = tokenize_weighted(tok, text)
    assert [len(c.tokens) for c in chunks] == [77] * len(sizes)
    got = []
    for chunk, size in zip(chunks, sizes):
        assert chunk.tokens[0] == tok.bos_id and chunk.tokens[size + 1] == tok.eos_id
        assert chunk.tokens[size + 2:] == [tok.pad_id] * (75 - size)
        got += chunk.tokens[1:size + 1]
    assert got == ids


@pytest.mark.parametrize("comma_at, backtrack, first_size", [
    (55, 20, 56),  # full chunk, last comma 20 tokens back: the 19 tokens after it move on
    (54, 20, 75),  # 21 tokens back: too far, plain cut at 75
    (55, 0, 75),   # backtrack off
    (70, 5, 71),
])
def test_comma_backtrack(tok, comma_at, backtrack, first_size):
    before, ids_before = ids_of(tok, comma_at)
    after, ids_after = ids_of(tok, 40, start=3)
    ids = ids_before + tok.encode(",") + ids_after
    chunks = tokenize_weighted(tok, f"{before}, {after}", comma_backtrack=backtrack)
    assert len(chunks) == 2
    assert chunks[0].tokens[1:first_size + 1] == ids[:first_size]
    assert chunks[0].tokens[first_size + 1:] == [tok.eos_id] * (76 - first_size)
    rest = len(ids) - first_size
    assert chunks[1].tokens[1:rest + 1] == ids[first_size:]


def test_break_starts_a_new_chunk(tok):
    chunks = tokenize_weighted(tok, "red star BREAK (blue:1.2) circle")
    assert len(chunks) == 2
    assert chunks[0].tokens[:4] == [tok.bos_id] + tok.encode("red star") + [tok.eos_id]
    assert chunks[1].tokens[:4] == [tok.bos_id] + tok.encode("blue circle") + [tok.eos_id]
    assert chunks[1].weights[:4] == [1.0, 1.2, 1.0, 1.0]
    assert len(tokenize_weighted(tok, "red star BREAK")) == 1  # a trailing BREAK adds nothing
    leading = tokenize_weighted(tok, "BREAK red star")  # a leading one closes an empty chunk
    assert len(leading) == 2 and leading[0].tokens == tokenize_weighted(tok, "")[0].tokens
    assert len(tokenize_weighted(tok, "red break star")) == 1  # lower-case is a word


def test_tokenize_bad_input(tok):
    with pytest.raises(TypeError, match="prompt must be a str"):
        tokenize_weighted(tok, ["a", "b"])
    with pytest.raises(ValueError, match="chunk_length"):
        tokenize_weighted(tok, "a", chunk_length=0)
    with pytest.raises(ValueError, match="comma_backtrack"):
        tokenize_weighted(tok, "a", comma_backtrack=-1)


# ---- weighting ------------------------------------------------------------------------------------
def fake_encoder(ids: torch.Tensor):
    """Deterministic hidden states (1, T, 3) that depend on the ids; pooled = token 0."""
    hidden = ids.double()[..., None] * 0.01 + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    return hidden.float(), hidden[:, 0].float()


def test_emphasis_math_by_hand():
    chunk = PromptChunk(tokens=[7, 3, 5, 9], weights=[1.0, 1.5, 0.5, 1.0])
    hidden, pooled = encode_prompt_chunks(fake_encoder, [chunk])
    z = [[t * 0.01 + c for c in (1.0, -2.0, 0.5)] for t in chunk.tokens]
    weighted = [[value * w for value in row] for row, w in zip(z, chunk.weights)]
    mean = lambda rows: sum(sum(r) for r in rows) / (len(rows) * len(rows[0]))  # noqa: E731
    scale = mean(z) / mean(weighted)
    expected = torch.tensor([[[v * scale for v in row] for row in weighted]])
    assert hidden.shape == (1, 4, 3)
    assert relative_error(hidden, expected) <= 1e-6
    assert torch.equal(pooled, fake_encoder(torch.tensor([chunk.tokens]))[1])
    # "no_norm" is the bare multiplication, "ignore" leaves the encoder output alone
    raw, _ = fake_encoder(torch.tensor([chunk.tokens]))
    assert relative_error(apply_emphasis(raw, chunk.weights, "no_norm"),
                          torch.tensor([weighted], dtype=torch.float32)) <= 1e-6
    assert torch.equal(apply_emphasis(raw, chunk.weights, "ignore"), raw)


@torch.no_grad()
def test_long_prompt_encodes_to_three_chunks(tok):
    model = our_model(clip_config(tok, projection_dim=24, activation="gelu"), seed=1)
    text, _ = ids_of(tok, 200)
    chunks = tokenize_weighted(tok, text)
    assert len(chunks) == 3
    call = clip_encoder_call(model, SD1_ENCODING, pooled=True)
    hidden, pooled = encode_prompt_chunks(call, chunks)
    assert hidden.shape == (1, 231, 32)
    # all weights 1: the chunks' encoder outputs side by side, pooled from the first chunk
    for i, chunk in enumerate(chunks):
        expected, chunk_pooled = model(torch.tensor([chunk.tokens]), pooled=True)
        assert torch.allclose(hidden[:, 77 * i:77 * (i + 1)], expected, atol=1e-6)
        if i == 0:
            assert torch.equal(pooled, chunk_pooled)


def test_encode_chunks_bad_input():
    with pytest.raises(TypeError, match="non-empty list of PromptChunk"):
        encode_prompt_chunks(fake_encoder, [])
    with pytest.raises(ValueError, match="as many weights as tokens"):
        encode_prompt_chunks(fake_encoder, [PromptChunk([1, 2], [1.0])])
    with pytest.raises(ValueError, match="emphasis must be one of"):
        encode_prompt_chunks(fake_encoder, [PromptChunk([1, 2], [1.0, 1.0])], emphasis="strong")


# ---- encode_prompt_pair (A1111) -------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd1(tok):
    return [tok], [our_model(clip_config(tok), seed=2)], [SD1_ENCODING]


@pytest.fixture(scope="module")
def sdxl(tok, tok_bang):
    clip_l = our_model(clip_config(tok), seed=3)
    bigg = our_model(clip_config(tok, width=48, projection_dim=40, activation="gelu"), seed=4)
    return [tok, tok_bang], [clip_l, bigg], list(SDXL_ENCODINGS)


def a1111_encode(tokenizer, model, encoding, text, pooled=False):
    call = clip_encoder_call(model, encoding, pooled)
    return encode_prompt_chunks(call, tokenize_weighted(tokenizer, text))


@torch.no_grad()
def test_pair_sd1_pads_the_shorter_with_the_empty_prompt(sd1):
    tokenizers, encoders, encodings = sd1
    tok, model = tokenizers[0], encoders[0]
    prompt = ids_of(tok, 80)[0].replace("red", "(red:1.3)")  # 2 chunks, weighted
    negative = "[blurry], ugly"
    cond, uncond, pooled, pooled_uncond = encode_prompt_pair(tokenizers, encoders, encodings, prompt, negative)
    expected_cond, _ = a1111_encode(tok, model, SD1_ENCODING, prompt)
    expected_neg, _ = a1111_encode(tok, model, SD1_ENCODING, negative)
    empty, _ = a1111_encode(tok, model, SD1_ENCODING, "")
    assert cond.shape == uncond.shape == (1, 154, 32)
    assert pooled is None and pooled_uncond is None  # SD1's encoder has no projection
    assert torch.equal(cond, expected_cond)
    assert torch.equal(uncond, torch.cat([expected_neg, empty], dim=1))
    assert not torch.allclose(cond, encode_prompt_pair(tokenizers, encoders, encodings,
                                                       prompt.replace("(red:1.3)", "red"), negative)[0])

    # v0: uncond's last vector repeated; "none": left unequal
    _, last, _, _ = encode_prompt_pair(tokenizers, encoders, encodings, prompt, negative, pad="last")
    assert torch.equal(last[:, :77], expected_neg)
    assert torch.equal(last[:, 77:], expected_neg[:, -1:].expand(1, 77, 32))
    _, unpadded, _, _ = encode_prompt_pair(tokenizers, encoders, encodings, prompt, negative, pad="none")
    assert torch.equal(unpadded, expected_neg)

    # a negative longer than the prompt: "empty" pads cond, "last" cuts uncond
    cond2, uncond2, _, _ = encode_prompt_pair(tokenizers, encoders, encodings, negative, prompt)
    assert torch.equal(cond2, torch.cat([expected_neg, empty], dim=1)) and torch.equal(uncond2, expected_cond)
    cond3, uncond3, _, _ = encode_prompt_pair(tokenizers, encoders, encodings, negative, prompt, pad="last")
    assert torch.equal(cond3, expected_neg) and torch.equal(uncond3, expected_cond[:, :77])


@torch.no_grad()
def test_clip_skip_is_sd1_only(sd1, sdxl, tok_bang):
    tokenizers, encoders, encodings = sd1
    text = "a big red star"
    ids = tokenizers[0]([text])
    cond, *_ = encode_prompt_pair(tokenizers, encoders, encodings, text, "", clip_skip=2)
    assert torch.equal(cond, encoders[0](ids, layer=-2, final_norm=True)[0])
    default, *_ = encode_prompt_pair(tokenizers, encoders, encodings, text, "")
    assert torch.equal(encode_prompt_pair(tokenizers, encoders, encodings, text, "", clip_skip=1)[0], default)
    assert torch.equal(default, encoders[0](ids)[0])
    # SD2 (OpenCLIP, pad "!") and SDXL keep their layer, as A1111 does
    sd2_model = our_model(clip_config(tok_bang, activation="gelu"), seed=5)
    sd2 = ([tok_bang], [sd2_model], [SD2_ENCODING])
    assert torch.equal(encode_prompt_pair(*sd2, text, "", clip_skip=2)[0], encode_prompt_pair(*sd2, text, "")[0])
    assert torch.equal(encode_prompt_pair(*sdxl, text, "", clip_skip=2)[0], encode_prompt_pair(*sdxl, text, "")[0])
    for bad in (0, 4, 1.5, True):
        with pytest.raises(ValueError, match="clip_skip"):
            encode_prompt_pair(tokenizers, encoders, encodings, text, "", clip_skip=bad)


@torch.no_grad()
def test_pair_sdxl_concatenates_and_zeroes_the_empty_negative(sdxl):
    tokenizers, encoders, encodings = sdxl
    prompt = ids_of(tokenizers[0], 90)[0] + ", (sun:1.2)"
    cond, uncond, pooled, pooled_uncond = encode_prompt_pair(tokenizers, encoders, encodings, prompt, "")
    hidden_l, none = a1111_encode(tokenizers[0], encoders[0], encodings[0], prompt)
    hidden_g, pooled_g = a1111_encode(tokenizers[1], encoders[1], encodings[1], prompt, pooled=True)
    assert none is None and cond.shape == (1, 154, 32 + 48) and pooled.shape == (1, 40)
    assert torch.equal(cond, torch.cat([hidden_l, hidden_g], dim=-1))
    assert torch.equal(pooled, pooled_g)
    first_chunk = torch.tensor([tokenize_weighted(tokenizers[1], prompt)[0].tokens])
    assert torch.equal(pooled, encoders[1](first_chunk, layer=-2, final_norm=False, pooled=True)[1])
    # sd_models_xl.py: "" as negative prompt is zeros (then padded with the encoded empty prompt)
    empty_l, _ = a1111_encode(tokenizers[0], encoders[0], encodings[0], "")
    empty_g, pooled_empty = a1111_encode(tokenizers[1], encoders[1], encodings[1], "", pooled=True)
    assert torch.equal(uncond[:, :77], torch.zeros(1, 77, 80))
    assert torch.equal(uncond[:, 77:], torch.cat([empty_l, empty_g], dim=-1))
    assert torch.equal(pooled_uncond, torch.zeros(1, 40))
    _, uncond_kept, _, pooled_kept = encode_prompt_pair(tokenizers, encoders, encodings, prompt, "",
                                                        zero_empty_negative=False)
    assert torch.equal(uncond_kept[:, :77], torch.cat([empty_l, empty_g], dim=-1))
    assert torch.equal(pooled_kept, pooled_empty)


def test_pair_bad_input(sd1, sdxl, tok):
    tokenizers, encoders, encodings = sd1
    with pytest.raises(TypeError, match="prompt must be a str"):
        encode_prompt_pair(tokenizers, encoders, encodings, ["a", "b"], "")
    with pytest.raises(TypeError, match="negative_prompt must be a str"):
        encode_prompt_pair(tokenizers, encoders, encodings, "a", None)
    with pytest.raises(TypeError, match="prompt must be a str"):
        encode_prompt_plain(tokenizers, encoders, encodings, 42)
    with pytest.raises(ValueError, match="pads with '<|endoftext|>'"):
        encode_prompt_pair(tokenizers, encoders, [SD2_ENCODING], "a", "")
    with pytest.raises(ValueError, match="1 \\(SD1/SD2\\) or 2 \\(SDXL\\)"):
        encode_prompt_pair(tokenizers * 3, encoders * 3, encodings * 3, "a", "")
    with pytest.raises(ValueError, match="pad must be one of"):
        encode_prompt_pair(tokenizers, encoders, encodings, "a", "", pad="zeros")
    with pytest.raises(ValueError, match="emphasis must be one of"):
        encode_prompt_pair(tokenizers, encoders, encodings, "a", "", emphasis="strong")
    with pytest.raises(TypeError, match="must be a list or tuple"):
        encode_prompt_pair(tok, encoders, encodings, "a", "")


# ---- plain mode against diffusers ---------------------------------------------------------------
def hf_tokenizer(vocab_folder, pad_token=EOS_TOKEN) -> HFCLIPTokenizer:
    return HFCLIPTokenizer.from_pretrained(str(vocab_folder), pad_token=pad_token, model_max_length=77)


def hf_encoder_into_ours(config: CLIPConfig, seed: int) -> tuple[torch.nn.Module, CLIPTextModel]:
    """A random transformers text encoder, and ours loaded strictly from its state dict."""
    torch.manual_seed(seed)
    cls = HFCLIPTextModelWithProjection if config.projection_dim else HFCLIPTextModel
    reference = randomize_(cls(hf_text_config(config)), seed=seed).eval()
    state = reference.state_dict()
    if config.projection_dim is None:  # transformers 5's CLIPTextModel has no `text_model.` level
        state = {f"text_model.{key}": value for key, value in state.items()}
    ours = CLIPTextModel(config)
    ours.load_state_dict(state, strict=True)
    return reference, ours.eval()


def diffusers_clip_skip_shim(reference: torch.nn.Module) -> torch.nn.Module:
    """diffusers 0.42's StableDiffusionPipeline reads `text_encoder.text_model.final_layer_norm`
    for clip_skip; transformers 5's CLIPTextModel has no `text_model` level. A plain attribute (not
    a submodule) gives diffusers the path it expects to the same layer norm."""
    object.__setattr__(reference, "text_model", SimpleNamespace(final_layer_norm=reference.final_layer_norm))
    return reference


def tiny_vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(block_out_channels=[8], in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"],
                         norm_num_groups=8)


def tiny_unet(cross_attention_dim: int, pooled_dim: int | None = None):
    from diffusers import UNet2DConditionModel
    extra = {} if pooled_dim is None else dict(
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=pooled_dim + 6 * 8, use_linear_projection=True)
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=2, norm_num_groups=8, **extra)


PLAIN_CASES = [  # (prompt, negative_prompt, clip_skip in A1111 numbering)
    ("a big red star on a blue sky", "blurry, ugly", None),
    ("a (big:1.3) [red] star BREAK on a sky", None, None),  # syntax stays text
    ("a big red star on a blue sky", "", 2),  # diffusers: clip skip for the prompt only
    (" ".join(WORDS * 6), "ugly " * 90, 3),  # both truncated to 75 tokens
]
PLAIN_IDS = ["negative", "syntax_is_text", "clip_skip_2", "truncated_clip_skip_3"]


@pytest.fixture(scope="module")
def sd_pipeline(vocab_folder, tok):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    reference, ours = hf_encoder_into_ours(clip_config(tok), seed=6)
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=diffusers_clip_skip_shim(reference),
                                   tokenizer=hf_tokenizer(vocab_folder),
                                   unet=tiny_unet(32), scheduler=EulerDiscreteScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe, ([tok], [ours], [SD1_ENCODING])


@pytest.mark.parametrize("prompt, negative, clip_skip", PLAIN_CASES, ids=PLAIN_IDS)
@torch.no_grad()
def test_plain_matches_diffusers_sd(sd_pipeline, prompt, negative, clip_skip):
    pipe, (tokenizers, encoders, encodings) = sd_pipeline
    ref_cond, ref_uncond = pipe.encode_prompt(prompt, "cpu", 1, True, negative_prompt=negative,
                                              clip_skip=None if clip_skip is None else clip_skip - 1)
    cond, uncond, pooled, pooled_uncond = encode_prompt_plain(tokenizers, encoders, encodings, prompt,
                                                              negative, clip_skip=clip_skip)
    assert cond.shape == ref_cond.shape == (1, 77, 32) and uncond.shape == ref_uncond.shape
    assert pooled is None and pooled_uncond is None
    assert relative_error(cond, ref_cond) <= 1e-5
    assert relative_error(uncond, ref_uncond) <= 1e-5


@torch.no_grad()
def test_plain_matches_diffusers_sd2_layout(vocab_folder, tok_bang):
    """SD2: our full OpenCLIP tower read at layer -2 with the final norm is diffusers' text encoder
    cut to one layer less (how diffusers ships SD2), padded with "!"."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    ours = our_model(clip_config(tok_bang, activation="gelu"), seed=7)
    short = CLIPConfig(**{**ours.config.__dict__, "layers": ours.config.layers - 1})
    reference = HFCLIPTextModel(hf_text_config(short)).eval()
    last = f"text_model.encoder.layers.{short.layers}."
    reference.load_state_dict({k.removeprefix("text_model."): v for k, v in ours.state_dict().items()
                               if not k.startswith(last)}, strict=True)
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=diffusers_clip_skip_shim(reference),
                                   tokenizer=hf_tokenizer(vocab_folder, "!"), unet=tiny_unet(32),
                                   scheduler=EulerDiscreteScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    for prompt, negative, clip_skip in PLAIN_CASES[:3]:
        ref_cond, ref_uncond = pipe.encode_prompt(prompt, "cpu", 1, True, negative_prompt=negative,
                                                  clip_skip=None if clip_skip is None else clip_skip - 1)
        cond, uncond, _, _ = encode_prompt_plain([tok_bang], [ours], [SD2_ENCODING], prompt, negative,
                                                 clip_skip=clip_skip)
        assert relative_error(cond, ref_cond) <= 1e-5
        assert relative_error(uncond, ref_uncond) <= 1e-5


@pytest.fixture(scope="module")
def sdxl_pipeline(vocab_folder, tok, tok_bang):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    reference_l, ours_l = hf_encoder_into_ours(clip_config(tok), seed=8)
    reference_g, ours_g = hf_encoder_into_ours(clip_config(tok, width=48, projection_dim=40, activation="gelu"),
                                               seed=9)
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=reference_l, text_encoder_2=reference_g,
                                     tokenizer=hf_tokenizer(vocab_folder),
                                     tokenizer_2=hf_tokenizer(vocab_folder, "!"),
                                     unet=tiny_unet(32 + 48, pooled_dim=40), scheduler=EulerDiscreteScheduler(),
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    return pipe, ([tok, tok_bang], [ours_l, ours_g], list(SDXL_ENCODINGS))


@pytest.mark.parametrize("prompt, negative, clip_skip", PLAIN_CASES, ids=PLAIN_IDS)
@torch.no_grad()
def test_plain_matches_diffusers_sdxl(sdxl_pipeline, prompt, negative, clip_skip):
    pipe, (tokenizers, encoders, encodings) = sdxl_pipeline
    reference = pipe.encode_prompt(prompt=prompt, device="cpu", num_images_per_prompt=1,
                                   do_classifier_free_guidance=True, negative_prompt=negative,
                                   clip_skip=None if clip_skip is None else clip_skip - 1)
    ours = encode_prompt_plain(tokenizers, encoders, encodings, prompt, negative, clip_skip=clip_skip)
    for name, got, expected in zip(("cond", "uncond", "pooled", "pooled_uncond"), ours, reference):
        assert got.shape == expected.shape, name
        if negative is None and "uncond" in name:  # force_zeros_for_empty_prompt
            assert not expected.any() and not got.any(), name
        else:
            assert relative_error(got, expected) <= 1e-5, name
    assert ours[0].shape == (1, 77, 80) and ours[2].shape == (1, 40)
