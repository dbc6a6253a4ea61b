"""`chest-model evaluate` and `chest-model card`, end to end."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from chest_model import ChestXrayClassifier
from helpers import DATASET, ROOT, make_class_folders, requires_dataset

KEYS = {"accuracy", "macro_f1", "per_class", "roc_auc", "ece", "confusion_matrix", "n", "ci", "audit", "ood", "reliability", "hardest"}
STARTER = ROOT / "demo" / "starter-model"


def cli(*args):
    return subprocess.run([sys.executable, "-m", "chest_model", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.fixture
def evaluated(tmp_path, tiny_model):
    make_class_folders(tmp_path / "data" / "train", per_class=5, size=48, seed=1)
    make_class_folders(tmp_path / "data" / "test", per_class=4, size=48, seed=2)
    tiny_model.save_pretrained(tmp_path / "model")
    result = cli("evaluate", "--model", str(tmp_path / "model"), "--data-dir", str(tmp_path / "data" / "test"),
                 "--output-dir", str(tmp_path / "eval"), "--bootstrap", "200")
    assert result.returncode == 0, result.stderr
    return tmp_path, result.stdout


def test_evaluate_writes_metrics_and_figures(evaluated):
    tmp_path, stdout = evaluated
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert KEYS <= set(metrics)
    assert metrics["n"] == 12 and sum(map(sum, metrics["confusion_matrix"])) == 12
    for name in ("Normal", "Covid", "Viral Pneumonia"):
        assert {"precision", "recall", "specificity", "f1", "support"} <= set(metrics["per_class"][name])
    assert len(metrics["ci"]["accuracy"]) == 2 and metrics["ci"]["accuracy"][0] <= metrics["accuracy"] <= metrics["ci"]["accuracy"][1]
    audit = metrics["audit"]
    assert audit["metadata_baseline_accuracy"] is not None  # sibling train/ found by default
    assert {"center_masked_accuracy", "center_only_accuracy", "verdict"} <= set(audit)
    for figure in ("confusion_matrix.png", "reliability.png", "misclassified.png"):
        assert (tmp_path / "eval" / figure).stat().st_size > 1000
    assert "accuracy" in stdout and "metadata-only classifier" in stdout and "lungs hidden" in stdout


def test_card_is_rendered_from_the_metrics_file(evaluated):
    tmp_path, _ = evaluated
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    result = cli("card", "--model", str(tmp_path / "model"), "--metrics", str(tmp_path / "eval" / "metrics.json"))
    assert result.returncode == 0, result.stderr
    card = (tmp_path / "model" / "README.md").read_text()
    for section in ("## Intended use", "## Out-of-scope use", "## Training data", "## Evaluation", "### Shortcut audit", "## Limitations", "## How to use"):
        assert section in card
    meta = yaml.safe_load(card.split("---")[1])
    reported = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert reported["accuracy"] == round(metrics["accuracy"], 4) and reported["f1"] == round(metrics["macro_f1"], 4)
    # Every three-decimal figure in the Evaluation section is one of the measured numbers.
    section = card.split("## Evaluation", 1)[1].split("## Limitations", 1)[0]
    measured = _numbers(metrics)
    for text in re.findall(r"\b\d\.\d{3}\b", section):
        assert any(abs(float(text) - value) < 0.0006 for value in measured), text
    assert f"{metrics['audit']['metadata_baseline_accuracy']:.3f}" in section
    assert f"{metrics['ci']['accuracy'][0]:.3f}" in section
    assert ChestXrayClassifier.from_pretrained(tmp_path / "model").config.image_size == 32

    # Figures measured on another model never reach this model's card.
    other = tmp_path / "other"
    ChestXrayClassifier(image_size=32, hidden_size=16).save_pretrained(other)
    before = (other / "README.md").read_text()
    refused = cli("card", "--model", str(other), "--metrics", str(tmp_path / "eval" / "metrics.json"))
    assert refused.returncode == 2 and "measured another model" in refused.stderr and "Traceback" not in refused.stderr
    assert (other / "README.md").read_text() == before


def _numbers(obj):
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        return [float(obj)]
    if isinstance(obj, dict):
        return [v for x in obj.values() for v in _numbers(x)]
    if isinstance(obj, list):
        return [v for x in obj for v in _numbers(x)]
    return []


def test_several_named_sets_are_reported_separately_and_a_one_class_set_gives_shares(tmp_path, tiny_model):
    make_class_folders(tmp_path / "data" / "test", per_class=3, size=48, seed=2)
    adults = make_class_folders(tmp_path / "adults", per_class=5, size=48, seed=3)
    for name in ("Covid", "Viral Pneumonia"):
        for path in (adults / name).iterdir():
            path.unlink()
        (adults / name).rmdir()
    (adults / "Normal" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (tmp_path / "data" / "test" / "Covid" / "empty.jpg").write_bytes(b"")
    tiny_model.save_pretrained(tmp_path / "model")
    result = cli("evaluate", "--model", str(tmp_path / "model"), "--data-dir", f"kids={tmp_path / 'data' / 'test'}",
                 "--data-dir", f"adult-normals={adults}", "--output-dir", str(tmp_path / "eval"), "--bootstrap", "50",
                 "--framing-check", "--tone-check")
    assert result.returncode == 0, result.stderr
    # Files left out are named, with their problem, in each set's printed report (not only counted).
    kids, adults_text = result.stdout.split("== adult-normals ==")
    assert "unreadable files skipped (1; not in the figures above)" in kids and "empty.jpg: empty file" in kids
    assert "broken.png" in adults_text and "broken.png" not in kids
    assert "== kids ==" in result.stdout and "== adult-normals ==" in result.stdout
    sets = json.loads((tmp_path / "eval" / "metrics.json").read_text())["sets"]
    assert sets["kids"]["n"] == 9 and KEYS <= set(sets["kids"])
    adult = sets["adult-normals"]
    assert adult["n"] == 5 and adult["true_counts"] == {"Normal": 5}
    assert set(adult["predicted_share"]) == {"Normal", "Covid", "Viral Pneumonia"}
    assert sum(adult["predicted_share"].values()) == pytest.approx(1)
    assert adult["accuracy"] == pytest.approx(adult["predicted_share"]["Normal"])
    # --framing-check: per true class, the films as given are called as the set's own figures say.
    framing = adult["framing"]["groups"]
    assert list(framing) == ["Normal"] and framing["Normal"]["n"] == 5
    assert framing["Normal"]["framings"]["as given"]["called"] == pytest.approx(adult["predicted_share"])
    assert set(sets["kids"]["audit"]["framing"]["groups"]) == {"Normal", "Covid", "Viral Pneumonia"}
    assert "framing check" in kids and "framing check" in adults_text
    # --tone-check: the same per-class table, over gamma curves.
    tone = adult["tone"]["groups"]["Normal"]["tones"]
    assert tone["as given"]["called"] == pytest.approx(adult["predicted_share"]) and len(tone) == 3
    assert set(sets["kids"]["audit"]["tone"]["groups"]) == {"Normal", "Covid", "Viral Pneumonia"}
    assert "tone check" in kids and "tone check" in adults_text
    assert (tmp_path / "eval" / "kids" / "confusion_matrix.png").is_file()


def _shipped() -> dict:
    return json.loads((STARTER / "metrics.json").read_text())


def _starter_record() -> dict:
    """The starter model's training record, as its card was rendered from it."""
    return json.loads((STARTER / "card_context.json").read_text())["training"]


