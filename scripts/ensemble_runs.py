"""How an average of several runs classifies a folder, beside each run alone (a measurement tool).

    python scripts/ensemble_runs.py --data-dir data/adult-normal/nih-cxr8-darkcovidnet runs/loso-nih runs/loso-nih-seed2023

Each run is a saved model folder; the ensemble averages their calibrated probabilities per image
(the runs must share class names). Prints, per run and for the average of every subset of two or
more runs, the share of the folder's images called each class; then, per class, how many images 0, 1,
... of the runs call it (runs that err on the same films err on hard films, not by seed noise, and
averaging them cannot help). Nothing is chosen or saved.
"""
from __future__ import annotations

import argparse
from itertools import combinations
from pathlib import Path

import numpy as np

from chest_model import ChestXrayClassifier
from chest_model.data import image_files_under


def folder_images(root: Path) -> list[Path]:
    files = image_files_under(root)
    if not files:
        raise SystemExit(f"error: no image files under {root}")
    return files


def shares(probabilities: np.ndarray, class_names: list[str]) -> str:
    calls = np.bincount(probabilities.argmax(1), minlength=len(class_names)) / len(probabilities)
    return ", ".join(f"{name} {share:.0%}" for name, share in zip(class_names, calls))


def agreement(calls: np.ndarray, c: int) -> np.ndarray:
    """How many images ``k`` of the runs call class ``c``, for k = 0 .. runs (``calls``: runs x images)."""
    return np.bincount((calls == c).sum(axis=0), minlength=len(calls) + 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="saved model folders")
    parser.add_argument("--data-dir", required=True, type=Path, help="a folder of images (searched recursively)")
    args = parser.parse_args(argv)

    files = [str(p) for p in folder_images(args.data_dir)]
    probabilities, class_names = [], None
    for run in args.runs:
        model = ChestXrayClassifier.from_pretrained(run)
        if class_names is not None and model.class_names != class_names:
            raise SystemExit(f"error: {run} has classes {model.class_names}, not {class_names}")
        class_names = model.class_names
        results = model.predict(files, precision="auto")
        probabilities.append(np.array([[r[c] for c in class_names] for r in results]))
        flagged = np.mean([r.uncertain for r in results])
        print(f"{run.name}: {shares(probabilities[-1], class_names)}; flagged uncertain {flagged:.0%}")
    print(f"{len(files)} images in {args.data_dir.name}")
    for k in range(2, len(args.runs) + 1):
        for subset in combinations(range(len(args.runs)), k):
            average = np.mean([probabilities[i] for i in subset], axis=0)
            names = " + ".join(args.runs[i].name for i in subset)
            print(f"average of {names}: {shares(average, class_names)}")
    # Whether the runs err on the same images (hard films) or each on its own (seed noise an average removes).
    calls = np.stack([p.argmax(1) for p in probabilities])
    for c, name in enumerate(class_names):
        votes = agreement(calls, c)
        if votes[1:].any():
            print(f"called {name} by 0, 1, ..., {len(args.runs)} of the runs: {', '.join(map(str, votes))} images")


if __name__ == "__main__":
    main()
