"""The networks: one autoencoder per hidden layer, of a kind (`AUTOENCODERS`: dense or
convolutional), and the stacked network their encoders make. Every layer's codes are flat rows,
whatever their shape (saelab.config.kinds).

`StackedNet` is the one type every deep network here is: the pixel baseline (no encoder), a probe's
head, the pretrained stack, the fine-tuned and the scratch networks. Whoever needs a part of one
(the codes of layer k, the pre-activation a unit's maximiser drives, the head) asks it by name;
nothing outside this module indexes into a network.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import islice, pairwise
from math import prod

import torch
from torch import nn
from torch.nn import functional as F

from saelab.config.kinds import Conv
from saelab.config.schema import Kind

ACTIVATIONS = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "relu": nn.ReLU}
# Each activation's derivative, written with its output h: what the encoder's Jacobian needs.
SLOPES = {nn.Tanh: lambda h: 1 - h * h, nn.Sigmoid: lambda h: h * (1 - h),
          nn.ReLU: lambda h: (h > 0).to(h.dtype)}


class LayerAutoEncoder(nn.Module):
    """What every kind of autoencoder shares: its `encoder` (a module from flat inputs to flat
    pre-activations, with `in_features` and `out_features`), the activation, and a decoder of its
    own (`decoder()` builds it, after the encoder, in the order the random stream draws them) or,
    with `tied`, the encoder's weights and a bias of `bias` values of its own. Each kind says how
    it decodes (`decode`, `decoder_weight`)."""

    def __init__(self, encoder: nn.Module, activation: str, tied: bool,
                 decoder: Callable[[], nn.Module], bias: int):
        super().__init__()
        self.encoder = encoder
        self.activation_name = activation
        self.activation = ACTIVATIONS[activation]()
        self.tied = tied
        if tied:
            self.decoder_bias = nn.Parameter(torch.zeros(bias))
        else:
            self.decoder = decoder()

    @property
    def sizes(self) -> tuple[int, int]:
        """(inputs, codes), flat."""
        return self.encoder.in_features, self.encoder.out_features

    @property
    def decoder_bias_vector(self) -> torch.Tensor:
        return self.decoder_bias if self.tied else self.decoder.bias

    def decode(self, h: torch.Tensor, bias: bool = True) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.encoder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


class AutoEncoder(LayerAutoEncoder):
    """Linear(d_in, d_out) -> activation -> Linear(d_out, d_in), the decoder output left linear.

    With `tied`, the decoder reuses the encoder's weight transposed (same storage) and keeps its own
    bias. `decoder_weight` and `decoder_bias_vector` give the decoder's affine map either way, which
    the visualisations use to decode codes back to pixels.
    """

    def __init__(self, d_in: int, d_out: int, activation: str = "tanh", tied: bool = False):
        super().__init__(nn.Linear(d_in, d_out), activation, tied,
                         lambda: nn.Linear(d_out, d_in), d_in)

    @classmethod
    def of(cls, model, k: int) -> AutoEncoder:
        """Layer k as `model` (the config's model group, or a stage's view of it) declares it."""
        return cls(model.sizes[k - 1], model.sizes[k], model.activation, model.tied)

    @property
    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of its inputs and of its codes."""
        return (self.sizes[0],), (self.sizes[1],)

    @property
    def units(self) -> torch.Tensor:
        """The code units the pictures show, one per feature: here every unit."""
        return torch.arange(self.sizes[1])

    @property
    def filters(self) -> torch.Tensor | None:
        """Filters to picture as images of their own, one row each (a dense layer has none)."""
        return None

    def untrained(self) -> AutoEncoder:
        """A new untied autoencoder of its shape, its weights drawn from the random stream (the
        draws that saelab 0.3 made where scratch's starting network is rebuilt)."""
        return AutoEncoder(*self.sizes, self.activation_name)

    def new_encoder(self) -> nn.Module:
        """A new encoder of its shape (weights drawn from the random stream)."""
        return nn.Linear(*self.sizes)

    @property
    def decoder_weight(self) -> torch.Tensor:
        return self.encoder.weight.t() if self.tied else self.decoder.weight

    def decode(self, h: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """The reconstruction's logits (its values, with the mse loss); `bias=False`: the
        decoder's linear part alone (what the pictures decode features with)."""
        return F.linear(h, self.decoder_weight, self.decoder_bias_vector if bias else None)

    def contraction(self, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """The squared Frobenius norm of the encoder's Jacobian at each input `x`, ||dh/dx||^2,
        averaged over the minibatch, from the inputs' `codes` h (Rifai et al. 2011). In closed
        form: row j of the Jacobian is s'(a_j) times row j of W, so the norm is
        sum_j s'(a_j)^2 ||W_j||^2, one matrix-vector product instead of d_in backward passes."""
        slope = SLOPES[type(self.activation)](codes)
        return ((slope * slope) @ self.encoder.weight.pow(2).sum(1)).mean()


class ConvEncoder(nn.Module):
    """Flat maps in, flat maps out: the input rows unflattened to `shape_in` (channels, side,
    side), convolved ('same' padding), max-pooled by `pool`, flattened again. Pooling comes
    before the activation (the stack applies it): for a non-decreasing activation that is the
    usual convolution -> activation -> pooling, and the layer keeps the dense one's contract
    (an affine-like map, then the activation)."""

    def __init__(self, shape_in: tuple[int, int, int], channels: int, kernel: int, pool: int):
        super().__init__()
        self.shape_in, self.pool = tuple(shape_in), pool
        self.conv = nn.Conv2d(shape_in[0], channels, kernel, padding=kernel // 2)
        side = shape_in[1] // pool
        self.shape_out = (channels, side, side)
        self.in_features, self.out_features = prod(self.shape_in), prod(self.shape_out)

    @property
    def weight(self) -> torch.Tensor:
        """The filters: (channels out, channels in, side, side)."""
        return self.conv.weight

    def maps(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution's maps, before pooling: (N, channels, side, side)."""
        return self.conv(x.unflatten(1, self.shape_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.maps(x)
        return (F.max_pool2d(y, self.pool) if self.pool > 1 else y).flatten(1)


class ConvAutoEncoder(LayerAutoEncoder):
    """A convolutional autoencoder (Masci et al. 2011): ConvEncoder -> activation; the decoder
    unpools (each code fills its pooling window) and convolves back to the input's channels by a
    transposed convolution, its output left linear. With `tied`, the transposed convolution uses
    the encoder's filters (flipped, as a transposed convolution does) and keeps its own bias."""

    def __init__(self, shape_in: tuple[int, int, int], channels: int, kernel: int, pool: int,
                 activation: str = "tanh", tied: bool = False):
        super().__init__(ConvEncoder(shape_in, channels, kernel, pool), activation, tied,
                         lambda: nn.ConvTranspose2d(channels, shape_in[0], kernel,
                                                    padding=kernel // 2), shape_in[0])
        self.kernel, self.pool = kernel, pool

    @classmethod
    def of(cls, model, k: int) -> ConvAutoEncoder:
        """Layer k as `model` (the config's model group, or a stage's view of it) declares it."""
        return cls(Conv.shapes(model, k - 1)[-1], model.conv.channels[k - 1],
                   model.conv.kernels[k - 1], model.conv.pools[k - 1], model.activation,
                   model.tied)

    @property
    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return self.encoder.shape_in, self.encoder.shape_out

    @property
    def units(self) -> torch.Tensor:
        """One unit per channel, the one at the centre of its map: the pictures show channels
        (every unit of a channel applies the same filter, shifted)."""
        channels, side, _ = self.encoder.shape_out
        return torch.arange(channels) * side * side + (side // 2) * side + side // 2

    @property
    def decoder_weight(self) -> torch.Tensor:
        return self.encoder.weight if self.tied else self.decoder.weight

    @property
    def filters(self) -> torch.Tensor | None:
        """The filters, one flat square per row, where they see the pixels themselves (one input
        channel: layer 1); None above, where a filter spans many maps."""
        weight = self.encoder.weight
        return weight.flatten(1) if weight.shape[1] == 1 else None

    def untrained(self) -> ConvAutoEncoder:
        return ConvAutoEncoder(self.encoder.shape_in, self.encoder.shape_out[0], self.kernel,
                               self.pool, self.activation_name)

    def new_encoder(self) -> nn.Module:
        return ConvEncoder(self.encoder.shape_in, self.encoder.shape_out[0], self.kernel,
                           self.pool)

    def decode(self, h: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """The reconstruction's logits, flat; `bias=False`: without the decoder's bias."""
        maps = h.unflatten(1, self.encoder.shape_out)
        if self.pool > 1:
            maps = F.interpolate(maps, scale_factor=self.pool, mode="nearest")
        return F.conv_transpose2d(maps, self.decoder_weight,
                                  self.decoder_bias_vector if bias else None,
                                  padding=self.kernel // 2).flatten(1)

    def contraction(self, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """||dh/dx||^2 averaged over the minibatch, in closed form. Unit (c, i, j) is s'(a)
        times one position of the convolution, the one its pooling window kept; that row of the
        Jacobian is filter c placed there, cut by the image's border (the zero padding), so its
        squared norm is the squared filter summed over the positions inside the input: one
        convolution of an all-ones input by the squared filters gives it at every position, and
        pooling's argmax picks each unit's."""
        slope = SLOPES[type(self.activation)](codes)
        enc = self.encoder
        inside = F.conv2d(torch.ones((1, *enc.shape_in), device=x.device, dtype=x.dtype),
                          enc.weight.pow(2), padding=self.kernel // 2)[0].flatten(1)  # (C, H*W)
        if self.pool > 1:
            with torch.no_grad():
                _, where = F.max_pool2d(enc.maps(x), self.pool, return_indices=True)
            norms = inside[torch.arange(len(inside), device=x.device)[:, None],
                           where.flatten(2)].flatten(1)  # (N, C*h*w)
        else:
            norms = inside.flatten()
        return (slope * slope * norms).sum(1).mean()


# Each kind's autoencoder (its shapes and keys: saelab.config.kinds.KINDS).
AUTOENCODERS = {Kind.dense: AutoEncoder, Kind.conv: ConvAutoEncoder}


class StackedNet(nn.Module):
    """Encoders stacked in the flat sizes `sizes` (784, 196, ...: layer k maps sizes[k-1] to
    sizes[k], then the activation), topped by a linear head giving `n_classes` logits (no head
    when None: a stack that only computes codes). With `sizes` of one entry it is a linear
    classifier. The encoders are Linear layers unless given (`encoders`: a convolutional stack's).

    Parameters are created encoders first, bottom up, then the head: the order in which their
    initial weights are drawn from the random stream (and the order saelab 0.3 drew them in).
    """

    def __init__(self, sizes: list[int], n_classes: int | None, activation: str = "tanh",
                 encoders: list[nn.Module] | None = None):
        super().__init__()
        self.sizes = [int(s) for s in sizes]
        # Dense layers unless given (a convolutional stack's ConvEncoders): any module mapping
        # layer k-1's flat codes to layer k's pre-activations.
        self.encoders = nn.ModuleList(encoders if encoders is not None else
                                      (nn.Linear(a, b) for a, b in pairwise(self.sizes)))
        self.activation = ACTIVATIONS[activation]()
        self.head = nn.Linear(self.sizes[-1], n_classes) if n_classes is not None else None

    @classmethod
    def from_autoencoders(cls, autoencoders: list[LayerAutoEncoder], n_classes: int | None
                          ) -> StackedNet:
        """The stack of `autoencoders`' encoders (copies of their weights), with a fresh head."""
        sizes = [autoencoders[0].sizes[0], *(ae.sizes[1] for ae in autoencoders)]
        encoders = [ae.new_encoder() for ae in autoencoders]
        for encoder, ae in zip(encoders, autoencoders, strict=True):
            encoder.load_state_dict(ae.encoder.state_dict())
        return cls(sizes, n_classes, autoencoders[0].activation_name, encoders)

    @property
    def depth(self) -> int:
        """Hidden layers."""
        return len(self.encoders)

    def encoder_parameters(self) -> list[nn.Parameter]:
        return [p for encoder in self.encoders for p in encoder.parameters()]

    def layer(self, codes: torch.Tensor, k: int) -> torch.Tensor:
        """Layer k's codes (1 = the first hidden layer) from layer k-1's (the input for k=1)."""
        return self.activation(self.encoders[k - 1](codes))

    def codes(self, x: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """The codes of hidden layer `layer` (default: the top one; 0: the input itself)."""
        # Iterating the encoders (not indexing them) keeps a training step's overhead that of a
        # Sequential's forward.
        for encoder in islice(self.encoders, layer):
            x = self.activation(encoder(x))
        return x

    def pre_activation(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Layer `layer`'s units before their activation."""
        return self.encoders[layer - 1](self.codes(x, layer - 1))

    def forward(self, x: torch.Tensor, p_input: float = 0.0, p_hidden: float = 0.0
                ) -> torch.Tensor:
        """Class logits (a stack without a head: its top codes); with dropout of the inputs
        (`p_input`) and of every hidden layer's codes (`p_hidden`) when training asks for it."""
        if p_input or p_hidden:
            x = F.dropout(x, p_input)
            for encoder in self.encoders:
                x = F.dropout(self.activation(encoder(x)), p_hidden)
        else:
            x = self.codes(x)
        return x if self.head is None else self.head(x)
