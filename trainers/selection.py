"""Model selection on the validation split, and the one final pass over the test split.

Every trainer measures the validation split on the device after each epoch and keeps the best
epoch's weights (highest val_accuracy; ties go to the lower val_loss, then to the earlier epoch).
After the last epoch it loads those weights and measures the test split once: `test_accuracy` and
the predicted labels (for the confusion matrix) come from that single pass, and nothing before it
reads the test split. Nothing here ranks, stops or clones by test.
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch


def _better(acc: float, loss: float, best: dict | None) -> bool:
    if best is None:
        return True
    if acc != best["val_accuracy"]:
        return acc > best["val_accuracy"]
    lo, bl = loss, best.get("val_loss", math.nan)
    return not math.isnan(lo) and (math.isnan(bl) or lo < bl)


class Selection:
    """The best epoch so far by validation, with a copy of its weights (resumable via `state()`)."""

    def __init__(self, saved: dict | None = None):
        self.best: dict | None = copy.deepcopy(saved) if saved else None

    def offer(self, epoch: int, val_accuracy: float, val_loss: float, weights: dict) -> bool:
        """Keep `weights` (a state_dict, copied) if this epoch is the best so far; True if kept."""
        if not _better(val_accuracy, val_loss, self.best):
            return False
        self.best = {"epoch": int(epoch), "val_accuracy": float(val_accuracy), "val_loss": float(val_loss),
                     "weights": copy.deepcopy(weights)}
        return True

    def metrics(self) -> dict:
        if self.best is None:
            return {}
        return {"best_val_accuracy": self.best["val_accuracy"], "best_epoch": self.best["epoch"]}

    def state(self) -> dict | None:
        return self.best


@torch.no_grad()
def predict_labels(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int) -> torch.Tensor:
    """Predicted labels of x in batches (predict(x_batch) -> logits[B, C] or labels[B])."""
    out = []
    for i in range(0, x.shape[0], batch):
        got = predict(x[i : i + batch])
        out.append(got.argmax(dim=1) if got.ndim == 2 else got)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


@torch.no_grad()
def evaluate(logits_of: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             batch: int) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of a model giving logits, in batches."""
    correct, loss = 0, 0.0
    for i in range(0, x.shape[0], batch):
        logits = logits_of(x[i : i + batch])
        yb = y[i : i + batch]
        correct += int((logits.argmax(dim=1) == yb).sum())
        loss += float(torch.nn.functional.cross_entropy(logits, yb, reduction="sum"))
    n = max(1, x.shape[0])
    return correct / n, loss / n


def select_on_twin(selection: Selection, epoch: int, twin_accuracy: float, twin_loss: float, weights: dict,
                   last: bool, load: Callable[[dict], None],
                   on_device: Callable[[], tuple[float, float]]) -> tuple[float, float, dict]:
    """Selection for a training on a twin whose device measures the validation split once (insilico's
    `device_val: selected`, PhyLL's `in_silico`): the epoch is offered with its validation on the twin;
    after the `last` epoch only, the selected weights are loaded, measured on the device (`on_device()`
    -> (accuracy, loss)) and `weights` (the live state_dict) put back. Returns (val_accuracy, val_loss on
    the device: NaN before the last epoch, the selection's metrics, whose best_val_accuracy is the
    device's figure once measured; the twin's is best_val_accuracy_twin)."""
    selection.offer(epoch, twin_accuracy, twin_loss, weights)
    chosen = {f"{k}_twin" if k == "best_val_accuracy" else k: v for k, v in selection.metrics().items()}
    if not last:
        return math.nan, math.nan, chosen
    now = {k: v.clone() for k, v in weights.items()}
    load(selection.state()["weights"])
    val_acc, val_loss = on_device()
    load(now)
    return val_acc, val_loss, {**chosen, "best_val_accuracy": val_acc, "best_val_loss": val_loss}


def final_pass(selection: Selection, load: Callable[[dict], None], predict_test: Callable[[], torch.Tensor],
               y_test: torch.Tensor) -> dict:
    """Load the selected weights and measure the test split once. Returns the metrics to report
    (`test_accuracy`, `selected_epoch`, `selected_val_accuracy`) and, under `test_predictions`, the
    predicted labels (int64, in test order)."""
    if selection.best is None:
        raise RuntimeError("no epoch was validated: nothing to select")
    load(selection.best["weights"])
    pred = predict_test().to(torch.int64).reshape(-1)
    acc = float((pred == y_test).float().mean()) if y_test.numel() else 0.0
    return {"test_accuracy": acc, "selected_epoch": selection.best["epoch"],
            "selected_val_accuracy": selection.best["val_accuracy"], "test_predictions": pred}
