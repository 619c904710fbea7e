"""Every file the package writes or reads back goes through here.

* JSONL: ``append_jsonl`` writes whole lines in one write, flushed and fsynced, so a killed run
  leaves complete records and at most one cut line at the end.  ``read_jsonl`` has the one policy
  for a line that is not JSON: a cut LAST line (an interrupted run) is skipped, and removed with
  ``repair=True`` so appending can continue; a bad line anywhere else means the file is damaged,
  and it is refused (``UserError`` naming file and line).
* NaN <-> null: ``json_ready`` turns NaN/inf (and numpy/torch scalars) into JSON values,
  ``float_list`` writes a float series with NaN as null, ``float_series`` reads it back.
* Atomic writes (``write_bytes``/``write_text``/``write_json``/``write_yaml``): a temporary file in
  the same folder, then ``os.replace``; a reader never sees half a file.
* ``option``: a settings field with the help the command line shows for it.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from attnrhythm.errors import UserError


# ------------------------------------------------------------------ settings fields
def option(default, help: str, **meta):
    """A field of a command's settings dataclass: its default and what ``--help`` says about it
    (``meta``: ``choices``, ``positional``, ``shown_default``, ``cli=False``; see ``cli.add_settings``)."""
    from dataclasses import field

    metadata = dict(help=help, **meta)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# ------------------------------------------------------------------ NaN <-> null
def json_ready(x):
    """A copy of ``x`` that strict JSON can hold: NaN/inf -> None, tuples -> lists, numpy and
    0-d torch values -> Python numbers, dict keys -> str."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    if type(x).__module__.split(".")[0] in ("numpy", "torch") and getattr(x, "shape", None) == ():
        return json_ready(x.item())  # a numpy scalar or a 0-d tensor
    if type(x).__module__ == "numpy" or type(x).__name__ == "Tensor":
        return json_ready(x.tolist())
    return x


def float_list(values) -> list:
    """A float series (tensor, array or list) as a JSON-ready list: NaN -> None; 9 significant
    digits, which round-trip float32."""
    import torch

    return [None if not math.isfinite(v) else float(f"{v:.9g}") for v in torch.as_tensor(values).double().tolist()]


def float_series(values, dtype=None):
    """A JSON list with nulls back as a float64 tensor with NaN."""
    import torch

    return torch.tensor([math.nan if v is None else v for v in values], dtype=dtype or torch.float64)


def to_json(obj) -> str:
    """Pretty strict JSON (NaN/inf written as null), ending in a newline."""
    return json.dumps(json_ready(obj), indent=2, allow_nan=False) + "\n"


def json_line(record) -> str:
    """One JSONL line of ``record`` (NaN/inf as null; non-ASCII text kept as it is)."""
    return json.dumps(json_ready(record), ensure_ascii=False, allow_nan=False) + "\n"


# ------------------------------------------------------------------ atomic writes
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path, obj) -> Path:
    return write_text(path, to_json(obj))


def write_yaml(path, data: dict, header: str = "") -> Path:
    import yaml

    return write_text(path, header + yaml.safe_dump(json_ready(data), sort_keys=False))


def read_json(path):
    """A JSON file's content; a damaged file is a UserError naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg}); the file is damaged") from None


# ------------------------------------------------------------------ JSONL
def append_jsonl(path, records: list) -> None:
    """Append ``records`` as lines in one write, flushed and fsynced (see the module docstring)."""
    with Path(path).open("a", encoding="utf-8") as f:
        f.write("".join(json_line(r) for r in records))
        f.flush()
        os.fsync(f.fileno())


def write_jsonl(path, records: list) -> Path:
    """Replace ``path`` atomically with ``records``, one line each."""
    return write_text(path, "".join(json_line(r) for r in records))


def numbered_jsonl(path, interrupted_tail: bool = True, repair: bool = False) -> list[tuple[int, object]]:
    """(line number, record) of each non-blank line of a JSONL file ([] when it does not exist).

    The one policy for a line that is not JSON: before the last line the file is damaged and is
    refused (``UserError`` naming file and line).  The last line is what a killed run of ours
    leaves cut: with ``interrupted_tail`` (files this package appends to) it is dropped, and with
    ``repair`` removed from the file so appending can continue; a file the user wrote
    (``interrupted_tail=False``) was not cut by a run, so its last line is refused like any other.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            if number < len(lines) or not interrupted_tail:
                raise UserError(f"{path}:{number}: not valid JSON ({err.msg})"
                                + ("; the file is damaged" if interrupted_tail else "")) from None
            if repair:
                write_text(path, "".join(lines[:-1]))
    return records


def read_jsonl(path, repair: bool = False) -> list:
    """The records of a JSONL file this package appends to (``numbered_jsonl``'s policy)."""
    return [record for _, record in numbered_jsonl(path, repair=repair)]
