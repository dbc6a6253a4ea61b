"""The training recipe behind ``train.py``: arguments, then ``main`` composing small steps.

Runs unchanged on CPU, one GPU or several (``accelerate launch``). Reads top to bottom as
``main(argv)``: the arguments parse into a typed ``TrainingConfig`` (``chest_model.train_config``),
then small steps in the style of torchvision's reference trainer:
data -> model -> loop -> choose -> calibrate -> save.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import platform
import shlex
import shutil
import signal
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DataLoaderConfiguration, broadcast_object_list, set_seed
from safetensors.torch import load_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from . import checkpoints as ckpt
from .atomic import atomic_write_text
from .calibrate import calibrate
from .config import DEFAULT_CLASS_NAMES, ChestXrayConfig
from .data import (BalancedSampler, CachedImageDataset, DatasetError, build_train_augmentation, decode_folder,
                   folders_shared_with_training,
                   parse_data_dirs, relative_message, relative_name, scan_image_folder, scan_sources, stratified_split)
from .duplicates import MAX_DISTANCE, cached_image_hashes, copies_across_labels, copies_by_class, nearest
from .engine import Predictions, grouped_metrics, metrics_from_logits, predict_logits, train_one_epoch, unlearned_groups
from .errors import ChestModelError
from .evaluation import evaluate_external, evaluate_model, hash_training_files
from .feature_ood import BUFFER_PREFIX
from .hub import WEIGHTS_NAME, HubUploadError, save_model_folder
from .model import ChestXrayClassifier
from .precision import PrecisionChoice, choose_precision, preferred_memory_format
from .preprocess import ImageLoadError
from .run_folder import TRACKER_PROJECT, claim_output_dir, clear_for_overwrite
from .runtime import GracefulStop, Interrupted, available_cores, preimport, tune_allocator
from .subgroups import BLANK, NOT_LISTED, SubgroupError, SubgroupTable, read_subgroup_table
from .train_config import TrainingConfig, parse_config

logger = logging.getLogger("chest_model.training")


def main(argv: list[str] | None = None) -> int:
    args = parse_config(argv)
    command = launch_command(sys.argv[1:] if argv is None else argv)
    try:
        return train(args, command)
    except Interrupted as stop:
        return 128 + stop.signum
    except ChestModelError as err:  # bad data, a checkpoint that does not fit: the message says it all
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # outside the epochs (decoding, the final evaluation); inside them, a checkpoint is saved
        print("interrupted", file=sys.stderr, flush=True)
        return 130


def launch_command(argv: list[str]) -> str:
    """The command that reproduces this run, the launcher and its flags included."""
    script = "train.py " + " ".join(shlex.quote(a) for a in argv)
    if "ACCELERATE_DYNAMO_BACKEND" not in os.environ:  # set by `accelerate launch`, not by `python`
        return "python " + script
    flags = []
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        flags += ["--multi_gpu", "--num_processes", str(world_size)]
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision != "no":
        flags += ["--mixed_precision", precision]
    return " ".join(["accelerate launch", *flags, script])


def train(args: TrainingConfig, command: str) -> int:
    tune_allocator()
    accelerator = make_accelerator(args)
    with claim_output_dir(args, accelerator):  # held until the run ends
        set_seed(args.seed)
        class_names = list(args.class_names or DEFAULT_CLASS_NAMES)
        config = ChestXrayConfig(class_names=class_names, image_size=args.image_size, backbone=args.backbone, dropout=args.dropout,
                                 contrast=args.contrast)
        sources = parse_data_dirs(args.data_dir)
        folders = scan_data(args, sources, class_names)
        files = data_fingerprint(folders, args.metadata)
        check_resume_data(args, files)  # before decoding
        model = build_model(args, config)  # fail fast on missing weights, before spending time decoding
        data = dataclasses.replace(decode_data(args, folders, model.preprocessor), files=files)
        clear_for_overwrite(args, accelerator)
        run = prepare_run(args, accelerator, model, data, command)
        best_val = run_epochs(run)
        model, best_val = chosen_model(run, best_val)
        if accelerator.is_main_process:
            val_metrics = calibrate_chosen(run, model, best_val)
            test_metrics, external = evaluate_held_out(run, model)
            save_outputs(run, model, val_metrics, test_metrics, external)
        finish(run)
        return 0


def make_accelerator(args: TrainingConfig):
    # accelerate picks the device (CUDA, MPS, XPU, ...). Only where torch sees no accelerator at all is
    # the CPU named: `--multi_gpu` then joins the processes in a gloo group instead of running each alone.
    # The other processes wait at a barrier while rank 0 evaluates, saves and uploads the final model;
    # torch's default timeout (10 minutes with NCCL) would kill a run whose upload or test set takes longer.
    state = PartialState(cpu=not torch.accelerator.is_available(), timeout=FINAL_WORK_TIMEOUT)
    precision = resolve_precision(args.mixed_precision, state.device, resumed=resumed_precision(args))
    if state.num_processes > 1:  # all processes train in one precision: rank 0's (possibly timed) choice
        precision = broadcast_object_list([precision], from_process=0)[0]
    accelerator = Accelerator(
        mixed_precision=precision.mixed_precision,
        gradient_accumulation_steps=args.grad_accum,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=str(args.output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    accelerator.precision_choice = precision
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per checkpoint file is noise
    if accelerator.device.type == "cpu":
        # `accelerate launch` without a config sets OMP_NUM_THREADS=1, which halves CPU training speed.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        torch.set_num_threads(args.cpu_threads or max(1, available_cores() // local))
    logger.info("precision: %s (%s)", precision.precision, precision.reason)
    if precision.precision == "bf16" and not precision.bf16_fast:
        warnings.warn(f"bf16 was asked for, but it will run slower than fp32 here: {precision.reason}. "
                      "Leave the precision unset (or pass --mixed-precision no) for the fast choice.")
    if precision.precision == "fp16" and accelerator.device.type == "cpu":
        warnings.warn("fp16 was asked for on a CPU: CPUs compute it slowly or emulate it, so expect it to run slower "
                      "than fp32. Leave the precision unset (or pass --mixed-precision no) for the fast choice.")
    if accelerator.device.type == "cuda":
        warnings.warn("On GPU, VGG's adaptive-pool backward is nondeterministic: runs with the same seed can differ slightly.")
    if args.sync_bn and accelerator.num_processes > 1 and accelerator.device.type != "cuda":
        raise SettingsError(f"--sync-bn needs CUDA GPUs (torch's SyncBatchNorm); these {accelerator.num_processes} "
                            f"processes run on {accelerator.device.type}. Leave --sync-bn out there.")
    if args.sync_bn and args.backbone != "vgg19_bn":
        warnings.warn(f"--sync-bn: --backbone {args.backbone} has no BatchNorm to synchronise; it changes nothing.")
    return accelerator


class SettingsError(ChestModelError, ValueError):
    """Settings that cannot run together on this machine; the message says which."""


def memory_format_of(accelerator) -> torch.memory_format:
    return preferred_memory_format(accelerator.device, accelerator.precision_choice.precision)


def resolve_precision(requested: str, device, resumed: str | None = None):
    """The run's precision: what was asked for (here or through `accelerate launch`), else the one the
    resumed checkpoint trained in, else the fast one."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")  # accelerate's default, "no", counts as not asked
    if requested == "auto" and launcher != "no":
        requested = launcher
    if requested == "auto" and resumed in ("bf16", "fp32"):
        # Not timed again: on a busy machine the timing can come out the other way, and a run that
        # changes precision halfway no longer matches the same run uninterrupted.
        return PrecisionChoice(resumed, f"auto: {resumed}, as the checkpoint being resumed was trained", resumed == "bf16")
    if requested == "fp16":
        return PrecisionChoice("fp16", "asked for fp16", False)
    return choose_precision(device, requested)


