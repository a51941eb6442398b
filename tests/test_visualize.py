"""The figure mathematics: decoded features, activation maximisation, PCA and panel layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from saelab import visualize as vis
from saelab.autoencoder import AutoEncoder, stack_encoders


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
    body = stack_encoders(aes)
    for k, n_units in ((2, 25), (3, 9)):
        pre = body[: 2 * k - 1]
        kwargs = dict(lr=0.05, norm=norm, bounds=bounds, seed=3)
        start = vis.activation_maximisation(pre, 784, n_units, steps=0, **kwargs)
        best = vis.activation_maximisation(pre, 784, n_units, steps=100, **kwargs)
        with torch.no_grad():
            before = body[: 2 * k](start).diagonal()
            after = body[: 2 * k](best).diagonal()
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
    body = stack_encoders(aes)
    best = vis.activation_maximisation(body[:1], 784, 49, steps=100, lr=0.05, norm=1.0,
                                       bounds=(-1.0, 1.0))
    cosine = F.cosine_similarity(best, body[0].weight.detach(), dim=1)
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


@pytest.mark.parametrize("d, shape", [(784, (28, 28)), (196, (14, 14)), (49, (7, 7)),
                                      (25, (5, 5)), (9, (3, 3)), (30, (1, 30)),
                                      (300, (17, 18))])
def test_grid_shape_squares_strips_and_wraps(d, shape):
    assert vis.grid_shape(d) == shape
    images = vis.as_images(torch.arange(float(d)).reshape(1, d))
    assert images.shape == (1, *shape)
    assert np.isnan(images).sum() == shape[0] * shape[1] - d


@pytest.mark.parametrize("d_in, d_code", [(784, 196), (196, 49), (49, 30), (25, 9)])
def test_layer_panel_cells_follow_the_layer_sizes(d_in, d_code):
    n = 3
    inputs, codes = torch.rand(n, d_in) * 2 - 1, torch.rand(n, d_code) * 2 - 1
    fig = vis.layer_panel(inputs, codes, inputs.flip(1), [str(i) for i in range(n)], 2, (-1, 1))
    canvas = fig.axes[0].images[0].get_array().filled(np.nan)
    sizes = [vis.enlarge(vis.as_images(v[:1])).shape[1:] for v in (inputs, codes, inputs)]
    # each row holds the three enlarged images, their values intact, and nothing else
    assert np.isfinite(canvas).sum() == n * sum(h * w for h, w in sizes)
    assert canvas.shape[0] == n * max(h for h, _ in sizes) + (n - 1) * 12
    assert canvas.shape[1] == sum(w for _, w in sizes) + 2 * 12
    first = vis.enlarge(vis.as_images(inputs[:1]))[0]
    top = (max(h for h, _ in sizes) - first.shape[0]) // 2
    np.testing.assert_array_equal(canvas[top: top + first.shape[0], : first.shape[1]], first)


def test_tile_grid_normalises_each_tile_symmetrically():
    tiles = torch.randn(9, 49) * torch.logspace(-3, 3, 9)[:, None]
    normalised = vis.normalise_tiles(tiles)
    torch.testing.assert_close(normalised.abs().amax(1), torch.ones(9))
    assert torch.equal(normalised.sign(), tiles.sign())
    canvas = vis.tile_grid(tiles, "t").axes[0].images[0].get_array().filled(np.nan)
    assert np.nanmax(np.abs(canvas)) == pytest.approx(1.0)
    scale = (np.isfinite(canvas).sum() / (9 * 49)) ** 0.5  # every value enlarged alike
    assert scale == int(scale) >= 2
