"""Atomic folder writes: the target is completely the old folder or completely the new one."""
import os

import pytest

from chest_model import atomic
from chest_model.atomic import atomic_directory, replace_directory


def _folder(path, **files):
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def _contents(path):
    return {p.name: p.read_text() for p in path.iterdir()}


def test_replace_directory_swaps_in_the_new_folder_and_removes_the_old(tmp_path):
    target = _folder(tmp_path / "target", a="old")
    tmp = _folder(tmp_path / ".target.tmp-1", a="new", b="new")
    replace_directory(tmp, target)
    assert _contents(target) == {"a": "new", "b": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]
    replace_directory(_folder(tmp_path / ".fresh.tmp-1", c="x"), tmp_path / "fresh")  # no existing target
    assert _contents(tmp_path / "fresh") == {"c": "x"}


def test_a_failed_rename_rolls_back_and_removes_the_temporary_folder(tmp_path, monkeypatch):
    target = _folder(tmp_path / "target", a="old")
    tmp = _folder(tmp_path / ".target.tmp-1", a="new")
    real_rename, calls = os.rename, []

    def rename_in_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the old one was moved aside; moving the new one in fails
            raise OSError("no space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename_in_fails)
    with pytest.raises(OSError, match="no space left"):
        replace_directory(tmp, target)
    assert len(calls) == 3  # aside, in (failed), back
    assert _contents(target) == {"a": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_atomic_directory_keeps_unwritten_entries_and_cleans_up_on_error(tmp_path):
    target = _folder(tmp_path / "run", weights="old", history="kept")
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("new")
    assert _contents(target) == {"weights": "new", "history": "kept"}
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("interrupted")
    assert _contents(target) == {"weights": "new", "history": "kept"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def _dead_pid():
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_folder_set_aside_by_a_killed_swap_is_put_back_and_leftovers_removed(tmp_path):
    """Killed between the swap's two renames: the old folder is set aside and the target is missing."""
    pid = _dead_pid()
    _folder(tmp_path / f".run.old-{pid}-0123abcd", weights="old")
    _folder(tmp_path / f".run.tmp-{pid}-4567abcd", weights="half")
    _folder(tmp_path / f".run.tmp-{os.getpid()}-89abcdef", weights="mine, in progress")
    _folder(tmp_path / f".other.tmp-{pid}-0123abcd", weights="not this target's")
    atomic.recover_interrupted(tmp_path / "run")
    assert _contents(tmp_path / "run") == {"weights": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["run", f".run.tmp-{os.getpid()}-89abcdef", f".other.tmp-{pid}-0123abcd"])
    atomic.recover_folder(tmp_path)  # every name in the folder
    assert f".other.tmp-{pid}-0123abcd" not in {p.name for p in tmp_path.iterdir()}


def test_a_model_set_aside_by_a_killed_save_loads_again(tmp_path):
    from chest_model import ChestXrayClassifier

    ChestXrayClassifier(image_size=32, hidden_size=8).save_pretrained(tmp_path / "m")
    os.rename(tmp_path / "m", tmp_path / f".m.old-{_dead_pid()}-0123abcd")
    assert ChestXrayClassifier.from_pretrained(tmp_path / "m").config.image_size == 32
