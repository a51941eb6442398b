"""The training step loop and its GPU fast path: the chunked loop trains exactly like a plain
loop, the fast path is a no-op off the GPU, and (on a GPU) CUDA-graph steps train like eager
ones."""

from __future__ import annotations

import copy
import os
import re

import pytest
import pytorch_lightning as pl
import torch
from helpers import TINY, compose_cfg
from torch import nn
from torch.nn import functional as F

from saelab.api import execute
from saelab.config.job import compose
from saelab.data.batches import Minibatches
from saelab.data.splits import load_splits
from saelab.errors import ConfigError
from saelab.nn import fastpath
from saelab.nn.fastpath import FastPath, StepLoop
from saelab.nn.modules import ClassifierModule, make_optimizer
from saelab.nn.networks import AutoEncoder, StackedNet

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def data():
    """3,000 real training digits and their labels."""
    return load_splits(compose_cfg(*TINY).data, seed=0)


def mse(ae: AutoEncoder):
    return lambda x, _y: F.mse_loss(ae(x), x)


def cross_entropy(model: nn.Module):
    return lambda x, y: F.cross_entropy(model(x), y)


def plain_steps(loss_fn, opt, x, y, slices) -> float:
    """The reference: the loop anyone would write."""
    total = 0.0
    for idx in slices:
        opt.zero_grad()
        loss = loss_fn(x[idx], None if y is None else y[idx])
        loss.backward()
        opt.step()
        total += loss.item()
    return total


def test_chunked_step_loop_trains_exactly_like_a_plain_loop(data):
    x = data.train_x
    torch.manual_seed(0)
    ae = AutoEncoder(784, 49)
    ref = copy.deepcopy(ae)
    cfg = compose_cfg().pretrain
    slices = torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).split(128)
    assert len(slices[-1]) < 128  # the partial last minibatch is included
    loop, opt = StepLoop(mse(ae)), make_optimizer([{"params": list(ae.parameters())}], cfg)
    total = sum(float(loop.run(opt, x, None, slices[i: i + 5])) for i in range(0, len(slices), 5))
    ref_opt = make_optimizer([{"params": list(ref.parameters())}], cfg)
    ref_total = plain_steps(mse(ref), ref_opt, x, None, slices)
    for p, q in zip(ae.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q)
    assert total == pytest.approx(ref_total, rel=1e-5)


def test_stage_under_lightning_with_fast_path_on_cpu_matches_plain_loop(data):
    """Through Lightning, with the FastPath callback asking for everything: on the CPU it must
    change nothing, and two cosine-scheduled epochs equal the plain loop over the same batches."""
    cfg = compose_cfg(*TINY, "baseline.epochs=2").baseline
    torch.manual_seed(0)
    model = StackedNet([784], 10)
    ref = copy.deepcopy(model)
    stage = ClassifierModule(model, cfg, "baseline", "baseline")
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, limit_val_batches=0,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[FastPath(cuda_graphs=True, compile=True,
                                             matmul_precision="medium")])
    nvml_check = os.environ.get(fastpath.NVML_CHECK)
    trainer.fit(stage, train_dataloaders=Minibatches(data.train_x, data.train_y, 32, 7, seed=0))
    assert not stage.step_loop.cuda_graphs and stage.step_loop.loss_fn == stage.loss
    assert torch.get_float32_matmul_precision() == "highest"
    assert os.environ.get(fastpath.NVML_CHECK) == nvml_check  # restored after the fit
    assert isinstance(stage.optimizers(use_pl_optimizer=False).param_groups[0]["lr"], float)

    opt = make_optimizer([{"params": list(ref.parameters())}], cfg)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs)
    batches = Minibatches(data.train_x, data.train_y, 32, seed=0)
    for _ in range(cfg.epochs):
        for x, y, slices in batches:
            plain_steps(cross_entropy(ref), opt, x, y, slices)
        sched.step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=0, atol=1e-6)
    losses = [h["train_loss"] for h in stage.history]
    assert len(losses) == 2 and losses[1] < losses[0]


