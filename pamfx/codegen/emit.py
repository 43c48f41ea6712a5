"""Emit: the standalone module of one task combination S (docs/design.md §6).

The emitted GraphModule holds only the active channels (τ ∩ S ≠ ∅) of every neuron layer, as one
tensor per active group τ, and computes each output group from exactly its allowed input groups
(τ_out ⊆ τ_in): one conv / linear per output group over the concatenation of those input groups,
so its multiply-accumulates equal the subgraph's edge count. Channel-wise ops run per group with
their sliced parameters; identity shortcuts become index gathers; heads of tasks outside S are
dropped. With ``share_weights=True`` (used by `MultitaskRuntime`) every dense op is split into
one op per (output group, input group) pair whose weights are *views* of the merged network's
parameters, so all specialisations share one copy of the weights; this needs a merged network
whose channels are sorted by group (`pamfx.passes.sort_channels`).

With ``fuse`` other than ``"never"`` a dense op may instead make ONE conv / linear call over all
its active input groups computing all its active output groups — the merged weight restricted to
active rows and columns, masked zeros included — whose output is sliced back into per-group
tensors (`torch.narrow`, copied contiguous: channel-wise kernels such as BatchNorm run several
times slower on a strided channel slice), so the rest of the graph is unchanged. ``"always"``
fuses every dense op with two or more active output groups; ``"auto"`` (or a `FusionCostModel`)
fuses where the cost model predicts the fused call to be faster. Fusion says so: the fused call's
node carries ``node.meta["pamfx_fused"]`` (layer, groups, edge_flops, dense_flops, reason), its
submodule is named after the merged op's with a ``_fused`` suffix, `fusion_report` lists them,
and ``module.print_readable(additional_meta=["pamfx_fused"])`` prints them as comments. A fused
module's `pamfx.cost` counts what it executes (masked zeros included); ``pamfx.cost(merged, S)``
stays the edge count, and each record's ``dense_flops − edge_flops`` is the overhead. Masked
weights are zero in a merged network (merge and fine-tuning keep them so), so the outputs agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Any, Iterable

import torch
from torch import fx, nn

from pamfx.analysis.channel_rules import Role
from pamfx.analysis.layer_organisation import NodeInfo, Submodules
from pamfx.analysis.multitask_view import MultitaskView, read_multitask
from pamfx.codegen.fusion import FusionCostModel
from pamfx.errors import InputError, check_type
from pamfx.frontend import example_from_meta, shape_propagate
from pamfx.ir.diagonal import DiagonalConnection
from pamfx.ir.meta import META_CONV_GROUPS, META_DECLINED, META_FUSED, META_GROUP, META_MASK
from pamfx.ir.task_set import TaskSet, is_subset
from pamfx.passes.module_surgery import attr_name, channel_tensors, rebuild

FUSE_MODES = ("never", "always", "auto")


class ConstantChannels(nn.Module):
    """Channels that read no allowed input: their value is the bias (or 0), broadcast over the batch."""

    def __init__(self, bias: torch.Tensor | None, width: int, spatial: tuple[int, ...]):
        super().__init__()
        if bias is None:
            self.register_buffer("bias", torch.zeros(width))
        else:
            self.bias = nn.Parameter(bias.detach().clone())
        self.spatial = tuple(spatial)

    def forward(self, ref: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * len(self.spatial)
        return self.bias.view(shape).expand((ref.shape[0], -1) + self.spatial)


@dataclass
class _Grouped:
    """A layer's value in the emitted graph: one node per active group."""

    layer: str
    nodes: dict[TaskSet, fx.Node]


@dataclass
class _Fusion:
    """The fusion decision for one dense op: its record, and the rows / columns the fused call reads."""

    fused: bool
    record: dict[str, Any]
    rows: list[int]
    cols: list[int] | None  # None: every column (the op reads the network's input)


@dataclass
class _Shortcut:
    source: _Grouped
    src: list[int]
    dst: list[int]


