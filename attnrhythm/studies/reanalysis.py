"""The analysis redone from its stored token ids under other choices, for `reproduce`: nothing is
generated again, each response is recaptured in one forward pass.

* :func:`layer_range_tables` (v2 Table 10): Table 2 with the head statistics of the bottom,
  middle and top thirds of the layers, receiver heads ranked within the third, so the three
  compare like with like.  Each range also gets the co-occurrence with disjoint head sets and
  its head overlap.  Cached in ``layer_ranges.json``.
* :func:`disjoint_series`: the analysis's global-head FAI formed without its receiver heads
  (``records.disjoint_fai``), per response, from a recapture of the per-head FAI with the
  analysis's own head sets.  Cached in ``disjoint.json``.

A cache is reused only when its key (the analysis's config, its response ids and start time)
matches the analysis in the folder.
"""
from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from attnrhythm import io, log
from attnrhythm.capture import resolve_layers
from attnrhythm.core.config import RhythmConfig
from attnrhythm.studies.records import capture_records, disjoint_fai, finalize, head_overlap, recapture_head_fai

logger = log.get_logger(__name__)
RANGES = ("bottom", "middle", "top")
VERSION = 2
"""Of the cached files' layout: version 2 adds the disjoint head sets, the overlap and the
per-problem values (an older cache is recomputed)."""


def cache_key(run: dict, records: list[dict]) -> dict:
    """What a cached reanalysis depends on: the analysis's config, responses and start."""
    return dict(config=run["config"], ids=[r["id"] for r in records], started=run.get("started"), version=VERSION)


def per_problem(records: list[dict]) -> dict:
    """{problem id: its per-response couplings} (None for an empty response)."""
    return {r["id"]: r.get("couplings") or None for r in records}


def layer_range_tables(folder, run: dict, records: list[dict], load, progress: bool = False) -> dict:
    """{range: {"layers", "table", "overlap", "per_problem", "source"}} for bottom, middle and
    top.  ``load()`` returns (model, tokenizer), called only when a range must be computed."""
    out = Path(folder)
    cache_path = out / "layer_ranges.json"
    base = RhythmConfig.from_dict(run["config"])
    key = dict(cache_key(run, records), receivers="within each range")
    cached = io.read_json(cache_path) if cache_path.exists() else {}
    if cached.get("key") != key:
        cached = dict(key=key, ranges={})
    settings = run["settings"]
    for name in RANGES:
        if name in cached["ranges"]:
            continue
        logger.info(f"reproduce: recapturing {len(records)} responses with the {name} third of the layers")
        model, _ = load()
        config = base.replace(layers=name, receiver_layers="sampled")
        copies, head_fai, batch = [], {}, settings.get("batch_size", 8)
        for start in tqdm(range(0, len(records), batch), desc=f"{name} third", disable=not progress):
            chunk = records[start:start + batch]
            metrics = capture_records(model, [r["prompt_token_ids"] for r in chunk],
                                      [r["response_token_ids"] for r in chunk], config, settings.get("backend", "streaming"))
            for r, m in zip(chunk, metrics):
                head_fai[r["id"]] = m.pop("_head_fai")
                copies.append(dict(id=r["id"], prompt_token_ids=r["prompt_token_ids"],
                                   response_token_ids=r["response_token_ids"], **m,
                                   fai_receiver=None, receiver_heads=None))
        receivers, table = finalize(model, copies, head_fai, config, n_boot=settings.get("n_boot", 2000),
                                    seed=settings.get("seed", 0), disjoint=True)
        cached["ranges"][name] = dict(layers=resolve_layers(model, config), table=table, source="recaptured",
                                      receiver_heads=receivers,
                                      overlap=head_overlap(copies, receivers, f"{name} third, receivers within it"),
                                      per_problem=per_problem(copies))
        io.write_json(cache_path, cached)
    return cached["ranges"]


def disjoint_series(folder, run: dict, records: list[dict], load, progress: bool = False) -> dict:
    """{problem id: global-head FAI without the analysis's receiver heads (list, None =
    undefined), or None for an empty response}, from ``disjoint.json`` or a recapture of the
    per-head FAI with the run's config (the records' own global heads and the run's receiver
    heads: the disjoint row differs from Table 2 only in the heads it leaves out)."""
    path = Path(folder) / "disjoint.json"
    receivers = run.get("receiver_heads") or []
    key = dict(cache_key(run, records), receivers=receivers)
    cached = io.read_json(path) if path.exists() else {}
    if cached.get("key") == key:
        return cached["series"]
    logger.info(f"reproduce: recapturing the per-head FAI of {len(records)} responses (global heads without "
                "receiver heads)")
    model, _ = load()
    settings = run["settings"]
    head_fai = recapture_head_fai(model, [r for r in records if r["response_token_ids"]],
                                  RhythmConfig.from_dict(run["config"]), settings.get("backend", "streaming"),
                                  settings.get("batch_size", 8), progress)
    series = {r["id"]: disjoint_fai(r, receivers, head_fai.get(r["id"])) for r in records}
    io.write_json(path, dict(key=key, series=series))
    return series
