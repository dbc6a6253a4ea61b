"""`chest-model evaluate` and `chest-model card`, end to end."""
import json
import re
import subprocess
import sys

import pytest
import yaml

from chest_model import ChestXrayClassifier
from conftest import DATASET, ROOT, make_class_folders, requires_dataset

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


@requires_dataset()
@pytest.mark.dataset
@pytest.mark.skipif(not (STARTER / "model.safetensors").exists(), reason="no starter model in this checkout")
def test_starter_model_on_the_real_test_split(tmp_path):
    model = ChestXrayClassifier.from_pretrained(STARTER)
    from chest_model.evaluation import evaluate_model

    metrics = evaluate_model(model, DATASET / "test", output_dir=tmp_path, n_bootstrap=200)
    assert metrics["n"] == 66
    assert metrics["audit"]["metadata_baseline_accuracy"] > 0.8, "the dataset's known shortcut must show"
    assert metrics["ood"]["flagged_rate"] <= 0.1
    shipped = json.loads((STARTER / "metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(shipped["accuracy"], abs=0.02)
