"""scripts/build_starter_model.py: how leave-one-source-out runs become the card's external rows."""
import importlib.util
import json

import pytest

from helpers import ROOT

spec = importlib.util.spec_from_file_location("build_starter_model", ROOT / "scripts" / "build_starter_model.py")
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)


def fake_run(folder, left_out, seed, covid_share, val_covid_recall=0.9):
    """A leave-one-source-out run folder as train.py and its --external-dir evaluation leave it."""
    (folder / "eval").mkdir(parents=True)
    (folder / "val_metrics.json").write_text(json.dumps({"group_recall": 0.9, "per_class": {"Covid": {"recall": val_covid_recall}}}))
    (folder / "train_config.json").write_text(json.dumps({
        "command": f"accelerate launch train.py --seed {seed}", "sources": ["covid19-image-dataset", "other"],
        "hyperparameters": {"seed": seed}}))
    row = {"name": left_out, "n": 10, "true_counts": {"Normal": 10}, "accuracy": 1 - covid_share, "uncertain_rate": 0.1,
           "predicted_share": {"Normal": 1 - covid_share, "Covid": covid_share, "Viral Pneumonia": 0.0}}
    (folder / "eval" / "external.json").write_text(json.dumps({left_out: row}))
    return str(folder)


def test_a_source_left_out_by_several_runs_keeps_a_row_per_seed(tmp_path):
    runs = [fake_run(tmp_path / "a", "nih", 2022, 0.79), fake_run(tmp_path / "b", "nih", 2023, 0.11),
            fake_run(tmp_path / "c", "rsna", 2022, 0.21)]
    external = build.leave_one_source_out(runs)
    assert list(external) == ["nih (seed 2022)", "nih (seed 2023)", "rsna"]
    assert [row["predicted_share"]["Covid"] for row in external.values()] == [0.79, 0.11, 0.21]
    assert external["nih (seed 2023)"]["command"].endswith("--seed 2023")
    assert "seed 2023" in external["nih (seed 2023)"]["model"]
    sentence = build.targets_sentence({"accuracy": 0.9, "per_class": {"Covid": {"recall": 0.9}}, "ood": {"flagged_rate": 0.0},
                                       "ood_check": {"rate": 1.0}, "external": external})
    assert "nih (seed 2022) adult normals called Covid (that run's validation Covid recall 0.90) 0.790" in sentence
    assert "nih (seed 2023) adult normals called Covid (that run's validation Covid recall 0.90) 0.110" in sentence
    assert build.failed_runs_sentence(external) == ""
    assert build.left_out_text(external) == (
        "2 models trained the same way without nih call 79% (seed 2022; its validation Covid recall 0.90; 10% flagged "
        "uncertain) and 11% (seed 2023; its validation Covid recall 0.90; 10% flagged uncertain) of its 10 adult normal "
        "X-rays Covid; a model trained the same way without rsna calls 21% (seed 2022; its validation Covid recall 0.90; "
        "10% flagged uncertain) of its 10 adult normal X-rays Covid")


def test_a_run_that_never_learned_covid_is_named_as_such(tmp_path):
    external = build.leave_one_source_out([fake_run(tmp_path / "a", "rsna", 2022, 0.21),
                                           fake_run(tmp_path / "b", "rsna", 2023, 0.0, val_covid_recall=0.0)])
    assert external["rsna (seed 2023)"]["validation"]["covid_recall"] == 0.0
    assert "Covid recall 0.00" in external["rsna (seed 2023)"]["model"]
    assert build.failed_runs_sentence(external).startswith("1 of these 2 runs ended with a validation Covid recall below 0.5")
    assert build.failed_runs_sentence(external) in build.external_note(external)


def test_the_same_source_and_seed_twice_is_refused(tmp_path):
    runs = [fake_run(tmp_path / "a", "nih", 2022, 0.79), fake_run(tmp_path / "b", "nih", 2022, 0.5)]
    with pytest.raises(SystemExit, match="nih with seed 2022"):
        build.leave_one_source_out(runs)


def test_the_readme_names_the_test_images_copied_from_training_only_when_there_are_some():
    copies = {"n": 9, "of": 66, "accuracy_without": 0.8947, "recall_without": {"Normal": 0.95, "Covid": 0.7647},
              "by_class": {"Normal": {"copies": 0, "n": 20}, "Covid": {"copies": 9, "n": 26}}}
    sentence = build.copies_sentence(copies)
    assert sentence.startswith(" 9 of the 66 test images (Covid 9 of 26) are copies of an image it was trained on")
    assert sentence.endswith("without them, accuracy is 0.895 and recall per class Normal 0.950, Covid 0.765.")
    one = build.copies_sentence({**copies, "n": 1, "by_class": {"Covid": {"copies": 1, "n": 26}}})
    assert " 1 of the 66 test images (Covid 1 of 26) is a copy of" in one and "without it, accuracy" in one
    assert build.copies_sentence({**copies, "accuracy_without": None}).endswith("; no test image is left without one.")
    assert build.copies_sentence({**copies, "n": 0}) == "" and build.copies_sentence(None) == ""


