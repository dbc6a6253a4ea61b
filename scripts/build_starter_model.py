"""Package a training run as the demo's starter model (demo/starter-model/).

    python scripts/build_starter_model.py RUN_DIR --test-dir data/covid19-dataset/test \
        --train-dir data/covid19-dataset/train --external-run LOSO_RUN_DIR [--external-run ...]

Stores the weights in float16 only if every prediction on the given images stays within 0.01 of
the float32 model, then measures exactly what is shipped: the full evaluation on the test split,
the out-of-distribution gate on non-X-ray images (chest_model.ood_check), and the leave-one-source-out
runs' external figures (each from its own run's eval/external.json, a model trained with the same
recipe without that source). metrics.json and the model card carry every figure, and the README's
starter-model paragraph and shortcut sentence (between their <!-- starter:... --> markers) are
rewritten from them: no figure in them is typed by hand. card_context.json keeps everything the
card was rendered from (training record, validation figures, selection note), so a later packaging
can render it again (``chest_model.card.render_card``) without the training run's folder.

``--framing-only`` and ``--refit-threshold`` work on an already packaged starter model from those
records: the first measures its framing check again; the second fits its feature gate's threshold
again with this version's rule, measures it again and says in the card and the README that the
new threshold was fitted after its test split had been seen.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chest_model import ChestXrayClassifier  # noqa: E402
from chest_model.atomic import atomic_write_text, replace_directory  # noqa: E402
from chest_model.card import card_context_from_folder, render_card  # noqa: E402
from chest_model.citations import cited_sources  # noqa: E402
from chest_model.calibrate import block_summaries, fit_feature_threshold  # noqa: E402
from chest_model.data import parse_data_dirs, scan_image_folder  # noqa: E402
from chest_model.engine import UNLEARNED_RECALL  # noqa: E402
from chest_model.evaluation import evaluate_external, evaluate_model, flagged_by_class_text, hash_training_files  # noqa: E402
from chest_model.feature_ood import BUFFER_PREFIX  # noqa: E402
from chest_model.framing import framing_check  # noqa: E402
from chest_model.metrics import called_as, flagged_by_class  # noqa: E402
from chest_model.ood_check import check  # noqa: E402
from chest_model.training import rebuild_split, split_files, validation_copies  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--test-dir", default=None, help="the test split, evaluated once (required unless --framing-only)")
    parser.add_argument("--framing-only", action="store_true",
                        help="RUN_DIR is an already packaged starter model: only measure its framing check on its run's "
                             "validation split (rebuilt from its card's training record, the datasets under data/), then "
                             "render its card and the README's figures again")
    parser.add_argument("--refit-threshold", action="store_true",
                        help="RUN_DIR is an already packaged starter model: fit its feature-gate threshold again with this "
                             "version's rule on its run's validation split (rebuilt from its card's training record), then "
                             "measure it again on --test-dir and package it in --output; its leave-one-source-out rows are kept")
    parser.add_argument("--train-dir", default=None, help="training files for the metadata-only baseline")
    parser.add_argument("--external-run", action="append", default=[], help="a leave-one-source-out run folder (repeatable)")
    parser.add_argument("--selection-note", default=None, help="how the recipe was chosen, for the card (say what saw the test split)")
    parser.add_argument("--data-root", default=None,
                        help="the folder the run's data paths start with (e.g. ../shared/data); the card names it data/, "
                             "as its command line says: run it from the project root with the datasets under data/")
    parser.add_argument("--runs-root", default=None,
                        help="the folder the runs' --output-dir starts with, if it was not runs/ (e.g. /scratch/runs); "
                             "the card names it runs/, so its command reads as run from the project root")
    parser.add_argument("--output", default=str(ROOT / "demo" / "starter-model"))
    args = parser.parse_args()
    if args.framing_only:
        return refresh_framing_check(Path(args.run_dir))
    if not args.test_dir:
        parser.error("--test-dir is required")

    if args.refit_threshold:
        ignored = [flag for flag, value in (("--selection-note", args.selection_note), ("--external-run", args.external_run),
                                            ("--data-root", args.data_root), ("--runs-root", args.runs_root)) if value]
        if ignored:
            parser.error(f"--refit-threshold keeps the packaged model's records; {', '.join(ignored)} would be ignored")
        return refit_threshold(Path(args.run_dir), args)

    run = Path(args.run_dir)
    model = ChestXrayClassifier.from_pretrained(run)
    shipped, dtype = half_precision_if_harmless(model, [d for d in (args.test_dir, args.train_dir) if d])
    # The run's split, rebuilt as train.py built it: copies of test images are sought among the images
    # it trained on, as train.py's own evaluation does.
    record = json.loads((run / "train_config.json").read_text())
    data, sources = rebuild_split(record, model.preprocessor)
    # The card names datasets and the project's own folders, never this machine's paths.
    moves = [(root.rstrip("/") + "/", new) for root, new in ((args.data_root, "data/"), (args.runs_root, "runs/")) if root]
    external = leave_one_source_out(args.external_run)
    add_left_out_copies(external, args.external_run)
    context = card_context_from_folder(run)
    complete_validation_record(model, context, data)
    for old, new in moves:
        external = relocate_paths(external, old, new)
        context["training"] = relocate_paths(context["training"], old, new)
    package(model, shipped, dtype, data, sources, context, external, args, args.selection_note)


def package(model, shipped, dtype, data, sources, context: dict, external: dict, args, selection_note: str | None) -> None:
    """Measure exactly what is shipped (test split, non-X-ray images, validation framing check), then
    write the model folder whole and the README's figures from those measurements."""
    out = Path(args.output)
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    trained_on = hash_training_files(shipped, split_files(data.train, sources), "the training split")
    metrics = evaluate_model(shipped, args.test_dir, train_dir=args.train_dir, training_images=trained_on,
                             output_dir=staging / "eval")
    ood = check(shipped)
    metrics["ood_check"] = {k: v for k, v in ood.items() if k != "images"}
    metrics["ood_check"]["missed"] = [row["name"] for row in ood["images"] if not row["uncertain"]]
    metrics["external"] = external
    # Framed otherwise, the films the chosen model did not train on: validation holds the adult normals.
    context["framing_check"] = validation_framing_check(shipped, data)
    # A run trained without --test-dir records no test counts; the card's data table gets them from the evaluation.
    if context.get("training"):
        context["training"].setdefault("data_counts", {}).setdefault(
            "test", {name: row["support"] for name, row in metrics["per_class"].items()})
    context.update(
        test_metrics=metrics, repo_id=None, external_metrics=external or None,
        external_note=external_note(external) if external else None,
        ood_report=[{"what": "non-X-ray images (photographs, documents, other modalities, generated)", **metrics["ood_check"]},
                    {"what": "test-split X-rays" + (" (the threshold rule was corrected after they were seen)"
                                                    if context.get("gate_refit") else ""),
                     "n": metrics["n"], "flagged": metrics["ood"]["flagged"], "rate": metrics["ood"]["flagged_rate"]}],
        model_name="Chest X-ray classifier: starter model (VGG19-BN, random init)",
        selection_note=" ".join(filter(None, [selection_note, targets_sentence(metrics, context.get("gate_refit"))])),
    )
    model.save_pretrained(staging, card_context=context, weights_dtype=dtype)
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    # The card's inputs travel with the model, so it can be re-rendered (after a re-measurement, a
    # recalibration) without the training run's folder, which does not outlive the machine it ran on.
    (staging / "card_context.json").write_text(json.dumps(context, indent=2) + "\n")
    shutil.rmtree(staging / "eval")
    replace_directory(staging, out)  # the old starter model stays whole until the new one is complete
    print(f"wrote {out}: accuracy {metrics['accuracy']:.3f}, Covid recall {metrics['per_class']['Covid']['recall']:.3f}, "
          f"metadata-only baseline {metrics['audit']['metadata_baseline_accuracy']:.3f}, "
          f"non-X-rays flagged {ood['flagged']}/{ood['n']}, test X-rays flagged {metrics['ood']['flagged']}/{metrics['n']}")
    for name, row in external.items():
        print(f"  left out {name}: {row['summary']}")
    update_readme(ROOT / "README.md", metrics, context["training"], context["framing_check"], context.get("gate_refit"))
    print("updated README.md's starter-model figures")


