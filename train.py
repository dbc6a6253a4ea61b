"""Train the chest X-ray classifier: `accelerate launch train.py --data-dir DATA/train --output-dir runs/x`.

Runs on CPU, one GPU or several with no code change (`python train.py ...` works too).
See `python train.py --help`. Research demo, not for clinical use.
"""
from chest_model.entry import exit_with, run_training  # chest_model/training.py: main

if __name__ == "__main__":
    exit_with(run_training())
