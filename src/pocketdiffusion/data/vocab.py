"""The tokenizer vocabulary of the project's own small model, learned from the shapes captions.

A CLIP-layout BPE vocabulary (data/bpe.py) in which every word the caption templates can write is
one token, padded with never-produced placeholder tokens to exactly SHAPES_VOCAB_SIZE entries so
that the ids match the SHAPES text encoder: `<|startoftext|>` = 1022, `<|endoftext|>` = 1023
(config.SHAPES: vocab_size 1024, eos_token_id 1023), as in the real CLIP vocabulary where the two
special tokens are the last two ids.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..config import SHAPES_VOCAB_SIZE
from ..models.tokenizer import BOS_TOKEN, EOS_TOKEN, CLIPTokenizer, pre_tokenize
from .bpe import train_bpe
from .shapes import COLOR_NAMES, POSITION_PHRASES, RELATIONS, SHAPES, SIZES, sample_captioned

# Spelled in printable ASCII (CLIP's byte alphabet maps it to itself) but never produced: the
# pre-tokenizer splits "<|unused7|>" into "<|", "unused", "7", "|>", and no merge builds it.
PLACEHOLDER = "<|unused{}|>"
# Words of the templates beyond the attribute names (shapes.caption's glue).
TEMPLATE_WORDS = ("a", "an", "on", "background", "with", ",")


def template_words() -> list[str]:
    """Every word a caption can contain, as the CLIP pre-tokenizer splits it."""
    phrases = [*COLOR_NAMES, *SHAPES, *SIZES, *POSITION_PHRASES.values(), *RELATIONS, *TEMPLATE_WORDS]
    return sorted({word for phrase in phrases for word in pre_tokenize(phrase)})


def caption_corpus(n: int = 20000, seed: int = 0) -> list[str]:
    """n captions drawn from `seed` with the training distribution of sample_scene()."""
    _, captions = sample_captioned(np.random.default_rng(seed), n)
    return captions


def build_shapes_vocab(num_merges: int = 500, *, corpus_size: int = 20000,
                       seed: int = 0) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) for the SHAPES text encoder: exactly SHAPES_VOCAB_SIZE entries, every
    template word a single token. Learning stops by itself once every corpus word is one token
    (a few hundred merges), so `num_merges` is only an upper bound."""
    words = template_words()
    # The template words once each (twice: train_bpe ignores pairs seen once) on top of the
    # corpus guarantee that a rare word is learned even when the corpus happens to miss it.
    texts = caption_corpus(corpus_size, seed) + [" ".join(words)] * 2
    vocab, merges = train_bpe(texts, num_merges)
    if len(vocab) > SHAPES_VOCAB_SIZE:
        raise ValueError(f"{len(vocab)} tokens do not fit the SHAPES text encoder's "
                         f"{SHAPES_VOCAB_SIZE}: lower num_merges (got {num_merges})")
    tokenizer = CLIPTokenizer(vocab, merges)
    split = [w for w in words if len(tokenizer.bpe(w)) != 1]
    if split:
        raise ValueError(f"with {len(merges)} merges the words {split} are still several tokens: "
                         f"raise num_merges (got {num_merges})")
    # CLIP order: bytes, bytes + </w>, merges, then (here) placeholders, then the two specials last.
    ordinary = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1]) if t not in (BOS_TOKEN, EOS_TOKEN)]
    padding = [PLACEHOLDER.format(i) for i in range(SHAPES_VOCAB_SIZE - 2 - len(ordinary))]
    tokens = ordinary + padding + [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, merges


@lru_cache(maxsize=1)
def _cached_vocab() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    vocab, merges = build_shapes_vocab()
    return tuple(vocab.items()), tuple(merges)


def shapes_tokenizer() -> CLIPTokenizer:
    """The SHAPES model's tokenizer (built once per process, about a second)."""
    vocab, merges = _cached_vocab()
    return CLIPTokenizer(dict(vocab), list(merges))


__all__ = ["build_shapes_vocab", "caption_corpus", "shapes_tokenizer", "template_words"]
