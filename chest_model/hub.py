"""Saving, loading and sharing model folders: ``config.json`` + ``model.safetensors`` + ``README.md``.

These replace the sharp edges of huggingface_hub's ``PyTorchModelHubMixin``: it loads non-strictly,
can fall back to ``pytorch_model.bin`` through ``torch.load``, writes config.json only from init
arguments and uploads its own generic model card. Here loading is strict, safetensors-only and
validated; saving is atomic; and the card on the Hub is ours.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import FolderWriteError, atomic_directory, recover_interrupted, writable_target, write_failure
from .config import ChestXrayConfig, ConfigError
from .errors import ChestModelError
from .feature_ood import BUFFER_PREFIX
from .precision import DeviceError, inference_device

if TYPE_CHECKING:
    from .model import ChestXrayClassifier

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
MODEL_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class ModelLoadError(ChestModelError, ValueError):
    """A model folder or Hub repo that cannot be loaded safely; the message says why."""


class HubUploadError(ChestModelError, RuntimeError):
    """An upload to the Hub that did not happen: offline, not logged in, no write access."""


def save_model_folder(model: ChestXrayClassifier, directory: str | Path, *, card_context: dict | None = None,
                      weights_dtype: torch.dtype | None = None, records: dict[str, Any] | None = None,
                      drop_records: bool = False) -> Path:
    """Write config.json, model.safetensors and the model card, atomically.

    ``weights_dtype=torch.float16`` halves the file; loading casts back to float32. ``records`` (file
    name -> text, or a function that writes the file at the path it is given) go into the same swap,
    so a run's records never describe other weights than the ones beside them; ``drop_records``
    removes the records already there (a run's best epoch so far, saved over an earlier finish).
    """
    from .card import render_card

    directory = writable_target(directory)
    # With no card context given, the card and records of the folder the model was loaded from still
    # describe it while it is unchanged, and travel with it, in the precision they were stored in;
    # records in the target that describe another model would be false next to this one, and are dropped.
    source = unchanged_source(model) if card_context is None else None
    if source is not None and weights_dtype is None:
        weights_dtype = getattr(model, "stored_dtype", None)
    held = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    state = held
    if weights_dtype is not None:
        # Feature statistics stay fp32: a precision matrix's entries can overflow float16.
        state = {k: v.to(weights_dtype) if v.is_floating_point() and not k.startswith(BUFFER_PREFIX) else v
                 for k, v in held.items()}
    if source is not None and not all(_same_values(state[k], held[k]) for k in held):
        logger.warning("%s: storing the weights as %s changes them, so the card and records of %s (measured on "
                       "the weights as they were) are not carried over; a fresh card is written",
                       directory, weights_dtype, source)
        source = None
    if drop_records:
        stale = [name for name in MODEL_RECORDS if (directory / name).exists() and name not in (records or {})]
    else:
        stale = [] if card_context is not None else _stale_records(directory, model.config, state)
    with _write_failures_named(directory), atomic_directory(directory, drop=stale) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        _chmod_like_new_file(tmp / WEIGHTS_NAME)
        model.config.save(tmp / CONFIG_NAME)
        if source is not None:
            for name in (CARD_NAME, *MODEL_RECORDS):
                if (source / name).exists() and not (tmp / name).exists():
                    _copy_tree(source / name, tmp / name)
        if not (tmp / CARD_NAME).exists():
            (tmp / CARD_NAME).write_text(render_card(model.config, card_context), encoding="utf-8")
        for name, content in (records or {}).items():
            if callable(content):
                content(tmp / name)
            else:
                (tmp / name).write_text(content, encoding="utf-8")
    if stale:
        logger.warning("%s held another model; its records (%s) described that model and were removed",
                       directory, ", ".join(stale))
    return directory


@contextlib.contextmanager
def _write_failures_named(directory: Path):
    """A full disk (or quota) while the folder is written: one line naming the folder, which the atomic
    swap has left as it was."""
    try:
        yield
    except (OSError, SafetensorError) as err:
        if isinstance(err, ChestModelError):
            raise
        raise FolderWriteError(f"{directory}: could not write the model folder ({write_failure(err)}); "
                               "the folder is as it was before this save") from None


# What a model folder may hold about the model in it, besides the card: training records, evaluations.
MODEL_RECORDS = ("train_config.json", "val_metrics.json", "history.json", "training_curves.png", "metrics.json",
                 "card_context.json", "eval")


def unchanged_source(model: ChestXrayClassifier) -> Path | None:
    """The folder the model was loaded from, while it still holds exactly this model."""
    source = Path(model.folder) if getattr(model, "folder", None) else None
    return source if source is not None and (source / CARD_NAME).is_file() and _holds_model(source, model) else None


def _stale_records(directory: Path, config: ChestXrayConfig, state: dict[str, torch.Tensor]) -> list[str]:
    """The records in ``directory`` when it holds another model than the ``config`` and ``state`` to be written."""
    holds_a_model = (directory / CONFIG_NAME).is_file() or (directory / WEIGHTS_NAME).is_file()
    if not holds_a_model or _holds_state(directory, config, state):
        return []
    return [name for name in MODEL_RECORDS if (directory / name).exists()]


def _copy_tree(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)


def _chmod_like_new_file(path: Path) -> None:
    """safetensors writes through a private temporary file (0600); give it normal permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def looks_like_path(text: str) -> bool:
    """Hub ids are "name" or "owner/name"; anything else that does not exist is a mistyped path."""
    return text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text


# from_pretrained's options that choose what is downloaded, passed on to huggingface_hub's snapshot_download.
DOWNLOAD_OPTIONS = ("revision", "cache_dir", "force_download", "local_files_only", "token")


def resolve_model_folder(name_or_path: str | Path, **download: Any) -> Path:
    """A local folder as is, or a Hub repo downloaded (config, weights and card only) to the cache;
    ``download``: any of :data:`DOWNLOAD_OPTIONS`."""
    unknown = sorted(set(download) - set(DOWNLOAD_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected download option(s) {unknown}; the options are {', '.join(DOWNLOAD_OPTIONS)}")
    if not str(name_or_path).strip():
        raise ModelLoadError("no model given: pass a model folder or a Hub repo id (an empty name would mean "
                             "the current folder)")
    path = Path(name_or_path).expanduser()
    if not path.exists():
        recover_interrupted(path)  # a save killed between its two renames set the folder aside
    if path.is_dir():
        if download.get("revision") is not None:
            raise ModelLoadError(f"{name_or_path}: is a local folder, which has no revisions; revision= "
                                 f"({download['revision']!r}) chooses a version of a Hub repo")
        return path
    text = str(name_or_path)
    if path.exists():
        raise ModelLoadError(f"{text}: is a file; pass the model folder that holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    if looks_like_path(text):
        raise ModelLoadError(f"{text}: no such model folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        folder = snapshot_download(repo_id=text, allow_patterns=list(MODEL_FILES), **download)
    except HFValidationError:
        raise ModelLoadError(f"{text}: neither a local folder nor a valid Hugging Face Hub repo id") from None
    except Exception as err:  # noqa: BLE001 - offline, 404, auth: all end here with advice
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        advice = ("HF_HUB_OFFLINE is set and it is not in the local cache: download it once with a network, "
                  "or pass a local model folder" if offline else
                  "If it is a local folder, check the path; if it is a Hub repo, check the name, your network "
                  "and your token (`hf auth login`); models already in the cache load with HF_HUB_OFFLINE=1")
        raise ModelLoadError(
            f"{text}: could not download from the Hugging Face Hub ({type(err).__name__}: {err}). {advice}."
        ) from None
    folder = Path(folder)
    if not (folder / WEIGHTS_NAME).is_file():
        # Only our files are downloaded, so a repo with pickled weights leaves none of them here: ask the Hub what it holds.
        raise _no_weights_error(text, _hub_file_names(text, download))
    return folder


def _hub_file_names(repo_id: str, download: dict[str, Any]) -> list[str]:
    """The files of a Hub repo, or none where the Hub cannot be asked (offline: the message then says less)."""
    from huggingface_hub import HfApi

    try:
        return list(HfApi(token=download.get("token")).list_repo_files(repo_id, revision=download.get("revision")))
    except Exception:  # noqa: BLE001 - offline, auth...: the error raised next still says what is missing
        return []


def _no_weights_error(where: str, names: list[str]) -> ModelLoadError:
    pickles = sorted(name for name in names if Path(name).suffix.lower() in PICKLE_SUFFIXES)
    if not pickles:
        return ModelLoadError(f"{where}: no {WEIGHTS_NAME}: not a saved model folder (save_pretrained "
                              f"writes {CONFIG_NAME}, {WEIGHTS_NAME} and {CARD_NAME})")
    return ModelLoadError(
        f"{where}: no {WEIGHTS_NAME}. It has {', '.join(pickles)}, which are never loaded, because unpickling "
        "can run arbitrary code. Convert the weights to safetensors (safetensors.torch.save_file) in a "
        "trusted environment."
    )


def load_model(
    cls: type[ChestXrayClassifier],
    name_or_path: str | Path,
    *,
    map_location: str | torch.device = "cpu",
    **options: Any,
) -> ChestXrayClassifier:
    """``options``: any of :data:`DOWNLOAD_OPTIONS` (``revision``, ``cache_dir``, ``force_download``,
    ``local_files_only``, ``token``), and ChestXrayConfig fields to override."""
    download = {name: options.pop(name) for name in DOWNLOAD_OPTIONS if name in options}
    config_overrides = options
    unknown = sorted(set(config_overrides) - {f.name for f in dataclasses.fields(ChestXrayConfig)})
    if unknown:  # before any download: a mistyped argument is not the model's fault
        raise TypeError(f"from_pretrained() got unexpected keyword argument(s) {unknown}; it takes "
                        f"{', '.join(DOWNLOAD_OPTIONS)}, map_location, and ChestXrayConfig fields to override")
    if not isinstance(map_location, (str, torch.device)):
        raise TypeError(f"map_location must be a device name or torch.device, got {map_location!r}")
    try:
        device = inference_device(str(map_location))
    except DeviceError as err:
        raise ModelLoadError(f"map_location: {err}") from None
    folder = resolve_model_folder(name_or_path, **download)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise _no_weights_error(str(name_or_path), [p.name for p in folder.iterdir()])
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise ModelLoadError(f"{name_or_path}: no {CONFIG_NAME} next to {WEIGHTS_NAME}")
    try:
        config = ChestXrayConfig.load(config_path)
        if config_overrides:
            config = ChestXrayConfig.from_dict({**config.to_dict(), **config_overrides},
                                               source=f"from_pretrained({', '.join(f'{k}=...' for k in config_overrides)})")
    except ConfigError as err:
        raise ModelLoadError(str(err)) from None

    fitted = config.feature_threshold > 0 or config.min_confidence > 0 or config.temperature != 1
    changed = sorted(k for k in ("image_size", "mean", "std", "contrast") if k in config_overrides)
    if fitted and changed:
        logger.warning("%s: overriding %s changes what the model sees; its temperature and uncertainty thresholds "
                       "were fitted on the inputs as saved, and may no longer hold", name_or_path, ", ".join(changed))
    model = cls(config)
    try:
        # Read onto the CPU and move the model once: reading onto a GPU and then copying into a CPU
        # model would hold the weights twice there and cross the bus twice.
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelLoadError(f"{weights}: corrupt safetensors file ({err})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    # Half precision is cast back to fp32; integers or booleans where the model holds floats (or the
    # reverse) would be cast into nonsense, so they are refused.
    mistyped = sorted(k for k in set(state) & set(expected) if state[k].is_floating_point() != expected[k].is_floating_point()
                      or (not expected[k].is_floating_point() and state[k].dtype != expected[k].dtype))
    if missing or unexpected or mismatched or mistyped:
        details = []
        if missing:
            details.append(f"missing tensors {_first(missing)}")
        if unexpected:
            details.append(f"unexpected tensors {_first(unexpected)}")
        if mismatched:
            details.append("shape mismatch " + _first(
                [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in mismatched]))
        if mistyped:
            details.append("dtype mismatch " + _first(
                [f"{k}: file {state[k].dtype} vs model {expected[k].dtype}" for k in mistyped]))
        raise ModelLoadError(f"{weights}: does not match {CONFIG_NAME}: " + "; ".join(details))
    # A NaN or inf weight makes every answer NaN, which no threshold catches: refused here, by name.
    broken = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if broken:
        raise ModelLoadError(f"{weights}: tensors with NaN or infinite values: {_first(broken)} "
                             "(a damaged file, or a training run that diverged); this model cannot predict")
    # Weights may be stored in half precision to keep the file small; compute in fp32 (and save them
    # again as stored: see save_model_folder).
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    stored = {v.dtype for k, v in state.items() if v.is_floating_point() and not k.startswith(BUFFER_PREFIX)}
    model.stored_dtype = stored.pop() if len(stored) == 1 and stored != {torch.float32} else None
    model.to(device)
    _warn_if_unfinished(folder, name_or_path)
    model.source = str(name_or_path)
    model.folder = str(folder)
    model.revision = download.get("revision")
    return model.eval()


def _warn_if_unfinished(folder: Path, name_or_path: str | Path) -> None:
    """A training run's mid-run save loads (it is the best so far), but must not pass for a finished model."""
    from .card import is_unfinished_run

    try:
        card = (folder / CARD_NAME).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return
    if is_unfinished_run(card):
        logger.warning("%s: an unfinished training run (the best epoch so far): not calibrated, no out-of-distribution "
                       "gate, no test evaluation; finish it with its command and --resume-from-checkpoint latest",
                       name_or_path)


def weights_fingerprint(model: ChestXrayClassifier) -> str:
    """SHA-256 of every tensor the model holds (names, shapes and fp32 values) and its temperature:
    which model a metrics file measured, so that a card is never filled with another model's figures."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().cpu().float().contiguous().numpy().tobytes())
    digest.update(f"temperature:{float(model.config.temperature)!r}".encode())
    return digest.hexdigest()


def _first(items: list[str], n: int = 4) -> str:
    """A long list of tensor names, shortened: the first few say what is wrong."""
    shown = ", ".join(items[:n])
    return f"{shown} and {len(items) - n} more ({len(items)} in all)" if len(items) > n else shown


def push_model(
    model: ChestXrayClassifier,
    repo_id: str,
    *,
    commit_message: str = "Upload chest X-ray classifier",
    private: bool | None = None,
    token: str | None = None,
    branch: str | None = None,
    create_pr: bool | None = None,
    folder: str | Path | None = None,
    card_context: dict | None = None,
    delete_patterns: str | list[str] | None = None,
) -> str:
    """Upload exactly config.json, model.safetensors and the model card (as README.md).

    The card is the one that lives with the weights: ``folder``'s (training pushes its output
    folder as is), or that of the folder the model was loaded from, while the model still holds
    exactly its config and weights. A model with no card, changed since it was loaded, or given a
    ``card_context``, gets a fresh card, with every record its folder holds. A card that says to
    load the model from elsewhere (a folder, a placeholder) gets ``repo_id`` there (and ``branch`` as
    the revision to load); nothing else changes. ``branch`` is created if the repo lacks it;
    ``delete_patterns`` removes matching files already in the repo (an old ``*.bin``) in the same commit.
    """
    from huggingface_hub import HfApi

    from .card import card_for_repo

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        if folder is None:
            folder = _folder_to_push(model, Path(tmp) / "model", card_context)
        folder = Path(folder)
        for name in MODEL_FILES:
            if not (folder / name).is_file():
                raise ModelLoadError(f"{folder}: missing {name}; save the model before pushing it")
        with _upload_errors(repo_id):
            repo_id = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
            if branch and not create_pr:
                api.create_branch(repo_id=repo_id, branch=branch, exist_ok=True)
        card = (folder / CARD_NAME).read_text(encoding="utf-8")
        for_repo = card_for_repo(card, repo_id, branch)
        if for_repo != card:  # the card names another place (or no branch) to load the model from
            folder = _stage(folder, Path(tmp) / "for-repo", for_repo)
        with _upload_errors(repo_id):
            commit = api.upload_folder(
                repo_id=repo_id,
                repo_type="model",
                folder_path=folder,
                commit_message=commit_message,
                revision=branch,
                create_pr=create_pr,
                allow_patterns=list(MODEL_FILES),
                delete_patterns=delete_patterns,
            )
    return str(commit)


@contextlib.contextmanager
def _upload_errors(repo_id: str):
    """The Hub's errors (offline, 401, 403, a bad name) as one line that says what to check."""
    try:
        yield
    except ChestModelError:
        raise
    except Exception as err:  # noqa: BLE001 - httpx, HfHubHTTPError, OfflineModeIsEnabled, HFValidationError...
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        advice = ("HF_HUB_OFFLINE is set: unset it to upload" if offline else
                  "check your network, the repo name, and that you are logged in with write access "
                  "(`hf auth login`, or token=...)")
        raise HubUploadError(f"{repo_id}: could not upload to the Hugging Face Hub "
                             f"({type(err).__name__}: {err}); {advice}") from None


def _folder_to_push(model: ChestXrayClassifier, tmp: Path, card_context: dict | None) -> Path:
    """The loaded-from folder with its own card, or the model's files with a fresh card, in ``tmp``."""
    from .card import card_context_from_folder, render_card

    source = Path(model.folder) if getattr(model, "folder", None) else None
    if source is not None and not _holds_model(source, model):
        logger.warning("%s: the model changed since it was loaded from there; its card and records no longer "
                       "describe it, so a fresh card is pushed", source)
        source = None
    if source is None:
        return save_model_folder(model, tmp, card_context=card_context)
    if card_context is None and (source / CARD_NAME).is_file():
        return source
    context = {**card_context_from_folder(source), **(card_context or {})}
    return _stage(source, tmp, render_card(model.config, context))


def _holds_model(folder: Path, model: ChestXrayClassifier) -> bool:
    """Whether ``folder`` holds exactly this model's config and weights (float16 files compare after the cast)."""
    return _holds_state(folder, model.config, model.state_dict())


def _holds_state(folder: Path, config: ChestXrayConfig, state: dict[str, torch.Tensor]) -> bool:
    try:
        if ChestXrayConfig.load(folder / CONFIG_NAME) != config:
            return False
        saved = load_file(str(folder / WEIGHTS_NAME))
    except (OSError, ConfigError, SafetensorError, ValueError):
        return False
    # Compared exactly, in float64: a float16 file equals the fp32 model loaded from it, but not a copy
    # of that model cast to bfloat16, whose predictions differ.
    return saved.keys() == state.keys() and all(_same_values(saved[k], state[k].detach().cpu()) for k in state)


def _same_values(saved: torch.Tensor, held: torch.Tensor) -> bool:
    if saved.is_floating_point() and held.is_floating_point():
        return torch.equal(saved.to(torch.float64), held.to(torch.float64))
    return saved.dtype == held.dtype and torch.equal(saved, held)


def _stage(source: Path, tmp: Path, card: str) -> Path:
    """``source``'s config and weights, hard-linked where possible, next to ``card``."""
    tmp.mkdir(parents=True)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            os.link((source / name).resolve(), tmp / name)
        except OSError:
            shutil.copyfile(source / name, tmp / name)
    (tmp / CARD_NAME).write_text(card, encoding="utf-8")
    return tmp
