"""The perturbation study: content words and Jaccard on hand-checked strings, position selection
on planted FAI, batched forced-token continuations against a manual token-by-token greedy loop
on a tiny random Llama (with the SmolLM2 tokenizer), the Table 1 aggregation, and the files
(resume, settings check, escaped HTML)."""
import json
import math

import numpy as np
import pytest
import torch

from attnrhythm.studies import perturb
from attnrhythm.errors import UserError
from attnrhythm.generation import (PAPER_STOP_STRINGS, StopStrings, greedy_responses, sample_responses, stop_strings_for,
                                   strip_stop)
from attnrhythm.studies.perturb import alternatives, perturb_response, select_positions, summarize
from attnrhythm.core.bootstrap import bootstrap_ci
from attnrhythm.core.textstats import content_jaccard, content_words, jaccard, word_tokens

NAN = math.nan


# ---------------------------------------------------------------- content words and Jaccard
def test_content_words_hand_checked():
    text = "She sold 1,000 apples for $3.50 each, and then she didn't sell 10 of them!"
    # 'she', 'for', 'each', 'and', 'then', "didn't", 'of', 'them' are stop words; numbers stay
    # even where the stop list has them ('10'); punctuation and '$' go
    assert content_words(text) == {"sold", "1000", "apples", "3.50", "sell", "10"}
    assert word_tokens("The answer is \\boxed{42}.") == ["the", "answer", "is", "boxed", "42"]
    assert content_words("So, the total is: 5 + 7 = 12.") == {"total", "5", "7", "12"}
    assert content_words("It\u2019s THE Answer") == {"answer"}  # curly apostrophe, case folded
    assert content_words("") == set()


def test_jaccard_hand_checked():
    assert jaccard({"a", "b", "c"}, {"b", "c", "d"}) == pytest.approx(2 / 4)
    assert jaccard({"a"}, {"b"}) == 0.0
    assert jaccard(set(), set()) == 1.0  # two empty sets are identical
    assert jaccard({"a"}, set()) == 0.0
    # {apples, cost, 5, dollars} vs {total, apples, cost, 6, dollars}: 3 shared of 6
    assert content_jaccard("The apples cost 5 dollars.", "Total: the apples cost 6 dollars") == pytest.approx(3 / 6)


def test_bootstrap_ci_brackets_the_mean():
    values = np.arange(20, dtype=float)
    lo, hi = bootstrap_ci(values, n_boot=500, seed=1)
    assert lo < values.mean() < hi
    assert bootstrap_ci([NAN, 2.0, 2.0]) == (2.0, 2.0)  # NaN dropped, constant values
    assert all(math.isnan(v) for v in bootstrap_ci([]))


# ---------------------------------------------------------------- position selection
def test_select_positions_planted():
    fai = [0.5, NAN, 0.9, 0.1, 0.9, 0.3, NAN, 0.1, 0.7]
    top, bottom = select_positions(fai, 2)
    assert top == [2, 4]  # tie at 0.9: earlier first
    assert bottom == [3, 7]  # tie at 0.1: earlier first; NaN never chosen
    top, bottom = select_positions(fai, 3)
    assert top == [2, 4, 8] and bottom == [3, 7, 5]


def test_select_positions_k_larger_than_available():
    # 5 defined positions, k = 3: both groups get 5 // 2 = 2 and never share a position
    top, bottom = select_positions([NAN, 0.4, 0.2, 0.9, NAN, 0.2, 0.6], 3)
    assert top == [3, 6] and bottom == [2, 5]
    # all tied: the groups still do not overlap
    top, bottom = select_positions([0.5] * 4, 3)
    assert top == [0, 1] and bottom == [2, 3]
    assert select_positions([NAN, 0.3], 3) == ([], [])
    assert select_positions([], 3) == ([], [])


