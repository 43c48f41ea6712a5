"""Neuron layers and the layer map that matches them across the K networks (docs/design.md §2).

Pure data: the algorithm that fills these in is `pamfx.analysis.layer_organisation`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Mapping

import torch
from torch import fx

from pamfx.errors import InputError
from pamfx.ir.task_set import TaskSpace


@dataclass(frozen=True)
class Consumer:
    """An op that reads a neuron layer densely.

    ``block`` is the number of input features per channel the op sees: H·W when a Linear reads
    a flattened feature map, 1 for a conv or after global pooling. ``head`` names the task whose
    output the op produces (heads are never regrouped), or is None for a hidden op.
    """

    node: str
    block: int = 1
    head: str | None = None


@dataclass(frozen=True)
class LayerStructure:
    """One neuron layer inside one traced network.

    producers: dense weighted ops (conv / linear) whose output channels are this layer's channels;
    channelwise: ops applied inside the layer and sliced along with its channels (BatchNorm,
    depthwise conv, activations, pooling, dropout, flatten, the residual ``add``...);
    consumers: dense ops reading the layer; shortcuts: ``(node, source_layer)`` identity
    shortcuts feeding this layer channel to channel from another layer (diagonal connections);
    output_node: the node whose value is the layer's activation (after the residual addition).
    """

    name: str
    width: int
    producers: tuple[str, ...]
    channelwise: tuple[str, ...]
    consumers: tuple[Consumer, ...]
    shortcuts: tuple[tuple[str, str], ...]
    output_node: str

    @property
    def nodes(self) -> tuple[str, ...]:
        return self.producers + self.channelwise


@dataclass(frozen=True)
class NeuronLayer:
    """A merged neuron layer L_i: the union of the K networks' channels of layer i.

    ``origins[c] = (task, j)`` says merged channel c is channel j of task's network; merged
    channels are ordered task by task, in task order.
    """

    name: str
    origins: tuple[tuple[str, int], ...]
    structures: Mapping[str, LayerStructure]

    @property
    def width(self) -> int:
        return len(self.origins)

    def widths(self) -> dict[str, int]:
        return {task: s.width for task, s in self.structures.items()}

    def offset(self, task: str) -> int:
        """Index of the first merged channel that comes from ``task``'s network."""
        for c, (t, _) in enumerate(self.origins):
            if t == task:
                return c
        raise InputError(f"layer {self.name!r} has no channel from task {task!r}")


@dataclass
class LayerMap:
    """The neuron layers L_1..L_N of K traced networks, matched layer by layer (Alg. 3)."""

    tasks: TaskSpace
    layers: tuple[NeuronLayer, ...]
    graphs: dict[str, fx.GraphModule]
    example_input: torch.Tensor
    heads: dict[str, str] = field(default_factory=dict)
    remainders: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Networks of different depths (Sec. 4.5.1 step 3): per task, the nodes of its graph after
    the prefix all networks share, taken over unmerged (its remaining layers and its head);
    empty when the networks match op for op."""
    shared_layers: frozenset[str] = frozenset()
    """Layers an op without a channel rule reads or writes, and the layers they read
    (``unknown_ops="share"``): merging gives every channel of them all tasks' task set."""
    unknown_ops: str = "refuse"

    def __iter__(self) -> Iterator[NeuronLayer]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> NeuronLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise InputError(f"no neuron layer named {name!r}; layers are {self.names}")

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]


@dataclass(frozen=True)
class LayerTaskSets:
    """The IR of one neuron layer of a merged network, kept in ``node.meta["pamfx_layer"]``.

    ``task_sets[c]`` is the task set (bitmask) of merged channel c, ``origins[c]`` its
    ``(task, channel)`` in the original networks. Every node whose value lies in the layer
    carries the same record; a pass that changes the layer's channels writes a new one.
    """

    name: str
    task_sets: tuple[int, ...]
    origins: tuple[tuple[str, int], ...]

    @property
    def width(self) -> int:
        return len(self.task_sets)

    def serves(self, task_bit: int) -> torch.Tensor:
        """Bool per channel: does τ(c) meet the bitmask ``task_bit``? For one task: does it use the
        channel (what a head may read); for a combination S: is the channel active (τ ∩ S ≠ ∅)."""
        return torch.tensor([bool(t & task_bit) for t in self.task_sets], dtype=torch.bool)

    def same_origin(self, source: "LayerTaskSets") -> torch.Tensor:
        """Bool [channels of self, channels of ``source``]: do the two channels come from the same
        origin network? (False: a cross-origin connection, new at merge.)"""
        return torch.tensor([[o[0] == i[0] for i in source.origins] for o in self.origins], dtype=torch.bool)

    def select(self, keep: list[int]) -> "LayerTaskSets":
        """The record of the same layer keeping only channels ``keep`` (in that order)."""
        return LayerTaskSets(self.name, tuple(self.task_sets[c] for c in keep), tuple(self.origins[c] for c in keep))

