"""The model card template and its rendering."""

import pytest
import yaml

from chest_model import ChestXrayConfig
from chest_model.backbones import imagenet_weights_name
from chest_model.card import TAGS, project_urls, render_card, template_text
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
    assert meta["license"] and meta["tags"] and meta["metrics"]
    assert "datasets" not in meta and "model_name" not in meta  # no Hub dataset id is known; no model-index to name
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
    assert values == {"accuracy": 0.8636, "f1": 0.8512, "roc_auc": 0.9321}
    args = {m["type"]: m.get("args") for m in results["metrics"]}
    assert args["roc_auc"]["average"] == "macro" and args["f1"] == {"average": "macro"}


def _training_record(sources):
    return {"command": "accelerate launch train.py", "sources": sources, "epochs": 2, "best_epoch": 1,
            "selection_metric": "macro_f1", "world_size": 1, "device": "cpu", "mixed_precision": "no",
            "hyperparameters": {"lr": 0.001},
            "data_counts": {"train": {"Normal": 4, "Covid": 4, "Viral Pneumonia": 4}},
            "data_counts_by_source": {"train": {s: {"Normal": 4} for s in sources}}}


def test_card_cites_exactly_the_collections_it_was_trained_on():
    one = render_card(ChestXrayConfig(), {"training": _training_record(["covid19-image-dataset"])})
    assert "@article{cohen2020covid" in one and "@article{kermany2018identifying" in one
    assert "wang2017chestxray8" not in one and "chowdhury2020can" not in one
    assert "https://www.kaggle.com/datasets/pranavraikokte/covid19-image-dataset" in one

    three = render_card(ChestXrayConfig(), {"training": _training_record(
        ["covid19-image-dataset", "nih-cxr8", "rsna-covid19-radiography-db"])})
    for key in ("cohen2020covid", "kermany2018identifying", "wang2017chestxray8", "chowdhury2020can", "rahman2021exploring"):
        assert three.count("{" + key + ",") == 1, key
    assert "https://nihcc.app.box.com/v/ChestXray-NIHCC" in three
    assert "https://www.kaggle.com/datasets/tawsifurrahman/covid19-radiography-database" in three

    assert "**Not independent sources:** nih-cxr8 and rsna-covid19-radiography-db come from one hospital, the NIH Clinical Center" in three
    assert "Not independent" not in one

    unknown = render_card(ChestXrayConfig(), {"training": _training_record(["my-hospital"])})
    assert "@article" not in unknown and "my-hospital" in unknown.split("## Citation")[1]
    assert "@article" not in render_card(ChestXrayConfig())


def test_install_line_and_model_sources_come_from_the_project_urls():
    import tomllib

    urls = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]
    assert project_urls()["Repository"] == urls["Repository"]  # the installed metadata is this checkout's
    card = render_card(ChestXrayConfig())
    assert f"pip install git+{urls['Repository']}" in card
    sources = card.split("## Model sources")[1].split("\n## ")[0]
    assert urls["Repository"] in sources


def test_base_model_only_for_imagenet_initialised_backbones():
    assert "base_model" not in _front_matter(render_card(ChestXrayConfig()))
    for backbone, hub_id in (("vgg19", "timm/vgg19.tv_in1k"), ("vgg19_bn", "timm/vgg19_bn.tv_in1k")):
        config = ChestXrayConfig(backbone=backbone, backbone_init=imagenet_weights_name(backbone))
        assert _front_matter(render_card(config))["base_model"] == hub_id


def test_one_tag_list_with_the_mixin_tags_once():
    from chest_model import ChestXrayClassifier

    tags = _front_matter(render_card(ChestXrayConfig()))["tags"]
    assert len(tags) == len(set(tags))
    assert {"model_hub_mixin", "pytorch_model_hub_mixin", "chest-x-ray", "not-for-clinical-use"} <= set(tags)
    assert set(ChestXrayClassifier._hub_mixin_info.model_card_data.tags) == set(tags)
    assert "model_hub_mixin" not in TAGS  # the mixin appends to a copy, not to our constant


def test_card_warns_when_the_chosen_model_has_not_learned_a_class():
    val = {"n": 10, "accuracy": 0.6, "macro_f1": 0.4, "group_recall": 0.67,
           "by_source": {"kaggle": {"n": 10, "accuracy": 0.6, "recall": {"Normal": 1.0, "Covid": 0.0}}}}
    failed = {**_training_record(["kaggle"]), "unlearned_groups": ["Covid in kaggle (validation recall 0.00)"]}
    card = render_card(ChestXrayConfig(), {"training": failed, "val_metrics": val})
    assert "**This model has not learned every class:** Covid in kaggle (validation recall 0.00). Do not use it as is" in card
    learned = {**_training_record(["kaggle"]), "unlearned_groups": []}
    assert "has not learned" not in render_card(ChestXrayConfig(), {"training": learned, "val_metrics": val})


def _with_copies(copies):
    audit = {"majority_class_accuracy": 0.39, "center_masked_accuracy": 0.53, "center_only_accuracy": 0.67,
             "metadata_baseline_accuracy": 0.77, "verdict": "v", "train_copies": copies}
    metrics = {"n": 66, "accuracy": 0.909, "macro_f1": 0.91, "per_class": {}, "roc_auc": {"macro": 0.99, "per_class": {}},
               "ece": 0.04, "confusion_matrix": [], "audit": audit}
    return render_card(ChestXrayConfig(), {"test_metrics": metrics})


def test_card_says_how_many_test_images_are_copies_of_training_images_and_the_figures_without_them():
    pairs = [{"file": f"Covid/{i}.jpg", "train_file": f"s/Covid/{i}.jpg", "distance": 12 if i < 2 else 0} for i in range(7)]
    copies = {"n": 7, "of": 66, "n_train": 456, "hash_bits": 256, "max_distance": 40, "accuracy_without": 0.8983,
              "recall_without": {"Normal": 0.95, "Covid": 0.7895, "Viral Pneumonia": 0.95}, "pairs": pairs,
              "searched": "the training split",
              "by_class": {"Normal": {"copies": 0, "n": 20}, "Covid": {"copies": 7, "n": 26}, "Viral Pneumonia": {"copies": 0, "n": 20}}}
    card = _with_copies(copies)
    assert "**7 of the 66 test images are copies of a training image**: the same film (2 of 7 not identical" in card
    assert "Covid 7 of 26" in card and "accuracy 0.898 on 59 images" in card and "Covid 0.789" in card
    assert "The model may answer them from memory" in card and "Without them" in card
    assert "the 456 images of the training split" in card
    one = _with_copies({**copies, "n": 1, "pairs": pairs[-1:]})
    assert "**1 of the 66 test images is a copy of a training image**: the same film;" in one
    assert "answer it from memory" in one and "Without it:" in one
    none = _with_copies({**copies, "n": 0, "accuracy_without": 0.909, "by_class": {}, "pairs": []})
    assert "None of the 66 test images was found to be a copy of a training image." in none and "Without them" not in none
    assert "not copies flipped, rotated or cropped by more than a few percent: the count is a lower bound" in none
    every = _with_copies({**copies, "n": 66, "accuracy_without": None, "recall_without": {}})
    assert "Every test image is one" in every
    assert "Copies of training images" not in _with_copies(None)


def test_the_gate_paragraph_gives_the_validation_flags_per_class_beside_the_pooled_rate():
    config = ChestXrayConfig(feature_threshold=1.19, feature_fpr=0.02)
    gate = {"threshold": 1.19, "fpr": 0.02, "rule": "split-conformal", "validation_flagged_rate": 0.0,
            "validation_flagged_by_class": {"Normal": {"flagged": 0, "n": 54}, "Covid": {"flagged": 0, "n": 16}}}
    val = {"accuracy": 0.95, "macro_f1": 0.94, "n": 81, "feature_gate": gate}
    card = render_card(config, {"val_metrics": val})
    assert ("set so that a new X-ray like the validation ones exceeds it with probability at most 2%, on average over "
            "validation draws: on validation, by true class, Normal 0 of 54, Covid 0 of 16)") in card
    without = render_card(config, {"val_metrics": {**val, "feature_gate": {"threshold": 1.19, "rule": "split-conformal"}}})
    assert "exceeds it with probability at most 2%, on average over validation draws)," in without


def test_a_gate_fitted_by_the_earlier_quantile_rule_is_described_as_that_rule():
    config = ChestXrayConfig(feature_threshold=0.922, feature_fpr=0.02)
    gate = {"threshold": 0.922, "fpr": 0.02, "validation_flagged_rate": 2 / 81}  # recorded before the rule was named
    card = render_card(config, {"val_metrics": {"accuracy": 0.95, "macro_f1": 0.94, "n": 81, "feature_gate": gate}})
    assert "set so that 2% of validation X-rays exceed it)," in card and "probability at most" not in card


def test_sources_from_one_hospital_are_named_even_when_one_is_only_evaluated():
    from chest_model.citations import cited_sources

    assert cited_sources(["covid19-image-dataset", "nih-cxr8"])["shared_origins"] == []
    shared = cited_sources(["covid19-image-dataset", "nih-cxr8"], ["rsna-radiography-db"])["shared_origins"]
    assert shared == [{"origin": "NIH Clinical Center", "sources": ["nih-cxr8", "rsna-radiography-db"]}]
    assert cited_sources(["nih-a", "nih-a"])["shared_origins"] == []  # one source named twice is one source
    # A leave-one-source-out run's card: trained on one NIH release, validated externally on the other.
    external = {"rsna-radiography-db": {"name": "rsna-radiography-db", "n": 10, "true_counts": {"Normal": 10}, "accuracy": 0.8,
                                        "uncertain_rate": 0.1, "predicted_share": {"Normal": 0.8, "Covid": 0.2, "Viral Pneumonia": 0.0}}}
    card = render_card(ChestXrayConfig(), {"training": _training_record(["covid19-image-dataset", "nih-cxr8"]),
                                           "external_metrics": external})
    assert "nih-cxr8 and rsna-radiography-db come from one hospital (NIH Clinical Center; see Training data)" in card


def test_the_external_table_says_which_sets_hold_copies_of_training_images():
    def row(name, copies):
        out = {"name": name, "n": 10, "true_counts": {"Normal": 10}, "accuracy": 0.8, "uncertain_rate": 0.1,
               "predicted_share": {"Normal": 0.8, "Covid": 0.2, "Viral Pneumonia": 0.0}}
        return {**out, "train_copies": {"n": copies, "of": 10}} if copies is not None else out

    card = render_card(ChestXrayConfig(), {"external_metrics": {"a": row("a", 3), "b": row("b", 0), "c": row("c", None)}})
    assert "| 80% | 20% | 0% | 0.800 | 10% | 3 |" in card and "| 10% | 0 |" in card and "| 10% | not checked |" in card
    assert "**Not unseen:** 3 of the 10 images of a are copies of an image its model was trained on." in card
    clean = render_card(ChestXrayConfig(), {"external_metrics": {"b": row("b", 0), "c": row("c", None)}})
    assert "Not unseen" not in clean


def test_the_tutorial_datasets_caveats_appear_only_for_models_trained_on_it():
    metrics = {"n": 9, "accuracy": 0.5, "macro_f1": 0.5, "per_class": {}, "roc_auc": {"macro": 0.6},
               "audit": {"metadata_baseline_accuracy": 0.81, "center_masked_accuracy": 0.4, "center_only_accuracy": 0.5,
                         "majority_class_accuracy": 0.34, "verdict": "file metadata alone reaches 81%"}}
    kaggle = render_card(ChestXrayConfig(), {"training": _training_record(["covid19-image-dataset"]), "test_metrics": metrics})
    assert "**Known source confounding:**" in kaggle and "Viral Pneumonia was learned from children only" in kaggle
    assert "scores 81% on its test split, where always answering the commonest class scores 34%" in kaggle
    results = _front_matter(kaggle)["model-index"][0]["results"][0]
    assert results["dataset"] == {"type": "covid19-image-dataset", "name": "COVID-19 Image Dataset (test split)", "split": "test"}

    # A folder name that says nothing, with the tutorial's classes: it may be that dataset, so the caveats stay.
    # It is not named as that dataset, though: the caveats say "if", and the model-index names the source.
    unnamed = render_card(ChestXrayConfig(), {"training": _training_record(["DATA"]), "test_metrics": metrics})
    assert "**Known source confounding, if it is that dataset:**" in unnamed and "children only (if the data is that dataset)" in unnamed
    assert "This package cannot tell from the source's name whether these images are the tutorial's data" in unnamed
    assert "The reference data is" not in unnamed and "small public dataset" not in unnamed
    assert _front_matter(unnamed)["model-index"][0]["results"][0]["dataset"] == {"type": "data", "name": "test split", "split": "test"}
    assert "small public dataset" in kaggle
    assert "Known source confounding" in render_card(ChestXrayConfig())  # nothing recorded: warn

    # Other classes, or only other known collections: the general warning, with the audit's own figure.
    other = ChestXrayConfig(class_names=["Normal", "Pneumonia"])
    mine = render_card(other, {"training": _training_record(["My Hospital 2024"]), "test_metrics": metrics})
    assert "Known source confounding" not in mine and "children only" not in mine and "Pranav Raikote" not in mine
    assert "**Check for source confounding:**" in mine and "scores 81% on the test split" in mine
    results = _front_matter(mine)["model-index"][0]["results"][0]
    assert results["dataset"] == {"type": "my-hospital-2024", "name": "test split", "split": "test"}
    nih_only = render_card(ChestXrayConfig(), {"training": _training_record(["nih-cxr8"])})
    assert "Known source confounding" not in nih_only and "**Check for source confounding:**" in nih_only


def test_the_card_shows_the_training_command_without_local_absolute_paths():
    training = {**_training_record(["kids"]),
                "command": "accelerate launch train.py --data-dir 'kids=/home/ann/x rays/kaggle/train' "
                           "--data-dir data/adult-normal --test-dir=/srv/data/test --output-dir /home/ann/runs/v1",
                "resumed_with": ["python train.py --output-dir /home/ann/runs/v1 --resume"]}
    card = render_card(ChestXrayConfig(), {"training": training})
    assert "/home/" not in card and "/srv/" not in card and "absolute ones shortened" in card
    relative = render_card(ChestXrayConfig(), {"training": _training_record(["kids"])})
    assert "absolute ones shortened" not in relative  # said only where it happened
    assert ("`accelerate launch train.py --data-dir kids=.../kaggle/train --data-dir data/adult-normal "
            "--test-dir=.../data/test --output-dir .../runs/v1`") in card
    assert "`python train.py --output-dir .../runs/v1 --resume`" in card
    from chest_model.card import shareable_command

    assert (shareable_command("python train.py --data-dir=kids=/home/ann/data/kids --output-dir / --lr=0.1 --out=~/r/v1")
            == "python train.py --data-dir=kids=.../data/kids --output-dir ... --lr=0.1 --out=.../r/v1")


def test_the_card_says_where_validation_came_from():
    drawn = render_card(ChestXrayConfig(), {"training": _training_record(["kids", "adults"])})
    assert "The validation split is drawn from every source, stratified by class and source." in drawn
    given = render_card(ChestXrayConfig(), {"training": {**_training_record(["kids", "adults"]), "val_dir": "/data/val"}})
    assert "Validation is a separate folder (`--val-dir`), not drawn from the training sources." in given
    assert "drawn from every source" not in given


@pytest.mark.parametrize("contrast, step", [
    ("equalize", "grey-level histogram equalised"), ("standardize", "standardised to mean 128 and standard deviation 48"),
    ("clahe", "CLAHE, clip limit 2, 8×8 tiles"),
])
def test_the_input_row_names_the_contrast_step_a_reimplementation_must_apply(contrast, step):
    row = next(line for line in render_card(ChestXrayConfig(image_size=128, contrast=contrast)).splitlines()
               if line.startswith("| Input |"))
    assert step in row and f"`contrast: {contrast}`" in row and "normalized with mean" in row
    plain = next(line for line in render_card(ChestXrayConfig(image_size=128)).splitlines() if line.startswith("| Input |"))
    assert plain == ("| Input | 128×128 RGB: resized (area averaging when shrinking, bilinear when enlarging), "
                     "normalized with mean [0.485, 0.456, 0.406] and std [0.229, 0.224, 0.225] |")
