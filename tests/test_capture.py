"""capture_statistics (streaming and eager backends) against Hugging Face eager maps
(``output_attentions=True``) reduced by the float64 loop reference, on tiny random Llama, GQA
Llama and Qwen3 (q/k norm) models, padded batches of different lengths, a sliding-window
model, and the error paths."""
import math

import pytest
import torch

from attnrhythm import capture
from attnrhythm.capture import capture_statistics
from attnrhythm.core.config import ANALYSIS_HORIZON, RhythmConfig
from attnrhythm.core.couplings import find_peaks
from attnrhythm.core.metrics import receiver_kurtosis, rhythm_from_stats
from attnrhythm.errors import UserError

from conftest import TINY, TINY_MODELS, tiny_gemma2, tiny_gpt_oss, tiny_qwen3, tiny_qwen3_sliding

CONFIG = RhythmConfig(layers="all", fai_horizon=(10, 100))  # band width 101 covers both horizons
HORIZONS = [(10, 100), ANALYSIS_HORIZON]
# (sequence length, prompt length): several lengths, different prompts in one batch
SEQUENCES = [(31, 6), (9, 4), (23, 11)]
_REFERENCE_CACHE = {}


def sequences(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(3, 259, (n,), generator=g), p) for n, p in SEQUENCES]


def padded_batch(seqs, left):
    width = max(len(ids) for ids, _ in seqs)
    input_ids = torch.zeros(len(seqs), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    response = torch.zeros(len(seqs), width, dtype=torch.bool)
    for b, (ids, p) in enumerate(seqs):
        o = width - len(ids) if left else 0
        input_ids[b, o:o + len(ids)] = ids
        attention_mask[b, o:o + len(ids)] = 1
        response[b, o + p:o + len(ids)] = True
    return input_ids, attention_mask, response


def hf_eager(model, ids):
    """Maps [L, H, N, N] (float64) and logits [N, V] of one unpadded sequence, straight from
    transformers' eager attention with output_attentions=True."""
    original = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=ids[None], output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation(original)
    return torch.stack([a[0] for a in out.attentions]).double(), out.logits[0].double()


def reference(ref, name, model, ids, prompt):
    """Loop-reference metrics of one sequence (cached per model and sequence)."""
    key = (name, tuple(ids.tolist()), prompt)
    if key not in _REFERENCE_CACHE:
        maps, logits = hf_eager(model, ids)
        A = maps.numpy()
        out = {h: ref.rhythm(A, prompt, 10, h) for h in HORIZONS}
        out["kurtosis"] = ref.receiver_kurtosis(A, prompt, 4)
        out["entropy"] = [ref.entropy(logits[t - 1].tolist()) for t in range(prompt, len(ids))]
        out["maps"] = maps
        _REFERENCE_CACHE[key] = out
    return _REFERENCE_CACHE[key]


def normwise(actual, expected):
    """max |a - e| / max |e| over the defined entries; NaN positions must agree."""
    actual, expected = torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64)
    assert torch.equal(torch.isnan(actual), torch.isnan(expected))
    ok = ~torch.isnan(expected)
    if not ok.any():
        return 0.0
    return float((actual[ok] - expected[ok]).abs().max() / expected[ok].abs().max().clamp(min=1e-30))


@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
@pytest.mark.parametrize("backend", ["streaming", "eager"])
@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_capture_matches_hf_eager_loop_reference(ref, tiny_models, name, backend, left):
    model = tiny_models[name]
    seqs = sequences()
    input_ids, attention_mask, response = padded_batch(seqs, left)
    # block_bytes=1: the streaming backend works in blocks of 16 rows, so 31 tokens span 2 blocks
    stats = capture_statistics(model, input_ids, attention_mask, config=CONFIG, backend=backend, block_bytes=1)
    kurt = receiver_kurtosis(stats, response, 4)
    for horizon in HORIZONS:
        result = rhythm_from_stats(stats, response, CONFIG.replace(fai_horizon=horizon))
        for b, (ids, p) in enumerate(seqs):
            exp, one = reference(ref, name, model, ids, p), result[b]
            want = exp[horizon]
            assert normwise(one.head_distance, want["head_distance"]) < 1e-5
            assert sorted(map(tuple, one.local_heads)) == want["local"]
            assert sorted(map(tuple, one.global_heads)) == want["global_"]
            assert normwise(one.waad, want["waad"]) < 1e-5
            assert normwise(one.fai, want["fai"]) < 1e-5
            assert normwise(one.entropy, exp["entropy"]) < 1e-5
            assert normwise(kurt[b], exp["kurtosis"]) < 1e-4  # a fourth moment of float32 scores


