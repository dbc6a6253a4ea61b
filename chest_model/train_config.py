"""``train.py``'s arguments: the parser (defaults and help) and the typed config it fills.

The parser owns the defaults; ``TrainingConfig`` owns the types. A parser option without a field (or
a field without an option) fails in ``parse_config``, and tests/test_train_config.py checks both ways.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass

from .config import CONTRAST, DEFAULT_CLASS_NAMES


@dataclass(frozen=True)
class TrainingConfig:
    """One training run's settings, as ``get_args_parser()`` parsed them (see its help for each)."""

    # data
    data_dir: list[str]  # "[NAME=]PATH", one per source
    val_dir: str | None
    val_split: float
    test_dir: str | None
    external_dir: list[str]  # "NAME=PATH"
    output_dir: str
    class_names: list[str] | None
    skip_bad_files: bool
    sampling: str  # shuffle | balanced | groups | within-source
    balance_by: str | None  # a --metadata column whose values share each sampling group's draws equally
    metadata: list[str]  # CSVs describing training files (a "file" column and attribute columns)
    # optimisation
    epochs: int
    batch_size: int  # per process
    lr: float
    momentum: float
    weight_decay: float
    lr_scheduler: str  # constant | cosine
    warmup_epochs: float
    class_weights: str  # none | balanced
    grad_accum: int
    select_metric: str  # auto | macro_f1 | group_recall
    ema_decay: float  # 0: off
    sync_bn: bool  # several GPUs: BatchNorm over the global batch
    # model
    image_size: int
    backbone: str
    weights: str  # imagenet | none
    dropout: float
    contrast: str
    augment: str
    ood_fpr: float
    # run
    mixed_precision: str  # auto | bf16 | fp16 | no
    cpu_threads: int
    num_workers: int
    seed: int
    checkpointing_steps: str  # "epoch", a number of batches, or "none"
    checkpoints_total_limit: int
    resume_from_checkpoint: str | None
    overwrite_output_dir: bool
    push_to_hub: str | None
    hub_private: bool
    report_to: str

    def recipe(self) -> dict:
        """The settings a checkpoint belongs to: a resume must ask for the same ones. Data folders
        are compared as absolute paths, so a resume from another working folder still matches."""
        from .data import split_data_spec

        settings = {k: v for k, v in dataclasses.asdict(self).items() if k not in RESUMABLE_CHANGES}
        settings["class_names"] = list(self.class_names or DEFAULT_CLASS_NAMES)
        settings["data_dir"] = [f"{name}={os.path.abspath(path)}" if name else os.path.abspath(path)
                                for name, path in map(split_data_spec, self.data_dir)]
        settings["val_dir"] = os.path.abspath(self.val_dir) if self.val_dir else None
        settings["metadata"] = [os.path.abspath(path) for path in self.metadata]
        return settings

    def scalars(self) -> dict[str, int | float | str | bool]:
        """The settings a tracker can log as hyperparameters."""
        return {k: v for k, v in dataclasses.asdict(self).items() if isinstance(v, (int, float, str, bool))}


# What may differ between a run and its resume: more epochs, where results go, how it is run and
# logged, and what is evaluated at the end. Everything else shapes the weights a checkpoint holds.
RESUMABLE_CHANGES = frozenset({
    "epochs", "test_dir", "external_dir", "output_dir", "checkpointing_steps", "checkpoints_total_limit",
    "resume_from_checkpoint", "overwrite_output_dir", "push_to_hub", "hub_private", "report_to", "cpu_threads",
    "num_workers", "mixed_precision", "ood_fpr"})


def parse_config(argv: list[str] | None = None) -> TrainingConfig:
    parser = get_args_parser()
    config = TrainingConfig(**vars(parser.parse_args(argv)))
    if not 0.0 <= config.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {config.dropout}")
    if not 0.0 <= config.ema_decay < 1.0:
        parser.error(f"--ema-decay must be in [0, 1), got {config.ema_decay}")
    if config.balance_by and config.sampling == "shuffle":
        parser.error("--balance-by weighs the draws of a sampler: give --sampling balanced, groups or within-source too")
    if config.balance_by and not config.metadata:
        parser.error(f"--balance-by {config.balance_by} needs the CSV that holds that column: give --metadata CSV")
    if config.metadata and not config.balance_by:
        parser.error("--metadata is read for --balance-by only: name the column to balance by, or leave --metadata out")
    if not 0.0 < config.val_split < 1.0:
        parser.error(f"--val-split is the share of the training images held out for validation, in (0, 1); got {config.val_split}")
    return config


