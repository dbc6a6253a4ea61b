"""reports.py: the figures written beside a model, as real PNG files of the expected size."""
import cv2
import numpy as np

from chest_model.reports import plot_confusion_matrix, plot_contact_sheet, plot_reliability, plot_training_curves


def _size(path) -> tuple[int, int]:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, f"{path} is not a readable image"
    assert image.std() > 0, f"{path} is blank"
    return image.shape[1], image.shape[0]


def test_training_curves(tmp_path):
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "train_accuracy": 0.3 * e, "val_accuracy": 0.25 * e}
               for e in (1, 2, 3)]
    plot_training_curves(history, tmp_path / "curves.png")
    assert _size(tmp_path / "curves.png") == (1000, 400)


def test_confusion_matrix_also_when_empty(tmp_path):
    names = ["Normal", "Covid", "Viral Pneumonia"]
    plot_confusion_matrix([[5, 1, 0], [0, 7, 2], [1, 0, 6]], names, tmp_path / "cm.png", title="test")
    plot_confusion_matrix([[0] * 3] * 3, names, tmp_path / "empty.png")  # no prediction yet: no division by zero
    assert _size(tmp_path / "cm.png") == _size(tmp_path / "empty.png") == (450, 400)


def test_reliability_with_and_without_bins(tmp_path):
    bins = [{"lo": 0.5, "hi": 0.6, "accuracy": 0.5, "confidence": 0.55}, {"lo": 0.9, "hi": 1.0, "accuracy": 0.95, "confidence": 0.97}]
    plot_reliability(bins, 0.031, tmp_path / "rel.png")
    plot_reliability([], None, tmp_path / "none.png")
    assert _size(tmp_path / "rel.png") == _size(tmp_path / "none.png") == (450, 400)


def test_contact_sheet_rows_follow_the_image_count(tmp_path):
    images = [np.full((32, 32, 3), 40 * i, np.uint8) for i in range(5)]
    plot_contact_sheet(images, [f"image {i}" for i in range(5)], tmp_path / "sheet.png", columns=4)
    assert _size(tmp_path / "sheet.png") == (960, 544)  # 4 columns x 2 rows of 3 x 3.4 inches at 80 dpi
