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
* Reading: a file that is not UTF-8 or not JSON is a ``UserError`` naming it.
* ``option``: a settings field (default, ``--help`` text, bounds ``errors.check_fields`` enforces).
* Outputs: ``OutputFolder``/``OutputFile``/``OutputFiles`` say what a command may write into and
  ``claim`` it: a new or empty folder or one its command wrote (``MARKER``), files it wrote;
  nothing it did not create is deleted, and a lock (``LOCK``, holding the pid) refuses a second
  process.  ``write_figure`` signs a figure so that its command recognises it later.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import math
import os
import tempfile
from io import BytesIO
from pathlib import Path

from attnrhythm.errors import UnusablePath, UserError


# ------------------------------------------------------------------ settings fields
def option(default, help: str | None = None, **meta):
    """A field of a settings dataclass: its default and what ``--help`` says about it (None: the
    field's docstring).  ``meta``: ``choices``, ``at_least``/``at_most``/``above`` (bounds that
    ``errors.check_fields`` enforces), ``check`` (a function ``(name, value)`` raising UserError, e.g.
    ``check_device``), ``positional``, ``shown_default``, ``cli=False``; see ``cli.add_settings``."""
    metadata = dict(meta) if help is None else dict(help=help, **meta)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


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


def write_figure(fig, path, signature: str) -> Path:
    """Save a matplotlib figure in the format of ``path``'s suffix, with ``signature`` in its
    metadata (how ``OutputFile`` recognises it), atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    image, kind = BytesIO(), Path(path).suffix[1:].lower() or "png"
    fig.savefig(image, dpi=120, format=kind, metadata={"Software" if kind == "png" else "Creator": signature})
    plt.close(fig)
    return write_bytes(path, image.getvalue())


def write_yaml(path, data: dict, header: str = "") -> Path:
    import yaml

    return write_text(path, header + yaml.safe_dump(json_ready(data), sort_keys=False))


def read_text(path) -> str:
    """A text file's content; a file that is not UTF-8 is a UserError naming it and the byte."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UnusablePath(f"{path}: not UTF-8 text (byte {err.start}: {data[err.start:err.start + 1]!r}); "
                           "save it as UTF-8") from None


def read_json(path):
    """A JSON file's content; a damaged file is a UserError naming it."""
    try:
        return json.loads(read_text(path))
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
    lines = read_text(path).splitlines(keepends=True)
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


# ------------------------------------------------------------------ outputs a command owns
MARKER = ".attnrhythm.json"
"""In each folder a command writes: ``{"commands": [the commands that wrote there]}``."""
LOCK = ".attnrhythm.lock"
"""Held (``flock``) while a command writes a folder; holds the writer's pid.  The kernel releases
it when the process ends in any way, so a lock left by a killed run is free again."""


def _ancestors_to_create(path: Path) -> list[Path]:
    """The folders ``path.mkdir(parents=True)`` would create, outermost last; a file in the way
    is a UserError."""
    missing = []
    for p in [path, *path.parents]:
        if p.is_dir():
            return missing
        if p.exists():
            raise UnusablePath(f"{p} is a file" + ("" if p == path else f", so {path} cannot be a folder")
                               + "; choose another --out")
        missing.append(p)
    return missing


