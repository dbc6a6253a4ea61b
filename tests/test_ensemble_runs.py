"""scripts/ensemble_runs.py: each run's calls and the averaged probabilities' calls on one folder."""
import importlib.util

import numpy as np
import pytest
import torch

from chest_model import ChestXrayClassifier
from helpers import ROOT, make_class_folders

spec = importlib.util.spec_from_file_location("ensemble_runs", ROOT / "scripts" / "ensemble_runs.py")
ensemble = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ensemble)


def saved_model(folder, seed, class_names=("Normal", "Covid", "Viral Pneumonia")):
    torch.manual_seed(seed)
    ChestXrayClassifier(image_size=32, hidden_size=8, class_names=list(class_names)).save_pretrained(folder)
    return folder


def test_the_average_is_taken_over_calibrated_probabilities_per_image(tmp_path, capsys):
    images = make_class_folders(tmp_path / "data", per_class=3, size=48)
    runs = [saved_model(tmp_path / "a", 1), saved_model(tmp_path / "b", 2)]
    ensemble.main(["--data-dir", str(images), *map(str, runs)])
    lines = capsys.readouterr().out.splitlines()

    files = [str(p) for p in ensemble.folder_images(images)]
    assert len(files) == 9 and lines[2] == f"9 images in {images.name}"
    probabilities = [np.array([[r[c] for c in m.class_names] for r in m.predict(files, precision="auto")])
                     for m in map(ChestXrayClassifier.from_pretrained, runs)]
    names = ["Normal", "Covid", "Viral Pneumonia"]
    assert lines[0].startswith(f"a: {ensemble.shares(probabilities[0], names)}; flagged uncertain ")
    assert lines[1].startswith(f"b: {ensemble.shares(probabilities[1], names)}; ")
    assert lines[3] == f"average of a + b: {ensemble.shares((probabilities[0] + probabilities[1]) / 2, names)}"
    assert ensemble.shares(np.array([[0.6, 0.4, 0.0], [0.2, 0.7, 0.1]]), names) == "Normal 50%, Covid 50%, Viral Pneumonia 0%"
    calls = np.stack([p.argmax(1) for p in probabilities])
    for c, name in enumerate(names):
        both, one = int(((calls == c).sum(0) == 2).sum()), int(((calls == c).sum(0) == 1).sum())
        line = f"called {name} by 0, 1, ..., 2 of the runs: {9 - both - one}, {one}, {both} images"
        assert (line in lines) == bool(both or one)
    assert ensemble.agreement(np.array([[1, 1, 0, 2], [1, 0, 0, 2], [1, 0, 2, 0]]), 1).tolist() == [2, 1, 0, 1]


def test_runs_with_other_classes_or_an_empty_folder_are_refused(tmp_path):
    images = make_class_folders(tmp_path / "data", per_class=1, size=48)
    runs = [saved_model(tmp_path / "a", 1), saved_model(tmp_path / "b", 2, class_names=("Normal", "Covid"))]
    with pytest.raises(SystemExit, match="has classes"):
        ensemble.main(["--data-dir", str(images), *map(str, runs)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no image files under"):
        ensemble.main(["--data-dir", str(tmp_path / "empty"), str(runs[0])])
