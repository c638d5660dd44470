"""Prompt text -> text-encoder conditioning, in two dialects.

A1111 syntax (the default), ported from AUTOMATIC1111/stable-diffusion-webui:
  - modules/prompt_parser.py `parse_prompt_attention`: `(word)` x1.1, `[word]` /1.1,
    `(word:1.3)`, nesting multiplies, `\\(` escapes, `BREAK`;
  - modules/sd_hijack_clip.py `TextConditionalModel.tokenize_line` / `process_tokens`: prompts of
    any length in chunks of 75 tokens (+ BOS/EOS), the comma backtrack, per-token weights;
  - modules/sd_emphasis.py `EmphasisOriginal`: weights applied to the encoder output, mean kept;
  - modules/sd_samplers_cfg_denoiser.py `pad_cond_uncond` / `pad_cond_uncond_v0`: equal lengths
    for the prompt and the negative prompt;
  - modules/sd_models_xl.py `get_learned_conditioning`: SDXL's empty negative prompt is zeros.
  https://github.com/AUTOMATIC1111/stable-diffusion-webui/tree/master/modules
  Not supported: textual-inversion embeddings (A1111's `embedding_db` look-up in tokenize_line;
  an embedding's name is tokenized as plain text here), prompt editing `[a:b:when]`, alternation
  `[a|b]` and composable `AND` (A1111's prompt schedules, a layer above this one).

plain syntax: exactly what diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline
`encode_prompt` compute (no weighting syntax, truncation to 77 tokens), so that pictures match
diffusers seed for seed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from ..config import PromptEncoding
from ..models.tokenizer import EOS_TOKEN

# One token class per line, tried in order (prompt_parser.py `re_attention`, master, which allows
# spaces around the number in `(word: 1.3 )`).
_RE_ATTENTION = re.compile(r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""", re.X)
_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
ROUND_BRACKET_MULTIPLIER = 1.1
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1
BREAK_WEIGHT = -1.0  # ("BREAK", -1): the marker parse_prompt_attention leaves for a chunk break

EncoderCall = Callable[[torch.Tensor], tuple[torch.Tensor, "torch.Tensor | None"]]
EMPHASIS_MODES = ("original", "no_norm", "ignore", "none")  # A1111's opts.emphasis, lower-cased
PAD_MODES = ("empty", "last", "none")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split `text` into (fragment, weight) pairs, A1111's prompt_parser.py
    `parse_prompt_attention`, behaviour for behaviour:

    - `(abc)` multiplies abc's weight by 1.1, `[abc]` divides it by 1.1, `(abc:3.12)` multiplies
      it by 3.12; nesting multiplies;
    - `\\(`, `\\)`, `\\[`, `\\]` are the literal characters, `\\\\` a backslash (a lone backslash
      vanishes);
    - a bracket never closed applies to everything after it, a closing bracket never opened is
      text;
    - `BREAK`, upper-case and a word of its own, yields ("BREAK", -1) (inside brackets that weight
      is multiplied too, and it is then text, as in A1111);
    - runs of equal weight are merged; an empty text gives [("", 1.0)].

    >>> parse_prompt_attention('an (important) word')
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    _check_prompt(text, "text")
    parsed: list[list] = []  # [fragment, weight], mutable while brackets close
    round_brackets: list[int] = []  # index into `parsed` where each open "(" started
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for item in parsed[start:]:
            item[1] *= multiplier

    for match in _RE_ATTENTION.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            parsed.append([piece[1:], 1.0])
        elif piece == "(":
            round_brackets.append(len(parsed))
        elif piece == "[":
            square_brackets.append(len(parsed))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), _parse_weight(weight, text))
        elif piece == ")" and round_brackets:
            multiply_range(round_brackets.pop(), ROUND_BRACKET_MULTIPLIER)
        elif piece == "]" and square_brackets:
            multiply_range(square_brackets.pop(), SQUARE_BRACKET_MULTIPLIER)
        else:
            for i, part in enumerate(_RE_BREAK.split(piece)):
                if i > 0:
                    parsed.append(["BREAK", BREAK_WEIGHT])
                parsed.append([part, 1.0])

    for start in round_brackets:
        multiply_range(start, ROUND_BRACKET_MULTIPLIER)
    for start in square_brackets:
        multiply_range(start, SQUARE_BRACKET_MULTIPLIER)
    if not parsed:
        parsed = [["", 1.0]]

    merged = [parsed[0]]
    for fragment, weight in parsed[1:]:
        if merged[-1][1] == weight:
            merged[-1][0] += fragment
        else:
            merged.append([fragment, weight])
    return [(fragment, weight) for fragment, weight in merged]


