"""The ``chest-model`` command line: ``predict`` (and more subcommands as they land)."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

DEFAULT_MODEL_HELP = "a local model folder or a Hugging Face Hub repo id"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chest-model",
        description="Chest X-ray classifier (Normal / Covid / Viral Pneumonia). Research demo, not for clinical use.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    predict = sub.add_parser("predict", help="print class probabilities for image files")
    predict.add_argument("--model", required=True, help=DEFAULT_MODEL_HELP)
    predict.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    predict.add_argument("--json", action="store_true", help="print one JSON object per line")
    predict.add_argument("--batch-size", type=int, default=16)
    predict.add_argument("files", nargs="+", help="image files: JPEG, PNG, BMP, TIFF, GIF, WebP or DICOM")
    predict.set_defaults(func=run_predict)
    return parser


def run_predict(args: argparse.Namespace) -> int:
    from .hub import ModelLoadError
    from .model import ChestXrayClassifier
    from .preprocess import ImageLoadError

    try:
        model = ChestXrayClassifier.from_pretrained(args.model, revision=args.revision)
    except ModelLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    loaded, failures = [], 0
    for path in args.files:
        try:
            loaded.append((path, model.preprocessor.load(path)))
        except ImageLoadError as err:
            failures += 1
            _report(args, path, error=str(err))
    if loaded:
        probabilities = model.predict([image for _, image in loaded], batch_size=args.batch_size)
        for (path, _), probs in zip(loaded, probabilities):
            _report(args, path, probs=probs)
    return 1 if failures else 0


def _report(args: argparse.Namespace, path: str, *, probs: dict | None = None, error: str | None = None) -> None:
    if args.json:
        record = {"file": path, "error": error} if error else {"file": path, "prediction": max(probs, key=probs.get), "probabilities": probs}
        print(json.dumps(record), flush=True)
    elif error:
        print(f"{path}: ERROR {error}", file=sys.stderr, flush=True)
    else:
        top = max(probs, key=probs.get)
        scores = "  ".join(f"{name}={p:.3f}" for name, p in probs.items())
        print(f"{path}: {top}  ({scores})", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