def test_alternatives_skip_original_and_special():
    logits = torch.tensor([0.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    assert alternatives(logits, original=1, n=3, excluded=set()) == [2, 3, 4]
    assert alternatives(logits, original=2, n=3, excluded={1, 4}) == [3, 5, 0]


# ---------------------------------------------------------------- decoding against a manual loop
@pytest.fixture(scope="module")
def smol_tokenizer():
    from transformers import AutoTokenizer

    from attnrhythm.models import embedded_model_dir
    try:
        return AutoTokenizer.from_pretrained(embedded_model_dir("smollm2-135m"))
    except (FileNotFoundError, ImportError, OSError) as err:
        pytest.skip(f"the SmolLM2 tokenizer is not available: {err}")


@pytest.fixture(scope="module")
def tiny_smol(smol_tokenizer):
    """A tiny random Llama with SmolLM2's vocabulary and stop token."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.3, eos_token_id=smol_tokenizer.eos_token_id,
                         pad_token_id=smol_tokenizer.eos_token_id, bos_token_id=smol_tokenizer.bos_token_id)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).float().eval()


def manual_greedy(model, ids, n, stops):
    """Token by token, the whole sequence every step, no cache, no padding."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(token)
            if token in stops:
                break
    return out


def test_greedy_responses_match_manual_loop(tiny_smol, smol_tokenizer):
    prompts = [smol_tokenizer(t)["input_ids"] for t in
               ("Tom has 3 apples.", "A train travels 60 miles in 2 hours; how far in 5 hours?", "Hi there")]
    assert len({len(p) for p in prompts}) == 3  # different lengths: real left padding
    stops = {smol_tokenizer.eos_token_id}
    got = greedy_responses(tiny_smol, prompts, 12, stops)
    for prompt, response in zip(prompts, got):
        assert response == manual_greedy(tiny_smol, prompt, 12, stops)


def test_forced_continuations_match_manual_loop(tiny_smol, smol_tokenizer):
    stops = {smol_tokenizer.eos_token_id}
    prompt = smol_tokenizer("Question: Mia buys 4 pens at $2 each. How much does she pay?\nAnswer:")["input_ids"]
    response = strip_stop(greedy_responses(tiny_smol, [prompt], 20, stops)[0], stops)
    problem, trials = perturb_response(tiny_smol, smol_tokenizer, prompt, response, k=2, n_alternatives=2,
                                       max_new_tokens=20, min_after=0)
    assert problem["top_positions"] and problem["bottom_positions"]
    assert not set(problem["top_positions"]) & set(problem["bottom_positions"])
    assert len(trials) == 2 * 2 * len(problem["top_positions"])
    budgets = {t["position"]: 20 - t["position"] - 1 for t in trials}
    assert len(set(budgets.values())) > 1  # rows of different lengths in one batch
    for trial in trials:
        i = trial["position"]
        assert trial["original_token_id"] == response[i] != trial["forced_token_id"]
        expected = manual_greedy(tiny_smol, prompt + response[:i] + [trial["forced_token_id"]], budgets[i], stops)
        assert trial["perturbed_token_ids"] == expected
        assert math.isfinite(trial["fai"]) and trial["fai"] == problem["fai"][i]
        original = smol_tokenizer.decode(response[i + 1:], skip_special_tokens=True)
        assert trial["original_continuation"] == original
        assert trial["jaccard"] == pytest.approx(content_jaccard(original, trial["perturbed_continuation"]))
    fai = np.array([NAN if v is None else v for v in problem["fai"]])
    assert min(fai[problem["top_positions"]]) >= max(fai[problem["bottom_positions"]])


def test_min_after_keeps_late_positions_out(tiny_smol, smol_tokenizer):
    prompt = smol_tokenizer("Count: 1 2 3")["input_ids"]
    response = strip_stop(greedy_responses(tiny_smol, [prompt], 16, set())[0], set())
    problem, _ = perturb_response(tiny_smol, smol_tokenizer, prompt, response, k=3, n_alternatives=1,
                                  max_new_tokens=16, min_after=8)
    assert max(problem["top_positions"] + problem["bottom_positions"]) < len(response) - 8


# ---------------------------------------------------------------- aggregation
def test_summarize_constructed():
    problems = [dict(top_mean=0.2, bottom_mean=0.6), dict(top_mean=0.5, bottom_mean=0.4),
                dict(top_mean=0.3, bottom_mean=0.3), dict(top_mean=0.1, bottom_mean=0.9),
                dict(top_mean=None, bottom_mean=0.5)]
    s = summarize(problems, n_boot=300, seed=0)
    assert (s["n_problems"], s["n_compared"], s["n_skipped"]) == (5, 4, 1)
    assert s["top"]["mean"] == pytest.approx(0.275) and s["bottom"]["mean"] == pytest.approx(0.55)
    assert s["top_below_bottom"]["share"] == pytest.approx(0.5)  # the tie counts as not below
    assert s["top_below_bottom"]["n_ties"] == 1
    assert s["difference"]["mean"] == pytest.approx(-0.275)
    assert s["top"]["paper"] == 0.534 and s["top_below_bottom"]["paper"] == 0.8714
    lo, hi = s["top"]["ci"]
    assert lo <= s["top"]["mean"] <= hi


# ---------------------------------------------------------------- files: resume, settings, HTML
def _args(out, data, **over):
    return perturb.PerturbSettings(**{**dict(out=str(out), data=str(data), n=2, k=1, alternatives=2, max_new_tokens=14,
                                             min_after=2, n_boot=50, prompt="paper", model="tiny"), **over})


def test_run_resume_and_html(tmp_path, tiny_smol, smol_tokenizer):
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps(dict(id=f"p{i}", question=q, answer="#### 3")) + "\n" for i, q in
                            enumerate(["What is <b>1</b> + 2 & why?", "Tom has 2 cats and 1 dog. How many pets?"])))
    out = tmp_path / "run"
    first = perturb.run_perturbation(_args(out, data), tiny_smol, smol_tokenizer)
    assert first["n_problems"] == 2
    with pytest.raises(ValueError, match="--resume"):
        perturb.run_perturbation(_args(out, data), tiny_smol, smol_tokenizer)
    with pytest.raises(ValueError, match="other settings"):
        perturb.run_perturbation(_args(out, data, k=2, resume=True), tiny_smol, smol_tokenizer)
    # kill the run while it writes the second problem: its trials are half there, no problem line
    path = out / "perturbations.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    complete = path.read_text()
    last = json.loads(lines[-1])["problem_id"]
    path.write_text("".join(lines[:-2]) + lines[-2][:25])
    settings, problems, trials = perturb.read_records(path)
    assert last not in {p["problem_id"] for p in problems} | {t["problem_id"] for t in trials}
    result = perturb.run_perturbation(_args(out, data, resume=True), tiny_smol, smol_tokenizer)
    assert result["n_problems"] == 2
    settings, problems, trials = perturb.read_records(path)
    assert sorted(p["problem_id"] for p in problems) == ["p0", "p1"] and settings["k"] == 1
    assert path.read_text().count('"type": "trial"') == len(trials)  # the cut attempt's trials are gone
    redone = [t for t in trials if t["problem_id"] == last]
    assert redone == [json.loads(line) for line in complete.splitlines() if f'"problem_id": "{last}"' in line
                      and '"type": "trial"' in line]  # deterministic: the same trials again
    saved = json.loads((out / "perturbation.json").read_text())
    assert {"top", "bottom", "top_below_bottom", "settings", "machine", "seconds_per_problem"} <= set(saved)
    page = (out / "perturbation.html").read_text()
    assert "<b>1</b>" not in page and "&lt;b&gt;1&lt;/b&gt;" in page and "&amp; why" in page
    assert page.count("<tr>") == 2 + len(trials)


