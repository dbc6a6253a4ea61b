"""scripts/framing_probe.py: a run's validation films, framed otherwise, per (source, class) group."""
import importlib.util
import json

import pytest

from chest_model.training import main
from helpers import ROOT, make_class_folders

spec = importlib.util.spec_from_file_location("framing_probe", ROOT / "scripts" / "framing_probe.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)


def test_the_probe_uses_the_runs_own_validation_split(tmp_path, clean_accelerate, capsys):
    kids = make_class_folders(tmp_path / "kids", per_class=5, size=40, seed=6)
    adults = make_class_folders(tmp_path / "adults", per_class=6, size=40, seed=7, class_names=["Normal"])
    run = tmp_path / "run"
    assert main(["--data-dir", f"kids={kids}", "--data-dir", f"adults={adults}", "--output-dir", str(run),
                 "--image-size", "32", "--batch-size", "4", "--weights", "none", "--epochs", "1", "--cpu-threads", "1",
                 "--checkpointing-steps", "none"]) == 0
    capsys.readouterr()
    probe.main(["--split-of", str(run), str(run)])
    out = capsys.readouterr().out
    counts = json.loads((run / "train_config.json").read_text())["data_counts_by_source"]["val"]
    for source, by_class in counts.items():
        for cls, n in by_class.items():
            assert (f"{source} / {cls} ({n} films)" in out) == (n > 0)
    assert out.count("71% of each side") == sum(n > 0 for by_class in counts.values() for n in by_class.values())
    probe.main(["--tones", "--split-of", str(run), str(run)])
    tones = capsys.readouterr().out
    assert "tone check" in tones and "71% of each side" not in tones
    assert tones.count("gamma 1.4") == sum(n > 0 for by_class in counts.values() for n in by_class.values())


def test_a_folder_without_a_training_record_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="neither train_config.json nor a card context"):
        probe.training_record(tmp_path)
