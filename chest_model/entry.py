"""How the command-line entry points (``train.py``, ``chest-model``) end their process."""
from __future__ import annotations

import gc
import sys
from typing import NoReturn


def exit_with(code: int) -> NoReturn:
    """Exit with ``code`` without the interpreter's final garbage collections.

    At exit, Python's collector walks every object still alive, and after torch, torchvision and
    their imports that takes 0.6-1 s: a quarter of a ``chest-model predict``. Frozen objects are out
    of its reach; everything is still freed, files closed, logs flushed and atexit handlers run.
    """
    gc.freeze()
    sys.exit(code)


# Modules of the optional extras (pyproject.toml), for the message when one is missing.
EXTRA_OF = {"sklearn": "train", "matplotlib": "train", "imagehash": "train", "accelerate": "train",
            "gradio": "demo", "onnx": "export", "onnxscript": "export", "onnxruntime": "export"}


def missing_extra(err: ModuleNotFoundError, command: str) -> str | None:
    """The one-line error for an optional dependency that is not installed; None for any other missing module."""
    module = (err.name or "").split(".")[0]
    extra = EXTRA_OF.get(module)
    if extra is None:
        return None
    return (f"error: `{command}` needs {module}, from the {extra} extra: pip install '.[{extra}]' in a checkout "
            f"(or chest-xray-classifier[{extra}] from its repository)")


def run_training() -> int:
    """``train.py``: the training's ``main``, or one error line when the train extra is not installed."""
    try:
        from .training import main
    except ModuleNotFoundError as err:
        message = missing_extra(err, "train.py")
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 2
    return main()
