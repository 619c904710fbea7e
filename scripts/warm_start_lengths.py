"""Token lengths of a Countdown variant's warm-start completions: exactly what `attnrhythm sft`
trains on (``train.sft.sft_examples``: the completion after the prompt's ``<think>``, eos
included), on the embedded SmolLM2-135M tokenizer, for train instances of seed 1234 (sft's).

    python scripts/warm_start_lengths.py countdown-worked 500

Prints min / 5th percentile / median / 95th percentile / max; pick ``max_completion_length``
from the maximum (examples/recipes/worked-r1.yaml).
"""
from __future__ import annotations

import statistics
import sys


def lengths(task: str, n: int) -> list[int]:
    from transformers import AutoTokenizer

    from attnrhythm.models import embedded_model_dir
    from attnrhythm.tasks import get_task
    from attnrhythm.train.sft import sft_examples

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir("smollm2-135m"))
    rows = get_task(task).load("train", n, 1234)
    return [len(completion) for _, completion in sft_examples(rows, tokenizer, task)]


def main(args: list[str]) -> int:
    if len(args) != 2 or not args[1].isdigit():
        print(__doc__.strip().splitlines()[4].strip())
        return 2
    found = lengths(args[0], int(args[1]))
    q = statistics.quantiles(found, n=20)
    print(f"{args[0]}: {len(found)} completions, tokens with eos: min {min(found)}, p5 {q[0]:.0f}, "
          f"median {statistics.median(found):.0f}, p95 {q[-1]:.0f}, max {max(found)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
