"""CLIPTokenizer and train_bpe: a vocabulary learned here, written in the Hugging Face file
layout, tokenizes exactly as transformers' CLIPTokenizer does from the same files.

transformers 5 ships only the `tokenizers`-backed CLIPTokenizer (the pure-Python one is gone).
It departs from OpenAI's tokenizer (which we follow) in three places, each tested on its own:
it does not unescape HTML entities, its lower-casing ignores the Greek final sigma, and a pad
token other than EOS ("!") becomes an added token that swallows every "!" typed in a prompt."""
from __future__ import annotations

import html
import json
import re

import pytest
import torch
from transformers import CLIPTokenizer as HFCLIPTokenizer

from pocketdiffusion.data import train_bpe, write_bpe
from pocketdiffusion.errors import TokenizerFilesMissing
from pocketdiffusion.models.tokenizer import (BOS_TOKEN, EOS_TOKEN, CLIPTokenizer, bytes_to_unicode,
                                              locate_clip_vocab, read_merges)

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["star", "circle", "square", "triangle", "heart", "hexagon"]
SIZES = ["small", "big", "tiny", "large"]
CORPUS = [f"a {size} {color} {shape} on a {background} background"
          for size in SIZES for color in COLORS for shape in SHAPES for background in COLORS[::3]]
CORPUS += ["two red stars and a blue circle", "three green squares, side by side"]

TEXTS = [
    "a small red star on a blue background",
    "A Big GREEN Circle On A WHITE Background",
    "two stars, three circles; and: four squares!!! (maybe?)",
    "  lots   of\twhite\n\nspace   ",
    "numbers 1024x768, 3.14159 and 2024-01-01",
    "don't it's we'll I'M they've you're he'd",
    "naïve café Ünïcödé 日本語のテキスト 🌟✨ emoji",
    "e\u0301tude",  # combining accent: NFC turns it into é
    "zebra xylophone quixotic juxtaposition",  # words the corpus never saw
    "<|endoftext|> inside <|startoftext|> a prompt",
    "red" * 40,
    " ".join(["a big blue hexagon"] * 30),  # longer than 77 tokens: truncated
    "",
    "!!!",
]
HTML_TEXTS = ["fish &amp; chips", "a &lt;red&gt; star &quot;quoted&quot;", "double &amp;amp; escaped",
              "caf&eacute; &#x1F31F;"]


@pytest.fixture(scope="module")
def vocab_folder(tmp_path_factory):
    vocab, merges = train_bpe(CORPUS, num_merges=300)
    return write_bpe(vocab, merges, tmp_path_factory.mktemp("bpe") / "tokenizer")


@pytest.fixture(scope="module", params=[EOS_TOKEN, "!"], ids=["pad_eos", "pad_bang"])
def tokenizers(request, vocab_folder):
    ours = CLIPTokenizer.from_folder(vocab_folder.parent, pad_token=request.param)
    reference = HFCLIPTokenizer.from_pretrained(str(vocab_folder), pad_token=request.param)
    return ours, reference


def reference_ids(reference, texts) -> torch.Tensor:
    return reference(texts, padding="max_length", max_length=77, truncation=True,
                     return_tensors="pt")["input_ids"]


def expected_ids(reference, texts) -> torch.Tensor:
    """transformers makes a pad token other than EOS an added token, so a "!" typed in an
    SD2/SDXL prompt becomes padding, character by character. open_clip (those encoders' own
    tokenizer) and ComfyUI keep it as text, and so do we: for such a prompt the reference
    tokenizes the text with EOS as pad token, and the row is laid out as BOS, text, EOS, pad."""
    if reference.pad_token == EOS_TOKEN:
        return reference_ids(reference, texts)
    plain = HFCLIPTokenizer.from_pretrained(reference.name_or_path)
    rows = []
    for text in texts:
        if "!" not in text:
            rows.append(reference_ids(reference, [text])[0])
            continue
        ids = [plain.bos_token_id] + plain(text, add_special_tokens=False)["input_ids"][:75]
        ids += [plain.eos_token_id] + [reference.pad_token_id] * (76 - len(ids))
        rows.append(torch.tensor(ids))
    return torch.stack(rows)


def test_same_ids_as_transformers(tokenizers):
    ours, reference = tokenizers
    for text in TEXTS:
        assert ours(text).tolist() == expected_ids(reference, [text]).tolist(), text
    batch = ours(TEXTS)
    assert batch.dtype == torch.long and batch.shape == (len(TEXTS), 77)
    assert torch.equal(batch, expected_ids(reference, TEXTS))
    no_bang = [text for text in TEXTS if "!" not in text]
    assert torch.equal(ours(no_bang), reference_ids(reference, no_bang))
    plain = HFCLIPTokenizer.from_pretrained(reference.name_or_path)
    for text in TEXTS:
        assert ours.encode(text) == plain(text, add_special_tokens=False)["input_ids"], text


