"""Package a training run as the demo's starter model (demo/starter-model/).

    python demo/build_starter_model.py RUN_DIR --test-dir DATA/test [--train-dir DATA/train]

Stores the weights in float16 only if every prediction on the given images stays within 0.01 of
the float32 model, re-runs the full evaluation on the test split (metrics.json), and renders the
model card from the run's records and those measured figures.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from chest_model import ChestXrayClassifier  # noqa: E402
from chest_model.card import card_context_from_folder  # noqa: E402
from chest_model.data import scan_image_folder  # noqa: E402
from chest_model.evaluation import evaluate_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--test-dir", required=True)
    parser.add_argument("--train-dir", default=None)
    parser.add_argument("--output", default=str(HERE / "starter-model"))
    args = parser.parse_args()

    run = Path(args.run_dir)
    model = ChestXrayClassifier.from_pretrained(run)
    half = ChestXrayClassifier(model.config)
    half.load_state_dict({k: v.half().float() if v.is_floating_point() else v for k, v in model.state_dict().items()})
    half.eval()
    check_dirs = [d for d in (args.test_dir, args.train_dir) if d]
    files = [p for d in check_dirs for p in scan_image_folder(d, model.class_names)[0].paths]
    worst = 0.0
    for a, b in zip(model.predict(files), half.predict(files)):
        worst = max(worst, max(abs(a[k] - b[k]) for k in a))
    dtype = torch.float16 if worst < 0.01 else None
    print(f"float16 weights: max |Δp| = {worst:.5f} on {len(files)} images -> storing {'float16' if dtype else 'float32'}")
    shipped = half if dtype is not None else model  # measure exactly what is shipped

    out = Path(args.output)
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    metrics = evaluate_model(shipped, args.test_dir, train_dir=args.train_dir, output_dir=staging / "eval")
    context = card_context_from_folder(run)
    context.setdefault("val_metrics", _val_metrics_from_history(run))
    context.update(test_metrics=metrics, repo_id="demo/starter-model",
                   model_name="Chest X-ray classifier: starter model (VGG19-BN, random init)")
    model.save_pretrained(staging, card_context=context, weights_dtype=dtype)
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
    shutil.rmtree(staging / "eval")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    print(f"wrote {out}: accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}, "
          f"metadata-only baseline {metrics['audit']['metadata_baseline_accuracy']:.3f}")


def _val_metrics_from_history(run: Path) -> dict:
    """For runs made before training wrote val_metrics.json: the best epoch's row of history.json."""
    history = json.loads((run / "history.json").read_text())
    record = json.loads((run / "train_config.json").read_text())
    row = next(r for r in history if r["epoch"] == record["best_epoch"])
    return {"accuracy": row["val_accuracy"], "macro_f1": row["val_macro_f1"], "n": sum(record["data_counts"]["val"].values())}


if __name__ == "__main__":
    main()