def refit_threshold(folder: Path, args) -> None:
    """Fit a packaged starter model's feature-gate threshold again with this version's rule (feature_ood.fit_threshold),
    on its run's validation split rebuilt from its card's training record, then measure and package it again.

    Its leave-one-source-out rows are other runs' models: they are kept as measured, with their own runs' gates.
    """
    model = ChestXrayClassifier.from_pretrained(folder)
    if not (model.config.feature_threshold > 0 and model.config.feature_fpr > 0):
        raise SystemExit(f"{folder} has no fitted feature gate to fit again")
    context = json.loads((folder / "card_context.json").read_text())
    shipped_before = json.loads((folder / "metrics.json").read_text())
    record = context["training"]
    data, sources = rebuild_split(record, model.preprocessor)
    # fp32, as the evaluation that follows scores the test split and the non-X-ray images.
    summaries = [torch.from_numpy(x) for x in block_summaries(model, data.val.images, precision="fp32")]
    before = model.config.feature_threshold
    gate = context["val_metrics"]["feature_gate"]
    recorded_validation_flags(model, summaries, gate)
    gate.update(fit_feature_threshold(model, summaries, fpr=model.config.feature_fpr, val_labels=list(data.val.labels)))
    dtype = stored_weights_dtype(folder)
    # Fitted again a second time, the record keeps what the first refit replaced and what the test showed before it.
    first = context.get("gate_refit") or {"threshold_before": before, "test_flagged_before": shipped_before["ood"]["flagged"],
                                           "n_test": shipped_before["n"]}
    context["gate_refit"] = {**first, "threshold": gate["threshold"], "fpr": gate["fpr"]}
    note = refit_sentence(context["gate_refit"])
    print(note)
    package(model, model, dtype, data, sources, context, shipped_before.get("external", {}), args,
            " ".join(filter(None, [given_selection_note(context.get("selection_note")), note])))