@requires_dataset()
@pytest.mark.dataset
@pytest.mark.skipif(not (STARTER / "model.safetensors").exists(), reason="no starter model in this checkout")
def test_starter_model_on_the_real_test_split(tmp_path):
    """The shipped figures, measured again by `chest-model evaluate` on the real test split."""
    # Every folder the starter model trained on, as its card records them (under data/), here: the first
    # teaches the metadata baseline, and all are searched for copies of test images, as packaging did.
    sources = _starter_record()["data_dir"]
    train_dirs = [spec.replace("=data/", f"={DATASET.parent}/", 1) for spec in sources]
    assert all(Path(spec.partition("=")[2]).is_dir() for spec in train_dirs), train_dirs
    result = cli("evaluate", "--model", str(STARTER), "--data-dir", str(DATASET / "test"), "--output-dir", str(tmp_path),
                 "--bootstrap", "200", *[arg for spec in train_dirs for arg in ("--train-dir", spec)])
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    shipped = _shipped()
    assert metrics["n"] == shipped["n"] == 66
    # One image may flip across CPUs' float rounding; more than that is a different model or pipeline.
    assert metrics["accuracy"] == pytest.approx(shipped["accuracy"], abs=0.02)
    assert metrics["per_class"]["Covid"]["recall"] == pytest.approx(shipped["per_class"]["Covid"]["recall"], abs=0.04)
    assert metrics["ood"]["flagged"] == pytest.approx(shipped["ood"]["flagged"], abs=1)
    by_class = metrics["ood"]["flagged_by_class"]
    assert {name: row["n"] for name, row in by_class.items()} == {name: row["support"] for name, row in metrics["per_class"].items()}
    assert sum(row["flagged"] for row in by_class.values()) == metrics["ood"]["flagged"]
    assert metrics["audit"]["metadata_baseline_accuracy"] == pytest.approx(shipped["audit"]["metadata_baseline_accuracy"])
    # The dataset's known shortcut must show: file metadata alone is far above always guessing the commonest class.
    assert metrics["audit"]["metadata_baseline_accuracy"] >= metrics["audit"]["majority_class_accuracy"] + 0.3
    # Copies: the shipped audit searched the run's training split, this one its folders (training and
    # validation images): every shipped copy is found again, with the same training film.
    copies, shipped_copies = metrics["audit"]["train_copies"], shipped["audit"]["train_copies"]
    assert shipped_copies["searched"] == "the training split" and copies["searched"] == "the training folders"
    assert shipped_copies["n_train"] == sum(_starter_record()["data_counts"]["train"].values())
    assert copies["n_train"] == shipped_copies["n_train"] + sum(_starter_record()["data_counts"]["val"].values())
    found = {pair["file"]: pair for pair in copies["pairs"]}
    for pair in shipped_copies["pairs"]:
        assert found[pair["file"]]["distance"] <= pair["distance"]


