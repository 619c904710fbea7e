"""Batched greedy decoding where rows share one cached context (used by `attnrhythm perturb`).

A row is a prefix of a cached sequence plus a token fed after it.  All rows share the KV cache
of the longest context; row b attends only to the cache slots of its own prefix (the others
are masked out, like padding, wherever they are) and its new tokens get the positions they
would have in a fresh sequence, so each row decodes exactly as it would alone while nothing of
the shared prefix is recomputed.  Left-padded prompts are the special case "visible = not pad".
Rows leave the batch when they stop.
"""
from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import DynamicLayer

from .capture import position_ids_from_mask


class _AppendingLayer(DynamicLayer):
    """A DynamicLayer that appends into spare room instead of concatenating the whole cache anew
    at every step (that copy, B x (prefix + new) per layer per step, was half of decoding time)."""

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        if not self.is_initialized or self.keys.numel() == 0:
            return super().update(key_states, value_states, *args, **kwargs)
        n, k = self.keys.shape[-2], key_states.shape[-2]
        room = getattr(self, "_room", None)
        # the room is stale once batch_select_indices/repeat_interleave replaced keys
        if room is None or room[0].shape[-2] < n + k or room[0].data_ptr() != self.keys.data_ptr() \
                or room[0].shape[0] != self.keys.shape[0]:
            room = tuple(x.new_empty(*x.shape[:-2], 2 * (n + k) + 64, x.shape[-1]) for x in (self.keys, self.values))
            room[0][..., :n, :], room[1][..., :n, :] = self.keys, self.values
            self._room = room
        room[0][..., n:n + k, :], room[1][..., n:n + k, :] = key_states, value_states
        self.keys, self.values = room[0][..., :n + k, :], room[1][..., :n + k, :]
        return self.keys, self.values


@torch.no_grad()
def prefill(model, ids: Tensor, attention_mask: Tensor | None = None, keep: Tensor | None = None):
    """(KV cache, logits [B, S', V]) of ids [B, S] (left padding marked by ``attention_mask``);
    logits only at the positions ``keep`` (1-D) if given."""
    kwargs = {} if keep is None else {"logits_to_keep": keep}
    if attention_mask is not None:
        kwargs.update(attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask))
    out = model(input_ids=ids, use_cache=True, **kwargs)
    cache = out.past_key_values
    for layer in getattr(cache, "layers", []):
        if type(layer) is DynamicLayer:  # sliding-window layers keep their own update
            layer.__class__ = _AppendingLayer
    return cache, out.logits


@torch.no_grad()
def greedy_continue(model, cache, visible: Tensor, first: Tensor, budgets: list[int],
                    stop_ids: set[int]) -> list[list[int]]:
    """Greedy continuations of B rows over one cached context.

    cache: KV cache of the context with batch B (rows may be copies of one sequence); visible:
    [B, S] bool, the cache slots row b attends to (its prefix); first: [B] the token fed after
    the prefix (e.g. a forced one); budgets: at most this many new tokens per row.  A row ends
    after a stop token (kept in its output).  Returns each row's new tokens, ``first`` excluded.
    """
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
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions,
                       past_key_values=cache, use_cache=True).logits[:, -1]
        tokens = logits.argmax(-1)
        keep = []
        for j, b in enumerate(rows):
            out[b].append(int(tokens[j]))
            if out[b][-1] not in stop_ids and len(out[b]) < budgets[b]:
                keep.append(j)
        if len(keep) < len(rows):
            if not keep:
                break
            index = torch.tensor(keep, device=mask.device)
            cache.batch_select_indices(index)
            mask, tokens, rows = mask[index], tokens[index], [rows[j] for j in keep]
    return out


def greedy_responses(model, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int]) -> list[list[int]]:
    """Greedy responses to several prompts in one left-padded batch (a trailing stop token is
    kept when a row stopped).  All of a prompt but its last token is prefilled; the last token is
    fed first, so every row decodes as it would alone."""
    if any(len(p) < 2 for p in prompts):
        raise ValueError("every prompt needs at least two tokens")
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts) - 1
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) + 1:] = torch.tensor(p[:-1])
        mask[b, width - len(p) + 1:] = 1
    ids, mask = ids.to(device), mask.to(device)
    cache, _ = prefill(model, ids, mask, keep=torch.tensor([width - 1], device=device))
    first = torch.tensor([p[-1] for p in prompts], device=device)
    return greedy_continue(model, cache, mask.bool(), first, [max_new_tokens] * len(prompts), stop_ids)


def strip_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    return tokens[:-1] if tokens and tokens[-1] in stop_ids else tokens
