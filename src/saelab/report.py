"""A run's pictures and its one-file summary: `figures/*.png`, the same images and the final
metrics in the run's logger (TensorBoard images and HPARAMS, MLflow artifacts), and `report.md`.

Built after every run (`visualize.enabled`); `saelab-report RUN_DIR` rebuilds them from a finished
run read by `saelab.load_run`, which trains nothing and refuses an unfinished or damaged run.
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.image import imsave
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import TensorBoardLogger

from saelab import visualize as vis
from saelab.errors import ConfigError
from saelab.evaluation import in_chunks
from saelab.loader import PRETRAINED, Run
from saelab.loggers import REPORT_SUFFIX, log_figure, make_logger
from saelab.modules import AutoencoderModule
from saelab.runfolder import FIGURES, OVERRIDES, REPORT, RunFolder
from saelab.schema import Codes
from saelab.signals import STOP
from saelab.stages import plan

log = logging.getLogger("saelab")

EMBEDDING_STEP = 0  # the projector's folder in the TensorBoard log, replaced with the report
DEFAULT_SAMPLES = 10


@dataclass
class Picture:
    """One figure: its PNG in figures/, its TensorBoard tag and what it shows."""

    file: str
    tag: str
    caption: str
    figure: Figure | None = None


def sample_indices(labels: torch.Tensor, samples) -> list[int]:
    """The configured test indices, or the first test images of each class: about ten in all
    (one per class for ten classes, five each for two)."""
    if samples is None:
        classes = labels.unique().tolist()
        per_class = math.ceil(DEFAULT_SAMPLES / len(classes))
        return [i for c in classes for i in (labels == c).nonzero()[:per_class, 0].tolist()]
    samples = list(samples)
    if max(samples) >= len(labels):
        raise ConfigError("visualize.samples", samples,
                          f"indices must be below the test-set size {len(labels)}")
    return samples


# The two deep networks whose units are pictured, by stack name (`Run.stacks`) and in words.
PICTURED = {PRETRAINED: "pretrained", "finetune": "fine-tuned"}


def bodies(run: Run) -> dict[str, torch.nn.Sequential]:
    """The stacks of the pictured networks (Linear, activation, Linear, ...), by their words."""
    stacks = run.stacks
    return {words: stacks[name] for name, words in PICTURED.items()}


def pictures(run, settings: DictConfig) -> Iterator[Picture]:
    """Every figure of the run, one at a time (each is rendered and dropped by the caller)."""
    nets = bodies(run)
    yield from reconstruction_pictures(run, nets["pretrained"], settings.samples)
    yield from feature_pictures(run, nets, settings.actmax)
    data, finetune = run.splits(), run.metrics["finetune"]
    stages = plan(run.cfg)
    yield Picture("confusion_matrix.png", "finetune/confusion_matrix",
                  "Fine-tuned network on the test set",
                  vis.confusion_figure(finetune["confusion_matrix"], data.class_names,
                                       f"Fine-tuned network, test set: accuracy "
                                       f"{finetune['test_acc']:.2%}"))
    codes = {name: in_chunks(body, data.test_x) for name, body in nets.items()}
    yield Picture("codes_2d.png", "codes/pca",
                  "Top-layer codes of the test set, first two principal components",
                  vis.codes_figure([(f"{name} stack: {c.shape[1]} top codes, PCA", vis.pca_2d(c))
                                    for name, c in codes.items()],
                                   data.test_y, data.class_names))
    yield Picture("curves.png", "summary/curves", "Training curves of every stage",
                  vis.curves_figure([run.metrics[s.name]["history"] for s in stages
                                     if not s.classifies],
                                    {s.name: run.metrics[s.name]["history"] for s in stages
                                     if s.classifies}))


@torch.no_grad()
def reconstruction_pictures(run, stack: torch.nn.Sequential, samples) -> Iterator[Picture]:
    """Each layer's input, code and reconstruction, then the whole stack's, for a few test
    images. Layer k's input is what it was pretrained on (`pretrain.codes` of layer k-1); the
    whole stack encodes as the deep network does (`stack`) and decodes as the seed did."""
    data, aes = run.splits(), run.autoencoders
    idx = sample_indices(data.test_y, samples)
    x = inputs = data.test_x[idx]
    labels = [f"{data.class_names[int(data.test_y[i])]}\n(test {i})" for i in idx]
    limits = (data.background, 1.0)
    for k, ae in enumerate(aes, start=1):
        hidden = ae.encode(inputs)
        recon = AutoencoderModule(ae, run.cfg.pretrain, "", "").reconstruct(inputs)
        yield Picture(f"layer{k}_reconstruction.png", f"pretrain/layer{k}/reconstruction",
                      f"Layer {k} autoencoder: input, code and reconstruction of test images",
                      vis.layer_panel(inputs, hidden, recon, labels, k, limits))
        inputs = hidden if run.cfg.pretrain.codes == Codes.activation else ae.encoder(inputs)
        # Deeper codes rarely span the pixel range: their own range keeps them legible.
        seen = torch.cat([inputs.flatten(), aes[k].encode(inputs).flatten()]) if k < len(aes) \
            else x
        limits = (round(float(seen.min()), 2), round(float(seen.max()), 2))
    squash = aes[0].activation
    yield Picture("stack_reconstruction.png", "stack/reconstruction",
                  f"Whole stack: encoded through every layer, decoded back, then "
                  f"{type(squash).__name__}",
                  vis.image_pairs(x, squash(vis.decode_stack(aes, stack(x))), labels,
                                  ("original", "stack output"), (data.background, 1.0),
                                  f"Encoded to {aes[-1].encoder.out_features} codes and decoded "
                                  f"back through every decoder, then {type(squash).__name__}"))


def feature_pictures(run, nets: dict[str, torch.nn.Sequential],
                     actmax: DictConfig) -> Iterator[Picture]:
    """Every unit of every layer in pixel space: decoded (pretrained decoders, biases removed)
    and by activation maximisation in the pretrained and the fine-tuned network."""
    aes, pixels = run.autoencoders, (run.splits().background, 1.0)
    for k in range(1, len(aes) + 1):
        yield Picture(f"features_layer{k}.png", f"pretrain/layer{k}/features",
                      f"Layer {k} units decoded to pixels (biases removed)",
                      vis.tile_grid(vis.unit_features(aes[:k]),
                                    f"Layer {k}: each unit's one-hot code decoded through "
                                    f"decoders {k}..1\n(biases removed)"))
    for name, body in nets.items():
        stage, suffix = ("pretrain", "") if name == "pretrained" else ("finetune", "_finetuned")
        for k, ae in enumerate(aes, start=1):
            best = vis.activation_maximisation(
                body[: 2 * k - 1], aes[0].encoder.in_features, ae.encoder.out_features,
                steps=actmax.steps, lr=actmax.lr, norm=actmax.norm, bounds=pixels,
                seed=run.cfg.seed)
            with torch.no_grad():
                reached = float(body[: 2 * k](best).diagonal().mean())
            yield Picture(f"features_layer{k}{suffix}_actmax.png",
                          f"{stage}/layer{k}/actmax",
                          f"Layer {k} units of the {name} network: inputs maximising each unit",
                          vis.tile_grid(best, f"Layer {k}, {name} network: input maximising "
                                        f"each unit\n(L2 norm {actmax.norm:g}, mean activation "
                                        f"reached {reached:.2f})"))


@torch.no_grad()
def log_embedding(logger: TensorBoardLogger, run: Run, points: int) -> None:
    """A seeded subsample of the test codes in TensorBoard's projector, with digit thumbnails."""
    data, writer = run.splits(), logger.experiment
    gen = torch.Generator().manual_seed(run.cfg.seed)
    idx = torch.randperm(len(data.test_y), generator=gen)[:points].sort().values
    thumbs = ((data.test_x[idx].cpu() - data.background) / (1 - data.background))
    names = [data.class_names[int(c)] for c in data.test_y[idx]]
    for name, body in bodies(run).items():
        writer.add_embedding(body(data.test_x[idx]).cpu(), metadata=names,
                             label_img=thumbs.view(-1, 1, 28, 28), global_step=EMBEDDING_STEP,
                             tag=f"codes/{name.replace('-', '')}")


