"""Renders the model card (``model_card.md``, Hugging Face format) from a config and measured figures.

Every number in the card comes from ``card_context``: the training record and the metrics files.
Nothing is filled in when it was not measured; the card says so instead.
"""
from __future__ import annotations

import re
import shlex
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .citations import REFERENCE_COLLECTION, cited_sources, collection_for
from .config import DEFAULT_CLASS_NAMES, ChestXrayConfig, read_json
from .preprocess import contrast_step

DATASET_ID = "covid19-image-dataset"
REFERENCE_TEST_NAME = "COVID-19 Image Dataset (test split)"
# The Hub metadata, in one place: the model class declares it to the mixin, and every card carries it.
LIBRARY_NAME = "chest-xray-classifier"
LICENSE = "mit"
PIPELINE_TAG = "image-classification"
TAGS = ("chest-x-ray", "medical-imaging", "vgg19", "research-only", "not-for-clinical-use")
DISTRIBUTION = "chest-xray-classifier"  # the installed package, whose metadata holds [project.urls]
# Where a card rendered without a repo id names the model; push_to_hub puts the real repo id there.
LOCAL_PLACEHOLDER = "path/to/model-folder"
# The Hub's copies of torchvision's ImageNet weights (timm ports IMAGENET1K_V1 unchanged), for base_model.
IMAGENET_BASE_MODELS = {"vgg19": "timm/vgg19.tv_in1k", "vgg19_bn": "timm/vgg19_bn.tv_in1k"}


def template_text() -> str:
    return resources.files("chest_model").joinpath("model_card.md").read_text(encoding="utf-8")


def render_card(config: ChestXrayConfig, context: dict[str, Any] | None = None) -> str:
    context = dict(context or {})
    test = context.get("test_metrics")
    sources = training_sources(context)
    # The tutorial's dataset and its known confounding are explained unless the card can tell the
    # weights were trained on something else: sources that are all other known collections, or
    # classes other than the tutorial's. A folder named DATA may well be that dataset: when in doubt, warn.
    kaggle_reference = tutorial_data_possible(sources, config.class_names)
    # Named as that dataset only where a source is known to be it; otherwise its caveats come as "if".
    kaggle_known = any(collection_for(s) is REFERENCE_COLLECTION for s in sources)
    test_name = context.get("test_dataset_name") or (REFERENCE_TEST_NAME if kaggle_known else "test split")
    eval_results = None
    if test:
        eval_results = [
            EvalResult(
                task_type="image-classification",
                dataset_type=DATASET_ID if kaggle_known else _slug(sources[0] if sources else "test split"),
                dataset_name=test_name,
                dataset_split="test",
                metric_type=metric,
                metric_name=label,
                metric_value=round(float(value), 4),
                metric_args=args,
            )
            for metric, label, value, args in (
                ("accuracy", "Accuracy", test["accuracy"], None),
                ("f1", "Macro F1", test["macro_f1"], {"average": "macro"}),
                ("roc_auc", "Macro ROC-AUC (one-vs-rest)", (test.get("roc_auc") or {}).get("macro"),
                 {"average": "macro", "multi_class": "ovr"}),
            )
            if value is not None
        ]
    card_data = ModelCardData(
        license=LICENSE,
        library_name=LIBRARY_NAME,
        pipeline_tag=PIPELINE_TAG,
        tags=hub_tags(),
        base_model=base_model(config),
        # No `datasets:`: the Hub links it to Hub dataset ids, and none of the known sources is one
        # (they are named, linked and cited in the card's Training data section instead).
        metrics=["accuracy", "f1", "roc_auc"],
        model_name=context.get("model_name", "chest-xray-classifier") if eval_results else None,
        eval_results=eval_results,
    )
    card = ModelCard.from_template(
        card_data,
        template_str=template_text(),
        model_name=context.get("model_name", "Chest X-ray classifier (VGG19)"),
        repo_id=context.get("repo_id"),
        placeholder=LOCAL_PLACEHOLDER,
        repository_url=repository_url(),
        base_model=base_model(config),
        citations=cited_sources(sources, external_sources(context)),
        config=config.to_dict(),
        contrast_step=contrast_step(config.contrast),
        training=shareable_training(context.get("training")),
        val_metrics=context.get("val_metrics"),
        test_metrics=test,
        test_dataset_name=test_name,
        kaggle_reference=kaggle_reference,
        kaggle_known=kaggle_known,
        external_metrics=context.get("external_metrics"),
        external_note=context.get("external_note"),
        ood_report=context.get("ood_report"),
        framing_check=context.get("framing_check") or evaluated_framing_check(test, test_name),
        selection_note=context.get("selection_note"),
    )
    return str(card)


UNFINISHED_MARK = "<!-- unfinished-training-run -->"  # written by the template for a run's mid-run save


def is_unfinished_run(card: str) -> bool:
    return UNFINISHED_MARK in card


def shareable_training(training: dict[str, Any] | None) -> dict[str, Any] | None:
    """The training record as the card shows it: its commands without local absolute paths."""
    if not training:
        return training
    commands = [training.get("command") or "", *(training.get("resumed_with") or [])]
    shown = [shareable_command(c) for c in commands]
    return {**training, "command": shown[0], "resumed_with": shown[1:], "paths_shortened": shown != commands}


_WINDOWS_ABSOLUTE = re.compile(r"^[A-Za-z]:[\\/]|^\\\\")


def shareable_command(command: str) -> str:
    """``command`` with each absolute path (alone, after ``NAME=``, after ``--option=``, or both) cut to
    ``.../`` and its last two parts: a card is shared, and a path on one machine says nothing elsewhere
    but its owner's folder names. Relative paths stay as given."""
    try:
        tokens = shlex.split(command)
    except ValueError:  # unbalanced quotes: not a command this package wrote
        return command
    return " ".join(shlex.quote(_shareable_token(t)) for t in tokens)


