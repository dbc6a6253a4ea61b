"""`chest-model evaluate`: metrics with confidence intervals, calibration, a shortcut audit, OOD rates and figures.

With only a few dozen test images, every figure comes with a bootstrap interval, and next to the
model's score stand two numbers that tell how much of it a shortcut could explain.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_write_text
from .audit import mask_center, metadata_baseline, verdict
from .data import DatasetError, relative_message, relative_name, scan_image_folder, source_name
from .duplicates import hash_matrix as cached_hashes, image_hash, train_test_copies
from .framing import framing_check, framing_lines, tone_check
from .hub import weights_fingerprint
from .metrics import bootstrap_ci, classification_metrics, flagged_by_class, predicted_shares, reliability_bins
from .model import ChestXrayClassifier
from .preprocess import ImageLoadError
from .subgroups import SubgroupTable, subgroup_figures, subgroup_lines

logger = logging.getLogger(__name__)


def default_train_dir(data_dir: Path) -> Path | None:
    sibling = Path(data_dir).resolve().parent / "train"
    return sibling if sibling.is_dir() and sibling != Path(data_dir).resolve() else None


def evaluate_model(
    model: ChestXrayClassifier,
    data_dir: str | Path,
    *,
    train_dir: str | Path | None = None,
    training_images: TrainingHashes | None = None,
    output_dir: str | Path | None = None,
    batch_size: int = 16,
    n_bootstrap: int = 1000,
    seed: int = 0,
    framing: bool = False,
    tone: bool = False,
    subgroups: SubgroupTable | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on class folders; write metrics.json and figures to ``output_dir`` if given.

    ``train_dir`` holds the training files the metadata-only baseline learns from (default: a sibling
    ``train/``). ``training_images`` are the hashed training images searched for copies of the
    evaluated ones (:func:`hash_training_files`; default: every image under ``train_dir``).
    ``framing`` adds the framing check (:mod:`chest_model.framing`) per true class, five more passes;
    ``tone`` the tone check, three more. ``subgroups`` (:mod:`chest_model.subgroups`) adds the figures
    per group of the films its CSV describes.
    """
    class_names = model.class_names
    folder, problems = scan_image_folder(data_dir, class_names)
    if problems:
        raise DatasetError("cannot evaluate:\n  - " + "\n  - ".join(problems))
    images, labels, paths, errors = _decode(model, folder)
    inference = model.infer(images, batch_size=batch_size)
    probs = inference.probabilities.numpy().astype(np.float64)
    metrics = classification_metrics(labels, probs, class_names)
    metrics["ci"] = bootstrap_ci(labels, probs, class_names, n_resamples=n_bootstrap, seed=seed)
    metrics["ci"]["confidence"] = 0.95
    metrics["reliability"] = reliability_bins(labels, probs)
    metrics["temperature"] = model.config.temperature
    metrics["model_fingerprint"] = weights_fingerprint(model)
    metrics["unreadable_files"] = errors
    losses = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1))

    chance = float(np.bincount(labels, minlength=len(class_names)).max() / max(len(labels), 1))
    masked = _probabilities(model, [mask_center(im, keep=False) for im in images], batch_size)
    center = _probabilities(model, [mask_center(im, keep=True) for im in images], batch_size)
    audit: dict[str, Any] = {
        "majority_class_accuracy": chance,
        "center_masked_accuracy": float((masked.argmax(1) == labels).mean()),
        "center_only_accuracy": float((center.argmax(1) == labels).mean()),
        "metadata_baseline_accuracy": None,
    }
    train_dir = Path(train_dir) if train_dir else default_train_dir(Path(data_dir))
    if train_dir is not None:
        train_folder, train_problems = scan_image_folder(train_dir, class_names)
        if train_problems:  # the report says why the baseline is missing, not "no --train-dir"
            audit["metadata_baseline_unavailable"] = "; ".join(relative_message(p, train_dir, train_dir.parent)
                                                               for p in train_problems)
            logger.warning("metadata baseline left out: the training folder has problems: %s", "; ".join(train_problems))
        else:
            baseline = metadata_baseline(train_folder.paths, train_folder.labels, paths, labels, seed=seed,
                                         root=train_dir)
            audit.update(metadata_baseline_accuracy=baseline["accuracy"], metadata_baseline_macro_f1=baseline["macro_f1"],
                         metadata_features=baseline["features"], metadata_train_source=train_folder.source_names[0],
                         metadata_n_train=baseline["n_train"], unreadable_train_files=baseline["unreadable_train_files"])
            if baseline["unreadable_train_files"]:
                logger.warning("metadata baseline: %d unreadable training files left out", len(baseline["unreadable_train_files"]))
    if training_images is None and train_dir is not None:
        training_images = hash_training_files(model, folder_files([(source_name(train_dir), train_dir)], class_names))
    copies = copies_audit(model, images, labels, [relative_name(p, data_dir) for p in paths], training_images, probs)
    if copies is not None:
        audit["train_copies"] = copies
    audit["verdict"] = verdict(metrics["accuracy"], audit["metadata_baseline_accuracy"], audit["center_masked_accuracy"], chance)
    if framing:
        audit["framing"] = framing_check(model, paths, [class_names[c] for c in labels], batch_size=batch_size)
    if tone:
        audit["tone"] = tone_check(model, paths, [class_names[c] for c in labels], batch_size=batch_size)
    metrics["audit"] = audit

    reasons = inference.reasons(images, model.config)
    metrics["ood"] = ood_summary(reasons, model.config, labels, class_names)
    if subgroups is not None:
        metrics["subgroups"] = subgroup_figures(subgroups, paths, labels, probs, [bool(r) for r in reasons], class_names)
    order = np.argsort(-losses)
    metrics["hardest"] = [
        {"file": relative_name(paths[i], data_dir), "true": class_names[labels[i]], "predicted": class_names[int(probs[i].argmax())],
         "p_true": float(probs[i, labels[i]]), "loss": float(losses[i])}
        for i in order[:12]
    ]
    if output_dir is not None:
        write_outputs(metrics, images, probs, labels, order, class_names, Path(output_dir))
    return metrics


