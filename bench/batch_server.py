"""The demo with one more, hidden endpoint, ``/predict_batch``: Gradio queue batching, for measurement only.

    python bench/batch_server.py [--model demo/starter-model] [--port 7860]

The page and every public endpoint are the demo's own (``demo/app.py``); only the batched form of
``/predict`` is added, so ``bench/load_test.py --batch`` can compare the two. It is kept out of the
library and of the demo: in a Gradio batch one bad upload raises for the whole batch, so the other
requests in it would all get its error (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chest_model import ChestXrayClassifier  # noqa: E402
from chest_model.demo import (  # noqa: E402
    DEFAULT_MAX_FILE_SIZE, DemoService, accept_label_data, build_demo, configure_queue, label_value, launch_options)

EXAMPLES = ROOT / "examples"
MAX_BATCH_SIZE = 8


def add_batch_endpoint(demo, service: DemoService) -> None:
    """A hidden file input, button and label whose click runs one forward pass per queue batch."""
    import gradio as gr

    def predict_batch(paths: list[str | None]) -> list[list]:
        images = [service.load(path) for path in paths]  # a bad file raises for the whole batch
        return [[label_value(p) for p in service.model.predict(images, precision=service.precision)]]

    with demo:
        upload = gr.File(type="filepath", visible=False)
        label = gr.Label(visible=False)
        accept_label_data(label)
        gr.Button(visible=False).click(predict_batch, upload, label, api_name="predict_batch",
                                       batch=True, max_batch_size=MAX_BATCH_SIZE)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "demo" / "starter-model"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--max-file-size", default=DEFAULT_MAX_FILE_SIZE)
    args = parser.parse_args(argv)
    # demo/app.py's create(), with the model kept for the batched endpoint (importing demo/app.py
    # would build its module-level demo, and load a model, a second time).
    model = ChestXrayClassifier.from_pretrained(args.model)
    demo = configure_queue(build_demo(model, args.model, examples_dir=EXAMPLES))
    add_batch_endpoint(demo, DemoService(model, args.model))
    demo.launch(server_name=args.host, server_port=args.port, **launch_options(EXAMPLES, args.max_file_size))


if __name__ == "__main__":
    main()