def test_raw_statistics_match_loop_over_maps(tiny_models):
    """row_distance, band and col_sum of every real position, straight from the maps (of the
    unpadded sequence: float32 rounding of the padded batch differs in the 6th digit)."""
    model = tiny_models["llama_gqa"]
    seqs = sequences(seed=1)
    input_ids, attention_mask, _ = padded_batch(seqs, left=True)
    stats = capture_statistics(model, input_ids, attention_mask, config=CONFIG, backend="streaming")
    width = input_ids.shape[1]
    for b, (ids, _) in enumerate(seqs):
        maps = hf_eager(model, ids)[0]
        n, o = len(ids), width - len(ids)
        for l in (0, 3):
            for h in (0, 5):
                A = maps[l, h]
                for t in range(n):
                    dist = sum(float(A[t, s]) * (t - s) for s in range(t + 1))
                    assert stats.row_distance[b, l, h, o + t].item() == pytest.approx(dist, rel=1e-4, abs=1e-5)
                    for off in range(min(t + 1, 12)):
                        want = float(A[t, t - off])
                        assert stats.band[b, l, h, o + t, off].item() == pytest.approx(want, rel=1e-4, abs=1e-5)
                    col = sum(float(A[u, t]) for u in range(t, n))
                    assert stats.col_sum[b, l, h, o + t].item() == pytest.approx(col, rel=1e-4, abs=1e-5)
        assert (stats.row_distance[b, :, :, :o] == 0).all() and (stats.col_sum[b, :, :, :o] == 0).all()


def compare_backends(model, seqs, left=True):
    input_ids, attention_mask, response = padded_batch(seqs, left)
    stats = {bk: capture_statistics(model, input_ids, attention_mask, config=CONFIG, backend=bk, block_bytes=1)
             for bk in ("streaming", "eager")}
    kurt = {bk: receiver_kurtosis(s, response, 4) for bk, s in stats.items()}
    for b in range(len(seqs)):
        assert normwise(kurt["streaming"][b], kurt["eager"][b]) < 1e-5
    for horizon in HORIZONS:
        results = {bk: rhythm_from_stats(s, response, CONFIG.replace(fai_horizon=horizon)) for bk, s in stats.items()}
        for b in range(len(seqs)):
            s, e = results["streaming"][b], results["eager"][b]
            for key in ("head_distance", "waad", "fai", "entropy"):
                assert normwise(getattr(s, key), getattr(e, key)) < 1e-5, key
            assert s.local_heads == e.local_heads and s.global_heads == e.global_heads
            for key in ("waad", "fai"):
                assert torch.equal(find_peaks(getattr(s, key)), find_peaks(getattr(e, key))), key


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_streaming_equals_eager(tiny_models, name):
    compare_backends(tiny_models[name], sequences(seed=2) + [(torch.randint(3, 259, (57,)), 20)])


def test_sliding_window_model(ref):
    model = tiny_qwen3_sliding(window=6)
    seqs = sequences(seed=3)
    ids, p = seqs[0]
    maps = reference(ref, "qwen3_sliding", model, ids, p)["maps"]
    rows, cols = torch.meshgrid(torch.arange(len(ids)), torch.arange(len(ids)), indexing="ij")
    assert (maps[..., rows - cols >= 6] == 0).all(), "the sliding window is not active"
    assert (maps[..., (rows - cols < 6) & (rows >= cols)] > 0).all()
    compare_backends(model, seqs, left=False)
    input_ids, attention_mask, response = padded_batch(seqs, left=True)
    stats = capture_statistics(model, input_ids, attention_mask, config=CONFIG, block_bytes=1)
    result = rhythm_from_stats(stats, response, CONFIG)
    for b, (ids, p) in enumerate(seqs):
        want = reference(ref, "qwen3_sliding", model, ids, p)[(10, 100)]
        assert normwise(result[b].waad, want["waad"]) < 1e-5
        assert normwise(result[b].fai, want["fai"]) < 1e-5


