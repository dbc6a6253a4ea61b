"""scripts/acquisition_probe.py: a run's validation films of one source, altered and classified again."""
import importlib.util
import json

import pytest

from helpers import ROOT, train_two_source_run

spec = importlib.util.spec_from_file_location("acquisition_probe", ROOT / "scripts" / "acquisition_probe.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_two_source_run(tmp_path_factory.mktemp("probe"))


def test_every_alteration_is_classified_on_the_runs_own_validation_films_of_that_source(run, clean_accelerate, capsys):
    capsys.readouterr()
    probe.main([str(run), "--source", "adults"])
    out = capsys.readouterr().out
    n = json.loads((run / "train_config.json").read_text())["data_counts_by_source"]["val"]["adults"]["Normal"]
    assert out.splitlines()[0] == f"{n} validation films of adults, which run did not train on"
    lines = out.splitlines()[1:]
    assert [line.split("  ")[0] for line in lines] == list(probe.ALTERATIONS)
    assert all("called Covid" in line and "mean Covid probability" in line for line in lines)
    probe.main([str(run), "--source", "adults"])
    assert capsys.readouterr().out == out  # seeded drawings: the same figures again


def test_the_drawn_devices_change_the_film_and_only_brighten_it():
    import numpy as np

    grey = np.full((300, 300), 90, np.uint8)
    for name in ("burnt-in PORTABLE and AP", "ECG leads with wires", "midline tube"):
        altered = probe.ALTERATIONS[name](grey, np.random.default_rng(0))
        assert altered.shape == grey.shape and (altered >= grey).all() and (altered > grey).any(), name
    assert probe.ALTERATIONS["downscaled to 128 px"](grey, None).shape == (128, 128)


def test_a_source_the_validation_split_lacks_is_refused(run, clean_accelerate):
    with pytest.raises(SystemExit, match="holds no film of 'elsewhere'; its sources are kids, adults"):
        probe.main([str(run), "--source", "elsewhere"])