def tracker(text: str) -> str:
    """An argparse type for --report-to: 'none', 'all', or one of accelerate's trackers, installed."""
    name = text.strip().lower()
    if name == "none":
        return name
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    installed = sorted(str(getattr(t, "value", t)) for t in get_available_trackers())
    if name == "all":
        if not installed:
            raise argparse.ArgumentTypeError("'all': no tracker is installed (e.g. pip install tensorboard)")
        return name
    if name not in LOGGER_TYPE_TO_CLASS:
        raise argparse.ArgumentTypeError(f"unknown tracker {text!r}; choose none, all or one of {', '.join(sorted(LOGGER_TYPE_TO_CLASS))}")
    if name not in installed:
        raise argparse.ArgumentTypeError(f"{name} is not installed (pip install {name}); installed: {', '.join(installed) or 'none'}")
    return name


def whole_number(minimum: int, meaning: str = ""):
    """An argparse type: an integer of at least ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}{meaning}, got {value}")
        return value
    return parse


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _share(text: str) -> float:
    """An argparse type: a share strictly between 0 and 1."""
    value = _number(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {value}")
    return value


def _non_negative(text: str) -> float:
    value = _number(text)
    if not value >= 0.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _checkpointing_steps(text: str) -> str:
    """'epoch', 'none', or a positive number of batches (kept as text, as accelerate's examples do)."""
    if text in ("epoch", "none"):
        return text
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected 'epoch', 'none' or a number of batches (1 or more), got {text!r}")
    return str(int(text))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train the chest X-ray classifier on class folders. Research demo, not for clinical use.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = p.add_argument_group("data")
    data.add_argument("--data-dir", required=True, action="append", metavar="[NAME=]PATH",
                      help="folder of class subfolders (Normal/, Covid/, Viral Pneumonia/); repeat it to train on several "
                           "sources, merged by class folder name (a source may hold only some classes)")
    data.add_argument("--val-dir", default=None, help="validation class folders; without it, --val-split of --data-dir")
    data.add_argument("--val-split", type=float, default=0.15,
                      help="seeded validation fraction when there is no --val-dir, stratified by class and source")
    data.add_argument("--test-dir", default=None, help="evaluated once at the end with the best model; never chooses epochs")
    data.add_argument("--external-dir", action="append", default=[], metavar="NAME=PATH",
                      help="a set from a source not trained on (may hold only some classes), evaluated once at the end; repeatable")
    data.add_argument("--output-dir", required=True, help="where the model, its card, records and checkpoints go")
    # "%(default).0s" prints nothing, and tells the help formatter not to append "(default: None)".
    data.add_argument("--class-names", nargs="+", default=None, help=f"class folder names, in order (default: {', '.join(DEFAULT_CLASS_NAMES)})".replace("%", "%%") + "%(default).0s")
    data.add_argument("--skip-bad-files", action="store_true", help="train without unreadable files instead of stopping; they are listed")
    data.add_argument("--sampling", choices=["shuffle", "balanced", "groups", "within-source"], default="shuffle",
                      help="'balanced' draws every class equally often and, within a class, every source equally often; "
                           "'groups' draws every (source, class) group equally often, and the loss corrects for the "
                           "class prior that leaves (logit adjustment), so predictions stay class-balanced; "
                           "'within-source' balances the classes inside every source that holds several, and lets "
                           "the sources that hold one class only (supplements) share one group's weight")
    data.add_argument("--balance-by", default=None, metavar="COLUMN",
                      help="with --sampling other than 'shuffle': split each sampling group's draws equally between the "
                           "values of this --metadata column (e.g. 'view', so a source's few AP films are drawn as often "
                           "as its PA ones); files the CSVs do not list count as one more value")
    data.add_argument("--metadata", action="append", default=[], metavar="CSV",
                      help="a CSV describing training files: a 'file' column (the path, or its last parts such as "
                           "Normal/x.png) and attribute columns, e.g. a dataset's manifest.csv; repeatable")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=whole_number(1), default=10, help="passes over the training images")
    opt.add_argument("--batch-size", type=whole_number(1), default=4, help="per process")
    opt.add_argument("--lr", type=_non_negative, default=1e-3, help="SGD learning rate (the tutorial's)")
    opt.add_argument("--momentum", type=_non_negative, default=0.9, help="SGD momentum")
    opt.add_argument("--weight-decay", type=_non_negative, default=0.0, help="L2 weight decay")
    opt.add_argument("--lr-scheduler", choices=["constant", "cosine"], default="constant",
                     help="learning-rate schedule over the run (after --warmup-epochs)")
    opt.add_argument("--warmup-epochs", type=_non_negative, default=0.0, help="linear warm-up before the schedule")
    opt.add_argument("--class-weights", choices=["none", "balanced"], default="none",
                     help="weight the loss by inverse class frequency")
    opt.add_argument("--grad-accum", type=whole_number(1), default=1, help="gradient accumulation steps")
    opt.add_argument("--select-metric", choices=["auto", "macro_f1", "group_recall"], default="auto",
                     help="validation metric that chooses the epoch; 'group_recall' is the mean recall over every "
                          "(source, class) group, so no source or class can be sacrificed; 'auto' uses it with several sources")
    opt.add_argument("--ema-decay", type=float, default=0.0,
                     help="keep an exponential moving average of the weights (and BatchNorm statistics), updated every "
                          "optimizer step with this decay, and validate, choose and save it instead of the raw weights; "
                          "0 turns it off. 0.995 averages over about 200 steps")
    opt.add_argument("--sync-bn", action="store_true",
                     help="with several GPUs, BatchNorm (--backbone vgg19_bn) normalises over the whole batch instead of "
                          "each process's share of it (torch's SyncBatchNorm; needs CUDA)")
    mdl = p.add_argument_group("model")
    mdl.add_argument("--image-size", type=whole_number(32, " (VGG halves it five times)"), default=224, help="input side in pixels (images are resized to a square)")
    mdl.add_argument("--backbone", choices=["vgg19", "vgg19_bn"], default="vgg19", help="torchvision VGG19, without or with BatchNorm")
    mdl.add_argument("--weights", choices=["imagenet", "none"], default="imagenet", help="backbone initialisation; 'none' is random init")
    mdl.add_argument("--dropout", type=float, default=0.5, help="dropout in the classification head")
    mdl.add_argument("--contrast", choices=list(CONTRAST), default="none",
                     help="per-image contrast normalisation of every input, which hides the brightness and contrast by "
                          "which collections differ; 'equalize' (the whole histogram) also hides their tone curves "
                          "(stored in config.json, so inference does the same)")
    mdl.add_argument("--augment", choices=["standard", "framing", "acquisition", "devices", "none"], default="standard",
                     help="'framing' adds random crops (50-100%% of the area), so how tightly a collection frames the chest "
                          "cannot tell the class; 'acquisition' adds crops, blur, noise, JPEG and gamma changes that hide how "
                          "and where an image was taken; 'devices' adds, on half the images of every class, synthetic ECG "
                          "leads, wires, tubes and burnt-in markers (AP, PORTABLE), so that the devices of portable "
                          "ICU films cannot tell the class")
    mdl.add_argument("--no-augment", dest="augment", action="store_const", const="none", help="same as --augment none")
    mdl.add_argument("--ood-fpr", type=_share, default=0.02,
                     help="the feature-space out-of-distribution gate's false-positive rate: the largest chance that it "
                          "flags an X-ray like the validation ones (a split-conformal bound)")
    run = p.add_argument_group("run")
    run.add_argument("--mixed-precision", choices=["auto", "bf16", "fp16", "no"], default="auto",
                     help="'auto': bf16 where the device runs it faster than fp32 (GPUs with bf16 tensor cores, CPUs with "
                          "AMX, CPUs with AVX512-BF16 where a timed matmul says so), else fp32. `accelerate launch --mixed_precision bf16|fp16` also counts as asking")
    run.add_argument("--cpu-threads", type=whole_number(0), default=0,
                     help="torch threads per process on CPU (0: the available cores divided by the local processes)")
    run.add_argument("--num-workers", type=whole_number(0), default=0, help="DataLoader workers (images are cached in memory; 0 is usually fastest)")
    run.add_argument("--seed", type=int, default=2022, help="seeds the validation split, sampling, augmentation and initialisation")
    run.add_argument("--checkpointing-steps", type=_checkpointing_steps, default="epoch", help="'epoch', a number of batches, or 'none'")
    run.add_argument("--checkpoints-total-limit", type=whole_number(0), default=2, help="checkpoints kept (the newest); 0 keeps every one")
    run.add_argument("--resume-from-checkpoint", default=None, help="a checkpoint folder, or 'latest' in --output-dir/checkpoints")
    run.add_argument("--overwrite-output-dir", action="store_true",
                     help="start over in an --output-dir that holds an earlier run's checkpoints (they are deleted)")
    run.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="upload the final model folder to this Hub repo")
    run.add_argument("--hub-private", action="store_true", help="create the --push-to-hub repo as private")
    run.add_argument("--report-to", default="none", type=tracker,
                     help="an accelerate tracker to log to: none, all (every one installed), tensorboard, wandb, mlflow, ...")
    return p
