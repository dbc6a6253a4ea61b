"""The training process's host-facing helpers: signals become a flag, slow imports overlap, cores are counted."""
import os
import signal
import sys

import pytest
from accelerate import PartialState

from chest_model.runtime import GracefulStop, Interrupted, available_cores, preimport


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM cannot be sent to oneself on Windows")
def test_sigterm_becomes_a_flag_and_the_old_handler_returns():
    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        assert stop.requested(PartialState(cpu=True)) == 0
        os.kill(os.getpid(), signal.SIGTERM)  # the process must not die: the loop checkpoints first
        assert stop.requested(PartialState(cpu=True)) == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    assert Interrupted(signal.SIGTERM).signum == signal.SIGTERM and str(Interrupted(signal.SIGINT)) == "SIGINT"


@pytest.mark.skipif(sys.platform == "win32", reason="fork and signals to oneself are POSIX")
def test_a_forked_worker_stays_quiet_on_sigint_and_ends_on_sigterm(capfd):
    with GracefulStop():
        pid = os.fork()
        if pid == 0:  # as a data-loader worker: forked with the trainer's handler
            try:
                os.kill(os.getpid(), signal.SIGINT)  # ignored: the trainer speaks for the stop
                os.kill(os.getpid(), signal.SIGTERM)  # how the loader ends its workers
            finally:
                os._exit(3)  # reached only if SIGTERM did not end it
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    assert "received" not in capfd.readouterr().err


def test_preimport_imports_in_the_background_and_ignores_what_is_missing():
    sys.modules.pop("colorsys", None)
    preimport("no_such_module_anywhere", "colorsys").join(timeout=30)
    assert "colorsys" in sys.modules


def test_available_cores_counts_this_process_cores():
    assert 1 <= available_cores() <= (os.cpu_count() or 1)
