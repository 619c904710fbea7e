"""The one place text is generated: prompts, stop tokens, sampling and greedy decoding.

Used by `analyze` (sampled responses), `perturb` (greedy responses and forced continuations over
a shared cache), `eval` (pass@1 / avg@k) and the SFT warm start (prompt text).

Prompts.  A prompt is plain text or a list of chat messages; ``prompt_text`` renders either as
text, ``encode_prompt`` tokenises it (a chat template already holds its special tokens).  For the
analysis problems, ``problem_prompt`` picks the style:

* ``"paper"``: the paper's plain-text prompt (``data.paper_prompt``), for base models.
* ``"chat"``: the tokenizer's chat template over ``data.chat_messages``, for instruct models.
* ``"auto"`` (**Decision**, the CLI default): ``chat`` for instruct models, ``paper`` otherwise.
  A model counts as instruct when its tokenizer has a chat template and its name says so
  (``instruct``, ``chat`` or ``-it``), or it is the embedded ``smollm2-135m``.

Decoding.  ``decode`` runs every row of a left-padded batch over one KV cache
(``transformers.DynamicCache``, passed by the keyword the installed transformers names: ``cache``,
or ``past_key_values`` before 5.24).  Row b attends only to its own prefix, its new tokens get the
positions they would have in a fresh sequence, and it leaves the batch when it stops, so each row
decodes as it would alone.  Sampling is plain temperature sampling (no top-k/top-p/min-p, whatever
the model's generation_config says: the paper states only T).  **Each row draws from its own
``torch.Generator``** seeded by ``row_seed(seed, key)`` (key: the problem id), so a response
depends on the seed and the problem alone, not on the batch size or on the rows beside it, and
the global RNG is never touched.  A row ends after its first stop token, or once its text
contains a stop string (``StopStrings``; then it is cut before the string).

Stop strings (**Decision**): with the paper's plain prompt (``"paper"``, for base models) a
response ends where the model starts a new ``Question:``, ``Context:`` or ``System:`` line
(``PAPER_STOP_STRINGS``): a base model that has answered goes on inventing further question and
answer pairs (Gemma-3-270M did on 8 of 8 GSM8K problems), which would otherwise be analysed as part
of its reasoning.  Chat prompts end at the template's end-of-turn token and need none.
"""
from __future__ import annotations

import inspect
import re
import zlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache, DynamicLayer

from attnrhythm.capture import position_ids_from_mask, text_config
from attnrhythm.data import Problem, chat_messages, paper_prompt
from attnrhythm.errors import UserError, unknown_name

PROMPT_STYLES = ("auto", "paper", "chat")
PAPER_STOP_STRINGS = ("\nQuestion:", "\nContext:", "\nSystem:")
_INSTRUCT_NAME = re.compile(r"instruct|chat|-it\b", re.IGNORECASE)
_INSTRUCT_EMBEDDED = {"smollm2-135m"}


# ---------------------------------------------------------------- prompts
def resolve_prompt_style(style: str, tokenizer, model_name: str = "") -> str:
    """'auto' -> 'chat' or 'paper' (see the module docstring); checks that 'chat' is possible."""
    if style not in PROMPT_STYLES:
        raise unknown_name("prompt style", style, PROMPT_STYLES)
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if style == "auto":
        instruct = model_name in _INSTRUCT_EMBEDDED or bool(_INSTRUCT_NAME.search(model_name or ""))
        return "chat" if has_template and instruct else "paper"
    if style == "chat" and not has_template:
        raise UserError("--prompt chat needs a tokenizer with a chat template; this one has none (use --prompt paper)")
    return style


def problem_prompt(problem: Problem, style: str) -> str | list[dict]:
    """The analysis prompt of a problem: chat messages (style 'chat') or the paper's text."""
    return chat_messages(problem) if style == "chat" else paper_prompt(problem)


def prompt_text(tokenizer, prompt: str | list[dict]) -> str:
    """A prompt as text: plain text as it is, chat messages through the chat template."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


def encode_prompt(tokenizer, prompt: str | list[dict]) -> list[int]:
    """Token ids of a prompt; a chat template's text already holds its special tokens."""
    return list(tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=isinstance(prompt, str))["input_ids"])


def context_limit(model) -> int | None:
    return getattr(text_config(model), "max_position_embeddings", None)


def check_prompt_fits(model, prompt_ids: list[int], max_new_tokens: int, name: str = "a prompt") -> int:
    """The number of new tokens that fit after the prompt (``max_new_tokens`` or fewer).

    Raises UserError when the prompt alone leaves no room in the model's context."""
    limit = context_limit(model)
    if limit is None:
        return max_new_tokens
    if len(prompt_ids) >= limit:
        raise UserError(f"{name} has {len(prompt_ids)} tokens but the model's context is {limit}: "
                        "nothing can be generated; shorten the problem or use a longer-context model")
    return min(max_new_tokens, limit - len(prompt_ids))


def stop_token_ids(model, tokenizer) -> set[int]:
    """End-of-sequence ids of the model's generation config and of the tokenizer."""
    ids = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
    return ids


