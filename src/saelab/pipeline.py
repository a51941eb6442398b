"""The experiment, top to bottom: data, pixel baseline, greedy pretraining, probe, fine-tuning.

Every stage saves a checkpoint and `metrics.json` is rewritten atomically after each one, so an
interrupted run keeps what it finished and `resume=RUN_DIR` continues it without retraining.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only
from torch import nn

import saelab
from saelab.autoencoder import AutoEncoder, classifier, stack_encoders
from saelab.data import Minibatches, Splits, load_splits
from saelab.evaluation import CHUNK, classifier_metrics, encode
from saelab.fastpath import FastPath
from saelab.stages import AutoencoderStage, ClassifierStage, EvalBatches, Stage


def git_commit() -> str | None:
    """The commit of the saelab source tree, if it is a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except OSError:
        return None
    return out.stdout.strip() or None


def data_device(cfg: DictConfig) -> torch.device:
    """Where the splits live: the accelerator's device, so minibatches never cross to it."""
    accelerator = cfg.trainer.accelerator
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


# Lightning's start-up chatter (accelerator report, tips) hides the experiment's own log lines.
logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
logging.getLogger("pytorch_lightning.accelerators.cuda").setLevel(logging.WARNING)
log = logging.getLogger("saelab")


def is_main_process() -> bool:
    """Rank 0 of a data-parallel run (or a plain run): the one process that writes files.
    Lightning's rank covers its own launcher (LOCAL_RANK), torchrun (RANK) and SLURM tasks."""
    return rank_zero_only.rank == 0


def write_metrics(out_dir: Path, metrics: dict) -> None:
    """Write `out_dir`/metrics.json through a temp file and a rename (never half written)."""
    tmp = out_dir / f"metrics.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(metrics, indent=2))
    tmp.replace(out_dir / "metrics.json")


def record_error(out_dir: Path, error: str) -> None:
    """Add `error` to a failed run's metrics.json, keeping the stages it finished."""
    if not is_main_process():
        return
    path = out_dir / "metrics.json"
    metrics = json.loads(path.read_text()) if path.exists() else {}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_metrics(out_dir, {**metrics, "error": error})


class Run:
    """A run folder: metrics.json (atomic), one checkpoint per stage, one TensorBoard log."""

    def __init__(self, cfg: DictConfig, out_dir: Path):
        self.cfg, self.dir = cfg, out_dir
        self.device = data_device(cfg)
        self.ckpt_dir = out_dir / "checkpoints"
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.logger = TensorBoardLogger(str(out_dir), name="tensorboard", version="",
                                        default_hp_metric=False)
        self.autoencoders: list[AutoEncoder] = []
        self.baseline: nn.Module | None = None
        self.probe: nn.Module | None = None
        self.finetuned: nn.Module | None = None
        self.data: Splits | None = None
        self.loaded: list[str] = []  # stages restored from checkpoints instead of trained
        self.loaded_s = 0.0  # training time those stages took in the earlier invocation
        self.is_main = is_main_process()
        path = out_dir / "metrics.json"
        self.metrics = json.loads(path.read_text()) if path.exists() else {}
        self.metrics.pop("error", None)  # a resumed run starts afresh from its finished stages
        self.metrics.update(version=saelab.__version__, git_commit=git_commit(),
                            seed=cfg.seed, timings=self.metrics.get("timings", {}))

    def write(self, **sections) -> None:
        """Merge `sections` into metrics.json, written through a temp file and a rename."""
        self.metrics.update(sections)
        if self.is_main:
            write_metrics(self.dir, self.metrics)

    def fit(self, name: str, stage: Stage, train: Minibatches, val: EvalBatches) -> dict:
        """Train `stage` (or load its checkpoint when resuming) and return its record."""
        ckpt = self.ckpt_dir / f"{name}.pt"
        if ckpt.exists():
            saved = torch.load(ckpt, map_location="cpu", weights_only=True)
            stage.model.load_state_dict(saved["state_dict"])
            self.loaded.append(name)
            self.loaded_s += saved["seconds"]
            log.info("%s: loaded from %s, not retrained", stage.label, ckpt)
            stage.model.to(self.device)
            return {"seconds": saved["seconds"], "history": saved["history"]}
        start = time.perf_counter()
        if stage.cfg.epochs > 0:
            trainer = pl.Trainer(
                accelerator=self.cfg.trainer.accelerator, devices=self.cfg.trainer.devices,
                strategy=self.cfg.trainer.strategy, precision=self.cfg.trainer.precision,
                max_epochs=stage.cfg.epochs, logger=self.logger, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                log_every_n_steps=1, callbacks=[FastPath.from_config(self.cfg.trainer)],
                limit_val_batches=None if len(val) else 0)
            train.shard(trainer.global_rank, trainer.world_size)
            stage.model.train()
            trainer.fit(stage, train_dataloaders=train, val_dataloaders=val)
            stage.restore_best()
        stage.model.to(self.device)  # Lightning's teardown leaves it on the CPU
        record = {"seconds": time.perf_counter() - start, "history": stage.history}
        if self.is_main:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"state_dict": stage.model.state_dict(), **record}, tmp)
            tmp.replace(ckpt)
        return record


