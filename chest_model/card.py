"""Renders the model card (``model_card.md``, Hugging Face format) from a config and measured figures.

Every number in the card comes from ``card_context``: the training record and the metrics files.
Nothing is filled in when it was not measured; the card says so instead.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .config import ChestXrayConfig

DATASET_ID = "covid19-image-dataset"
# The Hub metadata, in one place: the model class declares it to the mixin, and every card carries it.
LIBRARY_NAME = "chest-xray-classifier"
LICENSE = "mit"
PIPELINE_TAG = "image-classification"
TAGS = ["chest-x-ray", "medical-imaging", "vgg19", "research-only", "not-for-clinical-use"]


def template_text() -> str:
    return resources.files("chest_model").joinpath("model_card.md").read_text(encoding="utf-8")


def render_card(config: ChestXrayConfig, context: dict[str, Any] | None = None) -> str:
    context = dict(context or {})
    test = context.get("test_metrics")
    eval_results = None
    if test:
        dataset_name = context.get("test_dataset_name", "COVID-19 Image Dataset (test split)")
        eval_results = [
            EvalResult(
                task_type="image-classification",
                dataset_type=DATASET_ID,
                dataset_name=dataset_name,
                dataset_split="test",
                metric_type=metric,
                metric_name=label,
                metric_value=round(float(value), 4),
            )
            for metric, label, value in (
                ("accuracy", "Accuracy", test["accuracy"]),
                ("f1", "Macro F1", test["macro_f1"]),
            )
        ]
    card_data = ModelCardData(
        license=LICENSE,
        library_name=LIBRARY_NAME,
        pipeline_tag=PIPELINE_TAG,
        tags=list(TAGS),
        datasets=[DATASET_ID],
        metrics=["accuracy", "f1", "roc_auc"],
        model_name=context.get("model_name", "chest-xray-classifier"),
        eval_results=eval_results,
    )
    card = ModelCard.from_template(
        card_data,
        template_str=template_text(),
        model_name=context.get("model_name", "Chest X-ray classifier (VGG19)"),
        repo_id=context.get("repo_id"),
        config=config.to_dict(),
        training=context.get("training"),
        val_metrics=context.get("val_metrics"),
        test_metrics=test,
        test_dataset_name=context.get("test_dataset_name", "COVID-19 Image Dataset (test split)"),
        external_metrics=context.get("external_metrics"),
        external_note=context.get("external_note"),
        ood_report=context.get("ood_report"),
        selection_note=context.get("selection_note"),
    )
    return str(card)


def card_context_from_folder(folder: str | Path) -> dict[str, Any]:
    """Rebuild a card's context from a training output folder's JSON records."""
    folder = Path(folder)
    context: dict[str, Any] = {}
    for key, relative in (("training", "train_config.json"), ("val_metrics", "val_metrics.json"), ("test_metrics", "eval/metrics.json"),
                          ("external_metrics", "eval/external.json")):
        path = folder / relative
        if path.is_file():
            context[key] = json.loads(path.read_text(encoding="utf-8"))
    return context
