"""Cost of a task combination: FLOPs, multiply-accumulates and parameters (docs/design.md §7).

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
from typing import Iterable, Iterator, Mapping

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from pamfx.analysis.channel_rules import Role
from pamfx.analysis.layer_organisation import NodeInfo, Submodules
from pamfx.analysis.multitask_view import MultitaskView, is_multitask, read_multitask
from pamfx.errors import InputError
from pamfx.frontend import trace
from pamfx.ir.meta import META_MASK
from pamfx.ir.task_set import TaskSet, TaskSpace


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


def _module_nodes(view: MultitaskView) -> Iterator[tuple[fx.Node, NodeInfo, nn.Module, int]]:
    """Every module call of a merged network with its role, module and output positions per sample."""
    modules = Submodules(view.gm)
    for node in view.gm.graph.nodes:
        info = view.layers.nodes.get(node.name)
        if info is not None and node.op == "call_module":
            yield node, info, modules[node.target], _per_sample_positions(node)[1]


def merged_cost(view: MultitaskView, combo: TaskSet) -> Cost:
    """The cost of combination ``combo`` of the merged network that ``view`` reads."""
    macs = params = 0
    for node, info, module, positions in _module_nodes(view):
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
        view = read_multitask(module)
        return merged_cost(view, view.tasks.select(tasks))
    if tasks is not None:
        raise InputError("tasks= applies to merged multitask networks only")
    if example_input is not None:
        gm = trace(module, example_input, single_task=False)
    elif isinstance(module, fx.GraphModule):
        gm = module
        _ensure_shapes(gm)
    else:
        raise InputError(f"cost() of a plain {type(module).__name__} needs example_input=")
    return _plain_cost(gm)


def channel_flops(gm: fx.GraphModule, tasks: Iterable[str] | str | TaskSet | None = None) -> dict[str, torch.Tensor]:
    """Per neuron layer, the FLOPs each channel accounts for when the combination ``tasks`` runs (default all).

    A channel's count is that of its active incoming connections (its row of every producer over
    the active input channels, its depthwise kernel) plus its active outgoing ones (its column of
    every consumer over the active output channels, and of the heads of the tasks that run): the
    FLOPs pruning it removes from that combination. Channels the combination does not run count 0.
    """
    view = read_multitask(gm)
    return _channel_flops(view, view.tasks.select(tasks))


def _channel_flops(view: MultitaskView, combo: TaskSet) -> dict[str, torch.Tensor]:
    active = {name: rec.serves(combo) for name, rec in view.records.items()}  # τ ∩ S ≠ ∅
    out = {name: torch.zeros(rec.width, dtype=torch.float64) for name, rec in view.records.items()}
    for node, info, module, positions in _module_nodes(view):
        if info.role == Role.HEAD and not combo & view.tasks.bit(info.task):
            continue
        if info.role in (Role.DENSE, Role.HEAD):
            mask = node.meta[META_MASK].to(torch.float64)
            rows = active[info.layer] if info.role == Role.DENSE else torch.ones(mask.shape[0], dtype=torch.bool)
            cols = active[info.source] if info.source is not None else torch.ones(mask.shape[1], dtype=torch.bool)
            mask = mask * rows[:, None] * cols[None, :]
            per_edge = 2 * _kernel(module) * view.layers.nodes[node.args[0].name].block * positions
            if info.role == Role.DENSE:
                out[info.layer] += mask.sum(1) * per_edge
            if info.source is not None:
                out[info.source] += mask.sum(0) * per_edge
        elif info.layer is not None and isinstance(module, nn.Conv2d):
            out[info.layer] += 2 * _kernel(module) * positions * active[info.layer]
    return out


def combination_weights(
    tasks: TaskSpace, weights: Mapping[Iterable[str] | str | TaskSet, float] | None = None
) -> dict[TaskSet, float]:
    """A usage distribution over the task combinations, normalised to sum 1 (default: uniform).

    ``weights`` maps combinations (names, one name, or a bitmask) to non-negative usage
    frequencies; combinations it leaves out never run (weight 0).
    """
    combos = list(tasks.combinations())
    if weights is None:
        return {c: 1.0 / len(combos) for c in combos}
    out = dict.fromkeys(combos, 0.0)
    for key, w in weights.items():
        if not isinstance(w, (int, float)) or w < 0 or w != w:
            raise InputError(f"combination weight of {key!r} must be a number >= 0, got {w!r}")
        out[tasks.select(key)] += float(w)
    total = sum(out.values())
    if total <= 0:
        raise InputError("combination weights must not all be 0")
    return {c: w / total for c, w in out.items()}


def expected_channel_flops(gm: fx.GraphModule, weights: Mapping[TaskSet, float]) -> dict[str, torch.Tensor]:
    """Per layer, each channel's expected FLOPs: Σ_S w(S) · `channel_flops` (S), i.e. a channel of task
    set τ costs its FLOPs in every combination S with S ∩ τ ≠ ∅, weighted by how often S runs."""
    view = read_multitask(gm)
    total: dict[str, torch.Tensor] = {}
    for combo, w in weights.items():
        if w <= 0:
            continue
        for layer, flops in _channel_flops(view, combo).items():
            total[layer] = total.get(layer, 0) + w * flops
    return total


def cross_origin_flops(gm: fx.GraphModule, tasks: Iterable[str] | str | TaskSet | None = None) -> int:
    """FLOPs of the combination ``tasks`` spent on connections between channels of different
    origin networks (new at merge, Sec. 4.5.1 step 4): inside a shared group they make the block
    up to K² times one network's; this says how much of it pruning left."""
    return sum(cross_origin_flops_by_layer(gm, tasks).values())


def cross_origin_flops_by_layer(gm: fx.GraphModule, tasks: Iterable[str] | str | TaskSet | None = None) -> dict[str, int]:
    """`cross_origin_flops` per neuron layer (the layer the connections write)."""
    view = read_multitask(gm)
    combo = view.tasks.select(tasks)
    macs: dict[str, int] = {}
    for node, info, module, positions in _module_nodes(view):
        if info.role != Role.DENSE or info.source is None:
            continue
        out_rec, in_rec = view.records[info.layer], view.records[info.source]
        rows, cols = out_rec.serves(combo), in_rec.serves(combo)
        edges = node.meta[META_MASK] & ~out_rec.same_origin(in_rec) & rows[:, None] & cols[None, :]
        macs[info.layer] = macs.get(info.layer, 0) + (
            int(edges.sum()) * _kernel(module) * view.layers.nodes[node.args[0].name].block * positions)
    return {layer: 2 * m for layer, m in macs.items()}