def folder_files(folders: list[tuple[str, str | Path]], class_names: list[str]) -> list[tuple[str, Path]]:
    """``(SOURCE/CLASS/FILE, path)`` of every image in named class folders (missing classes allowed)."""
    files = []
    for name, root in folders:
        folder, _ = scan_image_folder(root, class_names, partial=True, name=name)
        files += [(f"{name}/{relative_name(path, root)}", path) for path in folder.paths]
    return files


@dataclass
class TrainingHashes:
    """The training images evaluated images are compared with (the copies audit): hashed once, then
    used for every evaluated set."""

    names: list[str]      # SOURCE/CLASS/FILE, as the report names them
    hashes: np.ndarray    # (N, HASH_BITS) booleans
    searched: str         # what these images are, for the report


def hash_training_files(model: ChestXrayClassifier, files: list[tuple[str, Path]],
                        searched: str = "the training folders") -> TrainingHashes:
    """Each readable file of ``(name shown, path)`` decoded as the model does and hashed (unreadable
    ones are left out: the metadata baseline lists them)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        hashes = list(pool.map(_try_load(model, then=image_hash), [path for _, path in files]))
    readable = [i for i, h in enumerate(hashes) if not isinstance(h, str)]
    return TrainingHashes([files[i][0] for i in readable], cached_hashes([hashes[i] for i in readable]), searched)


def copies_audit(model: ChestXrayClassifier, images: list[np.ndarray], labels: np.ndarray, files: list[str],
                 training: TrainingHashes | None, probs: np.ndarray) -> dict[str, Any] | None:
    """Which evaluated images are copies of a training image (duplicates.py), and the figures without them;
    None when there is no training image to compare with."""
    if training is None or not training.names:
        return None
    report, copied = train_test_copies(cached_hashes([image_hash(im) for im in images]), labels, files,
                                       training.hashes, training.names, model.class_names)
    fresh, predicted = ~copied, probs.argmax(axis=1)
    report["accuracy_without"] = float((predicted[fresh] == labels[fresh]).mean()) if fresh.any() else None
    report["recall_without"] = {name: float((predicted[fresh & (labels == c)] == c).mean())
                                for c, name in enumerate(model.class_names) if (fresh & (labels == c)).any()}
    report["searched"] = training.searched
    if report["n"]:
        logger.warning("%d of %d evaluated images are copies of training images%s", report["n"], report["of"],
                       "" if report["accuracy_without"] is None else f"; without them accuracy is {report['accuracy_without']:.3f}")
    return report


def evaluate_external(model: ChestXrayClassifier, data_dir: str | Path, *, name: str | None = None,
                      batch_size: int = 16, training_images: TrainingHashes | None = None,
                      framing: bool = False, tone: bool = False,
                      subgroups: SubgroupTable | None = None) -> dict[str, Any]:
    """How a set from a source the model was not trained on is classified.

    The set may hold only some classes (a folder of adult normals): it reports the share predicted as
    each class, per true class, the accuracy, and how many inputs the model flagged as uncertain. With
    ``training_images`` (as for :func:`evaluate_model`), also how many of its images are copies of a
    training image: a set that holds some is not unseen. ``framing`` and ``tone`` add those checks per true class,
    ``subgroups`` the figures per group of the films its CSV describes.
    """
    class_names = model.class_names
    folder, problems = scan_image_folder(data_dir, class_names, partial=True, name=name)
    if problems:
        raise DatasetError("cannot evaluate:\n  - " + "\n  - ".join(problems))
    images, labels, paths, errors = _decode(model, folder)
    inference = model.infer(images, batch_size=batch_size)
    probs = inference.probabilities.numpy()
    predicted = probs.argmax(axis=1)
    reasons = inference.reasons(images, model.config)
    uncertain = np.array([bool(r) for r in reasons])
    present = [c for c in range(len(class_names)) if (labels == c).any()]

    def shares(mask: np.ndarray) -> dict[str, float | None]:  # None where no image is left to share out
        return predicted_shares(predicted, mask, class_names)

    result = {
        "name": folder.source_names[0],
        "n": len(labels),
        "true_counts": {class_names[c]: int((labels == c).sum()) for c in present},
        "predicted_share": shares(np.ones(len(labels), bool)),
        "predicted_share_by_true_class": {class_names[c]: shares(labels == c) for c in present},
        "accuracy": float((predicted == labels).mean()) if len(labels) else None,
        "uncertain_rate": float(uncertain.mean()) if len(labels) else None,
        "predicted_share_when_not_uncertain": shares(~uncertain),
        "ood": ood_summary(reasons, model.config),
        "unreadable_files": errors,
        "model_fingerprint": weights_fingerprint(model),
    }
    copies = copies_audit(model, images, labels, [relative_name(p, data_dir) for p in paths], training_images, probs)
    if copies is not None:
        result["train_copies"] = copies
    if framing:
        result["framing"] = framing_check(model, paths, [class_names[c] for c in labels], batch_size=batch_size)
    if tone:
        result["tone"] = tone_check(model, paths, [class_names[c] for c in labels], batch_size=batch_size)
    if subgroups is not None:
        result["subgroups"] = subgroup_figures(subgroups, paths, labels, probs, uncertain, class_names)
    called = ", ".join(f"{share:.0%} {cls}" for cls, share in result["predicted_share"].items())
    result["summary"] = f"{result['n']} images ({', '.join(f'{k} {v}' for k, v in result['true_counts'].items())}): called {called}; " \
                        f"accuracy {result['accuracy']:.3f}; flagged uncertain {result['uncertain_rate']:.0%}"
    return result


def external_summary(result: dict[str, Any]) -> str:
    lines = [f"n = {result['n']} ({', '.join(f'{k} {v}' for k, v in result['true_counts'].items())})",
             f"{'true class':18s} " + " ".join(f"{'-> ' + c:>20s}" for c in result["predicted_share"])]
    for true, shares in result["predicted_share_by_true_class"].items():
        lines.append(f"{true:18s} " + " ".join(f"{share:20.1%}" for share in shares.values()))
    lines += [f"accuracy {result['accuracy']:.3f}", f"flagged as uncertain: {result['ood']['flagged']} of {result['n']}"]
    if "train_copies" in result:
        lines += copies_lines(result["train_copies"])
    for check in ("framing", "tone"):
        if check in result:
            lines += framing_lines(result[check], list(result["predicted_share"]))
    if "subgroups" in result:
        lines += subgroup_lines(result["subgroups"], list(result["predicted_share"]))
    lines += unreadable_lines(result["unreadable_files"])
    return "\n".join(lines)


def ood_summary(reasons: list[list[str]], config, labels=None, class_names: list[str] | None = None) -> dict[str, Any]:
    """How many inputs were flagged uncertain, and by the feature gate; per true class when labels are given
    (a gate that fires on one class only says that class's images differ from its training images)."""
    flagged = np.array([bool(r) for r in reasons], dtype=bool)
    by_feature = [any(x.startswith("unlike the training X-rays") for x in r) for r in reasons]
    summary = {"flagged_rate": float(flagged.mean()) if len(flagged) else 0.0, "flagged": int(flagged.sum()),
               "feature_flagged": int(sum(by_feature)), "feature_threshold": config.feature_threshold,
               "feature_fpr": config.feature_fpr, "min_confidence": config.min_confidence, "max_chroma": config.max_chroma}
    if labels is not None and class_names is not None:
        summary["flagged_by_class"] = flagged_by_class(flagged, labels, class_names)
    return summary


def _decode(model: ChestXrayClassifier, folder) -> tuple[list[np.ndarray], np.ndarray, list[Path], list[str]]:
    """Every file decoded once (unreadable ones listed, not fatal): images, labels, paths, errors."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        decoded = list(pool.map(_try_load(model), folder.paths))
    # Named within their set (CLASS/FILE), as every file in metrics.json: the file may be shared.
    decoded = [relative_message(d, path, folder.root) if isinstance(d, str) else d for d, path in zip(decoded, folder.paths)]
    errors = [d for d in decoded if isinstance(d, str)]
    keep = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
    if errors and not keep:
        shown = errors[:10] + ([f"... and {len(errors) - 10} more"] if len(errors) > 10 else [])
        raise DatasetError(f"cannot evaluate {folder.root}: none of its {len(errors)} image files can be read:\n  - "
                           + "\n  - ".join(shown))
    return ([decoded[i] for i in keep], np.array([folder.labels[i] for i in keep], dtype=np.int64),
            [folder.paths[i] for i in keep], errors)


def _try_load(model, then=None):
    """Decode a file as the model does (then apply ``then``), or return the error message."""
    def load(path):
        try:
            image = model.preprocessor.load(path)
        except ImageLoadError as err:
            return str(err)
        return image if then is None else then(image)
    return load


@torch.inference_mode()
def _probabilities(model: ChestXrayClassifier, images: list[np.ndarray], batch_size: int) -> np.ndarray:
    return model.predict_proba(images, batch_size=batch_size).numpy().astype(np.float64)


FIGURES = ("confusion_matrix.png", "reliability.png", "misclassified.png")


def remove_stale_evaluation(output: Path, names: list[str]) -> None:
    """What an earlier evaluation into ``output`` wrote that this one does not overwrite: its figures
    of one set (now there are several) or the folders of sets not evaluated now. Found from the earlier
    metrics.json, so nothing else in the folder (a model beside its results) is touched."""
    try:
        earlier = json.loads((output / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(earlier, dict):
        return
    stale = []
    if "sets" in earlier and isinstance(earlier["sets"], dict):
        stale += [output / name for name in earlier["sets"] if name not in names or len(names) == 1]
    elif "confusion_matrix" in earlier and len(names) > 1:
        stale += [output / name for name in FIGURES]
    inside = Path(os.path.realpath(output))
    for path in stale:
        if path.name in ("", ".", "..") or Path(os.path.realpath(path)).parent != inside:
            continue  # only entries of the output folder itself
        if path.is_dir() and (path / "metrics.json").is_file():
            shutil.rmtree(path)
        elif path.is_file() and path.name in FIGURES:
            path.unlink()


def remove_figures(folder: Path) -> None:
    """A set's figures from an earlier evaluation, where this one has none (a set with only some classes)."""
    for name in FIGURES:
        (folder / name).unlink(missing_ok=True)


def write_outputs(metrics, images, probs, labels, order, class_names, out: Path) -> None:
    from .reports import plot_confusion_matrix, plot_contact_sheet, plot_reliability

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    plot_confusion_matrix(metrics["confusion_matrix"], class_names, out / "confusion_matrix.png", title=f"n = {metrics['n']}")
    plot_reliability(metrics["reliability"], metrics["ece"], out / "reliability.png")
    wrong = [i for i in order if probs[i].argmax() != labels[i]][:16] or list(order[:8])
    plot_contact_sheet([images[i] for i in wrong],
                       [f"true {class_names[labels[i]]}\npred {class_names[int(probs[i].argmax())]} ({probs[i].max():.2f})" for i in wrong],
                       out / "misclassified.png")


def summary(metrics: dict[str, Any]) -> str:
    ci = metrics["ci"]
    audit = metrics["audit"]
    lines = [
        f"n = {metrics['n']}",
        f"accuracy     {metrics['accuracy']:.3f}  (95% CI {ci['accuracy'][0]:.3f}–{ci['accuracy'][1]:.3f})",
        f"macro-F1     {metrics['macro_f1']:.3f}  (95% CI {ci['macro_f1'][0]:.3f}–{ci['macro_f1'][1]:.3f})",
    ]
    if metrics["roc_auc"] and metrics["roc_auc"]["macro"] is not None and ci["macro_auc"]:
        lines.append(f"macro AUC    {metrics['roc_auc']['macro']:.3f}  (95% CI {ci['macro_auc'][0]:.3f}–{ci['macro_auc'][1]:.3f})")
    lines.append(f"ECE          {metrics['ece']:.3f}")
    lines.append(f"{'class':18s} {'prec':>6s} {'recall':>6s} {'spec':>6s} {'F1':>6s} {'n':>4s}")
    for name, row in metrics["per_class"].items():
        lines.append(f"{name:18s} {row['precision']:6.3f} {row['recall']:6.3f} {row['specificity']:6.3f} {row['f1']:6.3f} {row['support']:4d}")
    lines.append(f"confusion (rows true, cols predicted): {metrics['confusion_matrix']}")
    meta = audit["metadata_baseline_accuracy"]
    lines += [
        "shortcut audit:",
        f"  metadata-only classifier  {meta:.3f}" if meta is not None else
        f"  metadata-only classifier  n/a ({audit.get('metadata_baseline_unavailable') or 'no --train-dir'})",
        f"  model, lungs hidden       {audit['center_masked_accuracy']:.3f}",
        f"  model, only lungs kept    {audit['center_only_accuracy']:.3f}",
        f"  majority class            {audit['majority_class_accuracy']:.3f}",
        f"  -> {audit['verdict']}",
        *copies_lines(audit.get("train_copies")),
        *(framing_lines(audit["framing"], metrics["class_names"]) if "framing" in audit else []),
        *(framing_lines(audit["tone"], metrics["class_names"]) if "tone" in audit else []),
        f"flagged as uncertain: {metrics['ood']['flagged']} of {metrics['n']}"
        + flagged_by_class_text(metrics["ood"]),
        *(subgroup_lines(metrics["subgroups"], metrics["class_names"]) if "subgroups" in metrics else []),
    ]
    lines += unreadable_lines(metrics["unreadable_files"])
    if audit.get("unreadable_train_files"):
        lines.append(f"unreadable training files left out of the metadata baseline: {len(audit['unreadable_train_files'])}")
    return "\n".join(lines)


def unreadable_lines(errors: list[str]) -> list[str]:
    """Each file that could not be read, by name and problem: it is not in any figure above."""
    if not errors:
        return []
    return [f"unreadable files skipped ({len(errors)}; not in the figures above):", *(f"  - {e}" for e in errors)]


def copies_lines(copies: dict[str, Any] | None) -> list[str]:
    if copies is None:
        return ["copies of training images: not checked (no readable training image to compare with; --train-dir names the training folders)"]
    by_class = ", ".join(f"{name} {row['copies']} of {row['n']}" for name, row in copies["by_class"].items())
    lines = [f"copies of training images: {copies['n']} of {copies['of']} ({by_class})"]
    if copies["n"] and copies["accuracy_without"] is not None:
        lines.append(f"  accuracy without them     {copies['accuracy_without']:.3f} on {copies['of'] - copies['n']} images")
    return lines


def flagged_by_class_text(ood: dict[str, Any]) -> str:
    by_class = ood.get("flagged_by_class")
    if not by_class:
        return ""
    return " (" + ", ".join(f"{name} {row['flagged']} of {row['n']}" for name, row in by_class.items()) + ")"
