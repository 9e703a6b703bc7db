import json

import pytest
import torch

from offsite.emulator.data import (
    IGNORE_INDEX,
    DataFormatError,
    ExampleStream,
    MCRow,
    collate,
    encode_pair,
    read_examples,
    read_mc_jsonl,
)
from tests.conftest import write_jsonl


def test_mc_rows_train_on_the_correct_choice(tmp_path):
    path = tmp_path / "mc.jsonl"
    write_jsonl(path, [{"prompt": "Q?\nAnswer:", "choices": [" yes", " no"], "answer": 1}])
    assert read_examples(path)[0].completion == " no"
    assert read_mc_jsonl(path)[0].answer == 1


def test_sft_rows(tmp_path):
    path = tmp_path / "sft.jsonl"
    write_jsonl(path, [{"prompt": "Say hi:", "completion": " hi"}])
    example = read_examples(path)[0]
    assert (example.prompt, example.completion) == ("Say hi:", " hi")


@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"prompt": "x", "choices": [" a", " b"], "answer": 2}', "index into the 2 choices"),
        ('{"prompt": "x", "choices": [" a"], "answer": 0}', "at least two"),
        ('{"prompt": 3, "choices": [" a", " b"], "answer": 0}', "'prompt' must be a string"),
        ('{"prompt": "x", "choices": [" a", " b"], "answer": true}', "index"),
        ("[1, 2]", "JSON object"),
        ('{"prompt": "x", "choices": ', "not valid JSON"),
        ('{"prompt": "x"}', "expected"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path, line, reason):
    path = tmp_path / "bad.jsonl"
    good = '{"prompt": "ok", "choices": [" a", " b"], "answer": 0}'
    path.write_text(good + "\n\n" + good + "\n" + line + "\n")
    with pytest.raises(DataFormatError) as caught:
        read_examples(path)
    assert caught.value.line == 4
    assert f"{path}:4:" in str(caught.value)
    assert reason in str(caught.value)


def test_loss_falls_only_on_the_answer(tokenizer):
    ids, start = encode_pair(tokenizer, "Which one?", " b", max_length=64)
    batch = collate([(ids, start), encode_pair(tokenizer, "Longer question here?", " yes", 64)], pad_id=0)
    labelled = batch.labels[0] != IGNORE_INDEX
    assert labelled.sum() == len(ids) - start
    assert tokenizer.decode(batch.input_ids[0][labelled]) == " b"
    assert torch.all(batch.labels[batch.attention_mask == 0] == IGNORE_INDEX)


def test_truncation_keeps_the_answer(tokenizer):
    ids, start = encode_pair(tokenizer, "x" * 100, " answer", max_length=16)
    assert len(ids) == 16
    assert tokenizer.decode(ids[start:]) == " answer"


def test_stream_visits_every_example_each_epoch(tokenizer):
    from offsite.emulator.data import Example

    examples = [Example(f"q{i}", f" {i}") for i in range(5)]
    stream = ExampleStream(tokenizer, examples, batch_size=5, max_length=32, seed=0)
    seen = sorted(tokenizer.decode(row[row != 0][-1:]) for row in stream.next().input_ids)
    assert seen == [str(i) for i in range(5)]


def test_a_test_file_is_mc_or_sft_by_its_rows(tmp_path):
    from offsite.emulator.data import Example, read_test_rows

    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"prompt": "p", "choices": [" a", " b"], "answer": 1}) + "\n")
    sft = tmp_path / "sft.jsonl"
    sft.write_text("\n".join(json.dumps({"prompt": f"p{i}", "completion": f" c{i}"}) for i in range(3)) + "\n")
    assert read_test_rows(mc) == ("mc", [MCRow("p", (" a", " b"), 1)])
    kind, rows = read_test_rows(sft, limit=2)
    assert kind == "sft" and rows == [Example("p0", " c0"), Example("p1", " c1")]


@pytest.mark.parametrize("first,second", [("mc", "sft"), ("sft", "mc")])
def test_a_test_file_mixing_mc_and_sft_is_refused_at_the_line(tmp_path, first, second):
    from offsite.emulator.data import read_test_rows

    rows = {"mc": {"prompt": "p", "choices": [" a", " b"], "answer": 0}, "sft": {"prompt": "p", "completion": " c"}}
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(rows[k]) if k else "" for k in (first, first, "", second, first)) + "\n")
    with pytest.raises(
        DataFormatError, match=rf"mixed.jsonl:4: a {second.upper()} row in a file of {first.upper()} rows \(line 1"
    ):
        read_test_rows(path)
