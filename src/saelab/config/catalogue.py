"""What the data sets are (names, classes, split sizes), without loading anything: the config rules
check against these before any heavy import."""

from __future__ import annotations

from saelab.config.schema import Dataset

CLASS_NAMES = {
    Dataset.mnist: [str(d) for d in range(10)],
    Dataset.fashion_mnist: ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
}
# Images per class in the official training and test sets (LeCun et al.'s MNIST; Fashion-MNIST
# has 6,000 and 1,000 of each class).
TRAIN_COUNTS = {
    Dataset.mnist: [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
    Dataset.fashion_mnist: [6000] * 10,
}
TEST_COUNTS = {
    Dataset.mnist: [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
    Dataset.fashion_mnist: [1000] * 10,
}
N_TRAIN = 60_000  # data.val_size counts validation images of all ten classes of this many
TITLES = {Dataset.mnist: "MNIST", Dataset.fashion_mnist: "Fashion-MNIST"}
# The folder of each in torchvision's layout: <root>/<folder>/raw/<file stem>.
FOLDERS = {Dataset.mnist: "MNIST", Dataset.fashion_mnist: "FashionMNIST"}
# md5 of the decompressed files, as published with the data sets. A header check cannot tell the
# two data sets apart: Fashion-MNIST's files have MNIST's magic numbers and lengths.
MD5 = {
    Dataset.mnist: {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    Dataset.fashion_mnist: {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}
KNOWN_MD5 = {md5: (name, stem) for name, files in MD5.items() for stem, md5 in files.items()}


def title(name: str, stem: str) -> str:
    """'MNIST train labels' for ("mnist", "train-labels-idx1-ubyte")."""
    split, kind = stem.split("-")[:2]
    return f"{TITLES[Dataset(name)]} {'test' if split == 't10k' else split} {kind}"


def stratified_counts(counts: list[int], n: int) -> list[int]:
    """How many of each class a stratified draw of `n` takes: the class proportions, the largest
    remainders filling the rest (ties to the earlier class)."""
    total = sum(counts)
    exact = [c * n / total for c in counts]
    take = [int(e) for e in exact]
    order = sorted(range(len(counts)), key=lambda i: take[i] - exact[i])
    for i in order[: n - sum(take)]:
        take[i] += 1
    return take


def val_size_of(name: str, classes: list[int], val_size: int) -> int:
    """Validation images of a class subset: `data.val_size` counts them among all ten classes'
    60,000 training images, and a subset keeps the same fraction (0 vs 9: 5,000 -> 989)."""
    return round(val_size * sum(TRAIN_COUNTS[Dataset(name)][c] for c in classes) / N_TRAIN)


def train_counts(name: str, classes: list[int], val_size: int, train_limit: int | None
                 ) -> list[int]:
    """Images per class of a run's training split (after its validation split and
    `data.train_limit`), from the data set's published counts: the bound that
    `data.labels_per_class` is checked against before any data is read."""
    counts = [TRAIN_COUNTS[Dataset(name)][c] for c in classes]
    n_val = val_size_of(name, classes, val_size)
    train = [c - v for c, v in zip(counts, stratified_counts(counts, n_val), strict=True)]
    return stratified_counts(train, min(train_limit, sum(train))) if train_limit else train


def test_size(name: str, classes: list[int], limit: int | None) -> int:
    """Test images of a class subset, after `data.test_limit`."""
    n = sum(TEST_COUNTS[Dataset(name)][c] for c in classes)
    return min(n, limit) if limit else n
