"""RhythmGRPOTrainer on a tiny random Llama (SmolLM2's tokenizer): the TRL contract and the
credit wiring.  The equivalence test is the guard against TRL upgrades: with credit 'none' our
trainer must give stock GRPOTrainer's loss and updated weights exactly."""
from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from attnrhythm.capture import capture_statistics  # noqa: E402
from attnrhythm.core.config import RhythmConfig  # noqa: E402
from attnrhythm.core.credit import credit_gamma  # noqa: E402
from attnrhythm.core.metrics import calibrate_heads, rhythm_from_stats  # noqa: E402
from attnrhythm.models import embedded_model_dir, load_model  # noqa: E402
from attnrhythm.train.trainer import CreditConfig, RhythmGRPOTrainer, truncate_metrics  # noqa: E402

PROMPTS = [f"User: what is {i} plus {2 * i + 1}?{' Think.' * (i % 3)}\nAssistant:" for i in range(8)]


def build_tiny_model(path) -> str:
    """A 4-layer random Llama with SmolLM2's tokenizer (cached already): fast, real tokens."""
    tok = AutoTokenizer.from_pretrained(embedded_model_dir("smollm2-135m"))
    tok.pad_token = tok.pad_token or tok.eos_token
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def id_reward(prompts, completions, completion_ids, **kwargs):
    """Deterministic rewards with spread, so advantages (and updates) are not zero."""
    return [float(sum(ids) % 7) for ids in completion_ids]


def make_trainer(cls, model_dir, out, args_overrides=None, **extra):
    model, tok = load_model(model_dir, dtype="float32", device="cpu")
    settings = dict(output_dir=str(out), max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                    steps_per_generation=2, num_generations=2, max_completion_length=12, loss_type="grpo",
                    beta=0.0, learning_rate=1e-2, lr_scheduler_type="constant", use_cpu=True, bf16=False, seed=0,
                    report_to="none", logging_steps=1, save_strategy="no", gradient_checkpointing=True,
                    disable_tqdm=True)
    args = GRPOConfig(**{**settings, **(args_overrides or {})})
    return cls(model=model, reward_funcs=[id_reward], args=args, train_dataset=Dataset.from_list(
        [{"prompt": p} for p in PROMPTS]), processing_class=tok, **extra)


def test_none_equals_stock_trl(tiny_model, tmp_path, one_thread):
    stock = make_trainer(GRPOTrainer, tiny_model, tmp_path / "stock")
    stock.train()
    losses = [h["loss"] for h in stock.state.log_history if "loss" in h]
    assert any(abs(x) > 1e-4 for x in losses), "rewards must give non-zero advantages for this test to bite"
    for capture in (False, True):  # with capture: the attention pass itself must leave no trace
        ours = make_trainer(RhythmGRPOTrainer, tiny_model, tmp_path / f"ours{capture}",
                            credit=CreditConfig(strategy="none", capture_with_none=capture))
        ours.train()
        assert [h["loss"] for h in ours.state.log_history if "loss" in h] == losses
        for (name, a), (_, b) in zip(stock.model.named_parameters(), ours.model.named_parameters()):
            assert torch.equal(a, b), f"{name} differs from stock TRL (capture={capture})"
    assert "rhythm/gamma_mean" in ours.state.log_history[0]
    assert ours.state.log_history[0]["rhythm/one_pass"] == 1.0  # the capture ran inside TRL's pass


def train_keeping_rollouts(trainer) -> list[dict]:
    """trainer.train(), keeping a copy of every rollout batch its _generate_and_score_completions returns."""
    kept, method = [], trainer._generate_and_score_completions

    def keep(inputs):
        output = method(inputs)
        kept.append({k: v.clone() if torch.is_tensor(v) else v for k, v in output.items()})
        return output

    trainer._generate_and_score_completions = keep
    trainer.train()
    return kept


