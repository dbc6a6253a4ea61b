"""Which floating-point precision is fast on this device: one rule for training and inference.

bf16 halves memory traffic, but it is only *faster* where the hardware multiplies bf16 natively at
a higher rate than fp32:
- CUDA GPUs with bf16 tensor cores (Ampere and newer);
- CPUs with AMX tiles (Sapphire Rapids and newer), where oneDNN's bf16 convolutions run ~3x fp32.

AVX2 CPUs emulate bf16 (over 40x slower): fp32 is the fast choice there. CPUs with AVX512-BF16 but
no AMX go both ways, so they are measured once per process with a short timed matmul:
- an AVX512 Xeon: bf16 150 against fp32 320 GFLOP/s, and a VGG19 training step 1.5x *slower*;
- an AMD EPYC with AVX512-BF16: bf16 401 against fp32 141 GFLOP/s, and a VGG19 training step 2.1x *faster*.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from functools import lru_cache

import torch

from .errors import ChestModelError

# bf16 must beat fp32 by this much in the probe to be chosen: the two measured kinds sit at 0.5x
# and 2.8x, so timing noise cannot flip the choice between processes or runs.
BF16_PROBE_MARGIN = 1.25


class PrecisionError(ChestModelError, ValueError):
    """A precision name that is not one of ours."""


class DeviceError(ChestModelError, ValueError):
    """A device name that is unknown, or names a device this machine does not have."""


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # "bf16", "fp32" (or "fp16", only when asked for)
    reason: str
    bf16_fast: bool

    @property
    def mixed_precision(self) -> str:
        """The name accelerate uses."""
        return self.precision if self.precision in ("bf16", "fp16") else "no"


def cpu_capability() -> str:
    """torch's view of the CPU's vector ISA (``AVX2``, ``AVX512``, ...), recorded beside every timing."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_has_amx() -> bool:
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_has_bf16_instructions() -> bool:
    """AVX512-BF16 or AMX: oneDNN runs bf16 without emulation (not necessarily faster than fp32)."""
    if not cpu_capability().startswith("AVX512"):  # also honours ATEN_CPU_CAPABILITY=avx2, which emulates an AVX2 CPU
        return False
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@lru_cache(maxsize=None)
def bf16_matmul_speedup(size: int = 768, repeats: int = 3) -> float:
    """How many times faster a bf16 matmul runs than an fp32 one on this CPU (best of ``repeats``; ~0.1 s)."""
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b  # warm-up: oneDNN picks and caches its kernel
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            a @ b
            best = min(best, time.perf_counter() - start)
        rates[dtype] = 1.0 / best
    return rates[torch.bfloat16] / rates[torch.float32]


def bf16_is_fast(device: torch.device | str) -> tuple[bool, str]:
    """Whether bf16 beats fp32 on ``device``, and why."""
    return _bf16_is_fast(torch.device(device))


@lru_cache(maxsize=None)
def _bf16_is_fast(device: torch.device) -> tuple[bool, str]:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        name = torch.cuda.get_device_name(index)
        if major >= 8:
            return True, f"{name} (compute capability {major}.{minor}) has bf16 tensor cores"
        return False, f"{name} (compute capability {major}.{minor}) has no bf16 tensor cores"
    if device.type == "cpu":
        capability = cpu_capability()
        if cpu_has_amx():
            return True, f"the CPU has AMX tiles ({capability}): oneDNN runs bf16 about 3x faster than fp32"
        if cpu_has_bf16_instructions():
            speedup = bf16_matmul_speedup()
            if speedup >= BF16_PROBE_MARGIN:
                return True, f"the CPU has AVX512-BF16 but no AMX ({capability}), and a timed matmul runs bf16 faster than fp32"
            return False, f"the CPU has AVX512-BF16 but no AMX ({capability}), and a timed matmul runs bf16 no faster than fp32"
        return False, f"the CPU has no native bf16 ({capability}): bf16 is emulated, many times slower than fp32"
    return False, f"bf16 speed on {device.type} is unknown; fp32 is the safe choice"


def choose_precision(device: torch.device | str, requested: str = "auto") -> PrecisionChoice:
    """``requested`` is ``auto``, ``bf16`` or ``fp32`` (``no`` is accelerate's name for fp32)."""
    requested = {"no": "fp32", "fp32": "fp32", "bf16": "bf16", "auto": "auto"}.get(requested)
    if requested is None:
        raise PrecisionError("precision must be 'auto', 'bf16' or 'fp32' ('no')")
    fast, why = bf16_is_fast(device)
    if requested == "auto":
        return PrecisionChoice("bf16" if fast else "fp32", f"auto: {why}", fast)
    return PrecisionChoice(requested, f"asked for {requested}; {why}", fast)


DEVICE_HELP = "where inference runs: auto (a CUDA GPU where one is present, else the CPU), cpu, cuda, cuda:N or mps"


def inference_device(requested: str = "auto") -> torch.device:
    """Where inference runs: ``auto`` is the first CUDA GPU where one is present, else the CPU; or a
    device name (``cpu``, ``cuda``, ``cuda:1``, ``mps``). Raises DeviceError for one that is not here."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise DeviceError(f"unknown device {requested!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise DeviceError(f"device {requested!r}: cannot run the model (use auto, cpu, cuda, cuda:N or mps)")
    if device.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise DeviceError(f"device {requested!r}: no Intel GPU (XPU) here")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise DeviceError(f"device {requested!r}: no such CUDA GPU here ({torch.cuda.device_count()} visible)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {requested!r}: Apple's MPS is not available here")
    return device


def device_argument(text: str) -> str:
    """An argparse type for ``--device``: the name, checked against this machine."""
    try:
        inference_device(text)
    except DeviceError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def preferred_memory_format(device: torch.device | str, precision: str) -> torch.memory_format:
    """channels_last where it measured faster, contiguous elsewhere.

    oneDNN's bf16 convolutions and cuDNN run channels_last natively; fp32 on a CPU measured faster
    contiguous (a VGG19 training step at 224 px, batch 4: 1.98 against 1.73 img/s on an AVX512 Xeon;
    `bench/train_throughput.py --sections step` prints it for any machine).
    """
    if torch.device(device).type == "cuda" or precision == "bf16":
        return torch.channels_last
    return torch.contiguous_format