@contextlib.contextmanager
def _folders(path: Path):
    """``path`` and its parents created for the claim, and removed again if they stay empty."""
    created = _ancestors_to_create(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UnusablePath.of(err, "choose another --out") from None
    try:
        yield
    finally:
        for folder in created:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()


@contextlib.contextmanager
def _locked(lock: Path, command: str, what: Path):
    """Hold ``lock`` (fcntl.flock) while writing ``what``, or refuse with the holder's pid."""
    import fcntl

    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UnusablePath.of(err, "choose a folder you can write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode("utf-8", "replace").split()
            os.close(fd)
            who = f"attnrhythm {holder[1]} (pid {holder[0]})" if len(holder) > 1 else "another process"
            raise UserError(f"{what} is being written by {who}; wait for it to end or stop it, or choose "
                            "another --out") from None
        try:  # the holder before us may have removed the file: lock the one that is there now
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {command}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


def written_by(folder) -> list[str]:
    """The commands the folder's marker names ([] without a marker)."""
    marker = Path(folder) / MARKER
    if not marker.exists():
        return []
    data = read_json(marker)
    if not isinstance(data, dict) or not isinstance(data.get("commands"), list):
        raise UnusablePath(f"{marker} is damaged (expected {{\"commands\": [...]}}); fix or remove it")
    return [str(c) for c in data["commands"]]


def mark(folder, command: str) -> None:
    """Add ``command`` to the commands the folder's marker names."""
    writers = written_by(folder)
    if command not in writers:
        write_json(Path(folder) / MARKER, {"commands": writers + [command]})


def _recognised(path: Path, signatures: tuple[bytes, ...], scan: int = 1 << 16) -> bool:
    """Whether the first or last 64 KiB of the file hold one of ``signatures``."""
    with path.open("rb") as f:
        head = f.read(scan)
        f.seek(max(scan, path.stat().st_size - scan))
        return any(sig in head + f.read() for sig in signatures)


@dataclasses.dataclass(frozen=True)
class OutputFolder:
    """A command that writes a folder: into a new or empty one, or one whose ``MARKER`` names
    ``command`` or a command in ``shares`` (commands that share folders, as reproduce does with
    analyze and perturb); ``legacy``: names (glob patterns) of what marks a folder this command
    wrote before markers existed."""

    command: str
    shares: tuple[str, ...] = ()
    legacy: tuple[str, ...] = ()

    def check(self, path) -> None:
        """Refuse (UserError, nothing changed) a folder this command may not write into."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise UnusablePath(f"{path} is a file; `attnrhythm {self.command}` writes a folder: name a new or "
                               "empty one with --out")
        _ancestors_to_create(path)
        if not path.is_dir():
            return
        writers = written_by(path)
        if writers:
            if not {self.command, *self.shares} & set(writers):
                raise UserError(f"{path} holds the output of `attnrhythm {writers[0]}`; `attnrhythm {self.command}` "
                                "writes only into a new or empty folder or its own: choose another --out")
            return
        held = sorted(set(os.listdir(path)) - {LOCK})
        if held and not any(fnmatch.fnmatch(name, pattern) for name in held for pattern in self.legacy):
            shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
            raise UserError(f"{path} is not empty ({shown}) and was not written by `attnrhythm {self.command}`; "
                            "it writes only into a new or empty folder or its own: choose another --out")

    @contextlib.contextmanager
    def claim(self, path):
        """Check, create, lock and mark ``path`` for the command's run; on the way out a folder
        that got nothing but the marker is removed again (when this claim created it)."""
        path = Path(path)
        self.check(path)
        with _folders(path), _locked(path / LOCK, self.command, path):
            self.check(path)  # again under the lock: another process may have written meanwhile
            writers = written_by(path)
            mark(path, self.command)
            try:
                yield path
            finally:
                if not writers and not folder_entries(path):
                    (path / MARKER).unlink(missing_ok=True)


@dataclasses.dataclass(frozen=True)
class OutputFile:
    """A command that writes one file: a new one, or one it wrote before (recognised by one of
    ``signatures`` in its first or last 64 KiB), with one of ``suffixes``."""

    command: str
    signatures: tuple[bytes, ...]
    suffixes: tuple[str, ...] = ()

    def check(self, path) -> None:
        path = Path(path)
        if self.suffixes and path.suffix.lower() not in self.suffixes:
            raise UserError(f"{path}: `attnrhythm {self.command}` writes {' or '.join(self.suffixes)} files; "
                            "give --out one of those endings")
        if path.is_dir():
            raise UnusablePath(f"{path} is a folder; --out names the file to write, e.g. "
                               f"{path / ('out' + (self.suffixes or ('',))[0])}")
        _ancestors_to_create(path.parent)
        if path.exists() and not _recognised(path, self.signatures):
            raise UserError(f"{path} exists and was not written by `attnrhythm {self.command}`; nothing was "
                            "changed: move it away or choose another --out")

    @contextlib.contextmanager
    def claim(self, path):
        path = Path(path)
        self.check(path)
        with _folders(path.parent), _locked(path.with_name(f".{path.name}.lock"), self.command, path):
            yield path


@dataclasses.dataclass(frozen=True)
class OutputFiles:
    """A command that writes named files into a folder it shares with others (``files``: name ->
    the signatures of that file, as ``OutputFile``)."""

    command: str
    files: dict

    def _each(self, path):
        return [(Path(path) / name, OutputFile(self.command, sigs)) for name, sigs in self.files.items()]

    def check(self, path) -> None:
        _ancestors_to_create(Path(path))  # a file where the folder goes is refused
        for file, spec in self._each(path):
            spec.check(file)

    @contextlib.contextmanager
    def claim(self, path):
        with contextlib.ExitStack() as stack:
            for file, spec in self._each(path):
                stack.enter_context(spec.claim(file))
            yield Path(path)


def folder_entries(path) -> list[str]:
    """What a folder holds besides the marker and the lock ([] when it does not exist)."""
    path = Path(path)
    return sorted(set(os.listdir(path)) - {MARKER, LOCK}) if path.is_dir() else []
