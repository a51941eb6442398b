"""What each kind of autoencoder makes of the model config, without building anything: the shape
of every layer's codes, the keys each layer reads, the front door's shape checks and the work and
weights the cost estimates count. The networks themselves are in saelab.nn.networks
(`AUTOENCODERS`, the same kinds).

Every layer's codes travel as flat rows, whatever their shape: a shape here is (units,) for a
dense layer and (channels, height, width) for a convolutional one; `sizes` are their products.
"""

from __future__ import annotations

from math import prod

from saelab.config.schema import Kind
from saelab.errors import ConfigError

IMAGE = (1, 28, 28)  # the input of a convolutional stack: one channel of 28 x 28 pixels


class Dense:
    """Layer k maps model.sizes[k-1] units to model.sizes[k]."""

    keys = ("model.sizes",)

    @staticmethod
    def shapes(model, n: int | None = None) -> list[tuple[int, ...]]:
        n = len(model.sizes) - 1 if n is None else n
        return [(int(model.sizes[i]),) for i in range(n + 1)]

    @staticmethod
    def layer_keys(k: int) -> tuple[str, ...]:
        return f"model.sizes.{k - 1}", f"model.sizes.{k}"

    @staticmethod
    def check(model) -> None:
        sizes = list(model.sizes)
        if len(sizes) < 2:
            raise ConfigError("model.sizes", sizes, "needs at least 2 sizes (input, one hidden)")
        if sizes[0] != prod(IMAGE):
            raise ConfigError("model.sizes", sizes, "must start at the input size 784 (28x28)")

    @staticmethod
    def macs(model, k: int) -> int:
        """Multiply-adds of layer k's encoder, per sample."""
        return int(model.sizes[k - 1]) * int(model.sizes[k])

    @staticmethod
    def weights(model, k: int) -> tuple[int, int]:
        """Weights and biases of layer k's encoder and of its decoder."""
        a, b = int(model.sizes[k - 1]), int(model.sizes[k])
        return (a + 1) * b, (b + 1) * a


class Conv:
    """Layer k convolves model.conv.channels[k-2] maps (the image for k = 1) into
    model.conv.channels[k-1] maps with a square kernel of side kernels[k-1] and 'same' padding,
    then max-pools them by pools[k-1]."""

    keys = ("model.conv.channels", "model.conv.kernels", "model.conv.pools")

    @staticmethod
    def shapes(model, n: int | None = None) -> list[tuple[int, ...]]:
        conv = model.conv
        out = [IMAGE]
        # (A config not yet checked may list fewer kernels or pools than channels: as many
        # layers as every list describes.)
        if n is None:
            n = min(len(conv.channels), len(conv.kernels), len(conv.pools))
        for i in range(n):
            out.append((int(conv.channels[i]), out[-1][1] // conv.pools[i],
                        out[-1][1] // conv.pools[i]))
        return out

    @staticmethod
    def layer_keys(k: int) -> tuple[str, ...]:
        # The layers below it set its input's channels and side.
        return tuple(f"model.conv.{key}.{i}" for key in ("channels", "kernels", "pools")
                     for i in range(k))

    @staticmethod
    def check(model) -> None:
        conv = model.conv
        n = len(conv.channels)
        for key in ("kernels", "pools"):
            if len(conv[key]) != n:
                raise ConfigError(f"model.conv.{key}", list(conv[key]), f"must list {n} values, "
                                  f"one per layer of model.conv.channels")
        for i, kernel in enumerate(conv.kernels):
            if kernel % 2 == 0:
                raise ConfigError(f"model.conv.kernels.{i}", kernel,
                                  "must be odd ('same' padding keeps the maps' side)")
        side = IMAGE[1]
        for i, pool in enumerate(conv.pools):
            if side % pool:
                raise ConfigError(f"model.conv.pools.{i}", pool, f"must divide the side of the "
                                  f"maps it pools, {side} (layer {i + 1}: 28 x 28 pooled by the "
                                  f"layers below)")
            side //= pool

    @staticmethod
    def macs(model, k: int) -> int:
        (c_in, c_out), kernel = Conv.channels(model, k), model.conv.kernels[k - 1]
        side = Conv.shapes(model, k - 1)[-1][1]  # convolved at its input's side, then pooled
        return int(c_in * c_out * kernel * kernel * side * side)

    @staticmethod
    def weights(model, k: int) -> tuple[int, int]:
        (c_in, c_out), kernel = Conv.channels(model, k), int(model.conv.kernels[k - 1])
        return c_in * kernel * kernel * c_out + c_out, c_out * kernel * kernel * c_in + c_in

    @staticmethod
    def channels(model, k: int) -> tuple[int, int]:
        """Layer k's input and output channels."""
        return Conv.shapes(model, k - 1)[-1][0], int(model.conv.channels[k - 1])


KINDS = {Kind.dense: Dense, Kind.conv: Conv}


def kind_of(model):
    """The kind of `model` (a config's `model` group, or a stage's view of it)."""
    return KINDS[Kind(model.kind)]


def shapes(model, n: int | None = None) -> list[tuple[int, ...]]:
    """The shape of the input, then of each hidden layer's codes (the first `n` layers')."""
    return kind_of(model).shapes(model, n)


def sizes(model, n: int | None = None) -> list[int]:
    """The flat size of the input, then of each hidden layer's codes (the first `n` layers')."""
    return [prod(shape) for shape in shapes(model, n)]


def depth(model) -> int:
    """Hidden layers."""
    return len(shapes(model)) - 1


def model_keys(model) -> tuple[str, ...]:
    """Every key the whole stack's architecture reads: its kind, its layers, their activation."""
    return ("model.kind", *kind_of(model).keys, "model.activation")
