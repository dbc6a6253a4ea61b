"""How models answer a run's validation films framed otherwise (chest_model.framing; a measurement tool).

    python scripts/framing_probe.py --split-of runs/framing-e48 demo/starter-model runs/framing-e48
    python scripts/framing_probe.py --tones --split-of runs/framing-e48 runs/framing-e48   # gamma curves instead

``--split-of`` is a training run folder (its train_config.json) or a packaged model whose card
context records its training run: the validation split of that run's command is rebuilt with the
training code itself, so models trained with that split are probed on films they did not train on.
Run it from where that command ran (its data paths are relative). Prints, per (source, class) group
and framing, the share called each class, flagged uncertain, and whose answer changed. Nothing is
chosen or saved.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from chest_model import ChestXrayClassifier
from chest_model.framing import framing_check, framing_lines, tone_check
from chest_model.training import rebuild_split


def training_record(folder: Path) -> dict:
    """The training record of a run folder, or of a packaged model's card context."""
    if (folder / "train_config.json").is_file():
        return json.loads((folder / "train_config.json").read_text())
    record = json.loads((folder / "card_context.json").read_text()).get("training") if (folder / "card_context.json").is_file() else None
    if not record:
        raise SystemExit(f"error: {folder} holds neither train_config.json nor a card context with a training record")
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path, help="saved model folders")
    parser.add_argument("--split-of", required=True, type=Path, help="the run (or packaged model) whose validation split to use")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    parser.add_argument("--tones", action="store_true", help="other tone (gamma) curves instead of other framings")
    args = parser.parse_args(argv)

    record = training_record(args.split_of)
    for path in args.models:
        model = ChestXrayClassifier.from_pretrained(path).eval()
        val = rebuild_split(record, model.preprocessor)[0].val
        check = (tone_check if args.tones else framing_check)(model, val.paths, val.group_names(record["class_names"]),
                                                             precision=args.precision)
        print(f"\n## {path}")
        print("\n".join(framing_lines(check, model.class_names)))


if __name__ == "__main__":
    main()
