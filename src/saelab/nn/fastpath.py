"""The training step loop and its fast path: CUDA graphs, torch.compile, TF32/bf16 matmuls.

`StepLoop` runs a stage's minibatches as plain optimiser steps. On a GPU the networks here are
launch-bound: an eager Adam step at batch 128 is dozens of kernel launches from Python, each far
longer than its arithmetic. A CUDA graph replays the whole step (forward, backward, optimiser) as
one launch over static buffers: the minibatch's indices in, the running loss sum out, parameters
and optimiser state updated in place. `FastPath`, a Lightning callback, picks each fit's loop;
off the GPU, or where a graph does not fit, the eager loop runs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor

from saelab.config.schema import Optimizer
from saelab.nn.meter import Meter

log = logging.getLogger("saelab")

LossFn = Callable[[Tensor, Tensor | None], Tensor]
# Eager steps on a side stream before capture, so that lazy state (Adam's moments, cuBLAS
# workspaces, compiled kernels) exists before the graph records addresses; undone afterwards.
WARMUP_STEPS = 3
# Capturable, with the learning rate read from a tensor.
GRAPH_OPTIMIZERS = (Optimizer.adam, Optimizer.adamw)
NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"  # set by Lightning when imported


def eager_steps(loss_fn: LossFn, backward: Callable[[Tensor], None],
                optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor | None,
                slices: Sequence[Tensor], meter: Meter) -> Tensor:
    """Plain optimiser steps on the minibatches x[idx] (and y[idx]); returns the summed loss,
    left on the device so that nothing waits for it. `meter` counts the steps (and stops them on
    a stop request)."""
    total = torch.zeros((), device=x.device)
    for idx in slices:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(x[idx], None if y is None else y[idx])
        backward(loss)
        optimizer.step()
        total += loss.detach()
        meter.step()
    return total


def _params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


@torch.no_grad()
def _snapshot(optimizer: torch.optim.Optimizer) -> list[tuple[Tensor, dict[str, Tensor]]]:
    """Copies of every parameter and its optimiser state tensors."""
    return [(p.detach().clone(),
             {k: v.clone() for k, v in optimizer.state.get(p, {}).items()
              if isinstance(v, Tensor)})
            for p in _params(optimizer)]


@torch.no_grad()
def _restore(optimizer: torch.optim.Optimizer, saved: list) -> None:
    """Copy the snapshot back in place (addresses unchanged, as the graph needs); state that did
    not exist before is zeroed, which is Adam's fresh state (step 0, zero moments)."""
    for p, (value, state) in zip(_params(optimizer), saved, strict=True):
        p.copy_(value)
        for key, tensor in optimizer.state[p].items():
            if isinstance(tensor, Tensor):
                tensor.copy_(state[key]) if key in state else tensor.zero_()


class GraphedStep:
    """One optimiser step on a minibatch of `batch_size` rows of x (and y), captured in a CUDA
    graph (as in PyTorch's "whole network capture": warm-up on a side stream, grads set to None so
    that backward allocates them in the graph's pool, a capturable optimiser).

    `replay(idx)` copies the minibatch's indices into the static buffer and replays: the model and
    the optimiser state change in place and the loss is added to `total`, all on the device.
    """

    def __init__(self, loss_fn: LossFn, optimizer: torch.optim.Optimizer, x: Tensor,
                 y: Tensor | None, batch_size: int):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.idx = torch.arange(batch_size, device=x.device) % len(x)
        self.total = torch.zeros((), device=x.device)
        saved = _snapshot(optimizer)
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                optimizer.zero_grad(set_to_none=True)
                self._step(loss_fn, optimizer)
        torch.cuda.current_stream(x.device).wait_stream(side)
        optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step(loss_fn, optimizer)
        _restore(optimizer, saved)
        self.total.zero_()

    def _step(self, loss_fn: LossFn, optimizer: torch.optim.Optimizer) -> None:
        loss = loss_fn(self.x[self.idx], None if self.y is None else self.y[self.idx])
        loss.backward()
        optimizer.step()
        self.total += loss.detach()

    def replay(self, idx: Tensor) -> None:
        self.idx.copy_(idx)
        self.graph.replay()


