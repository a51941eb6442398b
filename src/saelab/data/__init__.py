"""The data: files checked by content, the splits of a run as tensors, minibatches as index
slices, and what the losses do to their inputs."""
