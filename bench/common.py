"""Helpers shared by the benchmarks: dataset location, subsets, the baseline script, machine facts."""
from __future__ import annotations

import contextlib
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


def machine_facts() -> dict:
    """What every figure is measured on: the CPU, its vector ISA, whether bf16 is native and fast, cores, device."""
    sys.path.insert(0, str(ROOT))
    from chest_model.precision import choose_precision, cpu_capability, cpu_has_amx, cpu_has_bf16_instructions

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "cpu": cpu, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_capability": cpu_capability(), "amx": cpu_has_amx(), "avx512_bf16": cpu_has_bf16_instructions(),
        "device": device, "auto_precision": choose_precision("cuda" if torch.cuda.is_available() else "cpu").precision,
        # No bf16 instructions: oneDNN falls back to reference code, tens of times slower than fp32.
        "bf16_emulated": not torch.cuda.is_available() and not cpu_has_bf16_instructions(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "emulated": os.environ.get("ATEN_CPU_CAPABILITY", "") != "" or os.environ.get("ONEDNN_MAX_CPU_ISA", "") != "",
    }


def machine() -> str:
    f = machine_facts()
    return (f"{f['cpu']}, {f['cores']} cores, capability {f['cpu_capability']}"
            f"{' (emulated via ATEN_CPU_CAPABILITY/ONEDNN_MAX_CPU_ISA)' if f['emulated'] else ''}, "
            f"AMX {'yes' if f['amx'] else 'no'}, AVX512-BF16 {'yes' if f['avx512_bf16'] else 'no'}, device {f['device']}, "
            f"auto precision {f['auto_precision']}, torch {f['torch']}, {f['threads']} threads")


def bench_device() -> torch.device:
    """Where the in-process figures are measured: the GPU where there is one (train.py picks it too)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def tf32_matmuls(on: bool):
    """cuDNN runs fp32 convolutions on TF32 tensor cores by default, so an fp32 step's peak on a GPU
    is TF32's (against the strict-fp32 matmul, an H200's fp32 step read 140-350% of "peak")."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on or previous
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def matmul_peak_tflops(dtype: torch.dtype = torch.bfloat16, size: int | None = None, trials: int = 15,
                       device: torch.device | None = None) -> float:
    """The best of several timed matmuls: a shared machine's noise only ever slows a trial down.
    2048² on a CPU; 8192² on a GPU, which a smaller product cannot fill (fp32 there: TF32)."""
    device = device or bench_device()
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    with tf32_matmuls(device.type == "cuda" and dtype == torch.float32):
        start = time.perf_counter()
        a @ b
        synchronize(device)
        first = time.perf_counter() - start
        if first > 2 and device.type == "cpu":  # emulated bf16 (AVX2): ~20 s a matmul; the first one says enough
            return 2 * size**3 / first / 1e12
        for _ in range(2):
            a @ b
        best = float("inf")
        for _ in range(trials):
            synchronize(device)
            start = time.perf_counter()
            a @ b
            synchronize(device)
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
