"""The figure mathematics: decoded features, activation maximisation, PCA and panel layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from torch.nn import functional as F

from saelab.nn.networks import AutoEncoder, StackedNet
from saelab.report import figures as vis


def autoencoders(sizes: list[int], dtype=torch.float32, tied=(False,)) -> list[AutoEncoder]:
    """Seeded autoencoders with non-zero decoder biases (so that removing them matters)."""
    torch.manual_seed(0)
    aes = [AutoEncoder(a, b, tied=tied[i % len(tied)]).to(dtype)
           for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))]
    with torch.no_grad():
        for ae in aes:
            ae.decoder_bias_vector.uniform_(-1, 1)
    return aes


def test_unit_features_are_the_column_chain_of_the_decoder_weights():
    aes = autoencoders([784, 49, 25, 9], torch.float64, tied=(False, True))
    for k in range(1, len(aes) + 1):
        product = aes[0].decoder_weight
        for ae in aes[1:k]:
            product = product @ ae.decoder_weight  # (784, d_k): W_dec1 @ ... @ W_deck
        features = vis.unit_features(aes[:k])
        assert features.shape == (aes[k - 1].encoder.out_features, 784)
        for j in range(features.shape[0]):
            torch.testing.assert_close(features[j], product[:, j], rtol=1e-12, atol=1e-12)
        # With the biases kept the decoded one-hot codes differ: the biases really are removed.
        eye = torch.eye(features.shape[0], dtype=torch.float64)
        assert not torch.allclose(vis.decode_stack(aes[:k], eye), features, atol=1e-3)


def test_decode_stack_applies_every_decoder_in_reverse_order():
    aes = autoencoders([784, 49, 9])
    codes = torch.randn(5, 9)
    expected = aes[0].decode(aes[1].decode(codes))
    torch.testing.assert_close(vis.decode_stack(aes, codes), expected)
    torch.testing.assert_close(vis.decode_stack(aes, codes, bias=False),
                               F.linear(F.linear(codes, aes[1].decoder_weight),
                                        aes[0].decoder_weight))


@pytest.mark.parametrize("bounds, norm", [((-1.0, 1.0), 10.0), ((-1.0, 1.0), 40.0),
                                          ((0.0, 1.0), 8.0)])
def test_activation_maximisation_raises_every_unit_within_the_bounds(bounds, norm):
    aes = autoencoders([784, 49, 25, 9])
    body = StackedNet.from_autoencoders(aes, None)
    for k, n_units in ((2, 25), (3, 9)):
        def pre(x, k=k):
            return body.pre_activation(x, k)

        kwargs = dict(lr=0.05, norm=norm, bounds=bounds, seed=3)
        start = vis.activation_maximisation(pre, 784, n_units, steps=0, **kwargs)
        best = vis.activation_maximisation(pre, 784, n_units, steps=100, **kwargs)
        with torch.no_grad():
            before = body.codes(start, k).diagonal()
            after = body.codes(best, k).diagonal()
        assert (after > before).all()
        assert (after - before).min() > 0.05  # a real climb, not rounding
        assert (best.norm(dim=1) <= norm * (1 + 1e-5)).all()
        assert best.min() >= bounds[0] and best.max() <= bounds[1]
    if norm == 40.0:  # a ball this large reaches the box: the box constraint is active
        assert (best.abs() == 1).any()


def test_activation_maximisation_of_a_linear_unit_finds_its_weight_direction():
    """For unit j of the first layer the maximiser over the L2 ball is norm * w_j / |w_j|
    (a norm of 1 keeps every pixel inside [-1, 1], so the box is inactive)."""
    aes = autoencoders([784, 49])
    body = StackedNet.from_autoencoders(aes, None)
    best = vis.activation_maximisation(body.encoders[0], 784, 49, steps=100, lr=0.05, norm=1.0,
                                       bounds=(-1.0, 1.0))
    cosine = F.cosine_similarity(best, body.encoders[0].weight.detach(), dim=1)
    assert cosine.min() > 0.9999
    torch.testing.assert_close(best.norm(dim=1), torch.ones(49))


def test_pca_2d_gives_the_two_largest_variances_in_order():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 4, generator=gen) * torch.tensor([1.0, 3.0, 0.5, 2.0])
    rotation = torch.linalg.qr(torch.randn(4, 4, generator=gen))[0]
    points = vis.pca_2d(x @ rotation + 7.0)
    eigenvalues = torch.linalg.eigvalsh(torch.cov((x @ rotation).T.double())).flip(0)
    torch.testing.assert_close(points.double().var(0), eigenvalues[:2], rtol=1e-4, atol=0)
    assert abs(float(points[:, 0] @ points[:, 1])) < 1e-2 * len(points)


def test_as_images_draws_only_square_pixel_vectors():
    images = vis.as_images(torch.arange(784.0).reshape(1, 784))
    assert images.shape == (1, 28, 28) and images[0, 1, 0] == 28  # row-major, as MNIST
    with pytest.raises(ValueError, match="not a square image"):
        vis.as_images(torch.zeros(2, 196 + 1))


@pytest.mark.parametrize("d_in, d_code", [(196, 49), (49, 25), (25, 9)])
def test_layer_panel_draws_codes_as_numbered_strips_aligned_with_the_images(d_in, d_code):
    n, gap = 3, 12  # samples, and the pixels between their rows
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(n, 784, generator=gen) * 2 - 1
    inputs, codes = torch.randn(n, d_in, generator=gen), torch.randn(n, d_code, generator=gen)
    columns = [("test image", images, True), ("input", inputs, False), ("code", codes, False),
               ("output", inputs.flip(1), False)]
    fig = vis.layer_panel(columns, [f"sample {i}" for i in range(n)], (-1, 1), "T", "how")
    ax, colorbar = fig.axes
    canvas = ax.images[0].get_array()  # (height, width, RGBA) bytes
    assert canvas.shape[0] == n * vis.TILE_PX + (n - 1) * gap
    assert [t.get_text() for t in ax.texts] == [header for header, _, _ in columns]
    low, high = colorbar.get_ylim()  # one symmetric scale, wide enough for every strip
    assert -low == high >= max(float(v.abs().max()) for _, v, _ in columns[1:])
    colours = ScalarMappable(Normalize(low, high), vis.DIVERGING)
    image = ScalarMappable(Normalize(-1, 1), "gray").to_rgba(
        vis.enlarge(vis.as_images(images))[1], bytes=True)
    top = vis.TILE_PX + gap  # the second sample's row
    np.testing.assert_array_equal(canvas[top: top + vis.TILE_PX, : image.shape[1]], image)
    # The tick labels number each strip's units from 0, under the band of the unit they name.
    ticks = [(t.get_position()[0], int(t.get_text())) for t in ax.get_xticklabels()]
    starts = [i for i, (_, unit) in enumerate(ticks) if unit == 0] + [len(ticks)]
    assert len(starts) == 4
    for (_, values, _), first, end in zip(columns[1:], starts[:-1], starts[1:], strict=True):
        (x0, _), (x1, u1) = ticks[first: first + 2]
        unit_px = (x1 - x0) / u1
        assert unit_px == int(unit_px) >= 2
        left = x0 - (unit_px - 1) / 2
        assert max(unit for _, unit in ticks[first:end]) < values.shape[1]
        for row in range(n):
            strip = canvas[row * top: row * top + vis.TILE_PX,
                           int(left): int(left + values.shape[1] * unit_px)]
            assert (strip == strip[:1]).all()  # a strip: every pixel row alike
            np.testing.assert_array_equal(strip[0, :: int(unit_px)],
                                          colours.to_rgba(values[row].numpy(), bytes=True))
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"sample {i}" for i in range(n)]
    assert fig.get_suptitle() == "T" and fig.get_supxlabel() == "how"


@pytest.mark.parametrize("n, sets", [(9, 1), (49, 2)])
def test_unit_grid_numbers_every_cell_above_the_tiles_of_its_unit(n, sets):
    gen = torch.Generator().manual_seed(n)
    tiles = [torch.randn(n, 784, generator=gen) * 10 ** i for i in range(sets)]
    fig = vis.unit_grid(tiles, "T", "how")
    ax = fig.axes[0]
    canvas = ax.images[0].get_array()  # (height, width, RGBA) bytes, transparent gaps
    labels = {int(t.get_text()): t.get_position() for t in ax.texts}
    assert sorted(labels) == list(range(n))
    side = round(((canvas[..., 3] > 0).sum() / (n * sets * 784)) ** 0.5) * 28  # enlarged tile
    factor = side // 28
    colours = ScalarMappable(Normalize(-1, 1), vis.DIVERGING)  # each tile on its own max |value|
    expected = [colours.to_rgba(vis.normalise_tiles(t).numpy(), bytes=True).reshape(n, 28, 28, 4)
                for t in tiles]
    for j, (x, y) in labels.items():
        top, left = round(y) + vis.LABEL_PX, round(x)
        for s in range(sets):  # side by side, 2 * `factor` pixels apart
            shown = canvas[top: top + side, left + s * (side + 2 * factor):][:, :side]
            np.testing.assert_array_equal(shown[::factor, ::factor], expected[s][j])
    assert fig.get_suptitle() == "T" and fig.get_supxlabel() == "how"


def test_tile_normalisation_keeps_each_tiles_sign_pattern():
    tiles = torch.randn(9, 49) * torch.logspace(-3, 3, 9)[:, None]
    normalised = vis.normalise_tiles(tiles)
    torch.testing.assert_close(normalised.abs().amax(1), torch.ones(9))
    assert torch.equal(normalised.sign(), tiles.sign())


def test_kept_epoch_is_the_best_validation_epoch_else_the_last():
    accs = [{"epoch": e, "train_loss": 1 / e, "val_acc": a}
            for e, a in enumerate([0.5, 0.9, 0.7, 0.9], start=1)]
    assert vis.kept_epoch(accs, "val_acc", "max") == 2  # the first of equal bests
    mses = [{"epoch": e, "train_loss": 1.0, "val_recon_mse": v}
            for e, v in enumerate([0.3, 0.1, 0.2], start=1)]
    assert vis.kept_epoch(mses, "val_recon_mse", "min") == 2
    unvalidated = [{"epoch": e, "train_loss": 1.0} for e in (1, 2, 3)]
    assert vis.kept_epoch(unvalidated, "val_acc", "max") == 3
    assert vis.kept_epoch([], "val_acc", "max") is None


def test_curves_have_integer_epochs_and_star_each_kept_epoch():
    layer = [{"epoch": e, "train_loss": 1 / e, "val_recon_mse": [0.3, 0.1, 0.2][e - 1]}
             for e in (1, 2, 3)]
    unvalidated_layer = [{"epoch": e, "train_loss": 1 / e} for e in (1, 2, 3, 4)]
    classifiers = {"probe": [{"epoch": e, "train_loss": 1 / e, "val_acc": a}
                             for e, a in enumerate([0.5, 0.9, 0.7, 0.8, 0.6], start=1)]}
    fig = vis.curves_figure([layer, unvalidated_layer], classifiers,
                            ("val_recon_mse", "min"), ("val_acc", "max"))
    recon, loss, acc = fig.axes
    vis.render(fig)
    for ax in (recon, loss, acc):
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
        assert ax.get_xlabel() == "epoch" and ax.get_title() and ax.get_ylabel()
        assert "kept epoch" in ax.get_legend().texts[-1].get_text()

    def stars(ax):
        return sorted((float(line.get_xdata()[0]), float(line.get_ydata()[0]))
                      for line in ax.lines if line.get_marker() == "*")

    # layer 1 at its best validation MSE, the unvalidated layer 2 at its last training loss
    assert stars(recon) == [(2.0, 0.1), (4.0, 0.25)]
    assert stars(acc) == [(2.0, 0.9)]
    assert stars(loss) == [(2.0, 0.5)]  # the same epoch on the training loss