# ---- data --------------------------------------------------------------------------------------


@dataclass
class Split:
    """Decoded, resized uint8 images of one split, with their classes and sources."""

    images: torch.Tensor
    labels: list[int]
    sources: list[int]
    source_names: list[str]
    chroma: list[float]  # of each decoded image, for the colour check's threshold
    paths: list[Path] = field(default_factory=list)

    def take(self, indices: list[int]) -> Split:
        return Split(self.images[indices], [self.labels[i] for i in indices], [self.sources[i] for i in indices],
                     self.source_names, [self.chroma[i] for i in indices], [self.paths[i] for i in indices] if self.paths else [])

    def counts(self, class_names: list[str]) -> dict[str, int]:
        return {name: self.labels.count(i) for i, name in enumerate(class_names)}

    def group_names(self, class_names: list[str]) -> list[str]:
        """Each image's "source / class" group."""
        return [f"{self.source_names[s]} / {class_names[c]}" for s, c in zip(self.sources, self.labels)]

    def counts_by_source(self, class_names: list[str]) -> dict[str, dict[str, int]]:
        return {source: {name: sum(1 for l, s in zip(self.labels, self.sources) if (l, s) == (i, k)) for i, name in enumerate(class_names)}
                for k, source in enumerate(self.source_names) if k in self.sources}


@dataclass
class TrainingData:
    train: Split
    val: Split
    skipped: list[str] = field(default_factory=list)
    files: dict[str, Any] = field(default_factory=dict)  # data_fingerprint of the folders scanned
    metadata: SubgroupTable | None = None  # --metadata, read for --balance-by


def scan_data(args: TrainingConfig, sources, class_names: list[str]) -> dict[str, Any]:
    """Every folder of the run, scanned; all problems reported together before any decoding."""
    folders, problems = {}, []
    folders["train"], problems = scan_sources(sources, class_names)
    held_out = [(f"--{split}-dir", getattr(args, f"{split}_dir")) for split in ("val", "test") if getattr(args, f"{split}_dir")]
    problems += folders_shared_with_training(sources, held_out + [(f"--external-dir {name}", path)
                                                                  for name, path in _named(args.external_dir)])
    for split in ("val", "test"):
        path = getattr(args, f"{split}_dir")
        if path:
            # Validation from one training source is that source's, whatever its folder is called.
            name = sources[0][0] if split == "val" and len(sources) == 1 else None
            folders[split], more = scan_image_folder(path, class_names, name=name)
            problems += more
    folders["held_out"] = [(f"--test-dir {args.test_dir}", folders["test"])] if "test" in folders else []
    for name, path in _named(args.external_dir):  # checked now, not after the training
        external, more = scan_image_folder(path, class_names, partial=True, name=name)
        problems += more
        folders["held_out"].append((f"--external-dir {name}", external))
    if args.balance_by:  # read now, so that a wrong CSV or column stops the run before any decoding
        try:
            folders["metadata"] = read_subgroup_table(args.metadata, [args.balance_by])
        except SubgroupError as error:
            problems.append(f"--metadata: {error}")
    if problems:
        raise DatasetError("cannot train, the data has problems:\n  - " + "\n  - ".join(problems))
    return folders


def decode_data(args: TrainingConfig, folders: dict[str, Any], preprocessor) -> TrainingData:
    """Decode and resize every training and validation file once; split off validation if needed."""
    start = time.perf_counter()
    splits, bad = {}, []
    for name in ("train", "val"):
        folder = folders.get(name)
        if folder is None:
            continue
        images, errors, chromas = decode_folder(folder.paths, preprocessor)
        keep = [i for i, e in enumerate(errors) if e is None]
        bad += [e for e in errors if e is not None]
        splits[name] = Split(images[keep], [folder.labels[i] for i in keep], [folder.sources[i] for i in keep],
                             folder.source_names, [chromas[i] for i in keep], [folder.paths[i] for i in keep])
    # The held-out sets are evaluated after training: their unreadable files are found now, with the others.
    held_out_bad = [f"{flag}: {error}" for flag, folder in folders.get("held_out", [])
                    for error in unreadable_held_out(flag, folder, preprocessor)]
    if (bad or held_out_bad) and not args.skip_bad_files:
        raise DatasetError(f"cannot train, {len(bad) + len(held_out_bad)} file(s) cannot be read (use --skip-bad-files to "
                           "leave them out):\n  - " + "\n  - ".join(bad + held_out_bad))
    for message in bad:
        logger.warning("skipped: %s", message)
    for message in held_out_bad:
        logger.warning("left out of its evaluation: %s", message)
    for name, split in splits.items():  # the files left out may have been a whole class's
        empty = [c for i, c in enumerate(folders[name].class_names) if i not in split.labels]
        if empty:
            raise DatasetError(f"cannot train: no readable {name} image of class(es) {empty} is left "
                               f"({len(bad)} unreadable file(s) left out)")
    logger.info("decoded %d images in %.1f s", sum(len(s.labels) for s in splits.values()), time.perf_counter() - start)
    if "val" not in splits:
        pool = splits["train"]
        train_idx, val_idx = stratified_split(pool.labels, args.val_split, args.seed, sources=pool.sources)
        splits["train"], splits["val"] = pool.take(train_idx), pool.take(val_idx)
    return TrainingData(splits["train"], splits["val"], bad, metadata=folders.get("metadata"))


