"""Classification metrics over whole datasets (never averaged per batch), via scikit-learn."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# scikit-learn is imported inside the functions: it costs ~2 s of start-up that training overlaps
# with its first epoch instead (see runtime.preimport).


def classification_metrics(
    labels: Sequence[int] | np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    *,
    n_bins: int = 10,
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/specificity/F1/support, ROC-AUC, ECE, confusion matrix.

    ``probabilities`` is ``(N, C)``; predictions are its argmax. Keys are stable and documented in
    docs/metrics.md.
    """
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    k = len(class_names)
    predictions = probabilities.argmax(axis=1) if len(labels) else np.zeros(0, np.int64)
    ids = list(range(k))
    cm = confusion_matrix(labels, predictions, labels=ids) if len(labels) else np.zeros((k, k), np.int64)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=ids, zero_division=0
    )
    per_class = {}
    total = int(cm.sum())
    for i, name in enumerate(class_names):
        tp = int(cm[i, i])
        fp = int(cm[:, i].sum() - tp)
        fn = int(cm[i, :].sum() - tp)
        tn = total - tp - fp - fn
        per_class[name] = {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "specificity": float(tn / (tn + fp)) if (tn + fp) else 0.0,
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
    return {
        "n": int(len(labels)),
        "accuracy": float((predictions == labels).mean()) if len(labels) else 0.0,
        "macro_f1": float(f1_score(labels, predictions, labels=ids, average="macro", zero_division=0)) if len(labels) else 0.0,
        "per_class": per_class,
        "roc_auc": roc_auc(labels, probabilities, class_names),
        "ece": expected_calibration_error(labels, probabilities, n_bins=n_bins),
        "confusion_matrix": cm.astype(int).tolist(),
        "class_names": list(class_names),
    }


def roc_auc(labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]) -> dict[str, float | None] | None:
    """One-vs-rest ROC-AUC per class and macro; None for a class absent (or alone) in ``labels``."""
    from sklearn.metrics import roc_auc_score

    if len(labels) == 0:
        return None
    per_class: dict[str, float | None] = {}
    for i, name in enumerate(class_names):
        positives = labels == i
        per_class[name] = float(roc_auc_score(positives, probabilities[:, i])) if 0 < positives.sum() < len(labels) else None
    defined = [v for v in per_class.values() if v is not None]
    return {"macro": float(np.mean(defined)) if defined else None, "per_class": per_class}


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, *, n_bins: int = 10) -> float | None:
    """Top-label ECE with equal-width confidence bins."""
    if len(labels) == 0:
        return None
    stats = reliability_bins(labels, probabilities, n_bins=n_bins)
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in stats) / len(labels))


def reliability_bins(labels: np.ndarray, probabilities: np.ndarray, *, n_bins: int = 10) -> list[dict[str, float]]:
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0, 1, n_bins + 1)
    bins = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (confidence > lo) & (confidence <= hi) if lo > 0 else (confidence >= lo) & (confidence <= hi)
        if mask.any():
            bins.append({"lo": float(lo), "hi": float(hi), "count": int(mask.sum()),
                         "accuracy": float(correct[mask].mean()), "confidence": float(confidence[mask].mean())})
    return bins


def bootstrap_ci(
    labels: np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, list[float] | None]:
    """Percentile bootstrap intervals for accuracy, macro-F1 and macro ROC-AUC."""
    from sklearn.metrics import f1_score

    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    rng = np.random.default_rng(seed)
    n = len(labels)
    ids = list(range(len(class_names)))
    samples: dict[str, list[float]] = {"accuracy": [], "macro_f1": [], "macro_auc": []}
    for _ in range(n_resamples):
        idx = rng.integers(0, n, n)
        y, p = labels[idx], probabilities[idx]
        pred = p.argmax(axis=1)
        samples["accuracy"].append(float((pred == y).mean()))
        samples["macro_f1"].append(float(f1_score(y, pred, labels=ids, average="macro", zero_division=0)))
        auc = roc_auc(y, p, class_names)
        if auc and auc["macro"] is not None:
            samples["macro_auc"].append(auc["macro"])
    alpha = (1 - confidence) / 2
    return {
        key: [float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))] if values else None
        for key, values in samples.items()
    }


def flagged_by_class(flags, labels, class_names: Sequence[str]) -> dict[str, dict[str, int]]:
    """``{class: {"flagged": k, "n": n}}`` over the classes present: how a flag's rate splits by true class."""
    flags, labels = np.asarray(flags, dtype=bool), np.asarray(labels)
    return {name: {"flagged": int(flags[labels == c].sum()), "n": int((labels == c).sum())}
            for c, name in enumerate(class_names) if (labels == c).any()}


def predicted_shares(predicted, mask, class_names: Sequence[str]) -> dict[str, float | None]:
    """``{class: share}`` of the images in ``mask`` predicted as each class (None where the mask is empty)."""
    predicted, mask = np.asarray(predicted), np.asarray(mask, dtype=bool)
    return {name: float((predicted[mask] == c).mean()) if mask.any() else None for c, name in enumerate(class_names)}


def called_as(metrics: dict, true: str, predicted: str) -> tuple[int, int] | None:
    """``(images of class true called predicted, images of class true)`` from a metrics record's confusion
    matrix, or None when the record has none or lacks either class."""
    try:
        names, matrix = list(metrics["class_names"]), metrics["confusion_matrix"]
        row = matrix[names.index(true)]
        return int(row[names.index(predicted)]), int(sum(row))
    except (KeyError, ValueError, IndexError, TypeError):
        return None
