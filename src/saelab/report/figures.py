"""What the layers learned, as pictures: the maths (decoded features, activation maximisation,
PCA) and the matplotlib figures built from it.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global state), so they
render headless and the caller decides where they go (PNG file, TensorBoard image).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from saelab.nn.networks import LayerAutoEncoder

DIVERGING = "RdBu_r"


# ---------------------------------------------------------------------------------------------
# The maths


def decode_stack(autoencoders: list[LayerAutoEncoder], codes: torch.Tensor,
                 bias: bool = True) -> torch.Tensor:
    """Decode top-layer `codes` through every decoder, the last autoencoder's first (the seed's
    whole-stack decoding: no activation between decoders, whose outputs are linear)."""
    for ae in reversed(autoencoders):
        codes = ae.decode(codes, bias)
    return codes


@torch.no_grad()
def unit_features(autoencoders: list[LayerAutoEncoder]) -> torch.Tensor:
    """Row j: pictured unit j of the top autoencoder (`units`: every unit of a dense layer, each
    channel's centre unit of a convolutional one) in input space, its one-hot code decoded
    through decoders k, ..., 1 with every bias removed (the seed's trick, so the biases do not
    drown the feature). For dense layers: column j of W_dec1 @ W_dec2 @ ... @ W_deck."""
    top = autoencoders[-1]
    weight = top.decoder_weight
    units = top.units.to(weight.device)
    one_hot = torch.zeros(len(units), top.sizes[1], device=weight.device, dtype=weight.dtype)
    one_hot[torch.arange(len(units), device=weight.device), units] = 1
    return decode_stack(autoencoders, one_hot, bias=False)


def project(x: torch.Tensor, norm: float, bounds: tuple[float, float]) -> torch.Tensor:
    """Each row clipped to the pixel box, then scaled into the L2 ball of radius `norm`. The box
    contains 0, so the scaling keeps rows inside it: the result satisfies both constraints."""
    x = x.clamp(*bounds)
    scale = (norm / x.norm(dim=1, keepdim=True).clamp(min=1e-12)).clamp(max=1.0)
    return x * scale


def activation_maximisation(pre_activation: Callable[[torch.Tensor], torch.Tensor], d_in: int,
                            n_units: int, *, steps: int, lr: float, norm: float,
                            bounds: tuple[float, float], seed: int = 0,
                            device: torch.device | str = "cpu") -> torch.Tensor:
    """Row j: the input that maximises unit j, found by projected gradient ascent (Erhan,
    Bengio, Courville & Vincent 2009) inside the pixel box and an L2 ball of radius `norm`.

    `pre_activation` maps inputs (on `device`) to the layer's pre-activations: maximising those
    rather than the squashed outputs gives the same maximiser (the activation is monotone)
    without vanishing gradients once a unit saturates. Each step moves a row by `lr * norm` along
    its normalised gradient, a step size that ignores the unit's scale and, for a linear unit,
    converges to the L2 optimum norm * w / |w|. All units are optimised at once: row j of the
    (n_units, d_in) input only feeds objective term j.
    """
    device = torch.device(device)
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
    # Eigenvectors of the small d x d scatter matrix (ascending): for 10,000 codes of 9 units,
    # several times cheaper than an SVD of the codes themselves.
    _, vectors = torch.linalg.eigh(centred.T @ centred)
    return (centred @ vectors[:, [-1, -2]]).float()


# ---------------------------------------------------------------------------------------------
# Layout: every grid of images or strips is composed into one array and drawn by one imshow,
# which keeps rendering fast and pixels crisp (values are enlarged by whole-pixel repetition).

TILE_PX = 56  # enlarged images, and code strips, aim at this many pixels high
STRIPS_PX = 700  # the code strips of one reconstruction panel share about this width
PANEL_GAP = 16  # pixels between the panels of a reconstruction figure
GRID_PX = 800  # unit grids aim at about this many pixels a side
LABEL_PX = 12  # the band above each cell of a unit grid that holds its number
DPI = 100
MIN_WIDTH = 5.0  # inches: room for a title above a few narrow columns
# How units are numbered, the same in every figure, the report and the TensorBoard images (which
# are the figures): from 0, as the code tensor indexes them, so `codes[:, j]` is unit j.
UNIT_NUMBERING = "units are numbered from 0: unit j is column j of the layer's code tensor"


def as_images(vectors: torch.Tensor) -> np.ndarray:
    """(n, d) pixel vectors as (n, side, side) images (d = 784: 28x28). Only pixels are drawn
    as images; codes, whose units have no spatial layout, are drawn as strips."""
    n, d = vectors.shape
    side = math.isqrt(d)
    if side * side != d:
        raise ValueError(f"{d} values are not a square image")
    return vectors.detach().float().cpu().numpy().reshape(n, side, side)


def maps_row(codes: torch.Tensor, shape: tuple[int, int, int], count: int) -> torch.Tensor:
    """(n, C*h*w) flat feature maps as (n, h, count*(w+1)-1) rows of their first `count`
    channels side by side, a NaN column between channels."""
    maps = codes.unflatten(1, shape)[:, :count]
    gap = torch.full((*maps.shape[:2], shape[1], 1), float("nan"), device=codes.device,
                     dtype=codes.dtype)
    return torch.cat((maps, gap), 3).transpose(1, 2).flatten(2)[..., :-1]


def strips(codes: torch.Tensor, unit_px: int) -> np.ndarray:
    """(n, d) codes as (n, TILE_PX, d * unit_px) heat strips: unit j is the j-th band."""
    return enlarge(codes.detach().float().cpu().numpy()[:, None, :], (TILE_PX, unit_px))


def enlarge(images: np.ndarray, factor: int | tuple[int, int] | None = None) -> np.ndarray:
    """(n, h, w) arrays enlarged by whole-pixel repetition: by `factor` (one for both axes or
    (rows, columns)), by default to about TILE_PX a side."""
    if factor is None:
        factor = max(1, TILE_PX // max(images.shape[1:]))
    rows, cols = (factor, factor) if isinstance(factor, int) else factor
    return images.repeat(rows, 1).repeat(cols, 2)


def tile(cells: list[list[np.ndarray]],
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


def show(ax, canvas: np.ndarray, **style):
    """One imshow of a composed canvas, gaps in light gray, no frame."""
    shown = ax.imshow(canvas, interpolation="nearest", **style)
    ax.set_facecolor("0.88")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    return shown


def explain(fig: Figure, title: str, caption: str) -> None:
    """The figure's title above it and, below it, how to read it (paragraphs split on newlines,
    wrapped to the figure's width)."""
    fig.suptitle(title, fontsize=11)
    chars = int(fig.get_figwidth() * DPI / 6.4)  # about a character's width at 8.5 points
    fig.supxlabel("\n".join(textwrap.fill(p, chars) for p in caption.split("\n")),
                  fontsize=8.5, x=0.01, ha="left", linespacing=1.3)


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


def layer_panel(columns: list[tuple[str, torch.Tensor, bool]], labels: list[str],
                limits: tuple[float, float], title: str, caption: str) -> Figure:
    """One row per sample and, side by side, one panel per (header, values, is_pixels) column:
    pixels as gray images on `limits`, codes on one symmetric diverging scale shared by every
    code panel, so that an input and its reconstruction compare unit by unit. Flat codes (n, d)
    are heat strips, one numbered band per unit; feature maps (n, h, w, from `maps_row`) are
    images. The panels are coloured here and drawn as one RGBA image in one axes: with an axes
    per panel, laying out their ticks took about half of the figure's drawing."""
    codes = [values for _, values, is_pixels in columns if not is_pixels]
    flat = [c for c in codes if c.ndim == 2]
    unit_px = int(np.clip(STRIPS_PX // max(sum(c.shape[1] for c in flat), 1), 2, 16))
    scale = math.ceil(100 * max(float(c.nan_to_num().abs().max()) for c in codes)) / 100
    strip_colours = ScalarMappable(Normalize(-scale, scale), DIVERGING)
    pixel_colours = ScalarMappable(Normalize(*limits), "gray")
    panels = []
    for _, values, is_pixels in columns:
        if is_pixels:
            cells = enlarge(as_images(values))
        elif values.ndim == 3:  # feature maps
            cells = enlarge(values.float().cpu().numpy(), max(1, TILE_PX // values.shape[1]))
        else:
            cells = strips(values, unit_px)
        canvas, centres_y, _ = tile([[cell] for cell in cells], pad=12)
        # NaN gaps map to the colour maps' transparent "bad" colour, so the background shows;
        # 8-bit colours, which matplotlib resamples several times faster than float ones.
        panels.append((pixel_colours if is_pixels else strip_colours).to_rgba(canvas,
                                                                              bytes=True))
    gap = np.zeros((panels[0].shape[0], PANEL_GAP, 4), dtype=np.uint8)
    lefts = np.cumsum([0] + [p.shape[1] + PANEL_GAP for p in panels[:-1]])
    canvas = np.concatenate([part for p in panels for part in (gap, p)][1:], axis=1)
    fig = Figure(figsize=(canvas.shape[1] / DPI + 2.6, canvas.shape[0] / DPI + 1.6), dpi=DPI,
                 layout="constrained")
    ax = fig.add_subplot()
    show(ax, canvas)
    ax.set_yticks(centres_y, labels, fontsize=9)
    ticks, minor = [], []
    for left, panel, (header, values, is_pixels) in zip(lefts, panels, columns, strict=True):
        ax.text(left + panel.shape[1] / 2, -6, header, ha="center", va="bottom", fontsize=9)
        if not is_pixels and values.ndim == 2:
            major, small = unit_ticks(values.shape[1], unit_px)
            ticks += [(left + x, label) for x, label in major]
            minor += [left + x for x in small]
    ax.set_xticks([x for x, _ in ticks], [label for _, label in ticks], fontsize=8)
    ax.set_xticks(minor, minor=True)
    ax.tick_params(axis="y", length=0)
    if flat:
        ax.set_xlabel("unit (numbered within each strip)", fontsize=8, labelpad=2)
    fig.colorbar(strip_colours, ax=ax, shrink=0.5, label="code value of the unit")
    explain(fig, title, caption)
    return fig


def unit_ticks(d: int, unit_px: int) -> tuple[list[tuple[float, str]], list[float]]:
    """Where a strip of d units, unit_px pixels each, puts its labelled ticks (positions and
    unit numbers) and its minor ticks, one per unit (every fifth when units are too narrow)."""
    locator = MaxNLocator(nbins=max(2, d * unit_px // 70), steps=[1, 2, 5, 10], integer=True)
    major = [int(u) for u in locator.tick_values(0, d - 1) if 0 <= u < d]
    centre = (unit_px - 1) / 2
    return ([(u * unit_px + centre, str(u)) for u in major],
            [u * unit_px + centre for u in range(0, d, 1 if unit_px >= 6 else 5)])


def image_pairs(originals: torch.Tensor, outputs: torch.Tensor, labels: list[str],
                titles: tuple[str, str], limits: tuple[float, float], title: str,
                caption: str) -> Figure:
    """Two rows of images (originals above, outputs below), one column per sample, gray on
    `limits`."""
    cells = [list(enlarge(as_images(v))) for v in (originals, outputs)]
    canvas, centres_y, centres_x = tile(cells, pad=12)
    h, w = canvas.shape
    fig = Figure(figsize=(max(w / DPI + 1.0, MIN_WIDTH), h / DPI + 0.8), dpi=DPI,
                 layout="constrained")
    ax = fig.add_subplot()
    show(ax, canvas, cmap="gray", vmin=limits[0], vmax=limits[1])
    ax.set_yticks(centres_y, list(titles), fontsize=9)
    ax.xaxis.tick_top()
    ax.set_xticks(centres_x, labels, fontsize=9)
    ax.tick_params(length=0)
    explain(fig, title, caption)
    return fig


def unit_grid(sets: list[torch.Tensor], title: str, caption: str) -> Figure:
    """Every unit of a layer in pixel space, one numbered cell per unit (unit 0 top left, row
    by row), each cell holding the unit's tile from every one of `sets` side by side (one set:
    a tile a cell). Each tile is divided by its own max |value| and drawn with a diverging map
    (red positive, blue negative, white zero): the normalisation that shows every unit's
    pattern whatever its scale."""
    tiles = np.stack([as_images(normalise_tiles(s)) for s in sets], 1)  # (units, sets, h, w)
    n, k, h, w = tiles.shape
    # About GRID_PX squared in all (so the 196 pairs of layer 1 stay at 28 pixels a tile).
    # (Small tiles, like 5 x 5 filters, may grow to about TILE_PX.)
    factor = int(np.clip(GRID_PX / (w * math.sqrt(n * k)), 1, max(5, TILE_PX // w)))
    gap = np.full((h * factor, 2 * factor), np.nan, dtype=np.float32)  # a cell's tiles apart
    band = np.full((LABEL_PX, (k * w + 2 * k - 2) * factor), np.nan, dtype=np.float32)
    cells = [np.vstack([band, np.hstack([c for t in enlarge(unit, factor) for c in (gap, t)][1:])])
             for unit in tiles]
    pad = 4 + 3 * factor  # wider than a cell's inner gaps, so that cells read as units
    height, width = cells[0].shape
    per_row = math.ceil(math.sqrt(n * (height + pad) / (width + pad)))  # a near-square canvas
    canvas, centres_y, centres_x = tile(
        [cells[i: i + per_row] for i in range(0, n, per_row)], pad=pad)
    fig = Figure(figsize=(max(canvas.shape[1] / DPI + 1.8, MIN_WIDTH + 2),
                          canvas.shape[0] / DPI + 1.4), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    colours = ScalarMappable(Normalize(-1, 1), DIVERGING)
    show(ax, colours.to_rgba(canvas, bytes=True))  # 8-bit colours: see layer_panel
    for j in range(n):
        # Left out of the layout: the numbers sit inside the axes, so measuring hundreds of them
        # on each layout pass would be wasted work.
        ax.text(centres_x[j % per_row] - width / 2, centres_y[j // per_row] - height / 2,
                str(j), fontsize=7, ha="left", va="top", in_layout=False)
    fig.colorbar(colours, ax=ax, shrink=0.5, label="value / max |value| of its tile")
    explain(fig, title, caption)
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
    fig.colorbar(shown, ax=ax, shrink=0.7, label="share of the true class (log scale)")
    explain(fig, title, "Rows: the true class; columns: the predicted class; each cell counts "
            "test images, the diagonal the correct ones. Colour: the cell's share of its row on "
            "a log scale, so that rare errors show.")
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
    explain(fig, "Top-layer codes of the test set, on their first two principal components",
            "Each dot: one test image, coloured by its true class. Axes: the two directions in "
            "which that stack's top-layer codes vary most (PCA of each panel's codes on its "
            "own). Classes that overlap here may still be apart in the code's other "
            "directions.")
    return fig


def kept_epoch(history: list[dict], monitor: str, mode: str) -> int | None:
    """The epoch whose weights a stage kept: the best `monitor` value (`mode` "max" or "min";
    the first of equal values, as the stage keeps only a strict improvement), or the last epoch
    when the stage was never validated; None when it trained no epoch."""
    scored = [(h[monitor], h["epoch"]) for h in history if monitor in h]
    if not scored:
        return history[-1]["epoch"] if history else None
    best = max(v for v, _ in scored) if mode == "max" else min(v for v, _ in scored)
    return next(epoch for v, epoch in scored if v == best)


def curves_figure(pretrain: list[list[dict]], classifiers: dict[str, list[dict]],
                  pretrain_monitor: tuple[str, str],
                  classifier_monitor: tuple[str, str]) -> Figure:
    """Per-epoch histories: each pretrained layer's training loss and validation metric, each
    classifier stage's training loss and validation metric; each `*_monitor` is the (metric,
    "max" or "min") its stages keep the best epoch of, and a star marks that kept epoch."""
    fig = Figure(figsize=(14, 4.6), layout="constrained")
    recon, loss, acc = fig.subplots(1, 3)
    monitor, mode = pretrain_monitor
    for k, history in enumerate(pretrain, start=1):
        line = _plot_history(recon, history, "train_loss", f"layer {k} train")
        if line is not None:
            val = _plot_history(recon, history, monitor, f"layer {k} val",
                                color=line.get_color(), ls="--")
            # Never validated: the last epoch is kept, starred on the training curve.
            _mark_kept(recon, history, monitor if val else "train_loss",
                       kept_epoch(history, monitor, mode), line.get_color())
    monitor, mode = classifier_monitor
    for name, history in classifiers.items():
        line = _plot_history(loss, history, "train_loss", name)
        if line is not None:
            epoch = kept_epoch(history, monitor, mode)
            _plot_history(acc, history, monitor, name, color=line.get_color())
            _mark_kept(loss, history, "train_loss", epoch, line.get_color())
            _mark_kept(acc, history, monitor, epoch, line.get_color())
    kept = Line2D([], [], marker="*", ms=11, ls="", mfc="none", mec="black",
                  label="kept epoch (best val.,\nelse the last)")
    for ax, title, ylabel in ((recon, "greedy pretraining", "reconstruction loss / MSE"),
                              (loss, "classifiers: training loss", "cross-entropy"),
                              (acc, "classifiers: validation accuracy", "accuracy")):
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
        if ax.lines:
            ax.legend(handles=[*ax.get_legend_handles_labels()[0], kept], fontsize=8)
    recon.set_yscale("log")
    loss.set_yscale("log")
    explain(fig, "Training curves of every stage",
            "Solid: training loss per epoch; dashed (pretraining): validation reconstruction "
            "MSE. Star: the epoch whose weights the stage kept, its best validation epoch (the "
            "last one when it has no validation split): the test numbers, and the stages that "
            "start from this one, use those weights.")
    return fig


def _plot_history(ax, history: list[dict], key: str, label: str, **style):
    """One line of `key` against epoch, or None when the history never recorded it."""
    points = [(h["epoch"], h[key]) for h in history if key in h]
    if not points:
        return None
    epochs, values = zip(*points, strict=True)
    return ax.plot(epochs, values, marker="." if len(points) < 30 else None, label=label,
                   **style)[0]


def _mark_kept(ax, history: list[dict], key: str, epoch: int, color) -> None:
    """A star on the `key` curve at the kept `epoch` (none where that epoch has no `key`)."""
    values = [h[key] for h in history if h["epoch"] == epoch and key in h]
    if values:
        ax.plot([epoch], values, marker="*", ms=13, color=color, mec="black", mew=0.8, ls="",
                zorder=3, label="_kept")
