"""Figures for training and evaluation outputs (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_training_curves(history: list[dict], path: str | Path) -> None:
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], "o-", label="val")
    ax_loss.set(title="Loss", xlabel="epoch")
    ax_acc.plot(epochs, [r["train_accuracy"] for r in history], "o-", label="train")
    ax_acc.plot(epochs, [r["val_accuracy"] for r in history], "o-", label="val")
    ax_acc.set(title="Accuracy", xlabel="epoch", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion_matrix(matrix: list[list[int]], class_names: list[str], path: str | Path, *, title: str = "") -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=30, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    peak = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reliability(bins: list[dict], ece: float | None, path: str | Path) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    if bins:
        centres = [(b["lo"] + b["hi"]) / 2 for b in bins]
        ax.bar(centres, [b["accuracy"] for b in bins], width=0.09, alpha=0.7, label="accuracy")
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="black", label="mean confidence")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
           title=f"Reliability (ECE {ece:.3f})" if ece is not None else "Reliability")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_contact_sheet(images, captions: list[str], path: str | Path, *, columns: int = 4) -> None:
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions):
        ax.imshow(image)
        ax.set_title(caption, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