@requires_dataset()
@pytest.mark.dataset
@pytest.mark.skipif(not (STARTER / "model.safetensors").exists(), reason="no starter model in this checkout")
def test_the_starter_models_framing_check_is_measured_again_on_its_validation_split():
    """The card's framing table, measured again on the run's validation split rebuilt from its record."""
    from chest_model.framing import framing_check
    from chest_model.training import rebuild_split

    record = _starter_record()
    here = {**record, "command": record["command"].replace("=data/", f"={DATASET.parent}/")}
    missing = [spec for spec in record["data_dir"] if not (DATASET.parent / spec.partition("=data/")[2]).is_dir()]
    if missing:
        pytest.skip(f"the starter model's training folders are not all here (missing {missing} under {DATASET.parent})")
    model = ChestXrayClassifier.from_pretrained(STARTER)
    val = rebuild_split(here, model.preprocessor)[0].val
    shipped = json.loads((STARTER / "card_context.json").read_text())["framing_check"]
    measured = framing_check(model, val.paths, val.group_names(record["class_names"]))
    assert measured["framings"] == shipped["framings"] and list(measured["groups"]) == list(shipped["groups"])
    for group, row in shipped["groups"].items():
        assert measured["groups"][group]["n"] == row["n"]
        for framing, cell in row["framings"].items():  # one film may flip across CPUs' float rounding
            again = measured["groups"][group]["framings"][framing]
            assert abs(again["changed"] - cell["changed"]) <= 1.01 / row["n"], (group, framing)
            assert all(abs(again["called"][c] - share) <= 1.01 / row["n"] for c, share in cell["called"].items()), (group, framing)


@pytest.mark.skipif(not (STARTER / "metrics.json").exists(), reason="no starter model in this checkout")
@pytest.mark.xfail(strict=True, raises=AssertionError, reason="issue 9's targets are not met by the shipped starter model (its card and metrics.json "
                                       "say by how much); strict, so a model that meets them makes this pass and the mark must go")
def test_starter_model_meets_the_targets_for_it():
    shipped = _shipped()
    assert shipped["accuracy"] >= 0.90 and shipped["per_class"]["Covid"]["recall"] >= 0.90
    assert shipped["ood"]["flagged_rate"] <= 0.05
    assert shipped["external"], "no left-out source measured"
    for name, row in shipped["external"].items():
        assert row["predicted_share"]["Covid"] <= 0.10, f"{name}: a left-out adult source is called Covid"


