"""The experiment, top to bottom: data, pixel baseline, greedy pretraining, probe, fine-tuning and
the from-scratch control.

Each stage is trained, or taken from the run folder or the shared store when a checkpoint with the
config's fingerprint is there (`saelab.runfolder`); its checkpoint keeps the random-number state
at its end, restored when it is loaded, so a resumed run continues exactly as an uninterrupted
one. `metrics.json` is rewritten atomically after each stage: an interrupted run keeps what it
finished, and `resume=RUN_DIR` continues it.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import platform
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch import nn

import saelab
from saelab.autoencoder import AutoEncoder, classifier, stack_encoders
from saelab.data import Minibatches, Splits, load_splits
from saelab.errors import Interrupted
from saelab.evaluation import CHUNK, classifier_metrics, encode
from saelab.fastpath import FastPath
from saelab.loader import Run
from saelab.loggers import flat_config, make_logger
from saelab.progress import Progress
from saelab.runfolder import Expected, RunFolder, Store, expected
from saelab.schema import Accelerator, Codes
from saelab.signals import STOP
from saelab.stages import AutoencoderStage, ClassifierStage, EvalBatches, Stage

# Lightning's start-up chatter (accelerator report, tips) hides the experiment's own log lines.
logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
logging.getLogger("pytorch_lightning.accelerators.cuda").setLevel(logging.WARNING)
log = logging.getLogger("saelab")

# Scratch trains on a generator of its own (seeded from `seed` and this), so that adding it, or
# its dropout, changes no other stage's numbers.
SCRATCH_SEED = 104_729


def git_commit() -> str | None:
    """The commit of the saelab source tree, if it is a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except OSError:
        return None
    return out.stdout.strip() or None


def versions() -> dict[str, str]:
    """The versions a run's numbers depend on."""
    import hydra
    import omegaconf
    import tensorboard

    return {"python": platform.python_version(), "saelab": saelab.__version__,
            "torch": torch.__version__, "lightning": pl.__version__,
            "hydra": hydra.__version__, "omegaconf": omegaconf.__version__,
            "tensorboard": tensorboard.__version__}


