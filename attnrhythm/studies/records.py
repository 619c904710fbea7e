"""From stored token ids to the per-response statistics of an analysis, and the run-level steps
after generation (docs/method.md sections 2, 3 and 5).

* :func:`capture_records`: one capture pass over a batch of (prompt, response) token ids gives
  each response's series, head sets and receiver-head kurtosis (``studies/analyze.py`` calls it
  on fresh responses; ``studies/reanalysis.py`` on stored ones with other layers).
* :func:`finalize`: receiver heads calibrated on all responses of a run, ``fai_receiver``
  filled, per-response couplings and the Table 2 aggregate.
* :func:`disjoint_fai` and :func:`head_overlap`: the global-head FAI without the receiver heads
  and how many heads the two sets share (issue 18: overlapping sets make FAI peaks coincide by
  construction).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from attnrhythm import io
from attnrhythm.capture import capture_with_receivers, resolve_layers
from attnrhythm.core.config import ANALYSIS_HORIZON, RhythmConfig
from attnrhythm.core.couplings import couplings_table, response_couplings
from attnrhythm.core.heads import mask_to_heads, select_receiver_heads
from attnrhythm.core.metrics import fai_row_counts, per_head_fai, receiver_kurtosis, rhythm_from_stats
from attnrhythm.errors import UserError

ANALYSIS_CONFIG = RhythmConfig(fai_horizon=ANALYSIS_HORIZON)
"""The analysis's defaults: the paper appendix's FAI horizon (every later token)."""


def _empty_metrics(layers: list[int], receiver_layers: list[int]) -> dict:
    """An empty response: no series, no head sets (every metric is undefined)."""
    return dict(layers=layers, waad=[], delta=[], fai=[], fai_rows=[], entropy=[], local_heads=[], global_heads=[],
                head_distance=None, receiver_layers=receiver_layers, receiver_kurtosis=None,
                _head_fai=np.zeros((0, 0, 0), np.float32))


def receiver_layers_of(model, config: RhythmConfig) -> list[int]:
    """The model layers receiver heads are ranked in (``config.receiver_layers``)."""
    return resolve_layers(model, config, "all" if config.receiver_layers == "all" else None)


def _receiver_slots(record: dict) -> list[int]:
    """Layers behind a record's ``receiver_kurtosis`` and ``_head_fai`` (older records: the sampled ones)."""
    return record.get("receiver_layers") or record["layers"]