def test_entropy_temperature(tiny_models, ref):
    model = tiny_models["qwen3"]
    ids = torch.randint(3, 259, (1, 12))
    stats = capture_statistics(model, ids, config=CONFIG.replace(entropy_temperature=0.7))
    logits = model(input_ids=ids).logits[0].double().detach()
    assert math.isnan(stats.entropy[0, 0].item())
    want = [ref.entropy(logits[t - 1].tolist(), 0.7) for t in range(1, 12)]
    assert normwise(stats.entropy[0, 1:], want) < 1e-5


# ---------------------------------------------------------------- softcapping, sinks, other attention arguments
def assert_close_stats(got, want, tol=1e-5):
    for key in ("row_distance", "band", "col_sum", "entropy"):
        assert normwise(getattr(got, key).nan_to_num(0), getattr(want, key).nan_to_num(0)) < tol, key


@pytest.mark.parametrize("layer", [0, 1], ids=["sample_sliding", "sample_full"])
@pytest.mark.parametrize("build", [tiny_gemma2, tiny_gpt_oss], ids=["gemma2_softcap", "gpt_oss_sinks"])
def test_softcap_and_sink_models_match_hf_eager(build, layer):
    """Gemma 2 passes ``softcap``, GPT-OSS ``s_aux`` (sinks) to its attention function: the block
    path applies them in the sampled layer, and the layer that is not sampled runs the model's
    eager attention (SDPA would refuse softcap and drop the sinks)."""
    model = build()
    ids, mask, _ = padded_batch(sequences(seed=5), left=True)
    config = CONFIG.replace(layers=[layer])
    eager = capture_statistics(model, ids, mask, config=config, backend="eager")
    assert_close_stats(capture_statistics(model, ids, mask, config=config, block_bytes=1), eager)
    if build is tiny_gpt_oss:  # the sinks take probability: rows of real tokens sum to at most one
        rows = eager.band.sum(-1)[mask[:, None, None].bool().expand(-1, 1, 4, -1)]  # band width 101 > N
        assert (rows <= 1 + 1e-6).all() and (rows < 0.95).any()


@pytest.mark.parametrize("backend", ["streaming", "eager"])
def test_sink_model_rhythm_matches_loop_reference(ref, backend):
    """GPT-OSS rows sum to less than 1 over positions (the sink takes the rest): WAAD's capped
    distance must count only the mass on positions (``row_mass``), not put the sink's share at
    distance W.  Without ``row_mass`` WAAD is about 130% off the loop reference over the maps."""
    model = tiny_gpt_oss()
    seqs = sequences()
    input_ids, attention_mask, response = padded_batch(seqs, left=False)
    stats = capture_statistics(model, input_ids, attention_mask, config=CONFIG, backend=backend, block_bytes=1)
    assert stats.row_mass is not None
    real = attention_mask[:, None, None].bool().expand_as(stats.row_mass)
    assert (stats.row_mass[real] < 1 + 1e-6).all() and (stats.row_mass[real] < 0.95).any()
    assert (stats.row_mass[~real] == 0).all()
    result = rhythm_from_stats(stats, response, CONFIG)
    for b, (ids, p) in enumerate(seqs):
        want = reference(ref, "gpt_oss", model, ids, p)[(10, 100)]
        assert normwise(result[b].head_distance, want["head_distance"]) < 1e-5
        assert normwise(result[b].waad, want["waad"]) < 1e-5
        assert normwise(result[b].fai, want["fai"]) < 1e-5


