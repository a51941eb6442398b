"""A run's pictures and its one-file summary: `figures/*.png`, the same images and the HPARAMS
entry in the run's TensorBoard log, and `report.md`.

Built after every run (`visualize.enabled`); `saelab-report RUN_DIR` rebuilds them from a finished
run's checkpoints through `run_experiment`, which loads every stage and trains nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.image import imsave
from omegaconf import DictConfig, OmegaConf
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from saelab import visualize as vis
from saelab.autoencoder import stack_encoders
from saelab.config import visualize_settings
from saelab.errors import ConfigError
from saelab.evaluation import encode
from saelab.stages import AutoencoderStage

log = logging.getLogger("saelab")

FIGURES = "figures"
# The report's own event file and embedding folder in the run's TensorBoard folder, both
# replaced when the report is rebuilt.
EVENT_SUFFIX = ".report"
EMBEDDING_STEP = 0
DEFAULT_SAMPLES = 10
STAGES = {"baseline": "baseline: softmax regression on pixels",
          "probe": "probe: linear head on the frozen pretrained stack",
          "finetune": "fine-tuned: whole stack and head, end to end"}


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


def bodies(run) -> dict[str, torch.nn.Sequential]:
    """The two deep networks whose units are pictured: the stack of pretrained encoders and the
    fine-tuned body (both Linear, activation, Linear, ...)."""
    pretrained = stack_encoders(run.autoencoders).to(run.data.test_x.device)
    return {"pretrained": pretrained, "fine-tuned": run.finetuned[0]}


def pictures(run, settings: DictConfig) -> Iterator[Picture]:
    """Every figure of the run, one at a time (each is rendered and dropped by the caller)."""
    nets = bodies(run)
    yield from reconstruction_pictures(run, nets["pretrained"], settings.samples)
    yield from feature_pictures(run, nets, settings.actmax)
    data, finetune = run.data, run.metrics["finetune"]
    yield Picture("confusion_matrix.png", "finetune/confusion_matrix",
                  "Fine-tuned network on the test set",
                  vis.confusion_figure(finetune["confusion_matrix"], data.class_names,
                                       f"Fine-tuned network, test set: accuracy "
                                       f"{finetune['test_acc']:.2%}"))
    codes = {name: encode(body, data.test_x) for name, body in nets.items()}
    yield Picture("codes_2d.png", "codes/pca",
                  "Top-layer codes of the test set, first two principal components",
                  vis.codes_figure([(f"{name} stack: {c.shape[1]} top codes, PCA", vis.pca_2d(c))
                                    for name, c in codes.items()],
                                   data.test_y, data.class_names))
    yield Picture("curves.png", "summary/curves", "Training curves of every stage",
                  vis.curves_figure([layer["history"] for layer in run.metrics["pretrain"]],
                                    {s: run.metrics[s]["history"] for s in STAGES}))


@torch.no_grad()
def reconstruction_pictures(run, stack: torch.nn.Sequential, samples) -> Iterator[Picture]:
    """Each layer's input, code and reconstruction, then the whole stack's, for a few test
    images. Layer k's input is what it was pretrained on (`pretrain.codes` of layer k-1); the
    whole stack encodes as the deep network does (`stack`) and decodes as the seed did."""
    data, aes = run.data, run.autoencoders
    idx = sample_indices(data.test_y, samples)
    x = inputs = data.test_x[idx]
    labels = [f"{data.class_names[int(data.test_y[i])]}\n(test {i})" for i in idx]
    limits = (data.background, 1.0)
    for k, ae in enumerate(aes, start=1):
        hidden = ae.encode(inputs)
        recon = AutoencoderStage(ae, run.cfg.pretrain, "", "").reconstruct(inputs)
        yield Picture(f"layer{k}_reconstruction.png", f"pretrain/layer{k}/reconstruction",
                      f"Layer {k} autoencoder: input, code and reconstruction of test images",
                      vis.layer_panel(inputs, hidden, recon, labels, k, limits))
        inputs = hidden if run.cfg.pretrain.codes == "activation" else ae.encoder(inputs)
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
    aes, pixels = run.autoencoders, (run.data.background, 1.0)
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
def log_embedding(writer: SummaryWriter, run, points: int) -> None:
    """A seeded subsample of the test codes in TensorBoard's projector, with digit thumbnails."""
    data = run.data
    gen = torch.Generator().manual_seed(run.cfg.seed)
    idx = torch.randperm(len(data.test_y), generator=gen)[:points].sort().values
    thumbs = ((data.test_x[idx].cpu() - data.background) / (1 - data.background))
    names = [data.class_names[int(c)] for c in data.test_y[idx]]
    for name, body in bodies(run).items():
        writer.add_embedding(body(data.test_x[idx]).cpu(), metadata=names,
                             label_img=thumbs.view(-1, 1, 28, 28), global_step=EMBEDDING_STEP,
                             tag=f"codes/{name.replace('-', '')}")


def flat_config(cfg: DictConfig) -> dict[str, int | float | str | bool]:
    """The resolved config as dotted keys; lists and nulls as JSON text (HPARAMS takes scalars)."""
    out: dict[str, int | float | str | bool] = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}{key}.", value)
        else:
            out[prefix[:-1]] = node if isinstance(node, int | float | str) else json.dumps(node)

    walk("", OmegaConf.to_container(cfg, resolve=True))
    return out


