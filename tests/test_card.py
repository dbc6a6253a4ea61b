"""The model card template and its rendering."""

import yaml

from chest_model import ChestXrayConfig
from chest_model.card import render_card, template_text
from helpers import ROOT


def _front_matter(card: str) -> dict:
    _, meta, _ = card.split("---", 2)
    return yaml.safe_load(meta)


def test_the_package_template_is_the_top_level_model_card():
    assert template_text() == (ROOT / "model_card.md").read_text()


def test_card_metadata_and_sections_without_measurements():
    card = render_card(ChestXrayConfig())
    meta = _front_matter(card)
    assert meta["pipeline_tag"] == "image-classification" and meta["library_name"] == "chest-xray-classifier"
    assert meta["license"] and meta["tags"] and meta["datasets"] and meta["metrics"]
    for section in ("## Intended use", "## Out-of-scope use", "## Training data", "## Evaluation", "## Limitations", "## How to use"):
        assert section in card
    assert "research demo, not for clinical use" in card.lower()
    assert "source confounding" in card.lower()
    assert "No test-set evaluation is recorded" in card
    assert "from_pretrained" in card
    assert "model-index" not in meta


def test_card_numbers_come_from_the_metrics():
    metrics = {
        "n": 66, "accuracy": 0.8636, "macro_f1": 0.8512,
        "per_class": {name: {"precision": 0.9, "recall": 0.8, "f1": 0.847, "support": 22} for name in ("Normal", "Covid", "Viral Pneumonia")},
        "roc_auc": {"macro": 0.9321, "per_class": {}}, "ece": 0.0712,
        "confusion_matrix": [[20, 1, 1], [2, 18, 2], [1, 1, 20]],
    }
    card = render_card(ChestXrayConfig(), {"test_metrics": metrics})
    assert "0.864" in card and "0.851" in card and "0.932" in card and "0.071" in card
    meta = _front_matter(card)
    results = meta["model-index"][0]["results"][0]
    values = {m["type"]: m["value"] for m in results["metrics"]}
    assert values == {"accuracy": 0.8636, "f1": 0.8512}
