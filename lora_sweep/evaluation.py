"""Validation and test metrics for classification: loss, accuracy, macro-F1."""

from __future__ import annotations

import contextlib
import sys

import numpy as np
import torch
from tqdm.auto import tqdm


def macro_f1(predictions: np.ndarray, labels: np.ndarray, num_labels: int) -> float:
    """Unweighted mean of per-class F1 over every class of the task (absent classes count as F1 = 0
    only if they were predicted; a class neither present nor predicted is left out)."""
    scores = []
    for cls in range(num_labels):
        tp = np.sum((predictions == cls) & (labels == cls))
        fp = np.sum((predictions == cls) & (labels != cls))
        fn = np.sum((predictions != cls) & (labels == cls))
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def progress(total: int, desc: str, leave: bool = True, initial: int = 0):
    """A progress bar that redraws smoothly on a terminal and rarely in a log file."""
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        leave=leave,
        dynamic_ncols=True,
        mininterval=0.5 if interactive else 30,
        initial=initial,
    )


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(
    model,
    loader,
    device: torch.device,
    precision: str,
    num_labels: int,
    desc: str = "eval",
    per_row: bool = False,
) -> dict:
    """Loss, accuracy and macro-F1 over ``loader``; ``per_row``: also each row's predicted class
    (``predictions``), in the dataset's order whatever order the loader batched the rows in."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    predictions, labels = [], []
    with progress(len(loader), desc, leave=False) as bar:
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast(device, precision):
                output = model(**batch)
            loss_sum += output.loss.double() * batch["labels"].shape[0]
            predictions.append(output.logits.argmax(dim=-1))
            labels.append(batch["labels"])
            bar.update()
    model.train(was_training)
    predicted = torch.cat(predictions).cpu().numpy()
    truth = torch.cat(labels).cpu().numpy()
    metrics = {
        "loss": float(loss_sum.item() / len(truth)),
        "accuracy": float(np.mean(predicted == truth)),
        "macro_f1": macro_f1(predicted, truth, num_labels),
        "samples": int(len(truth)),
    }
    if per_row:
        from lora_sweep.data import in_dataset_order

        metrics["predictions"] = in_dataset_order(predicted.tolist(), loader)
    return metrics
