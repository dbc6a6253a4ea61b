"""Gradio demo: drop a chest X-ray, see the class probabilities and where the model looked.

    python demo/app.py [--model PATH_OR_REPO] [--device auto] [--host 127.0.0.1] [--port 7860]

Imported (``gradio demo/app.py`` reloads on edits), the module-level ``demo`` serves the model named
by $CHEST_MODEL (default: the bundled starter model). To run it as a Hugging Face Space, build a
Space folder with ``chest-model space`` (see the README). Research demo, not for clinical use.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # a plain checkout holds chest_model/ next to demo/

from chest_model import ChestXrayClassifier  # noqa: E402
from chest_model.demo import DEFAULT_MAX_FILE_SIZE, build_demo, configure_queue, file_size_argument, serve  # noqa: E402
from chest_model.precision import DEVICE_HELP, device_argument, inference_device  # noqa: E402

DEFAULT_MODEL = os.environ.get("CHEST_MODEL", str(HERE / "starter-model"))
DEFAULT_DEVICE = os.environ.get("CHEST_DEVICE", "auto")  # auto: a CUDA GPU where one is present, else the CPU
EXAMPLES = HERE.parent / "examples"


def create(model_ref: str = DEFAULT_MODEL, revision: str | None = None, device: str = DEFAULT_DEVICE):
    model = ChestXrayClassifier.from_pretrained(model_ref, revision=revision, map_location=inference_device(device))
    return configure_queue(build_demo(model, model_ref, revision=revision, examples_dir=EXAMPLES))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="local model folder or Hugging Face Hub repo id")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--device", type=device_argument, default=DEFAULT_DEVICE, help=DEVICE_HELP)
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--max-file-size", type=file_size_argument, default=DEFAULT_MAX_FILE_SIZE,
                        help="largest accepted upload, e.g. 50mb")
    args = parser.parse_args(argv)
    serve(lambda: create(args.model, args.revision, args.device), host=args.host, port=args.port, examples_dir=EXAMPLES, max_file_size=args.max_file_size)


if __name__ == "__main__":
    main()
else:
    demo = create()
