"""Atomic writes: a folder or file is either completely the old one or completely the new one."""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_directory(target: str | Path, *, keep_existing: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``target`` in one rename.

    With ``keep_existing``, entries of an existing ``target`` that the new folder does not write
    (checkpoints, history, eval results in a training run's folder) are hard-linked into the new
    folder first, so they survive the swap without being copied. If anything fails, ``target`` is
    left untouched and the temporary folder is removed.
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if keep_existing and target.is_dir():
            for entry in target.iterdir():
                if not (tmp / entry.name).exists() and not entry.name.startswith(".tmp-"):
                    _link_tree(entry, tmp / entry.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, target)


def replace_directory(tmp: str | Path, target: str | Path) -> None:
    """Make the finished folder ``tmp`` (a sibling of ``target``) be ``target``: synced, then renamed in.

    An existing ``target`` is renamed aside first and removed only once the new one is in place;
    if anything fails, it is renamed back and ``tmp`` is removed, so ``target`` is either completely
    the old folder or completely the new one.
    """
    tmp, target = Path(tmp), Path(target)
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        fsync_tree(tmp)
        if target.exists():
            os.rename(target, old)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not target.exists():
            os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _link_tree(src: Path, dst: Path) -> None:
    if src.is_dir() and not src.is_symlink():
        dst.mkdir()
        for child in src.iterdir():
            _link_tree(child, dst / child.name)
    else:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
