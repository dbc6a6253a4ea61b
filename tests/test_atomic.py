"""Atomic folder writes: the target is completely the old folder or completely the new one."""
import os
from pathlib import Path

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
    """Killed between the swap's two renames: the old folder is set aside, the new one not yet renamed in."""
    host, pid = atomic._HOST, _dead_pid()
    _folder(tmp_path / f".run.old-{host}-{pid}-0123abcd", weights="old")
    _folder(tmp_path / f".run.tmp-{host}-{pid}-4567abcd", weights="half")
    mine = _folder(tmp_path / f".run.tmp-{host}-{os.getpid()}-89abcdef", weights="mine, in progress")
    elsewhere = _folder(tmp_path / f".run.tmp-ffffff-{pid}-0123abcd", weights="another machine's, maybe running")
    _folder(tmp_path / f".other.tmp-{host}-{pid}-0123abcd", weights="not this target's")
    atomic.recover_interrupted(tmp_path / "run")
    assert _contents(tmp_path / "run") == {"weights": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run", mine.name, elsewhere.name, f".other.tmp-{host}-{pid}-0123abcd"])
    atomic.recover_folder(tmp_path)  # every name in the folder
    assert f".other.tmp-{host}-{pid}-0123abcd" not in {p.name for p in tmp_path.iterdir()}


def test_a_set_aside_folder_whose_swap_finished_is_removed_not_put_back(tmp_path):
    """Killed while removing the old folder after a finished swap, and the target deleted since: the old
    folder is stale (no temporary folder of that swap is left), and must not come back."""
    stale = _folder(tmp_path / f".run.old-{atomic._HOST}-{_dead_pid()}-0123abcd", weights="older")
    atomic.recover_interrupted(tmp_path / "run")
    assert not (tmp_path / "run").exists() and not stale.exists()


def test_leftovers_of_a_former_process_with_this_pid_are_removed(tmp_path):
    """In a container a restarted job often gets the same PID: age tells its leftovers apart."""
    old = _folder(tmp_path / f".run.tmp-{atomic._HOST}-{os.getpid()}-0123abcd", weights="half")
    os.utime(old, (atomic._STARTED - 60, atomic._STARTED - 60))
    atomic.recover_interrupted(tmp_path / "run")
    assert not old.exists()


def test_a_model_set_aside_by_a_killed_save_loads_again(tmp_path):
    from chest_model import ChestXrayClassifier

    ChestXrayClassifier(image_size=32, hidden_size=8).save_pretrained(tmp_path / "m")
    pid = _dead_pid()
    os.rename(tmp_path / "m", tmp_path / f".m.old-{atomic._HOST}-{pid}-0123abcd")
    _folder(tmp_path / f".m.tmp-{atomic._HOST}-{pid}-4567abcd", weights="half")
    assert ChestXrayClassifier.from_pretrained(tmp_path / "m").config.image_size == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_replaced_folder_keeps_its_mode_and_group(tmp_path):
    target = tmp_path / "shared-model"
    target.mkdir()
    os.chmod(target, 0o2770)  # a group-shared folder: group write and setgid must survive the swap
    with atomic_directory(target) as tmp:
        (tmp / "config.json").write_text("{}")
    assert oct(os.stat(target).st_mode & 0o7777) == oct(0o2770)
    assert (target / "config.json").read_text() == "{}"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes through permission bits")
def test_a_read_only_folder_or_parent_is_refused_by_name_and_left_as_it_was(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    os.chmod(target, 0o555)
    try:
        with pytest.raises(atomic.FolderWriteError, match="model: is read-only"):
            with atomic_directory(target):
                pass
        assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    finally:
        os.chmod(target, 0o755)
    parent = tmp_path / "locked"
    parent.mkdir()
    os.chmod(parent, 0o555)
    try:
        with pytest.raises(atomic.FolderWriteError, match="locked must be writable"):
            with atomic_directory(parent / "model"):
                pass
    finally:
        os.chmod(parent, 0o755)


def test_saving_the_working_directory_leaves_the_process_in_the_new_folder(tmp_path, monkeypatch):
    target = tmp_path / "model"
    (target / "sub").mkdir(parents=True)
    monkeypatch.chdir(target / "sub")
    with atomic_directory(target) as tmp:
        (tmp / "config.json").write_text("{}")
    assert Path.cwd() == target / "sub"  # not the removed old folder
    assert (Path("..") / "config.json").read_text() == "{}"
