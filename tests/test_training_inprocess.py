"""Training's main([...]) in this process: a one-epoch run on tiny synthetic data gives a loadable model.

The subprocess tests in test_training.py cover launchers, resumes and kills; this one calls the
entry point directly, so a failure shows its traceback here and coverage sees the training code.
"""
import json

import pytest
import torch

from chest_model import ChestXrayClassifier
from chest_model.training import main
from helpers import CLASS_NAMES, make_class_folders, synthetic_xray


@pytest.fixture
def clean_accelerate(monkeypatch):
    """accelerate keeps its state in process-wide singletons, and training sets torch's thread count."""
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("TQDM_DISABLE", "1")
    threads = torch.get_num_threads()
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    torch.set_num_threads(threads)


def test_main_trains_one_epoch_and_saves_a_loadable_model(tmp_path, clean_accelerate):
    data = make_class_folders(tmp_path / "data", per_class=5, size=40, seed=6)
    out = tmp_path / "run"
    status = main(["--data-dir", str(data), "--output-dir", str(out), "--image-size", "32", "--batch-size", "4",
                   "--weights", "none", "--epochs", "1", "--cpu-threads", "1", "--checkpointing-steps", "none"])
    assert status == 0
    model = ChestXrayClassifier.from_pretrained(out)
    assert model.class_names == CLASS_NAMES and model.config.image_size == 32
    assert 0.05 <= model.config.temperature <= 20.0  # fitted on the validation split
    assert [row["epoch"] for row in json.loads((out / "history.json").read_text())] == [1]
    assert not (out / "checkpoints").exists()  # --checkpointing-steps none
    probabilities = model.predict_proba([synthetic_xray(40, 40, seed=1), synthetic_xray(50, 40, seed=2, kind=1)])
    assert probabilities.shape == (2, 3) and torch.allclose(probabilities.sum(dim=1), torch.ones(2))
