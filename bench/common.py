"""Helpers shared by the benchmarks: dataset location, subsets, the baseline script, machine facts."""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATASET = Path(os.environ.get("CHEST_XRAY_DATASET", SHARED / "data" / "covid19-dataset"))
BASELINE = Path(os.environ.get("CHEST_XRAY_BASELINE", SHARED / "baseline" / "seed_reference.py"))
CLASSES = ["Normal", "Covid", "Viral Pneumonia"]


def require_inputs() -> None:
    missing = [str(p) for p in (DATASET / "train", BASELINE) if not p.exists()]
    if missing:
        sys.exit(f"benchmark inputs not found: {missing} (set CHEST_XRAY_DATASET / CHEST_XRAY_BASELINE)")


def subset(out: Path, split: str, per_class: int) -> Path:
    """Symlink the first ``per_class`` files of each class into ``out`` (same bytes, no copies)."""
    for name in CLASSES:
        (out / name).mkdir(parents=True, exist_ok=True)
        for path in sorted((DATASET / split / name).iterdir())[:per_class]:
            (out / name / path.name).symlink_to(path)
    return out


def run(cmd: list[str], env: dict | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "TQDM_DISABLE": "1", **(env or {})})
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return elapsed, result.stdout


def baseline_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def bf16_matmul_peak_tflops(size: int = 2048, trials: int = 15) -> float:
    """The best of several timed bf16 matmuls: a shared machine's noise only ever slows a trial down."""
    a = torch.randn(size, size, dtype=torch.bfloat16)
    b = torch.randn(size, size, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def train_flops_per_image(image_size: int, backbone: str = "vgg19") -> float:
    """Forward + backward FLOPs of one image through the classifier (torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(ROOT))
    from chest_model import ChestXrayClassifier

    model = ChestXrayClassifier(backbone=backbone, image_size=image_size)
    x = torch.randn(1, 3, image_size, image_size)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return float(counter.get_total_flops())


def clean(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
