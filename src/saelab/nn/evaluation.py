"""Test-time measurements shared by the stages, the report and the robustness study."""

from __future__ import annotations

import torch
from torch import nn

from saelab.data.batches import CHUNK


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Class predictions of `model` on `x`, in chunks, in eval mode."""
    model.eval()
    return torch.cat([model(part).argmax(1) for part in x.split(CHUNK)])


@torch.no_grad()
def confusion_matrix(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """k x k counts, rows true class, columns predicted class."""
    pred = predict(model, x)
    return torch.bincount(y * k + pred, minlength=k * k).reshape(k, k).cpu()


def classifier_metrics(model: nn.Module, splits, inputs: tuple | None = None) -> dict:
    """Test accuracy, validation accuracy (on the labelled validation images, which selected the
    epoch), per-class test accuracy and the confusion matrix. `inputs`: what `model` reads of the
    labelled validation and the test images, where not the images themselves."""
    k = len(splits.classes)
    val_x, val_y = splits.labelled("val")
    val_x, test_x = (val_x, splits.test_x) if inputs is None else inputs
    cm = confusion_matrix(model, test_x, splits.test_y, k)
    out = {"test_acc": float(cm.diag().sum() / cm.sum())}
    if len(val_y):
        out["val_acc"] = float((predict(model, val_x) == val_y).float().mean())
    per_class = cm.diag().double() / cm.sum(1).clamp(min=1)
    out["per_class_acc"] = dict(zip(splits.class_names, per_class.tolist(), strict=True))
    out["confusion_matrix"] = cm.tolist()
    return out


@torch.no_grad()
def in_chunks(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply `fn` to `x` in chunks without gradients (codes of a whole split)."""
    return torch.cat([fn(part) for part in x.split(CHUNK)]) if len(x) else x
