"""Text for distillation, cut into fixed-length token blocks.

The default corpus is the Python Language Reference and library topics that every CPython
installation carries as ``pydoc_data.topics`` (about 460 KB of English technical prose):
real text, offline, on any machine that runs this code. Users pass their own with
``--corpus FILE`` (plain text, or JSONL with a ``"text"`` field per row).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

DEFAULT_CORPUS = "python-docs"


def default_corpus_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def read_corpus(source: str | Path = DEFAULT_CORPUS) -> str:
    if str(source) == DEFAULT_CORPUS:
        return default_corpus_text()
    path = Path(source)
    if path.suffix == ".jsonl":
        texts = []
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as error:
                    raise ValueError(
                        f"{path}:{number}: expected a JSON object with a 'text' string ({error})"
                    ) from None
        return "\n\n".join(texts)
    return path.read_text(encoding="utf-8")


def token_blocks(
    tokenizer, text: str, seq_len: int, heldout_fraction: float = 0.05, max_heldout: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise ``text`` and cut it into (N, seq_len) training and held-out blocks.

    The held-out blocks come from the end of the text, so no held-out token is trained on.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n_blocks = len(ids) // seq_len
    if n_blocks < 2:
        raise ValueError(f"corpus of {len(ids)} tokens is too short for blocks of {seq_len}")
    blocks = torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)
    n_heldout = min(max_heldout, max(1, round(n_blocks * heldout_fraction)))
    return blocks[:-n_heldout], blocks[-n_heldout:]