def test_stop_strings_end_responses_and_continuations_where_the_text_first_shows_them(tiny_smol, smol_tokenizer):
    """A response ends once its text contains a stop string and is cut just before it: the result
    is the unstopped response's longest prefix whose text stops short of the string, for greedy
    originals, sampled responses and forced continuations alike."""
    stops = {smol_tokenizer.eos_token_id}
    text = lambda ids: smol_tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    prompt = smol_tokenizer("Question: Mia buys 4 pens at $2 each. How much does she pay?\nAnswer:")["input_ids"]
    full = greedy_responses(tiny_smol, [prompt], 40, stops)[0]
    full_text = text(full)
    stop = full_text[len(full_text) // 2:len(full_text) // 2 + 3]
    assert stop.strip() and full_text.find(stop) > 0
    rule = StopStrings(smol_tokenizer, (stop,))

    def expected(tokens):
        end = text(tokens).find(stop)
        if end < 0:
            return tokens
        n = max(n for n in range(len(tokens) + 1) if len(text(tokens[:n])) <= end)
        return tokens[:n]

    got = greedy_responses(tiny_smol, [prompt], 40, stops, rule)[0]
    assert got == expected(full) and len(got) < len(full) and stop not in text(got)
    assert text(full).startswith(text(got)) and stop in text(full)[:len(text(got)) + 40]
    sampled = sample_responses(tiny_smol, smol_tokenizer, [prompt], max_new_tokens=40, temperature=0.0,
                               stop_strings=rule)[0]
    assert sampled.token_ids == got and sampled.finish_reason == "stop"
    assert rule.cut(got) == (got, False)

    response = strip_stop(full, stops)
    plain = perturb_response(tiny_smol, smol_tokenizer, prompt, response, k=2, n_alternatives=2, max_new_tokens=40,
                             min_after=0)[1]
    longest = text(max((t["perturbed_token_ids"] for t in plain), key=len))
    stop = longest[len(longest) // 2:len(longest) // 2 + 3]  # this continuation at least must be cut
    rule = StopStrings(smol_tokenizer, (stop,))
    ruled = perturb_response(tiny_smol, smol_tokenizer, prompt, response, k=2, n_alternatives=2, max_new_tokens=40,
                             min_after=0, stop_strings=rule)[1]
    assert [t["forced_token_id"] for t in plain] == [t["forced_token_id"] for t in ruled]
    assert any(len(r["perturbed_token_ids"]) < len(p["perturbed_token_ids"]) for p, r in zip(plain, ruled))
    for p, r in zip(plain, ruled):
        assert r["perturbed_token_ids"] == expected(p["perturbed_token_ids"])
    with pytest.raises(UserError, match="empty"):
        StopStrings(smol_tokenizer, ("",))
    assert stop_strings_for("paper", smol_tokenizer).strings == PAPER_STOP_STRINGS
    assert not stop_strings_for("chat", smol_tokenizer)
