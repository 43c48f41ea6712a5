"""Groupings: a task set τ(c) for every merged channel c of every hidden neuron layer (docs/design.md §2)."""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Mapping, Sequence

import numpy as np

from pamfx.errors import GroupingError, check_type
from pamfx.ir.neuron_layer import LayerMap
from pamfx.ir.task_set import TaskSet, TaskSpace, popcount


class Grouping:
    """Per neuron layer, the task set (a bitmask over ``tasks``) of each merged channel."""

    def __init__(self, tasks: TaskSpace, sets: Mapping[str, Sequence[TaskSet]]):
        self.tasks = tasks
        self._sets: dict[str, tuple[TaskSet, ...]] = {name: tuple(int(t) for t in s) for name, s in sets.items()}
        for name, task_sets in self._sets.items():
            for c, t in enumerate(task_sets):
                if t <= 0 or t > tasks.all:
                    raise GroupingError(
                        f"layer {name!r}, channel {c}: task set {t} is empty or names tasks outside {list(tasks.names)}"
                    )

    @classmethod
    def origin(cls, layers: LayerMap) -> "Grouping":
        """τ(c) = {origin task of c}: no sharing; the merged network computes the K originals."""
        check_type(layers, LayerMap, "layers")
        return cls(layers.tasks, {l.name: [layers.tasks.bit(t) for t, _ in l.origins] for l in layers})

    @classmethod
    def shared(cls, layers: LayerMap) -> "Grouping":
        """τ(c) = all tasks for every channel."""
        check_type(layers, LayerMap, "layers")
        return cls(layers.tasks, {l.name: [layers.tasks.all] * l.width for l in layers})

    @classmethod
    def random(cls, layers: LayerMap, seed: int = 0) -> "Grouping":
        """A uniformly random non-empty task set for every channel (for testing the connection rule)."""
        check_type(layers, LayerMap, "layers")
        rng = np.random.default_rng(seed)
        return cls(
            layers.tasks,
            {l.name: rng.integers(1, layers.tasks.all + 1, size=l.width).tolist() for l in layers},
        )

    @classmethod
    def from_mapping(
        cls, layers: LayerMap, mapping: Mapping[str, Sequence[Iterable[str] | str | int]]
    ) -> "Grouping":
        """From ``{layer_name: [task set of channel 0, ...]}``; a task set is names or a bitmask."""
        check_type(layers, LayerMap, "layers")
        check_type(mapping, Mapping, "mapping")
        sets = {}
        for name, per_channel in mapping.items():
            sets[name] = [t if isinstance(t, (int, np.integer)) else layers.tasks.to_set(t) for t in per_channel]
        grouping = cls(layers.tasks, sets)
        grouping.validate(layers)
        return grouping

    def validate(self, layers: LayerMap) -> None:
        """Raise `GroupingError` unless every layer of ``layers`` has one non-empty set per channel."""
        if layers.tasks != self.tasks:
            raise GroupingError(f"grouping is over tasks {list(self.tasks)}, layers over {list(layers.tasks)}")
        for layer in layers:
            if layer.name not in self._sets:
                raise GroupingError(f"grouping has no task sets for layer {layer.name!r}")
            got = len(self._sets[layer.name])
            if got != layer.width:
                raise GroupingError(
                    f"grouping gives {got} task sets for layer {layer.name!r}, which has {layer.width} channels"
                )
        extra = set(self._sets) - set(layers.names)
        if extra:
            raise GroupingError(f"grouping names layers that do not exist: {sorted(extra)}")

    @property
    def layer_names(self) -> list[str]:
        return list(self._sets)

    def masks(self, layer_name: str) -> tuple[TaskSet, ...]:
        try:
            return self._sets[layer_name]
        except KeyError:
            raise GroupingError(f"grouping has no layer {layer_name!r}; it has {self.layer_names}") from None

    def task_sets(self, layer_name: str) -> list[frozenset[str]]:
        return [self.tasks.to_names(t) for t in self.masks(layer_name)]

    def group_sizes(self, layer_name: str) -> dict[str, int]:
        """Channels per task set, e.g. ``{"A": 10, "B": 8, "A&B": 14}``."""
        counts = Counter(self.masks(layer_name))
        return {self.tasks.label(t): counts[t] for t in sorted(counts, key=lambda t: (popcount(t), t))}

    def sharing_ratio(self, layer_name: str) -> float:
        """|channels shared by every task| / |layer| (Fig. 4.6)."""
        masks = self.masks(layer_name)
        return sum(t == self.tasks.all for t in masks) / max(len(masks), 1)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Grouping) and other.tasks == self.tasks and other._sets == self._sets

    def __repr__(self) -> str:
        body = ", ".join(f"{n}: {self.group_sizes(n)}" for n in self._sets)
        return f"Grouping({body})"