class StepLoop:
    """How a stage runs its chunk of minibatches: eager optimiser steps, or with `cuda_graphs`
    replays of one captured step for the full-size minibatches and eager steps for the others
    (the last, partial one). `compile` runs the loss through `torch.compile`."""

    def __init__(self, loss_fn: LossFn, backward: Callable[[Tensor], None] = Tensor.backward,
                 cuda_graphs: bool = False, compile: bool = False, meter: Meter | None = None):
        self.loss_fn = torch.compile(loss_fn) if compile else loss_fn
        self.backward = backward
        self.meter = meter or Meter()
        self.cuda_graphs = cuda_graphs
        self.graphed: GraphedStep | None = None

    @property
    def capturable(self) -> bool:
        """Whether the optimiser must be capturable (device state, learning rate as a tensor)."""
        return self.cuda_graphs

    def run(self, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor | None,
            slices: Sequence[Tensor]) -> Tensor:
        """Train on x[idx] for each idx in `slices`, in order; returns the summed loss."""
        if not self.cuda_graphs:
            return eager_steps(self.loss_fn, self.backward, optimizer, x, y, slices, self.meter)
        graphed = self.graphed
        if graphed is None or not (_same(graphed.x, x) and _same(graphed.y, y)):
            graphed = self.graphed = GraphedStep(self.loss_fn, optimizer, x, y, len(slices[0]))
        eager_total = torch.zeros((), device=x.device)
        for idx in slices:
            if len(idx) == graphed.batch_size:
                graphed.replay(idx)
                self.meter.step()
            else:
                eager_total += eager_steps(self.loss_fn, self.backward, optimizer, x, y, [idx],
                                           self.meter)
        total = graphed.total + eager_total
        graphed.total.zero_()
        return total


def _same(a: Tensor | None, b: Tensor | None) -> bool:
    """Whether a graph captured over `a` reads `b`: same memory, same shape."""
    if a is None or b is None:
        return a is b
    return (a.data_ptr(), a.shape, a.stride(), a.dtype) == (
        b.data_ptr(), b.shape, b.stride(), b.dtype)


class FastPath(pl.Callback):
    """Puts a saelab stage's step loop on the fast path for the length of its fit.

    On every device, with one process in 32-bit precision: `loss.backward()` rather than
    Lightning's `manual_backward` (whose hooks cost ~40 us a step), and Lightning's NVML-based CUDA
    check switched off: with it, every Adam step asks NVML whether CUDA is there, ~0.1 ms a step
    where torch has CUDA but the machine no GPU (the check keeps forked workers usable; workers
    are forked before `setup`). On a CUDA device also: the float32 matmul precision (highest:
    fp32, high: TF32, medium: bf16), `torch.compile` of the loss, and CUDA-graph steps where they
    fit (Adam/AdamW). All of it is undone when the fit ends.
    """

    def __init__(self, cuda_graphs: bool = False, compile: bool = False,
                 matmul_precision: str = "highest"):
        self.cuda_graphs, self.compile = cuda_graphs, compile
        self.matmul_precision = matmul_precision
        self._previous_precision: str | None = None
        self._nvml_check: str | None = None

    @classmethod
    def from_config(cls, fastpath) -> FastPath:
        """From the `fastpath` config group."""
        return cls(fastpath.cuda_graphs, fastpath.compile, fastpath.matmul_precision)

    @staticmethod
    def graphs_unfit(trainer: pl.Trainer, module: pl.LightningModule) -> str | None:
        """Why CUDA graphs cannot run this stage, or None when they can."""
        if trainer.world_size > 1:
            return "a single device"
        if trainer.precision != "32-true":
            return "trainer.precision=32-true"
        if module.cfg.optimizer not in GRAPH_OPTIMIZERS:
            return f"optimizer in {', '.join(GRAPH_OPTIMIZERS)}"
        return None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._nvml_check = os.environ.pop(NVML_CHECK, None)
        need = self.graphs_unfit(trainer, pl_module)
        plain = trainer.world_size == 1 and trainer.precision == "32-true"
        cuda = trainer.strategy.root_device.type == "cuda"
        if cuda:
            self._previous_precision = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision(self.matmul_precision)
            if self.cuda_graphs and need:
                log.info("%s: eager steps (CUDA graphs need %s)", pl_module.label, need)
        pl_module.step_loop = StepLoop(
            pl_module.loss, Tensor.backward if plain else pl_module.manual_backward,
            cuda_graphs=cuda and self.cuda_graphs and need is None, compile=cuda and self.compile,
            meter=pl_module.meter)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._nvml_check is not None:
            os.environ[NVML_CHECK] = self._nvml_check
            self._nvml_check = None
        if self._previous_precision is not None:
            torch.set_float32_matmul_precision(self._previous_precision)
            self._previous_precision = None
        pl_module.step_loop = StepLoop(pl_module.loss, pl_module.manual_backward,
                                       meter=pl_module.meter)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")
