"""`saelab-encode RUN_DIR`: what a finished run learned, out to one `.npz` for other code.

For the run's train / val / test splits (with their labels), or for your own images (a `.npy` of
N x 28 x 28 or N x 784 uint8 pixels, or an IDX file), it writes the codes of one hidden layer of
the pretrained, fine-tuned or scratch stack and the class probabilities and predictions of the
fine-tuned classifier:

    codes_<part>  (N, *shape) float32      proba_<part>  (N, k) float32
    pred_<part>   (N,) int64               labels_<part> (N,) int64, for the run's splits
    classes       the data set's classes (`data.classes`), in the order of the labels

where `shape` is the layer's: (units,) for a dense layer, (channels, side, side) for the maps of a
convolutional one.

Nothing is written into the run folder unless `--out` points there.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from saelab.data.files import IMAGES_MAGIC, check_idx, read_idx
from saelab.errors import ConfigError
from saelab.experiment.devices import find_device
from saelab.experiment.run import PRETRAINED, Run, load_run

SPLITS = ("train", "val", "test")


def read_images(path: Path) -> np.ndarray:
    """Images from a `.npy` file or an IDX file (plain or .gz), as stored."""
    if not path.is_file():
        raise ConfigError("--images", str(path), "no such file")
    if path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise ConfigError("--images", str(path), f"not a .npy array ({exc})") from None
    raw = read_idx(path, "--images")
    check_idx(raw, path, IMAGES_MAGIC, (28, 28), None, "--images")
    return np.frombuffer(bytearray(raw), dtype=np.uint8, offset=16).reshape(-1, 28, 28)


def outputs(run: Run, part: str, x, layer: int | None, stack: str, scaled: bool) -> dict:
    """The arrays of one part: codes, probabilities and predictions."""
    proba = run.predict_proba(x, scaled=scaled)
    return {f"codes_{part}": run.encode(x, layer, stack, scaled=scaled,
                                                    maps=True).cpu().numpy(),
            f"proba_{part}": proba.cpu().numpy(), f"pred_{part}": proba.argmax(1).cpu().numpy()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="saelab-encode", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder")
    parser.add_argument("--layer", type=int, default=None,
                        help="hidden layer whose codes to write (1 = first; default: the top)")
    parser.add_argument("--stack", default=PRETRAINED,
                        help="the encoders computing the codes: pretrain (default), finetune, "
                             "scratch")
    parser.add_argument("--splits", default=",".join(SPLITS),
                        help="the run's splits to encode, comma-separated (default: all)")
    parser.add_argument("--images", type=Path, default=None,
                        help="encode these images instead (.npy or IDX, uint8, 28x28 or 784)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the .npz to write (default: <run name>_layer<k>_<stack>.npz here)")
    parser.add_argument("--device", default="cpu", help="where to compute (cpu, cuda, cuda:1)")
    args = parser.parse_args(argv)
    try:
        start = time.perf_counter()
        run = load_run(args.run_dir, find_device(args.device, "--device"))
        layer = args.layer if args.layer is not None else len(run.autoencoders)
        out = args.out or Path(f"{run.dir.name}_layer{layer}_{args.stack}.npz")
        if args.out is None and out.resolve().is_relative_to(run.dir):
            raise ConfigError("--out", str(out), "the default lies inside the run folder; "
                              "name the file with --out to write there")
        arrays = {"classes": np.array(run.metrics["data"]["classes"])}
        if args.images is not None:
            arrays |= outputs(run, "images", read_images(args.images), layer, args.stack, False)
        else:
            splits = [s for s in args.splits.split(",") if s]
            if not splits or set(splits) - set(SPLITS):
                raise ConfigError("--splits", args.splits, f"a comma-separated subset of "
                                  f"{','.join(SPLITS)}")
            data = run.splits()
            for split in splits:
                x, y = getattr(data, f"{split}_x"), getattr(data, f"{split}_y")
                arrays |= outputs(run, split, x, layer, args.stack, True)
                arrays[f"labels_{split}"] = y.cpu().numpy()
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            np.savez(out, **arrays)
        except OSError as exc:
            raise ConfigError("--out", str(out), f"cannot be written ({exc.strerror})") from None
    except ConfigError as exc:
        print(f"saelab-encode: error: {exc}", file=sys.stderr)
        sys.exit(2)
    sizes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in arrays.items() if k != "classes")
    print(f"wrote {out} ({sizes}) in {time.perf_counter() - start:.1f} s")
