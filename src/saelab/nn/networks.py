"""The networks: one autoencoder per hidden layer, and the stacked network their encoders make.

`StackedNet` is the one type every deep network here is: the pixel baseline (no encoder), a probe's
head, the pretrained stack, the fine-tuned and the scratch networks. Whoever needs a part of one
(the codes of layer k, the pre-activation a unit's maximiser drives, the head) asks it by name;
nothing outside this module indexes into a network.
"""

from __future__ import annotations

from itertools import islice, pairwise

import torch
from torch import nn
from torch.nn import functional as F

ACTIVATIONS = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "relu": nn.ReLU}
# Each activation's derivative, written with its output h: what the encoder's Jacobian needs.
SLOPES = {nn.Tanh: lambda h: 1 - h * h, nn.Sigmoid: lambda h: h * (1 - h),
          nn.ReLU: lambda h: (h > 0).to(h.dtype)}


class AutoEncoder(nn.Module):
    """Linear(d_in, d_out) -> activation -> Linear(d_out, d_in), the decoder output left linear.

    With `tied`, the decoder reuses the encoder's weight transposed (same storage) and keeps its own
    bias. `decoder_weight` and `decoder_bias_vector` give the decoder's affine map either way, which
    the visualisations use to decode codes back to pixels.
    """

    def __init__(self, d_in: int, d_out: int, activation: str = "tanh", tied: bool = False):
        super().__init__()
        self.encoder = nn.Linear(d_in, d_out)
        self.activation = ACTIVATIONS[activation]()
        self.tied = tied
        if tied:
            self.decoder_bias = nn.Parameter(torch.zeros(d_in))
        else:
            self.decoder = nn.Linear(d_out, d_in)

    @property
    def sizes(self) -> tuple[int, int]:
        """(inputs, codes)."""
        return self.encoder.in_features, self.encoder.out_features

    @property
    def decoder_weight(self) -> torch.Tensor:
        return self.encoder.weight.t() if self.tied else self.decoder.weight

    @property
    def decoder_bias_vector(self) -> torch.Tensor:
        return self.decoder_bias if self.tied else self.decoder.bias

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.encoder(x))

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.decoder_weight, self.decoder_bias_vector)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def contraction(self, codes: torch.Tensor) -> torch.Tensor:
        """The squared Frobenius norm of the encoder's Jacobian at each input, ||dh/dx||^2,
        averaged over the minibatch, from the inputs' `codes` h (Rifai et al. 2011). In closed
        form: row j of the Jacobian is s'(a_j) times row j of W, so the norm is
        sum_j s'(a_j)^2 ||W_j||^2, one matrix-vector product instead of d_in backward passes."""
        slope = SLOPES[type(self.activation)](codes)
        return ((slope * slope) @ self.encoder.weight.pow(2).sum(1)).mean()


class StackedNet(nn.Module):
    """Encoders stacked in the sizes `sizes` (784, 196, ...: layer k maps sizes[k-1] to sizes[k],
    then the activation), topped by a linear head giving `n_classes` logits (no head when None:
    a stack that only computes codes). With `sizes` of one entry it is a linear classifier.

    Parameters are created encoders first, bottom up, then the head: the order in which their
    initial weights are drawn from the random stream (and the order saelab 0.3 drew them in).
    """

    def __init__(self, sizes: list[int], n_classes: int | None, activation: str = "tanh"):
        super().__init__()
        self.sizes = [int(s) for s in sizes]
        self.encoders = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(self.sizes))
        self.activation = ACTIVATIONS[activation]()
        self.head = nn.Linear(self.sizes[-1], n_classes) if n_classes is not None else None

    @classmethod
    def from_autoencoders(cls, autoencoders: list[AutoEncoder], n_classes: int | None
                          ) -> StackedNet:
        """The stack of `autoencoders`' encoders (copies of their weights), with a fresh head."""
        sizes = [autoencoders[0].sizes[0], *(ae.sizes[1] for ae in autoencoders)]
        activation = next(k for k, v in ACTIVATIONS.items()
                          if isinstance(autoencoders[0].activation, v))
        net = cls(sizes, n_classes, activation)
        for encoder, ae in zip(net.encoders, autoencoders, strict=True):
            encoder.load_state_dict(ae.encoder.state_dict())
        return net

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
