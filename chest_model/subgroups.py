"""Figures per subgroup of the evaluated films (view, sex, age band, site ...), from a CSV that describes them.

A model can be right on average and wrong for one kind of film: models trained on this dataset
without one adult-normal source call that source's normal AP films, and men's, Covid more often
than the rest. The figures per group show that where the overall ones cannot.

The CSV has a ``file`` column and one column per attribute. A row describes an evaluated image when its
``file`` is the image's path or the last parts of it (``00001280_004.png``, ``Normal/00001280_004.png``
or ``nih/Normal/00001280_004.png`` all describe ``.../nih/Normal/00001280_004.png``). A numeric column
with many values (age) is cut into four bands at its quartiles over the evaluated images.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np

from .errors import ChestModelError
from .metrics import predicted_shares

MAX_LEVELS = 8  # a numeric column with more distinct values than this is reported in bands
NOT_LISTED, BLANK = "(not in the CSV)", "(blank)"


class SubgroupError(ChestModelError, ValueError):
    """A subgroup CSV that cannot be used; the message names the file and what is wrong."""


@dataclass
class SubgroupTable:
    paths: list[Path]
    columns: list[str]
    rows: dict[str, dict[str, str]]   # the ``file`` value, as a posix path -> its row

    def row_for(self, image: str | Path) -> dict[str, str] | None:
        """The row describing ``image``: the longest tail of its path that the CSVs list."""
        key = self.key_for(image)
        return None if key is None else self.rows[key]

    def key_for(self, image: str | Path) -> str | None:
        parts = Path(image).parts
        for start in range(len(parts)):
            key = PurePosixPath(*parts[start:]).as_posix()
            if key in self.rows:
                return key
        return None

    def rows_for(self, images: Sequence[str | Path]) -> list[dict[str, str] | None]:
        """Each image's row; a row that describes several of the images (a bare file name that several
        class folders share, as in the tutorial's dataset) is a SubgroupError naming them."""
        keys = [self.key_for(image) for image in images]
        shared: dict[str, list[str]] = {}
        for key, image in zip(keys, images):
            if key is not None:
                shared.setdefault(key, []).append(Path(image).as_posix())
        shared = {key: found for key, found in shared.items() if len(found) > 1}
        if shared:
            key, found = next(iter(shared.items()))
            tails = ", ".join("/".join(Path(f).parts[-2:]) for f in found[:3])
            raise SubgroupError(f"{', '.join(map(str, self.paths))}: {len(shared)} row(s) describe several images at once, "
                                f"e.g. {key!r} describes {len(found)} ({tails}); give each 'file' enough of its path "
                                "to name one image (e.g. Normal/0101.jpeg)")
        return [None if key is None else self.rows[key] for key in keys]


def read_subgroup_table(paths: Sequence[str | Path], columns: Sequence[str]) -> SubgroupTable:
    """The CSVs at ``paths`` as one table of ``columns`` by file (a column one CSV lacks is blank in its rows);
    a SubgroupError names the file and what is wrong."""
    columns = [c.strip() for spec in columns for c in spec.split(",") if c.strip()]
    if not columns:
        raise SubgroupError("name the CSV columns to report with --subgroup-by (e.g. --subgroup-by view)")
    rows: dict[str, dict[str, str]] = {}
    found: set[str] = set()
    for path in map(Path, paths):
        header, records = _read_csv(path)
        if "file" not in header:
            raise SubgroupError(f"{path}: no 'file' column naming the images; its columns are "
                                f"{', '.join(map(repr, header)) or 'none'}")
        found.update(header)
        for line, record in enumerate(records, start=2):
            name = PurePosixPath((record.get("file") or "").strip().replace("\\", "/")).as_posix()
            if name in ("", "."):
                raise SubgroupError(f"{path}, line {line}: empty 'file'")
            if name in rows:
                raise SubgroupError(f"{path}, line {line}: {name!r} is listed twice")
            rows[name] = {c: (record.get(c) or "").strip() for c in columns}
    missing = [c for c in columns if c not in found]
    if missing:
        raise SubgroupError(f"{', '.join(map(str, paths))}: no column {', '.join(map(repr, missing))}")
    return SubgroupTable([Path(p) for p in paths], columns, rows)


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows; the delimiter is the header's commonest of comma, semicolon and tab (spreadsheets
    in many locales write semicolons), and spaces around names are ignored."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise SubgroupError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SubgroupError(f"{path}: cannot be read as a CSV file ({err})") from None
    header_line = text.splitlines()[0] if text else ""
    delimiter = max(",;\t", key=header_line.count)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, skipinitialspace=True)
        header = [name.strip() for name in reader.fieldnames or []]
        reader.fieldnames = header
        return header, list(reader)
    except csv.Error as err:
        raise SubgroupError(f"{path}: cannot be read as a CSV file ({err})") from None