def refit_sentence(refit: dict) -> str:
    """The card's words for a threshold fitted again after the test split was seen: what changed and why it is not blind."""
    return (f"After it shipped, its feature gate's threshold was fitted again on the same validation X-rays with a "
            f"corrected rule: the split-conformal rank, under which a new X-ray like them is flagged with probability at most "
            f"{refit['fpr']:.0%} (on average over validation draws), where the interpolated quantile used before was no such bound ({refit['threshold_before']:.3f} "
            f"-> {refit['threshold']:.3f}). {refit_caveat(refit)}")


def refit_caveat(refit: dict | None) -> str:
    """Why the test split's flag rate of a refitted gate is not a blind measurement (empty when the gate was not refitted)."""
    if not refit:
        return ""
    return (f"The gate's threshold rule was corrected after the test split had been seen with {refit['test_flagged_before']} "
            f"of {refit['n_test']} X-rays flagged, so the test split's flag rate is not a measurement the rule was blind to; "
            f"the leave-one-source-out runs' flag rates come from their own gates, fitted by the earlier rule.")


def given_selection_note(note: str | None) -> str | None:
    """A packaged card's selection note without what packaging appended: the targets sentence and a refit's
    sentence (both are written again)."""
    if not note:
        return None
    return re.split(r"(?:^| )(?:\*\*It does not meet the targets set for it\*\*:|It meets every target set for it:|"
                    r"After it shipped, its feature gate's threshold was fitted again)", note)[0] or None


def stored_weights_dtype(folder: Path):
    """float16 when the packaged weights were stored in it (after half_precision_if_harmless), else None."""
    with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
        return torch.float16 if weights.get_slice("features.0.weight").get_dtype() == "F16" else None


def validation_framing_check(model: ChestXrayClassifier, data) -> dict:
    """The framing check on the films the chosen model did not train on: validation holds the adult normals."""
    return {"what": "the chosen run's validation films (not trained on), by source and class",
            **framing_check(model, data.val.paths, data.val.group_names(model.class_names))}


