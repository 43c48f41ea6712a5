"""Cost of a task combination: FLOPs, multiply-accumulates and parameters (DESIGN.md §7).

Convention (that of `torch.utils.flop_counter.FlopCounterMode`): ``flops = 2 × MACs`` of conv and
linear ops (depthwise convs included), per input sample; bias additions, BatchNorm, activations,
pooling and residual additions are not counted. ``params`` counts every parameter the
combination uses (weights of allowed connections, biases, BatchNorm affine parameters).

For a merged network the count is analytic over the IR: the edges of the subgraph that the
combination activates (active output channels × their allowed input channels × kernel ×
output positions), never the masked dense ops it is stored as.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Iterable, Iterator

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from pamfx.analysis.channel_rules import Role
from pamfx.analysis.layer_organisation import NodeInfo, Submodules
from pamfx.analysis.multitask_view import MultitaskView, is_multitask, read_multitask
from pamfx.errors import InputError
from pamfx.frontend import trace
from pamfx.ir.neuron_layer import META_MASK
from pamfx.ir.task_set import TaskSet


@dataclass(frozen=True)
class Cost:
    """FLOPs (2 × MACs of conv/linear), MACs and parameters, per input sample."""

    flops: int
    macs: int
    params: int

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.macs + other.macs, self.params + other.params)


def _per_sample_positions(node: fx.Node) -> tuple[int, int]:
    shape = tuple(node.meta["tensor_meta"].shape)
    return shape[0], prod(shape[2:])


def _kernel(module: nn.Module) -> int:
    return prod(module.kernel_size) if isinstance(module, nn.Conv2d) else 1


def _module_nodes(gm: fx.GraphModule, view: MultitaskView) -> Iterator[tuple[fx.Node, NodeInfo, nn.Module, int]]:
    """Every module call of a merged network with its role, module and output positions per sample."""
    modules = Submodules(gm)
    for node in gm.graph.nodes:
        info = view.layers.nodes.get(node.name)
        if info is not None and node.op == "call_module":
            yield node, info, modules[node.target], _per_sample_positions(node)[1]


def _merged_cost(gm: fx.GraphModule, combo: TaskSet) -> Cost:
    view = read_multitask(gm)
    macs = params = 0
    for node, info, module, positions in _module_nodes(gm, view):
        if info.role == Role.DENSE or (info.role == Role.HEAD and combo & view.tasks.bit(info.task)):
            mask = node.meta[META_MASK]
            if info.role == Role.DENSE:
                active = [o for o, t in enumerate(view.records[info.layer].task_sets) if t & combo]
                mask = mask[active]
            block = view.layers.nodes[node.args[0].name].block
            edges = int(mask.sum()) * _kernel(module) * block
            macs += edges * positions
            params += edges + (mask.shape[0] if module.bias is not None else 0)
        elif info.role == Role.OPAQUE:  # an op without a channel rule: counted as FlopCounterMode runs it
            counter = FlopCounterMode(display=False)
            shape = (1,) + tuple(node.args[0].meta["tensor_meta"].shape[1:])
            with counter, torch.no_grad():
                module(torch.zeros(shape, dtype=node.args[0].meta["tensor_meta"].dtype))
            macs += counter.get_total_flops() // 2
            params += sum(p.numel() for p in module.parameters())
        elif info.role == Role.CHANNELWISE and info.layer is not None and any(True for _ in module.parameters(recurse=False)):
            active = sum(1 for t in view.records[info.layer].task_sets if t & combo)
            per_channel = sum(p.numel() for p in module.parameters(recurse=False)) // view.records[info.layer].width
            params += active * per_channel
            if isinstance(module, nn.Conv2d):
                macs += active * _kernel(module) * positions
    return Cost(2 * macs, macs, params)


def _plain_cost(gm: fx.GraphModule) -> Cost:
    modules = Submodules(gm)
    macs = 0
    used: dict[int, nn.Module] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = modules[node.target]
        used[id(module)] = module
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            batch, positions = _per_sample_positions(node)
            fan_in = module.in_channels // module.groups * _kernel(module) if isinstance(module, nn.Conv2d) else module.in_features
            out_channels = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
            macs += out_channels * positions * fan_in
    params = sum(p.numel() for m in used.values() for p in m.parameters(recurse=False))
    return Cost(2 * macs, macs, params)


def _ensure_shapes(gm: fx.GraphModule) -> None:
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    if "tensor_meta" in placeholder.meta and all(
        "tensor_meta" in n.meta for n in gm.graph.nodes if n.op == "call_module"
    ):
        return
    raise InputError("cost() needs shapes: pass example_input= or use a module built by pamfx (trace/merge/emit)")


def cost(
    module: nn.Module,
    tasks: Iterable[str] | str | TaskSet | None = None,
    *,
    example_input: torch.Tensor | None = None,
) -> Cost:
    """FLOPs and parameters of ``module``; for a merged network, of the subgraph of ``tasks``.

    ``tasks`` (names, one name or a bitmask; default all) applies to merged networks only. A
    plain nn.Module is traced with ``example_input``; GraphModules built by pamfx carry shapes.
    """
    if isinstance(module, fx.GraphModule) and is_multitask(module):
        return _merged_cost(module, read_multitask(module).tasks.select(tasks))
    if tasks is not None:
        raise InputError("tasks= applies to merged multitask networks only")
    if example_input is not None:
        gm = trace(module, example_input)
    elif isinstance(module, fx.GraphModule):
        gm = module
        _ensure_shapes(gm)
    else:
        raise InputError(f"cost() of a plain {type(module).__name__} needs example_input=")
    return _plain_cost(gm)


def channel_flops(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Per neuron layer, the FLOPs each channel accounts for when all tasks run.

    A channel's count is that of its incoming connections (its row of every producer, its
    depthwise kernel) plus its outgoing ones (its column of every consumer and head): the FLOPs
    pruning it removes.
    """
    view = read_multitask(gm)
    out = {name: torch.zeros(rec.width, dtype=torch.float64) for name, rec in view.records.items()}
    for node, info, module, positions in _module_nodes(gm, view):
        if info.role in (Role.DENSE, Role.HEAD):
            mask = node.meta[META_MASK].to(torch.float64)
            per_edge = 2 * _kernel(module) * view.layers.nodes[node.args[0].name].block * positions
            if info.role == Role.DENSE:
                out[info.layer] += mask.sum(1) * per_edge
            if info.source is not None:
                out[info.source] += mask.sum(0) * per_edge
        elif info.layer is not None and isinstance(module, nn.Conv2d):
            out[info.layer] += 2 * _kernel(module) * positions
    return out