def _parse_weight(weight: str, text: str) -> float:
    try:
        return float(weight)
    except ValueError:
        raise ValueError(f"prompt weight {weight!r} is not a number (in {text!r:.100}); write a "
                         f"weight as (word:1.3)") from None


@dataclass
class PromptChunk:
    """One text-encoder input: `tokens` = BOS, 75 prompt tokens (EOS-filled), EOS, with every
    slot after the first EOS set to the tokenizer's pad id; `weights` one per token, 1.0 at
    BOS/EOS/padding (sd_hijack_clip.py `PromptChunk`, `multipliers` renamed)."""

    tokens: list[int]
    weights: list[float]


def tokenize_weighted(tokenizer, text: str, *, chunk_length: int = 75, comma_backtrack: int = 20,
                      parse_attention: bool = True) -> list[PromptChunk]:
    """A prompt of any length -> chunks of `chunk_length + 2` tokens with per-token weights,
    sd_hijack_clip.py `TextConditionalModel.tokenize_line`:

    - each weighted fragment is tokenized on its own (no BOS/EOS) and its tokens carry its weight;
    - when a chunk is full and the last comma in it is at most `comma_backtrack` tokens back,
      the tokens after that comma move to the next chunk (A1111's `comma_padding_backtrack`,
      0 = off);
    - `BREAK` closes the current chunk (even an empty one); a trailing BREAK adds no chunk;
    - an empty prompt is one chunk of BOS, EOS and padding.

    A1111 fills a chunk with EOS and, in `process_tokens`, overwrites everything after the first
    EOS with the pad id (`id_pad`: EOS for OpenAI CLIP, "!" for OpenCLIP); the chunks here carry
    the ids the encoder finally sees. `parse_attention=False` is A1111's emphasis "None": the
    prompt is one fragment of weight 1, brackets and BREAK are text. Textual-inversion
    embeddings are not supported.
    """
    _check_prompt(text, "prompt")
    if not isinstance(chunk_length, int) or isinstance(chunk_length, bool) or chunk_length < 1:
        raise ValueError(f"chunk_length must be an int >= 1, got {chunk_length!r}")
    if not isinstance(comma_backtrack, int) or isinstance(comma_backtrack, bool) or comma_backtrack < 0:
        raise ValueError(f"comma_backtrack must be an int >= 0 (0 = off), got {comma_backtrack!r}")
    parsed = parse_prompt_attention(text) if parse_attention else [(text, 1.0)]
    bos, eos, pad = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
    comma = tokenizer.encoder.get(",</w>")  # A1111: vocab.get(',</w>', None)

    chunks: list[PromptChunk] = []
    tokens: list[int] = []  # the current chunk's prompt tokens, without BOS/EOS
    weights: list[float] = []
    last_comma = -1  # index in `tokens` of the current chunk's last comma

    def next_chunk() -> None:
        nonlocal tokens, weights, last_comma
        fill = chunk_length - len(tokens)
        ids = [bos] + tokens + [eos] * fill + [eos]
        first_eos = ids.index(eos)
        ids[first_eos + 1:] = [pad] * (len(ids) - first_eos - 1)
        chunks.append(PromptChunk(ids, [1.0] + weights + [1.0] * fill + [1.0]))
        tokens, weights, last_comma = [], [], -1

    for fragment, weight in parsed:
        if fragment == "BREAK" and weight == BREAK_WEIGHT:
            next_chunk()
            continue
        for token in tokenizer.encode(fragment):
            if token == comma:
                last_comma = len(tokens)
            elif (comma_backtrack != 0 and len(tokens) == chunk_length and last_comma != -1
                  and len(tokens) - last_comma <= comma_backtrack):
                cut = last_comma + 1
                moved_tokens, moved_weights = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                next_chunk()
                tokens, weights = moved_tokens, moved_weights
            if len(tokens) == chunk_length:
                next_chunk()
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        next_chunk()
    return chunks


