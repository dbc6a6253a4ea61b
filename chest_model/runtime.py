"""The training process's dealings with its host: signals, the allocator, cores, background imports.

Kept apart from the recipe in ``training.py``: none of it changes what is learned, only how the
process behaves on the machine it runs on.
"""
from __future__ import annotations

import importlib
import os
import signal
import sys
import threading

import torch


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class GracefulStop:
    """Turns SIGINT/SIGTERM into a flag that every process checks at the next batch boundary."""

    def __init__(self):
        self.signum = 0
        self.previous = {}
        self.pid = os.getpid()

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if os.getpid() != self.pid:  # a data-loader worker, forked with this handler: the trainer speaks for it
            if signum == signal.SIGTERM:  # how the loader ends its workers: end as it expects
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        if self.signum:  # the first signal names the stop (Ctrl-C reaches a launched run as SIGINT, then SIGTERM)
            return
        self.signum = signum
        # Said at once: the checkpoint comes at the end of the batch, which can take a while.
        print(f"{signal.Signals(signum).name} received: stopping at the next step boundary, after saving a checkpoint",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def requested(self, accelerator) -> int:
        flag = torch.tensor([float(self.signum)], device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, reduction="max")
        return int(flag.item())





def preimport(*modules: str) -> threading.Thread:
    """Import slow, later-needed modules on a background thread while the first epoch trains.

    scikit-learn and matplotlib take ~2.5 s to import; training runs in torch kernels that release
    the GIL, so the import overlaps with it instead of delaying the start.
    """
    def work() -> None:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - the real import later reports any problem
                pass

    thread = threading.Thread(target=work, name="preimport", daemon=True)
    thread.start()
    return thread


def tune_allocator() -> None:
    """Keep freed activation buffers in the heap instead of returning them to the OS.

    glibc hands large blocks back with munmap after every step, so each step page-faults its
    activations in again; raising the mmap and trim thresholds makes steps ~10% faster on CPU.
    """
    if sys.platform != "linux":
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


