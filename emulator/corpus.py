"""Text for distillation, cut into fixed-length token blocks.

The default corpus is the Python Language Reference and library topics that every CPython
installation carries as ``pydoc_data.topics`` (about 460 KB of English technical prose):
real text, offline, on any machine that runs this code. Users pass their own with
``--corpus FILE`` (plain text, or JSONL with a ``"text"`` field per row).

``model-samples`` is more general text than the Python docs with no download: the full model's
own answers to everyday requests over many topics (sampled, temperature 1). Distilling on the
teacher's own text is data-free distillation; the text is what the model says, not what it was
trained on, and no task's rows are in it. It is sampled once per model and cached
(cloud/prepare.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from tqdm import tqdm

DEFAULT_CORPUS = "python-docs"
MODEL_SAMPLES = "model-samples"
SAMPLE_TOKENS, SAMPLE_SEED = 256, 0  # new tokens per answer, and the sampling seed, of the cached corpus
REQUESTS = ("Write a few paragraphs about {}.", "Explain {} to a curious friend.", "Tell a short story about {}.")
TOPICS = (
    "the history of bread",
    "how rivers shape valleys",
    "learning to swim",
    "a rainy afternoon in a city",
    "the rules of chess",
    "keeping bees",
    "the moon landing",
    "planning a garden",
    "why the sky is blue",
    "a train journey across mountains",
    "the first day at a new job",
    "how vaccines work",
    "the ocean at night",
    "building a wooden boat",
    "friendship between neighbours",
    "the life of a lighthouse keeper",
    "saving money",
    "a football match",
    "volcanoes",
    "the invention of printing",
    "cooking rice",
    "a lost dog finding its way home",
    "how a bill becomes a law",
    "winter in the north",
    "the human heart",
    "a small village market",
    "climbing a mountain",
    "how airplanes fly",
    "a letter to a grandparent",
    "the water cycle",
    "ancient Rome",
    "taking care of a cat",
    "a thunderstorm",
    "the solar system",
    "a musician's first concert",
    "recycling",
    "the desert",
    "a family dinner",
    "how bridges are built",
    "the changing seasons",
    "running a small shop",
    "birds that migrate",
    "a walk in the forest",
    "the stock market",
    "learning a new language",
    "a fishing trip",
    "earthquakes",
    "a birthday party",
    "how the internet works",
    "an old library",
)


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


@torch.no_grad()
def sample_corpus(
    model,
    tokenizer,
    new_tokens: int = SAMPLE_TOKENS,
    batch_size: int = 16,
    seed: int = SAMPLE_SEED,
    progress: bool = True,
) -> str:
    """The model's own answers to :data:`REQUESTS` x :data:`TOPICS` (150 texts of up to ``new_tokens``
    tokens), sampled at temperature 1 from ``seed``; joined by blank lines."""
    prompts = [request.format(topic) for topic in TOPICS for request in REQUESTS]
    if tokenizer.chat_template:
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad_token = tokenizer.pad_token
    if pad_token is None:  # GPT-2's tokenizer has none: pad with end-of-text, left of the prompt
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(seed)
    texts = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc="sampling a corpus", disable=not progress):
            batch = tokenizer(
                prompts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
                return_token_type_ids=False,
            )
            out = model.generate(
                **batch,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
            texts += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side, tokenizer.pad_token = side, pad_token
    return "\n\n".join(t.strip() for t in texts if t.strip())


def samples_key() -> str:
    """Names the model-samples corpus by how it is sampled (requests, topics, length, seed), so
    that a change to any of them samples it afresh instead of reading an old cached text."""
    how = json.dumps([REQUESTS, TOPICS, SAMPLE_TOKENS, SAMPLE_SEED]).encode()
    return f"{MODEL_SAMPLES}-{hashlib.sha256(how).hexdigest()[:12]}"


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
