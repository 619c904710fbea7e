"""The `attnrhythm` command line (the only argparse of the package).

Every command is a settings dataclass plus a function taking it (``run_analysis_command(
AnalyzeSettings(...))``, ``run_perturbation(PerturbSettings(...))``, ...), so the command line
and Python run the same code.  ``add_settings`` turns a dataclass into flags (help from the
field's ``metadata["help"]`` or its docstring, every default shown) and ``settings_from_args``
builds it back; ``errors.check_fields`` then checks every field against its type and bounds.

Outputs: each command names what it writes (``COMMANDS``: an ``io.OutputFolder``, ``OutputFile``
or ``OutputFiles`` for its ``--out``), and ``main`` holds that output while the command runs
(``io``: new, empty or its own; locked; nothing deleted that it did not create).  A dry run only
checks it.

Errors: a ``UserError`` (bad input the user can fix), an argument argparse refuses and an
operating-system error that names a path are printed as one line and exit 2; anything else is a
bug and raises with its traceback.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import functools
import importlib
import inspect
import shlex
import sys
import textwrap
import types
import typing
from typing import NamedTuple

from attnrhythm import io, log
from attnrhythm.errors import UnusablePath, UserError, check_fields

_STUDY = ("analyze", "perturb", "reproduce")  # they share folders: reproduce runs the other two


class Command(NamedTuple):
    module: str
    """Holds SETTINGS and command()."""
    description: str
    """What it does, in a user's words."""
    output: object
    """What its --out names (io.OutputFolder, OutputFile or OutputFiles)."""


