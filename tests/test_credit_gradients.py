"""Why credits differ, measured on one shared rollout batch (`attnrhythm credit-gradients`):
the batch-level keep mask of high-entropy-selection reaches TRL's loss (the unkept tokens give
exactly zero gradient), and the per-credit numbers agree with independent recomputations."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
from test_trainer import build_tiny_model, make_trainer  # noqa: E402

from attnrhythm.core.config import RhythmConfig  # noqa: E402
from attnrhythm.train.credit_gradients import compare_credits, policy_gradient, rollout_batches, shaped_advantages  # noqa: E402
from attnrhythm.train.trainer import CreditConfig, RhythmGRPOTrainer  # noqa: E402


@pytest.fixture(scope="module")
def rollout(tmp_path_factory):
    model_dir = build_tiny_model(tmp_path_factory.mktemp("tiny"))
    trainer = make_trainer(RhythmGRPOTrainer, model_dir, tmp_path_factory.mktemp("out"),
                           args_overrides=dict(max_completion_length=16),
                           credit=CreditConfig(strategy="none", rhythm=RhythmConfig(high_entropy_share=0.3)))
    torch.set_num_threads(1)
    output = next(rollout_batches(trainer, 1))
    assert output["advantages"].abs().sum() > 0, "the rollout needs a signal for these tests to bite"
    return trainer, output


def test_unkept_tokens_give_exactly_zero_gradient_through_trls_loss(rollout):
    trainer, output = rollout
    shaped, _, sets = shaped_advantages(trainer, output, "high-entropy-selection")
    valid = output["completion_mask"].bool()
    kept = sets["kept"]
    assert kept.any() and (valid & ~kept).any()
    # TRL scores with fused_lm_head (no logits tensor): the final hidden state at position p is
    # what token p + 1's log-prob reads, so its gradient is that token's share of the loss
    hidden = []
    norm = trainer.model.model.norm

    def keep(module, args, out):  # returns None: the output stays as it is
        out.retain_grad()
        hidden.append(out)

    hook = norm.register_forward_hook(keep)
    try:
        policy_gradient(trainer, {**output, "advantages": shaped})
    finally:
        hook.remove()
    width = valid.size(1)
    grad = hidden[-1].grad[:, -width - 1:-1]  # the states that predict completion tokens 0..C-1
    per_token = grad.abs().sum(-1)
    assert torch.all(per_token[valid & ~kept] == 0), "an unkept token moved the policy"
    with_signal = kept & valid & (output["advantages"][:, None] != 0)
    assert torch.all(per_token[with_signal] > 0), "a kept token with an advantage gave no gradient"


def test_credit_rows_match_independent_recomputations(rollout):
    trainer, output = rollout
    rows = {r["credit"]: r for r in compare_credits(trainer, output, ["random", "high-entropy-selection"])}
    assert rows["none"]["cosine"] == pytest.approx(1.0) and rows["none"]["norm_ratio"] == pytest.approx(1.0)
    assert rows["none"]["tokens_reweighted"] == 0 and rows["none"]["advantage_mass"] == pytest.approx(1.0)
    valid = output["completion_mask"].bool()
    g_none = policy_gradient(trainer, {**output, "advantages": output["advantages"][:, None].expand_as(valid)})
    shaped, gamma, sets = shaped_advantages(trainer, output, "high-entropy-selection")
    g = policy_gradient(trainer, {**output, "advantages": shaped})
    row = rows["high-entropy-selection"]
    assert row["cosine"] == pytest.approx(float(torch.nn.functional.cosine_similarity(g, g_none, dim=0)), abs=1e-9)
    assert row["tokens_kept"] == pytest.approx(float((sets["kept"] & valid).sum() / valid.sum()))
    mass = (shaped.abs() * valid).sum() / (output["advantages"][:, None].abs() * valid).sum()
    assert row["advantage_mass"] == pytest.approx(float(mass))
    assert 0 < row["tokens_kept"] < 1 and row["cosine"] < 1
    r = rows["random"]
    _, gamma, _ = shaped_advantages(trainer, output, "random")
    assert r["tokens_reweighted"] == pytest.approx(float(((gamma != 1) & valid).sum() / valid.sum()))
    assert 0 < r["tokens_reweighted"] < 1 and r["advantage_mass"] > 1  # random amplifies a share of tokens


def test_chunked_gradient_equals_the_whole_batch_gradient(rollout):
    """TRL's 'grpo' loss is a mean over sequences: chunks weighted by their share of the rows
    give the whole batch's gradient."""
    trainer, output = rollout
    valid = output["completion_mask"].bool()
    inputs = {**output, "advantages": output["advantages"][:, None].expand_as(valid)}
    whole = policy_gradient(trainer, inputs, chunk=valid.size(0))
    assert whole.norm() > 0
    chunked = policy_gradient(trainer, inputs, chunk=3)
    assert float((chunked - whole).norm() / whole.norm()) < 1e-5  # float32 sums in another order
