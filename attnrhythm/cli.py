"""The `attnrhythm` command line (the only argparse of the package).

Every command is a settings dataclass plus a function taking it (``run_analysis_command(
AnalyzeSettings(...))``, ``run_perturbation(PerturbSettings(...))``, ...), so the command line
and Python run the same code.  ``add_settings`` turns a dataclass into flags (help from the
field's ``metadata["help"]``, every default shown) and ``settings_from_args`` builds it back.

Errors: a ``UserError`` (bad input the user can fix) is printed as one line and exits 2;
anything else is a bug and raises with its traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import shlex
import sys
import types
import typing

from attnrhythm import log
from attnrhythm.errors import UserError

# name -> (module, what it does, in a user's words); the module holds SETTINGS and command()
COMMANDS = {
    "analyze": ("attnrhythm.studies.analyze",
                "Sample responses to math problems and measure each one's attention rhythm (WAAD, FAI, "
                "receiver heads); write the paper's coupling table, figures and an HTML report."),
    "perturb": ("attnrhythm.studies.perturb",
                "Force other tokens at the highest- and lowest-FAI positions of greedy responses and measure "
                "how much the rest of the response changes (the paper's Table 1)."),
    "reproduce": ("attnrhythm.studies.reproduce",
                  "Check every analysis claim of the paper on one model and data set: runs analyze and perturb "
                  "(reusing what the folder holds) and the layer-range comparison; writes REPRODUCTION.md."),
    "train": ("attnrhythm.train.run",
              "Train a model with GRPO on a task (Countdown, GSM8K, ...), scaling each token's advantage by "
              "attention-derived credit; resumable."),
    "eval": ("attnrhythm.train.evaluate",
             "Score a model, or the latest checkpoint of a training run, on a task's test problems "
             "(pass@1, avg@k, pass@k)."),
    "plot": ("attnrhythm.train.plot", "Draw the training and evaluation curves of several runs in one figure "
             "(--rhythm: how the attention rhythm drifts over training)."),
    "compare": ("attnrhythm.train.compare",
                "Compare trained runs with their starting model on the same test problems: pass@1 before and "
                "after, the gain with a paired 95% bootstrap interval (results.json, results.md)."),
    "credit-view": ("attnrhythm.train.rhythm_views",
                    "Show sampled training rollouts as HTML, every token coloured by its credit (gamma) and "
                    "labelled by its set (preplan, anchor, dominated anchor, intro)."),
    "sft": ("attnrhythm.train.sft",
            "Supervised warm start: teach a model the Countdown answer format from solver-written solutions "
            "before GRPO."),
}


def _base_type(annotation):
    """(type, optional) of a field annotation such as ``int``, ``str | None``, ``list[str]``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = type(None) in typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return _base_type(args[0])[0], optional
    return annotation, optional


def add_settings(parser: argparse.ArgumentParser, cls) -> None:
    """A flag per field of dataclass ``cls`` (``metadata``: ``help``, ``choices``, ``positional``,
    ``cli=False`` to leave a field out, ``shown_default`` for the default the help names when the
    field's own default is None because another source decides, as train's YAML does)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if meta.get("cli") is False:
            continue
        kind, _ = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = meta.get("shown_default", default)
        shown = "none" if shown is None else (" ".join(map(str, shown)) if isinstance(shown, list) else shown)
        text = f"{meta.get('help', '')} (default: {shown})".replace("%", "%%")
        if meta.get("positional"):
            parser.add_argument(f.name, nargs="+", metavar=meta.get("metavar", f.name.upper()), help=meta.get("help"))
            continue
        flag = "--" + f.name.replace("_", "-")
        common = dict(dest=f.name, help=text, default=default)
        if kind is bool and default is True:  # --x / --no-x
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif kind is bool:
            parser.add_argument(flag, action="store_const", const=True, **common)
        elif typing.get_origin(kind) is list:
            parser.add_argument(flag, nargs="+", type=typing.get_args(kind)[0], **common)
        else:
            parser.add_argument(flag, type=kind, choices=meta.get("choices"), **common)


def settings_from_args(cls, args: argparse.Namespace, **extra):
    """The dataclass ``cls`` from parsed flags (fields the parser does not know keep defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    return cls(**given, **extra)


def command_line(command: str, settings) -> str:
    """The full command that reruns ``settings`` (every option spelled out)."""
    parts = ["attnrhythm", command]
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if f.metadata.get("cli") is False or value is None:
            continue
        if f.metadata.get("positional"):
            parts += [str(v) for v in value]
        elif isinstance(value, bool):
            if value != f.default:  # only what differs: a store flag when True, --no-x when False
                parts += ["--" + ("" if value else "no-") + f.name.replace("_", "-")]
        else:
            parts += ["--" + f.name.replace("_", "-")] + ([str(v) for v in value] if isinstance(value, list)
                                                           else [str(value)])
    return shlex.join(parts)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnrhythm", description="The preplan-and-anchor rhythm of LLM reasoning: measure it in any "
        "Hugging Face causal LM, reproduce the paper's analyses, and train with attention-derived credit.",
        epilog="`attnrhythm COMMAND --help` lists every option of a command with its default.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, description) in COMMANDS.items():
        p = sub.add_parser(name, help=description.replace("%", "%%"), description=description)  # help is %-formatted
        if name == wanted:  # import only the module that will run
            add_settings(p, importlib.import_module(module).SETTINGS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    log.setup()
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    logger = log.get_logger("cli")
    try:
        settings = settings_from_args(module.SETTINGS, args)
        return int(module.command(settings, command_line(args.command, settings)) or 0)
    except UserError as err:
        logger.error(f"attnrhythm {args.command}: error: {err}")
        return 2
    except KeyboardInterrupt:
        logger.error("interrupted; what was written so far is kept (use --resume to continue)")
        return 130


if __name__ == "__main__":
    sys.exit(main())
