"""Task sets: non-empty subsets of the K named tasks, stored as integer bitmasks (docs/design.md §2)."""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from pamfx.errors import InputError

TaskSet = int
SEPARATOR = "&"  # joins task names in a task set's label, e.g. ``A&B``


@dataclass(frozen=True)
class TaskSpace:
    """The ordered names of the K tasks; task ``names[i]`` is bit ``1 << i`` of a task set."""

    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(set(self.names)) != len(self.names):
            raise InputError(f"task names must be unique, got {list(self.names)}")
        if any(not isinstance(n, str) or not n for n in self.names):
            raise InputError(f"task names must be non-empty strings, got {list(self.names)}")
        if any(SEPARATOR in n for n in self.names):
            raise InputError(
                f"task names must not contain {SEPARATOR!r}, which joins the names of a task set "
                f"(a task 'A{SEPARATOR}B' would read as the set {{A, B}}); got {list(self.names)}"
            )

    @property
    def k(self) -> int:
        return len(self.names)

    @property
    def all(self) -> TaskSet:
        """The task set of every task (the `shared` group)."""
        return (1 << self.k) - 1

    def bit(self, name: str) -> TaskSet:
        try:
            return 1 << self.names.index(name)
        except ValueError:
            raise InputError(f"unknown task {name!r}; the tasks are {list(self.names)}") from None

    def to_set(self, names: Iterable[str] | str) -> TaskSet:
        """The bitmask of the given task names (a single name is accepted too)."""
        if isinstance(names, str):
            names = [names]
        mask = 0
        for name in names:
            mask |= self.bit(name)
        return mask

    def to_names(self, task_set: TaskSet) -> frozenset[str]:
        return frozenset(n for i, n in enumerate(self.names) if task_set >> i & 1)

    def ordered_names(self, task_set: TaskSet) -> list[str]:
        return [n for i, n in enumerate(self.names) if task_set >> i & 1]

    def label(self, task_set: TaskSet) -> str:
        """A readable name for a task set, e.g. ``A&B``."""
        return SEPARATOR.join(self.ordered_names(task_set))

    def select(self, selection: "Iterable[str] | str | TaskSet | None") -> TaskSet:
        """A task combination from names, one name, a bitmask, or None (all tasks); never empty."""
        if selection is None:
            return self.all
        if isinstance(selection, (int, np.integer)):
            combo = int(selection)
        elif isinstance(selection, (str, Iterable)):
            combo = self.to_set(selection)
        else:
            raise InputError(f"a task combination is task names, one name or a bitmask, got {type(selection).__name__}")
        if combo <= 0 or combo > self.all:
            raise InputError(f"task combination must be a non-empty subset of {list(self.names)}, got {selection!r}")
        return combo

    def combinations(self) -> list[TaskSet]:
        """All 2^K − 1 non-empty task combinations, by size then in task order."""
        out: list[TaskSet] = []
        for size in range(1, self.k + 1):
            for combo in combinations(range(self.k), size):
                out.append(sum(1 << i for i in combo))
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return self.k


def is_subset(inner: TaskSet, outer: TaskSet) -> bool:
    """The connection rule of Sec. 4.5.4: a channel of set ``outer`` may feed one of set ``inner``."""
    return inner & ~outer == 0


def subset_matrix(inner: Sequence[TaskSet], outer: Sequence[TaskSet]) -> torch.Tensor:
    """Bool [len(inner), len(outer)]: entry (o, i) is ``is_subset(inner[o], outer[i])``."""
    a = torch.as_tensor(list(inner), dtype=torch.int64)[:, None]
    b = torch.as_tensor(list(outer), dtype=torch.int64)[None, :]
    return (a & ~b) == 0


def popcount(task_set: TaskSet) -> int:
    return bin(task_set).count("1")


def active(task_sets: Sequence[TaskSet], combo: TaskSet) -> list[int]:
    """Indices of the channels that run when the tasks of ``combo`` run (τ ∩ S ≠ ∅)."""
    return [c for c, t in enumerate(task_sets) if t & combo]
