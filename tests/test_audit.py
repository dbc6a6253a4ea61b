"""The shortcut audit flags a dataset that leaks its labels through image size, and not one that does not."""
import numpy as np

from chest_model.audit import mask_center, metadata_baseline, verdict
from helpers import synthetic_xray, write_image


def _folder(root, leak: bool, per_class: int, seed: int):
    paths, labels = [], []
    rng = np.random.default_rng(seed)
    for label in range(3):
        for i in range(per_class):
            if leak:  # each class from its own "scanner": its own size and format
                h, w = (60 + 40 * label, 50 + 30 * label)
                ext = [".png", ".jpg", ".png"][label]
            else:
                h, w = int(rng.integers(60, 140)), int(rng.integers(50, 120))
                ext = [".png", ".jpg"][int(rng.integers(0, 2))]
            path = write_image(root / str(label) / f"{i}{ext}", synthetic_xray(h, w, seed=seed + 100 * label + i))
            paths.append(path)
            labels.append(label)
    return paths, labels


def test_metadata_baseline_catches_a_size_leak_and_not_a_fair_dataset(tmp_path):
    train = _folder(tmp_path / "leak_train", True, 12, 1)
    test = _folder(tmp_path / "leak_test", True, 6, 2)
    leaky = metadata_baseline(*train, *test)
    assert leaky["accuracy"] > 0.9
    train = _folder(tmp_path / "fair_train", False, 12, 3)
    test = _folder(tmp_path / "fair_test", False, 10, 4)
    fair = metadata_baseline(*train, *test)
    assert fair["accuracy"] < 0.6
    assert "metadata alone" in verdict(0.95, leaky["accuracy"], 0.3, 1 / 3)
    assert "no shortcut detected" in verdict(0.95, fair["accuracy"], 0.3, 1 / 3)


def test_masks_hide_or_keep_the_centre():
    image = np.full((100, 100, 3), 10, np.uint8)
    image[40:60, 40:60] = 250
    hidden = mask_center(image, keep=False)
    kept = mask_center(image, keep=True)
    assert hidden[50, 50, 0] == 10 and kept[50, 50, 0] == 250
    assert kept[5, 5, 0] == hidden[5, 5, 0] == 10
    assert "lungs hidden" in verdict(0.9, 0.4, 0.88, 1 / 3)
