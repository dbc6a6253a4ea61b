"""What a lower bar for one class would buy and cost on a run's validation split (a measurement tool;
nothing is chosen or saved).

    python scripts/operating_points.py runs/r128-lr005-eq-e48 --label Covid

The run's validation split is rebuilt with the training code itself (run it from where the run's command
ran). Rule measured: call the class when its calibrated probability reaches a bar, and otherwise take the
most probable class, as the model does. One row per bar at which one more validation film of the class
is caught, from the model's own answer (argmax) down: the class's recall, and how many films of every
other (source, class) group the bar calls that class. The bars come from validation films only, so
a bar chosen from this table is chosen on validation.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from chest_model import ChestXrayClassifier
from chest_model.training import rebuild_split


def operating_points(probabilities: torch.Tensor, labels: list[int], groups: list[str], target: int) -> list[dict]:
    """Rows of the table: ``bar`` (None for argmax), ``caught`` (films of ``target`` called it) and, per
    group of the other films, how many are called ``target``."""
    p = probabilities[:, target]
    argmax = probabilities.argmax(dim=1) == target
    is_target = torch.tensor([label == target for label in labels])
    others = sorted({g for g, label in zip(groups, labels) if label != target})
    rows = []
    missed_bars = sorted({float(v) for v in p[is_target & ~argmax]}, reverse=True)
    for bar in [None, *missed_bars]:
        called = argmax if bar is None else argmax | (p >= bar)
        rows.append({"bar": bar, "caught": int((called & is_target).sum()),
                     "others": {g: int(sum(bool(c) for c, gg, label in zip(called, groups, labels)
                                           if gg == g and label != target)) for g in others}})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a training run folder (its train_config.json and model)")
    parser.add_argument("--label", default="Covid", help="the class whose bar is lowered")
    args = parser.parse_args(argv)
    record = json.loads((args.run / "train_config.json").read_text())
    names = record["class_names"]
    if args.label not in names:
        raise SystemExit(f"error: {args.label!r} is not one of the run's classes: {', '.join(names)}")
    target = names.index(args.label)
    model = ChestXrayClassifier.from_pretrained(args.run).eval()
    data, _ = rebuild_split(record, model.preprocessor)
    probabilities = model.predict_proba(data.val.paths)
    groups = [f"{data.val.source_names[s]} {names[label]}" for s, label in zip(data.val.sources, data.val.labels)]
    sizes = {g: groups.count(g) for g in groups}
    n = data.val.labels.count(target)
    print(f"{n} validation films of {args.label}; other groups: " + ", ".join(f"{g} ({sizes[g]})" for g in sorted(set(groups))
                                                                          if not g.endswith(f" {args.label}")))
    for row in operating_points(probabilities, data.val.labels, groups, target):
        bar = "argmax (the model's answer)" if row["bar"] is None else f"{args.label} probability >= {row['bar']:.3f}"
        others = ", ".join(f"{g} {k} of {sizes[g]}" for g, k in row["others"].items())
        print(f"{bar:32s} {args.label} {row['caught']} of {n}; called {args.label}: {others}")


if __name__ == "__main__":
    main()
