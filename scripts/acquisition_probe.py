"""What a run reads in films of one source: its validation films of that source, altered, classified again
(a measurement tool; nothing is chosen or saved).

    python scripts/acquisition_probe.py runs/r128-lr005-s2022-loso-rsna --source nih-cxr8

The run's validation split is rebuilt with the training code itself (run it from where the run's command
ran), so the films are ones the model did not train on. Each alteration is applied to the decoded file,
which then goes through the model's own preprocessing: smaller or compressed files (is the cue how a
source stores its films?) and drawn devices (ECG lead snaps with wires, burnt-in markers, a midline
tube: is it what portable ICU films carry?). Prints, per alteration, the share called Covid and the
mean Covid probability. The drawings are seeded, so a second run prints the same figures.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import cv2
import numpy as np

from chest_model import ChestXrayClassifier
from chest_model.training import rebuild_split


def draw_text(grey: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    grey = grey.copy()
    height, width = grey.shape
    cv2.putText(grey, "PORTABLE", (int(width * 0.05), int(height * 0.1)), cv2.FONT_HERSHEY_SIMPLEX, width / 600, 255, max(1, width // 300))
    cv2.putText(grey, "AP", (int(width * 0.8), int(height * 0.1)), cv2.FONT_HERSHEY_SIMPLEX, width / 400, 255, max(1, width // 250))
    return grey


def draw_leads(grey: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    grey = grey.copy()
    height, width = grey.shape
    for _ in range(4):
        snap = (int(rng.uniform(0.15, 0.85) * width), int(rng.uniform(0.15, 0.7) * height))
        cv2.circle(grey, snap, width // 60, 255, -1)
        wire = np.array([snap, (snap[0] + int(rng.uniform(-0.3, 0.3) * width), snap[1] + int(rng.uniform(0.1, 0.4) * height)),
                         (int(rng.uniform(0, 1) * width), height - 1)], np.int32)
        cv2.polylines(grey, [wire], False, 230, max(1, width // 250))
    return grey


def draw_tube(grey: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    grey = grey.copy()
    height, width = grey.shape
    path = np.array([(width // 2, 0), (width // 2 + width // 40, height // 4), (width // 2 + width // 30, height // 2)], np.int32)
    cv2.polylines(grey, [path], False, 240, max(2, width // 150))
    return grey


def _resized(side: int):
    return lambda grey, rng: cv2.resize(grey, (side, side), interpolation=cv2.INTER_AREA)


ALTERATIONS = {
    "unaltered": lambda grey, rng: grey,
    "downscaled to 224 px": _resized(224),
    "downscaled to 160 px": _resized(160),
    "downscaled to 128 px": _resized(128),
    "JPEG quality 30": lambda grey, rng: cv2.imdecode(cv2.imencode(".jpg", grey, [cv2.IMWRITE_JPEG_QUALITY, 30])[1], cv2.IMREAD_GRAYSCALE),
    "blurred (sigma 3 px)": lambda grey, rng: cv2.GaussianBlur(grey, (0, 0), 3),
    "burnt-in PORTABLE and AP": draw_text,
    "ECG leads with wires": draw_leads,
    "midline tube": draw_tube,
    "leads, markers and tube": lambda grey, rng: draw_tube(draw_leads(draw_text(grey, rng), rng), rng),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a training run folder (its train_config.json and model)")
    parser.add_argument("--source", required=True, help="the source whose validation films to alter, e.g. nih-cxr8")
    parser.add_argument("--seed", type=int, default=0, help="seeds the drawn devices")
    args = parser.parse_args(argv)
    record = json.loads((args.run / "train_config.json").read_text())
    model = ChestXrayClassifier.from_pretrained(args.run).eval()
    data, _ = rebuild_split(record, model.preprocessor)
    names = data.val.source_names
    films = [path for path, source in zip(data.val.paths, data.val.sources) if names[source] == args.source]
    if not films:
        raise SystemExit(f"error: the run's validation split holds no film of {args.source!r}; its sources are {', '.join(names)}")
    print(f"{len(films)} validation films of {args.source}, which {args.run.name} did not train on")
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, alter) in enumerate(ALTERATIONS.items()):
            rng = np.random.default_rng(args.seed)  # the same draws for every alteration that draws
            files = []
            for path in films:
                grey = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
                if grey is None:
                    raise SystemExit(f"error: {path}: cannot be decoded as an 8-bit image")
                files.append(str(Path(tmp) / f"{index}_{Path(path).stem}.png"))
                cv2.imwrite(files[-1], alter(grey, rng))
            answers = model.predict(files)
            called = np.mean([max(answer, key=answer.get) == "Covid" for answer in answers])
            print(f"{name:28s} called Covid {called:4.0%}   mean Covid probability {np.mean([a['Covid'] for a in answers]):.3f}")


if __name__ == "__main__":
    main()