def training_seconds(run: Run) -> float:
    """Time spent training, summed over stages (kept when a run is reloaded or resumed)."""
    return sum(run.metrics[s.name]["seconds"] for s in plan(run.cfg))


def markdown_report(run, figures: list[Picture]) -> str:
    """report.md: what was run, the numbers, and every figure."""
    m, data = run.metrics, run.metrics["data"]
    overrides = run.dir / OVERRIDES
    given = OmegaConf.load(overrides) if overrides.is_file() else []
    lines = [f"# saelab run `{run.dir.name}`", "",
             f"{data['name']}, classes {', '.join(data['class_names'])}: {data['n_train']} train / "
             f"{data['n_val']} val / {data['n_test']} test images (source `{data['source']}`). "
             f"Network {' → '.join(str(s) for s in run.cfg.model.sizes)} "
             f"({run.cfg.model.activation}); saelab {m['version']}, commit {m['git_commit']}, "
             f"seed {m['seed']}.", "", "## Config overrides", ""]
    lines += [f"    {o}" for o in given] or ["None: the default config."]
    lines += ["", "Full config: `.hydra/config.yaml`; all numbers: `metrics.json`.", "",
              "## Results", "", "| stage | test accuracy | val accuracy | time |",
              "|---|---:|---:|---:|"]
    stages = plan(run.cfg)
    for stage in (s for s in stages if s.classifies):
        s = m[stage.name]
        val = f"{s['val_acc']:.2%}" if "val_acc" in s else "–"
        lines.append(f"| {stage.name}: {stage.about} | {s['test_acc']:.2%} | {val} | "
                     f"{s['seconds']:.1f} s |")
    lines += ["", "Greedy layer-wise pretraining, reconstruction MSE per value:", "",
              "| layer | sizes | train MSE | val MSE | test MSE | time |",
              "|---|---|---:|---:|---:|---:|"]
    for k, stage in enumerate((s for s in stages if not s.classifies), start=1):
        layer = m[stage.name]
        mse = [f"{layer[key]:.4f}" if key in layer else "–"
               for key in ("train_recon_mse", "val_recon_mse", "test_recon_mse")]
        lines.append(f"| {k} | {layer['in']} → {layer['out']} | {' | '.join(mse)} | "
                     f"{layer['seconds']:.1f} s |")
    lines += ["", f"Training time, all stages: {training_seconds(run):.1f} s.", "", "## Figures",
              "", "Every tile of the unit grids (`features_layer*.png`) is divided by its own "
              "largest absolute value: red positive, blue negative, white zero. The "
              "activation-maximisation grids (`*_actmax.png`) show inputs inside the pixel range "
              "and an L2 ball; their colours are normalised the same way.", ""]
    for picture in figures:
        lines += [f"### {picture.caption}", "", f"![{picture.caption}]({FIGURES}/{picture.file})",
                  ""]
    return "\n".join(lines)