def tally_by_stratum(groups: list[str], strata: list[str], amounts) -> dict[str, dict[str, Any]]:
    """``amounts`` summed per sampling group and --balance-by value."""
    totals: dict[str, dict[str, Any]] = {}
    for group, stratum, amount in zip(groups, strata, amounts):
        totals.setdefault(group, {}).setdefault(stratum, 0)
        totals[group][stratum] += amount
    return totals


def strata_draw_shares(sampler: BalancedSampler, groups: list[str], strata: list[str]) -> dict[str, dict[str, float]]:
    """The share of all draws that each (group, --balance-by value) gets from the sampler's own weights."""
    return tally_by_stratum(groups, strata, (sampler.weights / sampler.weights.sum()).tolist())


def sampling_strata(args: TrainingConfig, data: TrainingData, class_names: list[str]) -> tuple[list[str] | None, dict]:
    """Each training image's --balance-by value (files the CSVs do not list share one value), and how many
    images of each value every sampling group holds, for the log and the run's record."""
    if not args.balance_by:
        return None, {}
    try:
        rows = data.metadata.rows_for(data.train.paths)
    except SubgroupError as err:
        raise DatasetError(f"--metadata: {err}") from None
    if all(row is None for row in rows):
        raise DatasetError(f"--balance-by {args.balance_by}: none of the {len(rows)} training images is listed in "
                           f"{', '.join(args.metadata)} (its 'file' column must hold each image's path or its last parts, "
                           "such as Normal/x.png)")
    strata = [NOT_LISTED if row is None else (row[args.balance_by] or BLANK) for row in rows]
    return strata, tally_by_stratum(data.train.group_names(class_names), strata, [1] * len(strata))


def unreadable_held_out(flag: str, folder, preprocessor) -> list[str]:
    """Each file of a held-out set that cannot be decoded, by name and problem; a set with no readable
    file at all stops the run now (it could not be evaluated after training)."""
    def problem(path) -> str | None:
        try:
            preprocessor.load(path)
        except ImageLoadError as err:
            return relative_message(str(err), path, folder.root)
        return None

    with ThreadPoolExecutor(max_workers=4) as pool:  # as the training files are decoded: OpenCV frees the GIL
        errors = [e for e in pool.map(problem, folder.paths) if e is not None]
    if errors and len(errors) == len(folder.paths):
        raise DatasetError(f"{flag}: none of the {len(folder.paths)} image files in {folder.root} can be read, so it "
                           "could not be evaluated after training; fix or remove it")
    return errors


def build_model(args: TrainingConfig, config: ChestXrayConfig):
    return ChestXrayClassifier.from_imagenet(config) if args.weights == "imagenet" else ChestXrayClassifier(config)


# ---- the run -----------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything the loop and the final steps share."""

    args: TrainingConfig
    accelerator: Any
    model: Any
    preprocessor: Any
    optimizer: Any
    scheduler: Any
    train_set: Any
    train_loader: Any
    val_loader: Any
    data: TrainingData
    class_weights: torch.Tensor | None
    record: dict[str, Any]
    state: dict[str, Any]
    select_metric: str
    memory_format: torch.memory_format = torch.channels_last
    logit_offset: torch.Tensor | None = None  # log of the sampler's class prior, added to the logits in the loss
    ema: AveragedModel | None = None  # with --ema-decay: the averaged weights, which are validated, chosen and saved

    @property
    def evaluated_model(self):
        """The weights the run saves (and validates): the moving average if there is one."""
        return self.ema.module if self.ema is not None else self.accelerator.unwrap_model(self.model)

    @property
    def output_dir(self) -> Path:
        return Path(self.args.output_dir)

    @property
    def class_names(self) -> list[str]:
        return self.record["class_names"]


