"""`chest-model predict`, run as a real subprocess through both entry points."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import EXAMPLES, ROOT


@pytest.fixture
def saved_model(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def run(*args):
    return subprocess.run([sys.executable, "-m", "chest_model", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_predict_json_reports_each_file_and_fails_for_bad_ones(saved_model, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    files = [str(p) for p in sorted(EXAMPLES.glob("*.jpeg"))]
    result = run("predict", "--model", str(saved_model), "--json", files[0], str(bad), *files[1:])
    assert result.returncode == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert {r["file"] for r in records} == set(files) | {str(bad)}
    errors = [r for r in records if r.get("error")]
    assert len(errors) == 1 and "notes.png" in errors[0]["error"] and "not an image" in errors[0]["error"]
    for record in records:
        if not record.get("error"):
            assert set(record["probabilities"]) == {"Normal", "Covid", "Viral Pneumonia"}
            assert abs(sum(record["probabilities"].values()) - 1) < 1e-4


def test_predict_text_output_and_success_status(saved_model):
    files = [str(p) for p in sorted(EXAMPLES.glob("*.jpeg"))]
    result = run("predict", "--model", str(saved_model), *files)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 3 and "Normal=" in result.stdout


def test_missing_model_is_a_clear_error(tmp_path):
    result = run("predict", "--model", str(tmp_path / "nope"), str(EXAMPLES / "covid.jpeg"))
    assert result.returncode == 2 and "no such model folder" in result.stderr


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "chest-model"
    assert script.exists(), "pip install -e . must install the chest-model console script"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "predict" in result.stdout


def test_ood_check_reports_every_non_xray_image(saved_model):
    from chest_model.ood_check import non_xray_images

    result = run("ood-check", "--model", str(saved_model))
    assert result.returncode == 0, result.stderr
    n = len(non_xray_images())
    assert f" of {n} non-X-ray images flagged as uncertain" in result.stdout
    assert len([line for line in result.stdout.splitlines() if line.startswith(("uncertain", "MISSED"))]) == n
