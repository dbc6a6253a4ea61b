"""How the entry points exit: the code they were given, with output flushed and atexit handlers run."""
import subprocess
import sys
import textwrap

import pytest

from helpers import ROOT


@pytest.mark.parametrize("code", [0, 3])
def test_exit_with_keeps_the_code_the_output_and_the_exit_handlers(code, tmp_path):
    marker = tmp_path / "atexit-ran"
    script = textwrap.dedent(f"""
        import atexit, logging, pathlib, sys
        import torch
        from chest_model.entry import exit_with
        logging.basicConfig(filename={str(tmp_path / 'log.txt')!r}, level=logging.INFO)
        logging.getLogger("run").info("logged before exit")
        atexit.register(lambda: pathlib.Path({str(marker)!r}).write_text("yes"))
        cycle = [torch.zeros(3)]; cycle.append(cycle)  # garbage the final collection would have walked
        print("unflushed line", end="")
        exit_with({code})
        print("never printed")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == code, result.stderr
    assert result.stdout == "unflushed line"
    assert marker.read_text() == "yes"
    assert "logged before exit" in (tmp_path / "log.txt").read_text()


def test_train_py_without_the_train_extra_names_it_in_one_error_line(tmp_path):
    """As after `pip install .` alone: accelerate is missing."""
    make = ("import runpy, sys; sys.modules['accelerate'] = None; "
            f"sys.argv = ['train.py', '--data-dir', {str(tmp_path)!r}, '--output-dir', {str(tmp_path / 'run')!r}]; "
            f"runpy.run_path({str(ROOT / 'train.py')!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", make], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "`train.py` needs accelerate, from the train extra: pip install '.[train]'" in result.stderr