class StopStrings:
    """Strings that end a response: ``hit`` tells whether a row's tokens now contain one (decoding
    only their tail), ``cut`` drops the tokens from the first one on."""

    def __init__(self, tokenizer, strings: tuple[str, ...]):
        if any(not x for x in strings):
            raise UserError("stop strings must not be empty")
        self.tokenizer, self.strings = tokenizer, tuple(strings)
        self.tail = max(len(x) for x in strings) + 8 if strings else 0  # tokens: each is at least one character

    def __bool__(self) -> bool:
        return bool(self.strings)

    def _text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def hit(self, tokens: list[int]) -> bool:
        text = self._text(tokens[-self.tail:])
        return any(x in text for x in self.strings)

    def cut(self, tokens: list[int]) -> tuple[list[int], bool]:
        """(the tokens whose text lies before the first stop string, whether one was found)."""
        text = self._text(tokens)
        found = [text.find(x) for x in self.strings if x in text]
        if not found:
            return tokens, False
        end, n = min(found), len(tokens)
        while n > 0 and len(self._text(tokens[:n])) > end:
            n -= 1
        return tokens[:n], True


def stop_strings_for(style: str, tokenizer) -> StopStrings:
    """The stop strings of a prompt style (see the module docstring)."""
    return StopStrings(tokenizer, PAPER_STOP_STRINGS if style == "paper" else ())


def strip_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    return tokens[:-1] if tokens and tokens[-1] in stop_ids else tokens


def row_seed(seed: int, key: str) -> int:
    """The seed of one row's private generator: a function of the run's seed and the row's key."""
    return zlib.crc32(f"{seed}|{key}".encode())