def run_experiment(cfg: DictConfig, out_dir: Path) -> Run:
    """Run every stage of the experiment described by `cfg`, writing into `out_dir`; the returned
    Run holds the metrics and the trained models for the figures."""
    start = time.perf_counter()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    run = Run(cfg, out_dir)
    device = run.device
    data = run.data = load_splits(cfg.data, cfg.seed, device)
    k, sizes = len(data.classes), list(cfg.model.sizes)
    run.write(data=data.summary(), config=OmegaConf.to_container(cfg, resolve=True))

    def batches(x, y, stage_cfg):
        return Minibatches(x, y, stage_cfg.batch_size, cfg.trainer.steps_per_item, cfg.seed,
                           sample_with_replacement=stage_cfg.sample_with_replacement,
                           steps_per_epoch=stage_cfg.steps_per_epoch)

    # 1. Baseline: softmax regression on raw pixels.
    baseline = ClassifierStage(classifier(nn.Identity(), sizes[0], k), cfg.baseline,
                               "baseline", "baseline")
    fitted = run.fit("baseline", baseline, batches(data.train_x, data.train_y, cfg.baseline),
                     EvalBatches(data.val_x, data.val_y))
    run.baseline = baseline.model
    run.metrics["timings"]["baseline_s"] = fitted["seconds"]
    run.write(baseline=summarise(baseline.model, data, fitted))

    # 2. Greedy layer-wise pretraining: each autoencoder learns the codes of the layer below,
    #    computed once per layer.
    autoencoders, layers, pretrain_s = [], [], 0.0
    codes = (data.train_x, data.val_x, data.test_x)
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True), start=1):
        ae = AutoEncoder(d_in, d_out, cfg.model.activation, cfg.model.tied)
        levels = cfg.pretrain.noise.get("levels")
        stage = AutoencoderStage(ae, cfg.pretrain, f"pretrain layer {i}", f"pretrain/layer{i}",
                                 background=data.background if i == 1 else 0.0,
                                 noise_level=levels[i - 1] if levels else None)
        fitted = run.fit(f"pretrain_layer{i}", stage, batches(codes[0], None, cfg.pretrain),
                         EvalBatches(codes[1], codes[1]))
        ae.eval()
        pretrain_s += fitted["seconds"]
        layers.append({"in": d_in, "out": d_out, "noise_level": stage.noise_level,
                       **recon_mse(stage, codes),
                       "seconds": fitted["seconds"], "history": fitted["history"]})
        autoencoders.append(ae)
        code_fn = ae.encode if cfg.pretrain.codes == "activation" else ae.encoder
        codes = tuple(encode(code_fn, c) for c in codes)
        run.metrics["timings"]["pretrain_s"] = pretrain_s
        run.write(pretrain=layers)
    run.autoencoders = autoencoders

    # 3. Probe: a linear head on the frozen stack, trained on its top codes.
    codes = tuple(encode(stack_encoders(autoencoders).to(device), x)
                  for x in (data.train_x, data.val_x))
    head = ClassifierStage(classifier(nn.Identity(), sizes[-1], k), cfg.probe, "probe", "probe")
    fitted = run.fit("probe", head, batches(codes[0], data.train_y, cfg.probe),
                     EvalBatches(codes[1], data.val_y))
    probe = run.probe = classifier(stack_encoders(autoencoders), sizes[-1], k).to(device)
    probe[1].load_state_dict(head.model[1].state_dict())
    run.metrics["timings"]["probe_s"] = fitted["seconds"]
    run.write(probe=summarise(probe, data, fitted))

    # 4. Fine-tuning: the whole stack and head, end to end, with cross-entropy.
    finetune = ClassifierStage(copy.deepcopy(probe), cfg.finetune, "finetune", "finetune")
    fitted = run.fit("finetune", finetune, batches(data.train_x, data.train_y, cfg.finetune),
                     EvalBatches(data.val_x, data.val_y))
    run.finetuned = finetune.model
    run.metrics["timings"].update(finetune_s=fitted["seconds"],
                                  total_s=time.perf_counter() - start + run.loaded_s)
    run.write(finetune=summarise(finetune.model, data, fitted))
    return run


def summarise(model: nn.Module, data: Splits, fitted: dict) -> dict:
    """A classifier stage's entry in metrics.json."""
    return {**classifier_metrics(model, data), "seconds": fitted["seconds"],
            "history": fitted["history"]}


@torch.no_grad()
def recon_mse(stage: AutoencoderStage, codes: tuple) -> dict:
    """Reconstruction MSE of one layer's autoencoder on its train/val/test inputs."""
    names = ("train_recon_mse", "val_recon_mse", "test_recon_mse")
    out = {}
    for name, x in zip(names, codes, strict=True):
        if len(x):
            errors, counts = zip(*(stage.evaluate(part) for part in x.split(CHUNK)), strict=True)
            out[name] = sum(map(float, errors)) / sum(map(float, counts))
    return out
