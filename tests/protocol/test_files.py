"""Putting a finished directory in place of another (``replace_dir``)."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from offsite.protocol.files import replace_dir


def _staged(parent, name, content):
    staging = parent / f".{name}"
    (staging / "sub").mkdir(parents=True)
    (staging / "a.txt").write_text(content)
    (staging / "sub" / "b.txt").write_text(content * 2)
    return staging


def _read(path):
    return {p.relative_to(path).as_posix(): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def test_replaces_a_directory_whole_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "target"
    replace_dir(_staged(tmp_path, "one", "1"), target)  # absent before
    assert _read(target) == {"a.txt": "1", "sub/b.txt": "11"}
    (target / "stale.txt").write_text("from the old copy")
    replace_dir(_staged(tmp_path, "two", "2"), target)
    assert _read(target) == {"a.txt": "2", "sub/b.txt": "22"}  # the old directory's extra file is gone too
    assert [p.name for p in tmp_path.iterdir()] == ["target"]


def test_keeps_what_is_there_when_asked(tmp_path):
    target = tmp_path / "target"
    replace_dir(_staged(tmp_path, "one", "1"), target)
    replace_dir(_staged(tmp_path, "two", "2"), target, keep=lambda path: (path / "a.txt").read_text() == "1")
    assert _read(target) == {"a.txt": "1", "sub/b.txt": "11"}
    assert [p.name for p in tmp_path.iterdir()] == ["target"]  # ours dropped


def test_refuses_to_replace_a_file(tmp_path):
    (tmp_path / "target").write_text("not a directory")
    staging = _staged(tmp_path, "one", "1")
    with pytest.raises(OSError):
        replace_dir(staging, tmp_path / "target")
    assert (tmp_path / "target").read_text() == "not a directory" and staging.is_dir()


def test_installers_racing_each_other_all_succeed_and_one_copy_stands_whole(tmp_path):
    target = tmp_path / "target"
    replace_dir(_staged(tmp_path, "first", "x"), target)
    stagings = [_staged(tmp_path, f"s{i}", str(i)) for i in range(40)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda staging: replace_dir(staging, target), stagings))
    content = _read(target)
    winner = content["a.txt"]
    assert content == {"a.txt": winner, "sub/b.txt": winner * 2}  # one installer's whole copy, not a mix
    assert [p.name for p in tmp_path.iterdir()] == ["target"]
