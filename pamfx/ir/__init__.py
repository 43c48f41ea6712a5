"""The intermediate representation: task sets, neuron layers, groupings (data, no algorithms)."""
from pamfx.ir.grouping import Grouping
from pamfx.ir.meta import META_HEAD, META_LAYER, META_MASK, META_TASKS
from pamfx.ir.neuron_layer import (
    Consumer,
    LayerMap,
    LayerStructure,
    LayerTaskSets,
    NeuronLayer,
)
from pamfx.ir.task_set import TaskSet, TaskSpace, active, is_subset, popcount, subset_matrix

__all__ = [
    "Consumer",
    "Grouping",
    "LayerMap",
    "LayerStructure",
    "LayerTaskSets",
    "META_HEAD",
    "META_LAYER",
    "META_MASK",
    "META_TASKS",
    "NeuronLayer",
    "TaskSet",
    "TaskSpace",
    "active",
    "is_subset",
    "popcount",
    "subset_matrix",
]
