"""Channel selection on a merged network: keep (and reorder) channels of neuron layers.

The primitive behind structured pruning (drop channels) and `sort_channels` (reorder them so
each group is contiguous). Producers lose output rows, channel-wise modules their per-channel
tensors, consumers and heads the matching input columns (a block of H·W features per channel
after a flatten), identity shortcuts the pairs of removed channels; connection masks and the
layer's task-set record follow, so the result is again a valid merged network.
"""
from __future__ import annotations

import copy
import operator
from typing import Mapping, Sequence

import torch
from torch import fx

from pamfx.analysis.channel_order import group_orders
from pamfx.analysis.channel_rules import Role
from pamfx.analysis.layer_organisation import Submodules
from pamfx.analysis.multitask_view import MultitaskView, read_multitask
from pamfx.errors import InputError, check_type
from pamfx.frontend import example_from_meta, shape_propagate
from pamfx.ir.diagonal import DiagonalConnection
from pamfx.ir.meta import META_CONV_GROUPS, META_LAYER, META_MASK
from pamfx.ir.task_set import TaskSet
from pamfx.passes.module_surgery import channel_tensors, rebuild, set_module


def feature_index(index: torch.Tensor, block: int) -> torch.Tensor:
    """The input-feature indices of channels ``index`` when each channel feeds ``block`` features (H·W after a flatten)."""
    return (index[:, None] * block + torch.arange(block)[None, :]).reshape(-1)


def _check_keep(keep: Mapping[str, Sequence[int]], widths: dict[str, int]) -> dict[str, torch.Tensor]:
    check_type(keep, Mapping, "select_channels: keep")
    out = {}
    for layer, idx in keep.items():
        if layer not in widths:
            raise InputError(f"select_channels: no neuron layer {layer!r}; layers are {sorted(widths)}")
        try:
            idx = [operator.index(i) for i in idx]
        except TypeError as exc:
            raise InputError(f"select_channels: layer {layer!r}: channel indices must be integers ({exc})") from exc
        if not idx:
            raise InputError(f"select_channels: layer {layer!r} would lose every channel")
        if len(set(idx)) != len(idx) or min(idx) < 0 or max(idx) >= widths[layer]:
            raise InputError(f"select_channels: layer {layer!r}: indices must be distinct and in [0, {widths[layer]})")
        out[layer] = torch.tensor(idx, dtype=torch.long)
    return out


def select_channels(gm: fx.GraphModule, keep: Mapping[str, Sequence[int]]) -> fx.GraphModule:
    """A copy of merged network ``gm`` keeping, for each layer named in ``keep``, those channels in that order."""
    return select_from_view(read_multitask(gm), keep)