@pytest.mark.parametrize("strategy", ["coupled", "entropy"])
def test_one_pass_equals_two_passes(tiny_model, tmp_path, one_thread, strategy):
    """Statistics taken inside TRL's old-log-prob pass (GA 1 < steps_per_generation 2, so TRL runs
    it; it passes no position_ids, so left-padded rows get shifted RoPE positions): the same gamma
    and loss as the separate attention pass, and TRL's log-probs bitwise as stock TRL's."""
    stock = make_trainer(GRPOTrainer, tiny_model, tmp_path / "stock")
    stock_rollouts = train_keeping_rollouts(stock)
    runs = {}
    for one_pass in (True, False):
        trainer = make_trainer(RhythmGRPOTrainer, tiny_model, tmp_path / f"one{one_pass}",
                               credit=CreditConfig(strategy=strategy, one_pass=one_pass))
        runs[one_pass] = trainer, train_keeping_rollouts(trainer)
        logged = [h["rhythm/one_pass"] for h in trainer.state.log_history if "rhythm/one_pass" in h]
        assert logged and set(logged) == {float(one_pass)}
        model = trainer.model
        assert model.config._attn_implementation == "sdpa"  # restored after each pass
        assert not model.get_decoder()._forward_hooks and not model.get_decoder()._forward_pre_hooks
    (one, one_rollouts), (two, two_rollouts) = runs[True], runs[False]
    assert len(one_rollouts) == len(two_rollouts) == len(stock_rollouts) >= 1
    for ours, theirs, base in zip(one_rollouts, two_rollouts, stock_rollouts):
        assert ours["prompt_mask"].min() == 0 and ours["prompt_mask"].sum(1).unique().numel() > 1  # left padding
        assert torch.equal(ours["old_per_token_logps"], base["old_per_token_logps"])  # bitwise stock TRL
        assert torch.equal(theirs["old_per_token_logps"], base["old_per_token_logps"])
        assert torch.equal(ours["advantages"], theirs["advantages"])  # the same gamma on every token
        shaped = base["advantages"][:, None].expand_as(ours["advantages"])
        assert (ours["advantages"] != shaped).any(), "gamma must differ from 1 somewhere for this test to bite"
    losses = lambda t: [h["loss"] for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert losses(one) == losses(two)
    for (name, a), (_, b) in zip(one.model.named_parameters(), two.model.named_parameters()):
        assert torch.equal(a, b), name


def test_in_pass_statistics_restore_the_model_on_error(tiny_model):
    from attnrhythm.capture.in_pass import statistics_in_pass

    model, tok = load_model(tiny_model, dtype="float32", device="cpu")
    ids = tok(PROMPTS[:2], return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        plain = model(**ids).logits
        with statistics_in_pass(model, RhythmConfig(), entropy=True) as capture:
            inside = model(**ids).logits
        assert torch.equal(plain, inside)
        assert capture.failed is None and capture.rows == 2 and capture.chunks[0][1].entropy is not None
        reference = capture_statistics(model, ids["input_ids"], ids["attention_mask"], config=RhythmConfig())
        valid = reference.valid[:, None, None].expand_as(reference.row_distance)  # real rows
        torch.testing.assert_close(capture.chunks[0][1].row_distance[valid], reference.row_distance[valid],
                                   rtol=1e-4, atol=1e-4)
        with pytest.raises(KeyError), statistics_in_pass(model, RhythmConfig(), entropy=False):
            model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
            raise KeyError("boom")
    assert model.config._attn_implementation == "sdpa"
    assert not model.get_decoder()._forward_hooks and not model.get_decoder()._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, plain)


@pytest.fixture(scope="module")
def rollout(tiny_model, tmp_path_factory):
    """One stock rollout batch (with completions cut to different lengths, as EOS would) and a
    trainer whose parent method replays it, so every strategy shapes the very same batch."""
    trainer = make_trainer(RhythmGRPOTrainer, tiny_model, tmp_path_factory.mktemp("rollout"))
    trainer.model.train()
    trainer.model.gradient_checkpointing_enable()  # as Trainer.train() does: the capture must switch it off and back
    base = GRPOTrainer._generate_and_score_completions(trainer, [{"prompt": p} for p in PROMPTS for _ in range(2)])
    mask = base["completion_mask"].clone()
    for b, n in enumerate([12, 3, 7, 12, 1, 9, 12, 5, 11, 12, 2, 8, 12, 6, 10, 4]):
        mask[b, n:] = 0
    base["completion_mask"] = mask
    assert base["prompt_mask"].min() == 0, "prompts of different lengths: left padding is exercised"
    return trainer, base


def shape(rollout, monkeypatch, **credit):
    trainer, base = rollout
    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", lambda self, inputs: dict(base))
    trainer.credit = CreditConfig(**credit)
    trainer._heads, trainer._heads_step = None, -1
    return trainer._generate_and_score_completions(None), base


def test_coupled_gamma_lands_on_the_right_tokens(rollout, monkeypatch):
    out, base = shape(rollout, monkeypatch, strategy="coupled")
    trainer = rollout[0]
    A, adv, mask = base["advantages"], out["advantages"], base["completion_mask"].bool()
    assert adv.shape == base["completion_ids"].shape and adv.dtype == A.dtype
    # reference: capture the same sequences independently, left-aligned gamma per response
    ids = torch.cat([base["prompt_ids"], base["completion_ids"]], 1)
    attn = torch.cat([base["prompt_mask"], base["completion_mask"]], 1)
    response = torch.cat([torch.zeros_like(base["prompt_mask"]), base["completion_mask"]], 1).bool()
    cfg = RhythmConfig()
    r = rhythm_from_stats(capture_statistics(trainer.model, ids, attn, config=cfg), response, cfg)
    gamma = credit_gamma(r, "coupled", cfg)
    assert (gamma > 1).any()
    for b in range(len(A)):
        n = int(mask[b].sum())
        torch.testing.assert_close(adv[b, :n], A[b] * gamma[b, :n], rtol=1e-6, atol=0)
        assert torch.equal(adv[b, n:], A[b].expand(adv.shape[1] - n))  # padding: gamma 1 (masked by TRL anyway)
    assert trainer.model.training and trainer.model.config._attn_implementation == "sdpa"
    assert trainer.model.is_gradient_checkpointing


@pytest.mark.parametrize("strategy", ["random", "entropy", "local", "global"])
def test_strategies_amplify_a_q_share(rollout, monkeypatch, strategy):
    out, base = shape(rollout, monkeypatch, strategy=strategy, rhythm=RhythmConfig(q=0.4, amp=1.5))
    A, mask = base["advantages"], base["completion_mask"].bool()
    nonzero = A.abs() > 0
    ratio = torch.round(out["advantages"][nonzero] / A[nonzero, None] * 1e4) / 1e4  # division round-off
    assert set(ratio[mask[nonzero]].unique().tolist()) <= {1.0, 1.5}
    amplified = ((ratio == 1.5) & mask[nonzero]).sum(-1)
    assert (amplified <= torch.ceil(0.4 * mask[nonzero].sum(-1))).all() and amplified.sum() > 0


def test_sign_positive_leaves_negative_advantages(rollout, monkeypatch):
    out, base = shape(rollout, monkeypatch, strategy="local", rhythm=RhythmConfig(sign="positive"))
    A = base["advantages"]
    neg, pos = A < 0, A > 0
    assert torch.equal(out["advantages"][neg], A[neg, None].expand(-1, out["advantages"].shape[1]))
    assert (out["advantages"][pos] != A[pos, None]).any()


def test_high_entropy_selection_keeps_top_share(rollout, monkeypatch):
    out, base = shape(rollout, monkeypatch, strategy="high-entropy-selection")
    A, mask = base["advantages"], base["completion_mask"].bool()
    kept = (out["advantages"] != 0) & mask & (A[:, None] != 0)
    n_valid = int(mask.sum())
    assert int(((out["advantages"] != 0) | (A[:, None] == 0))[mask].sum()) >= int(kept.sum())
    assert 0 < int(kept.sum()) <= math.ceil(0.2 * n_valid)
    assert torch.equal(out["advantages"][kept], A[:, None].expand_as(mask)[kept])  # kept tokens: plain A_i


def test_fixed_heads_calibrate_and_refresh(rollout, monkeypatch):
    trainer, base = rollout
    out, _ = shape(rollout, monkeypatch, strategy="global", rhythm=RhythmConfig(head_mode="fixed"),
                   head_refresh_steps=2)
    first = trainer._heads
    # the calibration batch is the first capture chunk (per_device_train_batch_size sequences)
    ids = torch.cat([base["prompt_ids"], base["completion_ids"]], 1)[:4]
    attn = torch.cat([base["prompt_mask"], base["completion_mask"]], 1)[:4]
    response = torch.cat([torch.zeros_like(base["prompt_mask"]), base["completion_mask"]], 1).bool()[:4]
    ref = calibrate_heads(capture_statistics(trainer.model, ids, attn), response, RhythmConfig())
    assert torch.equal(first.local, ref.local) and torch.equal(first.global_, ref.global_)
    try:
        trainer.state.global_step = 1
        trainer._generate_and_score_completions(None)
        assert trainer._heads is first and trainer._heads_step == 0
        trainer.state.global_step = 2
        trainer._generate_and_score_completions(None)
        assert trainer._heads is not first and trainer._heads_step == 2
    finally:
        trainer.state.global_step = 0


def test_truncate_metrics_drops_cut_and_later_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 0.1}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    assert truncate_metrics(str(path), 2) == 2
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    assert truncate_metrics(str(tmp_path / "absent.jsonl"), 3) == 0


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="credit strategy"):
        CreditConfig(strategy="anchors")


