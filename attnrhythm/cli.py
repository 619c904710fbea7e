"""`attnrhythm` command line: one sub-command per module, imported only when used.

Each command module exposes ``configure_parser(parser)`` and ``run(args) -> int | None``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "analyze": ("attnrhythm.studies.analyze", "generate responses, capture attention, write metrics, couplings, figures and a report"),
    "perturb": ("attnrhythm.studies.perturb", "the perturbation study (paper Table 1)"),
    "reproduce": ("attnrhythm.studies.reproduce", "every analysis table of the paper on one model and data set"),
    "train": ("attnrhythm.train.run", "GRPO with rhythm credit on TRL"),
    "eval": ("attnrhythm.train.evaluate", "pass@1 and avg@k of a model on a task"),
    "plot": ("attnrhythm.train.plot", "training and evaluation curves of several runs"),
}


def add_problem_arguments(p: argparse.ArgumentParser, n: int = 70) -> None:
    """--model, --data, --n, --seed: shared by analyze, perturb and reproduce, so that one output
    folder means the same problems to all three."""
    p.add_argument("--model", default="smollm2-135m", help="embedded name, local folder or hub id (default %(default)s)")
    p.add_argument("--data", default="gsm8k", help="gsm8k, champ, a .jsonl file or a hub dataset id (default %(default)s)")
    p.add_argument("--n", type=int, default=n, help="problems, sampled with --seed (paper: 70; default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="problem sample, sampling and bootstrap seed")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnrhythm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # import only the module that will run
            importlib.import_module(module).configure_parser(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; what was written so far is kept (use --resume to continue)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
