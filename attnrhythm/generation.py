"""Prompts, sampling and token strings for the analysis (METHOD.md section 5).

Prompt styles:

* ``"paper"``: the paper's plain-text prompt (``data.paper_prompt``), for base models as in the
  paper (Qwen3-4B-Base).
* ``"chat"``: the tokenizer's chat template over ``data.chat_messages`` (same system line and
  Context/Question fields), for instruct models.
* ``"auto"`` (**Decision**, the CLI default): ``chat`` for instruct models, ``paper`` otherwise.
  A model counts as instruct when its tokenizer has a chat template and its name says so
  (``instruct``, ``chat`` or ``-it``), or it is the embedded ``smollm2-135m`` (SmolLM2-135M-
  *Instruct*).  With the paper's prompt SmolLM2 answers in a line or two and often drifts into a
  new question; with its chat template it writes step-by-step solutions, which is what the
  rhythm analysis needs.

Sampling is plain temperature sampling (no top-k, top-p, min-p or repetition penalty, whatever
the model's generation_config says: the paper states only T = 0.7).
Each batch is seeded from ``seed`` and the ids of its problems, inside a forked RNG, so a run
is reproducible for a given seed and batch size and the caller's RNG state is left alone.
A response ends at its first end-of-sequence token, which is not part of the response.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import torch

from .data import Problem, chat_messages, paper_prompt

PROMPT_STYLES = ("auto", "paper", "chat")
_INSTRUCT_NAME = re.compile(r"instruct|chat|-it\b", re.IGNORECASE)
_INSTRUCT_EMBEDDED = {"smollm2-135m"}


@dataclass
class Sampled:
    """One sampled response: token ids without the final end-of-sequence token."""

    token_ids: list[int]
    finish_reason: str  # "eos" or "length"


def resolve_prompt_style(style: str, tokenizer, model_name: str = "") -> str:
    """'auto' -> 'chat' or 'paper' (see the module docstring); checks that 'chat' is possible."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt must be one of {PROMPT_STYLES}, got {style!r}")
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if style == "auto":
        instruct = model_name in _INSTRUCT_EMBEDDED or bool(_INSTRUCT_NAME.search(model_name or ""))
        return "chat" if has_template and instruct else "paper"
    if style == "chat" and not has_template:
        raise ValueError("--prompt chat needs a tokenizer with a chat template; this one has none (use --prompt paper)")
    return style


def prompt_text(problem: Problem, tokenizer, style: str) -> str:
    if style == "chat":
        return tokenizer.apply_chat_template(chat_messages(problem), tokenize=False, add_generation_prompt=True)
    return paper_prompt(problem)


def encode_prompt(tokenizer, text: str, style: str) -> list[int]:
    """Token ids of a prompt; a chat template already holds its special tokens."""
    return list(tokenizer(text, add_special_tokens=style != "chat")["input_ids"])


def context_limit(model) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "max_position_embeddings", None)


def check_prompt_fits(model, prompt_ids: list[int], max_new_tokens: int, name: str = "a prompt") -> int:
    """The number of new tokens that fit after the prompt (``max_new_tokens`` or fewer).

    Raises ValueError when the prompt alone leaves no room in the model's context."""
    limit = context_limit(model)
    if limit is None:
        return max_new_tokens
    if len(prompt_ids) >= limit:
        raise ValueError(f"{name} has {len(prompt_ids)} tokens but the model's context is {limit}: "
                         "nothing can be generated; shorten the problem or use a longer-context model")
    return min(max_new_tokens, limit - len(prompt_ids))


def stop_token_ids(model, tokenizer) -> set[int]:
    """End-of-sequence ids of the generation config and the tokenizer."""
    ids = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
    return ids


def batch_seed(seed: int, ids: list[str]) -> int:
    return zlib.crc32(f"{seed}|{'|'.join(ids)}".encode())


def sample_responses(model, tokenizer, prompt_ids: list[list[int]], *, max_new_tokens: int = 384,
                     temperature: float = 0.7, seed: int = 0) -> list[Sampled]:
    """Sample one response per prompt in one left-padded batch.

    prompt_ids: B lists of token ids.  ``temperature`` <= 0 means greedy decoding.
    Returns B :class:`Sampled`, each cut at its first stop token.
    """
    from transformers import GenerationConfig

    if not prompt_ids:
        return []
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("cannot generate from an empty prompt")
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops, default=0)
    device = next(model.parameters()).device
    width = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, p in enumerate(prompt_ids):
        input_ids[i, width - len(p):] = torch.tensor(p)
        attention_mask[i, width - len(p):] = 1
    sampling = temperature > 0
    # every filter set explicitly: unset (None) fields would be filled from the model's own
    # generation_config (e.g. Qwen ships top_k=20, top_p=0.8), which the paper's T=0.7 excludes
    filters = dict(temperature=temperature, top_k=0, top_p=1.0, min_p=0.0) if sampling else {}
    generation_config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sampling, repetition_penalty=1.0,
                                         pad_token_id=pad, eos_token_id=sorted(stops) or None, **filters)
    devices = [device] if device.type == "cuda" else []
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 generation_config=generation_config)
    finally:
        model.train(was_training)
    responses = []
    for row in out[:, width:].tolist():
        cut = next((i for i, tok in enumerate(row) if tok in stops), None)
        responses.append(Sampled(row if cut is None else row[:cut], "length" if cut is None else "eos"))
    return responses


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    """The text each token adds, so that ``"".join(token_strings(...))`` is the decoded text.

    Decoded incrementally with a few tokens of left context (SentencePiece drops a leading
    space at the start of a decode); a token that ends inside a multi-byte character gets ""
    and the character goes to the token that completes it.
    """
    pieces = []
    prefix = read = 0  # ids[prefix:read] is context already emitted
    for i in range(len(ids)):
        before = tokenizer.decode(ids[prefix:read], skip_special_tokens=False)
        after = tokenizer.decode(ids[prefix:i + 1], skip_special_tokens=False)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            pieces.append(after[len(before):])
            prefix, read = max(prefix, i - 3), i + 1
        else:
            pieces.append("")
    # a response cut inside a character leaves its bytes undecoded: show the replacement char
    if ids and read < len(ids):
        tail = tokenizer.decode(ids[prefix:], skip_special_tokens=False)
        pieces[-1] = tail[len(tokenizer.decode(ids[prefix:read], skip_special_tokens=False)):]
    return pieces
