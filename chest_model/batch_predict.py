"""Prediction over many files and folders: one row per file, a CSV table, optional Grad-CAM overlays.

Each file is decoded once; the decoded images go through ``model.analyze`` in batches, so memory
stays at one batch of images however large the folder is. A file that cannot be read gets its error
in its own row and the others still get predictions.
"""
from __future__ import annotations

import csv
import io
import math
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .data import image_files_under
from .errors import ChestModelError
from .preprocess import ImageLoadError

FIXED_COLUMNS = ("file", "label", "uncertain")


class ColumnClashError(ChestModelError, ValueError):
    """A class named like one of the CSV's own columns."""


def find_images(inputs: Iterable[str | os.PathLike]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files given by name, plus every image found in the folders given (recursively, in sorted order).

    Returns the files and the problems with the inputs themselves (a folder holding no image),
    as ``(path, message)`` pairs. A file named directly is kept whatever its extension: reading it
    says what is wrong with it.
    """
    files: list[Path] = []
    problems: list[tuple[Path, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = image_files_under(path)
            if not found:
                problems.append((path, f"{path}: folder holds no image files (searched recursively)"))
            files.extend(found)
        else:
            files.append(path)
    # A file named twice (in any spelling: relative, absolute, through ..), or also inside a named
    # folder, is predicted once, under the first name given.
    first_names: dict[str, Path] = {}
    for path in files:  # folders resolved, the file's own name kept: two links to one blob stay two files
        absolute = os.path.abspath(path)
        first_names.setdefault(os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute)), path)
    return list(first_names.values()), problems


def predict_files(model, files: Sequence[Path], *, batch_size: int = 16, gradcam_dir: str | Path | None = None,
                  progress=None) -> Iterator[dict[str, Any]]:
    """One record per file, in order: ``{"file", "label", "probabilities", "uncertain", "reasons", "error"}``.

    ``error`` is None for a file that was predicted. With ``gradcam_dir``, a Grad-CAM overlay of the
    predicted class is written for each predicted file at :func:`gradcam_path`. ``progress`` is
    called with the number of files finished after each batch.
    """
    root = _common_folder(files) if gradcam_dir else None
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        records: list[dict[str, Any]] = []
        decoded: list[tuple[int, Any]] = []
        for path in chunk:
            try:
                decoded.append((len(records), model.preprocessor.load(path)))
                records.append({"file": str(path), "error": None})
            except ImageLoadError as err:
                records.append(_error_record(path, str(err)))
        if decoded:
            results = model.analyze([image for _, image in decoded], batch_size=batch_size)
            for (index, image), result in zip(decoded, results):
                records[index].update(result)
                # A model whose output is not a number has nothing to explain; its record says why.
                if gradcam_dir and all(math.isfinite(p) for p in result["probabilities"].values()):
                    save_gradcam(model, image, gradcam_path(gradcam_dir, root, chunk[index]), name=str(chunk[index]))
        if progress is not None:
            progress(len(chunk))
        yield from records


def predict_inputs(model, inputs: Iterable[str | os.PathLike], *, batch_size: int = 16,
                   gradcam_dir: str | Path | None = None, progress: bool = False) -> Iterator[dict[str, Any]]:
    """Records for files and folders: first the inputs that hold nothing to predict, then every file found.

    ``progress`` shows a progress bar on stderr.
    """
    files, problems = find_images(inputs)
    yield from error_records(problems)
    if not progress:
        yield from predict_files(model, files, batch_size=batch_size, gradcam_dir=gradcam_dir)
        return
    from tqdm import tqdm

    with tqdm(total=len(files), unit="image", file=sys.stderr) as bar:
        yield from predict_files(model, files, batch_size=batch_size, gradcam_dir=gradcam_dir, progress=bar.update)


def predict_to_csv(model, inputs: Iterable[str | os.PathLike], output: str | Path, *, batch_size: int = 16,
                   gradcam_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Predict every file with a progress bar and write the table atomically; returns the records."""
    records = list(predict_inputs(model, inputs, batch_size=batch_size, gradcam_dir=gradcam_dir, progress=True))
    write_csv(output, records, model.class_names)
    return records


def _error_record(path: str | Path, error: str) -> dict[str, Any]:
    return {"file": str(path), "label": None, "probabilities": {}, "uncertain": None, "reasons": [], "error": error}


def error_records(problems: Iterable[tuple[Path, str]]) -> list[dict[str, Any]]:
    """Rows for inputs that are not files to predict (a folder without images)."""
    return [_error_record(path, message) for path, message in problems]


def _common_folder(files: Sequence[Path]) -> Path:
    folders = [os.path.dirname(os.path.abspath(f)) for f in files]  # abspath folds "..", which would climb out
    return Path(os.path.commonpath(folders)) if folders else Path.cwd()


def gradcam_path(gradcam_dir: str | Path, root: Path, file: Path) -> Path:
    """``gradcam_dir`` mirrors the inputs' folders below their common folder, so that two files with
    the same name in different folders keep apart: ``a/x.png`` -> ``GRADCAM/a/x.png.png``."""
    relative = Path(os.path.abspath(file)).relative_to(root)
    return Path(gradcam_dir) / relative.parent / f"{relative.name}.png"


def save_gradcam(model, image, path: Path, *, name: str) -> None:
    import cv2

    from .atomic import atomic_write_bytes
    from .explain import explain_image, overlay

    explanation = explain_image(model, image, name=name)
    ok, png = cv2.imencode(".png", overlay(explanation.image, explanation.heatmap)[:, :, ::-1])  # RGB -> BGR
    if not ok:  # pragma: no cover - encoding a valid uint8 image does not fail
        raise RuntimeError(f"{path}: could not encode the Grad-CAM overlay")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, png.tobytes())


def csv_columns(class_names: Sequence[str]) -> list[str]:
    clash = sorted(set(class_names) & {*FIXED_COLUMNS, "error"})
    if clash:
        raise ColumnClashError(f"this model's class name(s) {clash} would clash with the CSV's own columns; "
                               "print the results (or --json) instead of --csv")
    return [*FIXED_COLUMNS, *class_names, "error"]


def records_to_csv(records: Iterable[dict[str, Any]], class_names: Sequence[str]) -> str:
    """The table: ``file, label, uncertain, <one probability column per class>, error``."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=csv_columns(class_names), lineterminator="\n")
    writer.writeheader()
    for record in records:
        probabilities = record.get("probabilities") or {}
        writer.writerow({
            "file": record["file"],
            "label": record.get("label") or "",
            "uncertain": "" if record.get("uncertain") is None else record["uncertain"],
            **{name: f"{probabilities[name]:.6f}" if name in probabilities else "" for name in class_names},
            "error": record.get("error") or "",
        })
    return buffer.getvalue()


def write_csv(path: str | Path, records: Iterable[dict[str, Any]], class_names: Sequence[str]) -> None:
    from .atomic import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, records_to_csv(records, class_names))
