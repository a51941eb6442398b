"""Robustness to noisy inputs: how finished runs' classifiers cope with corrupted test images.

`saelab-robustness RUN_DIR [RUN_DIR ...]` reads each finished run with `saelab.load_run` (no
training, no file of the run touched), then measures test accuracy under additive Gaussian noise
and under masking for the pixel baseline (of the first run) and each run's fine-tuned network (and
its from-scratch control, where the run has one), and writes `robustness.csv` and
`robustness.png`. Every model sees the very same corrupted images, so the curves compare models,
not noise draws.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig

from saelab.config.rules import check_folder
from saelab.config.schema import Kind, Noise, Pixels
from saelab.data.splits import PIXEL_SCALES
from saelab.data.transforms import corrupt
from saelab.errors import ConfigError
from saelab.experiment.devices import find_device
from saelab.experiment.run import load_run

# Gaussian sigma in units of [-1, 1] pixels (scaled to each run's pixel range), masked fraction.
LEVELS = {Noise.gaussian: (0.0, 0.1, 0.25, 0.5, 1.0), Noise.masking: (0.0, 0.1, 0.25, 0.5)}
NOISE_SEED = 1234


def noisy(x: torch.Tensor, kind: str, level: float, pixels: str) -> torch.Tensor:
    """`x` corrupted as the study defines it: Gaussian noise clipped to the pixel range, or a
    fraction of pixels set to the background. Seeded, so every model gets the same images."""
    scale = PIXEL_SCALES[Pixels(pixels)]
    low, high = scale(0.0), scale(255.0)
    torch.manual_seed(NOISE_SEED)
    if kind == Noise.gaussian:
        return corrupt(x, kind, level * (high - low) / 2, low).clamp(low, high)
    return corrupt(x, kind, level, low)


def describe(cfg: DictConfig) -> str:
    """A legend label for a run's fine-tuned network: plain or denoising, with its noise, and
    convolutional or not."""
    noise, ae = cfg.pretrain.noise, "conv AE" if cfg.model.kind == Kind.conv else "AE"
    if noise.kind == Noise.none:
        return f"stacked {ae}"
    levels = noise.get("levels")
    level = "/".join(f"{v:g}" for v in levels) if levels else f"{noise.level:g}"
    return f"denoising {ae} ({noise.kind} {level})"


def measure(run_dirs: list[Path], device: str = "cpu") -> list[dict]:
    """One row per model, noise kind and level: the test accuracy on the corrupted test set."""
    rows, labels = [], set()
    first_test_y = None
    for i, run_dir in enumerate(run_dirs):
        run = load_run(run_dir, device)
        cfg, data = run.cfg, run.splits()
        if first_test_y is None:
            first_test_y = data.test_y.cpu()
        elif not torch.equal(first_test_y, data.test_y.cpu()):
            raise ConfigError("RUN_DIR", str(run_dir), "must share the first run's test set")
        label = describe(cfg)
        if label in labels:
            label = f"{label} [{run_dir.name}]"
        labels.add(label)
        models = [("pixel baseline", "baseline")] if i == 0 else []
        models.append((label, "finetune"))
        if "scratch" in run.networks:
            models.append((f"from scratch [{run_dir.name}]", "scratch"))
        for name, model in models:
            for kind, levels in LEVELS.items():
                for level in levels:
                    x = noisy(data.test_x, kind, level, cfg.data.pixels)
                    pred = run.predict(x, model, scaled=True)
                    acc = float((pred == data.test_y).float().mean())
                    rows.append({"model": name, "run": str(run_dir), "noise": kind,
                                 "level": level, "test_acc": acc})
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def noise_plot(rows: list[dict], path: Path) -> None:
    """Test accuracy against noise level, one panel per noise kind, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {Noise.gaussian: "Gaussian noise, sigma (pixels in [-1, 1])",
              Noise.masking: "masking, fraction of pixels set to background"}
    fig, axes = plt.subplots(1, len(LEVELS), figsize=(11, 4), sharey=True)
    for ax, kind in zip(axes, LEVELS, strict=True):
        for model in dict.fromkeys(r["model"] for r in rows):
            pts = [(r["level"], 100 * r["test_acc"]) for r in rows
                   if r["model"] == model and r["noise"] == kind]
            ax.plot(*zip(*pts, strict=True), marker="o", label=model)
        ax.set_xlabel(titles[kind])
        ax.set_xticks(LEVELS[kind])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend()
    fig.suptitle("Robustness to noisy test images")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="saelab-robustness",
        description="Test accuracy of finished runs under Gaussian noise and masking.")
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="finished run folders; the first one also gives the pixel baseline")
    parser.add_argument("--out", type=Path, default=Path("outputs/robustness"),
                        help="folder for robustness.csv and robustness.png")
    parser.add_argument("--device", default="cpu", help="where to evaluate (cpu, cuda, cuda:1)")
    args = parser.parse_args(argv)
    try:
        rows = measure(args.run_dirs, find_device(args.device, "--device"))
        check_folder("--out", args.out)
    except ConfigError as exc:
        print(f"saelab-robustness: error: {exc}", file=sys.stderr)
        sys.exit(2)
    write_csv(rows, args.out / "robustness.csv")
    noise_plot(rows, args.out / "robustness.png")
    for r in rows:
        print(f"{r['model']:<40}{r['noise']:>10}{r['level']:>6g}{r['test_acc']:>9.2%}")
    print(f"wrote {args.out / 'robustness.csv'} and {args.out / 'robustness.png'}")