def _shareable_token(token: str) -> str:
    head, sep, value = token.partition("=")
    if sep and (token.startswith("-") or not re.search(r"[\\/]", head)):  # --option=VALUE or NAME=PATH
        return head + sep + _shareable_token(value) if token.startswith("-") else head + sep + _shareable_path(value)
    return _shareable_path(token)


def _shareable_path(value: str) -> str:
    if not (value.startswith(("/", "~")) or _WINDOWS_ABSOLUTE.match(value)):
        return value
    parts = [p for p in re.split(r"[\\/]+", value) if p and p != "~" and not _WINDOWS_DRIVE.match(p)]
    return "/".join([".../" if len(parts) > 2 else "...", *parts[-2:]]).replace("...//", ".../") if parts else "..."


_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:$")


def evaluated_framing_check(test: dict[str, Any] | None, test_name: str) -> dict[str, Any] | None:
    """The framing check of ``chest-model evaluate --framing-check``, named for the card, if it ran."""
    framing = ((test or {}).get("audit") or {}).get("framing")
    return {"what": f"the {test_name} images, by true class", **framing} if framing else None


def tutorial_data_possible(sources: list[str], class_names: list[str]) -> bool:
    """Whether the weights may come from the tutorial's dataset (children's Normal and Viral Pneumonia
    against adults' Covid), so that the card must carry its caveats."""
    known = [collection_for(s) for s in sources]
    if any(c is REFERENCE_COLLECTION for c in known):
        return True
    return list(class_names) == list(DEFAULT_CLASS_NAMES) and not (known and all(known))


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "custom"


def hub_tags() -> list[str]:
    """The one tag list: ours, then those the Hub mixin adds (``model_hub_mixin``...), each once.

    The mixin's own tags are read off a bare subclass, as the model class gets them, so that this
    module need not import the model (which imports it).
    """
    return list(dict.fromkeys([*TAGS, *_mixin_tags()]))


@lru_cache(maxsize=1)
def _mixin_tags() -> tuple[str, ...]:
    from huggingface_hub import PyTorchModelHubMixin
    from torch import nn

    class Probe(nn.Module, PyTorchModelHubMixin, tags=[]):
        pass

    return tuple(Probe._hub_mixin_info.model_card_data.tags or [])


def base_model(config: ChestXrayConfig) -> str | None:
    """The Hub id of the ImageNet weights the backbone started from; None for a random start."""
    from .backbones import imagenet_weights_name

    started_from_imagenet = config.backbone_init == imagenet_weights_name(config.backbone)
    return IMAGENET_BASE_MODELS.get(config.backbone) if started_from_imagenet else None


def project_urls() -> dict[str, str]:
    """The installed package's ``[project.urls]`` (pyproject.toml is their one home); {} if it is not installed."""
    from importlib import metadata

    try:
        entries = metadata.metadata(DISTRIBUTION).get_all("Project-URL") or []
    except metadata.PackageNotFoundError:
        return {}
    return dict(entry.split(", ", 1) for entry in entries if ", " in entry)


def repository_url() -> str | None:
    urls = project_urls()
    return urls.get("Repository") or urls.get("Homepage")


def training_sources(context: dict[str, Any]) -> list[str]:
    """The data sources the weights were trained on: the training record's, else what the context names."""
    training = context.get("training") or {}
    return list(training.get("sources") or context.get("sources") or [])


def external_sources(context: dict[str, Any]) -> list[str]:
    """The sources of the external validation sets (a set's own source name, else its name)."""
    rows = context.get("external_metrics") or {}
    return list(dict.fromkeys(row.get("source") or row.get("name") or key for key, row in rows.items()))


def card_for_repo(card: str, repo_id: str, revision: str | None = None) -> str:
    """The card naming ``repo_id`` (and the branch ``revision``, when the model is pushed to one) where it
    says how to load the model (it may name a local folder or the placeholder); everything else stays
    byte for byte."""
    match = re.search(r'ChestXrayClassifier\.from_pretrained\("([^"\n]+)"(?:, revision="[^"\n]*")?\)', card)
    if not match:
        return card
    named = re.escape(match.group(1))
    call, flag = (f'"{repo_id}", revision="{revision}"', f"{repo_id} --revision {revision}") if revision else (f'"{repo_id}"', repo_id)
    card = re.sub(rf'from_pretrained\("{named}"(?:, revision="[^"\n]*")?\)', lambda _: f"from_pretrained({call})", card)
    return re.sub(rf"--model {named}(?: --revision \S+)? ", lambda _: f"--model {flag} ", card)


def card_context_from_folder(folder: str | Path) -> dict[str, Any]:
    """Rebuild a card's context from a training output folder's JSON records."""
    folder = Path(folder)
    # A packaged model keeps the whole context its card was rendered from; a training folder, the records.
    saved = read_json(folder / "card_context.json") if (folder / "card_context.json").is_file() else {}
    context: dict[str, Any] = dict(saved) if isinstance(saved, dict) else {}
    for key, relative in (("training", "train_config.json"), ("val_metrics", "val_metrics.json"), ("test_metrics", "eval/metrics.json"),
                          ("external_metrics", "eval/external.json")):
        path = folder / relative
        if path.is_file():
            context[key] = read_json(path)
    if "test_metrics" not in context and (folder / "metrics.json").is_file():  # `chest-model evaluate --output-dir MODEL`
        metrics = read_json(folder / "metrics.json")
        if isinstance(metrics, dict) and "accuracy" in metrics:  # one set, not {"sets": ...}
            context["test_metrics"] = metrics
    return context