def refresh_framing_check(folder: Path) -> None:
    """Measure a packaged starter model's framing check and render its card and the README's figures again."""
    model = ChestXrayClassifier.from_pretrained(folder)
    context = json.loads((folder / "card_context.json").read_text())
    data, _ = rebuild_split(context["training"], model.preprocessor)
    context["framing_check"] = validation_framing_check(model, data)
    atomic_write_text(folder / "card_context.json", json.dumps(context, indent=2) + "\n")
    atomic_write_text(folder / "README.md", render_card(model.config, context))
    update_readme(ROOT / "README.md", json.loads((folder / "metrics.json").read_text()), context["training"],
                  context["framing_check"], context.get("gate_refit"))
    print(f"wrote {folder}'s framing check, card and the README's figures")


def update_readme(readme: Path, metrics: dict, record: dict, framing: dict | None = None, gate_refit: dict | None = None) -> None:
    """Rewrite the README's measured sentences from the shipped metrics (between their markers)."""
    text = readme.read_text(encoding="utf-8")
    for name, body in readme_sections(metrics, record, framing, gate_refit).items():
        pattern = re.compile(rf"(<!-- starter:{name} -->).*?(<!-- /starter:{name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{readme}: no <!-- starter:{name} --> ... <!-- /starter:{name} --> markers")
        text = pattern.sub(lambda m: m.group(1) + body + m.group(2), text)
    readme.write_text(text, encoding="utf-8")


# What the project asks of its starter model (issue targets, not measurements).
TARGETS = (("test accuracy", lambda m: m["accuracy"], ">=", 0.90),
           ("test Covid recall", lambda m: m["per_class"]["Covid"]["recall"], ">=", 0.90),
           ("share of test X-rays flagged uncertain", lambda m: m["ood"]["flagged_rate"], "<=", 0.05),
           ("share of non-X-ray images flagged uncertain", lambda m: m["ood_check"]["rate"], ">=", 0.95))


def targets_sentence(metrics: dict, gate_refit: dict | None = None) -> str:
    """Which of the starter model's targets the measured figures meet, and which they miss; a figure whose
    rule was changed after the test split was seen says so."""
    seen = " (its rule corrected after this split was seen)"
    checks = [(name + (seen if gate_refit and name == "share of test X-rays flagged uncertain" else ""), value(metrics), op, bound)
              for name, value, op, bound in TARGETS]
    for name, row in metrics.get("external", {}).items():
        checks.append((f"share of the left-out {name} adult normals called Covid (that run's validation Covid recall "
                       f"{row['validation']['covid_recall']:.2f})", row["predicted_share"]["Covid"], "<=", 0.10))
    met = [f"{name} {v:.3f} (target {op} {b:.2f})" for name, v, op, b in checks if (v >= b if op == ">=" else v <= b)]
    missed = [f"{name} {v:.3f} (target {op} {b:.2f})" for name, v, op, b in checks if not (v >= b if op == ">=" else v <= b)]
    if not missed:
        return "It meets every target set for it: " + "; ".join(met) + "."
    return ("**It does not meet the targets set for it**: " + "; ".join(missed) + "." +
            (f" Met: {'; '.join(met)}." if met else ""))


def framing_sentence(framing: dict | None, crop: str = "80% of each side") -> str:
    """The README's words for the framing check: per validation group, how often a tighter crop changes the answer."""
    if not framing:
        return ""
    changes = ", ".join(f"{group} {row['framings'][crop]['changed']:.0%}" for group, row in framing["groups"].items())
    return (f"Cropped around the centre to {crop} (the same anatomy, framed tighter), its validation films change "
            f"answer: {changes} (the card's Framing check has every framing).\n\n")


