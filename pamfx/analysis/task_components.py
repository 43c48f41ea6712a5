"""Independent task components of a merged network.

Two tasks are *coupled* when some channel serves both (its task set holds both). The connected
components of that relation partition the tasks; by the connection rule τ_out ⊆ τ_in, a channel
of one component reads only channels of the same component, so the components are independent
networks that happen to sit in one graph. The unshared merge (`Grouping.origin`) has K of them,
one per task; pruning removes channels only, so it can split a component but never join two.

Pruning uses this (`pamfx.passes.prune`): each component may take the cheapest checkpoint at which
*its* tasks are within the tolerance, instead of one checkpoint for all tasks.
"""
from __future__ import annotations

from pamfx.analysis.multitask_view import MultitaskView
from pamfx.ir.task_set import TaskSet


def task_components(view: MultitaskView) -> list[TaskSet]:
    """The task sets of the independent components of the merged network ``view`` reads, in task order."""
    components = [view.tasks.bit(t) for t in view.tasks]
    for record in view.records.values():
        for task_set in set(record.task_sets):
            joined = [c for c in components if c & task_set]
            if len(joined) > 1:
                components = [c for c in components if not c & task_set] + [sum(joined)]
    return sorted(components, key=lambda c: c & -c)
