"""The output folder's policy: it holds one run only, held by that run while it trains, continued with
--resume-from-checkpoint or cleared with --overwrite-output-dir. Decided on rank 0, before any decoding,
so a refusal costs nothing."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from accelerate.utils import broadcast_object_list

from . import checkpoints as ckpt
from .atomic import writable_target
from .errors import ChestModelError
from .hub import MODEL_FILES, MODEL_RECORDS
from .train_config import TrainingConfig

logger = logging.getLogger("chest_model.training")

# What only a training run writes in its folder (at its end; checkpoints and the model during it).
RUN_RECORDS = ("train_config.json", "history.json")
TRACKER_PROJECT = "chest-xray-classifier"  # the trackers' folder in --output-dir (TensorBoard's event files)


@contextlib.contextmanager
def claim_output_dir(args: TrainingConfig, accelerator) -> Iterator[None]:
    """:func:`prepare_output_dir`, and the folder held for this run until the block ends: a second run
    into it (the same command started twice, or --overwrite-output-dir while a run still writes there)
    stops before it reads or deletes anything."""
    lock, problem = None, None
    try:
        if accelerator.is_main_process:
            try:
                lock = lock_output_dir(Path(args.output_dir))
            except ckpt.CheckpointError as err:
                problem = str(err)
        prepare_output_dir(args, accelerator, problem=problem)
        yield
    finally:
        if lock is not None:
            lock.close()  # closing the file releases the lock; a killed process's is released by the kernel


def lock_output_dir(output_dir: Path):
    """An open file holding an exclusive ``flock`` for ``output_dir`` (None where there is no flock).

    The lock file lives in the temporary folder, named by the folder's resolved path, so the output
    folder gets nothing that is not the run's. It is advisory and local: it stops a second run on this
    machine, not one on another machine writing to a shared disk.
    """
    try:
        import fcntl
    except ImportError:  # Windows: the folder policy alone guards the folder
        return None
    locks = Path(tempfile.gettempdir()) / f"chest-model-runs-{os.getuid()}"
    name = hashlib.sha256(str(output_dir.resolve()).encode()).hexdigest()[:32]
    try:
        locks.mkdir(mode=0o700, exist_ok=True)
        handle = open(locks / f"{name}.lock", "a+")
    except OSError as err:  # no writable temporary folder: run unguarded rather than not at all
        logger.warning("cannot lock --output-dir %s against a second run (%s)", output_dir, err)
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ckpt.CheckpointError(f"--output-dir {output_dir}: another training run ({holder}) is writing to it; "
                                   "wait for it to end, or choose another --output-dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle


def prepare_output_dir(args: TrainingConfig, accelerator, problem: str | None = None) -> None:
    """Before any work: the output folder holds this run only. An earlier run there (checkpoints or a
    saved model) is continued with --resume-from-checkpoint or cleared with --overwrite-output-dir
    (by :func:`clear_for_overwrite`, once the data has passed its checks); a checkpoint is resumed in
    its own run's folder, where that run's best weights are. ``problem``: one rank 0 already found."""
    if accelerator.is_main_process and problem is None:  # one rank decides, all act on it
        problem = output_dir_problem(args, accelerator.num_processes)
    box = [problem]
    if accelerator.num_processes > 1:
        broadcast_object_list(box, from_process=0)
    if box[0]:
        raise ckpt.CheckpointError(box[0])


def clear_for_overwrite(args: TrainingConfig, accelerator) -> None:
    """--overwrite-output-dir: the earlier run goes only now, when the new one's data has been read,
    so a mistake in the new command leaves the old run as it was."""
    if args.overwrite_output_dir and accelerator.is_main_process:
        clear_earlier_run(Path(args.output_dir))
    accelerator.wait_for_everyone()


def output_dir_problem(args: TrainingConfig, num_processes: int = 1) -> str | None:
    output_dir = Path(args.output_dir)
    try:  # a file, a file above it, a read-only folder or parent, a mount point: found now, not at the first save
        writable_target(output_dir)
    except ChestModelError as err:
        return f"--output-dir {err}"
    checkpoints_dir = output_dir / "checkpoints"
    if args.resume_from_checkpoint and args.overwrite_output_dir:
        return "--resume-from-checkpoint continues a run and --overwrite-output-dir starts over: give one of them"
    if args.resume_from_checkpoint not in (None, "latest"):
        path = Path(args.resume_from_checkpoint)
        if path.is_dir() and path.resolve() in (output_dir.resolve(), checkpoints_dir.resolve()):
            return (f"{path}: not a checkpoint folder; name one of {checkpoints_dir}/step_NNNNNNNN, "
                    "or pass --resume-from-checkpoint latest")
        if path.is_dir() and path.resolve().parent != checkpoints_dir.resolve():
            return (f"{path}: resume a checkpoint in its own run's folder (--output-dir {path.parent.parent}): "
                    "that folder holds the run's best weights so far")
    if args.resume_from_checkpoint:
        return resume_problem(args, num_processes)
    earlier = [p.name for p in ckpt.list_checkpoints(checkpoints_dir)] + _earlier_run_files(output_dir)
    if not earlier or earlier == ["model.safetensors"]:
        # Files a run writes, in a folder no run (and no model of ours) wrote: someone else's, which
        # neither a run nor --overwrite-output-dir may replace.
        theirs = [name for name in (*MODEL_FILES, *MODEL_RECORDS) if (output_dir / name).exists()]
        if theirs:
            return (f"{output_dir}: holds {', '.join(theirs)}, which are not a chest X-ray model's or a training "
                    "run's; a run would replace them: choose another --output-dir")
        return None
    if not args.overwrite_output_dir:
        return (f"{output_dir}: holds an earlier run ({', '.join(earlier)}). Continue it with "
                "--resume-from-checkpoint latest, pass --overwrite-output-dir to start over (its checkpoints, "
                "model and records are deleted), or choose another --output-dir")
    return None


def _earlier_run_files(output_dir: Path) -> list[str]:
    """The files by which a run (or a model of ours) is known to have been saved here."""
    found = [name for name in (*RUN_RECORDS, "model.safetensors") if (output_dir / name).is_file()]
    return found + ["config.json"] if _holds_our_config(output_dir) else found


def _holds_our_config(folder: Path) -> bool:
    from .config import ChestXrayConfig, ConfigError

    try:
        ChestXrayConfig.load(folder / "config.json")
    except ConfigError:
        return False
    return True


def resume_problem(args: TrainingConfig, num_processes: int) -> str | None:
    """What a resume would refuse, found before any decoding: a missing checkpoint, one of other
    settings, or a finished run with no checkpoint (which 'latest' would silently train over).
    Checksums are verified when it is loaded."""
    output_dir = Path(args.output_dir)
    try:
        path = ckpt.resolve_checkpoint(args.resume_from_checkpoint, output_dir / "checkpoints", quiet=True)
        if path is None:
            if (output_dir / "history.json").is_file():
                return (f"{output_dir}: holds a finished run but no checkpoint to continue from (was it trained with "
                        "--checkpointing-steps none?). Pass --overwrite-output-dir to start over, or choose another --output-dir")
            earlier = _earlier_run_files(output_dir)
            if earlier:
                # 'latest' would start from scratch over it, with whatever settings this command gives
                shown = [name for name in earlier if name != "config.json"] or earlier
                return (f"{output_dir}: holds an earlier run ({', '.join(shown)}) but no checkpoint "
                        "to continue from. Pass --overwrite-output-dir instead to start over, or choose another --output-dir")
            return None
        state = ckpt.verify_checkpoint(path, checksums=False)
        ckpt.check_same_recipe(path, state.get("recipe"), {**args.recipe(), "num_processes": num_processes})
        started = int(state.get("epoch", 0)) + (1 if state.get("step_in_epoch") else 0)
        if args.epochs < started:  # the weights already went further than the run would end
            return (f"{path}: has trained {started} epoch(s) (the last one {'in part' if state.get('step_in_epoch') else 'whole'}); "
                    f"resume with --epochs {started} or more")
    except ckpt.CheckpointError as err:
        return str(err)
    return None


def clear_earlier_run(output_dir: Path) -> None:
    """--overwrite-output-dir: an earlier run's checkpoints, model, records and tracker logs go; nothing
    of it stays beside the new run's weights."""
    names = ["checkpoints", TRACKER_PROJECT, *MODEL_FILES, *MODEL_RECORDS]
    found = [name for name in names if (output_dir / name).exists()]
    if found:
        logger.warning("--overwrite-output-dir: deleting the earlier run's %s in %s", ", ".join(found), output_dir)
    for name in found:
        path = output_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