def test_html_entities_are_unescaped_like_openai_clip(tokenizers):
    ours, reference = tokenizers
    for text in HTML_TEXTS:
        unescaped = html.unescape(html.unescape(text))
        assert unescaped != text
        assert ours(text).tolist() == expected_ids(reference, [unescaped]).tolist(), text


def test_lower_casing_is_pythons_like_openai_clip(tokenizers):
    """OpenAI's tokenizer lower-cases with Python's str.lower, which knows the Greek final sigma
    (ΣΑΣ -> σας); the Rust normalizer of transformers' tokenizer does not (σασ)."""
    ours, reference = tokenizers
    assert "ΣΑΣ".lower() == "σας"
    assert ours("ΣΑΣ").tolist() == expected_ids(reference, ["σας"]).tolist()
    assert ours("ΣΑΣ").tolist() != expected_ids(reference, ["ΣΑΣ"]).tolist()


def test_bang_in_a_prompt_is_text_not_padding(vocab_folder):
    """With OpenCLIP's pad token "!", a typed "!" is still BPE text, as in open_clip's tokenizer;
    transformers turns it into the pad token."""
    ours = CLIPTokenizer.from_folder(vocab_folder.parent, pad_token="!")
    ids = ours.encode("wow!!!")
    assert ids == CLIPTokenizer.from_folder(vocab_folder.parent).encode("wow!!!")
    assert ids[-1] == ours.encoder["!</w>"] != ours.pad_id
    row = ours("wow!!!")[0]
    assert row[len(ids) + 1] == ours.eos_id and (row[len(ids) + 2:] == ours.pad_id).all()
    reference = HFCLIPTokenizer.from_pretrained(str(vocab_folder), pad_token="!")
    assert reference("wow!!!", add_special_tokens=False)["input_ids"][-1] == reference.pad_token_id


def test_layout_and_special_ids(tokenizers):
    ours, reference = tokenizers
    assert (ours.bos_id, ours.eos_id) == (ours.vocab_size - 2, ours.vocab_size - 1)
    assert ours.pad_id == (ours.eos_id if ours.pad_token == EOS_TOKEN else 0)  # "!" is id 0
    assert ours.pad_id == reference.pad_token_id
    ids = ours(["a red star", " ".join(["a big blue hexagon"] * 30), ""])
    assert ids[:, 0].tolist() == [ours.bos_id] * 3
    assert ids[1, -1] == ours.eos_id  # truncated: EOS still closes the sequence
    assert ids[2, 1] == ours.eos_id and (ids[2, 2:] == ours.pad_id).all()


def test_decode_round_trip(tokenizers):
    ours, reference = tokenizers
    plain = HFCLIPTokenizer.from_pretrained(reference.name_or_path)  # transformers drops a "!" pad
    assert ours.decode(ours("a tiny purple heart on a white background")[0]) == \
        "a tiny purple heart on a white background"
    for text in TEXTS + HTML_TEXTS:
        if EOS_TOKEN in text:
            continue  # decode drops special tokens, so that prompt cannot come back whole
        ids = ours.encode(text)
        decoded = ours.decode(ids)
        assert ours.encode(decoded) == ids, text
        assert decoded == plain.decode(ids, skip_special_tokens=True), text
        if len(ids) <= 75:  # else the padded row holds a truncated prompt
            assert ours.decode(ours(text)[0]) == decoded, text
    with_specials = ours.decode(ours("a star")[0, :4].tolist(), skip_special_tokens=False)
    assert with_specials == "<|startoftext|>a star <|endoftext|>"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        ours.decode([ours.vocab_size])
    with pytest.raises(ValueError, match="one row"):
        ours.decode(ours(["a", "b"]))


def test_vocab_order_is_clips():
    """256 byte characters, the same with </w>, one entry per merge, then BOS and EOS."""
    vocab, merges = train_bpe(CORPUS, num_merges=50)
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(vocab)))
    base = list(bytes_to_unicode().values())
    assert len(set(base)) == 256 and base[0] == "!"
    assert tokens[:256] == base
    assert tokens[256:512] == [c + "</w>" for c in base]
    assert tokens[512:-2] == ["".join(m) for m in merges] and len(merges) == 50
    assert tokens[-2:] == [BOS_TOKEN, EOS_TOKEN]


def test_train_bpe_merges_most_frequent_pair_first():
    # Sennrich et al.'s example: low x5, lower x2, newest x6, widest x3.
    corpus = ["low"] * 5 + ["lower"] * 2 + ["newest"] * 6 + ["widest"] * 3
    _, merges = train_bpe(corpus, num_merges=3)
    # e s (9) ties s t</w> (9): the smaller pair wins; then es t</w> (9); then l o (7)
    assert merges == [("e", "s"), ("es", "t</w>"), ("l", "o")]
    assert train_bpe(corpus, num_merges=100) == train_bpe(reversed(corpus), num_merges=100)
    _, rare = train_bpe(["xyz"], num_merges=10)
    assert rare == []  # no pair occurs twice
    with pytest.raises(ValueError, match="num_merges"):
        train_bpe(corpus, num_merges=-1)
    with pytest.raises(TypeError, match="strings"):
        train_bpe(["ok", 3], num_merges=1)