def build_report(run: Run, folder: RunFolder) -> Path:
    """Write figures/*.png, the same images and the code embedding in the run's logger, and
    report.md for `run` into `folder` (whose lock the caller holds); return report.md's path."""
    settings = run.cfg.visualize
    logger = make_logger(run.cfg, run.dir, report=True,
                         mlflow_run_id=run.metrics.get("mlflow_run_id"))
    tensorboard = isinstance(logger, TensorBoardLogger)
    if tensorboard:  # the previous report's event file and projector, replaced
        log_dir = Path(logger.log_dir).relative_to(run.dir)
        for rel in folder.owned_files() & folder.files_under(str(log_dir)):
            name = Path(rel).name
            if name.endswith(REPORT_SUFFIX) or name == "projector_config.pbtxt" or \
                    Path(rel).parent.name == f"{EMBEDDING_STEP:05d}":
                (run.dir / rel).unlink()
    before = folder.logger_files()
    done = []
    for picture in pictures(run, settings):
        STOP.check()
        rgb = vis.render(picture.figure)
        png = io.BytesIO()
        imsave(png, rgb, format="png")
        rel = f"{FIGURES}/{picture.file}"
        if (run.dir / rel).exists() and rel not in folder.owned_files():
            log.warning("report: %s is not saelab's; left as it is", rel)
            continue
        folder.write(rel, png.getvalue())
        log_figure(logger, picture.tag, rgb, run.dir / rel)
        picture.figure = None
        done.append(picture)
    if tensorboard and settings.embedding_points:
        log_embedding(logger, run, settings.embedding_points)
    logger.finalize("success")
    folder.claim_logger_files(before)
    folder.write(REPORT, markdown_report(run, done))
    log.info("report: %s (%d figures in %s)", run.dir / REPORT, len(done), run.dir / FIGURES)
    return run.dir / REPORT


def main(argv: list[str] | None = None) -> None:
    """`saelab-report RUN_DIR`: rebuild the figures and report.md of a finished run (read with
    saelab.load_run: nothing is trained, and an unfinished or damaged run is refused as is)."""
    from saelab.loader import load_run

    parser = argparse.ArgumentParser(prog="saelab-report", description=main.__doc__)
    parser.add_argument("run_dir", help="a finished run folder (holding .hydra/config.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        holder = RunFolder(Path(args.run_dir)).in_use()
        if holder is not None:
            raise ConfigError("RUN_DIR", args.run_dir, f"is in use by {holder}; wait for it")
        run = load_run(args.run_dir)
        folder = RunFolder(run.dir)
        folder.lock()  # the report writes into the folder: no run may be writing there
        try:
            build_report(run, folder)
        finally:
            folder.unlock()
    except ConfigError as exc:
        print(f"saelab-report: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
