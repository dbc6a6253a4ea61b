"""Resumable training checkpoints: ``accelerator.save_state`` folders, written atomically and verified.

Each checkpoint is written to a temporary folder, given a ``manifest.json`` with every file's
SHA-256, and renamed into place, so ``checkpoints/`` only ever holds complete checkpoints. Before a
resume the manifest is checked, so a damaged checkpoint is reported instead of half-loaded.

Nothing is unpickled on a resume. accelerate loads its own files (model, optimizer, RNG states) with
``weights_only=True``, but objects registered with ``register_for_checkpointing`` with
``weights_only=False``, so the training state they would hold is kept here instead: plain values in
``trainer_state.json``, tensors in safetensors files (``save_checkpoint(tensors=...)``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .atomic import NO_SPACE, recover_folder, replace_directory, sibling, write_failure
from .errors import ChestModelError

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
logger = logging.getLogger(__name__)
_NAME = re.compile(r"^step_(\d{8})$")


class CheckpointError(ChestModelError, RuntimeError):
    """A checkpoint that is missing, incomplete or corrupted."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(accelerator, checkpoints_dir: Path, global_step: int, trainer_state: dict[str, Any], *, keep: int = 2,
                    tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> Path | None:
    """Save model, optimizer and RNG states plus ``trainer_state`` (JSON) and each of ``tensors`` as
    ``NAME.safetensors`` (the main process's); all processes must call."""
    checkpoints_dir = Path(checkpoints_dir)
    final = checkpoints_dir / f"step_{global_step:08d}"
    tmp = sibling(final, "tmp")
    if accelerator.is_main_process:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        recover_folder(checkpoints_dir)  # what a killed run left half-written
    tmp = Path(accelerator_broadcast_str(accelerator, str(tmp)))
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
            for name, state in (tensors or {}).items():
                save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / f"{name}.safetensors"))
            files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=2))
            replace_directory(tmp, final)
    except BaseException as err:
        if accelerator.is_main_process:  # no half-written folder is left behind
            shutil.rmtree(tmp, ignore_errors=True)
        reason = write_failure(err)
        if reason is not None:
            kept = list_checkpoints(checkpoints_dir)
            raise CheckpointError(
                f"{final}: the checkpoint could not be written ({reason}); nothing half-written is left"
                + (f", and {kept[-1].name} is intact" if kept else "")
                + (". A checkpoint needs room for the model, its optimizer state and the newest kept one beside it"
                   if reason == NO_SPACE else "")) from err
        raise
    if accelerator.is_main_process:
        for old in list_checkpoints(checkpoints_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def accelerator_broadcast_str(accelerator, text: str) -> str:
    """The main process's value of ``text`` on every process (temporary names must agree)."""
    if accelerator.num_processes == 1:
        return text
    from accelerate.utils import broadcast_object_list

    box = [text]
    broadcast_object_list(box, from_process=0)
    return box[0]


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoints (with a manifest), oldest first. Temporary folders are ignored."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir() if _NAME.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


SUPERSEDED = "superseded"  # inside checkpoints/: later checkpoints of a timeline a resume branched from


def set_aside_later(checkpoints_dir: Path, resumed: Path) -> list[Path]:
    """Move the checkpoints later than ``resumed`` (a resume from an older one abandons them) into
    ``checkpoints/superseded/``: kept, but no longer ``latest``, and never pruned in place of the new
    timeline's. Returns where they went."""
    match = _NAME.match(Path(resumed).name)
    if match is None or Path(resumed).parent.resolve() != Path(checkpoints_dir).resolve():
        return []
    later = [p for p in list_checkpoints(checkpoints_dir) if int(_NAME.match(p.name).group(1)) > int(match.group(1))]
    moved = []
    for checkpoint in later:
        target = Path(checkpoints_dir) / SUPERSEDED / checkpoint.name
        if target.exists():  # set aside before, by another branch: keep both
            target = target.with_name(f"{checkpoint.name}.{os.getpid()}")
        target.parent.mkdir(exist_ok=True)
        os.replace(checkpoint, target)
        moved.append(target)
    return moved


def resolve_checkpoint(spec: str, checkpoints_dir: Path, *, quiet: bool = False) -> Path | None:
    """``latest`` -> newest complete checkpoint (None if there is none yet); otherwise the given path.
    ``quiet``: a look ahead (before the resume itself), which leaves the warnings to the resume."""
    if spec == "latest":
        found = list_checkpoints(checkpoints_dir)
        newest = found[-1].name if found else ""
        # step_NNNNNNNN names sort as their numbers do
        incomplete = sorted(p.name for p in Path(checkpoints_dir).glob("step_*") if _NAME.match(p.name) and p.name > newest)
        if incomplete and not quiet:
            logger.warning("%s: %s %s no manifest (an interrupted save, or damaged): passed over for %s",
                           checkpoints_dir, ", ".join(incomplete), "has" if len(incomplete) == 1 else "have",
                           found[-1].name if found else "a fresh start")
        return found[-1] if found else None
    path = Path(spec)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    return path


def check_same_recipe(path: Path, saved: dict[str, Any] | None, asked: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint with other training settings: the weights, optimizer and data
    order it holds belong to its own. (Checkpoints written before settings were recorded pass.)"""
    if saved is None:
        return
    # Only settings both versions know: a setting added or removed by an upgrade is not the user's change.
    changed = [f"{_flag(key)} {_shown(saved[key])} (now {_shown(asked[key])})"
               for key in sorted(set(saved) & set(asked)) if saved[key] != asked[key]]
    if changed:
        raise CheckpointError(
            f"{path}: this checkpoint was trained with other settings: {'; '.join(changed)}. Resume with the "
            "run's own settings (its train_config.json records the command), or start a new run in another --output-dir")


def _flag(key: str) -> str:
    # The process count is the launcher's, not train.py's.
    return "accelerate launch --num_processes" if key == "num_processes" else f"--{key.replace('_', '-')}"


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def verify_checkpoint(path: Path, *, checksums: bool = True) -> dict[str, Any]:
    """Check every file against the manifest (only that they exist without ``checksums``); return the
    trainer state."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MANIFEST}); it was interrupted while saving")
    try:
        files = json.loads(manifest_path.read_text())["files"]
        if not isinstance(files, dict) or TRAINER_STATE not in files:
            raise ValueError(f"no checksum list naming {TRAINER_STATE}")
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({err})") from None
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: corrupted checkpoint: {name} is missing")
        if checksums and _sha256(file) != expected:
            raise CheckpointError(f"{path}: corrupted checkpoint: {name} does not match its checksum")
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
    except ValueError as err:
        raise CheckpointError(f"{path / TRAINER_STATE}: unreadable ({err})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / TRAINER_STATE}: not a training state")
    return state


def load_tensors(path: Path, name: str, *, legacy_index: int | None = None) -> dict[str, torch.Tensor] | None:
    """``NAME.safetensors`` of a checkpoint; for one written before those files existed, the state
    accelerate pickled as ``custom_checkpoint_{legacy_index}.pkl``, read with ``weights_only=True``
    (tensors and plain values only, never code). None if the checkpoint holds neither."""
    path = Path(path)
    if (path / f"{name}.safetensors").is_file():
        return load_file(str(path / f"{name}.safetensors"))
    return legacy_state(path, legacy_index) if legacy_index is not None else None


def legacy_state(path: Path, index: int) -> dict[str, Any] | None:
    """A state accelerate's ``register_for_checkpointing`` wrote (older checkpoints), loaded safely."""
    legacy = Path(path) / f"custom_checkpoint_{index}.pkl"
    if not legacy.is_file():
        return None
    try:
        return torch.load(legacy, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - anything but tensors and plain values is refused
        raise CheckpointError(f"{legacy}: cannot be read as tensors and plain values ({type(err).__name__}); "
                              "it is not loaded, since unpickling it could run code") from None