def final_metrics(metrics: dict) -> dict[str, float]:
    """The numbers a sweep is compared on: accuracies of every classifier stage and the
    reconstruction MSE of every layer, under tags of their own (not the per-epoch curves)."""
    out = {}
    for stage in STAGES:
        for key in ("test_acc", "val_acc"):
            if key in metrics[stage]:
                out[f"final/{stage}_{key}"] = metrics[stage][key]
    for k, layer in enumerate(metrics["pretrain"], start=1):
        for key in ("val_recon_mse", "test_recon_mse"):
            if key in layer:
                out[f"final/layer{k}_{key}"] = layer[key]
    out["final/train_s"] = training_seconds(metrics)
    return out


def training_seconds(metrics: dict) -> float:
    """Time spent training, summed over stages (kept when a run is reloaded or resumed)."""
    return sum(metrics[s]["seconds"] for s in STAGES) + sum(
        layer["seconds"] for layer in metrics["pretrain"])


def log_hparams(writer: SummaryWriter, run) -> None:
    """The HPARAMS tab entry: the flattened config and the run's real final metrics."""
    metrics = final_metrics(run.metrics)
    file_writer = writer._get_file_writer()
    for summary in hparams(flat_config(run.cfg), metrics):
        file_writer.add_summary(summary)
    for tag, value in metrics.items():
        writer.add_scalar(tag, value, 0)


def markdown_report(run, figures: list[Picture]) -> str:
    """report.md: what was run, the numbers, and every figure."""
    m, data = run.metrics, run.metrics["data"]
    overrides = run.dir / ".hydra" / "overrides.yaml"
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
    for stage, title in STAGES.items():
        s = m[stage]
        val = f"{s['val_acc']:.2%}" if "val_acc" in s else "–"
        lines.append(f"| {title} | {s['test_acc']:.2%} | {val} | {s['seconds']:.1f} s |")
    lines += ["", "Greedy layer-wise pretraining, reconstruction MSE per value:", "",
              "| layer | sizes | train MSE | val MSE | test MSE | time |",
              "|---|---|---:|---:|---:|---:|"]
    for k, layer in enumerate(m["pretrain"], start=1):
        mse = [f"{layer[key]:.4f}" if key in layer else "–"
               for key in ("train_recon_mse", "val_recon_mse", "test_recon_mse")]
        lines.append(f"| {k} | {layer['in']} → {layer['out']} | {' | '.join(mse)} | "
                     f"{layer['seconds']:.1f} s |")
    lines += ["", f"Training time, all stages: {training_seconds(m):.1f} s.", "", "## Figures",
              "", "Every tile of the unit grids (`features_layer*.png`) is divided by its own "
              "largest absolute value: red positive, blue negative, white zero. The "
              "activation-maximisation grids (`*_actmax.png`) show inputs inside the pixel range "
              "and an L2 ball; their colours are normalised the same way.", ""]
    for picture in figures:
        lines += [f"### {picture.caption}", "", f"![{picture.caption}]({FIGURES}/{picture.file})",
                  ""]
    return "\n".join(lines)


def build_report(run) -> Path:
    """Write figures/*.png, their TensorBoard images, the HPARAMS entry, the code embedding and
    report.md for `run`; return the path of report.md."""
    settings = visualize_settings(run.cfg)
    out_dir = run.dir / FIGURES
    out_dir.mkdir(exist_ok=True)
    log_dir = Path(run.logger.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    for old in log_dir.glob(f"events.out.tfevents.*{EVENT_SUFFIX}"):
        old.unlink()
    shutil.rmtree(log_dir / f"{EMBEDDING_STEP:05d}", ignore_errors=True)
    (log_dir / "projector_config.pbtxt").unlink(missing_ok=True)
    done = []
    with SummaryWriter(str(log_dir), filename_suffix=EVENT_SUFFIX) as writer:
        for picture in pictures(run, settings):
            rgb = vis.render(picture.figure)
            png = io.BytesIO()
            imsave(png, rgb, format="png")
            (out_dir / picture.file).write_bytes(png.getvalue())
            image = Summary.Image(height=rgb.shape[0], width=rgb.shape[1], colorspace=3,
                                  encoded_image_string=png.getvalue())
            writer._get_file_writer().add_summary(
                Summary(value=[Summary.Value(tag=picture.tag, image=image)]), 0)
            picture.figure = None
            done.append(picture)
        if settings.embedding_points:
            log_embedding(writer, run, settings.embedding_points)
        log_hparams(writer, run)
    path = run.dir / "report.md"
    path.write_text(markdown_report(run, done))
    log.info("report: %s (%d figures in %s)", path, len(done), out_dir)
    return path


def main(argv: list[str] | None = None) -> None:
    """`saelab-report RUN_DIR`: rebuild the figures and report.md of a finished run."""
    from saelab.cli import load_run_config
    from saelab.config import validate
    from saelab.pipeline import run_experiment

    parser = argparse.ArgumentParser(prog="saelab-report", description=main.__doc__)
    parser.add_argument("run_dir", help="a finished run folder (holding .hydra/config.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg, run_dir = load_run_config(args.run_dir, "RUN_DIR")
        validate(cfg)
        if not (run_dir / "checkpoints" / "finetune.pt").is_file():
            raise ConfigError("RUN_DIR", args.run_dir, "is not a finished run (no "
                              "checkpoints/finetune.pt); finish it with saelab resume=RUN_DIR")
        build_report(run_experiment(cfg, run_dir))
    except ConfigError as exc:
        print(f"saelab-report: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