COMMANDS = {
    "analyze": Command("attnrhythm.studies.analyze",
                       "Sample responses to math problems and measure each one's attention rhythm (WAAD, FAI, "
                       "receiver heads); write the paper's coupling table, figures and an HTML report.",
                       io.OutputFolder("analyze", _STUDY, legacy=("run.json",))),
    "perturb": Command("attnrhythm.studies.perturb",
                       "Force other tokens at the highest- and lowest-FAI positions of greedy responses and measure "
                       "how much the rest of the response changes (the paper's Table 1).",
                       io.OutputFolder("perturb", _STUDY, legacy=("perturbations.jsonl",))),
    "reproduce": Command("attnrhythm.studies.reproduce",
                         "Check every analysis claim of the paper on one model and data set: runs analyze and "
                         "perturb (reusing what the folder holds) and the layer-range comparison; writes "
                         "REPRODUCTION.md.",
                         io.OutputFolder("reproduce", _STUDY, legacy=("run.json", "perturbations.jsonl"))),
    "train": Command("attnrhythm.train.run",
                     "Train a model with GRPO on a task (Countdown, GSM8K, ...), scaling each token's advantage by "
                     "attention-derived credit; resumable.",
                     io.OutputFolder("train", legacy=("config.yaml", "checkpoint-*"))),
    "eval": Command("attnrhythm.train.evaluate",
                    "Score a model, or the latest checkpoint of a training run, on a task's test problems "
                    "(pass@1, avg@k, pass@k).",
                    io.OutputFile("eval", (b'"model_path"',), (".json",))),
    "plot": Command("attnrhythm.train.plot",
                    "Draw the training and evaluation curves of several runs in one figure "
                    "(--rhythm: how the attention rhythm drifts over training).",
                    io.OutputFile("plot", (b"attnrhythm plot", b"Matplotlib", b"matplotlib"), (".png", ".pdf", ".svg"))),
    "compare": Command("attnrhythm.train.compare",
                       "Compare trained runs with their starting model and, seed by seed, with plain GRPO on the same "
                       "test problems: intervals over seeds and problems, Holm-corrected p (results.json, "
                       "summary.json, results.md).",
                       io.OutputFiles("compare", {"results.json": (b'"pass1_start"',),
                                                  "summary.json": (b'"seeds_above_start"',),
                                                  "results.md": (b"pass@1 is greedy",)})),
    "credit-gradients": Command("attnrhythm.train.credit_gradients",
                                "Why credits differ: on the same rollout batches, each credit's policy gradient "
                                "against plain GRPO's (cosine), the tokens it reweights and the advantage mass it "
                                "moves.",
                                io.OutputFiles("credit-gradients", {"credit_gradients.json": (b'"per_batch"',),
                                                                    "credit_gradients.md": (b"gradient cosine",)})),
    "credit-view": Command("attnrhythm.train.rhythm_views",
                           "Show sampled training rollouts as HTML, every token coloured by its credit (gamma) and "
                           "labelled by its set (preplan, anchor, dominated anchor, intro).",
                           io.OutputFile("credit-view", (b"<title>credit view</title>",), (".html", ".htm"))),
    "sft": Command("attnrhythm.train.sft",
                   "Supervised warm start: teach a model the Countdown answer format from solver-written solutions "
                   "before GRPO.",
                   io.OutputFolder("sft", legacy=("warm_start.json",))),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """A refused argument: one line (usage is one --help away), exit 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _base_type(annotation):
    """(type, optional) of a field annotation such as ``int``, ``str | None``, ``list[str]``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = type(None) in typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return _base_type(args[0])[0], optional
    return annotation, optional


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of dataclass ``cls`` and its bases, on one line."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _shown(value) -> str:
    return "none" if value is None else " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _add_flag(parser, flag: str, dest: str, kind, meta: dict, help_text: str, default, shown) -> None:
    """One flag; ``kind`` its type (a Literal gives the choices; a bool gives --x/--no-x unless its
    default is False), ``shown`` the default its help names."""
    common = dict(dest=dest, default=default, help=f"{help_text} (default: {_shown(shown)})".replace("%", "%%"))
    metavar = flag[2:].replace("-", "_").upper()
    choices = meta.get("choices")
    if typing.get_origin(kind) is typing.Literal:
        kind, choices = type(typing.get_args(kind)[0]), typing.get_args(kind)
    if kind is bool and default is not False:  # --x / --no-x
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
    elif kind is bool:
        parser.add_argument(flag, action="store_const", const=True, **common)
    elif typing.get_origin(kind) is list:
        parser.add_argument(flag, nargs="+", type=typing.get_args(kind)[0], metavar=metavar, **common)
    else:
        parser.add_argument(flag, type=kind, choices=choices, metavar=None if choices else metavar, **common)


def _add_given_flags(parser, field: dataclasses.Field) -> None:
    """A flag for each field of ``metadata["flags_of"]`` (for a nested dataclass field, one for each
    of its fields that the field's ``metadata["flags"]`` names); only the flags given reach the
    dict ``field`` (dest ``FIELD.NAME``), and the help shows the value in ``metadata["shown"]()``
    (what a bare command uses)."""
    cls, shown = field.metadata["flags_of"], field.metadata["shown"]()
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        if f.metadata.get("flags"):
            owner = typing.get_type_hints(cls)[f.name]
            named = {g.name: g for g in dataclasses.fields(owner)}
            flags = [(owner, named[n], getattr(getattr(shown, f.name), n)) for n in f.metadata["flags"]]
        else:
            flags = [(cls, f, getattr(shown, f.name))]
        for owner, g, value in flags:
            _add_flag(parser, "--" + g.name.replace("_", "-"), f"{field.name}.{g.name}",
                      _base_type(typing.get_type_hints(owner)[g.name])[0], g.metadata,
                      g.metadata.get("help") or field_docs(owner).get(g.name, ""), argparse.SUPPRESS, value)


def add_settings(parser: argparse.ArgumentParser, cls) -> None:
    """A flag per field of dataclass ``cls`` (``metadata``: ``help`` (else the field's docstring),
    ``choices``, ``positional``, ``cli=False`` to leave a field out, ``shown_default`` for the
    default the help names, ``flags_of`` for a dict of another dataclass's fields given as flags)."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if meta.get("cli") is False:
            continue
        if meta.get("flags_of"):
            _add_given_flags(parser, f)
            continue
        help_text = meta.get("help") or docs.get(f.name, "")
        if meta.get("positional"):
            parser.add_argument(f.name, nargs="+", metavar=meta.get("metavar", f.name.upper()), help=help_text)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        _add_flag(parser, "--" + f.name.replace("_", "-"), f.name, _base_type(hints[f.name])[0], meta, help_text,
                  default, meta.get("shown_default", default))


def settings_from_args(cls, args: argparse.Namespace, **extra):
    """The dataclass ``cls`` from parsed flags (fields the parser does not know keep defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    for f in dataclasses.fields(cls):
        if f.metadata.get("flags_of"):
            given[f.name] = {k.split(".", 1)[1]: v for k, v in vars(args).items() if k.startswith(f.name + ".")}
    return cls(**given, **extra)


def command_line(command: str, settings) -> str:
    """The full command that reruns ``settings`` (every option spelled out)."""
    parts = ["attnrhythm", command]

    def flag(name, value, default):
        if isinstance(value, bool):
            if value != default:  # only what differs: a store flag when True, --no-x when False
                parts.append("--" + ("" if value else "no-") + name.replace("_", "-"))
        elif value is not None:
            parts.extend(["--" + name.replace("_", "-")] + ([str(v) for v in value] if isinstance(value, list)
                                                             else [str(value)]))

    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if f.metadata.get("cli") is False or value is None:
            continue
        if f.metadata.get("positional"):
            parts += [str(v) for v in value]
        elif f.metadata.get("flags_of"):
            for name, given in value.items():
                flag(name, given, None)
        else:
            flag(f.name, value, f.default)
    return shlex.join(parts)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="attnrhythm", description="The preplan-and-anchor rhythm of LLM reasoning: measure it in any "
        "Hugging Face causal LM, reproduce the paper's analyses, and train with attention-derived credit.",
        epilog="`attnrhythm COMMAND --help` lists every option of a command with its default.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, spec in COMMANDS.items():
        p = sub.add_parser(name, help=spec.description.replace("%", "%%"), description=spec.description)
        if name == wanted:  # import only the module that will run
            add_settings(p, importlib.import_module(spec.module).SETTINGS)
    return parser


def _holding(spec: Command, settings):
    """The command's output, held while it runs (checked only, for a dry run; nothing when it
    writes nothing, or in a process other than rank 0 of a launch)."""
    out = getattr(settings, "out", None)
    if out is None or not log.is_main_process():
        return contextlib.nullcontext()
    if getattr(settings, "dry_run", False):
        spec.output.check(out)
        return contextlib.nullcontext()
    return spec.output.claim(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    log.setup()
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    spec = COMMANDS[args.command]
    module = importlib.import_module(spec.module)
    logger = log.get_logger("cli")
    try:
        settings = settings_from_args(module.SETTINGS, args)
        check_fields(settings)
        with _holding(spec, settings):
            return int(module.command(settings, command_line(args.command, settings)) or 0)
    except UserError as err:
        logger.error(f"attnrhythm {args.command}: error: {err}")
        return 2
    except OSError as err:
        if err.filename is None:
            raise  # not about a path the user gave: a bug or a broken install, shown in full
        logger.error(f"attnrhythm {args.command}: error: {UnusablePath.of(err)}")
        return 2
    except KeyboardInterrupt:
        logger.error("interrupted; what was written so far is kept (use --resume to continue)")
        return 130


if __name__ == "__main__":
    sys.exit(main())