def select_from_view(view: MultitaskView, keep: Mapping[str, Sequence[int]]) -> fx.GraphModule:
    """`select_channels` on the merged network that ``view`` has read."""
    fixed = view.fixed_layers.intersection(keep)
    if fixed:
        raise InputError(f"select_channels: layers {sorted(fixed)} are read or written by an op without a channel rule; their channels stay")
    index = _check_keep(keep, {name: rec.width for name, rec in view.records.items()})
    new = copy.deepcopy(view.gm)
    modules = Submodules(new)
    records = {name: view.records[name].select(idx.tolist()) for name, idx in index.items()}
    for node in new.graph.nodes:
        info = view.layers.nodes.get(node.name)
        if info is None:
            continue
        if META_LAYER in node.meta and node.meta[META_LAYER].name in records:
            node.meta[META_LAYER] = records[node.meta[META_LAYER].name]
        if node.op != "call_module":
            continue
        module = modules[node.target]
        if info.role == Role.SHORTCUT:
            set_module(new, node.target, _select_shortcut(module, index.get(info.source), index.get(info.layer)))
            continue
        tensors: dict[str, torch.Tensor | None] = {}
        mask = node.meta.get(META_MASK)
        if info.role == Role.DENSE and info.layer in index:
            rows = index[info.layer]
            tensors["weight"] = module.weight.index_select(0, rows)
            if module.bias is not None:
                tensors["bias"] = module.bias.index_select(0, rows)
            mask = mask.index_select(0, rows)
        elif info.role not in (Role.DENSE, Role.HEAD) and info.layer in index:
            tensors = {k: v.index_select(0, index[info.layer]) for k, v in channel_tensors(module).items()}
        if info.role in (Role.DENSE, Role.HEAD) and info.source in index:
            cols = index[info.source]
            block = view.layers.nodes[node.args[0].name].block
            weight = tensors.get("weight", module.weight)
            tensors["weight"] = weight.index_select(1, feature_index(cols, block))
            mask = mask.index_select(1, cols)
        if tensors:
            set_module(new, node.target, rebuild(module, **tensors))
        if mask is not None:
            node.meta[META_MASK] = mask
        if META_CONV_GROUPS in node.meta:
            out_ids, in_ids = node.meta[META_CONV_GROUPS]
            node.meta[META_CONV_GROUPS] = (
                out_ids.index_select(0, index[info.layer]) if info.layer in index else out_ids,
                in_ids.index_select(0, index[info.source]) if info.source in index else in_ids,
            )
    return shape_propagate(new, example_from_meta(view.gm), "merged network")


def _select_shortcut(module: DiagonalConnection, src_keep: torch.Tensor | None, dst_keep: torch.Tensor | None) -> DiagonalConnection:
    """Re-index an identity shortcut after channel selection on its source and/or destination."""
    pairs = list(zip(module.src.tolist(), module.dst.tolist()))
    src_map = {c: i for i, c in enumerate(src_keep.tolist())} if src_keep is not None else None
    dst_map = {c: i for i, c in enumerate(dst_keep.tolist())} if dst_keep is not None else None
    kept = [
        (src_map[s] if src_map else s, dst_map[d] if dst_map else d)
        for s, d in pairs
        if (src_map is None or s in src_map) and (dst_map is None or d in dst_map)
    ]
    out_channels = len(dst_keep) if dst_keep is not None else module.out_channels
    src = torch.tensor([s for s, _ in kept], dtype=torch.long)
    dst = torch.tensor([d for _, d in kept], dtype=torch.long)
    return DiagonalConnection(src, dst, out_channels)


def sort_channels(gm: fx.GraphModule) -> fx.GraphModule:
    """Reorder every layer's channels by task set (stable), so that each group is contiguous."""
    view = read_multitask(gm)
    return select_from_view(view, sort_keep(view))


def order_channels(gm: fx.GraphModule, usage: Mapping[TaskSet, float] | None = None) -> fx.GraphModule:
    """Reorder every layer's channels group by group in the order codegen lays them out
    (`pamfx.analysis.channel_order.group_orders` under the usage distribution ``usage``), so that
    each group, and most sets of groups a specialisation reads together, are contiguous."""
    view = read_multitask(gm)
    return select_from_view(view, order_keep(view, group_orders(view, usage)))


def order_keep(view: MultitaskView, orders: Mapping[str, Sequence[TaskSet]]) -> dict[str, list[int]]:
    """Per layer, its channel indices group by group in ``orders[layer]`` (stable): what `order_channels` keeps."""
    keep = {}
    for name, rec in view.records.items():
        if name in view.fixed_layers:
            continue
        rank = {t: i for i, t in enumerate(orders[name])}
        keep[name] = sorted(range(rec.width), key=lambda c, rec=rec: (rank[rec.task_sets[c]], c))
    return keep


def sort_keep(view: MultitaskView) -> dict[str, list[int]]:
    """Per layer, its channel indices ordered by task set (stable): what `sort_channels` keeps."""
    return {
        name: sorted(range(rec.width), key=lambda c, rec=rec: (rec.task_sets[c], c))
        for name, rec in view.records.items()
        if name not in view.fixed_layers  # shared by all tasks: one group already
    }