def readme_sections(metrics: dict, record: dict, framing: dict | None = None, gate_refit: dict | None = None) -> dict[str, str]:
    audit, ci, ood = metrics["audit"], metrics["ci"], metrics["ood_check"]
    recalls = ", ".join(f"{name} {row['recall']:.3f}" for name, row in metrics["per_class"].items())
    counts = record["data_counts"]
    n_train, n_val = sum(counts["train"].values()), sum(counts["val"].values())
    minutes = record.get("training_seconds", 0) / 60
    hp = record["hyperparameters"]
    averaging = f"weights averaged over steps (`--ema-decay {hp['ema_decay']}`), " if hp.get("ema_decay") else ""
    left_out = left_out_text(metrics.get("external", {}))
    starter = (
        f"\n`demo/starter-model/` is a VGG19-BN trained with this project's `train.py` from random initialisation "
        f"(ImageNet weights cannot be downloaded where it was built) on {', '.join(record['sources'])} "
        f"({n_train} training and {n_val} validation images), {hp['image_size']} px, `--sampling {hp['sampling']}`, "
        f"{'`--balance-by ' + hp['balance_by'] + '`, ' if hp.get('balance_by') else ''}"
        f"`--augment {hp['augment']}`, `--contrast {hp['contrast']}`, "
        f"{averaging}"
        f"{record['epochs']} epochs (epoch {record['best_epoch']} "
        f"chosen on validation), {minutes:.0f} minutes of training on a 2-core CPU ({record['cpu_capability']}, "
        f"{'bf16' if record['mixed_precision'] == 'bf16' else 'fp32'}).\n\n"
        f"On the 66-image test split, evaluated once: accuracy {metrics['accuracy']:.3f} (95% CI "
        f"{ci['accuracy'][0]:.3f}–{ci['accuracy'][1]:.3f}), macro-F1 {metrics['macro_f1']:.3f}, recall per class "
        f"{recalls}; "
        f"{metrics['ood']['flagged']} of {metrics['n']} test X-rays flagged as uncertain{flagged_by_class_text(metrics['ood'])}."
        f"{' ' + refit_caveat(gate_refit) if gate_refit else ''} A random forest on file metadata "
        f"alone scores {audit['metadata_baseline_accuracy']:.3f} on the same images, so the test score is an upper bound on "
        f"what the model learned about lungs.{copies_sentence(audit.get('train_copies'))}\n\n"
        + ("Sources it was not trained on (leave-one-source-out): "
           + " ".join(filter(None, [f"{left_out}.", failed_runs_sentence(metrics.get("external", {})),
                                    shared_origin_sentence(record["sources"]).strip()])) + "\n\n"
           if left_out else "")
        + framing_sentence(framing)
        + f"Non-X-ray images (photographs, documents, other modalities, generated): {ood['flagged']} of {ood['n']} "
        f"flagged as uncertain ({ood['rate']:.0%}).\n\n"
        + targets_sentence(metrics, gate_refit) + caution_sentence(metrics) + "\n\n"
        "Viral Pneumonia was learned from children's X-rays only: there is no adult viral pneumonia in the training "
        "data, so the model cannot be trusted to recognise it in adults. Its model card holds the exact command "
        "and every figure; `docs/model-selection.md` holds the rules the recipe was chosen by, each saying whether "
        "it was written before or after its runs trained, and `docs/benchmarks.md` what the command costs on each kind of machine measured.\n")
    shortcut = f"scores {audit['metadata_baseline_accuracy']:.0%} on its test split"
    return {"figures": starter, "shortcut": shortcut}


def complete_validation_record(model: ChestXrayClassifier, context: dict, data) -> None:
    """Add what train.py now records about validation, for a run recorded before it did: the copies of
    training images among the validation images, and the gate's validation flags per class."""
    record, gate = context.get("training"), (context.get("val_metrics") or {}).get("feature_gate")
    if not record:
        return
    class_names = record["class_names"]
    record.setdefault("val_copies_of_train", validation_copies(data, class_names))
    if gate and "validation_flagged_by_class" not in gate:
        precision = "bf16" if record["mixed_precision"] == "bf16" else "fp32"  # as the run fitted the gate
        summaries = [torch.from_numpy(x) for x in block_summaries(model, data.val.images, precision=precision)]
        flags = recorded_validation_flags(model, summaries, gate)
        gate["validation_flagged_by_class"] = flagged_by_class(flags, data.val.labels, class_names)


