"""Matching K networks layer by layer (Alg. 3, Sec. 4.5.1 step 1): same topology, widths may differ.

Each network is organised on its own (`pamfx.analysis.layer_organisation`); two networks match
when their graphs have the same ops in the same order, with the same hyper-parameters except
widths, the same roles, spatial shapes and layer positions. Merged layer i then holds the channels
of every network's layer i, task by task.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import fx, nn

from pamfx.analysis.channel_rules import Role, target_name
from pamfx.analysis.layer_organisation import GraphLayers, NodeInfo, is_tensor, organise_graph, shape_of
from pamfx.errors import InputError, MismatchError
from pamfx.frontend import trace
from pamfx.ir.neuron_layer import LayerMap, NeuronLayer
from pamfx.ir.task_set import TaskSpace

WIDTH_FIELDS = frozenset({"in_channels", "out_channels", "in_features", "out_features", "num_features"})


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


def _check_match(
    name_a: str, gm_a: fx.GraphModule, la: GraphLayers, name_b: str, gm_b: fx.GraphModule, lb: GraphLayers
) -> None:
    """Raise `MismatchError` at the first layer where two networks' topologies differ."""
    if len(la.layers) != len(lb.layers):
        raise MismatchError(
            f"networks {name_a!r} and {name_b!r} have {len(la.layers)} and {len(lb.layers)} neuron layers"
        )
    idx_a = {l.name: i for i, l in enumerate(la.layers)}
    idx_b = {l.name: i for i, l in enumerate(lb.layers)}
    nodes_a = [n for n in gm_a.graph.nodes if n.op not in ("placeholder", "output")]
    nodes_b = [n for n in gm_b.graph.nodes if n.op not in ("placeholder", "output")]
    for na, nb in zip(nodes_a, nodes_b):
        ia, ib = la.nodes.get(na.name), lb.nodes.get(nb.name)
        sa = _node_signature(gm_a, na, ia, idx_a)
        sb = _node_signature(gm_b, nb, ib, idx_b)
        if sa != sb:
            where = f"layer {ia.layer!r}" if ia and ia.layer else "a head or the input"
            raise MismatchError(
                f"networks {name_a!r} and {name_b!r} differ at node {na.name!r} / {nb.name!r} ({where}): "
                f"{sa[2]} with shape {sa[3]} vs {sb[2]} with shape {sb[3]}"
            )
    if len(nodes_a) != len(nodes_b):
        raise MismatchError(f"networks {name_a!r} and {name_b!r} have {len(nodes_a)} and {len(nodes_b)} ops")
    for a, b in zip(la.layers, lb.layers):
        if len(a.shortcuts) != len(b.shortcuts) or len(a.producers) != len(b.producers):
            raise MismatchError(f"networks {name_a!r} and {name_b!r} differ in the producers of layer {a.name!r}")


def organise_layers(models: Mapping[str, nn.Module], example_input: torch.Tensor) -> LayerMap:
    """Trace K single-task networks, find their neuron layers and match them layer by layer.

    ``models`` maps task names to networks (nn.Module or GraphModule) that all read
    ``example_input``; they must share one topology, widths may differ. Merged layer i holds
    the channels of every network's layer i, task by task (Alg. 3).
    """
    if not isinstance(models, Mapping):
        raise InputError(f"models must be a mapping {{task_name: model}}, got {type(models).__name__}")
    if len(models) < 2:
        raise InputError(f"merging needs K >= 2 networks, got K = {len(models)}")
    return match_layers(models, example_input)


def match_layers(models: Mapping[str, nn.Module], example_input: torch.Tensor) -> LayerMap:
    """`organise_layers` without the K >= 2 check (K = 1 wraps one network for baseline 1)."""
    tasks = TaskSpace(tuple(models))
    graphs = {t: trace(m, example_input, name=t) for t, m in models.items()}
    organised = {t: organise_graph(graphs[t], model_name=t, task_name=t) for t in tasks}
    first = tasks.names[0]
    for t in tasks.names[1:]:
        _check_match(first, graphs[first], organised[first], t, graphs[t], organised[t])
    layers = []
    for i, ref in enumerate(organised[first].layers):
        structures = {t: organised[t].layers[i] for t in tasks}
        origins = tuple((t, j) for t in tasks for j in range(structures[t].width))
        layers.append(NeuronLayer(ref.name, origins, structures))
    heads = {t: organised[t].heads[t] for t in tasks}
    return LayerMap(tasks, tuple(layers), graphs, example_input, heads)