def test_models_without_sinks_keep_no_row_mass(tiny_models):
    """``row_mass`` is kept only for models with attention sinks: the others' numbers do not move."""
    ids = torch.randint(3, 259, (1, 9))
    for backend in ("streaming", "eager"):
        assert capture_statistics(tiny_models["llama"], ids, config=CONFIG, backend=backend).row_mass is None


def test_unknown_attention_argument_is_refused(tiny_models):
    """Any attention argument the capture does not implement, with a value, is a UserError naming
    the model and the argument; the same argument empty (None, False, ()) is not."""
    model = tiny_models["llama"]
    ids = torch.randint(3, 259, (2, 9))
    mask = torch.ones_like(ids)
    kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=capture.position_ids_from_mask(mask),
                  use_cache=False)
    for empty in (None, False, ()):
        capture.streaming.capture(model, {**kwargs, "alibi_bias": empty}, [1], CONFIG, mask.bool(), False)
    with pytest.raises(UserError, match=r"LlamaForCausalLM \(LlamaAttention\) passes 'alibi_bias'.*eager"):
        capture.streaming.capture(model, {**kwargs, "alibi_bias": torch.ones(4)}, [1], CONFIG, mask.bool(), False)
    assert model.config._attn_implementation == "sdpa"


def _family(name: str):
    import transformers
    extra = {"Gemma3": dict(head_dim=8, sliding_window=4), "Mistral": dict(sliding_window=4),
             "Qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)}[name]
    config_class = getattr(transformers, "Gemma3TextConfig" if name == "Gemma3" else f"{name}Config")
    torch.manual_seed(0)
    config = config_class(**{**TINY, "num_key_value_heads": 2, **extra})
    config._attn_implementation = "eager"
    return getattr(transformers, f"{name}ForCausalLM")(config).float().eval()


@pytest.mark.parametrize("name", ["Mistral", "Qwen2", "Gemma3"])
def test_other_families_pass_only_known_arguments(name):
    """What Mistral, Qwen2 and Gemma 3 pass to their attention function (sliding windows,
    positions, use_cache) is implemented or harmless: the streaming backend matches eager."""
    model = _family(name)
    ids, mask, _ = padded_batch(sequences(seed=4), left=True)
    config = CONFIG.replace(layers="all")
    assert_close_stats(capture_statistics(model, ids, mask, config=config, block_bytes=1),
                       capture_statistics(model, ids, mask, config=config, backend="eager"))


# ---------------------------------------------------------------- errors are clear, never deep in torch
def test_prompt_longer_than_context(tiny_models):
    model = tiny_models["llama"]
    ids = torch.randint(3, 259, (1, 300))  # the tiny models have a context of 256
    for backend in ("streaming", "eager"):
        with pytest.raises(ValueError, match="context"):
            capture_statistics(model, ids, backend=backend)


def test_bad_layers_and_backend(tiny_models):
    model = tiny_models["llama"]
    ids = torch.randint(3, 259, (1, 8))
    with pytest.raises(ValueError, match="out of range"):
        capture_statistics(model, ids, layers=[7])
    with pytest.raises(ValueError, match="backend"):
        capture_statistics(model, ids, backend="flash")


def test_model_without_attention_cannot_be_captured():
    from transformers import MambaConfig, MambaForCausalLM
    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, state_size=4)).eval()
    ids = torch.randint(0, 50, (1, 10))
    for backend in ("streaming", "eager"):
        with pytest.raises(ValueError, match="cannot be captured"):
            capture_statistics(model, ids, config=RhythmConfig(layers="all"), backend=backend)


def test_eager_refuses_maps_that_do_not_fit(tiny_models, monkeypatch):
    model = tiny_models["llama"]
    monkeypatch.setattr(capture.eager, "available_bytes", lambda device: 1000)
    with pytest.raises(MemoryError, match="streaming"):
        capture_statistics(model, torch.randint(3, 259, (1, 40)), backend="eager")


def test_model_state_restored_after_capture_and_error():
    model = tiny_qwen3()
    model.train()
    capture_statistics(model, torch.randint(3, 259, (1, 8)))
    with pytest.raises(ValueError):
        capture_statistics(model, torch.randint(3, 259, (1, 300)))
    assert model.training and model.config._attn_implementation == "sdpa"


