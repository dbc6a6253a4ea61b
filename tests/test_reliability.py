"""Hostile inputs through every door (Python API, CLI, HTTP), loading safety and training faults."""
import ast
import json
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from chest_model import ChestXrayClassifier, ImageLoadError
from chest_model.checkpoints import CheckpointError, list_checkpoints
from helpers import ROOT, STARTER, flip_a_byte, make_class_folders
from corpus import bad_cases, valid_cases, write_corpus

VALID = valid_cases()
BAD = bad_cases()


@pytest.fixture(scope="module")
def model():
    if (STARTER / "model.safetensors").exists():
        return ChestXrayClassifier.from_pretrained(STARTER)
    import torch

    torch.manual_seed(0)
    return ChestXrayClassifier(image_size=64, hidden_size=16).eval()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    write_corpus(out)
    return out


def test_corpus_is_large_enough():
    assert len(VALID) + len(BAD) >= 40


def test_python_api_gives_consistent_predictions_or_clear_errors(model, corpus):
    reference = model.predict(corpus / "gray.png")
    top = max(reference, key=reference.get)
    for case in VALID:
        probs = model.predict(corpus / case.name)
        assert max(probs, key=probs.get) == top, case.name
        assert max(abs(probs[k] - reference[k]) for k in probs) < 0.05, (case.name, probs, reference)
    for case in BAD:
        with pytest.raises(ImageLoadError, match=re.escape(case.name)):
            model.predict(corpus / case.name)


@pytest.mark.parametrize("array", [np.full((64, 64), np.nan), np.full((64, 64, 3), np.inf, np.float32), np.zeros((64, 64, 5), np.uint8), np.zeros(10)])
def test_python_api_rejects_bad_arrays(model, array):
    with pytest.raises(ImageLoadError):
        model.predict(array)


@pytest.mark.slow
def test_cli_reports_every_file_of_the_corpus(model, corpus, tmp_path):
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    files = sorted(str(p) for p in corpus.iterdir())
    result = subprocess.run([sys.executable, "-m", "chest_model", "predict", "--model", str(folder), "--json", *files],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 1
    records = {Path(r["file"]).name: r for r in map(json.loads, result.stdout.splitlines())}
    assert set(records) == {c.name for c in VALID + BAD}
    for case in VALID:
        assert "probabilities" in records[case.name], records[case.name]
    for case in BAD:
        assert case.error.lower() in records[case.name]["error"].lower()


@pytest.mark.slow
@pytest.mark.server
def test_http_api_survives_the_corpus(client, corpus):
    from gradio_client import handle_file

    for case in VALID + BAD:
        if case.error is None:
            result = client.predict(handle_file(str(corpus / case.name)), api_name="/predict")
            assert len(result["confidences"]) == 3, case.name
        else:
            with pytest.raises(Exception) as info:
                client.predict(handle_file(str(corpus / case.name)), api_name="/predict")
            assert case.error.lower() in str(info.value).lower(), (case.name, str(info.value))
    assert client.predict(handle_file(str(corpus / "gray.jpeg")), api_name="/predict")["label"]


def _unsafe_loads(path):
    """Calls in a source file that could unpickle code: any pickle/joblib/dill load, and any
    ``torch.load`` without a literal ``weights_only=True`` (torch's restricted unpickler, which builds
    tensors and plain values only; accelerate loads optimizer states the same way)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        if re.fullmatch(r"(c?pickle|joblib|dill)\.loads?|pickle\.Unpickler", name):
            found.append(f"{path.name}:{node.lineno}")
        elif name == "torch.load" and not any(
                k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                for k in node.keywords):
            found.append(f"{path.name}:{node.lineno}")
    return found


def test_nothing_in_the_package_unpickles_code(tmp_path):
    sources = list((ROOT / "chest_model").glob("*.py")) + list((ROOT / "demo").glob("*.py")) + [ROOT / "train.py"]
    assert [hit for p in sources for hit in _unsafe_loads(p)] == []
    # The check itself finds what it is for.
    planted = tmp_path / "planted.py"
    planted.write_text("import pickle, torch\npickle.loads(b'')\ntorch.load('x')\n"
                       "torch.load('x', weights_only=False)\ntorch.load('x', weights_only=True)\n")
    assert _unsafe_loads(planted) == ["planted.py:2", "planted.py:3", "planted.py:4"]


def _pickle_only_folder(tmp_path, model):
    folder = tmp_path / "pickled"
    model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    return folder


def test_cli_and_demo_refuse_pickles(tmp_path, model):
    folder = _pickle_only_folder(tmp_path, model)
    result = subprocess.run([sys.executable, "-m", "chest_model", "predict", "--model", str(folder), str(ROOT / "examples" / "covid.jpeg")],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and "safetensors" in result.stderr and "pytorch_model.bin" in result.stderr
    result = subprocess.run([sys.executable, str(ROOT / "demo" / "app.py"), "--model", str(folder), "--port", "0"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode != 0 and "safetensors" in result.stderr


# ---- training faults ------------------------------------------------------------------------------

# One precision for every run compared: `auto` times a matmul, which a busy machine can tip the other way.
TINY = ["--image-size", "32", "--batch-size", "4", "--weights", "none", "--seed", "11", "--epochs", "3", "--cpu-threads", "1",
        "--checkpointing-steps", "2", "--checkpoints-total-limit", "3", "--mixed-precision", "no"]


def _train(args, **kwargs):
    env = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300, **kwargs)


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_matches_an_uninterrupted_run(tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=6, size=40, seed=4)
    args = ["--data-dir", str(data), *TINY]
    reference = tmp_path / "reference"
    assert _train([*args, "--output-dir", str(reference)]).returncode == 0
    expected = load_file(str(reference / "model.safetensors"))

    out = tmp_path / "victim"
    rng = random.Random(7)
    env = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin"}
    kills = 0
    for attempt in range(6):
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, "--output-dir", str(out), "--resume-from-checkpoint", "latest"],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Wait until the run is inside training (a checkpoint folder is being written), then kill at a random moment.
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None and not (out / "checkpoints").exists():
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 2.5))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        for checkpoint in list_checkpoints(out / "checkpoints"):  # whatever survived is complete
            assert (checkpoint / "manifest.json").is_file()
    assert kills >= 2
    if not (out / "history.json").exists():
        assert _train([*args, "--output-dir", str(out), "--resume-from-checkpoint", "latest"]).returncode == 0
    got = load_file(str(out / "model.safetensors"))
    assert got.keys() == expected.keys() and all((got[k] == expected[k]).all() for k in got)


@pytest.mark.slow
def test_a_corrupted_checkpoint_is_detected(tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=4, size=40, seed=5)
    out = tmp_path / "run"
    assert _train(["--data-dir", str(data), *TINY, "--output-dir", str(out)]).returncode == 0
    latest = list_checkpoints(out / "checkpoints")[-1]
    flip_a_byte(latest / "model.safetensors")
    result = _train(["--data-dir", str(data), *TINY, "--output-dir", str(out), "--resume-from-checkpoint", "latest"])
    assert result.returncode != 0
    assert "corrupted checkpoint" in result.stderr and "model.safetensors" in result.stderr
    from chest_model.checkpoints import verify_checkpoint

    with pytest.raises(CheckpointError):
        verify_checkpoint(latest)
