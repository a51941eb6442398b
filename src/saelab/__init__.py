"""saelab: config-driven experiments with greedy layer-wise stacked autoencoders."""

__version__ = "0.1.0"
