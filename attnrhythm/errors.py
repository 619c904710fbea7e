"""What the user can fix, told in one line.

``UserError`` is raised for input the user controls: an unknown task, a typo'd config key, a
missing file, a bad flag value.  The command line prints its message on one line and exits 2.
Everything else (a bug, a failed kernel, a broken install) is left to raise, so its traceback
shows: a bug must never look like a user error.

``check_fields`` is the one check of a settings object (types, choices, bounds declared with
``io.option``) that the command line, YAML configs and Python callers all go through.
"""
from __future__ import annotations

import dataclasses
import difflib
import errno
import re
import types
import typing
from collections.abc import Sequence
from typing import Iterable


class UserError(ValueError):
    """Bad input the user can fix; the CLI prints ``attnrhythm COMMAND: error: MESSAGE`` and exits 2.

    A ValueError, so code that called the Python API and caught ValueError keeps working."""


class MissingInput(UserError, FileNotFoundError):
    """A file, folder or package the user named (or must install) is not there."""


class NotEnoughMemory(UserError, MemoryError):
    """A memory check refused a job up front (the message names the way out)."""


class UnusablePath(UserError, OSError):
    """A path the command must read or write cannot be used: read-only, a file where a folder is
    expected (or the reverse), not UTF-8, damaged.  The message names the path and the fix."""

    _FIXES = {errno.EACCES: ("permission denied", "choose a path you may use or change its permissions"),
              errno.EPERM: ("permission denied", "choose a path you may use or change its permissions"),
              errno.EROFS: ("on a read-only file system", "choose another path"),
              errno.ENOTDIR: ("a file stands where a folder is expected", "choose another path"),
              errno.EISDIR: ("a folder where a file is expected", "name a file"),
              errno.ENOSPC: ("no space left on the device", "free some space or choose another path"),
              errno.ENOENT: ("no such file or folder", "check the path")}

    @classmethod
    def of(cls, err: OSError, fix: str = "") -> "UnusablePath":
        """The one-line form of an operating-system error that names a path."""
        what, usual = cls._FIXES.get(err.errno, (err.strerror or type(err).__name__, ""))
        fix = fix or usual
        return cls(f"{err.filename}: {what}" + (f"; {fix}" if fix else ""))


def closest(name: str, known: Iterable[str]) -> str | None:
    """The known name most like ``name`` (difflib ratio >= 0.6), or None."""
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return match[0] if match else None


def unknown_name(kind: str, name: str, known: Iterable[str]) -> UserError:
    """``unknown {kind} 'nmae'; did you mean 'name'? known: ...`` as a UserError to raise."""
    known = list(known)
    guess = closest(str(name), known)
    hint = f"; did you mean {guess!r}?" if guess else ""
    return UserError(f"unknown {kind} {name!r}{hint} (known: {', '.join(map(str, known))})")


# ------------------------------------------------------------------ settings fields
def _fits(value, hint) -> bool:
    """Whether ``value`` is of the annotated type (bool is not an int, an int is a float)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any or isinstance(hint, (str, typing.TypeVar)):
        return True
    if hint is type(None) or hint is None:
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
        return not args or all(_fits(v, args[0]) for v in value)
    if isinstance(origin or hint, type):
        return isinstance(value, origin or hint)
    return True


def _type_name(hint) -> str:
    """What a value of the annotated type is, in words ('a whole number (or none)')."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (typing.Union, types.UnionType):
        named = " or ".join(_type_name(a) for a in args if a is not type(None))
        return named + (" (or none)" if type(None) in args else "")
    if origin in (list, tuple, Sequence):
        return "a list"
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", dict: "a mapping"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def check_fields(cls, values: dict | None = None) -> None:
    """Check every field of dataclass ``cls`` (or of the instance ``cls``) in ``values`` (default:
    the instance's) against its annotation, ``choices``, ``at_least``/``at_most``/``above`` and ``check``;
    the first bad one is a UserError naming the field, what it got and what it takes."""
    if values is None:
        values = {f.name: getattr(cls, f.name) for f in dataclasses.fields(cls)}
    cls = cls if isinstance(cls, type) else type(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value, meta = values[f.name], f.metadata
        if not _fits(value, hints[f.name]):
            raise UserError(f"{f.name} must be {_type_name(hints[f.name])}, got {value!r}")
        if value is None:
            continue
        if meta.get("choices") is not None and value not in meta["choices"]:
            raise UserError(f"{f.name} must be one of {', '.join(map(str, meta['choices']))}; got {value!r}")
        low, high, above = meta.get("at_least"), meta.get("at_most"), meta.get("above")
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = (f"in [{low}, {high}]" if low is not None and high is not None
                      else f"at least {low}" if low is not None else f"at most {high}")
            raise UserError(f"{f.name} must be {bounds}, got {value!r}")
        if above is not None and not value > above:
            raise UserError(f"{f.name} must be greater than {above}, got {value!r}")
        if meta.get("check"):
            meta["check"](f.name, value)


def check_device_name(name: str, value: str | None, auto: bool = False) -> None:
    """A device field: none (the command decides), 'cpu', 'cuda', 'cuda:N' or 'mps' (and 'auto'
    where ``auto``); what this machine has is not checked (a run may be checked elsewhere)."""
    known = "auto|cpu|mps|cuda(:\\d+)?" if auto else "cpu|mps|cuda(:\\d+)?"
    if value is not None and not re.fullmatch(known, value):
        raise UserError(f"{name} must be {'auto, ' if auto else ''}cpu, cuda, cuda:N or mps, got {value!r}")


def check_device(name: str, value: str | None) -> None:
    """``check_device_name``, and a CUDA device must be visible here (a command about to run)."""
    check_device_name(name, value)
    if value is not None and value.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"{name} {value}: no CUDA device is visible here; use cpu or leave it out")
