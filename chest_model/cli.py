"""The ``chest-model`` command line: ``predict`` (and more subcommands as they land)."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .entry import exit_with, missing_extra
from .errors import ChestModelError
from .precision import DEVICE_HELP, device_argument, inference_device
from .train_config import whole_number

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
    predict.add_argument("--device", type=device_argument, default="auto", help=DEVICE_HELP)
    output = predict.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print one JSON object per line (not with --csv)")
    predict.add_argument("--batch-size", type=whole_number(1), default=16, help="images per forward pass (default: 16)")
    output.add_argument("--csv", default=None, metavar="OUT.csv",
                         help="write one row per file (file, label, uncertain, one probability per class, error) "
                              "instead of printing, with a progress bar")
    predict.add_argument("--gradcam-dir", default=None, metavar="DIR",
                         help="also save a Grad-CAM overlay PNG per file, in folders mirroring the inputs'")
    predict.add_argument("files", nargs="+", help="image files (JPEG, PNG, BMP, TIFF, GIF, WebP or DICOM) or folders, "
                                                  "searched recursively (DICOM files without an extension are found by content)")
    predict.set_defaults(func=run_predict)

    export = sub.add_parser("export", help="export the model to ONNX, with its preprocessing in the metadata")
    export.add_argument("--model", required=True, help=DEFAULT_MODEL_HELP)
    export.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    export.add_argument("--output", required=True, metavar="F.onnx", help="where to write the ONNX model")
    export.set_defaults(func=run_export)

    evaluate = sub.add_parser("evaluate", help="metrics, confidence intervals, calibration and a shortcut audit on class folders")
    evaluate.add_argument("--model", required=True, help=DEFAULT_MODEL_HELP)
    evaluate.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    evaluate.add_argument("--device", type=device_argument, default="auto", help=DEVICE_HELP)
    evaluate.add_argument("--data-dir", required=True, action="append", metavar="[NAME=]PATH",
                          help="class folders to evaluate on (e.g. DATA/test); repeat it for several named sets, each reported "
                               "separately. A set holding only some classes (external adult normals) reports the share "
                               "predicted as each class")
    evaluate.add_argument("--train-dir", default=None, action="append", metavar="[NAME=]PATH",
                          help="training class folders (default: a sibling train/): the first is what the metadata-only "
                               "baseline learns from; all are searched for copies of the evaluated images, which the "
                               "report names NAME/CLASS/FILE (NAME defaults to the folder's name, or its parent's for "
                               "train/ and the like). Repeat it for a model trained on several sources")
    evaluate.add_argument("--output-dir", default=None, help="where to write metrics.json and figures (without it, the report is only printed)")
    evaluate.add_argument("--bootstrap", type=whole_number(1), default=1000, help="bootstrap resamples for the 95%% intervals (default: 1000)")
    evaluate.add_argument("--framing-check", action="store_true",
                          help="also classify every image cropped around its centre (tighter, portrait, landscape) and report, "
                               "per class, what it is called then: a model that learned how its sources frame the chest "
                               "changes its answer (five more passes over each set)")
    evaluate.add_argument("--tone-check", action="store_true",
                          help="also classify every image through a lighter and a darker tone (gamma) curve, as other "
                               "detectors render the same film, and report per class what it is called then (three more passes)")
    evaluate.add_argument("--subgroups", action="append", default=[], metavar="CSV",
                          help="a CSV describing the evaluated images: a 'file' column (the image's path, or its last parts, "
                               "e.g. Normal/x.png) and attribute columns; with --subgroup-by, every set is also reported per "
                               "group (repeat it for several CSVs)")
    evaluate.add_argument("--subgroup-by", action="append", default=[], metavar="COLUMN",
                          help="a --subgroups column to report by (view, sex, age ...; a numeric one with many values is cut "
                               "into quartile bands); repeat it or separate columns with commas")
    evaluate.set_defaults(func=run_evaluate)

    ood = sub.add_parser("ood-check", help="share of non-X-ray images (photographs, documents, other modalities) reported as uncertain")
    ood.add_argument("--model", required=True, help=DEFAULT_MODEL_HELP)
    ood.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    ood.add_argument("--device", type=device_argument, default="auto", help=DEVICE_HELP)
    ood.add_argument("--json", action="store_true", help="print the full report, one verdict per image, as JSON")
    ood.set_defaults(func=run_ood_check)

    card = sub.add_parser("card", help="render a model card from a model folder and a metrics.json")
    card.add_argument("--model", required=True, help="a local model folder")
    card.add_argument("--metrics", required=True, help="metrics.json from `chest-model evaluate`")
    card.add_argument("--output", default=None, help="where to write the card (default: MODEL/README.md)")
    card.set_defaults(func=run_card)

    space = sub.add_parser("space", help="assemble a folder that runs as a Hugging Face Space as it is")
    space.add_argument("--model", required=True, help=DEFAULT_MODEL_HELP + " (a folder is copied in; a repo id is named)")
    space.add_argument("--revision", default=None, help="Hub revision, for a repo id")
    space.add_argument("--output", required=True, metavar="DIR", help="the Space folder to write (new, empty, or an earlier Space)")
    space.add_argument("--examples", default=None, metavar="DIR", help="example images to offer (default: the project's examples/)")
    space.add_argument("--title", default=None, help="the Space's title")
    space.set_defaults(func=run_space)
    return parser


def run_evaluate(args: argparse.Namespace) -> int:
    from .atomic import atomic_write_text, check_not_an_input, check_writable_folder
    from .data import DatasetError, folders_shared_with_training, parse_data_dirs, scan_image_folder
    from .evaluation import (evaluate_external, evaluate_model, external_summary, folder_files, hash_training_files,
                             remove_figures, remove_stale_evaluation, summary)
    from .hub import weights_fingerprint
    from .subgroups import SubgroupError, read_subgroup_table

    sets = parse_data_dirs(args.data_dir)
    train_sources = parse_data_dirs(args.train_dir or [])
    reports = [name for name, _ in sets if Path(name).suffix.lower() in (".json", ".csv", ".png", ".md", ".txt")]
    if reports:  # each set's report is a folder of that name beside the files the evaluation writes
        raise DatasetError(f"set name(s) {reports} look like the report files of --output-dir; name each set with a "
                           "word, e.g. test=PATH")
    if args.output_dir:  # where the results go is checked before any work, not after the last set, never in a data folder
        check_writable_folder(args.output_dir)
        check_not_an_input(args.output_dir, input_folders=tuple(path for _, path in [*sets, *train_sources]))
    subgroups = None
    if args.subgroups or args.subgroup_by:
        if not args.subgroups:
            raise SubgroupError("--subgroup-by needs --subgroups CSV: the file that describes the images")
        subgroups = read_subgroup_table(args.subgroups, args.subgroup_by)
    model = _load_model(args)
    # Every set is checked before the first is evaluated, so a mistake in the last costs nothing.
    problems = [p for name, path in sets for p in scan_image_folder(path, model.class_names, partial=True, name=name)[1]]
    if problems:
        raise DatasetError("cannot evaluate:\n  - " + "\n  - ".join(problems))
    train_dir, training_images = None, None
    if train_sources:
        problems = [p for name, path in train_sources for p in scan_image_folder(path, model.class_names, partial=True, name=name)[1]]
        # A set inside (or around) the training data would fit the metadata baseline on the images it scores.
        problems += folders_shared_with_training(train_sources, [(f"set {name!r}", path) for name, path in sets])
        if problems:
            raise DatasetError("cannot use --train-dir:\n  - " + "\n  - ".join(problems))
        # Hashed once for every evaluated set.
        train_dir = train_sources[0][1]
        training_images = hash_training_files(model, folder_files(train_sources, model.class_names))
    results = {}
    for name, path in sets:
        folder, _ = scan_image_folder(path, model.class_names, partial=True, name=name)
        complete = all(count > 0 for count in folder.counts().values())
        out = None if not args.output_dir else Path(args.output_dir) / (name if len(sets) > 1 else "")
        if complete:
            results[name] = evaluate_model(model, path, train_dir=train_dir, training_images=training_images, output_dir=out,
                                           n_bootstrap=args.bootstrap, framing=args.framing_check,
                                           tone=args.tone_check, subgroups=subgroups)
        else:
            results[name] = evaluate_external(model, path, name=name, training_images=training_images,
                                              framing=args.framing_check, tone=args.tone_check, subgroups=subgroups)
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                remove_figures(out)  # an earlier evaluation's, of this name or folder, as a full set
                if len(sets) > 1:  # every set of several has its own folder
                    atomic_write_text(out / "metrics.json", json.dumps(results[name], indent=2))
        print(f"== {name} ==" if len(sets) > 1 else "", end="\n" if len(sets) > 1 else "")
        print(summary(results[name]) if complete else external_summary(results[name]))
    if args.output_dir:
        output = Path(args.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        remove_stale_evaluation(output, [name for name, _ in sets])
        document = results[sets[0][0]] if len(sets) == 1 else {"model_fingerprint": weights_fingerprint(model), "sets": results}
        atomic_write_text(output / "metrics.json", json.dumps(document, indent=2))
        print(f"wrote {output / 'metrics.json'}")
    return 0


def run_ood_check(args: argparse.Namespace) -> int:
    from .ood_check import check

    report = check(_load_model(args))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for row in report["images"]:
        verdict = "; ".join(row["reasons"]) if row["uncertain"] else f"called {row['label']}"
        print(f"{'uncertain' if row['uncertain'] else 'MISSED   '}  {row['name']:45s} {verdict}")
    for kind, row in report["by_kind"].items():
        print(f"{kind}: {row['flagged']} of {row['n']} flagged ({row['rate']:.0%})")
    print(f"all: {report['flagged']} of {report['n']} non-X-ray images flagged as uncertain ({report['rate']:.0%})")
    if report["not_installed"]:
        print(f"not checked: the images bundled with {', '.join(report['not_installed'])} (not installed; "
              "the dev extra has them all)", file=sys.stderr)
    return 0


def run_space(args: argparse.Namespace) -> int:
    from .space import DEFAULT_TITLE, build_space

    folder = build_space(args.model, args.output, revision=args.revision, examples=args.examples,
                         title=args.title or DEFAULT_TITLE)
    print(f"wrote {folder}\nupload it with: hf upload --repo-type space USER/SPACE {args.output} .")
    return 0


def run_card(args: argparse.Namespace) -> int:
    from .atomic import atomic_write_text, check_writable_file
    from .card import card_context_from_folder, render_card
    from .config import ChestXrayConfig

    folder = Path(args.model)
    output = Path(args.output) if args.output else folder / "README.md"
    check_writable_file(output, inputs=(folder / "config.json", folder / "model.safetensors", args.metrics))
    config = ChestXrayConfig.load(folder / "config.json")
    context = card_context_from_folder(folder)
    context["test_metrics"] = _read_metrics(args.metrics)
    _check_measured_this_model(args.metrics, context["test_metrics"], folder)
    atomic_write_text(output, render_card(config, context))
    print(f"wrote {output}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from .atomic import check_not_an_input, check_writable_file, check_writable_folder
    from .batch_predict import csv_columns, predict_inputs, predict_to_csv

    # Where the results go is checked before any work, not after the last file, and is never an input.
    given_folders = tuple(f for f in args.files if os.path.isdir(f))
    if args.csv:
        check_writable_file(args.csv, inputs=tuple(args.files), input_folders=given_folders)
    if args.gradcam_dir:
        check_writable_folder(args.gradcam_dir)
        check_not_an_input(args.gradcam_dir, inputs=tuple(args.files), input_folders=given_folders)
    model = _load_model(args)
    if args.csv:
        csv_columns(model.class_names)
    options = {"batch_size": args.batch_size, "gradcam_dir": args.gradcam_dir}
    if args.csv:
        records = predict_to_csv(model, args.files, args.csv, **options)
        failed = [r for r in records if r["error"]]
        for record in failed:
            print(f"error: {record['error']}", file=sys.stderr)
        print(f"wrote {args.csv}: {len(records) - len(failed)} predicted, {len(failed)} failed", file=sys.stderr)
        return 1 if failed else 0
    failures = 0
    for record in predict_inputs(model, args.files, **options):
        failures += bool(record["error"])
        _report(args, record["file"], result=None if record["error"] else record, error=record["error"])
    return 1 if failures else 0


def run_export(args: argparse.Namespace) -> int:
    from .export import export_onnx

    export_onnx(_load_model(args), args.output)
    print(f"wrote {args.output}")
    return 0


def _load_model(args: argparse.Namespace):
    """The model named by ``--model`` and ``--revision``; a failure is a ModelLoadError, which ``main`` reports."""
    from .model import ChestXrayClassifier

    device = inference_device(getattr(args, "device", "cpu"))  # export traces on the CPU
    return ChestXrayClassifier.from_pretrained(args.model, revision=args.revision, map_location=device)


def _check_measured_this_model(path: str, metrics: dict, folder: Path) -> None:
    """A card shows figures of the model it describes: refuse a metrics file measured on another one."""
    from .config import ConfigError
    from .hub import weights_fingerprint
    from .model import ChestXrayClassifier

    measured = metrics.get("model_fingerprint")
    if measured is None:
        raise ConfigError(f"{path}: does not record which model it measured (no model_fingerprint: not a metrics.json "
                          f"of `chest-model evaluate`, or one from before it recorded it); measure this model with "
                          f"`chest-model evaluate --model {folder} --data-dir ...`")
    if measured != weights_fingerprint(ChestXrayClassifier.from_pretrained(folder)):
        raise ConfigError(f"{path}: measured another model than {folder} (its model_fingerprint differs); "
                          f"measure this one with `chest-model evaluate --model {folder} --data-dir ...`")


def _read_metrics(path: str) -> dict:
    """The metrics.json that ``chest-model evaluate`` wrote; anything else is a ConfigError naming the file."""
    from .config import ConfigError, read_json

    metrics = read_json(path)
    if not isinstance(metrics, dict):
        raise ConfigError(f"{path}: expected a JSON object from `chest-model evaluate`, got {type(metrics).__name__}")
    if isinstance(metrics.get("sets"), dict):
        names = ", ".join(f"{name}/metrics.json" for name in metrics["sets"])
        raise ConfigError(f"{path}: holds several evaluated sets; a card reports one test split: pass its own file "
                          f"beside this one ({names})")
    if "predicted_share" in metrics:
        raise ConfigError(f"{path}: holds a set with only some classes (shares predicted as each class); a card "
                          "reports a test split with every class")
    missing = [key for key in ("n", "accuracy", "macro_f1", "per_class") if key not in metrics]
    if missing:
        raise ConfigError(f"{path}: not a metrics.json of `chest-model evaluate` (it lacks {', '.join(missing)})")
    return metrics


def _report(args: argparse.Namespace, path: str, *, result: dict | None = None, error: str | None = None) -> None:
    if args.json:
        record = {"file": path, "error": error} if error else {
            "file": path, "label": result["label"],  # as the CSV's column and Prediction.label name it
            # JSON has no NaN: a broken model's non-numbers are written as null (its reasons say why)
            "probabilities": {k: p if math.isfinite(p) else None for k, p in result["probabilities"].items()},
            "uncertain": result["uncertain"], "reasons": result["reasons"]}
        print(json.dumps(record), flush=True)
    elif error:
        # Errors already name their file; say it once.
        detail = error[len(path) + 1:].lstrip() if error.startswith(f"{path}:") else error
        print(f"{path}: ERROR {detail}", file=sys.stderr, flush=True)
    else:
        scores = "  ".join(f"{name}={p:.3f}" for name, p in result["probabilities"].items())
        flag = f"  [uncertain: {'; '.join(result['reasons'])}]" if result["uncertain"] else ""
        print(f"{path}: {result['label']}  ({scores}){flag}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Every error the package raises on purpose already names the file and what is wrong: print that
    # message, not a traceback. Anything else is a bug and keeps its traceback.
    try:
        return args.func(args)
    except ChestModelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:  # an optional dependency of this command
        message = missing_extra(err, f"chest-model {args.command}")
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """The ``chest-model`` console script: ``main`` on the command line's arguments, then a quick exit."""
    exit_with(main())
