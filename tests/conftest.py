"""Shared fixtures: tiny models, small synthetic X-rays, a real demo server (helpers live in helpers.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import ROOT, STARTER, free_port, synthetic_xray, wait_for_server

# Under pytest-xdist the workers share the cores: each takes its share of threads, so that they
# do not oversubscribe them.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))


@pytest.fixture
def xray_gray() -> np.ndarray:
    return synthetic_xray(120, 100)


@pytest.fixture
def tiny_config():
    from chest_model import ChestXrayConfig

    return ChestXrayConfig(image_size=32, hidden_size=16)


@pytest.fixture
def tiny_model(tiny_config):
    from chest_model import ChestXrayClassifier

    torch.manual_seed(0)
    return ChestXrayClassifier(tiny_config).eval()


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


# ---- a real demo server, shared by the demo and reliability tests -------------------------------


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    model = STARTER
    if not (model / "model.safetensors").exists():  # a checkout without the starter model: serve a random one
        from chest_model import ChestXrayClassifier

        model = tmp_path_factory.mktemp("model") / "m"
        ChestXrayClassifier(image_size=64, hidden_size=16).save_pretrained(model)
    port = free_port()
    log = tmp_path_factory.mktemp("log") / "server.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "demo" / "app.py"), "--model", str(model), "--port", str(port),
                                 "--max-file-size", "1mb"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = wait_for_server(proc, port, log)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


