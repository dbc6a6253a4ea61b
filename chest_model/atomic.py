"""Atomic writes: a folder or file is either completely the old one or completely the new one.

Temporary and set-aside folders are siblings named ``.NAME.tmp-HOST-PID-XXXX`` / ``.NAME.old-...``
(HOST: a short hash of the machine's name). A process killed mid-write leaves one behind; the next
write to ``NAME`` removes those of this machine's processes that no longer run, and puts back an
old folder that was set aside when the kill came between the two renames of a swap (then, and only
then, the swap's temporary folder is still there too). Another machine's leftovers, on a shared
disk, are left alone: whether their writer still runs cannot be told from here.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import ChestModelError


class NotAFolderError(ChestModelError, ValueError):
    """A path to write to that is the wrong kind (a file where a folder goes, or the reverse), or lies below a file."""


class FolderWriteError(ChestModelError, OSError, RuntimeError):
    """A folder that cannot be replaced atomically where it is: read-only, a mount point, or in a read-only folder."""


NO_SPACE = "no space left on the device"


def write_failure(err: BaseException) -> str | None:
    """Why writing failed, for an error raised while files were written (None for any other error). A full
    disk or quota shows as OSError, as safetensors' SafetensorError, or as torch.save's C++ writer's
    bare RuntimeError about a short write."""
    from safetensors import SafetensorError

    text = str(err)
    short_write = isinstance(err, RuntimeError) and any(m in text for m in ("iostream error", "unexpected pos"))
    if not (isinstance(err, (OSError, SafetensorError)) or short_write or "PytorchStreamWriter" in text):
        return None
    if short_write or "No space left" in text or getattr(err, "errno", None) in (28, 122):  # ENOSPC, EDQUOT
        return NO_SPACE
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def fsync_directory(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_directory(target: str | Path, *, keep_existing: bool = True, drop: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``target`` in one rename.

    With ``keep_existing``, entries of an existing ``target`` that the new folder does not write
    (checkpoints, history, eval results in a training run's folder) are hard-linked into the new
    folder first, so they survive the swap without being copied; those named in ``drop`` are not.
    If anything fails, ``target`` is left untouched and the temporary folder is removed. A symlink
    to a folder is written through (the folder it points to is replaced); an existing file is refused.
    """
    target = writable_target(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = sibling(target, "tmp")
        tmp.mkdir()
    except OSError as err:
        raise _needs_writable_parent(target, err.strerror or str(err)) from None
    if target.is_dir():
        _copy_permissions(target, tmp)
    dropped = set(drop)
    try:
        yield tmp
        if keep_existing and target.is_dir():
            for entry in target.iterdir():
                if not (tmp / entry.name).exists() and entry.name not in dropped:
                    _link_tree(entry, tmp / entry.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, target)


def writable_target(target: str | Path) -> Path:
    """``target`` as an absolute path to write a folder at: symlinks followed, files refused, and
    what an interrupted earlier write left beside it cleared up."""
    target = Path(target).absolute()
    if target.is_symlink():
        target = target.resolve()
    if target.exists() and not target.is_dir():
        raise NotAFolderError(f"{target}: is a file, not a folder; choose another folder to save to")
    if (blocking := file_above(target)) is not None:
        raise NotAFolderError(f"{target}: {blocking} is a file, so no folder can be made below it")
    if target.is_dir() and os.path.ismount(target):
        raise FolderWriteError(f"{target}: is a mount point, which cannot be replaced by a rename; "
                               "save into a folder inside it")
    if target.is_dir() and not os.access(target, os.W_OK):
        raise FolderWriteError(f"{target}: is read-only; make it writable or choose another folder")
    if not _can_write_in(target.parent):
        raise _needs_writable_parent(target, "Permission denied")
    recover_interrupted(target)
    return target


def _needs_writable_parent(target: Path, why: str) -> FolderWriteError:
    return FolderWriteError(f"{target}: cannot be written ({why}): it is replaced as a whole, through a new "
                            f"folder made beside it, so {target.parent} must be writable")


def _copy_permissions(old: Path, new: Path) -> None:
    """The new folder keeps the old one's mode and group (a shared folder stays shared), where allowed."""
    try:
        shutil.copymode(old, new)
        os.chown(new, -1, old.stat().st_gid)
    except (OSError, AttributeError):  # not the group's member, or no chown (Windows): the defaults stay
        pass


def sibling(target: Path, kind: str) -> Path:
    """A fresh temporary (``tmp``) or set-aside (``old``) name next to ``target``, owned by this process."""
    return target.parent / f".{target.name}.{kind}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def recover_interrupted(target: str | Path) -> None:
    """Remove what killed writes to ``target`` left beside it; restore a set-aside folder if ``target`` is gone."""
    target = Path(target)
    recover_folder(target.parent, only=target.name)


def recover_folder(folder: str | Path, *, only: str | None = None) -> None:
    """:func:`recover_interrupted` for every name in ``folder`` (or ``only`` that one)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    leftovers = []
    for entry in folder.iterdir():
        found = _LEFTOVER.match(entry.name)
        if found and found["host"] == _HOST and (only is None or found["name"] == only) and _dead(found["pid"], entry):
            leftovers.append((found["kind"], found["name"], found["pid"], entry))
    swapping = {(name, pid) for kind, name, pid, _ in leftovers if kind == "tmp"}
    try:
        for kind, name, pid, entry in sorted(leftovers, key=lambda item: item[0] != "old"):  # restore before removing
            target = folder / name
            if kind == "old" and not target.exists() and (name, pid) in swapping:  # killed between the two renames
                os.rename(entry, target)
            else:
                shutil.rmtree(entry, ignore_errors=True)
    except OSError:  # a read-only folder: leave it as it is
        pass


_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[0-9a-f]{8}$")
_STARTED = time.time()  # this process's leftovers are younger: older ones with its PID are a former process's


def _dead(pid: str, entry: Path) -> bool:
    if int(pid) == os.getpid():
        try:
            return entry.stat().st_mtime < _STARTED - 1
        except OSError:
            return False
    return not _running(int(pid))


def _running(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send Ctrl+C there: assume it runs, and leave its folders
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def replace_directory(tmp: str | Path, target: str | Path) -> None:
    """Make the finished folder ``tmp`` (a sibling of ``target``) be ``target``: synced, then renamed in.

    An existing ``target`` is renamed aside first and removed only once the new one is in place;
    if anything fails, it is renamed back and ``tmp`` is removed, so ``target`` is either completely
    the old folder or completely the new one (after a kill between the two renames, the next write
    or load puts the old one back: :func:`recover_interrupted`).
    """
    tmp, target = Path(tmp), Path(target)
    old = sibling(target, "old")
    inside = _working_directory_below(target)
    try:
        fsync_tree(tmp)
        if target.exists():
            os.rename(target, old)
        os.rename(tmp, target)
        fsync_directory(target.parent)
        if inside is not None and (target / inside).is_dir():
            os.chdir(target / inside)  # else the process would stay in the removed old folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not target.exists():
            os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _working_directory_below(target: Path) -> Path | None:
    """Where the working directory lies below ``target`` (``.`` for the folder itself), if it does."""
    try:
        cwd = Path.cwd()
    except OSError:
        return None
    target = Path(os.path.realpath(target))
    return cwd.relative_to(target) if cwd == target or target in cwd.parents else None


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


def file_above(path: Path) -> Path | None:
    """The first folder of ``path``'s that exists as a file (nothing can be made below it), if any."""
    return next((p for p in path.parents if p.exists() and not p.is_dir()), None)


def check_writable_file(path: str | Path, *, inputs: tuple = (), input_folders: tuple = ()) -> Path:
    """``path`` as a file to write: not a folder, not below a file, in a folder that can be written
    (or made); never one of the command's ``inputs``, nor inside its ``input_folders`` (a mistyped
    output would destroy what the command reads). Checked before long work."""
    if str(path).endswith(("/", os.sep)):
        raise NotAFolderError(f"{path}: names a folder; give a file name to write")
    path = Path(path)
    if path.is_dir():
        raise NotAFolderError(f"{path}: is a folder; give a file name to write")
    check_not_an_input(path, inputs=inputs, input_folders=input_folders)
    if (blocking := file_above(path)) is not None:
        raise NotAFolderError(f"{path}: {blocking} is a file, so no file can be written below it")
    _check_can_write_in(path.parent, path)
    return path


def check_not_an_input(path: str | Path, *, inputs: tuple = (), input_folders: tuple = ()) -> None:
    """Refuse an output that is one of the command's input files, or lies inside one of its input folders."""
    real = Path(os.path.realpath(path))
    for source in inputs:
        if Path(os.path.realpath(source)) == real:
            raise NotAFolderError(f"{path}: is an input of this command ({source}); writing there would destroy it: "
                                  "choose another output")
    for folder in input_folders:
        top = Path(os.path.realpath(folder))
        if real == top or top in real.parents:
            raise NotAFolderError(f"{path}: lies inside {folder}, which this command reads; writing there would "
                                  "change or destroy it: choose an output outside it")


def check_writable_folder(path: str | Path) -> Path:
    """``path`` as a folder to write files into (made if missing): not a file, not below one, writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotAFolderError(f"{path}: is a file, not a folder; choose a folder to write to")
    if (blocking := file_above(path)) is not None:
        raise NotAFolderError(f"{path}: {blocking} is a file, so no folder can be made below it")
    _check_can_write_in(path, path)
    return path


def _check_can_write_in(folder: Path, named: Path) -> None:
    if not _can_write_in(folder):
        raise FolderWriteError(f"{named}: cannot be written: {_nearest_existing(folder)} is read-only")


def _can_write_in(folder: Path) -> bool:
    """Whether ``folder`` can be written, or made: its nearest existing folder (itself or above) is writable."""
    existing = _nearest_existing(folder)
    return existing is None or os.access(existing, os.W_OK)


def _nearest_existing(folder: Path) -> Path | None:
    return next((p for p in (folder.absolute(), *folder.absolute().parents) if p.exists()), None)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = check_writable_file(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except OSError as err:  # a full disk, a read-only place: one line naming the file
        raise FolderWriteError(f"{path}: cannot be written ({err.strerror or err})") from None
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