def test_written_files(vocab_folder):
    lines = (vocab_folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    assert [tuple(line.split()) for line in lines[1:]] == read_merges(vocab_folder / "merges.txt")
    vocab = json.loads((vocab_folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 512 + len(lines) - 1 + 2
    assert not list(vocab_folder.glob("*.tmp"))


def test_bad_files_and_arguments(tmp_path, vocab_folder):
    ours = CLIPTokenizer.from_files(vocab_folder / "vocab.json", vocab_folder / "merges.txt")
    for bad in (3, None, [], ["ok", 3]):
        with pytest.raises(TypeError):
            ours(bad)
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        read_merges(tmp_path / "merges.txt")
    (tmp_path / "vocab.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not a JSON vocabulary"):
        CLIPTokenizer.from_files(tmp_path / "vocab.json", vocab_folder / "merges.txt")
    vocab = json.loads((vocab_folder / "vocab.json").read_text(encoding="utf-8"))
    with pytest.raises(ValueError, match="do not belong together"):
        CLIPTokenizer(vocab, [("q", "zzz")])
    with pytest.raises(ValueError, match=re.escape(repr(EOS_TOKEN))):
        CLIPTokenizer({k: v for k, v in vocab.items() if k != EOS_TOKEN}, [])
    with pytest.raises(ValueError, match="byte-level alphabet"):
        CLIPTokenizer({**vocab, "a b": len(vocab)}, [])
    with pytest.raises(ValueError, match="do not belong together"):
        CLIPTokenizer(vocab, ["a b"])
    with pytest.raises(ValueError, match="pad token"):
        CLIPTokenizer(vocab, [], pad_token="<pad>")
    with pytest.raises(ValueError, match="context_length"):
        CLIPTokenizer(vocab, [], context_length=1)


def test_missing_files_name_the_paths(tmp_path):
    model = tmp_path / "my-model"
    model.mkdir()
    with pytest.raises(TokenizerFilesMissing) as info:
        CLIPTokenizer.from_folder(model)
    assert str(model / "tokenizer" / "vocab.json") in str(info.value)
    assert str(model / "tokenizer" / "merges.txt") in str(info.value)


def _put_vocab(folder, vocab_folder):
    folder.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((vocab_folder / name).read_bytes())


def test_locate_clip_vocab(tmp_path, monkeypatch, vocab_folder):
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)

    with pytest.raises(TokenizerFilesMissing) as info:
        locate_clip_vocab(model, "tokenizer_2", "stabilityai/stable-diffusion-xl-base-1.0")
    message = str(info.value)
    assert str(model / "tokenizer_2" / "vocab.json") in message
    assert str(model / "tokenizer_2" / "merges.txt") in message
    assert str(hub / "models--openai--clip-vit-large-patch14" / "snapshots") in message

    # the SDXL repo's tokenizer_2 subfolder in the cache; refs/main picks the snapshot
    sdxl = hub / "models--stabilityai--stable-diffusion-xl-base-1.0"
    _put_vocab(sdxl / "snapshots" / "rev1" / "tokenizer_2", vocab_folder)
    (sdxl / "snapshots" / "stale").mkdir()
    (sdxl / "refs").mkdir()
    (sdxl / "refs" / "main").write_text("rev1")
    found = locate_clip_vocab(model, "tokenizer_2", "stabilityai/stable-diffusion-xl-base-1.0")
    assert found == (sdxl / "snapshots" / "rev1" / "tokenizer_2" / "vocab.json",
                     sdxl / "snapshots" / "rev1" / "tokenizer_2" / "merges.txt")

    # OpenAI's repo keeps the files at the snapshot root, found through $HF_HOME/hub too
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    openai = tmp_path / "home" / "hub" / "models--openai--clip-vit-large-patch14" / "snapshots" / "abc"
    _put_vocab(openai, vocab_folder)
    assert locate_clip_vocab(None, "tokenizer", "openai/clip-vit-large-patch14")[0] == openai / "vocab.json"
    assert locate_clip_vocab(model / "unet" / "x.safetensors")[0] == openai / "vocab.json"

    # the model's own folder wins over the cache; a single file looks beside itself
    _put_vocab(model / "tokenizer", vocab_folder)
    assert locate_clip_vocab(model)[0] == model / "tokenizer" / "vocab.json"
    (model / "sd.safetensors").write_bytes(b"")
    assert locate_clip_vocab(model / "sd.safetensors")[0] == model / "tokenizer" / "vocab.json"
    tokenizer = CLIPTokenizer.from_files(*locate_clip_vocab(model))
    assert tokenizer.encode("a red star") == CLIPTokenizer.from_folder(model).encode("a red star")
