"""What the layers learned, as pictures: the maths (decoded features, activation maximisation,
PCA) and the matplotlib figures built from it.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global state), so they
render headless and the caller decides where they go (PNG file, TensorBoard image).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from torch import nn
from torch.nn import functional as F

from saelab.autoencoder import AutoEncoder

DIVERGING = "RdBu_r"


# ---------------------------------------------------------------------------------------------
# The maths


def decode_stack(autoencoders: list[AutoEncoder], codes: torch.Tensor,
                 bias: bool = True) -> torch.Tensor:
    """Decode top-layer `codes` through every decoder, the last autoencoder's first (the seed's
    whole-stack decoding: no activation between decoders, whose outputs are linear)."""
    for ae in reversed(autoencoders):
        codes = ae.decode(codes) if bias else F.linear(codes, ae.decoder_weight)
    return codes


@torch.no_grad()
def unit_features(autoencoders: list[AutoEncoder]) -> torch.Tensor:
    """Row j: hidden unit j of the top autoencoder in input space, the one-hot e_j decoded
    through decoders k, ..., 1 with every bias removed (the seed's trick, so the biases do not
    drown the feature). Equals column j of W_dec1 @ W_dec2 @ ... @ W_deck."""
    top = autoencoders[-1]
    weight = top.decoder_weight
    eye = torch.eye(top.encoder.out_features, device=weight.device, dtype=weight.dtype)
    return decode_stack(autoencoders, eye, bias=False)


def project(x: torch.Tensor, norm: float, bounds: tuple[float, float]) -> torch.Tensor:
    """Each row clipped to the pixel box, then scaled into the L2 ball of radius `norm`. The box
    contains 0, so the scaling keeps rows inside it: the result satisfies both constraints."""
    x = x.clamp(*bounds)
    scale = (norm / x.norm(dim=1, keepdim=True).clamp(min=1e-12)).clamp(max=1.0)
    return x * scale


def activation_maximisation(pre_activation: nn.Module, d_in: int, n_units: int, *, steps: int,
                            lr: float, norm: float, bounds: tuple[float, float],
                            seed: int = 0) -> torch.Tensor:
    """Row j: the input that maximises unit j, found by projected gradient ascent (Erhan,
    Bengio, Courville & Vincent 2009) inside the pixel box and an L2 ball of radius `norm`.

    `pre_activation` maps inputs to the layer's pre-activations: maximising those rather than
    the squashed outputs gives the same maximiser (the activation is monotone) without
    vanishing gradients once a unit saturates. Each step moves a row by `lr * norm` along its
    normalised gradient, a step size that ignores the unit's scale and, for a linear unit,
    converges to the L2 optimum norm * w / |w|. All units are optimised at once: row j of the
    (n_units, d_in) input only feeds objective term j.
    """
    device = next(pre_activation.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    x = project(0.01 * torch.randn(n_units, d_in, generator=gen), norm, bounds).to(device)
    units = torch.arange(n_units, device=device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # Many tiny ops: on a busy CPU, intra-op threads cost far more in waiting than they save.
        torch.set_num_threads(1)
    try:
        for _ in range(steps):
            x.requires_grad_(True)
            (grad,) = torch.autograd.grad(pre_activation(x)[units, units].sum(), x)
            with torch.no_grad():
                step = grad / grad.norm(dim=1, keepdim=True).clamp(min=1e-12)
                x = project(x + lr * norm * step, norm, bounds)
    finally:
        torch.set_num_threads(threads)
    return x


def pca_2d(x: torch.Tensor) -> torch.Tensor:
    """The rows of `x` projected on their two principal axes (largest variance first)."""
    centred = x.double() - x.double().mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ vh[:2].T).float()


# ---------------------------------------------------------------------------------------------
# Layout: every grid of images is composed into one array and drawn by one imshow, which keeps
# rendering fast and pixels crisp (tiles are enlarged by whole-pixel repetition).

# Enlarged tiles aim at this many pixels a side; one-row strips get at least STRIP_PX a value.
TILE_PX = 84
STRIP_PX = 8
DPI = 100
MIN_WIDTH = 5.0  # inches: room for a title above a few narrow columns


def grid_shape(d: int) -> tuple[int, int]:
    """How a d-vector is drawn: a square when d is a perfect square (784 -> 28x28, 9 -> 3x3),
    a one-row strip up to 64 values, else wrapped into rows of ceil(sqrt(d)) (300 -> 17x18)."""
    side = math.isqrt(d)
    if side * side == d:
        return side, side
    if d <= 64:
        return 1, d
    cols = math.ceil(math.sqrt(d))
    return math.ceil(d / cols), cols


def as_images(vectors: torch.Tensor) -> np.ndarray:
    """(n, d) vectors as (n, rows, cols) images of `grid_shape(d)`, NaN (blank) padding."""
    n, d = vectors.shape
    rows, cols = grid_shape(d)
    out = np.full((n, rows * cols), np.nan, dtype=np.float32)
    out[:, :d] = vectors.detach().float().cpu().numpy()
    return out.reshape(n, rows, cols)


def enlarge(images: np.ndarray, factor: int | None = None) -> np.ndarray:
    """(n, h, w) images enlarged by whole-pixel repetition: `factor`, or by default to about
    TILE_PX a side (one-row strips: at least STRIP_PX per value)."""
    rows, cols = images.shape[1:]
    if factor is None:
        factor = max(1, TILE_PX // max(rows, cols), STRIP_PX if rows == 1 else 1)
    return images.repeat(factor, 1).repeat(factor, 2)


def compose(cells: list[list[np.ndarray]],
            pad: int = 8) -> tuple[np.ndarray, list[float], list[float]]:
    """Rows of images (rows may be short) on one NaN canvas, each image centred in its slot.
    Returns the canvas and the centres of its rows and columns, for labels."""
    n_cols = max(len(row) for row in cells)
    widths = [max(row[c].shape[1] for row in cells if c < len(row)) for c in range(n_cols)]
    heights = [max(img.shape[0] for img in row) for row in cells]
    canvas = np.full((sum(heights) + pad * (len(heights) - 1),
                      sum(widths) + pad * (n_cols - 1)), np.nan, dtype=np.float32)
    tops = np.cumsum([0] + [h + pad for h in heights[:-1]])
    lefts = np.cumsum([0] + [w + pad for w in widths[:-1]])
    for r, row in enumerate(cells):
        for c, img in enumerate(row):
            top = tops[r] + (heights[r] - img.shape[0]) // 2
            left = lefts[c] + (widths[c] - img.shape[1]) // 2
            canvas[top: top + img.shape[0], left: left + img.shape[1]] = img
    return (canvas, [t + h / 2 for t, h in zip(tops, heights, strict=True)],
            [x + w / 2 for x, w in zip(lefts, widths, strict=True)])


def canvas_figure(canvas: np.ndarray, extra: tuple[float, float] = (1.2, 0.9)) -> Figure:
    """A figure drawing `canvas` at about one screen pixel per canvas pixel, plus margins."""
    h, w = canvas.shape
    return Figure(figsize=(max(w / DPI + extra[0], MIN_WIDTH), h / DPI + extra[1]), dpi=DPI,
                  layout="constrained")


def show(ax, canvas: np.ndarray, **style):
    """One imshow of a composed canvas, gaps in light gray, no frame."""
    shown = ax.imshow(canvas, interpolation="nearest", **style)
    ax.set_facecolor("0.88")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    return shown


def normalise_tiles(tiles: torch.Tensor) -> torch.Tensor:
    """Each row divided by its largest absolute value: [-1, 1], zero stays zero."""
    return tiles / tiles.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)


def render(fig: Figure) -> np.ndarray:
    """The figure drawn once on the Agg canvas, as an (H, W, 3) uint8 RGB array."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