def constant_reward(prompts, completions, completion_ids, **kwargs):
    """Countdown's format-only reward for every completion: no signal anywhere."""
    return [0.1] * len(completions)


# G = 8: the float32 mean of eight 0.1 rewards is not 0.1 (with G <= 6 it happens to be exact)
EIGHT = {"num_generations": 8, "per_device_train_batch_size": 8, "steps_per_generation": 2, "max_steps": 2}


@pytest.mark.parametrize("strategy", ["none", "coupled"])
def test_equal_reward_groups_leave_the_weights_unchanged(tiny_model, tmp_path, strategy):
    trainer = make_trainer(RhythmGRPOTrainer, tiny_model, tmp_path / strategy, EIGHT,
                           credit=CreditConfig(strategy=strategy))
    trainer.reward_funcs = [constant_reward]
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)]
    assert not moved, f"a signal-free batch moved {moved[:3]}"
    logged = [h["rollout/groups_with_signal"] for h in trainer.state.log_history if "rollout/groups_with_signal" in h]
    assert logged and all(x == 0.0 for x in logged)


def test_stock_trl_moves_weights_on_equal_rewards(tiny_model, tmp_path):
    """The bug the option fixes: with TRL's arithmetic, 0.1-only groups still move the weights."""
    trainer = make_trainer(RhythmGRPOTrainer, tiny_model, tmp_path / "stock", EIGHT,
                           credit=CreditConfig(strategy="none", zero_equal_groups=False))
    trainer.reward_funcs = [constant_reward]
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_drift_and_rollout_samples_are_logged(tiny_model, tmp_path):
    trainer = make_trainer(RhythmGRPOTrainer, tiny_model, tmp_path / "drift", {"max_steps": 4},
                           credit=CreditConfig(strategy="coupled", kl_to_start=True, rollout_samples=2))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "rhythm/jaccard_local" in h]
    assert logs and logs[0]["rhythm/jaccard_local"] == 1.0 and logs[0]["rhythm/jaccard_global"] == 1.0
    for key in ("rhythm/waad_mean", "rhythm/fai_peak_density", "rollout/kl_to_start"):
        assert all(math.isfinite(h[key]) for h in trainer.state.log_history if key in h), key
    kl = [h["rollout/kl_to_start"] for h in trainer.state.log_history if "rollout/kl_to_start" in h]
    assert kl[0] == pytest.approx(0.0, abs=1e-6), "the first rollout is sampled from the starting model"
    assert kl[-1] > 0, "lr 1e-2 must move the policy away from the start"
    with open(tmp_path / "drift" / "rollouts.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 2 * len(kl)
    row = rows[0]
    assert len(row["tokens"]) == len(row["gamma"]) == len(row["sets"]) == len(row["waad"])
    assert all(g > 1 for g, s in zip(row["gamma"], row["sets"]) if s == "anchor")


def test_drift_jaccard_and_series_sums():
    from attnrhythm.train.drift import head_sets, jaccard, series_sums  # noqa: E402
    d = torch.tensor([[1.0, 5.0, 3.0], [9.0, 2.0, 7.0]])
    local, global_ = head_sets(d, [4, 8], RhythmConfig(head_fraction=0.2))
    assert local == {(4, 0)} and global_ == {(8, 0)}
    assert jaccard({(1, 2)}, {(1, 2), (3, 4)}) == 0.5 and jaccard(set(), set()) == 1.0
    waad = torch.tensor([[0.0, 2.0, 1.0, 3.0, 0.0]])
    fai = torch.tensor([[0.1, 0.5, 0.2, float("nan"), float("nan")]])
    mask = torch.tensor([[True, True, True, True, False]])
    sums = series_sums(waad, fai, mask, 0.4)
    assert sums["tokens"] == 4 and sums["waad_sum"] == 6.0 and sums["fai_defined"] == 3
    assert sums["fai_sum"] == pytest.approx(0.8) and sums["waad_peaks"] == 2 and sums["fai_peaks"] == 1
