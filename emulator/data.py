"""Task data: multiple-choice JSONL ``{"prompt","choices","answer"}`` and SFT JSONL
``{"prompt","completion"}``, and their encoding into token batches whose loss falls only on
the answer tokens."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from offsite.protocol.safe_json import JSONRefused, parse_json

IGNORE_INDEX = -100
MAX_LINE_BYTES = 1 << 20


class DataFormatError(ValueError):
    """A row of a data file is malformed; the message names the file and the line."""

    def __init__(self, path: Path | str, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}")
        self.path, self.line, self.reason = str(path), line, reason


@dataclass(frozen=True)
class MCRow:
    prompt: str
    choices: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class Example:
    """One training example: the loss falls on ``completion`` only."""

    prompt: str
    completion: str


ROW_SHAPES = 'expected {"prompt","choices","answer"} or {"prompt","completion"}'


def _rows(path: Path):
    """``(line number, object)`` per non-blank line. A line is read with a bound (never more than
    ``MAX_LINE_BYTES + 1`` bytes at a time, newline or not), and parsed by the one parser for
    untrusted JSON: every failure is a :class:`DataFormatError` naming file and line."""
    if path.exists() and not path.is_file():
        raise DataFormatError(path, 0, "not a regular file (a directory?): --data takes a JSONL file")
    with open(path, "rb") as handle:
        number = 0
        while raw := handle.readline(MAX_LINE_BYTES + 1):
            number += 1
            if len(raw) > MAX_LINE_BYTES:
                raise DataFormatError(path, number, f"line longer than {MAX_LINE_BYTES} bytes")
            if not raw.strip():
                continue
            try:
                row = parse_json(
                    raw.removeprefix(b"\xef\xbb\xbf") if number == 1 else raw
                )  # a UTF-8 BOM, as json.loads allowed
            except JSONRefused as error:
                raise DataFormatError(path, number, f"not valid JSON ({error})") from None
            if not isinstance(row, dict):
                raise DataFormatError(path, number, f"expected a JSON object, got {type(row).__name__}")
            yield number, row


def _mc_row(path: Path, number: int, row: dict) -> MCRow:
    prompt, choices, answer = row.get("prompt"), row.get("choices"), row.get("answer")
    if not isinstance(prompt, str):
        raise DataFormatError(path, number, "'prompt' must be a string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise DataFormatError(path, number, "'choices' must be a list of at least two non-empty strings")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise DataFormatError(path, number, f"'answer' must be an index into the {len(choices)} choices")
    return MCRow(prompt, tuple(choices), answer)


def _sft_row(path: Path, number: int, row: dict) -> Example:
    prompt, completion = row.get("prompt"), row.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
        raise DataFormatError(path, number, "'prompt' and 'completion' must be strings, the completion non-empty")
    return Example(prompt, completion)


def read_mc_jsonl(path: Path | str, limit: int | None = None) -> list[MCRow]:
    """Multiple-choice rows; the first malformed row raises :class:`DataFormatError`."""
    path = Path(path)
    rows = []
    for number, row in _rows(path):
        rows.append(_mc_row(path, number, row))
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise DataFormatError(path, 0, "no rows")
    return rows


def read_examples(path: Path | str, limit: int | None = None) -> list[Example]:
    """Training examples from MC rows (the correct choice is the completion) or SFT rows."""
    path = Path(path)
    examples = []
    for number, row in _rows(path):
        kind = row_kind(row)
        if not kind:
            raise DataFormatError(path, number, ROW_SHAPES)
        if kind == "mc":
            mc = _mc_row(path, number, row)
            examples.append(Example(mc.prompt, mc.choices[mc.answer]))
        else:
            examples.append(_sft_row(path, number, row))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise DataFormatError(path, 0, "no rows")
    return examples


def row_kind(row: dict) -> str:
    """``"mc"`` for a row with ``choices``, ``"sft"`` for one with ``completion``, else ``""``."""
    return "mc" if "choices" in row else "sft" if "completion" in row else ""


def read_test_rows(path: Path | str, limit: int | None = None) -> tuple[str, list[MCRow] | list[Example]]:
    """A test file's kind and rows: ``("mc", [MCRow])`` scored by accuracy, or ``("sft", [Example])``
    scored by completion NLL. The kind comes from the rows; a file that mixes both is refused at the
    first row of the other kind, naming its line and the line that set the kind."""
    path = Path(path)
    kind, first, rows = "", 0, []
    for number, row in _rows(path):
        this = row_kind(row)
        if not this:
            raise DataFormatError(path, number, ROW_SHAPES)
        if kind and this != kind:
            raise DataFormatError(
                path,
                number,
                f"a {this.upper()} row in a file of {kind.upper()} rows (line {first} is "
                f"{kind.upper()}): a test file holds one kind",
            )
        kind, first = kind or this, first or number
        rows.append(_mc_row(path, number, row) if this == "mc" else _sft_row(path, number, row))
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise DataFormatError(path, 0, "no rows")
    return kind, rows


# ---------------------------------------------------------------- encoding


def encode_pair(tokenizer, prompt: str, completion: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of prompt+completion and the index where the completion starts.

    The prompt is encoded with the tokenizer's special tokens and the completion without,
    as lm-eval does; over-long sequences lose tokens from the left of the prompt.
    """
    context = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    continuation = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if not continuation:
        raise ValueError(f"completion {completion!r} encodes to no tokens")
    ids = context + continuation
    if len(ids) > max_length:
        ids = ids[-max_length:]
    return ids, len(ids) - len(continuation)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), IGNORE_INDEX outside the answers

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(encoded: list[tuple[list[int], int]], pad_id: int) -> Batch:
    """Right-padded batch; labels are the answer tokens only."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, start) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, start : len(ids)] = torch.tensor(ids[start:])
    return Batch(input_ids, attention_mask, labels)


def pad_id_of(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else pad


class ExampleStream:
    """Endless shuffled batches of encoded examples (a fresh permutation every epoch)."""

    def __init__(self, tokenizer, examples: list[Example], batch_size: int, max_length: int, seed: int = 0) -> None:
        self.encoded = [encode_pair(tokenizer, e.prompt, e.completion, max_length) for e in examples]
        self.batch_size = batch_size
        self.pad_id = pad_id_of(tokenizer)
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def next(self) -> Batch:
        picked = []
        while len(picked) < self.batch_size:
            if not self.order:
                self.order = list(range(len(self.encoded)))
                self.rng.shuffle(self.order)
            picked.append(self.encoded[self.order.pop()])
        return collate(picked, self.pad_id)
