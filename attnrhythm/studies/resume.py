"""The one resume protocol of the studies (analyze, perturb, reproduce).

A study folder records the settings that define its work (analyze: ``run.json``; perturb: the
first line of ``perturbations.jsonl``).  A command that finds such a record:

* continues the work when asked to (``resume``) and the defining settings match;
* refuses when they differ, naming each one (saved -> now), since mixing two studies in one
  folder would give numbers that belong to neither;
* refuses when not asked to resume, saying how to (``--resume``, or ``--overwrite`` where the
  command can replace its own outputs).

``reproduce`` always resumes: it exists to reuse what is there.
"""
from __future__ import annotations

from attnrhythm.errors import UserError


def differences(saved: dict, now: dict, keys) -> dict:
    """{key: (saved value, current value)} for each of ``keys`` whose values differ."""
    return {k: (saved.get(k), now.get(k)) for k in keys if saved.get(k) != now.get(k)}


def check_resume(what: str, out, saved: dict | None, now: dict, keys, *, resume: bool,
                 can_overwrite: bool = False) -> bool:
    """Whether the work recorded in ``out`` continues (True) or none is there (False).

    Args:
        what: what the folder holds, for the messages (e.g. "an analysis").
        saved: the recorded settings, None when the folder holds no such work.
        now: this command's settings; keys: those that must match.
        resume: the command was asked to continue; can_overwrite: it offers ``--overwrite``.
    Raises:
        UserError: the work is there and ``resume`` is False, or the settings differ.
    """
    if saved is None:
        return False
    if not resume:
        raise UserError(f"{out} already holds {what}; pass --resume to continue it"
                        + (" or --overwrite to replace it" if can_overwrite else " or choose another --out"))
    changed = differences(saved, now, keys)
    if changed:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise UserError(f"cannot resume {what} in {out}: it was made with other settings (saved -> now: {listed}); "
                        f"use another --out" + (" or --overwrite" if can_overwrite else " or the saved values"))
    return True