def test_the_readme_says_when_two_training_sources_come_from_one_hospital():
    sentence = build.shared_origin_sentence(["covid19-image-dataset", "nih-cxr8", "rsna-radiography-db"])
    assert sentence.startswith(" nih-cxr8 and rsna-radiography-db come from one hospital, the NIH Clinical Center")
    assert build.shared_origin_sentence(["covid19-image-dataset", "nih-cxr8"]) == ""


def test_the_readme_gives_how_often_a_tighter_crop_changes_each_groups_answer():
    cell = lambda changed: {"called": {}, "uncertain": 0.0, "changed": changed}  # noqa: E731
    framing = {"groups": {"nih / Normal": {"n": 21, "framings": {"80% of each side": cell(0.9)}},
                          "kaggle / Covid": {"n": 16, "framings": {"80% of each side": cell(0.0625)}}}}
    sentence = build.framing_sentence(framing)
    assert "validation films change answer: nih / Normal 90%, kaggle / Covid 6%" in sentence
    assert build.framing_sentence(None) == ""


def test_a_gate_refitted_after_the_test_was_seen_says_so_where_its_test_flag_rate_is_given():
    metrics = json.loads((ROOT / "demo" / "starter-model" / "metrics.json").read_text())
    record = json.loads((ROOT / "demo" / "starter-model" / "card_context.json").read_text())["training"]
    refit = {"threshold_before": 0.922, "threshold": 1.19, "fpr": 0.02, "test_flagged_before": 14, "n_test": 66}
    caveat = "corrected after the test split had been seen with 14 of 66 X-rays flagged"
    assert caveat in build.readme_sections(metrics, record, gate_refit=refit)["figures"]
    assert caveat not in build.readme_sections(metrics, record)["figures"]
    note = build.refit_sentence(refit)
    assert "(0.922 -> 1.190)" in note and caveat in note and "probability at most 2%" in note


def test_packaging_again_keeps_the_given_selection_note_and_drops_what_packaging_appended():
    given = "Chosen on validation (group recall 0.954)."
    refit = build.refit_sentence({"threshold_before": 0.9, "threshold": 1.2, "fpr": 0.02, "test_flagged_before": 3, "n_test": 66})
    for appended in ("**It does not meet the targets set for it**: test Covid recall 0.846 (target >= 0.90).",
                     "It meets every target set for it: test accuracy 0.950 (target >= 0.90).",
                     refit + " **It does not meet the targets set for it**: x."):
        assert build.given_selection_note(f"{given} {appended}") == given
    assert build.given_selection_note(given) == given and build.given_selection_note(None) is None
    # packaged without --selection-note: the note was only what packaging appended
    assert build.given_selection_note("**It does not meet the targets set for it**: test Covid recall 0.846.") is None
    assert build.given_selection_note(refit) is None


def test_a_test_flag_rate_met_only_after_the_rule_was_corrected_says_so_among_the_targets():
    metrics = json.loads((ROOT / "demo" / "starter-model" / "metrics.json").read_text())
    refit = {"threshold_before": 0.922, "threshold": 1.19, "fpr": 0.02, "test_flagged_before": 14, "n_test": 66}
    tagged = "share of test X-rays flagged uncertain (its rule corrected after this split was seen)"
    assert tagged in build.targets_sentence(metrics, refit) and tagged not in build.targets_sentence(metrics)


def test_the_readmes_caution_follows_the_measured_left_out_shares_and_the_missed_covid_films():
    row = lambda source, share: {"source": source, "predicted_share": {"Covid": share}}  # noqa: E731
    metrics = {"class_names": ["Normal", "Covid", "Viral Pneumonia"], "confusion_matrix": [[20, 0, 0], [7, 18, 1], [0, 0, 20]],
               "external": {"a": row("rsna", 0.06), "b": row("nih", 0.007), "c": row("nih", 0.043)}}
    met = build.caution_sentence(metrics)
    assert "models trained the same way call 1%–6% of the normals of an adult source they have not seen Covid" in met
    assert "measured on 2 sources only" in met and "up to" not in met
    assert met.endswith("it calls 7 of the 26 test Covid films Normal.")
    missed = build.caution_sentence({**metrics, "external": {**metrics["external"], "d": row("rsna", 0.2)}})
    assert "calls up to 20% of the normals of an adult source it has not seen Covid" in missed
    none = build.caution_sentence({**metrics, "external": {}, "confusion_matrix": [[20, 0, 0], [0, 26, 0], [0, 0, 20]]})
    assert "not measured on an adult source it has not seen" in none and "Normal answer" not in none