def prepare_run(args: TrainingConfig, accelerator, model, data: TrainingData, command: str) -> Run:
    class_names = model.class_names
    train_set = CachedImageDataset(data.train.images, data.train.labels, seed=args.seed,
                                   transform=build_train_augmentation(args.augment, model.preprocessor))
    val_set = CachedImageDataset(data.val.images, data.val.labels)
    sampler = None
    strata, strata_counts = sampling_strata(args, data, class_names)
    for group, counts in strata_counts.items():
        if len(counts) > 1:
            logger.info("sampling: %s drawn equally by %s: %s", group, args.balance_by,
                        ", ".join(f"{value} ({n} images)" for value, n in sorted(counts.items())))
        if NOT_LISTED in counts and len(counts) > 1:  # often a path the CSV spells differently
            logger.warning("%s: %d of its %d training images are not in %s; they are drawn as one more %s value",
                           group, counts[NOT_LISTED], sum(counts.values()), ", ".join(args.metadata), args.balance_by)
    if args.sampling != "shuffle":
        by = {"balanced": "class", "groups": "group", "within-source": "source"}[args.sampling]
        sampler = BalancedSampler(data.train.labels, data.train.sources, seed=args.seed, by=by, strata=strata)
    loader_kwargs = {"num_workers": args.num_workers, "persistent_workers": False}
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler, **loader_kwargs)
    val_loader = DataLoader(val_set, batch_size=args.batch_size * 2, shuffle=False, **loader_kwargs)

    preprocessor = model.preprocessor
    memory_format = memory_format_of(accelerator)
    if args.sync_bn and accelerator.num_processes > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same tensors, so it saves as plain BatchNorm
    model = model.to(memory_format=memory_format)
    ema = weight_average(model, args.ema_decay, accelerator.device)
    raw_optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, raw_optimizer, train_loader, val_loader)
    steps_per_epoch = math.ceil(len(train_loader) / args.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(raw_optimizer, _schedule(args, steps_per_epoch))
    class_weights = None
    if args.class_weights == "balanced":
        n = torch.bincount(torch.tensor(data.train.labels), minlength=len(class_names)).float()
        class_weights = n.sum() / (len(class_names) * n.clamp(min=1))
    # Logit adjustment (Menon et al., 2021): training on log-prior-shifted logits leaves the model's
    # own logits calibrated to a uniform class prior. Only group sampling leaves a non-uniform prior.
    sampled_prior = sampler.class_prior(len(class_names)) if sampler is not None else None
    logit_offset = sampled_prior.clamp(min=1e-12).log().float() if args.sampling == "groups" else None
    if args.report_to != "none":
        accelerator.init_trackers(TRACKER_PROJECT, config=args.scalars())
    select = args.select_metric
    if select == "auto":
        select = "group_recall" if len(set(data.val.sources)) > 1 else "macro_f1"
    record = run_record(args, accelerator, data, class_names, command, select, memory_format)
    if sampled_prior is not None:
        record["sampled_class_prior"] = dict(zip(class_names, sampled_prior.tolist()))
    if strata_counts:
        record["sampling_strata"] = {"column": args.balance_by, "images": strata_counts,
                                     "draw_share": strata_draw_shares(sampler, data.train.group_names(class_names), strata)}
    run = Run(args, accelerator, model, preprocessor, optimizer, scheduler, train_set, train_loader, val_loader, data,
              class_weights, record, {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "history": [], "best": None,
                                        "recipe": {**args.recipe(), "num_processes": accelerator.num_processes},
                                        "precision": accelerator.precision_choice.precision,
                                        "data": data.files,
                                        "commands": [command]}, select,
              memory_format, logit_offset, ema)
    resume(run)
    return run


def weight_average(model, decay: float, device) -> AveragedModel | None:
    """An exponential moving average of the weights and BatchNorm statistics (as timm's ModelEma).

    Averaging over the last few hundred steps smooths out where the last noisy steps left the
    weights, so the epoch chosen on a small validation split depends less on that noise.
    """
    if not decay:
        return None
    return AveragedModel(model, device=device, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def run_record(args, accelerator, data: TrainingData, class_names: list[str], command: str, select: str,
               memory_format: torch.memory_format) -> dict[str, Any]:
    """What the run was, for train_config.json and the model card."""
    counts = {"train": data.train.counts(class_names), "val": data.val.counts(class_names)}
    if args.test_dir:
        counts["test"] = scan_image_folder(args.test_dir, class_names)[0].counts()
    for split, c in counts.items():
        logger.info("%s: %s", split, c)
    return {
        "command": command,
        "data_dir": [str(d) for d in args.data_dir] if len(args.data_dir) > 1 else str(args.data_dir[0]),
        "sources": data.train.source_names,
        "val_dir": args.val_dir,
        "test_dir": args.test_dir,
        "external_dirs": list(args.external_dir),
        "data_counts": counts,
        "data_counts_by_source": {"train": data.train.counts_by_source(class_names), "val": data.val.counts_by_source(class_names)},
        "class_names": class_names,
        "world_size": accelerator.num_processes,
        "device": str(accelerator.device.type),
        "distributed_type": str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type)),
        "mixed_precision": accelerator.mixed_precision,
        "precision_reason": accelerator.precision_choice.reason,
        "memory_format": "channels_last" if memory_format is torch.channels_last else "contiguous",
        "cpu_threads_per_process": torch.get_num_threads() if accelerator.device.type == "cpu" else None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name(accelerator.device) if accelerator.device.type == "cuda" else None,
        # fp32 on an Ampere or newer GPU runs its convolutions (and, where enabled, matmuls) in TF32.
        "tf32": ({"convolutions": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}
                 if accelerator.device.type == "cuda" else None),
        "epochs": args.epochs,
        "selection_metric": select,
        "hyperparameters": {
            "backbone": args.backbone, "weights": args.weights, "image_size": args.image_size, "contrast": args.contrast,
            "batch_size_per_process": args.batch_size, "global_batch_size": args.batch_size * accelerator.num_processes * args.grad_accum,
            "lr": args.lr, "momentum": args.momentum, "weight_decay": args.weight_decay, "lr_scheduler": args.lr_scheduler,
            "warmup_epochs": args.warmup_epochs, "class_weights": args.class_weights, "grad_accum": args.grad_accum,
            "dropout": args.dropout, "augment": args.augment, "sampling": args.sampling, "balance_by": args.balance_by, "seed": args.seed, "optimizer": "SGD",
            "ema_decay": args.ema_decay, "sync_bn": args.sync_bn,
        },
        "skipped_files": data.skipped,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }


def data_fingerprint(folders: dict[str, Any], metadata: list[str] | None = None) -> dict[str, Any]:
    """Which files the training folders (and --val-dir) hold, by absolute path and size, as a digest; and
    the --metadata CSVs' contents (they decide what --balance-by draws)."""
    def size(path) -> int:
        try:
            return os.path.getsize(path)
        except OSError:  # a broken link: decoding names it (and --skip-bad-files leaves it out)
            return -1

    def digest(folder) -> dict[str, Any]:
        entries = sorted(f"{os.path.abspath(p)}\t{size(p)}" for p in folder.paths)
        return {"n": len(entries), "sha256": hashlib.sha256("\n".join(entries).encode()).hexdigest()}
    found = {split: digest(folders[split]) for split in ("train", "val") if split in folders}
    if metadata:
        contents = hashlib.sha256()
        for csv in metadata:
            contents.update(Path(csv).read_bytes() + b"\0")
        found["metadata"] = {"n": len(metadata), "sha256": contents.hexdigest()}
    return found