def apply_emphasis(hidden: torch.Tensor, weights: Sequence[float], emphasis: str = "original") -> torch.Tensor:
    """Multiply each token's hidden state by its weight (sd_emphasis.py). "original"
    (`EmphasisOriginal`) then rescales so the mean over the whole (1, T, W) tensor is unchanged:
    `z *= w[..., None]; z *= original_mean / new_mean`; "no_norm" skips the rescale; "ignore" and
    "none" leave `hidden` as it is. The arithmetic is fp32 (A1111's multipliers are an fp32
    tensor); the result has `hidden`'s dtype."""
    if emphasis not in EMPHASIS_MODES:
        raise ValueError(f"emphasis must be one of {EMPHASIS_MODES}, got {emphasis!r}")
    if emphasis in ("ignore", "none"):
        return hidden
    z = hidden.float()
    original_mean = z.mean()
    multipliers = torch.tensor(list(weights), dtype=torch.float32, device=z.device)  # (T,)
    z = z * multipliers.reshape(1, -1, 1)  # (1, T, W)
    if emphasis == "original":
        z = z * (original_mean / z.mean())
    return z.to(hidden.dtype)


def encode_prompt_chunks(encoder_call: EncoderCall, chunks: Sequence[PromptChunk], *,
                         emphasis: str = "original") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the encoder on each chunk, weight it (`apply_emphasis`) and join the chunks along the
    token axis: (1, 77 * n_chunks, W), and the pooled output of the FIRST chunk (or None).
    sd_hijack_clip.py `TextConditionalModel.forward` / `process_tokens` for one prompt.

    `encoder_call(ids (1, 77) long) -> (hidden (1, 77, W), pooled (1, P) or None)`; see
    `clip_encoder_call`."""
    if isinstance(chunks, PromptChunk) or not isinstance(chunks, (list, tuple)) or not chunks:
        raise TypeError(f"chunks must be a non-empty list of PromptChunk (from tokenize_weighted), "
                        f"got {chunks!r:.80}")
    hiddens = []
    first_pooled = None
    with torch.no_grad():
        for index, chunk in enumerate(chunks):
            if not isinstance(chunk, PromptChunk) or len(chunk.tokens) != len(chunk.weights):
                raise ValueError(f"chunk {index} is not a PromptChunk with as many weights as tokens")
            ids = torch.tensor([chunk.tokens], dtype=torch.long)  # (1, T)
            hidden, pooled = encoder_call(ids)
            if hidden.dim() != 3 or tuple(hidden.shape[:2]) != (1, len(chunk.tokens)):
                raise ValueError(f"encoder_call must return hidden states (1, {len(chunk.tokens)}, "
                                 f"width), got {tuple(hidden.shape)}")
            hiddens.append(apply_emphasis(hidden, chunk.weights, emphasis))
            if index == 0:
                first_pooled = pooled
    return torch.cat(hiddens, dim=1), first_pooled  # (1, T * n_chunks, W)


def clip_encoder_call(model, encoding: PromptEncoding, pooled: bool, *,
                      device: torch.device | str | None = None) -> EncoderCall:
    """`encoder_call` for a CLIPTextModel read as `encoding` says (hidden layer, final norm).
    Ids go to `device`, by default the device of the model's first parameter."""
    if not isinstance(encoding, PromptEncoding):
        raise TypeError(f"encoding must be a PromptEncoding, got {type(encoding).__name__}")
    target = torch.device(device) if device is not None else _module_device(model)

    def call(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return model(ids.to(target), layer=encoding.layer, final_norm=encoding.final_norm, pooled=pooled)

    return call


def encode_prompt_pair(tokenizers, encoders, encodings, prompt: str, negative_prompt: str, *,
                       clip_skip: int | None = None, emphasis: str = "original", pad: str = "empty",
                       chunk_length: int = 75, comma_backtrack: int = 20,
                       zero_empty_negative: bool | None = None, device: torch.device | str | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A1111 conditioning for one prompt and its negative, with 1 (SD1/SD2) or 2 (SDXL) text
    encoders: (cond, uncond) of shape (1, 77 * n_chunks, sum of widths) and the pooled outputs
    (1, P) of the last encoder with a text projection (SDXL's second), None without one.

    - Each encoder tokenizes and weights the prompt on its own (A1111 wraps each SDXL embedder
      separately); SDXL's hidden states are concatenated along the channel axis.
    - `clip_skip` is A1111's "Clip skip" (1 = last layer, 2 = penultimate, with the final layer
      norm). As in A1111 it applies to SD1's OpenAI CLIP only (one encoder padding with EOS):
      SD2's and SDXL's embedders keep their family's layer.
    - `zero_empty_negative` (default: on for two encoders) is sd_models_xl.py: an SDXL negative
      prompt that is exactly "" becomes zeros (hidden states and pooled), one chunk long.
    - `pad` makes the two the same length: "empty" appends the encoded empty prompt "" chunk by
      chunk to the shorter one (A1111's "Pad prompt/negative prompt", `pad_cond_uncond`); "last"
      repeats uncond's last vector, or cuts uncond to cond's length (`pad_cond_uncond_v0`, what
      A1111's DDIM always did before 1.6.0); "none" returns them as they are (A1111's default: the two then go through
      the UNet in separate passes).
    - `emphasis`: "original" (A1111's default), "no_norm", "ignore", "none" (brackets are text).
    """
    _check_prompt(prompt, "prompt")
    _check_prompt(negative_prompt, "negative_prompt")
    if emphasis not in EMPHASIS_MODES:
        raise ValueError(f"emphasis must be one of {EMPHASIS_MODES}, got {emphasis!r}")
    if pad not in PAD_MODES:
        raise ValueError(f"pad must be one of {PAD_MODES}, got {pad!r}")
    tokenizers, encoders, encodings = _check_text_encoders(tokenizers, encoders, encodings)
    encodings = _a1111_clip_skip(encoders, encodings, clip_skip)
    pooled_index = _pooled_encoder_index(encoders)
    calls = [clip_encoder_call(model, encoding, i == pooled_index, device=device)
             for i, (model, encoding) in enumerate(zip(encoders, encodings))]

    def encode(text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        hiddens, pooled = [], None
        for i, (tokenizer, call) in enumerate(zip(tokenizers, calls)):
            chunks = tokenize_weighted(tokenizer, text, chunk_length=chunk_length,
                                       comma_backtrack=comma_backtrack, parse_attention=emphasis != "none")
            hidden, first_pooled = encode_prompt_chunks(call, chunks, emphasis=emphasis)
            hiddens.append(hidden)
            if i == pooled_index:
                pooled = first_pooled
        if len({hidden.shape[1] for hidden in hiddens}) != 1:
            raise ValueError(f"the text encoders' tokenizers split {text!r:.60} into different numbers "
                             f"of chunks ({[h.shape[1] for h in hiddens]} tokens): they must share "
                             f"one vocabulary")
        return torch.cat(hiddens, dim=-1), pooled  # (1, T, sum of widths)

    cond, pooled_cond = encode(prompt)
    if zero_empty_negative is None:
        zero_empty_negative = len(encoders) == 2
    if zero_empty_negative and negative_prompt == "":
        uncond = cond.new_zeros((1, chunk_length + 2, cond.shape[-1]))
        pooled_uncond = None if pooled_cond is None else torch.zeros_like(pooled_cond)
    else:
        uncond, pooled_uncond = encode(negative_prompt)
    cond, uncond = _pad_cond_uncond(cond, uncond, pad, lambda: encode("")[0])
    return cond, uncond, pooled_cond, pooled_uncond


def _pad_cond_uncond(cond: torch.Tensor, uncond: torch.Tensor, pad: str,
                     empty_prompt: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """sd_samplers_cfg_denoiser.py `pad_cond_uncond` ("empty") and `pad_cond_uncond_v0` ("last")."""
    if pad == "none" or cond.shape[1] == uncond.shape[1]:
        return cond, uncond
    if pad == "last":
        if uncond.shape[1] < cond.shape[1]:
            repeated = uncond[:, -1:].repeat(1, cond.shape[1] - uncond.shape[1], 1)  # (1, extra, W)
            return cond, torch.cat([uncond, repeated], dim=1)
        return cond, uncond[:, :cond.shape[1]]
    empty = empty_prompt()  # (1, 77, W)
    num_repeats = (cond.shape[1] - uncond.shape[1]) // empty.shape[1]
    if num_repeats < 0:
        cond = torch.cat([cond, empty.repeat(1, -num_repeats, 1)], dim=1)
    else:
        uncond = torch.cat([uncond, empty.repeat(1, num_repeats, 1)], dim=1)
    return cond, uncond


def encode_prompt_plain(tokenizers, encoders, encodings, prompt: str, negative_prompt: str | None = None,
                        *, clip_skip: int | None = None, force_zeros_for_empty_prompt: bool = True,
                        device: torch.device | str | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """diffusers' `encode_prompt` for one prompt: StableDiffusionPipeline with one text encoder,
    StableDiffusionXLPipeline with two. Returns (cond, uncond) (1, 77, sum of widths) and the
    pooled outputs as `encode_prompt_pair` does.

    The text is taken literally (no weighting, no BREAK) and cut to 75 tokens; each encoder reads
    its `encoding`'s layer (SDXL: hidden_states[-2] without final norm; pooled = text_encoder_2's
    text_embeds). `clip_skip` uses A1111's numbering here too (1 = no skip; diffusers'
    `clip_skip` is one less) and, as in diffusers, moves every encoder `clip_skip - 1` layers
    back for the PROMPT only: diffusers encodes the negative prompt at the normal layer. A
    negative prompt of None is "", except for SDXL with `force_zeros_for_empty_prompt` (the
    SDXL pipelines' default), where it is zeros.
    """
    _check_prompt(prompt, "prompt")
    if negative_prompt is not None:
        _check_prompt(negative_prompt, "negative_prompt")
    tokenizers, encoders, encodings = _check_text_encoders(tokenizers, encoders, encodings)
    layers_back = 0 if clip_skip is None else _check_clip_skip(clip_skip) - 1
    pooled_index = _pooled_encoder_index(encoders)

    def encode(text: str, back: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        hiddens, pooled = [], None
        for i, (tokenizer, model, encoding) in enumerate(zip(tokenizers, encoders, encodings)):
            encoding = replace(encoding, layer=_layer_back(encoding.layer, back, model.config.layers, clip_skip))
            call = clip_encoder_call(model, encoding, i == pooled_index, device=device)
            hidden, encoder_pooled = call(tokenizer(text))  # ids (1, 77): BOS, text[:75], EOS, pad
            hiddens.append(hidden)
            if i == pooled_index:
                pooled = encoder_pooled
        return torch.cat(hiddens, dim=-1), pooled  # (1, 77, sum of widths)

    with torch.no_grad():
        cond, pooled_cond = encode(prompt, layers_back)
        if negative_prompt is None and len(encoders) == 2 and force_zeros_for_empty_prompt:
            uncond = torch.zeros_like(cond)
            pooled_uncond = None if pooled_cond is None else torch.zeros_like(pooled_cond)
        else:
            uncond, pooled_uncond = encode(negative_prompt or "", 0)
    return cond, uncond, pooled_cond, pooled_uncond


# ---- checks and small helpers -------------------------------------------------------------------
def _check_prompt(text, name: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str (one prompt), got {type(text).__name__}: {text!r:.60}")


def _check_clip_skip(clip_skip) -> int:
    if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or clip_skip < 1:
        raise ValueError(f"clip_skip must be an int >= 1 (1 = last layer, 2 = penultimate), "
                         f"got {clip_skip!r}")
    return clip_skip


def _layer_back(layer: int, back: int, n_layers: int, clip_skip: int | None) -> int:
    """`layer` moved `back` layers towards the embeddings, as a negative hidden-state index."""
    if not -(n_layers + 1) <= layer <= n_layers:
        raise ValueError(f"PromptEncoding.layer {layer} is not a hidden state of a {n_layers}-layer "
                         f"text encoder (valid: {-(n_layers + 1)} to {n_layers})")
    index = layer % (n_layers + 1) - back  # into [embeddings, layer 1, ..., layer n]
    if index < 0:
        raise ValueError(f"clip_skip {clip_skip} goes past the first layer of a {n_layers}-layer "
                         f"text encoder")
    return index - (n_layers + 1)


def _a1111_clip_skip(encoders, encodings: tuple[PromptEncoding, ...],
                     clip_skip: int | None) -> tuple[PromptEncoding, ...]:
    """A1111 reads "Clip skip" in FrozenCLIPEmbedderWithCustomWords.encode_with_transformers
    only (SD1): hidden_states[-clip_skip] through the final layer norm."""
    if clip_skip is None:
        return encodings
    _check_clip_skip(clip_skip)
    is_sd1 = len(encodings) == 1 and encodings[0].pad_token == EOS_TOKEN
    if not is_sd1:
        return encodings
    n_layers = encoders[0].config.layers
    if clip_skip > n_layers:
        raise ValueError(f"clip_skip {clip_skip} is larger than the text encoder's {n_layers} layers")
    return (replace(encodings[0], layer=-clip_skip, final_norm=True),)


def _check_text_encoders(tokenizers, encoders, encodings):
    groups = []
    for name, group in (("tokenizers", tokenizers), ("encoders", encoders), ("encodings", encodings)):
        if not isinstance(group, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple (one entry per text encoder), "
                            f"got {type(group).__name__}")
        groups.append(tuple(group))
    tokenizers, encoders, encodings = groups
    if not 1 <= len(encoders) <= 2 or len(tokenizers) != len(encoders) or len(encodings) != len(encoders):
        raise ValueError(f"expected 1 (SD1/SD2) or 2 (SDXL) text encoders with one tokenizer and one "
                         f"PromptEncoding each, got {len(tokenizers)} tokenizers, {len(encoders)} "
                         f"encoders, {len(encodings)} encodings")
    for i, (tokenizer, encoder, encoding) in enumerate(zip(tokenizers, encoders, encodings)):
        if not isinstance(encoding, PromptEncoding):
            raise TypeError(f"encodings[{i}] must be a PromptEncoding, got {type(encoding).__name__}")
        if not hasattr(encoder, "config") or not callable(encoder):
            raise TypeError(f"encoders[{i}] must be a CLIPTextModel, got {type(encoder).__name__}")
        if getattr(tokenizer, "pad_token", None) != encoding.pad_token:
            raise ValueError(f"tokenizers[{i}] pads with {getattr(tokenizer, 'pad_token', None)!r} but "
                             f"its encoder expects {encoding.pad_token!r} (PromptEncoding.pad_token): "
                             f"build the tokenizer with pad_token={encoding.pad_token!r}")
    return tokenizers, encoders, encodings


def _pooled_encoder_index(encoders) -> int | None:
    """The last encoder with a text projection (SDXL's OpenCLIP bigG), None if there is none."""
    with_projection = [i for i, e in enumerate(encoders) if e.config.projection_dim is not None]
    return with_projection[-1] if with_projection else None


def _module_device(model) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")