def recorded_validation_flags(model: ChestXrayClassifier, summaries: list[torch.Tensor], gate: dict):
    """The gate's flags on the rebuilt validation split, checked against the rate its record gives: a
    different split (other data, another command) stops the packaging here."""
    flags = (model.feature_scores(summaries) > model.config.feature_threshold).numpy()
    if abs(flags.mean() - gate["validation_flagged_rate"]) > 1.5 / len(flags):  # one image may flip with rounding
        raise SystemExit(f"the gate flags {flags.mean():.3f} of the rebuilt validation split, its record says "
                         f"{gate['validation_flagged_rate']:.3f}: is it the split the gate was fitted on?")
    return flags


def copies_sentence(copies: dict | None) -> str:
    """The README's words for the test images that are copies of training images (empty when none is)."""
    if not copies or not copies["n"]:
        return ""
    classes = ", ".join(f"{name} {row['copies']} of {row['n']}" for name, row in copies["by_class"].items() if row["copies"])
    one = copies["n"] == 1
    sentence = (f" {copies['n']} of the {copies['of']} test images ({classes}) {'is a copy' if one else 'are copies'} of "
                f"an image it was trained on (the same film, found by perceptual hash), which the model may answer from memory")
    if copies["accuracy_without"] is None:
        return sentence + "; no test image is left without one."
    recalls = ", ".join(f"{name} {value:.3f}" for name, value in copies["recall_without"].items())
    return sentence + (f"; without {'it' if one else 'them'}, accuracy is {copies['accuracy_without']:.3f} and recall "
                       f"per class {recalls}.")


def shared_origin_sentence(sources: list[str]) -> str:
    """The README's warning when two training sources come from one hospital (chest_model.citations)."""
    return "".join(f" {' and '.join(row['sources'])} come from one hospital, the {row['origin']}: a model trained on one "
                   "and tested on the other is tested on that hospital's films, so these figures are optimistic for "
                   "films from elsewhere." for row in cited_sources(sources)["shared_origins"])


def external_note(external: dict) -> str:
    """The card's words above its External validation table."""
    return " ".join(filter(None, [
        "Leave-one-source-out: each row is a model trained with the same command without that source (its own run), then "
        "asked to classify it; a source left out by several runs (different seeds) has a row per run, and the spread "
        "between them is how far one run's figure can be trusted.",
        failed_runs_sentence(external),
        "The starter model itself was trained on every source listed under Training data, so no set here is unseen by it."]))


def failed_runs_sentence(external: dict) -> str:
    """A warning when some leave-one-source-out runs never learned Covid: their low Covid share is no generalisation."""
    failed = [row for row in external.values() if row["validation"]["covid_recall"] < UNLEARNED_RECALL]
    if not failed:
        return ""
    return (f"{len(failed)} of these {len(external)} runs ended with a validation Covid recall below {UNLEARNED_RECALL} "
            f"({'it' if len(failed) == 1 else 'they'} never learned Covid), and a low share called Covid from such a run "
            "says nothing about generalisation; it also shows that this command, from random initialisation, does not "
            "always train: check a run's validation figures before using it.")


def left_out_text(external: dict) -> str:
    """The README's words for the leave-one-source-out rows: per left-out source, every run's share called Covid."""
    by_source: dict[str, list[dict]] = {}
    for row in external.values():
        by_source.setdefault(row["source"], []).append(row)
    clauses = []
    for source, rows in by_source.items():
        runs = [f"{row['predicted_share']['Covid']:.0%} (seed {row['seed']}; its validation Covid recall "
                f"{row['validation']['covid_recall']:.2f}; {row['uncertain_rate']:.0%} flagged uncertain)" for row in rows]
        listed = runs[0] if len(runs) == 1 else ", ".join(runs[:-1]) + " and " + runs[-1]
        subject = "a model trained the same way without" if len(rows) == 1 else f"{len(rows)} models trained the same way without"
        clauses.append(f"{subject} {source} call{'s' if len(rows) == 1 else ''} {listed} of its {rows[0]['n']} adult normal "
                       "X-rays Covid")
    return "; ".join(clauses)