def check_same_data(path: Path, saved: dict[str, Any] | None, now: dict[str, Any]) -> None:
    """A resume trains on the files its checkpoint did: other files would change what an epoch is and,
    without --val-dir, redraw the validation split with images already trained on in it."""
    if saved is None or saved == now:  # a checkpoint from before files were recorded passes
        return
    flags = {"train": "--data-dir", "val": "--val-dir", "metadata": "--metadata"}
    changes = []
    # Only what the checkpoint recorded: one from before the CSVs were recorded is not refused for them.
    for split in sorted(set(saved) | (set(now) - {"metadata"})):
        before, after = saved.get(split, {"n": 0}), now.get(split, {"n": 0})
        if before != after:
            changes.append(f"{flags[split]}: {before['n']} files, now {after['n']}" if before["n"] != after["n"]
                           else f"{flags[split]}: the CSVs' contents changed" if split == "metadata"
                           else f"{flags[split]}: as many files, but not the same ones, or not the same sizes")
    if not changes:
        return
    redraw = "" if "val" in now else (", and other files would redraw the validation split with images "
                                      "already trained on in it")
    raise ckpt.CheckpointError(
        f"{path}: the data folders no longer hold the files this checkpoint trained on ({'; '.join(changes)}). "
        f"A resume must train on the same files{redraw}. Put the files back as they were, or start a new run in "
        "another --output-dir")


def resumed_precision(args: TrainingConfig) -> str | None:
    """The precision the checkpoint to resume was trained in, where it says (None: no checkpoint, or older)."""
    if not args.resume_from_checkpoint:
        return None
    try:
        path = ckpt.resolve_checkpoint(args.resume_from_checkpoint, Path(args.output_dir) / "checkpoints", quiet=True)
        return None if path is None else ckpt.verify_checkpoint(path, checksums=False).get("precision")
    except ChestModelError:  # the resume itself reports it, in its place
        return None


def check_resume_data(args: TrainingConfig, files: dict[str, Any]) -> None:
    """The files (data_fingerprint) checked against the checkpoint to resume."""
    if not args.resume_from_checkpoint:
        return
    path = ckpt.resolve_checkpoint(args.resume_from_checkpoint, Path(args.output_dir) / "checkpoints", quiet=True)
    if path is not None:
        check_same_data(path, ckpt.verify_checkpoint(path, checksums=False).get("data"), files)


def rebuild_split(record: dict, preprocessor) -> tuple[TrainingData, list[tuple[str, Path]]]:
    """A run's training and validation split, rebuilt from its recorded command as this module builds it
    (same folders, seed, fraction and stratification), checked against the counts it recorded."""
    argv = shlex.split(record["command"].split("train.py", 1)[1])
    # Logging is not part of the split, and a tracker the run used may not be installed here.
    argv = [a for i, a in enumerate(argv) if a != "--report-to" and (i == 0 or argv[i - 1] != "--report-to")
            and not a.startswith("--report-to=")]
    args = parse_config(argv)
    sources = parse_data_dirs(args.data_dir)
    folders = scan_data(args, sources, record["class_names"])
    folders["held_out"] = []  # not part of the split: its files are not read
    data = decode_data(args, folders, preprocessor)
    for split in ("train", "val"):
        if getattr(data, split).counts(record["class_names"]) != record["data_counts"][split]:
            raise DatasetError(f"the rebuilt {split} split does not match the run's record; is the data the same?")
    return data, sources


