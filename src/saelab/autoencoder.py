"""The networks: one autoencoder per hidden layer, their encoders stacked, a linear head on top."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

ACTIVATIONS = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "relu": nn.ReLU}


class AutoEncoder(nn.Module):
    """Linear(d_in, d_out) -> activation -> Linear(d_out, d_in), the decoder output left linear.

    With `tied`, the decoder reuses the encoder's weight transposed (same storage) and keeps its own
    bias. `decoder_weight` and `decoder_bias` give the decoder's affine map either way, which the
    visualisations use to decode codes back to pixels.
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


def stack_encoders(autoencoders: list[AutoEncoder]) -> nn.Sequential:
    """The deep network's body: each trained encoder followed by its activation, copied."""
    layers: list[nn.Module] = []
    for ae in autoencoders:
        encoder = nn.Linear(ae.encoder.in_features, ae.encoder.out_features)
        encoder.load_state_dict(ae.encoder.state_dict())
        layers += [encoder, type(ae.activation)()]
    return nn.Sequential(*layers)


def classifier(body: nn.Module, d_in: int, n_classes: int) -> nn.Sequential:
    """`body` (possibly empty: the pixel baseline) topped by a linear head giving class logits."""
    return nn.Sequential(body, nn.Linear(d_in, n_classes))