# ---------------------------------------------------------------- the decoding loop
def _cache_keyword(model) -> str:
    """'cache' (transformers >= 5.24) or 'past_key_values' (earlier 5.x)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


class _AppendingLayer(DynamicLayer):
    """A DynamicLayer that appends into spare room instead of concatenating the whole cache anew
    at every step (that copy, B x (prefix + new) per layer per step, was half of decoding time)."""

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        if not self.is_initialized or self.keys.numel() == 0:
            return super().update(key_states, value_states, *args, **kwargs)
        n, k = self.keys.shape[-2], key_states.shape[-2]
        room = getattr(self, "room", None)
        # the room is stale once batch_select_indices/repeat_interleave replaced keys
        if room is None or room[0].shape[-2] < n + k or room[0].data_ptr() != self.keys.data_ptr() \
                or room[0].shape[0] != self.keys.shape[0]:
            room = tuple(x.new_empty(*x.shape[:-2], 2 * (n + k) + 64, x.shape[-1]) for x in (self.keys, self.values))
            room[0][..., :n, :], room[1][..., :n, :] = self.keys, self.values
            self.room = room
        room[0][..., n:n + k, :], room[1][..., n:n + k, :] = key_states, value_states
        self.keys, self.values = room[0][..., :n + k, :], room[1][..., :n + k, :]
        return self.keys, self.values


def _appending(cache):
    """The cache with its full-attention layers appending in place (sliding-window layers keep
    their own update)."""
    for layer in getattr(cache, "layers", []):
        if type(layer) is DynamicLayer:
            layer.__class__ = _AppendingLayer
    return cache


@torch.no_grad()
def prefill(model, ids: Tensor, attention_mask: Tensor | None = None, keep: Tensor | None = None):
    """(KV cache, logits [B, S', V]) of ids [B, S] (left padding marked by ``attention_mask``);
    logits only at the positions ``keep`` (1-D) if given."""
    kwargs = {_cache_keyword(model): DynamicCache(config=model.config)}
    if keep is not None:
        kwargs["logits_to_keep"] = keep
    if attention_mask is not None:
        kwargs.update(attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask))
    out = model(input_ids=ids, use_cache=True, **kwargs)
    return _appending(_output_cache(out)), out.logits


def greedy_pick(logits: Tensor, rows: list[int]) -> Tensor:
    return logits.argmax(-1)


def sampler(temperature: float, seeds: list[int], device) -> Callable[[Tensor, list[int]], Tensor]:
    """A token picker drawing row b's token from its own generator (seeded ``seeds[b]``) at
    ``temperature``; ``temperature <= 0`` is greedy."""
    if temperature <= 0:
        return greedy_pick
    generators = [torch.Generator().manual_seed(s) for s in seeds]

    def pick(logits: Tensor, rows: list[int]) -> Tensor:
        probs = torch.softmax(logits.float() / temperature, -1).cpu()
        tokens = [torch.multinomial(probs[j], 1, generator=generators[b]) for j, b in enumerate(rows)]
        return torch.cat(tokens).to(device)

    return pick


@torch.no_grad()
def decode(model, cache, visible: Tensor, first: Tensor, budgets: list[int], stop_ids: set[int],
           pick=greedy_pick, on_tokens: Callable[[int], None] | None = None,
           stop_strings: StopStrings | None = None) -> list[list[int]]:
    """Continuations of B rows over one cached context.

    cache: KV cache of the context with batch B (rows may be copies of one sequence); visible:
    [B, S] bool, the cache slots row b attends to (its prefix); first: [B] the token fed after
    the prefix (the prompt's last token, or a forced one); budgets: at most this many new tokens
    per row; pick(logits [b, V], original row indices) -> [b] tokens.  A row ends after a stop
    token (kept in its output) or once its text contains one of ``stop_strings`` (then it is cut
    before the string, so it ends short of its budget without a stop token).  ``on_tokens(n)`` is
    told every token generated (progress).  Returns each row's new tokens, ``first`` excluded.
    """
    keyword = _cache_keyword(model)
    mask = visible.long()
    tokens = first.to(mask.device)
    out: list[list[int]] = [[] for _ in budgets]
    rows = [b for b in range(len(budgets)) if budgets[b] > 0]  # original index of each live row
    if len(rows) < len(budgets):
        index = torch.tensor(rows, dtype=torch.long, device=mask.device)
        cache.batch_select_indices(index)
        mask, tokens = mask[index], tokens[index]
    while rows:
        # a new token's position is the number of slots it sees: its position in a fresh sequence
        positions = mask.sum(-1, keepdim=True)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions,
                       use_cache=True, **{keyword: cache}).logits[:, -1]
        tokens = pick(logits, rows)
        keep = []
        for j, b in enumerate(rows):
            out[b].append(int(tokens[j]))
            if out[b][-1] in stop_ids:
                continue
            if stop_strings and stop_strings.hit(out[b]):
                out[b] = stop_strings.cut(out[b])[0]
            elif len(out[b]) < budgets[b]:
                keep.append(j)
        if on_tokens is not None:
            on_tokens(len(rows))
        if len(keep) < len(rows):
            if not keep:
                break
            index = torch.tensor(keep, device=mask.device)
            cache.batch_select_indices(index)
            mask, tokens, rows = mask[index], tokens[index], [rows[j] for j in keep]
    return out


def generate(model, prompts: list[list[int]], budgets: list[int], stop_ids: set[int], *,
             temperature: float = 0.0, seeds: list[int] | None = None,
             on_tokens: Callable[[int], None] | None = None,
             stop_strings: StopStrings | None = None) -> list[list[int]]:
    """New tokens for several prompts in one left-padded batch (a final stop token is kept).

    All of a prompt but its last token is prefilled; the last token is fed first, so every row
    decodes as it would alone.  ``temperature`` <= 0 is greedy; otherwise ``seeds`` (one per
    prompt) seed each row's generator.
    """
    if any(len(p) == 0 for p in prompts):
        raise UserError("cannot generate from an empty prompt")
    if not prompts:
        return []

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts) - 1
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) + 1:] = torch.tensor(p[:-1], dtype=torch.long)
        mask[b, width - len(p) + 1:] = 1
    ids, mask = ids.to(device), mask.to(device)
    was_training = model.training
    model.eval()
    try:
        if width:
            cache, _ = prefill(model, ids, mask, keep=torch.tensor([width - 1], device=device))
        else:  # one-token prompts: nothing to prefill
            cache = _appending(DynamicCache(config=model.config))
        first = torch.tensor([p[-1] for p in prompts], device=device)
        pick = sampler(temperature, seeds if seeds is not None else [0] * len(prompts), device)
        return decode(model, cache, mask.bool(), first, budgets, stop_ids, pick, on_tokens, stop_strings)
    finally:
        model.train(was_training)


def greedy_responses(model, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int],
                     stop_strings: StopStrings | None = None) -> list[list[int]]:
    """Greedy responses to several prompts (a trailing stop token is kept when a row stopped; a
    row that reached a stop string is cut before it)."""
    return generate(model, prompts, [max_new_tokens] * len(prompts), stop_ids, stop_strings=stop_strings)


@dataclass
class Sampled:
    """One sampled response: token ids without the final end-of-sequence token."""

    token_ids: list[int]
    finish_reason: str  # "eos", "stop" (a stop string; cut before it) or "length"


def sample_responses(model, tokenizer, prompt_ids: list[list[int]], *, max_new_tokens: int | list[int] = 384,
                     temperature: float = 0.7, seeds: list[int] | None = None,
                     on_tokens: Callable[[int], None] | None = None,
                     stop_strings: StopStrings | None = None) -> list[Sampled]:
    """One response per prompt (``temperature`` <= 0: greedy), each cut before its first stop
    token or stop string; ``max_new_tokens`` is one budget or one per prompt; ``seeds`` one per
    prompt."""
    stops = stop_token_ids(model, tokenizer)
    budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompt_ids)
    rows = generate(model, prompt_ids, budgets, stops, temperature=temperature, seeds=seeds, on_tokens=on_tokens,
                    stop_strings=stop_strings)
    # decode ends a row at a stop token, at a stop string (cut, so short of its budget) or at its budget
    return [Sampled(r[:-1], "eos") if r and r[-1] in stops else Sampled(r, "stop" if len(r) < budget else "length")
            for r, budget in zip(rows, budgets)]


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
