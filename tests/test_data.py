"""Data: sources, IDX checks, class subsets, scaling, stratified splits and minibatches."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg

from saelab.data import Minibatches, load_raw, load_splits, stratified_indices
from saelab.errors import ConfigError

MIRROR = Path(os.environ["SAELAB_MIRROR"])


def test_mirror_is_decompressed_into_cache_then_read_from_cache(tmp_path):
    _, y, _, y_test, source = load_raw("mnist", str(tmp_path), str(MIRROR), download=False)
    assert source.startswith("mirror:")
    images = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    assert images.stat().st_size == 16 + 60000 * 784
    # the class counts of the real data set (shared/data/README.md)
    assert torch.bincount(y).tolist() == [5923, 6742, 5958, 6131, 5842,
                                          5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(y_test).tolist() == [980, 1135, 1032, 1010, 982,
                                               892, 958, 1028, 974, 1009]
    assert load_raw("mnist", str(tmp_path), None, download=False)[4] == f"cache:{tmp_path}"


def _mirror_copy(tmp_path: Path, mutate) -> Path:
    """A copy of the MNIST mirror whose train images went through `mutate(bytes) -> bytes`."""
    raw = tmp_path / "mirror" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for src in (MIRROR / "MNIST" / "raw").iterdir():
        (raw / src.name).symlink_to(src)
    images = raw / "train-images-idx3-ubyte.gz"
    data = mutate(gzip.decompress(images.read_bytes()))
    images.unlink()
    images.write_bytes(gzip.compress(data, compresslevel=1))
    return tmp_path / "mirror"


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b[:-100], "truncated"),
    (lambda b: b"\x00\x00\x08\x01" + b[4:], "magic"),
    (lambda b: b[:4] + (59999).to_bytes(4, "big") + b[8:], "dimensions"),
])
def test_corrupt_mirror_is_rejected_naming_the_file(tmp_path, mutate, message):
    mirror = _mirror_copy(tmp_path, mutate)
    with pytest.raises(ConfigError, match=message) as err:
        load_raw("mnist", str(tmp_path / "cache"), str(mirror), download=False)
    assert err.value.key == "data.mirror"
    assert "train-images-idx3-ubyte.gz" in str(err.value)


def test_truncated_gzip_is_a_config_error(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for src in (MIRROR / "MNIST" / "raw").iterdir():
        data = src.read_bytes()
        (raw / src.name).write_bytes(data[: len(data) // 2] if "train-images" in src.name else data)
    with pytest.raises(ConfigError, match="gzip"):
        load_raw("mnist", str(tmp_path / "cache"), str(tmp_path), download=False)


def test_subset_remap_scaling_and_disjoint_stratified_splits():
    cfg = compose_cfg("data.classes=[9,0]", "data.val_size=5000").data
    s = load_splits(cfg, seed=0)
    raw_x, raw_y, raw_tx, raw_ty, _ = load_raw("mnist", cfg.root, cfg.mirror, False)
    # labels remapped in the given order: 9 -> 0, 0 -> 1
    assert s.class_names == ["9", "0"]
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