def capture_records(model, prompt_ids: list[list[int]], response_ids: list[list[int]],
                    config: RhythmConfig = ANALYSIS_CONFIG, backend: str = "streaming") -> list[dict]:
    """Metrics of B responses from one capture pass over the right-padded batch.

    Returns B dicts: ``layers`` (the sampled model layers), series ``waad``/``delta``/``fai``/
    ``entropy`` (lists, None = undefined), ``local_heads``/``global_heads`` ([model layer, head]
    pairs), ``head_distance`` ([L][H]), ``receiver_layers`` (the layers receiver heads are ranked
    in: every layer, or the sampled ones, ``config.receiver_layers``), ``receiver_kurtosis``
    ([R][H] over those) and ``_head_fai`` ([R, H, T] array).  One capture serves both
    (``capture_with_receivers``): receiver layers keep only what their scores read.
    """
    layers = resolve_layers(model, config)
    receiver_layers = receiver_layers_of(model, config)
    out = [_empty_metrics(layers, receiver_layers) for _ in prompt_ids]
    live = [i for i, r in enumerate(response_ids) if r]
    if not live:
        return out
    seqs = [prompt_ids[i] + response_ids[i] for i in live]
    width = max(len(s) for s in seqs)
    input_ids = torch.zeros(len(seqs), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for j, i in enumerate(live):
        input_ids[j, :len(seqs[j])] = torch.tensor(seqs[j])
        attention_mask[j, :len(seqs[j])] = 1
        response_mask[j, len(prompt_ids[i]):len(seqs[j])] = True
    device = next(model.parameters()).device
    # receiver layers keep only the diagonals their scores read, assembled on the CPU
    stats, receiver_stats = capture_with_receivers(model, input_ids.to(device), attention_mask.to(device),
                                                   config=config, receiver_layers=receiver_layers, backend=backend,
                                                   device="cpu")
    result = rhythm_from_stats(stats, response_mask, config)
    kurt = receiver_kurtosis(receiver_stats, response_mask, config.receiver_gap)
    head_fai = per_head_fai(receiver_stats, result.positions, result.mask, config.fai_horizon)
    rows_behind = fai_row_counts(stats, result.positions, result.mask, config.fai_horizon)
    for j, i in enumerate(live):
        r, n = result[j], len(response_ids[i])
        out[i] = dict(
            layers=layers, waad=io.float_list(r.waad), delta=io.float_list(r.delta), fai=io.float_list(r.fai),
            fai_rows=rows_behind[j, :n].tolist(),
            entropy=io.float_list(r.entropy),
            local_heads=[[layers[s], h] for s, h in r.local_heads],
            global_heads=[[layers[s], h] for s, h in r.global_heads],
            head_distance=[io.float_list(row) for row in r.head_distance],
            receiver_layers=receiver_layers,
            receiver_kurtosis=[io.float_list(row) for row in kurt[j]],
            _head_fai=head_fai[j, :, :, :n].numpy())
    return out


def calibrate_receivers(records: list[dict], count: int) -> list[list[int]]:
    """Receiver heads from the mean kurtosis over ``records`` (responses without a defined
    kurtosis are left out); [model layer, head] pairs, [] when no kurtosis is defined."""
    usable = [r for r in records if r.get("receiver_kurtosis") is not None]
    if not usable:
        return []
    layers = _receiver_slots(usable[0])
    if any(_receiver_slots(r) != layers for r in usable):
        raise UserError("the stored responses rank receiver heads over other layers than this run "
                        "(--receiver-layers changed?): resume with the old setting or pass --overwrite")
    kurt = torch.stack([torch.stack([io.float_series(row) for row in r["receiver_kurtosis"]]) for r in usable])
    finite_heads = int(torch.isfinite(kurt).any(0).sum())
    if finite_heads == 0:
        return []
    mask = select_receiver_heads(kurt, min(count, finite_heads))
    return [[layers[s], h] for s, h in mask_to_heads(mask)]


def fill_receiver_fai(record: dict, receivers: list[list[int]], head_fai: np.ndarray) -> None:
    """Set ``fai_receiver`` (mean per-head FAI over the receiver heads) and ``receiver_heads``."""
    record["receiver_heads"] = receivers
    if not record["response_token_ids"] or not receivers:
        record["fai_receiver"] = [None] * len(record["response_token_ids"])
        return
    slots = [_receiver_slots(record).index(layer) for layer, _ in receivers]
    heads = [h for _, h in receivers]
    record["fai_receiver"] = io.float_list(torch.from_numpy(head_fai[slots, heads]).double().mean(0))


def recapture_head_fai(model, records: list[dict], config: RhythmConfig = ANALYSIS_CONFIG,
                       backend: str = "streaming", batch_size: int = 8, progress: bool = False) -> dict:
    """{id: per-head FAI [L, H, T]} recaptured from the records' stored token ids."""
    out = {}
    for start in tqdm(range(0, len(records), batch_size), desc="recapture", disable=not progress):
        chunk = records[start:start + batch_size]
        metrics = capture_records(model, [r["prompt_token_ids"] for r in chunk],
                                  [r["response_token_ids"] for r in chunk], config, backend)
        out.update({r["id"]: m["_head_fai"] for r, m in zip(chunk, metrics)})
    return out


def record_couplings(record: dict, config: RhythmConfig = ANALYSIS_CONFIG) -> dict:
    """Table 2 statistics of one response: {name: {"observed": float|None, "random": ...}} (the
    disjoint co-occurrence too when the record has ``fai_global_disjoint``)."""
    if not record["response_token_ids"]:
        return {}
    series = lambda key: None if record.get(key) is None else io.float_series(record[key])[None]  # noqa: E731
    stats = response_couplings(series("waad"), series("fai"), None, entropy=series("entropy"),
                               fai_receiver=series("fai_receiver"), config=config,
                               fai_global_disjoint=series("fai_global_disjoint"))
    return {name: {k: io.float_list(v)[0] for k, v in pair.items()} for name, pair in stats.items()}


def finalize(model, records: list[dict], head_fai: dict, config: RhythmConfig = ANALYSIS_CONFIG, *,
             backend: str = "streaming", batch_size: int = 8, n_boot: int = 2000, seed: int = 0,
             progress: bool = False, disjoint: bool = False) -> tuple[list[list[int]], dict]:
    """Calibrate receiver heads on all ``records``, fill ``fai_receiver`` and per-response
    ``couplings`` in place, and aggregate Table 2.  ``head_fai`` ({id: [L, H, T]}) covers the
    responses of this process; the others are recaptured unless their stored receiver series
    already uses the same heads.  ``disjoint`` also fills ``fai_global_disjoint`` (of the records
    in ``head_fai``) and adds the co-occurrence with disjoint head sets.  Returns (receiver heads,
    couplings table)."""
    receivers = calibrate_receivers(records, config.n_receiver_heads)
    stale = [r for r in records if r["id"] not in head_fai and r["response_token_ids"]
             and (r.get("receiver_heads") != receivers or r.get("fai_receiver") is None)]
    if stale:
        if model is None:
            raise ValueError(f"{len(stale)} responses need recapturing for their receiver-head FAI; pass the model")
        head_fai = {**head_fai, **recapture_head_fai(model, stale, config, backend, batch_size, progress)}
    for r in records:
        if r["id"] in head_fai or not r["response_token_ids"]:
            fill_receiver_fai(r, receivers, head_fai.get(r["id"]))
            if disjoint:
                r["fai_global_disjoint"] = disjoint_fai(r, receivers, head_fai.get(r["id"]))
        r["couplings"] = record_couplings(r, config)
    return receivers, records_table(records, n_boot=n_boot, seed=seed)


def records_table(records: list[dict], names=None, *, n_boot: int = 2000, seed: int = 0) -> dict:
    """``couplings_table`` over the records' per-response ``couplings`` (all of them, or those in
    ``names``), in the records' order; records without couplings (empty responses) are left out."""
    per_response = [{name: {k: [math.nan if v is None else v] for k, v in pair.items()}
                     for name, pair in r["couplings"].items() if names is None or name in names}
                    for r in records if r.get("couplings")]
    return couplings_table(per_response, n_boot=n_boot, seed=seed)


def disjoint_fai(record: dict, receivers: list[list[int]], head_fai: np.ndarray) -> list | None:
    """The FAI of ``record``'s global heads without the receiver heads: the mean per-head FAI
    (``head_fai`` [R, H, T] over ``receiver_layers``) over the global heads not in ``receivers``.
    All-None when every global head is a receiver head; None for an empty response."""
    if not record["response_token_ids"]:
        return None
    taken = {tuple(h) for h in receivers}
    kept = [(layer, h) for layer, h in record["global_heads"] if (layer, h) not in taken]
    if not kept:
        return [None] * len(record["response_token_ids"])
    slots = [_receiver_slots(record).index(layer) for layer, _ in kept]
    return io.float_list(torch.from_numpy(head_fai[slots, [h for _, h in kept]]).double().mean(0))


def head_overlap(records: list[dict], receivers: list[list[int]], label: str = "") -> dict:
    """How many heads the receiver set shares with each response's global set: the size of the
    sets, how many receiver heads lie in the analysed layers (the most any response can share),
    and the shared count per response (mean, min, max, share of the global set, responses with
    any).  Empty responses are left out."""
    taken = {tuple(h) for h in receivers}
    live = [r for r in records if r["response_token_ids"] and r.get("global_heads")]
    shared = np.array([sum(tuple(h) in taken for h in r["global_heads"]) for r in live], dtype=np.float64)
    sizes = np.array([len(r["global_heads"]) for r in live], dtype=np.float64)
    layers = set(live[0]["layers"]) if live else set()
    return dict(label=label, receiver_heads=len(receivers), receivers_in_layers=sum(h[0] in layers for h in receivers),
                global_heads_mean=float(sizes.mean()) if live else math.nan,
                shared_mean=float(shared.mean()) if live else math.nan,
                shared_min=int(shared.min()) if live else 0, shared_max=int(shared.max()) if live else 0,
                shared_share=float((shared / sizes).mean()) if live else math.nan,
                responses_sharing=int((shared > 0).sum()), n_responses=len(live))
