"""The CLIP byte-level BPE tokenizer, reimplemented (no transformers, no ftfy).

Ported from openai/CLIP `clip/simple_tokenizer.py`
(https://github.com/openai/CLIP/blob/main/clip/simple_tokenizer.py), which transformers' slow
`CLIPTokenizer` also follows. Every Stable Diffusion text encoder uses this same vocabulary
(open_clip ships OpenAI's `bpe_simple_vocab_16e6`); they differ only in the pad token:
SD1 pads with `<|endoftext|>`, OpenCLIP (SD2, SDXL's second encoder) with `!` (id 0). As in
open_clip's tokenizer, a `!` typed in a prompt stays text (transformers would make it padding).

Text clean-up differs from the original in one way: ftfy is not a dependency, so its fixes
(mojibake, curly quotes, ...) are not applied. Its last step, Unicode NFC normalisation, is.
"""
from __future__ import annotations

import html
import json
import os
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import regex
import torch

from ..errors import TokenizerFilesMissing

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

# The CLIP pre-tokenizer: special tokens, English contractions, runs of letters, single digits,
# runs of other non-space symbols (simple_tokenizer.py, `self.pat`).
_CLIP_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")
_BPE_CACHE_LIMIT = 20_000  # words; a long-running server must not grow the cache forever


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable unicode character, a bijection over the 256 byte values.

    Printable Latin-1 bytes map to themselves; the others (control, space, ...) are shifted to
    256+n so that BPE never sees whitespace or control characters. The dict's order is the
    order of the first 256 vocabulary entries of the real CLIP vocab.
    """
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    byte_values = printable[:]
    code_points = printable[:]
    shift = 0
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            code_points.append(256 + shift)
            shift += 1
    return dict(zip(byte_values, (chr(c) for c in code_points)))


def clean_text(text: str) -> str:
    """NFC-normalise, unescape HTML entities (twice, as CLIP does: `&amp;amp;` -> `&`), collapse
    whitespace runs to one space, strip, lower-case (simple_tokenizer.py basic_clean +
    whitespace_clean + lower)."""
    text = unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text))
    text = _WHITESPACE.sub(" ", text).strip()
    return text.lower()


def pre_tokenize(text: str) -> list[str]:
    """Clean `text` and split it into CLIP words, each spelled in byte-level unicode characters."""
    byte_encoder = bytes_to_unicode()
    return ["".join(byte_encoder[b] for b in word.encode("utf-8"))
            for word in _CLIP_PATTERN.findall(clean_text(text))]


def word_symbols(word: str) -> tuple[str, ...]:
    """A word as its initial BPE symbols: one per character, `</w>` glued to the last one."""
    return tuple(word[:-1]) + (word[-1] + END_OF_WORD,)


class CLIPTokenizer:
    """Text -> CLIP token ids: `tokenizer(["a red star"])` is a LongTensor (B, context_length)
    laid out as BOS, the BPE ids (truncated to context_length - 2), EOS, then pad ids."""

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *,
                 pad_token: str = EOS_TOKEN, context_length: int = 77):
        if not isinstance(vocab, dict) or not vocab:
            raise TypeError(f"vocab must be a non-empty dict token -> id, got {type(vocab).__name__}")
        for token in (BOS_TOKEN, EOS_TOKEN, pad_token):
            if token not in vocab:
                raise ValueError(f"the vocabulary has no {token!r} token; a CLIP vocabulary needs "
                                 f"{BOS_TOKEN!r}, {EOS_TOKEN!r} and the pad token")
        if not isinstance(context_length, int) or context_length < 2:
            raise ValueError(f"context_length must be an int >= 2 (room for BOS and EOS), "
                             f"got {context_length!r}")
        self.encoder = dict(vocab)
        self.decoder = {i: token for token, i in vocab.items()}
        if len(self.decoder) != len(self.encoder):
            raise ValueError("the vocabulary maps several tokens to the same id")
        self.byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        for token in vocab:
            spelled = token[: -len(END_OF_WORD)] if token.endswith(END_OF_WORD) else token
            if token not in (BOS_TOKEN, EOS_TOKEN) and not all(c in self.byte_decoder for c in spelled):
                raise ValueError(f"vocabulary token {token!r} is not spelled in CLIP's byte-level "
                                 f"alphabet: not a CLIP vocab.json")
        self.bpe_ranks: dict[tuple[str, str], int] = {}
        for rank, merge in enumerate(merges):
            if isinstance(merge, str) or len(merge) != 2 or "".join(merge) not in vocab:
                raise ValueError(f"merge #{rank} {merge!r} is not a pair whose concatenation is in "
                                 f"the vocabulary: vocab.json and merges.txt do not belong together")
            self.bpe_ranks[tuple(merge)] = rank
        self.pad_token = pad_token
        self.context_length = context_length
        self._cache: dict[str, tuple[str, ...]] = {}

    # ---- loading ------------------------------------------------------------------------
    @classmethod
    def from_files(cls, vocab_json_path: str | os.PathLike, merges_txt_path: str | os.PathLike,
                   **kwargs) -> "CLIPTokenizer":
        """Load Hugging Face's `vocab.json` + `merges.txt` pair (the `tokenizer/` folder of a
        diffusers model)."""
        vocab_path, merges_path = Path(vocab_json_path), Path(merges_txt_path)
        missing = [p for p in (vocab_path, merges_path) if not p.is_file()]
        if missing:
            raise TokenizerFilesMissing(
                f"CLIP tokenizer files not found: {', '.join(str(p) for p in missing)}. "
                f"A CLIP tokenizer needs vocab.json at {vocab_path} and merges.txt at {merges_path}.")
        try:
            vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{vocab_path} is not a JSON vocabulary: {err}") from None
        if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
            raise ValueError(f"{vocab_path} must hold a JSON object token -> integer id")
        return cls(vocab, read_merges(merges_path), **kwargs)

    @classmethod
    def from_folder(cls, model_folder: str | os.PathLike, subfolder: str = "tokenizer",
                    **kwargs) -> "CLIPTokenizer":
        """Load `<model_folder>/<subfolder>/vocab.json` and `merges.txt`."""
        folder = Path(model_folder) / subfolder
        return cls.from_files(folder / "vocab.json", folder / "merges.txt", **kwargs)

    # ---- ids ------------------------------------------------------------------------------
    @property
    def bos_id(self) -> int:
        return self.encoder[BOS_TOKEN]

    @property
    def eos_id(self) -> int:
        return self.encoder[EOS_TOKEN]

    @property
    def pad_id(self) -> int:
        return self.encoder[self.pad_token]

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    # ---- BPE -------------------------------------------------------------------------------
    def bpe(self, word: str) -> tuple[str, ...]:
        """Apply the merges to one byte-level word, lowest rank first (simple_tokenizer.py bpe)."""
        if word in (BOS_TOKEN, EOS_TOKEN):
            return (word,)  # a literal special token in the prompt stays whole, as in CLIP
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        symbols = word_symbols(word)
        while len(symbols) > 1:
            pairs = set(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if best not in self.bpe_ranks:
                break
            symbols = merge_pair(symbols, best)
        if len(self._cache) >= _BPE_CACHE_LIMIT:
            self._cache.clear()
        self._cache[word] = symbols
        return symbols

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text`: no BOS/EOS, no truncation."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        # A symbol missing from a partial vocabulary becomes <|endoftext|>, transformers' unk.
        unknown = self.eos_id
        return [self.encoder.get(symbol, unknown)
                for word in pre_tokenize(text) for symbol in self.bpe(word)]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """Ids -> text: words separated by single spaces (punctuation becomes its own word).
        With `skip_special_tokens`, BOS, EOS and the padding after EOS are left out; a pad
        token met before EOS (OpenCLIP's "!") is text and stays."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes one row of ids, got a tensor of shape {tuple(ids.shape)}")
            ids = ids.tolist()
        pieces = []
        padding = False
        for i in ids:
            if not isinstance(i, int) or i not in self.decoder:
                raise ValueError(f"token id {i!r} is not in the vocabulary")
            skip = i in (self.bos_id, self.eos_id) or (padding and i == self.pad_id)
            padding = padding or i == self.eos_id
            if not (skip_special_tokens and skip):
                pieces.append(self.decoder[i])
        # Special tokens are plain ASCII, which the byte-level alphabet maps to itself, so the
        # whole string goes through the byte decoder (simple_tokenizer.py decode).
        raw = bytes(self.byte_decoder[c] for c in "".join(pieces))
        return raw.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """One prompt or a list of prompts -> LongTensor (B, context_length)."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not texts:
            raise TypeError(f"expected a str or a non-empty list of str, got {texts!r:.80}")
        out = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.bos_id] + self.encode(text)[: self.context_length - 2] + [self.eos_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


def merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Replace every non-overlapping occurrence of `pair` in `symbols`, left to right."""
    first, second = pair
    merged: list[str] = []
    i = 0
    while i < len(symbols):
        if i < len(symbols) - 1 and symbols[i] == first and symbols[i + 1] == second:
            merged.append(first + second)
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


def read_merges(path: str | os.PathLike) -> list[tuple[str, str]]:
    """merges.txt -> [(left, right), ...] in rank order. The `#version: 0.2` header line is
    skipped, as transformers does; blank lines (the trailing newline) are ignored."""
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a UTF-8 merges file: {err}") from None
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = []
    for number, line in enumerate(lines, start=2):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path} line {number}: expected two symbols separated by a space, "
                             f"got {line!r:.80}")
        merges.append((parts[0], parts[1]))
    return merges