def caution_sentence(metrics: dict) -> str:
    """What a user should not read into an answer, from the measured figures: how often a model trained the same way
    calls unseen adult normals Covid, and how many test Covid films this one calls Normal."""
    sentence = (" The first starter model, trained on the tutorial's data alone, called nearly every normal adult "
                "X-ray Covid; this one has seen adult normals")
    external = metrics.get("external", {}).values()
    shares, sources = [row["predicted_share"]["Covid"] for row in external], {row["source"] for row in external}
    if shares and max(shares) > 0.10:
        sentence += (f", but a model trained the same way calls up to {max(shares):.0%} of the normals of an adult source "
                     "it has not seen Covid, so treat any Covid call on an adult film with suspicion.")
    elif shares:
        sentence += (f", and models trained the same way call {min(shares):.0%}–{max(shares):.0%} of the normals of an adult "
                     f"source they have not seen Covid; that is measured on {len(sources)} source{'s' if len(sources) != 1 else ''} only, "
                     "so still treat a Covid call on an adult film with suspicion.")
    else:
        sentence += ", but it was not measured on an adult source it has not seen: treat any Covid call on an adult film with suspicion."
    missed = called_as(metrics, "Covid", "Normal")
    if missed and missed[0]:
        sentence += f" A Normal answer does not rule Covid out: it calls {missed[0]} of the {missed[1]} test Covid films Normal."
    return sentence


def relocate_paths(record, old: str, new: str):
    """The training record with every string that names ``old`` naming ``new`` instead (datasets, not local folders)."""
    if isinstance(record, dict):
        return {k: relocate_paths(v, old, new) for k, v in record.items()}
    if isinstance(record, list):
        return [relocate_paths(v, old, new) for v in record]
    return record.replace(old, new) if isinstance(record, str) else record


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
    """Every left-out set of every run, keyed by source; by source and seed where several runs left the
    same source out, so that each run's figure is shown (the spread between seeds is part of the finding)."""
    rows = []
    for run_dir in run_dirs:
        record = json.loads((Path(run_dir) / "train_config.json").read_text())
        seed = record["hyperparameters"]["seed"]
        # How well the run learned at all, beside what it did on the left-out source: a run that never
        # learned Covid calls no left-out normal Covid either, and that is no generalisation.
        val = json.loads((Path(run_dir) / "val_metrics.json").read_text())
        validation = {"group_recall": val["group_recall"], "covid_recall": val["per_class"]["Covid"]["recall"]}
        for name, row in json.loads((Path(run_dir) / "eval" / "external.json").read_text()).items():
            rows.append({**row, "source": name, "seed": seed, "command": record["command"], "validation": validation,
                         "model": f"trained without it on {', '.join(record['sources'])}, seed {seed}; its validation: group "
                                  f"recall {validation['group_recall']:.2f}, Covid recall {validation['covid_recall']:.2f}"})
    runs_per_source = Counter(row["source"] for row in rows)
    external = {}
    for row in rows:
        key = row["source"] if runs_per_source[row["source"]] == 1 else f"{row['source']} (seed {row['seed']})"
        if key in external:
            raise SystemExit(f"two leave-one-source-out runs left out {row['source']} with seed {row['seed']}")
        external[key] = row
    return external


def add_left_out_copies(external: dict, run_dirs: list[str]) -> None:
    """Give every left-out row its copies audit: how many of the set's images are copies of an image its
    run trained on (its split rebuilt as train.py built it), for runs recorded before train.py checked."""
    for run_dir in run_dirs:
        record = json.loads((Path(run_dir) / "train_config.json").read_text())
        rows = {row["source"]: row for row in external.values()
                if row["seed"] == record["hyperparameters"]["seed"] and row["command"] == record["command"]}
        if all("train_copies" in row for row in rows.values()):
            continue
        run_model = ChestXrayClassifier.from_pretrained(run_dir)
        data, sources = rebuild_split(record, run_model.preprocessor)
        trained_on = hash_training_files(run_model, split_files(data.train, sources), "the training split")
        for name, path in parse_data_dirs(record["external_dirs"]):
            rows[name].setdefault("train_copies", evaluate_external(run_model, path, name=name,
                                                                    training_images=trained_on)["train_copies"])


if __name__ == "__main__":
    main()