def data_device(cfg: DictConfig) -> torch.device:
    """Where the splits live: the accelerator's device, so minibatches never cross to it."""
    accelerator = cfg.trainer.accelerator
    if accelerator in (Accelerator.gpu, Accelerator.cuda) or (
            accelerator == Accelerator.auto and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def is_main_process() -> bool:
    """Rank 0 of a data-parallel run (or a plain run): the one process that writes files.
    Lightning's rank covers its own launcher (LOCAL_RANK), torchrun (RANK) and SLURM tasks."""
    return rank_zero_only.rank == 0


def rng_state() -> dict:
    """The global random-number state (CPU, and CUDA where present) at this point."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def rng_digest() -> str:
    """A short digest of the CPU random-number state: where a stage starts in the stream."""
    return hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16]


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Laps:
    """Wall-clock time of each part of an invocation, contiguous, so the parts add up."""

    def __init__(self, start: float | None = None):
        self.mark = time.perf_counter() if start is None else start
        self.seconds: dict[str, float] = {}

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        self.seconds[f"{name}_s"] = self.seconds.get(f"{name}_s", 0.0) + now - self.mark
        self.mark = now
        return self.seconds[f"{name}_s"]

    def timings(self) -> dict[str, float]:
        return {**self.seconds, "total_s": sum(self.seconds.values())}


@dataclass
class Stages:
    """Trains, or takes from a checkpoint, each stage of one run, and records it."""

    cfg: DictConfig
    folder: RunFolder
    want: dict[str, Expected]
    usable: dict[str, dict | None]
    device: torch.device
    logger: pl.loggers.Logger | None
    progress: Progress
    laps: Laps
    metrics: dict
    trained: set[str] = field(default_factory=set)

    def fit(self, name: str, stage: Stage, train: Minibatches, val: EvalBatches) -> dict:
        """Train `stage` or load it; return its record (seconds, history, where it came from).
        A stage is loaded when its checkpoint (or a store entry) has the config's fingerprint,
        none of the stages it consumes was trained in this invocation, and it started from the
        random state it starts from now."""
        STOP.check()
        exp = self.want[name]
        start = rng_digest()
        store = Store(self.cfg.store) if self.cfg.store else None
        saved, origin, source = self.usable.get(name), "checkpoint", self.folder.checkpoint(name)
        fresh = [c for c in exp.stage.consumes if c in self.trained]
        if fresh:
            if saved is not None:
                log.info("%s: retrained because %s was", stage.label, fresh[0])
            saved = None
        elif saved is None and store is not None:
            source = store.entry(exp)
            saved, origin = store.get(exp), f"store:{source}"
        if saved is not None and saved["rng_in"] != start:
            log.warning("%s: %s started from another random state; retraining", stage.label,
                        source)
            saved = None
        if saved is not None:
            stage.model.load_state_dict(saved["state_dict"])
            stage.model.to(self.device)
            restore_rng(saved["rng"])
            if origin != "checkpoint":  # the run folder stays self-contained
                self.folder.save_stage(exp, {k: saved[k] for k in CONTENTS})
            log.info("%s: loaded from %s, not retrained", stage.label, source)
            self.progress.skip(name)
            return {"seconds": saved["seconds"], "history": saved["history"], "origin": origin,
                    "fingerprint": exp.fingerprint}
        began = time.perf_counter()
        if stage.cfg.epochs > 0:
            trainer = pl.Trainer(
                accelerator=self.cfg.trainer.accelerator, devices=self.cfg.trainer.devices,
                strategy=self.cfg.trainer.strategy, precision=self.cfg.trainer.precision,
                max_epochs=stage.cfg.epochs, logger=self.logger or False,
                enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1,
                callbacks=[FastPath.from_config(self.cfg.fastpath)],
                limit_val_batches=None if len(val) else 0)
            train.shard(trainer.global_rank, trainer.world_size)
            self.progress.begin(name, stage.label, stage.cfg.epochs, train.n_steps, stage.meter)
            stage.model.train()
            try:
                trainer.fit(stage, train_dataloaders=train, val_dataloaders=val)
            except SIGTERMException:  # Lightning saw the SIGTERM first (between steps): ours
                raise Interrupted(STOP.signum or signal.SIGTERM) from None
        stage.model.to(self.device)  # Lightning's teardown leaves it on the CPU
        record = {"seconds": time.perf_counter() - began, "history": stage.history}
        path = self.folder.save_stage(exp, {"state_dict": stage.model.state_dict(),
                                            "rng": rng_state(), "rng_in": start,
                                            "where": where(self.cfg, self.device), **record})
        if store is not None and self.folder.writer:
            store.put(path, exp)
        self.trained.add(name)
        return {**record, "origin": "trained", "fingerprint": exp.fingerprint}

    def write(self, name: str, **sections) -> None:
        """Merge `sections` into metrics.json and close the time lap of `name`."""
        self.metrics.update(sections)
        self.laps.lap(name)
        self.metrics["timings"] = self.laps.timings()
        self.folder.write_metrics(self.metrics)


# What a checkpoint holds besides its fingerprint (copied as is from the store).
CONTENTS = ("state_dict", "rng", "rng_in", "where", "seconds", "history")


def where(cfg: DictConfig, device: torch.device) -> dict:
    """Where a stage ran: recorded with it, never part of its fingerprint."""
    return {"device": device_name(device), "accelerator": str(cfg.trainer.accelerator),
            "devices": cfg.trainer.devices, "strategy": str(cfg.trainer.strategy),
            "cuda_graphs": cfg.fastpath.cuda_graphs, "compile": cfg.fastpath.compile}


def run_experiment(cfg: DictConfig, out_dir: Path, overrides: list[str] | None = None,
                   laps: Laps | None = None, folder: RunFolder | None = None) -> Run:
    """Run every stage of the experiment described by `cfg` (validated), writing into `out_dir`
    (through `folder`, whose lock the caller holds, if given); the returned Run holds the metrics
    and the trained networks."""
    laps = laps or Laps()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    folder = folder or RunFolder(out_dir, writer=is_main_process())
    device = data_device(cfg)
    log.info("loading the data: %s, classes %s", cfg.data.name, list(cfg.data.classes))
    data = load_splits(cfg.data, cfg.seed, device)
    want = expected(cfg, data.checksums)
    usable = folder.check(cfg, want)
    folder.write_config(cfg, overrides if overrides is not None else folder.read_overrides())
    k, sizes = len(data.classes), list(cfg.model.sizes)
    labelled_train, labelled_val = data.labelled("train"), data.labelled("val")
    log.info("data from %s: %d train / %d val / %d test images, %d / %d of them labelled",
             data.source, len(data.train_y), len(data.val_y), len(data.test_y),
             len(labelled_train[1]), len(labelled_val[1]))
    logger = make_logger(cfg, out_dir, mlflow_run_id=folder.read_metrics().get("mlflow_run_id")
                         ) if folder.writer else None
    if logger is not None:
        logger.log_hyperparams(flat_config(cfg))
    metrics = {"version": saelab.__version__, "git_commit": git_commit(), "seed": cfg.seed,
               "versions": versions(), "device": device_name(device), "data": data.summary(),
               "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)}
    if isinstance(logger, MLFlowLogger):  # the report adds its figures to the same MLflow run
        metrics["mlflow_run_id"] = logger.run_id
    progress = Progress(cfg.progress if folder.writer else "lines",
                        stage_work(cfg, want, data, k))
    run = Stages(cfg, folder, want, usable, device, logger, progress, laps, metrics)
    run.write("data")

    def batches(x, y, stage_cfg):
        return Minibatches(x, y, stage_cfg.batch_size, cfg.fastpath.steps_per_item, cfg.seed,
                           sample_with_replacement=stage_cfg.sample_with_replacement,
                           steps_per_epoch=stage_cfg.steps_per_epoch)

    try:
        # 1. Baseline: softmax regression on raw pixels.
        baseline = ClassifierStage(classifier(nn.Identity(), sizes[0], k), cfg.baseline,
                                   "baseline", "baseline")
        fitted = run.fit("baseline", baseline, batches(*labelled_train, cfg.baseline),
                         EvalBatches(*labelled_val))
        run.write("baseline", baseline=summarise(baseline.model, data, fitted))

        # 2. Greedy layer-wise pretraining, without labels: each autoencoder learns the codes of
        #    the layer below, computed once per layer; their initial weights are kept for scratch.
        autoencoders, initial, layers = [], [], []
        codes = (data.train_x, data.val_x, data.test_x)
        for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True), start=1):
            ae = AutoEncoder(d_in, d_out, cfg.model.activation, cfg.model.tied)
            initial.append(copy.deepcopy(ae.encoder.state_dict()))
            levels = cfg.pretrain.noise.levels
            stage = AutoencoderStage(ae, cfg.pretrain, f"pretrain layer {i}",
                                     f"pretrain/layer{i}",
                                     background=data.background if i == 1 else 0.0,
                                     noise_level=levels[i - 1] if levels else None)
            fitted = run.fit(f"pretrain_layer{i}", stage, batches(codes[0], None, cfg.pretrain),
                             EvalBatches(codes[1], codes[1]))
            ae.eval()
            layers.append({"in": d_in, "out": d_out, "noise_level": stage.noise_level,
                           **recon_mse(stage, codes), **fitted})
            autoencoders.append(ae)
            code_fn = ae.encode if cfg.pretrain.codes == Codes.activation else ae.encoder
            codes = tuple(encode(code_fn, c) for c in codes)
            run.write(f"pretrain_layer{i}", pretrain=layers)

        # 3. Probe: a linear head on the frozen stack, trained on the top codes of the labelled
        #    images. (One stack per split, as saelab 0.1 built them: building a stack draws
        #    initial weights, which come before the head's, so published numbers reproduce.)
        top = [encode(stack_encoders(autoencoders).to(device), x)
               for x in (labelled_train[0], labelled_val[0])]
        head = ClassifierStage(classifier(nn.Identity(), sizes[-1], k), cfg.probe, "probe",
                               "probe")
        head_init = copy.deepcopy(head.model[1].state_dict())
        fitted = run.fit("probe", head, batches(top[0], labelled_train[1], cfg.probe),
                         EvalBatches(top[1], labelled_val[1]))
        probe = classifier(stack_encoders(autoencoders), sizes[-1], k).to(device)
        probe[1].load_state_dict(head.model[1].state_dict())
        run.write("probe", probe=summarise(probe, data, fitted))

        # 4. Fine-tuning: the whole stack and head, end to end, with cross-entropy.
        finetune = ClassifierStage(copy.deepcopy(probe), cfg.finetune, "finetune", "finetune")
        fitted = run.fit("finetune", finetune, batches(*labelled_train, cfg.finetune),
                         EvalBatches(*labelled_val))
        run.write("finetune", finetune=summarise(finetune.model, data, fitted))

        # 5. Scratch: the fine-tuned network from the very weights pretraining started from
        #    (encoders) and the probe's initial head, trained end to end like fine-tuning.
        scratch = None
        if "scratch" in want:
            scratch = scratch_network(autoencoders, initial, head_init, cfg).to(device)
            torch.manual_seed(cfg.seed * 100_003 + SCRATCH_SEED)
            stage = ClassifierStage(scratch, cfg.scratch, "scratch", "scratch")
            fitted = run.fit("scratch", stage, batches(*labelled_train, cfg.scratch),
                             EvalBatches(*labelled_val))
            run.write("scratch", scratch=summarise(scratch, data, fitted))
    finally:
        progress.close()
    return Run(out_dir, cfg, metrics, autoencoders, baseline.model, probe, finetune.model,
               scratch, device, data=data)


def scratch_network(autoencoders: list[AutoEncoder], initial: list[dict], head: dict,
                    cfg: DictConfig) -> nn.Sequential:
    """The fine-tuned network's architecture with the encoders' initial weights and the probe's
    initial head: no pretrained weight in it."""
    fresh = [AutoEncoder(ae.encoder.in_features, ae.encoder.out_features, cfg.model.activation)
             for ae in autoencoders]
    for ae, state in zip(fresh, initial, strict=True):
        ae.encoder.load_state_dict(state)
    net = classifier(stack_encoders(fresh), autoencoders[-1].encoder.out_features,
                     head["weight"].shape[0])
    net[1].load_state_dict(head)
    return net


def stage_work(cfg: DictConfig, want: dict[str, Expected], data: Splits,
               k: int) -> dict[str, float]:
    """Each stage's training work, steps x batch x weights of the network it trains (an
    autoencoder's encoder and decoder): what the progress display estimates time left from."""
    sizes = list(cfg.model.sizes)
    labelled = data.labelled("train")[0]
    deep = sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True)) + sizes[-1] * k

    def work(stage_cfg, x: torch.Tensor, per_sample: int) -> float:
        steps = Minibatches(x, None, stage_cfg.batch_size,
                            steps_per_epoch=stage_cfg.steps_per_epoch).n_steps
        return float(stage_cfg.epochs * steps * stage_cfg.batch_size * per_sample)

    out = {"baseline": work(cfg.baseline, labelled, sizes[0] * k)}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True), start=1):
        out[f"pretrain_layer{i}"] = work(cfg.pretrain, data.train_x, 2 * a * b)
    out["probe"] = work(cfg.probe, labelled, sizes[-1] * k)
    out["finetune"] = work(cfg.finetune, labelled, deep)
    if "scratch" in want:
        out["scratch"] = work(cfg.scratch, labelled, deep)
    return out


def summarise(model: nn.Module, data: Splits, fitted: dict) -> dict:
    """A classifier stage's entry in metrics.json."""
    return {**classifier_metrics(model, data), **fitted}


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