# ---------------------------------------------------------------- receiver layers, nesting and threads
@pytest.mark.parametrize("backend", ["streaming", "eager"])
def test_receiver_layers_captured_narrow_give_the_same_metrics(tiny_models, backend):
    """``capture_with_receivers``: the receiver layers that are not sampled keep only
    ``receiver_band_width`` diagonals (4 at the analysis defaults, against a band of 10), and the
    receiver scores and per-head FAI read from them equal those of a full-band capture of every
    layer bitwise; one diagonal fewer would not do."""
    from attnrhythm.core.metrics import per_head_fai, response_positions

    model = tiny_models["llama_gqa"]
    config = RhythmConfig(layers=[1, 2], fai_horizon=ANALYSIS_HORIZON)
    input_ids, attention_mask, response = padded_batch(sequences(seed=6), left=True)
    wide = capture_statistics(model, input_ids, attention_mask, config=config, layers=[0, 1, 2, 3], backend=backend)
    stats, receivers = capture.capture_with_receivers(model, input_ids, attention_mask, config=config,
                                                      receiver_layers=[3, 0, 1, 2], backend=backend)
    width = capture.receiver_band_width(config)
    assert receivers.band.shape[-1] == width == 4 and stats.band.shape[-1] == config.band_width == 10
    assert receivers.layers == [0, 1, 2, 3] and stats.layers == [1, 2]
    sampled = wide.subset([1, 2])
    for key in ("row_distance", "band", "col_sum", "entropy"):
        torch.testing.assert_close(getattr(stats, key), getattr(sampled, key), rtol=0, atol=0, equal_nan=True)
    for key in ("row_distance", "col_sum"):
        assert torch.equal(getattr(receivers, key), getattr(wide, key)), key
    assert torch.equal(receivers.band, wide.band[..., :width])
    positions, mask = response_positions(response)
    same = lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # noqa: E731
    same(receiver_kurtosis(receivers, response, config.receiver_gap), receiver_kurtosis(wide, response, 4))
    same(per_head_fai(receivers, positions, mask, config.fai_horizon),
         per_head_fai(wide, positions, mask, config.fai_horizon))
    short = receivers.subset([0])
    short.band = short.band[..., :width - 1]
    with pytest.raises(ValueError, match="band width"):
        receiver_kurtosis(short, response, config.receiver_gap)
    on_cpu = capture.capture_with_receivers(model, input_ids, attention_mask, config=config, receiver_layers=[0],
                                            backend=backend, device="cpu")[1]
    assert torch.equal(on_cpu.band, receivers.band[:, :1]) and on_cpu.band.device.type == "cpu"


def test_captures_nest_and_threads_do_not_meet(tiny_models):
    """The capture in flight is a context variable: a capture inside another's block runs and
    restores the outer one, and two threads capturing at once (both held mid-pass by a barrier)
    get their own statistics."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from attnrhythm.capture import streaming

    input_ids, attention_mask, _ = padded_batch(sequences(seed=7), left=True)
    models = [tiny_models["llama"], tiny_models["qwen3"]]
    run = lambda model: capture_statistics(model, input_ids, attention_mask, config=CONFIG)  # noqa: E731
    want = [run(model) for model in models]
    with streaming.streaming_capture([1], 12, attention_mask.bool()) as outer:
        inner = run(models[1])
        assert streaming.active() is outer and outer.stats is None  # the inner capture filled its own
    assert streaming.active() is None
    assert torch.equal(inner.band, want[1].band)
    barrier = threading.Barrier(2, timeout=60)

    def meet(*args):  # both captures are in flight when either passes layer 2
        barrier.wait()

    hooks = [model.model.layers[2].register_forward_pre_hook(meet) for model in models]
    try:
        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(run, models))
    finally:
        for hook in hooks:
            hook.remove()
    for g, w in zip(got, want):
        assert torch.equal(g.band, w.band) and torch.equal(g.col_sum, w.col_sum)