class _Emitter:
    def __init__(self, view: MultitaskView, combo: TaskSet, share_weights: bool, fuse: str | FusionCostModel, batch: int):
        self.view = view
        self.combo = combo
        self.share = share_weights
        self.fuse = fuse
        self.batch = batch
        self.graph = fx.Graph()
        self.attrs: dict[str, Any] = {}
        self.env: dict[str, Any] = {}
        self.modules = Submodules(view.gm)
        self.input: fx.Node | None = None

    # -- helpers --------------------------------------------------------------------------------
    def label(self, task_set: TaskSet) -> str:
        return "g" + "_".join(str(i) for i in range(self.view.tasks.k) if task_set >> i & 1)

    def add_module(self, base: str, module: nn.Module) -> str:
        name, k = attr_name(base), 1
        while name in self.attrs:
            k += 1
            name = f"{attr_name(base)}_{k}"
        self.attrs[name] = module
        return name

    def add_index(self, base: str, values: list[int]) -> fx.Node:
        name = self.add_module(base, torch.tensor(values, dtype=torch.long))
        return self.graph.get_attr(name)

    def tensor(self, t: torch.Tensor, index: list[int] | slice, dim: int = 0) -> torch.Tensor:
        if isinstance(index, slice):
            return t.detach().narrow(dim, index.start, index.stop - index.start)
        return t.detach().index_select(dim, torch.tensor(index, dtype=torch.long))

    def contiguous(self, idx: list[int]) -> slice | list[int]:
        if self.share:
            if not _is_span(idx):
                raise InputError("share_weights needs a merged network whose channels are sorted by group")
            return slice(idx[0], idx[-1] + 1)
        return idx

    def cat(self, nodes: list[fx.Node]) -> fx.Node:
        return nodes[0] if len(nodes) == 1 else self.graph.call_function(torch.cat, (nodes, 1))

    def plain(self, arg: Any) -> Any:
        return fx.map_arg(arg, lambda n: self.env[n.name])

    def tag(self, node: fx.Node, layer: str, task_set: TaskSet, idx: list[int]) -> fx.Node:
        node.meta[META_GROUP] = (layer, task_set, tuple(idx))
        return node

    # -- the walk -------------------------------------------------------------------------------
    def run(self) -> fx.GraphModule:
        for node in self.view.gm.graph.nodes:
            info = self.view.layers.nodes.get(node.name)
            if node.op == "placeholder":
                self.input = self.graph.placeholder(node.name)
                self.env[node.name] = self.input
            elif node.op == "output":
                (ret,) = node.args
                names = self.view.tasks.ordered_names(self.combo)
                self.graph.output({t: self.env[ret[t].name] for t in names})
            elif info is None or info.role == Role.META:
                self.env[node.name] = self.graph.node_copy(node, self.meta_arg)
            elif info.task is not None:
                self.head_chain(node, info)
            elif info.layer is None:
                self.env[node.name] = self.copy_plain(node)
            else:
                self.env[node.name] = self.layer_node(node, info)
        gm = fx.GraphModule(self.attrs, self.graph, class_name=f"Emitted_{attr_name(self.view.tasks.label(self.combo))}")
        gm.graph.lint()
        return gm

    def meta_arg(self, n: fx.Node) -> fx.Node:
        value = self.env[n.name]
        if isinstance(value, (_Grouped, _Shortcut)):
            raise InputError(f"node {n.name!r}: reading the shape or metadata of a neuron layer cannot be specialised")
        return value

    def copy_plain(self, node: fx.Node) -> fx.Node:
        if node.op == "call_module":
            self.attrs[attr_name(node.target)] = rebuild(self.modules[node.target])
            return self.graph.call_module(attr_name(node.target), self.plain(node.args), self.plain(node.kwargs))
        return self.graph.node_copy(node, lambda n: self.env[n.name])

    def layer_node(self, node: fx.Node, info: NodeInfo) -> Any:
        if info.role == Role.DENSE:
            return self.dense(node, info)
        if info.role == Role.SHORTCUT:
            module: DiagonalConnection = self.modules[node.target]
            return _Shortcut(self.env[node.args[0].name], module.src.tolist(), module.dst.tolist())
        groups = self.view.groups(info.layer, self.combo)
        out: dict[TaskSet, fx.Node] = {}
        for task_set, idx in groups.items():
            out[task_set] = self.tag(self.per_group(node, info, task_set, idx), info.layer, task_set, idx)
        return _Grouped(info.layer, out)

    def per_group(self, node: fx.Node, info: NodeInfo, task_set: TaskSet, idx: list[int]) -> fx.Node:
        """A channel-wise op (or flatten, or residual sum: the call is kept, so ``alpha=`` and
        ``sub`` stay exact) applied to one group."""
        substitute: dict[fx.Node, fx.Node] = {}  # a residual's shortcut operand -> its value on this group

        def arg_map(n: fx.Node) -> Any:
            if n in substitute:
                return substitute[n]
            value = self.env[n.name]
            return value.nodes[task_set] if isinstance(value, _Grouped) else value

        if info.role == Role.FLATTEN:
            return self.graph.call_function(torch.flatten, (arg_map(node.args[0]), 1))
        if info.role == Role.RESIDUAL:
            for n in node.all_input_nodes:
                if isinstance(self.env.get(n.name), _Shortcut):
                    substitute[n] = self.shortcut_group(self.env[n.name], node, task_set, idx, info.layer)
        if node.op == "call_module":
            module = self.modules[node.target]
            tensors = channel_tensors(module)
            if tensors:
                sel = self.contiguous(idx)
                module = rebuild(module, share=self.share, **{k: self.tensor(v, sel) for k, v in tensors.items()})
            else:
                module = rebuild(module)  # its own copy, without hooks: emit never touches the merged network
            name = self.add_module(f"{node.target}.{self.label(task_set)}", module)
            return self.graph.call_module(name, fx.map_arg(node.args, arg_map), fx.map_arg(node.kwargs, arg_map))
        return self.graph.create_node(node.op, node.target, fx.map_arg(node.args, arg_map), fx.map_arg(node.kwargs, arg_map))

    def shortcut_group(self, sc: _Shortcut, node: fx.Node, task_set: TaskSet, idx: list[int], layer: str) -> fx.Node:
        """The identity shortcut's value on one group of ``node``'s layer: its allowed channels that
        land in the group, gathered from the source's active groups, and 0 on the group's other channels."""
        position = {c: p for p, c in enumerate(idx)}
        src_groups = sc.source.nodes
        src_order = [c for t in src_groups for c in self.view.groups(sc.source.layer, self.combo)[t]]
        src_position = {c: p for p, c in enumerate(src_order)}
        pairs = [(src_position[s], position[d]) for s, d in zip(sc.src, sc.dst) if d in position]
        if not pairs:
            zeros = ConstantChannels(None, len(idx), tuple(node.meta["tensor_meta"].shape[2:]))
            return self.graph.call_module(self.add_module(f"{layer}.shortcut.{self.label(task_set)}", zeros), (self.input,))
        source = self.cat(list(src_groups.values()))
        src, dst = [p for p, _ in pairs], [q for _, q in pairs]
        if dst == list(range(len(idx))):
            return self.graph.call_function(torch.index_select, (source, 1, self.add_index(f"{layer}.sc_src", src)))
        module = DiagonalConnection(torch.tensor(src), torch.tensor(dst), len(idx))
        return self.graph.call_module(self.add_module(f"{layer}.shortcut.{self.label(task_set)}", module), (source,))

    def inputs(self, source: _Grouped, allowed: list[TaskSet], block: int) -> tuple[list[fx.Node], list[list[int]]]:
        groups = self.view.groups(source.layer, self.combo)
        cols = [[c * block + k for c in groups[t] for k in range(block)] for t in allowed]
        return [source.nodes[t] for t in allowed], cols

    def dense(self, node: fx.Node, info: NodeInfo) -> _Grouped:
        """A dense op: fused into one call if ``fuse`` decides so, else one call per output group."""
        groups = self.view.groups(info.layer, self.combo)
        x = self.env[node.args[0].name]
        has_input = not isinstance(x, _Grouped) or bool(x.nodes)
        fusion = self.fusion(node, info, groups) if self.fuse != "never" and len(groups) > 1 and has_input else None
        if fusion is not None and fusion.fused:
            return self.dense_fused(node, info, groups, fusion)
        split = self.dense_split(node, info, groups)
        if fusion is not None:
            next(iter(split.nodes.values())).meta[META_DECLINED] = fusion.record
        return split

    def allowed(self, x: _Grouped, task_set: TaskSet) -> list[TaskSet]:
        """The active input groups that output group ``task_set`` may read (τ_out ⊆ τ_in)."""
        return [t for t in x.nodes if is_subset(task_set, t)]

    def fusion(self, node: fx.Node, info: NodeInfo, groups: dict[TaskSet, list[int]]) -> _Fusion:
        """Whether to fuse this dense op, with the FLOPs of both choices and the reason."""
        module = self.modules[node.target]
        mask = node.meta[META_MASK]
        x = self.env[node.args[0].name]
        # input elements each call reads per input channel and sample: kernel (or block) × output positions
        per_channel = module.weight[0].numel() // mask.shape[1] * prod(node.meta["tensor_meta"].shape[2:])
        rows = [c for idx in groups.values() for c in idx]
        if isinstance(x, _Grouped):
            in_groups = self.view.groups(x.layer, self.combo)
            reads = [self.allowed(x, t) for t in groups]
            calls = sum(len(r) if self.share else min(1, len(r)) for r in reads)
            split_channels = sum(len(in_groups[t]) for r in reads for t in r)
            mask = mask[:, [c for idx in in_groups.values() for c in idx]]
            cols = [c for cs in self.inputs(x, list(x.nodes), self.view.layers.nodes[node.args[0].name].block)[1] for c in cs]
        else:
            calls, split_channels, cols = len(groups), len(groups) * mask.shape[1], None
        mask = mask[rows]
        edge, dense = 2 * int(mask.sum()) * per_channel, 2 * mask.numel() * per_channel
        record = {"layer": info.layer, "groups": len(groups), "edge_flops": edge, "dense_flops": dense}
        if self.share and not (_is_span(rows) and (cols is None or _is_span(cols))):
            fused, record["reason"] = False, "share_weights: the active rows / columns are not contiguous in the merged weight"
        elif self.fuse == "always":
            fused, record["reason"] = True, "fuse='always'"
        else:
            model = FusionCostModel.calibrate(self.batch) if self.fuse == "auto" else self.fuse
            t_fused = model.seconds(1, mask.shape[1] * per_channel, dense, self.batch)
            t_split = model.seconds(calls, split_channels * per_channel, edge, self.batch)
            fused = t_fused < t_split
            record["reason"] = f"cost model at batch {self.batch}: {t_fused * 1e3:.3f} ms fused, {t_split * 1e3:.3f} ms in {calls} calls"
        return _Fusion(fused, record, rows, cols)

    def dense_fused(self, node: fx.Node, info: NodeInfo, groups: dict[TaskSet, list[int]], fusion: _Fusion) -> _Grouped:
        """One conv / linear over all active input groups, sliced into the active output groups."""
        module = self.modules[node.target]
        x = self.env[node.args[0].name]
        rows = self.contiguous(fusion.rows)
        weight = self.tensor(module.weight, rows)
        if fusion.cols is not None:
            weight = self.tensor(weight, self.contiguous(fusion.cols), dim=1)
            x = self.cat(list(x.nodes.values()))
        bias = None if module.bias is None else self.tensor(module.bias, rows)
        name = self.add_module(f"{node.target}.fused", rebuild(module, share=self.share, weight=weight, bias=bias))
        call = self.graph.call_module(name, (x,))
        call.meta[META_FUSED] = fusion.record
        out: dict[TaskSet, fx.Node] = {}
        offset = 0
        for task_set, idx in groups.items():
            part = self.graph.call_method("contiguous", (self.graph.call_function(torch.narrow, (call, 1, offset, len(idx))),))
            out[task_set] = self.tag(part, info.layer, task_set, idx)
            offset += len(idx)
        return _Grouped(info.layer, out)

    def dense_split(self, node: fx.Node, info: NodeInfo, groups: dict[TaskSet, list[int]]) -> _Grouped:
        """One conv / linear per active output group over its allowed input groups (τ_out ⊆ τ_in)."""
        module = self.modules[node.target]
        x = self.env[node.args[0].name]
        conv_groups = node.meta.get(META_CONV_GROUPS)
        if conv_groups is not None and self.share:
            raise InputError(f"node {node.name!r}: share_weights cannot emit a grouped conv (its weights are gathered per group)")
        out: dict[TaskSet, fx.Node] = {}
        for task_set, idx in groups.items():
            rows = self.contiguous(idx)
            bias = None if module.bias is None else self.tensor(module.bias, rows)
            if not isinstance(x, _Grouped):
                nodes, cols = [x], [list(range(module.weight.shape[1]))]
            else:
                nodes, cols = self.inputs(x, self.allowed(x, task_set), self.view.layers.nodes[node.args[0].name].block)
            if conv_groups is not None and nodes:
                group = self.grouped_conv(node, module, idx, nodes, cols, bias, task_set)
            else:
                parts = [(x, self.tensor(module.weight, rows))] if not isinstance(x, _Grouped) else self.dense_parts(module, rows, nodes, cols)
                group = self.dense_group(node, module, parts, bias, task_set, len(idx))
            out[task_set] = self.tag(group, info.layer, task_set, idx)
        return _Grouped(info.layer, out)

    def grouped_conv(self, node: fx.Node, module: nn.Module, idx: list[int], nodes: list[fx.Node], cols: list[list[int]], bias, task_set: TaskSet) -> fx.Node:
        """One output group of a merged grouped conv: each conv group's rows from that group's
        allowed columns, conv groups with equal row and column counts run as one grouped conv,
        rows whose conv group has no allowed column are their bias; then back in ``idx`` order."""
        out_ids, in_ids = node.meta[META_CONV_GROUPS]
        flat = [c for cs in cols for c in cs]
        rows_of: dict[int, list[int]] = {}  # conv group -> positions in idx
        cols_of: dict[int, list[int]] = {}  # conv group -> positions in flat
        for p, r in enumerate(idx):
            rows_of.setdefault(int(out_ids[r]), []).append(p)
        for q, c in enumerate(flat):
            cols_of.setdefault(int(in_ids[c]), []).append(q)
        buckets: dict[tuple[int, int], list[int]] = {}
        constant: list[int] = []
        for g, positions in rows_of.items():
            if g in cols_of:
                buckets.setdefault((len(positions), len(cols_of[g])), []).append(g)
            else:
                constant += positions
        x, base = self.cat(nodes), f"{node.target}.{self.label(task_set)}"
        pieces, order = [], []
        for conv_groups in buckets.values():
            out_pos = [p for g in conv_groups for p in rows_of[g]]
            in_pos = [q for g in conv_groups for q in cols_of[g]]
            weight = torch.cat([self.tensor(self.tensor(module.weight, [idx[p] for p in rows_of[g]]), [flat[q] for q in cols_of[g]], dim=1) for g in conv_groups])
            conv = rebuild(module, groups=len(conv_groups), weight=weight, bias=None if bias is None else bias[out_pos])
            x_in = x if in_pos == list(range(len(flat))) else self.graph.call_function(torch.index_select, (x, 1, self.add_index(f"{base}.in", in_pos)))
            pieces.append(self.graph.call_module(self.add_module(base, conv), (x_in,)))
            order += out_pos
        if constant:
            spatial = tuple(node.meta["tensor_meta"].shape[2:])
            constant_channels = ConstantChannels(None if bias is None else bias[constant], len(constant), spatial)
            pieces.append(self.graph.call_module(self.add_module(base, constant_channels), (self.input,)))
            order += constant
        result = self.cat(pieces)
        if order == list(range(len(idx))):
            return result
        inverse = sorted(range(len(order)), key=order.__getitem__)
        return self.graph.call_function(torch.index_select, (result, 1, self.add_index(f"{base}.order", inverse)))

    def dense_parts(self, module: nn.Module, rows, nodes: list[fx.Node], cols: list[list[int]]) -> list[tuple[fx.Node, torch.Tensor]]:
        weight = self.tensor(module.weight, rows)
        if not nodes:
            return []
        if self.share:
            return [(n, self.tensor(weight, self.contiguous(c), dim=1)) for n, c in zip(nodes, cols)]
        flat = [c for cs in cols for c in cs]
        return [(self.cat(nodes), self.tensor(weight, flat, dim=1))]

    def dense_group(self, node: fx.Node, module: nn.Module, parts, bias, task_set: TaskSet, width: int) -> fx.Node:
        base = f"{node.target}.{self.label(task_set)}"
        if not parts:
            spatial = tuple(node.meta["tensor_meta"].shape[2:])
            name = self.add_module(base, ConstantChannels(bias, width, spatial))
            return self.graph.call_module(name, (self.input,))
        result = None
        for k, (x, weight) in enumerate(parts):
            part = rebuild(module, share=self.share, weight=weight, bias=bias if k == 0 else None)
            call = self.graph.call_module(self.add_module(base, part), (x,))
            result = call if result is None else self.graph.call_function(torch.add, (result, call))
        return result

    def head_chain(self, node: fx.Node, info: NodeInfo) -> None:
        if not self.combo & self.view.tasks.bit(info.task):
            return
        if info.role != Role.HEAD:
            self.env[node.name] = self.copy_plain(node)
            return
        module = self.modules[node.target]
        x: _Grouped = self.env[node.args[0].name]
        bit = self.view.tasks.bit(info.task)
        allowed = [t for t in x.nodes if t & bit]
        nodes, cols = self.inputs(x, allowed, self.view.layers.nodes[node.args[0].name].block)
        bias = None if module.bias is None else module.bias.detach()
        parts = self.dense_parts(module, slice(0, module.weight.shape[0]), nodes, cols)
        self.env[node.name] = self.dense_group(node, module, parts, bias, bit, module.weight.shape[0])


