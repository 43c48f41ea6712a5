"""The order of each layer's groups in emitted code (docs/design.md §6, docs/codegen.md item 3).

An emitted module holds each neuron layer as one tensor of its active channels, group after group.
A slice of that tensor (or of a weight) is a view only where the channels it needs lie next to each
other. Two kinds of channel sets are wanted contiguous:

- the active groups of a combination S (τ ∩ S ≠ ∅): the rows a specialisation reads from the
  merged weights, for every S, weighted by its usage w(S);
- the input groups an output group τ may read (τ ⊆ τ_in, Sec. 4.5.4): the columns of one call,
  for every task set τ of a layer (or task head) that reads this one, weighted by P_w(τ active).

`group_orders` chooses, per layer, the order of its task sets minimising the expected number of
contiguous runs these sets fall into (one run each is the ideal). K = 2: A | A&B | B makes every
set one run. For larger K it starts from the Gray-code order of the bitmasks (neighbours differ
in one task) and improves it by moving one group at a time while the expected count drops;
deterministic, cached per set of groups.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Mapping

import numpy as np

from pamfx.analysis.channel_rules import Role
from pamfx.analysis.cost import combination_weights
from pamfx.analysis.multitask_view import MultitaskView
from pamfx.ir.task_set import TaskSet, is_subset

_MAX_EVALUATIONS = 20_000  # the local search's budget per layer (K = 5: a few passes over 31 × 31 moves)


def group_orders(view: MultitaskView, weights: Mapping[TaskSet, float] | None = None) -> dict[str, tuple[TaskSet, ...]]:
    """Per layer of the merged network ``view`` reads, its task sets in the order codegen lays them out.

    ``weights``: the usage distribution over combinations (`pamfx.analysis.cost.combination_weights`;
    default uniform).
    """
    usage = combination_weights(view.tasks, weights)
    readers: dict[str, set[TaskSet]] = {name: set() for name in view.records}
    for info in view.layers.nodes.values():
        if info.source is None or info.source not in readers:
            continue
        if info.role == Role.DENSE:
            readers[info.source].update(view.records[info.layer].task_sets)
        elif info.role == Role.HEAD:
            readers[info.source].add(view.tasks.bit(info.task))
    usage_key = tuple(sorted(usage.items()))
    return {
        name: _best_order(tuple(sorted(set(rec.task_sets))), tuple(sorted(readers[name])), usage_key)
        for name, rec in view.records.items()
    }


def _gray_rank(task_set: TaskSet) -> int:
    """The position of ``task_set`` in the reflected Gray code (the inverse Gray transform)."""
    rank, shift = task_set, task_set >> 1
    while shift:
        rank ^= shift
        shift >>= 1
    return rank


def _expected_runs(members: np.ndarray, weight: np.ndarray, order: list[int]) -> float:
    m = members[:, order]
    runs = m[:, 0].astype(np.int64) + (m[:, 1:] & ~m[:, :-1]).sum(1)
    return float(weight @ runs)


@lru_cache(maxsize=None)
def _best_order(groups: tuple[TaskSet, ...], readers: tuple[TaskSet, ...], usage: tuple[tuple[TaskSet, float], ...]) -> tuple[TaskSet, ...]:
    """`group_orders` for one layer: its groups, the task sets reading it, the usage distribution."""
    families, weights = [], []
    for combo, w in usage:
        families.append([bool(g & combo) for g in groups])
        weights.append(w)
    for reader in readers:
        families.append([is_subset(reader, g) for g in groups])
        weights.append(sum(w for combo, w in usage if reader & combo))
    members, weight = np.array(families, dtype=bool).reshape(len(families), len(groups)), np.array(weights)
    order = sorted(range(len(groups)), key=lambda i: _gray_rank(groups[i]))
    best, evaluations, improved = _expected_runs(members, weight, order), 0, True
    while improved and evaluations < _MAX_EVALUATIONS:
        improved = False
        for i in range(len(order)):
            for j in range(len(order)):
                if i == j or evaluations >= _MAX_EVALUATIONS:
                    continue
                moved = order[:i] + order[i + 1 :]
                moved.insert(j, order[i])
                evaluations += 1
                score = _expected_runs(members, weight, moved)
                if score < best - 1e-12:
                    order, best, improved = moved, score, True
    return tuple(groups[i] for i in order)
