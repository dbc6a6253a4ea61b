"""Package a training run as the demo's starter model (demo/starter-model/).

    python scripts/build_starter_model.py RUN_DIR --test-dir data/covid19-dataset/test \
        --train-dir data/covid19-dataset/train --external-run LOSO_RUN_DIR [--external-run ...]

Stores the weights in float16 only if every prediction on the given images stays within 0.01 of
the float32 model, then measures exactly what is shipped: the full evaluation on the test split,
the out-of-distribution gate on non-X-ray images (chest_model.ood_check), and the leave-one-source-out
runs' external figures (each from its own run's eval/external.json, a model trained with the same
recipe without that source). metrics.json and the model card carry every figure.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chest_model import ChestXrayClassifier  # noqa: E402
from chest_model.card import card_context_from_folder  # noqa: E402
from chest_model.data import scan_image_folder  # noqa: E402
from chest_model.evaluation import evaluate_model  # noqa: E402
from chest_model.feature_ood import BUFFER_PREFIX  # noqa: E402
from chest_model.ood_check import check  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--test-dir", required=True)
    parser.add_argument("--train-dir", default=None, help="training files for the metadata-only baseline")
    parser.add_argument("--external-run", action="append", default=[], help="a leave-one-source-out run folder (repeatable)")
    parser.add_argument("--selection-note", default=None, help="how the recipe was chosen, for the card (say what saw the test split)")
    parser.add_argument("--output", default=str(ROOT / "demo" / "starter-model"))
    args = parser.parse_args()

    run = Path(args.run_dir)
    model = ChestXrayClassifier.from_pretrained(run)
    shipped, dtype = half_precision_if_harmless(model, [d for d in (args.test_dir, args.train_dir) if d])

    out = Path(args.output)
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    metrics = evaluate_model(shipped, args.test_dir, train_dir=args.train_dir, output_dir=staging / "eval")
    ood = check(shipped)
    metrics["ood_check"] = {k: v for k, v in ood.items() if k != "images"}
    metrics["ood_check"]["missed"] = [row["name"] for row in ood["images"] if not row["uncertain"]]
    external = leave_one_source_out(args.external_run)
    metrics["external"] = external

    context = card_context_from_folder(run)
    context.update(
        test_metrics=metrics, repo_id=None, external_metrics=external or None,
        external_note=("Leave-one-source-out: each row is a model trained with the same command without that source "
                       "(its own run), then asked to classify it. The starter model itself was trained on every source "
                       "listed under Training data, so no set here is unseen by it.") if external else None,
        ood_report=[{"what": "non-X-ray images (photographs, documents, other modalities, generated)", **metrics["ood_check"]},
                    {"what": "test-split X-rays", "n": metrics["n"], "flagged": metrics["ood"]["flagged"],
                     "rate": metrics["ood"]["flagged_rate"]}],
        model_name="Chest X-ray classifier: starter model (VGG19-BN, random init)",
        selection_note=args.selection_note,
    )
    model.save_pretrained(staging, card_context=context, weights_dtype=dtype)
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    shutil.rmtree(staging / "eval")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    print(f"wrote {out}: accuracy {metrics['accuracy']:.3f}, Covid recall {metrics['per_class']['Covid']['recall']:.3f}, "
          f"metadata-only baseline {metrics['audit']['metadata_baseline_accuracy']:.3f}, "
          f"non-X-rays flagged {ood['flagged']}/{ood['n']}, test X-rays flagged {metrics['ood']['flagged']}/{metrics['n']}")
    for name, row in external.items():
        print(f"  left out {name}: {row['summary']}")


def half_precision_if_harmless(model: ChestXrayClassifier, check_dirs: list[str]):
    """The model with float16-rounded weights, if no prediction moves by 0.01 or more; else the model itself."""
    half = ChestXrayClassifier(model.config)
    half.load_state_dict({k: v.half().float() if v.is_floating_point() and not k.startswith(BUFFER_PREFIX) else v
                          for k, v in model.state_dict().items()})
    half.eval()
    files = [p for d in check_dirs for p in scan_image_folder(d, model.class_names)[0].paths]
    worst = 0.0
    for a, b in zip(model.predict(files), half.predict(files)):
        worst = max(worst, max(abs(a[k] - b[k]) for k in a))
    harmless = worst < 0.01
    print(f"float16 weights: max |Δp| = {worst:.5f} on {len(files)} images -> storing {'float16' if harmless else 'float32'}")
    return (half, torch.float16) if harmless else (model, None)


def leave_one_source_out(run_dirs: list[str]) -> dict:
    external = {}
    for run_dir in run_dirs:
        record = json.loads((Path(run_dir) / "train_config.json").read_text())
        for name, row in json.loads((Path(run_dir) / "eval" / "external.json").read_text()).items():
            external[name] = {**row, "model": f"trained without it on {', '.join(record['sources'])}",
                              "command": record["command"]}
    return external


if __name__ == "__main__":
    main()