def split_files(split: Split, sources: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """``(SOURCE/relative path, path)`` of each image of a split, as the copies audit names them."""
    if len(split.paths) != len(split.labels):
        raise ValueError(f"a split of {len(split.labels)} images holds {len(split.paths)} paths")
    roots = dict(sources)  # a --val-dir split's source may be none of them: its files are then named bare
    return [(f"{name}/{relative_name(path, roots.get(name, Path(path).parent))}", path)
            for path, name in zip(split.paths, (split.source_names[s] for s in split.sources), strict=True)]


def validation_copies(data: TrainingData, class_names: list[str], hashes: tuple | None = None) -> dict[str, Any]:
    """Validation images that are copies of a training image (the same film; duplicates.py), per class.

    The split is left as it is (the recorded command keeps meaning the same split): the count is
    logged and recorded so that the card can say how far validation flatters the model. ``hashes``:
    the (training, validation) hashes where they are already computed.
    """
    train_hashes, val_hashes = hashes or (cached_image_hashes(data.train.images), cached_image_hashes(data.val.images))
    _, distance = nearest(val_hashes, train_hashes)
    copied = distance <= MAX_DISTANCE
    result = {"n": int(copied.sum()), "of": len(copied), "by_class": copies_by_class(copied, data.val.labels, class_names)}
    if result["n"]:
        logger.warning("%d of %d validation images are copies of a training image (the same film): validation figures "
                       "count them, and overstate what the model does on new patients", result["n"], result["of"])
    return result


def label_conflicts(args: TrainingConfig, data: TrainingData, class_names: list[str], hashes: tuple) -> list[dict[str, Any]]:
    """Films of the training folders (both splits) filed under two classes, by the copies audit's hash: one
    of the two labels is wrong. Both files are named in the log and the record."""
    labels = [*data.train.labels, *data.val.labels]
    val_roots = [(data.val.source_names[0], Path(args.val_dir))] if args.val_dir else _named(args.data_dir)
    names = [name for split, roots in ((data.train, _named(args.data_dir)), (data.val, val_roots))
             for name, _ in split_files(split, roots)]
    conflicts = [{"files": [names[i], names[j]], "classes": [class_names[labels[i]], class_names[labels[j]]], "distance": d}
                 for i, j, d in copies_across_labels(np.concatenate(hashes), labels)]
    if conflicts:
        shown = "; ".join(f"{c['files'][0]} ({c['classes'][0]}) = {c['files'][1]} ({c['classes'][1]})" for c in conflicts[:10])
        logger.warning("%d pair(s) of images in the training folders look like one film (the copies audit's hash) filed "
                       "under two classes: check their labels: %s%s", len(conflicts), shown,
                       f"; and {len(conflicts) - 10} more (train_config.json lists them)" if len(conflicts) > 10 else "")
    return conflicts


FINAL_WORK_TIMEOUT = datetime.timedelta(hours=2)  # the process group's collective timeout
SCHEDULER_STATE = "scheduler"  # key in the checkpoint's trainer_state.json
EMA_STATE = "ema"  # the moving average's tensors: ema.safetensors in each checkpoint


def resume(run: Run) -> None:
    if not run.args.resume_from_checkpoint:
        return
    checkpoints_dir = run.output_dir / "checkpoints"
    path = ckpt.resolve_checkpoint(run.args.resume_from_checkpoint, checkpoints_dir, quiet=not run.accelerator.is_main_process)
    if path is None:
        logger.info("no checkpoint in %s yet; starting from scratch", checkpoints_dir)
        return
    state = ckpt.verify_checkpoint(path)
    ckpt.check_same_recipe(path, state.get("recipe"), run.state["recipe"])  # the files were checked before decoding
    state.setdefault("recipe", run.state["recipe"])  # a checkpoint from before settings were recorded
    state.setdefault("data", run.state["data"])
    # The run's record names the command that started it, and each that resumed it.
    state["commands"] = [*state.get("commands", []), run.record["command"]]
    run.record["command"], run.record["resumed_with"] = state["commands"][0], state["commands"][1:]
    # The precision this run trains in from here (asked for, or kept from the checkpoint by `auto`).
    state["precision"] = run.accelerator.precision_choice.precision
    run.state = state
    if run.accelerator.is_main_process:
        for moved in ckpt.set_aside_later(checkpoints_dir, path):
            logger.warning("%s: a checkpoint after the one resumed from, of the run this resume abandons: set aside, "
                           "so that 'latest' means this run's own", moved)
    run.accelerator.wait_for_everyone()
    run.accelerator.load_state(str(path))
    # The scheduler and the moving average are kept by this module, not accelerate (see checkpoints.py).
    schedule = state.pop(SCHEDULER_STATE, None) or ckpt.legacy_state(path, 0)
    if schedule is None:
        raise ckpt.CheckpointError(f"{path}: holds no learning-rate schedule state")
    run.scheduler.load_state_dict(schedule)
    if run.ema is not None:
        average = ckpt.load_tensors(path, EMA_STATE, legacy_index=1)
        if average is None:
            raise ckpt.CheckpointError(f"{path}: holds no moving average of the weights for --ema-decay")
        run.ema.load_state_dict(average)
    logger.info("resumed from %s (epoch %d, batch %d)", path, run.state["epoch"] + 1, run.state["step_in_epoch"])


def checkpoint(run: Run, epoch: int, step_in_epoch: int, epoch_so_far: dict[str, float] | None = None) -> None:
    """``epoch_so_far``: a mid-epoch checkpoint's running totals of that epoch (see engine.train_one_epoch)."""
    run.state.update(epoch=epoch, step_in_epoch=step_in_epoch, global_step=epoch * len(run.train_loader) + step_in_epoch,
                     epoch_so_far=epoch_so_far if step_in_epoch else None)
    ckpt.save_checkpoint(run.accelerator, run.output_dir / "checkpoints", run.state["global_step"],
                         {**run.state, SCHEDULER_STATE: run.scheduler.state_dict()}, keep=run.args.checkpoints_total_limit,
                         tensors=None if run.ema is None else {EMA_STATE: run.ema.state_dict()})


def run_epochs(run: Run) -> Predictions | None:
    """Train every remaining epoch; keep the best by the selection metric. Returns its validation pass (or None)."""
    best_val = None
    preimports = preimport("sklearn.metrics", "matplotlib.pyplot")
    with GracefulStop() as stop:
        for epoch in range(run.state["epoch"], run.args.epochs):
            row, val_pass = one_epoch(run, epoch, stop)
            if is_better(row, run.state["best"], run.select_metric):
                run.state["best"] = {"epoch": epoch + 1, "metric": run.select_metric, "value": row[f"val_{run.select_metric}"],
                                     "val_loss": row["val_loss"]}
                best_val = val_pass  # reused for calibration and the feature gate: no extra pass
                if run.accelerator.is_main_process and epoch + 1 < run.args.epochs:  # the final save writes the last epoch
                    # The records of an earlier finish (a run extended with more epochs) describe other weights.
                    save_model_folder(run.evaluated_model, run.output_dir, drop_records=True,
                                      card_context={"training": {**run.record, "best_epoch": epoch + 1,
                                                                 "in_progress": {"epochs_done": epoch + 1}}})
                run.accelerator.wait_for_everyone()
            if run.args.checkpointing_steps != "none":
                checkpoint(run, epoch + 1, 0)
        # A signal during the last epoch's validation or checkpoint stops here, before the final work.
        signum = stop.requested(run.accelerator)
        if signum:
            if run.args.checkpointing_steps == "none":
                checkpoint(run, run.args.epochs, 0)
            logger.warning("%s received after the last epoch: its checkpoint is saved; stopping before the final "
                           "evaluation (resume with --resume-from-checkpoint latest to finish)", signal.Signals(signum).name)
            raise Interrupted(signum)
    if run.state["best"] is None:
        raise RuntimeError("no epoch was trained (is --epochs 0, or was the run already complete?)")
    # After a short run the thread may still be inside matplotlib.pyplot, which then sits half-built in
    # sys.modules, and matplotlib.use() (in the figures module) fails on it.
    preimports.join()
    return best_val


def is_better(row: dict[str, Any], best: dict[str, Any] | None, metric: str) -> bool:
    """Higher selection metric wins; ties go to the lower validation loss."""
    if best is None:
        return True
    return (row[f"val_{metric}"], -row["val_loss"]) > (best.get("value", best.get("val_macro_f1")), -best["val_loss"])


def one_epoch(run: Run, epoch: int, stop: GracefulStop) -> tuple[dict[str, Any], Predictions]:
    args, accelerator = run.args, run.accelerator
    run.train_set.set_epoch(epoch)
    run.train_loader.set_epoch(epoch)
    skip = run.state["step_in_epoch"] if epoch == run.state["epoch"] else 0
    loader = accelerator.skip_first_batches(run.train_loader, skip) if skip else run.train_loader
    every = None if args.checkpointing_steps in ("epoch", "none") else int(args.checkpointing_steps)
    last_boundary = [epoch * len(run.train_loader) + skip]  # batches trained before this epoch's first step here

    def on_step(step: int, sums) -> None:
        if run.ema is not None and accelerator.sync_gradients:  # before any checkpoint of this step
            run.ema.update_parameters(accelerator.unwrap_model(run.model))
        if not accelerator.sync_gradients:
            return  # mid-accumulation: the summed gradients are in no checkpoint, so save at the boundary
        signum = stop.requested(accelerator)
        if signum:
            logger.warning("%s received: saving a checkpoint at epoch %d, batch %d, then stopping", signal.Signals(signum).name, epoch + 1, step)
            checkpoint(run, epoch, step, epoch_so_far=sums())
            raise Interrupted(signum)
        # Every N batches, at the first accumulation boundary at or after each multiple of N.
        global_step, previous = epoch * len(run.train_loader) + step, last_boundary[0]
        last_boundary[0] = global_step
        if every and global_step // every > previous // every and step < len(run.train_loader):
            checkpoint(run, epoch, step, epoch_so_far=sums())

    carried = run.state.get("epoch_so_far") if skip else None  # the batches trained before the resume
    stats = train_one_epoch(accelerator, run.model, loader, run.optimizer, run.scheduler, run.preprocessor, epoch=epoch,
                            class_weights=run.class_weights, logit_offset=run.logit_offset, on_step=on_step, skip_batches=skip, start_step=skip,
                            carried=carried, seed=args.seed,
                            memory_format=run.memory_format)
    share_average_statistics(run)
    val_pass = predict_logits(accelerator, run.model if run.ema is None else run.ema.module, run.val_loader, run.preprocessor,
                              desc=f"epoch {epoch + 1} val", block_summaries=True)
    val = validation_metrics(run, val_pass.logits, val_pass.labels)
    row = {
        "epoch": epoch + 1, "train_loss": stats["loss"], "train_accuracy": stats["accuracy"], "train_images": stats["n"],
        "val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"],
        "val_group_recall": val["group_recall"], "val_by_source": val["by_source"],
        "lr": run.scheduler.get_last_lr()[0], "seconds": stats["seconds"], "images_per_s": stats["images_per_s"],
        "data_wait_share": stats["data_wait_share"], **raw_weights_validation(run, epoch),
    }
    run.state["history"].append(row)
    by_source = " ".join(f"{name} {m['accuracy']:.2f}" for name, m in val["by_source"].items()) if len(val["by_source"]) > 1 else ""
    logger.info(
        "epoch %d/%d | train loss %.4f acc %.3f | val loss %.4f acc %.3f macro-F1 %.3f group-recall %.3f%s | lr %.2e"
        " | %.1f s | %.1f img/s (%.0f%% waiting for data)",
        epoch + 1, args.epochs, row["train_loss"], row["train_accuracy"], row["val_loss"], row["val_accuracy"], row["val_macro_f1"],
        row["val_group_recall"], f" | by source: {by_source}" if by_source else "", row["lr"], row["seconds"], row["images_per_s"],
        100 * row["data_wait_share"],
    )
    if "raw_val_group_recall" in row:
        logger.info("epoch %d/%d | the raw weights, not the average: val loss %.4f acc %.3f macro-F1 %.3f group-recall %.3f",
                    epoch + 1, args.epochs, row["raw_val_loss"], row["raw_val_accuracy"], row["raw_val_macro_f1"],
                    row["raw_val_group_recall"])
    if args.report_to != "none":
        # On the per-step axis, at the epoch's last step, so the epoch curves line up with the step curves.
        scalars = {f"epoch/{k}": v for k, v in row.items() if isinstance(v, (int, float))}
        scalars.update({f"val_by_source/{name}/accuracy": m["accuracy"] for name, m in row["val_by_source"].items()})
        accelerator.log(scalars, step=(epoch + 1) * len(run.train_loader))
    return row, val_pass


