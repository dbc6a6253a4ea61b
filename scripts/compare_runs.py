"""A markdown table comparing training runs from their own records (no figure typed by hand).

    python scripts/compare_runs.py runs/loso-rsna runs/loso-nih runs/starter [--label Covid]

For each run: the recipe's distinguishing options, the best epoch's validation figures (which chose
the epoch), then the external sets and the test split, which chose nothing. ``--label`` names the
class whose calls on the external sets, and whose test recall, the table reports.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def row(run: Path, label: str = "Covid") -> str:
    record = json.loads((run / "train_config.json").read_text())
    val = json.loads((run / "val_metrics.json").read_text())
    hp = record["hyperparameters"]
    recipe = f"{record.get('epochs')} epochs, {hp.get('image_size')} px, lr {hp.get('lr')}, augment={hp.get('augment')}, sampling={hp.get('sampling')}, contrast={hp.get('contrast', hp.get('equalize', 'none'))}"
    if hp.get("ema_decay"):
        recipe += f", ema={hp['ema_decay']}"
    if hp.get("balance_by"):
        recipe += f", balance-by={hp['balance_by']}"
    test_path, external_path = run / "eval" / "metrics.json", run / "eval" / "external.json"
    test = json.loads(test_path.read_text()) if test_path.is_file() else None
    external = json.loads(external_path.read_text()) if external_path.is_file() else {}
    left_out = "; ".join(f"{name}: {share(e, label)} called {label}, {e['uncertain_rate']:.0%} uncertain"
                         for name, e in external.items()) or "none (trained on every source)"
    recall = test["per_class"][label]["recall"] if test and label in test["per_class"] else None
    test_text = (f"{test['accuracy']:.3f} / {'n/a' if recall is None else f'{recall:.3f}'} / {test['ood']['flagged']} of {test['n']}"
                 if test else "not run")
    return (f"| `{run.name}` | {', '.join(record['sources'])} | {recipe} | {record['best_epoch']} | "
            f"{val.get('group_recall', float('nan')):.3f} | {val_recalls(val)} | {left_out} | {test_text} |")


def share(external_set: dict, label: str) -> str:
    value = external_set["predicted_share"].get(label)
    return "n/a" if value is None else f"{value:.0%}"


def val_recalls(val: dict) -> str:
    """Pooled validation recall per class: the group recall's mean can hide one weak class."""
    return ", ".join(f"{name} {row['recall']:.2f}" for name, row in val.get("per_class", {}).items())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="training run folders (train.py --output-dir)")
    parser.add_argument("--label", default="Covid", help="the class reported on the external sets and the test split")
    args = parser.parse_args(argv)
    print("| run | trained on | recipe | best epoch | validation group recall | validation recall per class | "
          f"left-out source | test accuracy / {args.label} recall / flagged |")
    print("|---|---|---|---:|---:|---|---|---|")
    for run in args.runs:
        print(row(run, args.label))
    if not any(args.label in json.loads((run / "val_metrics.json").read_text()).get("per_class", {}) for run in args.runs):
        print(f"warning: no run has a class named {args.label!r}; pass --label with one of its classes", file=sys.stderr)


if __name__ == "__main__":
    main()
