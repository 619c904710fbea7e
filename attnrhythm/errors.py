"""What the user can fix, told in one line.

``UserError`` is raised for input the user controls: an unknown task, a typo'd config key, a
missing file, a bad flag value.  The command line prints its message on one line and exits 2.
Everything else (a bug, a failed kernel, a broken install) is left to raise, so its traceback
shows: a bug must never look like a user error.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class UserError(ValueError):
    """Bad input the user can fix; the CLI prints ``attnrhythm COMMAND: error: MESSAGE`` and exits 2.

    A ValueError, so code that called the Python API and caught ValueError keeps working."""


class MissingInput(UserError, FileNotFoundError):
    """A file, folder or package the user named (or must install) is not there."""


class NotEnoughMemory(UserError, MemoryError):
    """A memory check refused a job up front (the message names the way out)."""


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