def share_average_statistics(run: Run) -> None:
    """Give every process rank 0's averaged BatchNorm statistics, the ones that are saved.

    DDP hands every rank rank 0's buffers at each forward, but each rank then updates them on its
    own batch, so the per-rank averages of those buffers drift apart; the weights never do.
    """
    if run.ema is None or run.accelerator.num_processes == 1:
        return
    for buffer in run.ema.module.buffers():
        torch.distributed.broadcast(buffer, src=0)


def raw_weights_validation(run: Run, epoch: int) -> dict[str, float]:
    """With a moving average, the last step's own weights are validated too (recorded, never chosen),
    so a run shows what the average adds."""
    if run.ema is None:
        return {}
    raw = predict_logits(run.accelerator, run.model, run.val_loader, run.preprocessor, desc=f"epoch {epoch + 1} val (raw)")
    val = validation_metrics(run, raw.logits, raw.labels)
    return {f"raw_val_{key}": val[key] for key in ("loss", "accuracy", "macro_f1", "group_recall")}


def validation_metrics(run: Run, logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0) -> dict[str, Any]:
    metrics = metrics_from_logits(logits, labels, run.class_names, temperature=temperature)
    val = run.data.val
    if labels.tolist() != val.labels:  # gather_for_metrics keeps dataset order; check rather than assume
        raise RuntimeError("validation logits are not in dataset order")
    metrics.update(grouped_metrics(logits, labels, torch.tensor(val.sources), val.source_names, run.class_names))
    return metrics


# ---- the end: best weights, calibration, test, outputs -------------------------------------------


def chosen_model(run: Run, best_val: Predictions | None) -> tuple[ChestXrayClassifier, Predictions]:
    """The weights of the epoch chosen on validation, in eval mode, and their validation pass."""
    accelerator = run.accelerator
    # Without accelerate's autocast wrapper: the final evaluation measures the model as saved (fp32).
    model = accelerator.unwrap_model(run.model, keep_fp32_wrapper=False) if run.ema is None else run.ema.module
    if run.state["best"]["epoch"] != run.args.epochs:  # the best weights are the ones saved at that epoch
        # Read as a file, not loaded as a model: this mid-run save is marked unfinished, rightly, for users.
        saved = load_file(str(run.output_dir / WEIGHTS_NAME))
        # A finished run extended with more epochs saved its model with the fitted feature statistics;
        # they are fitted again below, for the model being trained has none.
        held = model.state_dict()
        model.load_state_dict({k: v.to(held[k].dtype) for k, v in saved.items() if not k.startswith(BUFFER_PREFIX)})
    if best_val is None:  # the best epoch was before a resume; every process takes part in this pass
        best_val = predict_logits(accelerator, model, run.val_loader, run.preprocessor, desc="calibrate", block_summaries=True)
    return model.eval(), best_val


