"""Helpers the tests share: paths, the real dataset's location, small synthetic X-rays written as real files."""
from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATASET = Path(os.environ.get("CHEST_XRAY_DATASET", ROOT.parent / "shared" / "data" / "covid19-dataset"))
EXAMPLES = ROOT / "examples"
STARTER = ROOT / "demo" / "starter-model"
CLASS_NAMES = ["Normal", "Covid", "Viral Pneumonia"]


def requires_dataset():
    return pytest.mark.skipif(
        not (DATASET / "train").is_dir(),
        reason=f"real dataset not found at {DATASET} (set CHEST_XRAY_DATASET to its folder to run these tests)",
    )


def synthetic_xray(height: int = 96, width: int = 80, seed: int = 0, kind: int = 0) -> np.ndarray:
    """A grayscale chest-like picture: dark lungs in a bright body, with class-dependent texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.full((height, width), 170.0)
    for cx in (0.32, 0.68):
        lung = ((xx / width - cx) / 0.17) ** 2 + ((yy / height - 0.5) / 0.33) ** 2 < 1
        image[lung] = 60
    if kind == 1:  # blotchy opacities
        image += 50 * (np.sin(xx / 3.0) * np.cos(yy / 4.0) > 0.5)
    elif kind == 2:  # diffuse haze
        image += 40 * np.exp(-(((yy - height / 2) / (height / 4)) ** 2))
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_image(path: Path, gray: np.ndarray, *, params: list[int] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok = cv2.imwrite(str(path), gray, params or [])
    assert ok, path
    return path


def make_class_folders(root: Path, per_class: int = 6, size: int = 64, seed: int = 0, class_names=CLASS_NAMES) -> Path:
    """A learnable synthetic dataset: each class has its own texture."""
    for label, name in enumerate(class_names):
        for i in range(per_class):
            gray = synthetic_xray(size, size, seed=seed * 1000 + label * 100 + i, kind=label)
            ext = [".png", ".JPG", ".jpeg"][i % 3]  # mixed-case extensions on purpose
            write_image(root / name / f"img_{i:03d}{ext}", gray)
    return root


def flip_a_byte(path: Path) -> None:
    """Corrupt a file in place, keeping its size: the middle byte inverted (a bit-rot stand-in)."""
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(proc: subprocess.Popen, port: int, log: Path, timeout: float = 120) -> str:
    """The server's URL once ``port`` accepts connections; fails with its log if it exits or never listens."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return f"http://127.0.0.1:{port}/"
        except OSError:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.5)
    proc.kill()
    pytest.fail("server did not start:\n" + log.read_text())


def train_two_source_run(root: Path, *, adults: int = 8, adult_size: int = 300) -> Path:
    """A one-epoch run on two sources (children's three classes, adults' Normal only), as the
    scripts that rebuild a run's validation split need; returns its output folder."""
    from chest_model.training import main

    kids = make_class_folders(root / "kids", per_class=5, size=64, seed=6)
    grown = make_class_folders(root / "adults", per_class=adults, size=adult_size, seed=7, class_names=["Normal"])
    run = root / "run"
    assert main(["--data-dir", f"kids={kids}", "--data-dir", f"adults={grown}", "--output-dir", str(run),
                 "--image-size", "32", "--batch-size", "4", "--weights", "none", "--epochs", "1", "--cpu-threads", "1",
                 "--checkpointing-steps", "none"]) == 0
    return run


def block_detector(image_size: int = 64):
    """A model whose Covid score is the mean brightness of the red channel after normalisation: its map
    must sit on the bright block of a dark film, wherever the film puts it."""
    import torch

    from chest_model import ChestXrayClassifier, ChestXrayConfig

    model = ChestXrayClassifier(ChestXrayConfig(image_size=image_size, hidden_size=4)).eval()
    with torch.no_grad():
        for m in model.features:
            if isinstance(m, torch.nn.Conv2d):
                m.weight.zero_()
                m.bias.zero_()
                m.weight[0, 0, 1, 1] = 1.0
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.reset_parameters()
        model.head[2].weight.zero_(); model.head[2].bias.zero_(); model.head[2].weight[0, 0] = 1.0
        model.head[5].weight.zero_(); model.head[5].bias.zero_(); model.head[5].weight[1, 0] = 1.0
    return model


def film_with_block(height: int, width: int, top: float, left: float) -> np.ndarray:
    """A dark film with one bright block whose centre is at (top + 0.1, left + 0.1) of its height and width."""
    film = np.full((height, width), 20, np.uint8)
    film[int(top * height) : int((top + 0.2) * height), int(left * width) : int((left + 0.2) * width)] = 240
    return film


def centre_of_heat(heatmap: np.ndarray) -> tuple[float, float]:
    """Where the map's weight lies, as fractions of the film's height and width (a coarse map's
    argmax sits anywhere on its hottest cell; its centre of mass does not)."""
    rows, cols = np.indices(heatmap.shape)
    total = heatmap.sum()
    return float((heatmap * (rows + 0.5)).sum() / total / heatmap.shape[0]), float((heatmap * (cols + 0.5)).sum() / total / heatmap.shape[1])
