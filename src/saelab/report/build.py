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

from saelab.config import kinds
from saelab.config.schema import Codes
from saelab.errors import ConfigError
from saelab.experiment.loggers import REPORT_SUFFIX, log_figure, make_logger
from saelab.experiment.run import PRETRAINED, Run, load_run
from saelab.experiment.stages import plan
from saelab.nn.evaluation import in_chunks
from saelab.nn.modules import AutoencoderModule, ClassifierModule
from saelab.nn.networks import StackedNet
from saelab.report import figures as vis
from saelab.runs.folder import FIGURES, OVERRIDES, REPORT, RunFolder
from saelab.signals import STOP

log = logging.getLogger("saelab")

EMBEDDING_STEP = 0  # the projector's folder in the TensorBoard log, replaced with the report
DEFAULT_SAMPLES = 10
# A unit whose activation varies less than this over the test images is called constant (on
# the default run: exactly the layer-1 tanh units saturated on over 90 % of the test images).
CONSTANT_STD = 0.02
MAPS = 8  # the channels a reconstruction panel shows of each layer's feature maps


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


def bodies(run: Run) -> dict[str, StackedNet]:
    """The stacks of the pictured networks, by their words."""
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
    codes = {name: in_chunks(body.codes, data.test_x) for name, body in nets.items()}
    yield Picture("codes_2d.png", "codes/pca",
                  "Top-layer codes of the test set, first two principal components",
                  vis.codes_figure([(f"{name} stack: {c.shape[1]} top codes, PCA", vis.pca_2d(c))
                                    for name, c in codes.items()],
                                   data.test_y, data.class_names))
    yield Picture("curves.png", "summary/curves", "Training curves of every stage",
                  vis.curves_figure([run.metrics[s.name]["history"] for s in stages
                                     if not s.classifies],
                                    {s.name: run.metrics[s.name]["history"] for s in stages
                                     if s.classifies},
                                    (AutoencoderModule.monitor, AutoencoderModule.mode),
                                    (ClassifierModule.monitor, ClassifierModule.mode)))


@torch.no_grad()
def reconstruction_pictures(run, stack: StackedNet, samples) -> Iterator[Picture]:
    """Each layer's input, code and reconstruction, then the whole stack's, for a few test
    images. Layer k's input is what it was pretrained on (`pretrain.codes` of layer k-1); the
    whole stack encodes as the deep network does (`stack`) and decodes as the seed did."""
    data, aes = run.splits(), run.autoencoders
    idx = sample_indices(data.test_y, samples)
    x = inputs = data.test_x[idx]
    labels = [f"{data.class_names[int(data.test_y[i])]}\n(test {i})" for i in idx]
    pixels = (data.background, 1.0)
    gray = f"Pixels in gray, {pixels[0]:g} black to {pixels[1]:g} white."
    strips = ("Codes are vectors, not images: each is a heat strip, one band per unit "
              f"({vis.UNIT_NUMBERING}), coloured by its value (scale at right).")
    maps = (f"Feature maps are images, one per channel (the first {MAPS} channels, numbered "
            f"from 0 left to right), coloured by their values (scale at right).")
    linear = run.cfg.pretrain.codes == Codes.pre_activation
    for k, ae in enumerate(aes, start=1):
        hidden = ae.encode(inputs)
        recon = AutoencoderModule(ae, run.cfg.pretrain, "", "").reconstruct(inputs)
        (d_in, d_out), (shape_in, shape_out) = ae.sizes, ae.shapes
        code = (f"code: layer {k}, {layer_words(shape_out)}", drawn(hidden, shape_out), False)
        if k == 1:
            columns = [(f"input: {d_in} pixels", inputs, True), code,
                       (f"output: {d_in} pixels", recon, True)]
            how = f"Each row: one test image. {gray} {maps if is_maps(shape_out) else strips}"
        else:
            below = f"layer {k - 1} code{' before its activation' if linear else ''}"
            words = layer_words(shape_in)
            columns = [("test image", x, True),
                       (f"input: {below}, {words}", drawn(inputs, shape_in), False), code,
                       (f"output: that input reconstructed, {words}", drawn(recon, shape_in),
                        False)]
            how = (f"Each row: one test image (at left, for orientation); this layer's input is "
                   f"its {below}. {maps if is_maps(shape_out) else strips} Input and output "
                   f"line up unit by unit.")
        yield Picture(f"layer{k}_reconstruction.png", f"pretrain/layer{k}/reconstruction",
                      f"Layer {k} autoencoder: input, code and reconstruction of test images",
                      vis.layer_panel(columns, labels, pixels,
                                      f"Layer {k} autoencoder, {d_in} → {d_out} → {d_in}: "
                                      f"input, code and reconstruction of test images", how))
        inputs = ae.encoder(inputs) if linear else hidden
    squash, then = aes[0].activation, type(aes[0].activation).__name__
    if isinstance(squash, torch.nn.ReLU):  # it would blank every dark pixel: clip to the range
        squash, then = (lambda v: v.clamp(*pixels)), "clipped to the pixel range"
    yield Picture("stack_reconstruction.png", "stack/reconstruction",
                  f"Whole stack: encoded through every layer, decoded back, then {then}",
                  vis.image_pairs(x, squash(vis.decode_stack(aes, stack.codes(x))), labels,
                                  ("original", "stack output"), pixels,
                                  f"Encoded to {aes[-1].sizes[1]} codes and decoded back "
                                  f"through every decoder, then {then}",
                                  f"Each column: one test image (above) and what the whole "
                                  f"pretrained stack makes of it (below): encoded through all "
                                  f"{len(aes)} encoders, decoded through decoders "
                                  f"{len(aes)} to 1, then {then}. {gray}"))