def test_fast_path_keys_are_checked_and_trainer_gpu_sets_both_groups(monkeypatch):
    monkeypatch.setattr("saelab.config.rules.cuda_devices", lambda: 1)  # a GPU machine's config
    for override, key in [("fastpath.cuda_graphs=maybe", "fastpath.cuda_graphs"),
                          ("fastpath.matmul_precision=low", "fastpath.matmul_precision"),
                          ("trainer.cuda_graphs=true", "trainer.cuda_graphs")]:
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)}="):
            compose([override])
    gpu = compose(["trainer=gpu"])
    assert (gpu.trainer.accelerator, gpu.fastpath.cuda_graphs, gpu.fastpath.matmul_precision) == (
        "gpu", True, "high")
    fast = FastPath.from_config(compose().fastpath)
    assert (fast.cuda_graphs, fast.compile, fast.matmul_precision) == (False, False, "highest")


def graphed_vs_eager(model: nn.Module, loss_of, optimizer: str, x, y, compile: bool = False):
    """Two epochs of the same batches on copies of `model`: CUDA-graph steps and eager steps,
    both with the capturable optimiser and the cosine schedule. Returns both models, losses and
    the graph loop."""
    cfg = compose_cfg(f"pretrain.optimizer={optimizer}", "pretrain.weight_decay=1e-4").pretrain
    out = []
    for graphs in (True, False):
        net = copy.deepcopy(model)
        loop = StepLoop(loss_of(net), cuda_graphs=graphs, compile=compile and graphs)
        opt = make_optimizer([{"params": list(net.parameters())}], cfg, capturable=True)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 2)
        totals = []
        for epoch in range(2):
            gen = torch.Generator().manual_seed(epoch)
            slices = torch.randperm(len(x), generator=gen).to(x.device).split(128)
            totals.append(sum(float(loop.run(opt, x, y, slices[i: i + 8]))
                              for i in range(0, len(slices), 8)))
            sched.step()
        out.append((net, totals, loop))
    return out


@cuda
@pytest.mark.parametrize("kind", ["autoencoder/adam", "classifier/adamw"])
def test_cuda_graph_steps_train_like_eager_steps(data, kind):
    torch.manual_seed(0)
    if kind.startswith("autoencoder"):
        model, loss_of, y = AutoEncoder(784, 196).cuda(), mse, None
    else:
        model, loss_of, y = StackedNet([784, 49], 10).cuda(), cross_entropy, data.train_y.cuda()
    (graphed, g_totals, loop), (eager, e_totals, _) = graphed_vs_eager(
        model, loss_of, kind.split("/")[1], data.train_x.cuda(), y)
    assert loop.graphed is not None and loop.graphed.batch_size == 128
    for p, q in zip(graphed.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert g_totals == pytest.approx(e_totals, rel=1e-4)
    assert not torch.equal(next(graphed.parameters()), next(model.parameters()))  # it trained


@cuda
def test_compiled_cuda_graph_steps_train_like_eager_steps(data):
    torch.manual_seed(0)
    x = data.train_x[: 23 * 128].cuda()  # full-size minibatches only: one compilation
    (graphed, g_totals, _), (eager, e_totals, _) = graphed_vs_eager(
        AutoEncoder(784, 196).cuda(), mse, "adam", x, None, compile=True)
    for p, q in zip(graphed.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)
    assert g_totals == pytest.approx(e_totals, rel=1e-3)


@cuda
def test_pipeline_on_the_gpu_fast_path_matches_eager_gpu_run(tmp_path, monkeypatch):
    replays = []
    replay = fastpath.GraphedStep.replay
    monkeypatch.setattr(fastpath.GraphedStep, "replay",
                        lambda self, idx: (replays.append(1), replay(self, idx)))
    common = [*TINY, "trainer=gpu", "trainer.accelerator=gpu"]
    fast = execute(compose_cfg(*common), tmp_path / "fast").metrics
    assert torch.get_float32_matmul_precision() == "highest"  # restored after each stage
    # 3,000 samples in minibatches of 32: 93 full-size steps replayed, one of 24 run eagerly
    epochs = 2 + 4 * 3 + 3 + 2
    assert len(replays) == epochs * (3000 // 32)
    eager = execute(compose_cfg(*common, "fastpath.cuda_graphs=false"),
                           tmp_path / "eager").metrics
    for stage in ("baseline", "finetune"):
        fast_losses = [h["train_loss"] for h in fast[stage]["history"]]
        eager_losses = [h["train_loss"] for h in eager[stage]["history"]]
        assert fast_losses == pytest.approx(eager_losses, rel=1e-3)
        assert fast[stage]["test_acc"] == pytest.approx(eager[stage]["test_acc"], abs=0.01)
