"""A Hugging Face Space serving the chest X-ray classifier's Gradio demo (written here by `chest-model space`).

    python app.py [--host 127.0.0.1] [--port 7860]

It imports the copy of the chest_model package next to it and serves the model named below: a
folder in this Space, or a Hub repo id. Research demo, not for clinical use.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the vendored chest_model/ beside this file, before any installed copy

from chest_model import ChestXrayClassifier  # noqa: E402
from chest_model.demo import DEFAULT_MAX_FILE_SIZE, build_demo, configure_queue, file_size_argument, serve  # noqa: E402
from chest_model.precision import inference_device  # noqa: E402

MODEL = "model"  # a folder next to this file, or a Hub repo id
REVISION = None  # the Hub revision of a repo id
MODEL_NAME = "model"  # what the page calls the model
EXAMPLES = HERE / "examples"


def create():
    reference = str(HERE / MODEL) if (HERE / MODEL).is_dir() else MODEL
    # On the GPU where torch has one (requirements.txt installs CPU-only torch: see its comment there);
    # $CHEST_DEVICE=cpu keeps it on the CPU.
    model = ChestXrayClassifier.from_pretrained(reference, revision=REVISION,
                                                map_location=inference_device(os.environ.get("CHEST_DEVICE", "auto")))
    return configure_queue(build_demo(model, MODEL_NAME, revision=REVISION, examples_dir=EXAMPLES))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # A Space sets GRADIO_SERVER_NAME and GRADIO_SERVER_PORT; on a workstation the defaults stay local.
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--max-file-size", type=file_size_argument, default=DEFAULT_MAX_FILE_SIZE,
                        help="largest accepted upload, e.g. 50mb")
    args = parser.parse_args(argv)
    serve(create, host=args.host, port=args.port, examples_dir=EXAMPLES, max_file_size=args.max_file_size)


if __name__ == "__main__":
    main()
else:  # `gradio app.py` (reload mode) imports the module and serves `demo`
    demo = create()
