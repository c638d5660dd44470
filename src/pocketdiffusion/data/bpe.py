"""Learn a CLIP-compatible byte-level BPE vocabulary from a caption corpus.

The result loads in `models.tokenizer.CLIPTokenizer` (and in transformers' CLIPTokenizer) like
the real CLIP vocabulary: words are split by the same cleaning and regex, merges are learned
within words with the `</w>` end-of-word marker (Sennrich et al. 2016, "Neural Machine
Translation of Rare Words with Subword Units"), and the vocabulary is laid out in the order of
openai/CLIP simple_tokenizer.py: 256 byte characters, the same with `</w>`, one entry per
merge, then `<|startoftext|>` and `<|endoftext|>`.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

from ..models.tokenizer import (BOS_TOKEN, END_OF_WORD, EOS_TOKEN, bytes_to_unicode, merge_pair,
                                pre_tokenize, word_symbols)

MERGES_HEADER = "#version: 0.2"


def train_bpe(texts: Iterable[str], num_merges: int, *,
              min_frequency: int = 2) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn at most `num_merges` merges, most frequent pair first, from `texts`.

    Stops early when no pair occurs `min_frequency` times. Ties go to the lexicographically
    smallest pair, so the result does not depend on dict order. A pair whose concatenation is
    already a token (reachable by another merge order) is skipped: every merge adds exactly one
    new vocabulary entry. Returns (vocab token -> id, merges in rank order).
    """
    if not isinstance(num_merges, int) or num_merges < 0:
        raise ValueError(f"num_merges must be an int >= 0, got {num_merges!r}")
    word_counts: Counter[str] = Counter()
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"texts must be strings, got {type(text).__name__}")
        word_counts.update(w for w in pre_tokenize(text) if w not in (BOS_TOKEN, EOS_TOKEN))

    base = list(bytes_to_unicode().values())
    tokens = base + [c + END_OF_WORD for c in base]
    known = set(tokens)

    words = [list(word_symbols(w)) for w in word_counts]
    freqs = list(word_counts.values())
    pair_counts: Counter[tuple[str, str]] = Counter()
    pair_words: defaultdict[tuple[str, str], set[int]] = defaultdict(set)  # pair -> word indices
    for index, (symbols, freq) in enumerate(zip(words, freqs)):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += freq
            pair_words[pair].add(index)

    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        candidates = [(-count, pair) for pair, count in pair_counts.items()
                      if count >= min_frequency and pair[0] + pair[1] not in known]
        if not candidates:
            break
        _, best = min(candidates)
        merges.append(best)
        tokens.append(best[0] + best[1])
        known.add(best[0] + best[1])
        # Re-count only the words that contain the merged pair.
        for index in pair_words.pop(best):
            old, freq = words[index], freqs[index]
            new = list(merge_pair(tuple(old), best))
            for pair in zip(old, old[1:]):
                pair_counts[pair] -= freq
                if pair_counts[pair] <= 0:
                    del pair_counts[pair]
            for pair in zip(new, new[1:]):
                pair_counts[pair] += freq
                pair_words[pair].add(index)
            words[index] = new
        pair_counts.pop(best, None)

    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, merges


def write_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], folder: str | os.PathLike) -> Path:
    """Write `vocab.json` and `merges.txt` (with transformers' `#version: 0.2` header) into
    `folder`, each file atomically (written aside, then renamed). Returns the folder."""
    for token in (BOS_TOKEN, EOS_TOKEN):
        if token not in vocab:
            raise ValueError(f"vocab has no {token!r}: not a CLIP vocabulary")
    for merge in merges:
        if len(merge) != 2 or any(not s or " " in s or "\n" in s for s in merge):
            raise ValueError(f"merge {merge!r} is not a pair of non-empty symbols without spaces")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomic(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    _write_atomic(folder / "merges.txt",
                  "\n".join([MERGES_HEADER] + [f"{a} {b}" for a, b in merges]) + "\n")
    return folder


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