def subgroup_figures(table: SubgroupTable, files: Sequence[str | Path], labels: np.ndarray, probabilities: np.ndarray,
                     uncertain: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Per column, per value: how many images, how they were called (per true class too), accuracy, uncertain rate."""
    rows = table.rows_for(files)
    predicted = np.asarray(probabilities).argmax(axis=1)
    labels, uncertain = np.asarray(labels), np.asarray(uncertain, dtype=bool)
    report: dict[str, Any] = {"csv": [p.name for p in table.paths], "not_listed": sum(r is None for r in rows), "columns": {}}
    for column in table.columns:
        values = [BLANK if r is not None and not r[column] else (NOT_LISTED if r is None else r[column]) for r in rows]
        groups = _bands(values) or values
        report["columns"][column] = {g: _figures(np.array([x == g for x in groups]), labels, predicted, uncertain, class_names)
                                     for g in _ordered(groups, values)}
    return report


def subgroup_lines(report: dict[str, Any], class_names: Sequence[str]) -> list[str]:
    """The printed table: one block per column, one line per group."""
    lines = [f"subgroups (from {', '.join(report['csv'])}" + (f"; {report['not_listed']} images not in it)" if report["not_listed"] else ")")]
    for column, groups in report["columns"].items():
        lines.append(f"  {column:24s} {'n':>4s} {'accuracy':>9s} " + " ".join(f"{'-> ' + c:>18s}" for c in class_names)
                     + f" {'uncertain':>10s}")
        for value, row in groups.items():
            shares = " ".join(f"{row['predicted_share'][c]:18.0%}" for c in class_names)
            lines.append(f"  {value[:24]:24s} {row['n']:4d} {row['accuracy']:9.3f} {shares} {row['uncertain_rate']:10.0%}")
    return lines


def _figures(mask, labels, predicted, uncertain, class_names) -> dict[str, Any]:
    present = [c for c in range(len(class_names)) if (mask & (labels == c)).any()]
    return {"n": int(mask.sum()), "accuracy": float((predicted[mask] == labels[mask]).mean()),
            "predicted_share": predicted_shares(predicted, mask, class_names),
            "predicted_share_by_true_class": {class_names[c]: predicted_shares(predicted, mask & (labels == c), class_names)
                                              for c in present},
            "uncertain_rate": float(uncertain[mask].mean())}


def _number(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _bands(values: list[str]) -> list[str] | None:
    """Quartile bands of a numeric column with many values ("18-35"), or None to report each value.
    A few words among the numbers ("unknown") stay groups of their own."""
    parsed = {v: _number(v) for v in set(values) if v not in (BLANK, NOT_LISTED)}
    numbers = {v: n for v, n in parsed.items() if n is not None}
    if len(numbers) <= MAX_LEVELS or len(parsed) - len(numbers) > 2:
        return None
    measured = np.array([numbers[v] for v in values if v in numbers])
    whole = all(float(n).is_integer() for n in numbers.values())
    edges = np.quantile(measured, [0, 0.25, 0.5, 0.75])
    edges = np.unique(np.ceil(edges) if whole else edges)  # whole-number bands for ages and counts
    top = measured.max()
    labels = []
    for i, low in enumerate(edges):
        high = edges[i + 1] if i + 1 < len(edges) else None
        if whole:
            labels.append(f"{low:g}-{(high - 1 if high is not None else top):g}")
        else:
            labels.append(f"{low:.3g} to <{high:.3g}" if high is not None else f"{low:.3g} to {top:.3g}")
    def band(v: str) -> str:
        if v not in numbers:
            return v
        return labels[int(np.searchsorted(edges, numbers[v], side="right")) - 1]
    return [band(v) for v in values]


def _ordered(groups: list[str], values: list[str]) -> list[str]:
    """Bands and numbers in numeric order, other values alphabetically, blanks and unlisted last."""
    lowest: dict[str, float] = {}
    for group, value in zip(groups, values):
        number = _number(value)
        if number is not None:
            lowest[group] = min(lowest.get(group, number), number)

    def key(group: str):
        if group in (BLANK, NOT_LISTED):
            return (2, 0.0, group)
        return (0, lowest[group], group) if group in lowest else (1, 0.0, group)
    return sorted(set(groups), key=key)
