"""Shared fixtures: tiny randomly initialised causal LMs and a byte-level tokenizer, built in
code (no downloads), and the real SmolLM2 model (session-scoped, ``slow``).

The tiny models use a large ``initializer_range`` so their attention is far from uniform
(random init at the usual 0.02 gives near-uniform rows, where head distances tie and every
metric is flat).
"""
from __future__ import annotations

import math
import time
import os

# Triton kernels run under its interpreter in the tests (there is no GPU): the mode is fixed when
# triton is first imported, and test modules that import the trainer (TRL imports triton) are
# collected before tests/test_fused.py, so it is set here, before any of them.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    # One intra-op thread unless asked otherwise: the models here are tiny, and on a shared
    # machine two spinning OpenMP threads made SmolLM2 decoding 8x slower than one.
    torch.set_num_threads(int(os.environ.get("ATTNRHYTHM_TEST_THREADS", "1")))

TINY = dict(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=256, initializer_range=0.5, rms_norm_eps=1e-6, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def _build(config_class, model_class, seed: int, implementation: str = "sdpa", **overrides):
    torch.manual_seed(seed)
    config = config_class(**{**TINY, **overrides})
    config._attn_implementation = implementation
    return model_class(config).float().eval()


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM
    return _build(LlamaConfig, LlamaForCausalLM, seed, num_key_value_heads=4, **overrides)


def tiny_llama_gqa(seed: int = 1, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM
    return _build(LlamaConfig, LlamaForCausalLM, seed, num_attention_heads=8, num_key_value_heads=2,
                  hidden_size=32, head_dim=8, **overrides)


def tiny_qwen3(seed: int = 2, **overrides):
    # Qwen3 normalises q and k per head (q_norm / k_norm) before RoPE
    from transformers import Qwen3Config, Qwen3ForCausalLM
    return _build(Qwen3Config, Qwen3ForCausalLM, seed, num_key_value_heads=2, head_dim=8, **overrides)


def tiny_qwen3_sliding(seed: int = 3, window: int = 6):
    return tiny_qwen3(seed, use_sliding_window=True, sliding_window=window, max_window_layers=0)


def tiny_gemma2(seed: int = 4):
    """Gemma 2: logit softcapping in every layer (``softcap``), a sliding window on layer 0
    (eager: transformers has no SDPA path for softcapping)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM
    return _build(Gemma2Config, Gemma2ForCausalLM, seed, "eager", num_hidden_layers=2, num_key_value_heads=2, head_dim=8,
                  sliding_window=5, attn_logit_softcapping=2.0, final_logit_softcapping=None,
                  query_pre_attn_scalar=8)


def tiny_gpt_oss(seed: int = 5):
    """GPT-OSS: attention sinks (``s_aux``), set far from zero so that they matter; a sliding
    window on layer 0."""
    from transformers import GptOssConfig, GptOssForCausalLM
    model = _build(GptOssConfig, GptOssForCausalLM, seed, "eager", num_hidden_layers=2, num_key_value_heads=2, head_dim=8,
                   sliding_window=5, intermediate_size=32, num_local_experts=2, num_experts_per_tok=1)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0, 1.0)
    return model


def byte_tokenizer():
    """A byte-level BPE tokenizer without merges: 3 special tokens + 256 byte tokens (259)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


TINY_MODELS = {"llama": tiny_llama, "llama_gqa": tiny_llama_gqa, "qwen3": tiny_qwen3}


@pytest.fixture(scope="session")
def tiny_models():
    """{name: model} for every tiny architecture (built once)."""
    return {name: build() for name, build in TINY_MODELS.items()}


@pytest.fixture
def one_thread():
    # bitwise comparisons across two trainings: keep the CPU kernels' reduction order fixed
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct; skipped when it cannot be loaded."""
    from attnrhythm.models import load_model
    try:
        return load_model("smollm2-135m", device="cpu")
    except (FileNotFoundError, ImportError, OSError) as err:
        pytest.skip(f"SmolLM2 is not available: {err}")


# ---------------------------------------------------------------- float64 loop reference (docs/method.md)
class Reference:
    """docs/method.md sections 2-3 restated as plain float64 Python loops over full maps.

    ``A`` is a nested sequence [L][H][N][N] (numpy or lists) of one unpadded sequence; response
    rows are ``P .. N-1``.  Head indices are (layer slot, head)."""

    @staticmethod
    def head_distance(A, P):
        L, H, N = len(A), len(A[0]), len(A[0][0])
        return [[sum(sum(float(A[l][h][t][s]) * (t - s) for s in range(t + 1)) for t in range(P, N)) / (N - P)
                 for h in range(H)] for l in range(L)]

    @staticmethod
    def classify(d, fraction=0.3):
        L, H = len(d), len(d[0])
        order = sorted(((d[l][h], l, h) for l in range(L) for h in range(H)))
        count = max(1, math.floor(fraction * L * H))
        return sorted((l, h) for _, l, h in order[:count]), sorted((l, h) for _, l, h in order[-count:])

    @staticmethod
    def mean_map(A, heads):
        N = len(A[0][0])
        return [[sum(float(A[l][h][t][s]) for l, h in heads) / len(heads) for s in range(N)] for t in range(N)]

    @staticmethod
    def waad(M, P, W):
        N = len(M)
        return [sum(M[t][s] * min(t - s, W) for s in range(t + 1)) for t in range(P, N)]

    @staticmethod
    def delta(waad):
        return [abs(waad[t] - waad[t + 1]) for t in range(len(waad) - 1)] + [0.0] * bool(waad)

    @staticmethod
    def fai(M, P, horizon):
        lo, hi = horizon
        N = len(M)
        out = []
        for s in range(P, N):
            rows = [t for t in range(N) if s + lo <= t <= (N - 1 if hi is None else min(N - 1, s + hi))]
            out.append(sum(M[t][s] for t in rows) / len(rows) if rows else math.nan)
        return out

    @staticmethod
    def vertical_scores(Alh, P, gap=4):
        N = len(Alh)
        out = []
        for s in range(P, N):
            rows = [t for t in range(N) if t >= s + gap]
            out.append(sum(float(Alh[t][s]) for t in rows) / len(rows) if rows else math.nan)
        return out

    @staticmethod
    def kurtosis(values):
        """scipy.stats.kurtosis (Fisher, biased) of the non-NaN values; NaN when undefined."""
        import numpy as np
        from scipy.stats import kurtosis
        x = np.array([v for v in values if not math.isnan(v)], dtype=np.float64)
        if x.size < 2 or np.var(x) == 0:
            return math.nan
        return float(kurtosis(x))

    @classmethod
    def receiver_kurtosis(cls, A, P, gap=4):
        return [[cls.kurtosis(cls.vertical_scores(A[l][h], P, gap)) for h in range(len(A[0]))] for l in range(len(A))]

    @staticmethod
    def receivers(kurtoses, count):
        """Top ``count`` heads of the kurtosis averaged over responses (NaN omitted); ties by
        layer then head.  kurtoses: list over responses of [L][H]."""
        L, H = len(kurtoses[0]), len(kurtoses[0][0])
        means = []
        for l in range(L):
            for h in range(H):
                vals = [k[l][h] for k in kurtoses if not math.isnan(k[l][h])]
                means.append((-(sum(vals) / len(vals)) if vals else math.inf, l, h))
        return sorted((l, h) for _, l, h in sorted(means)[:count])

    @staticmethod
    def entropy(logits, temperature=1.0):
        """Entropy of softmax(logits / T) of one position, float64."""
        z = [float(v) / temperature for v in logits]
        m = max(z)
        e = [math.exp(v - m) for v in z]
        total = sum(e)
        return -sum(v / total * math.log(v / total) for v in e if v > 0)

    @classmethod
    def rhythm(cls, A, P, window=10, horizon=(1, None), fraction=0.3, receivers=None):
        """Every token-level series of one response as a dict of lists."""
        d = cls.head_distance(A, P)
        local, global_ = cls.classify(d, fraction)
        waad = cls.waad(cls.mean_map(A, local), P, window)
        out = dict(head_distance=d, local=local, global_=global_, waad=waad, delta=cls.delta(waad),
                   fai=cls.fai(cls.mean_map(A, global_), P, horizon))
        if receivers is not None:
            out["fai_receiver"] = cls.fai(cls.mean_map(A, receivers), P, horizon)
        return out


@pytest.fixture(scope="session")
def ref():
    return Reference


# ----------------------------------------------------------------------------- verifier inputs
MEGABYTE = "x" * 1_000_000
ADVERSARIAL = [
    "9" * 10000,
    "(" * 100000,
    ")" * 100000,
    "__import__('os').system('x')",
    "2**10**10",
    "2^10^10",
    "{" * 50000 + "}" * 10,
    MEGABYTE,
    "<answer>" * 100000,
    "</answer>" * 100000,
    "\\boxed{" * 100000,
]


def fast(fn, *args, limit: float = 2.0):
    """Call ``fn`` and assert it returns within ``limit`` seconds (a bound on pathological cost)."""
    start = time.perf_counter()
    result = fn(*args)
    assert time.perf_counter() - start < limit, f"{fn.__name__} took too long"
    return result