# ---------------------------------------------------------------------------------------------
# Figures


def layer_panel(inputs: torch.Tensor, codes: torch.Tensor, recons: torch.Tensor,
                labels: list[str], layer: int, limits: tuple[float, float]) -> Figure:
    """One row per sample: layer `layer`'s input, hidden code and reconstruction, each drawn as
    a square or strip (`grid_shape`) in gray on the fixed range `limits`."""
    parts = {f"input ({inputs.shape[1]})": inputs, f"code ({codes.shape[1]})": codes,
             f"output ({recons.shape[1]})": recons}
    images = [enlarge(as_images(v)) for v in parts.values()]
    return _gray_grid([list(row) for row in zip(*images, strict=True)], labels, list(parts),
                      limits, f"Layer {layer} autoencoder\n"
                      f"(gray: {limits[0]:g} black to {limits[1]:g} white)")


def image_pairs(originals: torch.Tensor, outputs: torch.Tensor, labels: list[str],
                titles: tuple[str, str], limits: tuple[float, float], title: str) -> Figure:
    """Two rows of images (originals above, outputs below), one column per sample."""
    cells = [list(enlarge(as_images(v))) for v in (originals, outputs)]
    return _gray_grid(cells, list(titles), labels, limits, title)


def _gray_grid(cells: list[list[np.ndarray]], row_labels: list[str], col_labels: list[str],
               limits: tuple[float, float], title: str) -> Figure:
    """Enlarged images in labelled rows and columns, gray on `limits`."""
    canvas, centres_y, centres_x = compose(cells, pad=12)
    fig = canvas_figure(canvas, extra=(1.0, 0.8))
    ax = fig.add_subplot()
    show(ax, canvas, cmap="gray", vmin=limits[0], vmax=limits[1])
    ax.set_yticks(centres_y, row_labels, fontsize=9)
    ax.xaxis.tick_top()
    ax.set_xticks(centres_x, col_labels, fontsize=9)
    ax.tick_params(length=0)
    fig.suptitle(title, fontsize=11)
    return fig