def calibrate_chosen(run: Run, model, val_pass: Predictions) -> dict[str, Any]:
    """Temperature and the out-of-distribution gate, fitted on validation and training images; the
    validation metrics at that temperature; and what the run records about its choice."""
    args, record = run.args, run.record
    feature_precision = "bf16" if run.accelerator.precision_choice.precision == "bf16" else "fp32"
    val_metrics = calibrate(model, val_pass, run.data.val, run.data.train.images, fpr=args.ood_fpr, precision=feature_precision)
    val_metrics.update(validation_metrics(run, val_pass.logits, val_pass.labels, temperature=model.config.temperature))
    record["best_epoch"] = run.state["best"]["epoch"]
    record["temperature"] = model.config.temperature
    record["training_seconds"] = sum(row["seconds"] for row in run.state["history"])  # epochs only, validation excluded
    record["unlearned_groups"] = unlearned_groups(val_metrics["by_source"])
    # The copies audit, after training rather than in its start-up: one hash per image for both checks.
    hashes = cached_image_hashes(run.data.train.images), cached_image_hashes(run.data.val.images)
    record["val_copies_of_train"] = validation_copies(run.data, run.class_names, hashes)
    record["label_conflicts"] = label_conflicts(args, run.data, run.class_names, hashes)
    for group in record["unlearned_groups"]:
        logger.warning("the chosen model has not learned %s: do not use it as is; try another --seed, more --epochs "
                       "or a lower --lr", group)
    return val_metrics


def evaluate_held_out(run: Run, model) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The test split (``--test-dir``) and the external sets, each evaluated once, with the chosen model."""
    args, output_dir = run.args, run.output_dir
    if (output_dir / "eval").exists():  # a resumed run's earlier evaluation measured other weights
        logger.warning("%s: removing the earlier evaluation, which measured the weights before this run", output_dir / "eval")
        shutil.rmtree(output_dir / "eval")
    test_metrics, external = None, {}
    # Copies of evaluated images are sought among the images the model was trained on (the training
    # split of every source), hashed once for the test and every external set; the metadata baseline
    # learns from the first source's files.
    trained_on = None
    if args.test_dir or args.external_dir:
        trained_on = hash_training_files(model, split_files(run.data.train, _named(args.data_dir)), "the training split")
    if args.test_dir:
        # The full evaluation (CIs, shortcut audit, OOD rate).
        test_metrics = evaluate_model(model, args.test_dir, train_dir=_named(args.data_dir)[0][1], training_images=trained_on,
                                      output_dir=output_dir / "eval")
        logger.info("test (best epoch %d): accuracy %.3f macro-F1 %.3f on %d images; metadata-only baseline %s",
                    run.state["best"]["epoch"], test_metrics["accuracy"], test_metrics["macro_f1"], test_metrics["n"],
                    _figure(test_metrics["audit"]["metadata_baseline_accuracy"]))
        # what was evaluated, for the card's data table: unreadable files left out (--skip-bad-files)
        run.record["data_counts"]["test"] = {name: row["support"] for name, row in test_metrics["per_class"].items()}
    for name, path in _named(args.external_dir):
        external[name] = evaluate_external(model, path, name=name, training_images=trained_on)
        logger.info("external %s: %s", name, external[name]["summary"])
    if external:
        (output_dir / "eval").mkdir(parents=True, exist_ok=True)
        atomic_write_text(output_dir / "eval" / "external.json", json.dumps(external, indent=2))
    return test_metrics, external


def save_outputs(run: Run, model, val_metrics: dict[str, Any], test_metrics: dict[str, Any] | None,
                 external: dict[str, Any]) -> None:
    """The run's records, its figure, the model with its card, and the upload."""
    from .reports import plot_training_curves  # matplotlib: imported late, on preimport's thread during epoch 1

    args, record, output_dir = run.args, run.record, run.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    card = {"training": record, "val_metrics": val_metrics, "test_metrics": test_metrics, "external_metrics": external or None,
            "repo_id": args.push_to_hub}
    # The records go into the model's own atomic swap: a run stopped while saving keeps the earlier
    # model with the earlier records, never this run's records beside an earlier epoch's weights.
    history = run.state["history"]
    save_model_folder(model, output_dir, card_context=card, records={
        "history.json": json.dumps(history, indent=2),
        "val_metrics.json": json.dumps(val_metrics, indent=2),
        "train_config.json": json.dumps(record, indent=2),
        "training_curves.png": lambda path: plot_training_curves(history, path),
    })
    logger.info("saved the best model (epoch %d) to %s", record["best_epoch"], output_dir)
    if args.push_to_hub:
        try:
            url = model.push_to_hub(args.push_to_hub, folder=output_dir, private=args.hub_private or None)
        except HubUploadError as err:
            raise HubUploadError(f"{err}. The trained model is saved in {output_dir}; push it later with "
                                 f"ChestXrayClassifier.from_pretrained(...).push_to_hub(...) or `hf upload`") from None
        logger.info("pushed to %s", url)


def finish(run: Run) -> None:
    """Every process waits for rank 0's outputs; the trackers get the figures and close."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    if run.args.report_to != "none":
        if accelerator.is_main_process:
            log_figures(accelerator, run.output_dir, step=run.args.epochs * len(run.train_loader))
        accelerator.end_training()


def log_figures(accelerator, output_dir: Path, *, step: int) -> None:
    """The saved figures (training curves, confusion matrix, reliability diagram) to every tracker that takes images."""
    figures = {path.stem: path for path in [output_dir / "training_curves.png", *sorted((output_dir / "eval").glob("*.png"))]
               if path.is_file()}
    images = {f"figures/{name}": np.ascontiguousarray(cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1])[None]
              for name, path in figures.items()}
    for tracker in accelerator.trackers:
        if not images or not hasattr(tracker, "log_images"):
            continue
        if tracker.name == "tensorboard":  # SummaryWriter.add_images wants the layout named
            tracker.log_images(images, step=step, dataformats="NHWC")
        else:
            tracker.log_images({k: list(v) for k, v in images.items()}, step=step)


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _named(specs: list[str]) -> list[tuple[str, Path]]:
    return parse_data_dirs(specs) if specs else []


def _schedule(args: TrainingConfig, steps_per_epoch: int):
    total = max(1, args.epochs * steps_per_epoch)
    warmup = int(args.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if args.lr_scheduler == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor
