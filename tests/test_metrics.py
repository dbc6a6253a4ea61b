"""Metrics on inputs with known answers."""
import numpy as np
import pytest

from chest_model.metrics import bootstrap_ci, called_as, classification_metrics, expected_calibration_error

NAMES = ["A", "B", "C"]


def from_confusion(cm):
    labels, preds = [], []
    for t, row in enumerate(cm):
        for p, count in enumerate(row):
            labels += [t] * count
            preds += [p] * count
    probs = np.full((len(preds), 3), 0.1)
    probs[np.arange(len(preds)), preds] = 0.8
    return np.array(labels), probs


def test_constructed_confusion_matrix_gives_the_expected_per_class_figures():
    cm = [[8, 2, 0], [1, 6, 3], [0, 0, 10]]
    labels, probs = from_confusion(cm)
    m = classification_metrics(labels, probs, NAMES)
    assert m["confusion_matrix"] == cm and m["n"] == 30
    assert m["accuracy"] == pytest.approx(24 / 30)
    a, b, c = (m["per_class"][n] for n in NAMES)
    assert a["precision"] == pytest.approx(8 / 9) and a["recall"] == pytest.approx(8 / 10)
    assert a["specificity"] == pytest.approx(19 / 20)  # 20 non-A, 1 predicted A
    assert b["precision"] == pytest.approx(6 / 8) and b["recall"] == pytest.approx(6 / 10)
    assert c["precision"] == pytest.approx(10 / 13) and c["recall"] == 1.0 and c["specificity"] == pytest.approx(17 / 20)
    f1 = [2 * p * r / (p + r) for p, r in ((8 / 9, 0.8), (0.75, 0.6), (10 / 13, 1.0))]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    assert [m["per_class"][n]["support"] for n in NAMES] == [10, 10, 10]


def test_perfectly_calibrated_toy_model_has_ece_near_zero():
    rng = np.random.default_rng(0)
    n = 20000
    confidence = rng.uniform(0.4, 1.0, n)
    correct = rng.uniform(size=n) < confidence  # right exactly as often as it claims
    labels = np.zeros(n, int)
    probs = np.zeros((n, 3))
    probs[:, 0] = np.where(correct, confidence, (1 - confidence) / 2)
    probs[:, 1] = np.where(correct, (1 - confidence) / 2, confidence)
    probs[:, 2] = 1 - probs[:, 0] - probs[:, 1]
    assert expected_calibration_error(labels, probs) < 0.015
    overconfident = np.zeros((n, 3))
    overconfident[:, 0] = np.where(correct, 0.99, 0.005)
    overconfident[:, 1] = np.where(correct, 0.005, 0.99)
    overconfident[:, 2] = 0.005
    assert expected_calibration_error(labels, overconfident) > 0.2


def test_roc_auc_and_bootstrap_intervals():
    labels, probs = from_confusion([[9, 1, 0], [0, 10, 0], [1, 0, 9]])
    m = classification_metrics(labels, probs, NAMES)
    # One-vs-rest with tied scores counted half. Class A: 9 of its 10 films score 0.8; of the 20 others,
    # one (a C film called A) scores 0.8 and 19 score 0.1, so (9*19 + 9/2 + 19/2) / 200 = 0.925.
    assert m["roc_auc"]["per_class"] == pytest.approx({"A": 0.925, "B": 0.975, "C": 0.95})
    assert m["roc_auc"]["macro"] == pytest.approx(0.95)
    ci = bootstrap_ci(labels, probs, NAMES, n_resamples=300)
    assert ci["accuracy"][0] < m["accuracy"] < ci["accuracy"][1] or ci["accuracy"][1] == pytest.approx(m["accuracy"], abs=0.05)
    assert 0 < ci["accuracy"][1] - ci["accuracy"][0] < 0.4  # 30 images: a wide but finite interval


def test_accuracy_is_the_share_of_images_answered_right():
    labels = np.array([0] * 9 + [1])
    probs = np.zeros((10, 3))
    probs[np.arange(10), [0] * 9 + [0]] = 1
    assert classification_metrics(labels, probs, NAMES)["accuracy"] == pytest.approx(0.9)


def test_called_as_reads_one_cell_of_a_records_confusion_matrix():
    record = {"class_names": ["Normal", "Covid"], "confusion_matrix": [[9, 1], [3, 7]]}
    assert called_as(record, "Covid", "Normal") == (3, 10) and called_as(record, "Normal", "Covid") == (1, 10)
    assert called_as(record, "Covid", "Viral Pneumonia") is None and called_as({}, "Covid", "Normal") is None