def tile_grid(tiles: torch.Tensor, title: str) -> Figure:
    """All units of a layer in a near-square grid, unit 0 top left, row-major. Each tile is
    divided by its own max |value| and drawn with a diverging map (red positive, blue negative,
    white zero): the normalisation that shows every unit's pattern whatever its scale."""
    images = as_images(normalise_tiles(tiles))
    per_row = math.ceil(math.sqrt(len(images)))
    # About 900 pixels across: many small tiles stay near their own size, a few are enlarged.
    images = enlarge(images, int(np.clip(900 // (per_row * (images.shape[2] + 2)), 1, 6)))
    cells = [list(images[i: i + per_row]) for i in range(0, len(images), per_row)]
    canvas, _, _ = compose(cells, pad=max(2, images.shape[1] // 14))
    fig = canvas_figure(canvas, extra=(1.6, 0.7))
    ax = fig.add_subplot()
    shown = show(ax, canvas, cmap=DIVERGING, vmin=-1, vmax=1)
    ax.set_title(title, fontsize=11)
    fig.colorbar(shown, ax=ax, shrink=0.6, label="value / max |value| of its tile")
    return fig


def confusion_figure(counts: list[list[int]], class_names: list[str], title: str) -> Figure:
    """Counts (rows true, columns predicted), coloured by the row's share on a log scale so
    that errors of a fraction of a percent still show; empty cells stay white."""
    cm = np.asarray(counts, dtype=np.float64)
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    k = len(class_names)
    side = max(4.5, 0.55 * k + 2)
    fig = Figure(figsize=(side + 1, side), layout="constrained")
    ax = fig.add_subplot()
    shown = ax.imshow(np.ma.masked_equal(share, 0), cmap="Blues",
                      norm=LogNorm(vmin=min(1e-3, share[share > 0].min()), vmax=1))
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), class_names, rotation=45 if k > 2 else 0, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=11)
    fig.colorbar(shown, ax=ax, shrink=0.7, label="share of the true class (log scale)")
    return fig


def codes_figure(panels: list[tuple[str, torch.Tensor]], labels: torch.Tensor,
                 class_names: list[str]) -> Figure:
    """One scatter per (title, 2-D points) panel, points coloured by class (at most ten)."""
    fig = Figure(figsize=(5.0 * len(panels) + 1.2, 5.0), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    palette = colormaps["tab10"]
    colors = np.asarray([palette(i) for i in range(len(class_names))])[labels.cpu().numpy()]
    for ax, (title, points) in zip(axes, panels, strict=True):
        p = points.cpu().numpy()
        # Opaque, aliased dots: as legible, and a PNG a quarter the size.
        ax.scatter(p[:, 0], p[:, 1], c=colors, s=4, linewidths=0, antialiased=False)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    handles = [Line2D([], [], marker="o", ls="", color=palette(i), label=name)
               for i, name in enumerate(class_names)]
    fig.legend(handles=handles, loc="outside right center", title="class", fontsize=9)
    return fig


def curves_figure(pretrain: list[list[dict]], classifiers: dict[str, list[dict]]) -> Figure:
    """Per-epoch histories: each pretrained layer's training loss and validation MSE, and each
    classifier stage's training loss and validation accuracy."""
    fig = Figure(figsize=(14, 4), layout="constrained")
    recon, loss, acc = fig.subplots(1, 3)
    for k, history in enumerate(pretrain, start=1):
        line = _plot_history(recon, history, "train_loss", f"layer {k} train")
        if line is not None:
            _plot_history(recon, history, "val_recon_mse", f"layer {k} val",
                          color=line.get_color(), ls="--")
    for name, history in classifiers.items():
        _plot_history(loss, history, "train_loss", name)
        _plot_history(acc, history, "val_acc", name)
    for ax, title, ylabel in ((recon, "greedy pretraining", "reconstruction loss / MSE"),
                              (loss, "classifiers: training loss", "cross-entropy"),
                              (acc, "classifiers: validation accuracy", "accuracy")):
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        if ax.lines:
            ax.legend(fontsize=8)
    recon.set_yscale("log")
    loss.set_yscale("log")
    return fig


def _plot_history(ax, history: list[dict], key: str, label: str, **style):
    """One line of `key` against epoch, or None when the history never recorded it."""
    points = [(h["epoch"], h[key]) for h in history if key in h]
    if not points:
        return None
    epochs, values = zip(*points, strict=True)
    return ax.plot(epochs, values, marker="." if len(points) < 30 else None, label=label,
                   **style)[0]
