"""What the training losses do to their inputs: denoising corruption and random translations."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from saelab.config.schema import Noise


def corrupt(x: torch.Tensor, kind: str, level: float, background: float) -> torch.Tensor:
    """Denoising corruption (Vincent et al. 2010): masking sets a fraction `level` of inputs to the
    background value, gaussian adds N(0, level^2), salt_pepper sets a fraction to min or max."""
    if kind == Noise.none or level == 0:
        return x
    if kind == Noise.gaussian:
        return x + level * torch.randn_like(x)
    hit = torch.rand_like(x) < level
    if kind == Noise.masking:
        return x.masked_fill(hit, background)
    if kind == Noise.salt_pepper:
        salt = torch.where(torch.rand_like(x) < 0.5, 1.0, background)
        return torch.where(hit, salt, x)
    raise ValueError(f"unknown corruption {kind!r}")


def translate(x: torch.Tensor, shift: int, background: float) -> torch.Tensor:
    """Each 28 x 28 image of `x` (rows of 784) moved by a random whole number of pixels, up to
    `shift` each way, the uncovered border filled with the background."""
    n, side = len(x), 28
    padded = F.pad(x.view(n, side, side), (shift,) * 4, value=background)
    dy, dx = (torch.randint(0, 2 * shift + 1, (n, 1), device=x.device) for _ in range(2))
    rows = torch.arange(side, device=x.device) + dy  # n x 28: each image's window
    cols = torch.arange(side, device=x.device) + dx
    out = padded[torch.arange(n, device=x.device)[:, None, None], rows[:, :, None],
                 cols[:, None, :]]
    return out.reshape(n, side * side)