@pytest.mark.skipif(not (STARTER / "model.safetensors").exists(), reason="no starter model in this checkout")
def test_starter_model_says_uncertain_for_non_xrays():
    from chest_model.ood_check import check, non_xray_images

    samples = non_xray_images()
    report = check(ChestXrayClassifier.from_pretrained(STARTER), samples)
    assert report["rate"] >= 0.95, [r["name"] for r in report["images"] if not r["uncertain"]]
    if len(samples) == _shipped()["ood_check"]["n"]:  # the same packages installed: the shipped figure holds
        assert report["flagged"] == _shipped()["ood_check"]["flagged"]


@pytest.mark.skipif(not (STARTER / "metrics.json").exists(), reason="no starter model in this checkout")
def test_readme_and_card_figures_are_the_measured_ones():
    shipped = _shipped()
    readme = (ROOT / "README.md").read_text()
    card = (STARTER / "README.md").read_text()
    for text in (readme, card):
        assert f"{shipped['accuracy']:.3f}" in text
        assert f"scores {shipped['audit']['metadata_baseline_accuracy']:.0%} on its test split" in text
    assert f"{shipped['per_class']['Covid']['recall']:.3f}" in readme
    copies = shipped["audit"]["train_copies"]
    assert f"{copies['n']} of the {copies['of']} test images" in readme and f"{copies['n']} of the {copies['of']} test images" in card
    assert f"Covid {copies['recall_without']['Covid']:.3f}" in readme and f"Covid {copies['recall_without']['Covid']:.3f}" in card
    for name, row in shipped["external"].items():
        assert name in card and f"{100 * row['predicted_share']['Covid']:.0f}%" in card
        # Each left-out set was checked for copies of the images its run trained on.
        assert row["train_copies"]["searched"] == "the training split" and row["train_copies"]["of"] == row["n"]
        assert f"| {100 * row['uncertain_rate']:.0f}% | {row['train_copies']['n']} |" in card
        assert f"{row['predicted_share']['Covid']:.0%}" in readme
    assert f"{shipped['ood']['flagged']} of {shipped['n']} test X-rays flagged as uncertain" in readme
    assert f"{shipped['ood']['flagged']} of {shipped['n']} test-split X-rays" in card
    refit = json.loads((STARTER / "card_context.json").read_text()).get("gate_refit")
    if refit:  # a threshold fitted again after the test was seen says so wherever its test flag rate is given
        caveat = f"corrected after the test split had been seen with {refit['test_flagged_before']} of {refit['n_test']} X-rays flagged"
        assert caveat in readme and caveat in card
    assert "/shared/" not in card and "/root" not in card and "/home/" not in card


def test_ood_summary_counts_flags_per_true_class():
    from chest_model.evaluation import flagged_by_class_text, ood_summary

    reasons = [[], ["unlike the training X-rays (feature distance 2.00 > 1.00, ...)"], ["low confidence"], [], []]
    summary = ood_summary(reasons, ChestXrayClassifier().config, [0, 0, 1, 1, 1], ["Normal", "Covid"])
    assert summary["flagged"] == 2 and summary["feature_flagged"] == 1
    assert summary["flagged_by_class"] == {"Normal": {"flagged": 1, "n": 2}, "Covid": {"flagged": 1, "n": 3}}
    assert flagged_by_class_text(summary) == " (Normal 1 of 2, Covid 1 of 3)"
    assert "flagged_by_class" not in ood_summary(reasons, ChestXrayClassifier().config)  # no labels, no breakdown


@pytest.mark.skipif(not (STARTER / "model.safetensors").exists(), reason="no starter model in this checkout")
def test_the_starter_models_card_renders_again_from_its_own_records(tmp_path):
    import shutil

    folder = shutil.copytree(STARTER, tmp_path / "starter")
    result = cli("card", "--model", str(folder), "--metrics", str(folder / "metrics.json"), "--output", str(tmp_path / "card.md"))
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr
    assert (tmp_path / "card.md").read_text() == (STARTER / "README.md").read_text()