# Hugging Face repos that hold the CLIP vocabulary, with the folder inside a snapshot. All hold
# the same vocab.json + merges.txt, so any one found serves every encoder (the pad token is the
# caller's choice, not the files').
HF_CLIP_VOCAB_SOURCES: tuple[tuple[str, str], ...] = (
    ("openai/clip-vit-large-patch14", ""),
    ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", ""),
    ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", ""),
    ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer"),
    ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer_2"),
    ("stabilityai/stable-diffusion-2-1", "tokenizer"),
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"),
    ("runwayml/stable-diffusion-v1-5", "tokenizer"),
)


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def _snapshots(repo: str) -> list[Path]:
    """Snapshot folders of a cached repo, the one `refs/main` names first, then newest first."""
    repo_dir = hf_hub_cache() / ("models--" + repo.replace("/", "--"))
    snapshots_dir = repo_dir / "snapshots"
    if not snapshots_dir.is_dir():
        return []
    found = sorted((p for p in snapshots_dir.iterdir() if p.is_dir()),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    main_ref = repo_dir / "refs" / "main"
    if main_ref.is_file():
        main = snapshots_dir / main_ref.read_text(encoding="utf-8").strip()
        found = [main] + [p for p in found if p != main] if main.is_dir() else found
    return found


def locate_clip_vocab(model_path: str | os.PathLike | None, subfolder: str = "tokenizer",
                      hf_repo: str | Sequence[str] = ()) -> tuple[Path, Path]:
    """(vocab.json, merges.txt) for a model: first `<model_path>/<subfolder>/` (for a
    single-file checkpoint, next to the file), then the Hugging Face cache (`hf_repo`, then the
    well-known CLIP and Stable Diffusion repos). Raises TokenizerFilesMissing naming the paths
    where the two files can be put."""
    folders: list[Path] = []
    if model_path is not None:
        model_path = Path(model_path)
        model_dir = model_path if model_path.is_dir() else model_path.parent
        folders.append(model_dir / subfolder)
    repos = [hf_repo] if isinstance(hf_repo, str) else list(hf_repo)
    sources = [(repo, inner) for repo in repos for inner in (subfolder, "")] + list(HF_CLIP_VOCAB_SOURCES)
    for repo, inner in sources:
        folders.extend(snapshot / inner for snapshot in _snapshots(repo))
    for folder in folders:
        vocab, merges = folder / "vocab.json", folder / "merges.txt"
        if vocab.is_file() and merges.is_file():
            return vocab, merges

    hub_example = hf_hub_cache() / "models--openai--clip-vit-large-patch14" / "snapshots" / "<revision>"
    where = (f"{folders[0] / 'vocab.json'} and {folders[0] / 'merges.txt'}" if model_path is not None
             else f"{hub_example / 'vocab.json'} and {hub_example / 'merges.txt'}")
    raise TokenizerFilesMissing(
        "The CLIP tokenizer vocabulary (vocab.json + merges.txt) was not found. Put the two files "
        f"at {where}, or download the Hugging Face repo openai/clip-vit-large-patch14 (which puts "
        f"them in {hub_example}/); every Stable Diffusion text encoder uses these same files. "
        f"Searched: {', '.join(str(f) for f in folders) or 'nothing (no model folder, empty cache)'}.")
