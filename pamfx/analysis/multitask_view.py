"""Reading (and checking) the pamfx IR that a merged multitask GraphModule keeps in ``node.meta``.

Structure (producers, consumers, shortcuts) is recovered from the graph by the layer
organisation; task sets and origins come from ``node.meta["pamfx_layer"]``; connection masks from
``node.meta["pamfx_mask"]``. Another fx pass may add channel-wise nodes (they inherit their
layer's record) but a pass that leaves records or masks that contradict the graph or the
connection rule, or non-zero weights on masked connections, makes this raise `IRError` instead
of letting codegen silently go wrong.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import fx, nn

from pamfx.analysis.channel_rules import Role
from pamfx.analysis.layer_organisation import GraphLayers, Submodules, organise_graph
from pamfx.errors import IRError
from pamfx.frontend import example_from_meta, shape_propagate
from pamfx.ir.grouping import Grouping
from pamfx.ir.meta import META_CONV_GROUPS, META_HEAD, META_LAYER, META_MASK, META_TASKS
from pamfx.ir.neuron_layer import LayerTaskSets
from pamfx.ir.task_set import TaskSet, TaskSpace, subset_matrix
from pamfx.passes.module_surgery import expand_mask


@dataclass
class MultitaskView:
    """A merged network's layers, their task-set records, and every node's role."""

    gm: fx.GraphModule
    tasks: TaskSpace
    layers: GraphLayers
    records: dict[str, LayerTaskSets]

    @property
    def fixed_layers(self) -> frozenset[str]:
        """Layers an op without a channel rule (`TaskSlices`) reads or writes: their channels stay."""
        return frozenset(
            name
            for info in self.layers.nodes.values()
            if info.role is Role.OPAQUE
            for name in (info.layer, info.source)
            if name is not None
        )

    def groups(self, layer: str, combo: TaskSet) -> dict[TaskSet, list[int]]:
        """The active groups of ``layer`` when ``combo`` runs: task set → channel indices, sorted."""
        out: dict[TaskSet, list[int]] = {}
        for c, t in enumerate(self.records[layer].task_sets):
            if t & combo:
                out.setdefault(t, []).append(c)
        return dict(sorted(out.items()))

    def grouping(self) -> Grouping:
        """The network's current grouping (after pruning: over the channels that are left)."""
        return Grouping(self.tasks, {name: rec.task_sets for name, rec in self.records.items()})

    def rule_mask(self, out_layer: str, source: str | None, in_width: int) -> torch.Tensor:
        """The connection rule τ_out ⊆ τ_in as a bool [out, in] matrix (all True from the input X)."""
        out_sets = self.records[out_layer].task_sets
        if source is None:
            return torch.ones(len(out_sets), in_width, dtype=torch.bool)
        return subset_matrix(out_sets, self.records[source].task_sets)


def is_multitask(gm: object) -> bool:
    """Whether ``gm`` is a GraphModule carrying pamfx's multitask IR (a merged network)."""
    return isinstance(gm, fx.GraphModule) and any(n.op == "output" and META_TASKS in n.meta for n in gm.graph.nodes)


def read_multitask(gm: fx.GraphModule) -> MultitaskView:
    """Recover and check the IR of a merged network (see module docstring); never writes to ``gm``.

    When a pass after merge added nodes without shapes, the view is read from a shape-propagated
    copy (``view.gm``), so ``gm`` itself stays as it was.
    """
    if not isinstance(gm, fx.GraphModule):
        raise IRError(f"expected a merged network (an fx.GraphModule built by pamfx.merge), got {type(gm).__name__}")
    out = next((n for n in gm.graph.nodes if n.op == "output"), None)
    if out is None or META_TASKS not in out.meta:
        raise IRError("this GraphModule carries no pamfx IR (node.meta); build it with pamfx.merge")
    tasks: TaskSpace = out.meta[META_TASKS]
    if any("tensor_meta" not in n.meta for n in gm.graph.nodes if n.op != "output"):
        gm = shape_propagate(copy.deepcopy(gm), example_from_meta(gm), "merged network")
    layers = organise_graph(gm, model_name="merged network")
    by_name = {n.name: n for n in gm.graph.nodes}
    records: dict[str, LayerTaskSets] = {}
    for layer in layers.layers:
        found = {by_name[n].meta[META_LAYER] for n in layer.nodes if META_LAYER in by_name[n].meta}
        if len(found) != 1:
            raise IRError(f"layer {layer.name!r}: its nodes carry {len(found)} different pamfx_layer records")
        record = found.pop()
        if record.width != layer.width:
            raise IRError(f"layer {layer.name!r}: record has {record.width} channels, the graph {layer.width}")
        records[layer.name] = record
    view = MultitaskView(gm, tasks, layers, records)
    modules = Submodules(gm)
    for name, info in layers.nodes.items():
        node = by_name[name]
        if info.role == Role.DENSE:
            in_width = node.meta[META_MASK].shape[1] if META_MASK in node.meta else -1
            expected = view.rule_mask(info.layer, info.source, in_width)
            if META_CONV_GROUPS in node.meta:  # a grouped conv: group g reads group g only
                out_ids, in_ids = node.meta[META_CONV_GROUPS]
                if out_ids.shape != expected.shape[:1] or in_ids.shape != expected.shape[1:]:
                    raise IRError(f"node {name!r}: its pamfx_conv_groups do not match its {tuple(expected.shape)} mask")
                expected = expected & (out_ids[:, None] == in_ids[None, :])
        elif info.role == Role.HEAD:
            if node.meta.get(META_HEAD) != info.task:
                raise IRError(f"head {name!r} of task {info.task!r} carries no or a wrong pamfx_head record")
            expected = view.records[info.source].serves(view.tasks.bit(info.task))[None, :]
        else:
            continue
        mask = node.meta.get(META_MASK)
        if mask is None or mask.shape[-1] != expected.shape[-1] or not bool((mask == expected).all()):
            raise IRError(f"node {name!r}: its connection mask is missing or breaks the rule τ_out ⊆ τ_in")
        _check_masked_weights(node, modules[node.target], mask, layers.nodes[node.args[0].name].block)
    return view


def _check_masked_weights(node: fx.Node, module: nn.Module, mask: torch.Tensor, block: int) -> None:
    """Raise `IRError` if a connection that the mask forbids carries a non-zero weight."""
    weight = module.weight.detach()
    if mask.shape[0] != weight.shape[0] or weight.shape[1] != mask.shape[1] * block:
        raise IRError(
            f"node {node.name!r} ({node.target}): weight {tuple(weight.shape)} does not fit its connection mask "
            f"{tuple(mask.shape)}"
        )
    forbidden = ~expand_mask(mask.expand(weight.shape[0], -1), weight, block)
    leaked = int(torch.count_nonzero(weight[forbidden]))
    if leaked:
        raise IRError(
            f"node {node.name!r} ({node.target}): {leaked} weights on masked connections are non-zero; a pass "
            f"must keep forbidden connections (τ_out ⊄ τ_in) at exactly 0"
        )
