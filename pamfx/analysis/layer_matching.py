"""Matching K networks layer by layer (Alg. 3, Sec. 4.5.1 steps 1 and 3): same topology, widths may differ.

Each network is organised on its own (`pamfx.analysis.layer_organisation`); two networks match
when their graphs have the same ops in the same order, with the same hyper-parameters except
widths, the same roles, spatial shapes and layer positions. Merged layer i then holds the channels
of every network's layer i, task by task. Networks of different depths N_A <= N_B match when
they share whole layers 1..N_A, after which each has only layers of its own and its head
(`LayerMap.remainders`, taken over unmerged by the merge pass).
"""
from __future__ import annotations

from typing import Mapping

import networkx as nx
import torch
from torch import fx, nn

from pamfx.analysis.channel_rules import Role, target_name
from pamfx.analysis.layer_organisation import GraphLayers, LayerStructure, NodeInfo, is_tensor, organise_graph, shape_of
from pamfx.errors import InputError, MismatchError, UnsupportedOpError
from pamfx.frontend import trace
from pamfx.ir.neuron_layer import LayerMap, NeuronLayer
from pamfx.ir.task_set import TaskSpace

WIDTH_FIELDS = frozenset({"in_channels", "out_channels", "in_features", "out_features", "num_features", "num_channels"})


def _module_signature(module: nn.Module) -> tuple:
    """A module's type and hyper-parameters (its public attributes), without its widths.

    A depthwise conv's ``groups`` is its width; any other ``groups`` must match.
    """
    depthwise = getattr(module, "groups", None) == getattr(module, "in_channels", 0)
    fields = tuple(
        (k, v)
        for k, v in sorted(vars(module).items())
        if not k.startswith("_") and k != "training" and k not in WIDTH_FIELDS and not (k == "groups" and depthwise)
        and not isinstance(v, torch.Tensor)
    )
    tensors = tuple(sorted(k for k, v in {**module._parameters, **module._buffers}.items() if v is not None))
    return (type(module).__name__, fields, tensors)


def _node_signature(gm: fx.GraphModule, node: fx.Node, info: NodeInfo | None, layer_index: dict[str, int]) -> tuple:
    if node.op == "call_module":
        target: tuple = _module_signature(gm.get_submodule(node.target))
    elif node.op in ("call_function", "call_method"):
        name = target_name(node)
        consts = tuple(a for a in node.args if not isinstance(a, fx.Node) and isinstance(a, (int, float, bool, str)))
        target = (name, consts)
    else:
        target = (node.op,)
    shape: tuple = ()
    if is_tensor(node) and info is not None and info.role is not Role.HEAD and info.task is None:
        full = shape_of(node)
        shape = (full[2:],) if len(full) > 2 else ("flat" if info.block != 1 else "vector",)
    role = info.role if info else None
    return (node.op, role, target, shape, layer_index.get(info.layer) if info and info.layer else None)


def _body(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]


def _first_difference(
    gm_a: fx.GraphModule, la: GraphLayers, gm_b: fx.GraphModule, lb: GraphLayers
) -> tuple[int, tuple | None, tuple | None]:
    """Index of the first op where two networks differ, with both signatures (None past the end)."""
    idx_a = {l.name: i for i, l in enumerate(la.layers)}
    idx_b = {l.name: i for i, l in enumerate(lb.layers)}
    nodes_a, nodes_b = _body(gm_a), _body(gm_b)
    for k, (na, nb) in enumerate(zip(nodes_a, nodes_b)):
        sa = _node_signature(gm_a, na, la.nodes.get(na.name), idx_a)
        sb = _node_signature(gm_b, nb, lb.nodes.get(nb.name), idx_b)
        if sa != sb:
            return k, sa, sb
    return min(len(nodes_a), len(nodes_b)), None, None


def _taken_over(gm: fx.GraphModule, organised: GraphLayers, remainder: list[fx.Node], common: set[str]) -> bool:
    """Whether a network's ops after the shared prefix can be taken over unmerged (Sec. 4.5.1
    step 3): parameter-free ops on the last shared layers, layers of its own without shortcuts, its head."""
    tail_layers = {l.name: l for l in organised.layers if l.name not in common}
    for node in remainder:
        info = organised.nodes.get(node.name)
        if info is None or info.layer is None:
            continue
        if info.layer in common:
            if info.role is not Role.CHANNELWISE and info.role is not Role.FLATTEN:
                return False
            if node.op == "call_module" and any(True for _ in gm.get_submodule(node.target).parameters()):
                return False
        elif tail_layers[info.layer].shortcuts or info.role in (Role.RESIDUAL, Role.CONCAT):
            return False
    return True