def is_maps(shape: tuple[int, ...]) -> bool:
    """Whether a layer's codes are feature maps (channels, side, side) rather than a vector."""
    return len(shape) == 3


def layer_words(shape: tuple[int, ...]) -> str:
    """A layer's codes in words: `49 units`, or `32 maps of 14 × 14`."""
    if not is_maps(shape):
        return f"{shape[0]} units"
    channels, side, _ = shape
    return f"{channels} maps of {side} × {side} (0-{min(channels, MAPS) - 1} shown)"


def drawn(codes: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Codes as a reconstruction panel draws them: strips, or the first channels' maps."""
    return vis.maps_row(codes, shape, MAPS) if is_maps(shape) else codes


def decoders(k: int) -> str:
    """Which decoders a layer-k unit is decoded through, in order."""
    return "decoder 1" if k == 1 else f"decoders {', '.join(str(i) for i in range(k, 0, -1))}"


def feature_pictures(run, nets: dict[str, StackedNet],
                     actmax: DictConfig) -> Iterator[Picture]:
    """Every unit of every layer in pixel space: decoded (pretrained decoders, biases removed);
    by activation maximisation in the pretrained network, beside the decoded feature of the same
    unit; and by activation maximisation in the fine-tuned network, beside the pretrained one."""
    aes = run.autoencoders
    method = (f"the input of L2 norm {actmax.norm:g} within the pixel range that drives the unit "
              f"hardest ({actmax.steps} steps of projected gradient ascent)")
    codes = run.splits().test_x
    for k, ae in enumerate(aes, start=1):
        units, through = ae.units.to(run.device), decoders(k)
        n, noun, numbering = len(units), *pictured(ae)
        tiles = (f"{numbering}. Each tile is scaled to its own largest |value|: red positive, "
                 f"blue negative, white zero.")
        decoded = vis.unit_features(aes[:k])
        codes = in_chunks(lambda c, k=k: nets["pretrained"].layer(c, k), codes)  # layer k's
        constant = constant_units(codes[:, units])
        if ae.filters is not None:  # filters that see the pixels themselves
            side = math.isqrt(ae.filters.shape[1])
            yield Picture(f"filters_layer{k}.png", f"pretrain/layer{k}/filters",
                          f"Layer {k} filters", vis.unit_grid(
                              [ae.filters],
                              f"Layer {k}: its {n} filters, {side} × {side} pixels each",
                              f"Each numbered tile: the weights channel c multiplies the "
                              f"{side} × {side} pixels under it with, at every position of the "
                              f"image. {tiles}"))
        yield Picture(f"features_layer{k}.png", f"pretrain/layer{k}/features",
                      f"Layer {k} {noun}s decoded to pixels (biases removed)",
                      vis.unit_grid([decoded], f"Layer {k}: its {n} {noun}s decoded to pixels",
                                    f"Each numbered tile: the unit's one-hot code decoded through "
                                    f"{through}, biases removed: the pattern the unit adds to a "
                                    f"reconstruction. {tiles}{constant}"))
        pretrained, reached = maximise(run, nets["pretrained"], k, units, actmax)
        finetuned, reached_ft = maximise(run, nets["fine-tuned"], k, units, actmax)
        yield Picture(
            f"features_layer{k}_actmax.png", f"pretrain/layer{k}/actmax",
            f"Layer {k} {noun}s of the pretrained stack: decoded feature and input maximising "
            f"each {noun}",
            vis.unit_grid(
                [decoded, pretrained],
                f"Layer {k}, pretrained stack: what each unit writes (left) and what drives it "
                f"(right)",
                f"Each numbered cell, one unit. Left: its decoded feature (as in "
                f"features_layer{k}.png). Right: its activation maximiser, {method}; mean "
                f"activation reached {reached:.2f}. {tiles}{constant}\n{why_noisy(run, ae)}"))
        yield Picture(
            f"features_layer{k}_finetuned_actmax.png", f"finetune/layer{k}/actmax",
            f"Layer {k} {noun}s before and after fine-tuning: inputs maximising each {noun}",
            vis.unit_grid(
                [pretrained, finetuned],
                f"Layer {k}: input driving each unit hardest, pretrained (left) and fine-tuned "
                f"(right)",
                f"Each numbered cell, one unit: its activation maximiser, {method}, in the "
                f"pretrained stack (left, as in features_layer{k}_actmax.png; mean activation "
                f"reached {reached:.2f}) and in the fine-tuned network (right; {reached_ft:.2f}): "
                f"what fine-tuning made of the unit, which the pretrained decoders no longer "
                f"describe. {tiles}"))


def pictured(ae) -> tuple[str, str]:
    """What a layer's tiles stand for, and how they are numbered: units of a dense layer;
    channels of a convolutional one, each by its unit at the centre of its map."""
    if not is_maps(ae.shapes[1]):
        return "unit", vis.UNIT_NUMBERING.capitalize()
    return "channel", ("Channels are numbered from 0, channel c being map c of the layer's codes; "
                       "each is pictured by its unit at the centre of its map (the unit in "
                       "these captions): every unit of a channel applies the same filter, "
                       "shifted, so the centre one shows the channel's pattern")


def why_noisy(run, ae) -> str:
    """Why the pretrained maximisers look like pixel noise beside the decoded features."""
    if is_maps(ae.shapes[1]):
        return ("A channel's maximiser only moves the pixels its centre unit sees (its receptive "
                "field, around the image's centre), mostly to the ends of the pixel range: "
                "maximum pooling rewards the strongest response anywhere in each window, which a "
                "saturated checkerboard of the filter's signs gives. Outside the field the input "
                "keeps its small random start.")
    if run.cfg.model.tied:
        return ("With tied weights a layer-1 unit's two tiles show the same weights: its "
                "maximiser is its encoder weight vector scaled, its decoded feature the same "
                "vector.")
    return ("Why the maximisers look like pixel noise: a layer-1 unit's maximiser is its "
            "encoder weight vector, scaled. Along directions in which the training images "
            "hardly ever differ (the always-blank border, fine pixel-to-pixel patterns), "
            "training leaves those weights near their random initial values: they barely change "
            "the unit's response to a digit, but the maximiser draws them. Deeper units see the "
            "pixels through these weights. The decoded feature, trained on every pixel, shows "
            "the unit's pattern.")


def constant_units(codes: torch.Tensor) -> str:
    """A sentence naming the units that are constant over the test set's `codes` (as the
    saturated units of a tanh layer are), or "" when there are none."""
    units = (codes.std(0) < CONSTANT_STD).nonzero()[:, 0].tolist()
    if not units:
        return ""
    return (f" Constant units (standard deviation over the test images below {CONSTANT_STD:g}: "
            f"a second bias, not detectors, so their tiles show no feature): "
            f"{', '.join(map(str, units))}.")


def maximise(run, body: StackedNet, k: int, units: torch.Tensor,
             actmax: DictConfig) -> tuple[torch.Tensor, float]:
    """The input maximising each of the pictured `units` of layer k of `body`, and the mean
    activation those inputs reach."""
    best = vis.activation_maximisation(
        lambda x: body.pre_activation(x, k)[:, units], run.autoencoders[0].sizes[0], len(units),
        steps=actmax.steps, lr=actmax.lr, norm=actmax.norm,
        bounds=(run.splits().background, 1.0), seed=run.cfg.seed, device=run.device)
    with torch.no_grad():
        return best, float(body.codes(best, k)[:, units].diagonal().mean())


@torch.no_grad()
def log_embedding(logger: TensorBoardLogger, run: Run, points: int) -> None:
    """A seeded subsample of the test codes in TensorBoard's projector, with digit thumbnails."""
    data, writer = run.splits(), logger.experiment
    gen = torch.Generator().manual_seed(run.cfg.seed)
    idx = torch.randperm(len(data.test_y), generator=gen)[:points].sort().values
    thumbs = ((data.test_x[idx].cpu() - data.background) / (1 - data.background))
    names = [data.class_names[int(c)] for c in data.test_y[idx]]
    for name, body in bodies(run).items():
        writer.add_embedding(body.codes(data.test_x[idx]).cpu(), metadata=names,
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
             f"Network {' → '.join('×'.join(map(str, s)) for s in kinds.shapes(run.cfg.model))} "
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
    lines += ["", "Greedy layer-wise pretraining: reconstruction MSE per value, and the "
              "encoder's contraction on validation, ‖J‖²_F (the squared norm of its Jacobian, "
              "averaged over the images: how much the codes move when the input does):", "",
              "| layer | sizes | train MSE | val MSE | test MSE | val ‖J‖²_F | time |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for k, stage in enumerate((s for s in stages if not s.classifies), start=1):
        layer = m[stage.name]
        mse = [f"{layer[key]:.4f}" if key in layer else "–"
               for key in ("train_recon_mse", "val_recon_mse", "test_recon_mse")]
        contraction = f"{layer['val_contraction']:.3g}" if "val_contraction" in layer else "–"
        maps = layer.get("shape", [])
        shape = f" ({'×'.join(map(str, maps))})" if len(maps) == 3 else ""
        lines.append(f"| {k} | {layer['in']} → {layer['out']}{shape} | {' | '.join(mse)} | "
                     f"{contraction} | {layer['seconds']:.1f} s |")
    lines += ["", f"Training time, all stages: {training_seconds(run):.1f} s.", "", "## Figures",
              "", f"Layers are numbered from 1 (input side first); {vis.UNIT_NUMBERING}, in "
              "every figure and in TensorBoard's images, which are the same figures. Dense "
              "codes are drawn as heat strips, one band per unit, since their units have no "
              "spatial layout; a convolutional layer's codes are feature maps, drawn as images, "
              "and its units are pictured channel by channel. In the unit grids "
              "(`features_layer*.png`) every tile is divided by its own largest absolute value: "
              "red positive, blue negative, white zero. Each figure says below it how to read "
              "it; the `*_actmax.png` grids pair each unit's activation maximiser with its "
              "decoded feature (pretrained stack) or with its pretrained maximiser (fine-tuned "
              "network).", ""]
    for picture in figures:
        lines += [f"### {picture.caption}", "", f"![{picture.caption}]({FIGURES}/{picture.file})",
                  ""]
    return "\n".join(lines)


def figures(run: Run, *names: str) -> dict[str, Figure]:
    """`saelab.figures(run)`: the run's figures as matplotlib figures, by name (the report's file
    names without `.png`: `layer1_reconstruction`, `features_layer1`, `codes_2d`, ...), drawn by
    the very code that draws the report; with `names`, only those are kept (every figure is
    still drawn once: a few seconds on the default run). In Jupyter a figure displays inline."""
    drawn = {p.file.removesuffix(".png"): p.figure for p in pictures(run, run.cfg.visualize)}
    unknown = [n for n in names if n not in drawn]
    if unknown:
        raise ConfigError("figure", unknown[0], f"allowed: {', '.join(drawn)}")
    return {n: f for n, f in drawn.items() if not names or n in names}


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
