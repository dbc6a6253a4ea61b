"""scripts/operating_points.py: what a lower bar for one class buys and costs on a run's validation split."""
import importlib.util
import json

import pytest
import torch

from helpers import ROOT, train_two_source_run

spec = importlib.util.spec_from_file_location("operating_points", ROOT / "scripts" / "operating_points.py")
points = importlib.util.module_from_spec(spec)
spec.loader.exec_module(points)


def test_each_row_catches_one_more_film_of_the_class_and_counts_what_else_it_calls_that_class():
    # classes: 0 Normal, 1 Covid; two Covid films missed by argmax (Covid 0.4 and 0.1)
    p_covid = [0.9, 0.4, 0.1, 0.45, 0.2, 0.05, 0.6]
    labels = [1, 1, 1, 0, 0, 0, 0]
    groups = ["k Covid", "k Covid", "k Covid", "a Normal", "a Normal", "b Normal", "b Normal"]
    probabilities = torch.tensor([[1 - p, p] for p in p_covid])
    rows = points.operating_points(probabilities, labels, groups, target=1)
    assert [row["bar"] for row in rows] == [None, pytest.approx(0.4), pytest.approx(0.1)]
    assert [row["caught"] for row in rows] == [1, 2, 3]
    assert [row["others"] for row in rows] == [{"a Normal": 0, "b Normal": 1},
                                               {"a Normal": 1, "b Normal": 1},
                                               {"a Normal": 2, "b Normal": 1}]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_two_source_run(tmp_path_factory.mktemp("points"))


def test_the_table_is_built_on_the_runs_own_validation_split(run, clean_accelerate, capsys):
    capsys.readouterr()
    points.main([str(run), "--label", "Covid"])
    lines = capsys.readouterr().out.splitlines()
    counts = json.loads((run / "train_config.json").read_text())["data_counts_by_source"]["val"]
    n = counts["kids"]["Covid"]
    assert lines[0] == (f"{n} validation films of Covid; other groups: adults Normal ({counts['adults']['Normal']}), "
                        f"kids Normal ({counts['kids']['Normal']}), kids Viral Pneumonia ({counts['kids']['Viral Pneumonia']})")
    assert lines[1].startswith("argmax (the model's answer)")
    assert all(f" of {n}; called Covid: adults Normal " in line for line in lines[1:])
    assert lines[-1].split("; called")[0].endswith(f"Covid {n} of {n}")  # the last bar catches every film


def test_a_class_the_run_lacks_is_refused(run, clean_accelerate):
    with pytest.raises(SystemExit, match="'Flu' is not one of the run's classes: Normal, Covid, Viral Pneumonia"):
        points.main([str(run), "--label", "Flu"])


def test_the_split_rebuilds_whatever_its_run_logged_to_or_was_tested_on(run, clean_accelerate, tmp_path):
    from chest_model import ChestXrayClassifier
    from chest_model.training import rebuild_split
    from helpers import make_class_folders

    test = make_class_folders(tmp_path / "test", per_class=1, size=40)
    (test / "Covid" / "broken.png").write_bytes(b"not an image")  # the test split is not part of the split rebuilt
    record = json.loads((run / "train_config.json").read_text())
    record["command"] += f" --report-to wandb --test-dir {test}"  # a tracker this machine may not have
    data, _ = rebuild_split(record, ChestXrayClassifier.from_pretrained(run).preprocessor)
    assert data.val.counts(record["class_names"]) == record["data_counts"]["val"]