def _match(
    tasks: TaskSpace, graphs: dict[str, fx.GraphModule], organised: dict[str, GraphLayers]
) -> tuple[int, dict[str, tuple[str, ...]]]:
    """Check the K networks match layer by layer: the number of layers they share, and the
    remainders of networks of different depth (Sec. 4.5.1 step 3; empty when they match op for op).

    Raise `MismatchError` at the first op where two networks' topologies differ, unless they
    share a prefix of whole layers after which each one has only layers of its own and its head.
    """
    first = tasks.names[0]
    diffs = {t: _first_difference(graphs[first], organised[first], graphs[t], organised[t]) for t in tasks.names[1:]}
    same = all(sa is None and len(_body(graphs[t])) == len(_body(graphs[first])) for t, (_, sa, _) in diffs.items())
    prefix = len(_body(graphs[first])) if same else min(k for k, _, _ in diffs.values())
    common = {t: _shared_layers(organised[t], _body(graphs[t])[:prefix]) for t in tasks}
    remainders = {t: _body(graphs[t])[prefix:] for t in tasks}
    depths = {t: len(organised[t].layers) for t in tasks}  # hidden layers N_t
    deeper = min(depths.values()) == len(common[first]) < max(depths.values())  # N_A <= N_B: A keeps none of its own
    if not same and not (deeper and all(_taken_over(graphs[t], organised[t], remainders[t], common[t]) for t in tasks)):
        t, (k, sa, sb) = next((t, d) for t, d in diffs.items() if d[0] == prefix)
        if sa is None:
            raise MismatchError(f"networks {first!r} and {t!r} have {len(_body(graphs[first]))} and {len(_body(graphs[t]))} ops")
        na, nb = _body(graphs[first])[k], _body(graphs[t])[k]
        info = organised[first].nodes.get(na.name)
        where = f"layer {info.layer!r}" if info and info.layer else "a head or the input"
        raise MismatchError(
            f"networks {first!r} and {t!r} differ at node {na.name!r} / {nb.name!r} ({where}): "
            f"{sa[2]} with shape {sa[3]} vs {sb[2]} with shape {sb[3]}"
        )
    shared = len(common[first])
    for t in tasks.names[1:]:
        _check_layers(first, organised[first].layers[:shared], t, organised[t].layers[: len(common[t])])
    return shared, ({} if same else {t: tuple(n.name for n in remainders[t]) for t in tasks})


def _shared_layers(organised: GraphLayers, prefix: list[fx.Node]) -> set[str]:
    names = {n.name for n in prefix}
    return {l.name for l in organised.layers if names.intersection(l.nodes)}


def _check_layers(name_a: str, la: list[LayerStructure], name_b: str, lb: list[LayerStructure]) -> None:
    if len(la) != len(lb):
        raise MismatchError(f"networks {name_a!r} and {name_b!r} have {len(la)} and {len(lb)} neuron layers")
    for a, b in zip(la, lb):
        if len(a.shortcuts) != len(b.shortcuts) or len(a.producers) != len(b.producers):
            raise MismatchError(f"networks {name_a!r} and {name_b!r} differ in the producers of layer {a.name!r}")


def organise_layers(
    models: Mapping[str, nn.Module], example_input: torch.Tensor, *, unknown_ops: str = "refuse"
) -> LayerMap:
    """Trace K single-task networks, find their neuron layers and match them layer by layer.

    ``models`` maps task names to networks (nn.Module or GraphModule) that all read
    ``example_input``; they must share one topology, widths may differ. Merged layer i holds
    the channels of every network's layer i, task by task (Alg. 3). ``unknown_ops="share"``
    merges an op without a channel rule instead of refusing it, sharing the layers it touches
    (and the layers they read) among all tasks: always exact, less to prune.
    """
    if not isinstance(models, Mapping):
        raise InputError(f"models must be a mapping {{task_name: model}}, got {type(models).__name__}")
    if len(models) < 2:
        raise InputError(f"merging needs K >= 2 networks, got K = {len(models)}")
    return match_layers(models, example_input, unknown_ops)


def match_layers(models: Mapping[str, nn.Module], example_input: torch.Tensor, unknown_ops: str = "refuse") -> LayerMap:
    """`organise_layers` without the K >= 2 check (K = 1 wraps one network for baseline 1)."""
    tasks = TaskSpace(tuple(models))
    graphs = {t: trace(m, example_input, name=t) for t, m in models.items()}
    organised = {t: organise_graph(graphs[t], t, t, unknown_ops) for t in tasks}
    shared, remainders = _match(tasks, graphs, organised)
    layers = []
    for i, ref in enumerate(organised[tasks.names[0]].layers[:shared]):
        structures = {t: organised[t].layers[i] for t in tasks}
        origins = tuple((t, j) for t in tasks for j in range(structures[t].width))
        layers.append(NeuronLayer(ref.name, origins, structures))
    heads = {t: organised[t].heads[t] for t in tasks}
    pinned = _shared_by_unknown_ops(organised[tasks.names[0]], {l.name for l in layers})
    return LayerMap(tasks, tuple(layers), graphs, example_input, heads, remainders, pinned, unknown_ops)


def _shared_by_unknown_ops(organised: GraphLayers, merged: set[str]) -> frozenset[str]:
    """The layers an op without a rule reads or writes, with every layer they read (transitively):
    all-shared channels may only read all-shared channels (τ_out ⊆ τ_in), so its inputs must be
    shared back to X for the merged network to compute the originals."""
    reads = nx.DiGraph()
    for name, info in organised.nodes.items():
        if info.layer is not None and info.source is not None:
            reads.add_edge(info.layer, info.source)
    for layer in organised.layers:
        reads.add_edges_from((layer.name, source) for _, source in layer.shortcuts)
    touched = {
        name
        for info in organised.nodes.values()
        if info.role is Role.OPAQUE
        for name in (info.layer, info.source)
        if name is not None
    }
    if touched - merged:
        raise UnsupportedOpError(
            f"an op without a channel rule in layers of one network's own ({sorted(touched - merged)}) cannot be shared"
        )
    return frozenset(touched.union(*(nx.descendants(reads, name) for name in touched if name in reads)))
