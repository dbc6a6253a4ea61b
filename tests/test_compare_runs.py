"""scripts/compare_runs.py: one table row per run, read from the run's own records."""
import importlib.util
import json

from helpers import ROOT

spec = importlib.util.spec_from_file_location("compare_runs", ROOT / "scripts" / "compare_runs.py")
compare_runs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_runs)


def make_run(folder, *, classes=("Normal", "Covid"), test=True, external=True):
    (folder / "eval").mkdir(parents=True)
    (folder / "train_config.json").write_text(json.dumps({
        "epochs": 12, "best_epoch": 7, "sources": ["kids", "adults"],
        "hyperparameters": {"image_size": 128, "lr": 0.005, "augment": "standard", "sampling": "within-source",
                            "contrast": "equalize", "balance_by": "view"}}))
    (folder / "val_metrics.json").write_text(json.dumps({
        "group_recall": 0.9375, "per_class": {name: {"recall": 0.5 + 0.25 * i} for i, name in enumerate(classes)}}))
    if external:
        (folder / "eval" / "external.json").write_text(json.dumps({
            "rsna": {"predicted_share": {name: 0.5 if i == 1 else 0.5 / (len(classes) - 1) for i, name in enumerate(classes)},
                     "uncertain_rate": 0.04}}))
    if test:
        (folder / "eval" / "metrics.json").write_text(json.dumps({
            "accuracy": 0.8125, "n": 16, "ood": {"flagged": 1},
            "per_class": {name: {"recall": 0.75 if i == 1 else 1.0} for i, name in enumerate(classes)}}))
    return folder


def test_a_row_reads_the_recipe_validation_external_sets_and_test_split(tmp_path):
    text = compare_runs.row(make_run(tmp_path / "loso-rsna"))
    cells = [cell.strip() for cell in text.strip("|").split("|")]
    assert cells[0] == "`loso-rsna`" and cells[1] == "kids, adults"
    assert "12 epochs, 128 px, lr 0.005" in cells[2] and "contrast=equalize" in cells[2] and "balance-by=view" in cells[2]
    assert cells[3:6] == ["7", "0.938", "Normal 0.50, Covid 0.75"]
    assert cells[6] == "rsna: 50% called Covid, 4% uncertain"
    assert cells[7] == "0.812 / 0.750 / 1 of 16"


def test_a_run_without_held_out_sets_says_so(tmp_path):
    cells = compare_runs.row(make_run(tmp_path / "full", test=False, external=False)).strip("|").split("|")
    assert cells[6].strip() == "none (trained on every source)" and cells[7].strip() == "not run"


def test_other_class_names_are_reported_by_the_label_asked(tmp_path, capsys):
    run = make_run(tmp_path / "pneumonia", classes=("healthy", "pneumonia"))
    compare_runs.main([str(run), "--label", "pneumonia"])
    out = capsys.readouterr().out
    assert "test accuracy / pneumonia recall / flagged" in out
    assert "rsna: 50% called pneumonia" in out and "0.812 / 0.750 / 1 of 16" in out
    assert "n/a" in compare_runs.row(run)  # the default label, Covid, is not one of this run's classes
    assert capsys.readouterr().err == ""
    compare_runs.main([str(run), "--label", "Pneumonia"])  # a misspelt class: every cell n/a, and a warning
    assert "no run has a class named 'Pneumonia'" in capsys.readouterr().err