@pytest.mark.parametrize("evaluate", ["evaluate_model", "evaluate_external"])
def test_a_set_with_no_readable_image_is_an_error_naming_the_files(tmp_path, tiny_model, evaluate):
    import chest_model.evaluation as evaluation
    from chest_model.data import DatasetError

    for name in tiny_model.class_names:
        (tmp_path / "set" / name).mkdir(parents=True)
        (tmp_path / "set" / name / "scan.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(DatasetError, match=r"none of its 3 image files can be read") as info:
        getattr(evaluation, evaluate)(tiny_model, tmp_path / "set")
    # The set named once, its files within it (as metrics.json names them: the file may be shared).
    assert f"cannot evaluate {tmp_path / 'set'}:" in str(info.value) and "\n  - Covid/scan.png: corrupt PNG" in str(info.value)


def test_subgroups_report_every_set_per_group_of_its_csv(tmp_path, tiny_model):
    make_class_folders(tmp_path / "test", per_class=3, size=48, seed=2)
    adults = make_class_folders(tmp_path / "adults", per_class=4, size=48, seed=3, class_names=["Normal"])
    files = sorted((adults / "Normal").iterdir())
    # The CSV names adults' films by SET/CLASS/FILE and the test set's Covid films by CLASS/FILE (both sets have
    # files of the same names); one adult film is missing from it.
    rows = [f"adults/Normal/{p.name},{'AP' if i % 2 else 'PA'},{30 + i}" for i, p in enumerate(files[:-1])]
    rows += [f"Covid/{p.name},PA,50" for p in sorted((tmp_path / "test" / "Covid").iterdir())]
    (tmp_path / "films.csv").write_text("file,view,age\n" + "\n".join(rows) + "\n")
    tiny_model.save_pretrained(tmp_path / "model")
    result = cli("evaluate", "--model", str(tmp_path / "model"), "--data-dir", f"kids={tmp_path / 'test'}",
                 "--data-dir", f"adults={adults}", "--subgroups", str(tmp_path / "films.csv"), "--subgroup-by", "view",
                 "--subgroup-by", "age", "--output-dir", str(tmp_path / "eval"), "--bootstrap", "20")
    assert result.returncode == 0, result.stderr
    sets = json.loads((tmp_path / "eval" / "metrics.json").read_text())["sets"]
    adult = sets["adults"]["subgroups"]
    assert adult["not_listed"] == 1 and adult["columns"]["view"]["AP"]["n"] == 1 and adult["columns"]["view"]["PA"]["n"] == 2
    # Each group's shares are the set's own calls restricted to it: together they give the set's figure.
    called = sum(row["n"] * row["predicted_share"]["Covid"] for row in adult["columns"]["view"].values())
    assert called == pytest.approx(sets["adults"]["predicted_share"]["Covid"] * sets["adults"]["n"])
    kids = sets["kids"]["subgroups"]
    assert kids["not_listed"] == 6 and kids["columns"]["view"]["PA"]["n"] == 3
    assert set(kids["columns"]["view"]["PA"]["predicted_share_by_true_class"]) == {"Covid"}
    assert result.stdout.count("subgroups (from films.csv") == 2 and "(not in the CSV)" in result.stdout

    refused = cli("evaluate", "--model", str(tmp_path / "model"), "--data-dir", str(adults),
                  "--subgroups", str(tmp_path / "films.csv"), "--subgroup-by", "site")
    assert refused.returncode == 2 and "films.csv: no column 'site'" in refused.stderr and "Traceback" not in refused.stderr
    refused = cli("evaluate", "--model", str(tmp_path / "model"), "--data-dir", str(adults), "--subgroup-by", "view")
    assert refused.returncode == 2 and "--subgroup-by needs --subgroups" in refused.stderr


NIH_ADULTS = DATASET.parent / "adult-normal" / "nih-cxr8-darkcovidnet"


@pytest.mark.dataset
@pytest.mark.skipif(not (NIH_ADULTS / "manifest.csv").is_file(), reason=f"adult normal X-rays not found at {NIH_ADULTS}")
@pytest.mark.skipif(not (STARTER / "model.safetensors").exists(), reason="no starter model in this checkout")
def test_subgroups_from_the_real_nih_manifest():
    """Every NIH adult normal is found in its release's manifest, and reported per view and age band."""
    result = cli("evaluate", "--model", str(STARTER), "--data-dir", f"nih={NIH_ADULTS}",
                 "--subgroups", str(NIH_ADULTS / "manifest.csv"), "--subgroup-by", "view,age")
    assert result.returncode == 0, result.stderr
    assert "images not in it" not in result.stdout
    view = result.stdout.split("subgroups (from manifest.csv)")[1]
    assert re.search(r"\n  AP +38 ", view) and re.search(r"\n  PA +101 ", view)
    assert len(re.findall(r"\n  \d+-\d+ +\d+ ", view)) == 4  # four age bands