def _is_span(idx: list[int]) -> bool:
    """Whether ``idx`` is a run of consecutive indices (a slice of a tensor, hence a view)."""
    return idx == list(range(idx[0], idx[-1] + 1))


def emit(
    merged: fx.GraphModule,
    tasks: Iterable[str] | str | TaskSet,
    *,
    share_weights: bool = False,
    fuse: str | FusionCostModel = "never",
    batch: int = 1,
) -> fx.GraphModule:
    """The standalone GraphModule of task combination ``tasks`` (names, one name or a bitmask).

    Its forward returns ``{task: output}`` for the tasks of the combination, equal to the merged
    network's outputs for those tasks; ``print(module.code)`` shows it as Python source.
    ``fuse``: ``"never"`` (every dense op computes only allowed connections: FLOPs = the edge
    count), ``"always"`` (every dense op with two or more active output groups is one masked
    call), ``"auto"`` (fused where `FusionCostModel.calibrate(batch)` predicts it faster), or a
    `FusionCostModel` to decide with. ``batch``: the input batch size those predictions assume.
    """
    return emit_view(read_multitask(merged), tasks, share_weights=share_weights, fuse=fuse, batch=batch)


def emit_view(
    view: MultitaskView,
    tasks: Iterable[str] | str | TaskSet,
    *,
    share_weights: bool = False,
    fuse: str | FusionCostModel = "never",
    batch: int = 1,
) -> fx.GraphModule:
    """`emit` from an IR view already read (`read_multitask`), so a caller emitting many
    combinations reads and checks the IR once."""
    if not (isinstance(fuse, FusionCostModel) or fuse in FUSE_MODES):
        raise InputError(f"fuse={fuse!r}: expected one of {FUSE_MODES} or a FusionCostModel")
    if not isinstance(batch, int) or batch < 1:
        raise InputError(f"batch={batch!r}: expected a positive batch size")
    combo = view.tasks.select(tasks)
    gm = _Emitter(view, combo, share_weights, fuse, batch).run()
    shape_propagate(gm, example_from_meta(view.gm), f"emitted module {view.tasks.label(combo)!r}")
    gm.training = view.gm.training
    return gm


def fusion_report(emitted: fx.GraphModule, *, declined: bool = False) -> list[dict[str, Any]]:
    """The fused dense ops of an emitted module, in graph order: node, layer, groups, FLOPs, reason.

    ``edge_flops`` is what the op's allowed connections cost per sample, ``dense_flops`` what the
    fused call executes. With ``declined=True`` the list also holds the dense ops whose fusion was
    considered and declined (by the cost model, or because shared weights are not contiguous),
    with ``"fused": False``.
    """
    check_type(emitted, fx.GraphModule, "fusion_report: emitted")
    keys = (META_FUSED, META_DECLINED) if declined else (META_FUSED,)
    return [
        {"node": node.name, "fused": key == META_FUSED, **node.meta[key]}
        for node in emitted.graph.nodes
        for key in keys
        if key in node.meta
    ]
