"""Shortcut audit: how far can one get on this data without looking at the lungs?

1. A metadata-only baseline: a random forest trained on each training file's height, width, aspect
   ratio, bytes per pixel and format alone, scored on the evaluation split.
2. A lungs-hidden test: the model's accuracy when the central region of every image is blanked,
   and when only the central region is kept.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .data import relative_message
from .preprocess import ImageLoadError, header_size, sniff_format

FORMATS = ("JPEG", "PNG", "DICOM", "other")
# The central box (fractions of height and width) that holds the lungs on a PA chest film.
CENTER_BOX = (0.2, 0.8, 0.2, 0.8)


def file_metadata(path: str | Path) -> list[float]:
    """[height, width, aspect, bytes per pixel, one-hot format] from the header, without decoding pixels.

    Raises :class:`ImageLoadError`, naming the file, for anything that cannot be read as an image.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(1 << 16)
        size = os.path.getsize(path)
    except OSError as err:
        raise ImageLoadError(f"{path}: cannot read file ({err.strerror or err})") from None
    fmt = sniff_format(head) or "other"
    if fmt == "DICOM":
        import pydicom

        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)  # also files without the preamble
            height, width = int(ds.Rows), int(ds.Columns)
        except Exception as err:  # noqa: BLE001 - pydicom raises many types for broken headers
            raise ImageLoadError(f"{path}: cannot read DICOM header ({err})") from None
    elif fmt == "other":
        raise ImageLoadError(f"{path}: cannot read image header (not a supported image format)")
    else:
        # The decoder's header reader, without PIL's decompression-bomb limit: the audit decodes nothing.
        width, height = header_size(path, fmt, str(path))
    if height <= 0 or width <= 0:
        raise ImageLoadError(f"{path}: image header declares {width}x{height} pixels")
    onehot = [1.0 if fmt == f else 0.0 for f in FORMATS[:-1]]
    onehot.append(1.0 if fmt not in FORMATS[:-1] else 0.0)
    return [float(height), float(width), width / height, size / (height * width), *onehot]


def metadata_baseline(train_paths, train_labels, eval_paths, eval_labels, *, seed: int = 0, root=None) -> dict:
    """Fit a random forest on training-file metadata; score it on the evaluation files.

    Unreadable training files are left out and listed in ``unreadable_train_files`` (one bad file
    in the training folder must not stop an evaluation); with none readable, the scores are None.
    """
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.metrics import f1_score

    rows, kept_labels, unreadable = [], [], []
    for path, label in zip(train_paths, train_labels):
        try:
            rows.append(file_metadata(path))
        except ImageLoadError as err:
            unreadable.append(relative_message(str(err), path, root) if root is not None else str(err))
            continue
        kept_labels.append(label)
    result = {
        "accuracy": None,
        "macro_f1": None,
        "features": ["height", "width", "aspect", "bytes_per_pixel", *[f"format_{f.lower()}" for f in FORMATS]],
        "n_train": len(rows),
        "unreadable_train_files": unreadable,
    }
    if not rows:
        return result
    x_eval, y_eval = [], []
    for path, label in zip(eval_paths, eval_labels):  # files the model read; their headers almost always are too
        try:
            x_eval.append(file_metadata(path))
            y_eval.append(label)
        except ImageLoadError:
            continue
    if not x_eval:
        return result
    forest = RandomForestClassifier(n_estimators=300, random_state=seed).fit(np.array(rows), kept_labels)
    predictions = forest.predict(np.array(x_eval))
    result.update(accuracy=float((predictions == np.asarray(y_eval)).mean()),
                  macro_f1=float(f1_score(y_eval, predictions, average="macro")))
    return result


def mask_center(image: np.ndarray, *, keep: bool) -> np.ndarray:
    """Blank the central box (``keep=False``) or everything but it (``keep=True``) with the image's median grey."""
    h, w = image.shape[:2]
    top, bottom, left, right = int(CENTER_BOX[0] * h), int(CENTER_BOX[1] * h), int(CENTER_BOX[2] * w), int(CENTER_BOX[3] * w)
    fill = np.median(image, axis=(0, 1)).astype(image.dtype)
    out = image.copy()
    if keep:
        inner = image[top:bottom, left:right].copy()
        out[:] = fill
        out[top:bottom, left:right] = inner
    else:
        out[top:bottom, left:right] = fill
    return out


def verdict(model_accuracy: float, metadata_accuracy: float | None, center_masked_accuracy: float, chance: float) -> str:
    """A plain-language reading of the audit figures (``metadata_accuracy`` None: that check did not run)."""
    notes = []
    if metadata_accuracy is not None and metadata_accuracy >= max(0.6, chance + 0.25):
        notes.append(f"file metadata alone reaches {metadata_accuracy:.0%}: the classes differ by source, not only by anatomy")
    if center_masked_accuracy >= max(chance + 0.2, model_accuracy - 0.1):
        notes.append(f"with the lungs hidden the model still scores {center_masked_accuracy:.0%}: it reads cues outside the lungs")
    if notes:
        return "; ".join(notes)
    if metadata_accuracy is None:
        return ("no shortcut detected with the lungs hidden; the metadata check did not run (no training folder), "
                "and neither proves there is none")
    return "no shortcut detected by these two checks (which does not prove there is none)"
