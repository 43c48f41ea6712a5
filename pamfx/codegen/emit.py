"""Emit: the standalone module of one task combination S (docs/design.md §6, docs/codegen.md).

The emitted GraphModule holds only the active channels (τ ∩ S ≠ ∅) of every neuron layer, as ONE
tensor per layer whose channels lie group after group in the layer's group order
(`pamfx.analysis.channel_order.group_orders`: chosen so that the inputs an output group may read,
τ ⊆ τ_in, are contiguous for as many groups and combinations as possible). Channel-wise ops
(BatchNorm, activations, pooling, residual sums) therefore run once per layer; BatchNorms are
folded into the conv / linear before them by default (`pamfx.passes.fold_batchnorm`). Heads of
tasks outside S are dropped; identity shortcuts become one gather (or nothing, where they are the
identity on the active channels). Image inputs are converted to channels-last once and conv
weights stored channels-last, so oneDNN keeps every activation in that faster layout; gathers of
channels keep it too (`gather_channels`).

Each dense op is planned as a few calls, each over consecutive output groups and a set of input
channels, concatenated in layout order. ``fuse="never"``: one call per output group over exactly
its allowed inputs (a narrow view where they are contiguous, else a gather), so the module's
multiply-accumulates equal the subgraph's edge count. ``"always"``: one call over every active
output group and the span of their inputs, masked zeros included. ``"auto"`` (default) or a
`FusionCostModel`: the partition with the least predicted time (dynamic programming over the
layout). A call that multiplies masked zeros or serves several groups says so: its node carries
``node.meta["pamfx_fused"]`` (layer, groups, edge_flops, dense_flops, reason), its submodule name
ends in ``_fused``, `fusion_report` lists it and ``module.print_readable(additional_meta=
["pamfx_fused"])`` prints it as a comment; an op planned exactly although fusion was considered
carries ``pamfx_fusion_declined``. A module's `pamfx.cost` counts what it executes; ``pamfx.cost
(merged, S)`` stays the edge count, and each record's ``dense_flops − edge_flops`` is the
overhead. Masked weights are zero in a merged network (merge, fine-tuning and pruning keep them
so), so outputs agree exactly in every mode.

With ``share_weights=True`` (used by `MultitaskRuntime`) every weight is a *view* of the merged
network's parameters: the layout is the network's own channel order (each group contiguous, e.g.
after `pamfx.sort_channels`), a call's rows must be one run of the merged weight and its columns
are cut into runs of the merged weight, one call each, summed.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Any, Iterable, Mapping

import torch
from torch import fx, nn

from pamfx.analysis.channel_order import group_orders
from pamfx.analysis.channel_rules import Role
from pamfx.analysis.layer_organisation import NodeInfo, Submodules
from pamfx.analysis.multitask_view import MultitaskView, read_multitask
from pamfx.codegen.fusion import FusionCostModel
from pamfx.errors import InputError, check_type
from pamfx.frontend import example_from_meta, shape_propagate
from pamfx.ir.diagonal import DiagonalConnection
from pamfx.ir.meta import META_CONV_GROUPS, META_DECLINED, META_FUSED, META_GROUP, META_MASK
from pamfx.ir.task_set import TaskSet, is_subset
from pamfx.passes.fold_batchnorm import inference_view
from pamfx.passes.module_surgery import attr_name, channel_tensors, rebuild

FUSE_MODES = ("never", "always", "auto")


def gather_channels(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Channels ``index`` of the 4-D tensor ``x`` (dim 1), kept channels-last.

    ``torch.index_select(x, 1, index)`` of a channels-last tensor returns a contiguous (NCHW) copy,
    which the next convolution re-lays out to channels-last before it runs: two copies, together
    about two thirds of that convolution's time in a micro-benchmark (240 of 480 channels of an
    8 × 480 × 16 × 16 input into a 3 × 3 conv of 32 channels). Gathering the last dimension of the
    NHWC view writes the copy channels-last directly; the values are the same."""
    if torch.onnx.is_in_onnx_export():  # an ONNX graph has no memory format
        return torch.index_select(x, 1, index)
    return torch.index_select(x.permute(0, 2, 3, 1), 3, index).permute(0, 3, 1, 2)


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
        # materialised: an in-place op after it (ReLU(inplace=True) once BatchNorm is folded) needs its own memory
        return self.bias.view(shape).expand((ref.shape[0], -1) + self.spatial).contiguous()


@dataclass
class _Layer:
    """A neuron layer's value in the emitted graph: one tensor of its active channels, laid out
    group after group (`_Emitter.layout`); ``node`` is None where no channel of the layer is active."""

    layer: str
    node: fx.Node | None


@dataclass
class _Shortcut:
    source: _Layer
    src: list[int]
    dst: list[int]


@dataclass(frozen=True)
class _Run:
    """One conv / linear call of a dense op: output groups ``first`` to ``stop`` (exclusive) of the
    layer's layout, reading input channel positions ``cols`` (None: the whole network input)."""

    first: int
    stop: int
    cols: tuple[int, ...] | None
    seconds: float
    edge: int
    dense: int


class _Emitter:
    def __init__(self, view: MultitaskView, combo: TaskSet, share_weights: bool, fuse: str | FusionCostModel,
                 batch: int, orders: dict[str, tuple[TaskSet, ...]], channels_last: bool):
        self.view = view
        self.channels_last = channels_last
        self.combo = combo
        self.share = share_weights
        self.fuse = fuse
        self.batch = batch
        self.orders = orders
        self.graph = fx.Graph()
        self.attrs: dict[str, Any] = {}
        self.env: dict[str, Any] = {}
        self.modules = Submodules(view.gm)
        self.input: fx.Node | None = None
        self.layouts: dict[str, list[tuple[TaskSet, list[int]]]] = {}

    # -- helpers --------------------------------------------------------------------------------
    def label(self, task_set: TaskSet) -> str:
        return "g" + "_".join(str(i) for i in range(self.view.tasks.k) if task_set >> i & 1)

    def add_module(self, base: str, module: nn.Module | torch.Tensor) -> str:
        if self.channels_last and not self.share and isinstance(module, nn.Conv2d):
            module = module.to(memory_format=torch.channels_last)  # oneDNN then keeps activations channels-last
        name, k = attr_name(base), 1
        while name in self.attrs:
            k += 1
            name = f"{attr_name(base)}_{k}"
        self.attrs[name] = module
        return name

    def add_index(self, base: str, values: list[int]) -> fx.Node:
        return self.graph.get_attr(self.add_module(base, torch.tensor(values, dtype=torch.long)))

    def tensor(self, t: torch.Tensor, index: list[int], dim: int = 0) -> torch.Tensor:
        """``t``'s entries ``index`` along ``dim``: a view (narrow) where they are a run, else a gathered copy."""
        if _is_span(index):
            return t.detach().narrow(dim, index[0], len(index))
        return t.detach().index_select(dim, torch.tensor(index, dtype=torch.long))

    def layout(self, layer: str) -> list[tuple[TaskSet, list[int]]]:
        """The active groups of ``layer`` as its emitted tensor holds them: (task set, merged channels).

        Groups follow the layer's group order (`group_orders`); with shared weights, the order of the
        merged network itself, whose groups must then each be contiguous."""
        if layer not in self.layouts:
            groups = self.view.groups(layer, self.combo)
            if self.share:
                if not all(_is_span(idx) for idx in groups.values()):
                    raise InputError(f"layer {layer!r}: share_weights needs a merged network whose groups are contiguous (pamfx.sort_channels)")
                order = sorted(groups, key=lambda t: groups[t][0])
            else:
                rank = {t: i for i, t in enumerate(self.orders[layer])}
                order = sorted(groups, key=rank.__getitem__)
            self.layouts[layer] = [(t, groups[t]) for t in order]
        return self.layouts[layer]

    def channels(self, layer: str) -> list[int]:
        return [c for _, idx in self.layout(layer) for c in idx]

    def cat(self, nodes: list[fx.Node]) -> fx.Node:
        return nodes[0] if len(nodes) == 1 else self.graph.call_function(torch.cat, (nodes, 1))

    def tag(self, node: fx.Node, layer: str, groups: list[tuple[TaskSet, list[int]]]) -> fx.Node:
        node.meta[META_GROUP] = (layer, tuple((t, tuple(idx)) for t, idx in groups))
        return node

    def read(self, x: fx.Node, cols: list[int], width: int, block: int, dims: int) -> fx.Node:
        """Input channel positions ``cols`` of a ``dims``-D layer tensor of ``width`` channels (``block`` features each)."""
        if cols == list(range(width)):
            return x
        if _is_span(cols):
            return self.graph.call_function(torch.narrow, (x, 1, cols[0] * block, len(cols) * block))
        features = [p * block + b for p in cols for b in range(block)]
        return self.gather(x, self.add_index("cols", features), dims)

    def gather(self, x: fx.Node, index: fx.Node, dims: int) -> fx.Node:
        """Channels ``index`` of the ``dims``-D tensor ``x``: of images with channels-last activations
        through `gather_channels`."""
        if self.channels_last and dims == 4:
            return self.graph.call_function(gather_channels, (x, index))
        return self.graph.call_function(torch.index_select, (x, 1, index))

    def spatial(self, node: fx.Node) -> tuple[int, ...]:
        return tuple(node.meta["tensor_meta"].shape[2:])

    # -- the walk -------------------------------------------------------------------------------
    def run(self) -> fx.GraphModule:
        for node in self.view.gm.graph.nodes:
            info = self.view.layers.nodes.get(node.name)
            if node.op == "placeholder":
                self.input = self.graph.placeholder(node.name)
                if self.channels_last:
                    self.input = self.graph.call_method("contiguous", (self.input,), {"memory_format": torch.channels_last})
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
            elif info.role == Role.DENSE:
                self.env[node.name] = self.dense(node, info)
            elif info.role == Role.SHORTCUT:
                module: DiagonalConnection = self.modules[node.target]
                self.env[node.name] = _Shortcut(self.env[node.args[0].name], module.src.tolist(), module.dst.tolist())
            else:
                self.env[node.name] = self.channelwise(node, info)
        gm = fx.GraphModule(self.attrs, self.graph, class_name=f"Emitted_{attr_name(self.view.tasks.label(self.combo))}")
        gm.graph.lint()
        return gm

    def meta_arg(self, n: fx.Node) -> fx.Node:
        value = self.env[n.name]
        if isinstance(value, (_Layer, _Shortcut)):
            raise InputError(f"node {n.name!r}: reading the shape or metadata of a neuron layer cannot be specialised")
        return value

    def copy_plain(self, node: fx.Node) -> fx.Node:
        if node.op == "call_module":
            self.attrs[attr_name(node.target)] = rebuild(self.modules[node.target])
            return self.graph.call_module(attr_name(node.target), self.plain(node.args), self.plain(node.kwargs))
        return self.graph.node_copy(node, lambda n: self.env[n.name])

    def plain(self, arg: Any) -> Any:
        return fx.map_arg(arg, lambda n: self.env[n.name])

    def channelwise(self, node: fx.Node, info: NodeInfo) -> _Layer:
        """A channel-wise op (or flatten, residual sum, concatenation, shared unknown op) on the whole
        layer tensor: it runs once per layer, its per-channel tensors sliced to the layout."""
        layout = self.layout(info.layer)
        if not layout:
            return _Layer(info.layer, None)

        def arg_map(n: fx.Node) -> Any:
            value = self.env[n.name]
            if isinstance(value, _Shortcut):
                return self.shortcut(value, node, info.layer)
            return value.node if isinstance(value, _Layer) else value

        args, kwargs = fx.map_arg(node.args, arg_map), fx.map_arg(node.kwargs, arg_map)
        if info.role == Role.FLATTEN:
            result = self.graph.call_function(torch.flatten, (args[0], 1))
        elif node.op == "call_module":
            module = self.modules[node.target]
            tensors = channel_tensors(module)
            channels = self.channels(info.layer)
            # shared weights: one call per run of the merged tensors (views), concatenated
            chunks = _chunks(list(range(len(channels))), channels) if self.share and tensors else [list(range(len(channels)))]
            pieces = []
            for chunk in chunks:
                part = rebuild(module, share=self.share, **{k: self.tensor(v, [channels[p] for p in chunk]) for k, v in tensors.items()})
                chunk_args = args if len(chunks) == 1 else (self.read(args[0], chunk, len(channels), 1, _dims(node)),) + tuple(args[1:])
                pieces.append(self.graph.call_module(self.add_module(node.target, part), chunk_args, kwargs))
            result = self.cat(pieces)
        else:
            result = self.graph.create_node(node.op, node.target, args, kwargs)
        return _Layer(info.layer, self.tag(result, info.layer, layout))

    def shortcut(self, sc: _Shortcut, node: fx.Node, layer: str) -> fx.Node:
        """An identity shortcut's value in ``layer``'s layout: its allowed pairs, 0 on other channels."""
        position = {c: p for p, c in enumerate(self.channels(layer))}
        source = {c: p for p, c in enumerate(self.channels(sc.source.layer))}
        pairs = sorted((position[d], source[s]) for s, d in zip(sc.src, sc.dst) if d in position)
        if not pairs:
            zeros = ConstantChannels(None, len(position), self.spatial(node))
            return self.graph.call_module(self.add_module(f"{layer}.shortcut", zeros), (self.input,))
        dst, src = [d for d, _ in pairs], [s for _, s in pairs]
        if dst == list(range(len(position))):
            if src == list(range(len(source))):
                return sc.source.node
            return self.gather(sc.source.node, self.add_index(f"{layer}.sc_src", src), _dims(node))
        module = DiagonalConnection(torch.tensor(src), torch.tensor(dst), len(position))
        return self.graph.call_module(self.add_module(f"{layer}.shortcut", module), (sc.source.node,))

    # -- dense ops ------------------------------------------------------------------------------
    def allowed(self, task_set: TaskSet, source: str) -> list[int]:
        """The input positions (in ``source``'s layout) that output group ``task_set`` may read (τ_out ⊆ τ_in)."""
        out, start = [], 0
        for t, idx in self.layout(source):
            if is_subset(task_set, t):
                out += range(start, start + len(idx))
            start += len(idx)
        return out

    def dense(self, node: fx.Node, info: NodeInfo) -> _Layer:
        """A conv / linear producing a layer: the planned calls (`plan`), concatenated in layout order."""
        layout = self.layout(info.layer)
        if not layout:
            return _Layer(info.layer, None)
        module = self.modules[node.target]
        x = self.env[node.args[0].name]
        reads_input = not isinstance(x, _Layer)
        allowed = [None if reads_input else self.allowed(t, x.layer) for t, _ in layout]
        if META_CONV_GROUPS in node.meta:
            if self.share:
                raise InputError(f"node {node.name!r} ({node.target}): share_weights cannot emit a dense op whose connections "
                                 f"stay within blocks (a grouped conv, or a layer merged with cross_origin absent): its "
                                 f"weights are gathered per block; emit without share_weights")
            pieces = [self.grouped_group(node, module, x, t, idx, cols) for (t, idx), cols in zip(layout, allowed)]
            return _Layer(info.layer, self.tag(self.cat(pieces), info.layer, layout))
        runs, record = self.plan(node, info, module, layout, allowed)
        pieces = []
        for run in runs:
            groups = layout[run.first : run.stop]
            fused = (run.cols is None or bool(run.cols)) and (run.stop - run.first > 1 or run.dense > run.edge)  # bias-only runs are no call
            suffix = "_".join(self.label(t) for t, _ in (groups[:1] + groups[-1:] if len(groups) > 1 else groups))
            name = f"{node.target}.{suffix}" + ("_fused" if fused else "")
            rows = [c for _, idx in groups for c in idx]
            piece, first_call = self.call(node, module, name, rows, run.cols, x)
            if fused:
                first_call.meta[META_FUSED] = {
                    "layer": info.layer, "groups": len(groups), "edge_flops": run.edge, "dense_flops": run.dense,
                    "reason": record["reason"],
                }
            pieces.append(self.tag(piece, info.layer, groups) if len(runs) > 1 else piece)
            if record.get("declined") and len(pieces) == 1:
                first_call.meta[META_DECLINED] = {k: v for k, v in record.items() if k != "declined"}
        return _Layer(info.layer, self.tag(self.cat(pieces), info.layer, layout))

    def call(self, node: fx.Node, module: nn.Module, name: str, rows: list[int], cols: tuple[int, ...] | None, x: Any) -> tuple[fx.Node, fx.Node]:
        """One conv / linear over rows ``rows`` and input positions ``cols`` (None: the network input),
        with shared weights one call per column run that is also a run of the merged weight, summed;
        rows that read nothing are their bias. Returns the result and its first call."""
        bias = None if module.bias is None else self.tensor(module.bias, rows)
        if cols is not None and not cols:
            constant = self.graph.call_module(self.add_module(name, ConstantChannels(bias, len(rows), self.spatial(node))), (self.input,))
            return constant, constant
        weight = self.tensor(module.weight, rows)
        if cols is None:
            call = self.graph.call_module(self.add_module(name, rebuild(module, share=self.share, weight=weight, bias=bias)), (x,))
            return call, call
        in_channels = self.channels(x.layer)
        block = self.view.layers.nodes[node.args[0].name].block
        chunks = _chunks(list(cols), in_channels) if self.share else [list(cols)]
        result = first = None
        for k, chunk in enumerate(chunks):
            features = [in_channels[p] * block + b for p in chunk for b in range(block)]
            part = rebuild(module, share=self.share, weight=self.tensor(weight, features, dim=1), bias=bias if k == 0 else None)
            call = self.graph.call_module(self.add_module(name, part), (self.read(x.node, chunk, len(in_channels), block, _dims(node.args[0])),))
            first = first or call
            result = call if result is None else self.graph.call_function(torch.add, (result, call))
        return result, first

    def plan(self, node: fx.Node, info: NodeInfo, module: nn.Module, layout, allowed) -> tuple[list[_Run], dict[str, Any]]:
        """The calls a dense op makes: consecutive output groups per call and the input columns each reads.

        ``fuse="never"`` (or one output group): one call per group over exactly its allowed inputs.
        ``"always"``: one call over every group and the span of their inputs. A cost model: the
        partition of the layout into runs (each over the exact union or the span of its groups'
        inputs) with the least predicted time, by dynamic programming; concatenating n pieces
        counts n − 1 calls."""
        mask = node.meta[META_MASK]
        per_channel = module.weight[0].numel() // mask.shape[1] * prod(self.spatial(node))
        model = self.fuse if isinstance(self.fuse, FusionCostModel) else None
        if self.fuse == "auto":
            model = FusionCostModel.calibrate(self.batch, self.channels_last)
        pad = model.padded if model is not None and module.weight.dim() == 4 else (lambda n: n)  # oneDNN's channel blocks
        rows = [len(idx) for _, idx in layout]
        globally_next = [i + 1 < len(layout) and layout[i + 1][1][0] == layout[i][1][-1] + 1 for i in range(len(layout))]

        def run(first: int, stop: int, cols: list[int] | None) -> _Run:
            width = mask.shape[1] if cols is None else len(cols)
            edge = sum(r * (mask.shape[1] if a is None else len(a)) for r, a in zip(rows[first:stop], allowed[first:stop]))
            calls = 1 if cols is None or not self.share else max(len(_chunks(cols, self.in_channels(node))), 1)
            if cols is not None and not self.share and cols and not _is_span(cols):
                calls += 1  # the gather of the input columns
            extra = 0 if first == 0 else 1  # its share of the concatenation
            flops = 2 * sum(rows[first:stop]) * width * per_channel
            padded = 2 * pad(sum(rows[first:stop])) * pad(width) * per_channel
            seconds = 0.0 if model is None else model.seconds(calls + extra, pad(width) * per_channel, padded, self.batch)
            return _Run(first, stop, None if cols is None else tuple(cols), seconds, 2 * edge * per_channel, flops)

        def candidates(first: int, stop: int) -> list[_Run]:
            if allowed[first] is None:
                return [run(first, stop, None)]
            union = sorted({p for a in allowed[first:stop] for p in a})
            spans = [union, list(range(union[0], union[-1] + 1))] if union else [union]
            return [run(first, stop, cols) for cols in spans]

        exact = [candidates(i, i + 1)[0] for i in range(len(layout))]
        if self.fuse == "never" or len(layout) == 1:
            return exact, {}
        whole = min(candidates(0, len(layout)), key=lambda r: r.dense)
        record = {"layer": info.layer, "groups": len(layout), "edge_flops": whole.edge, "dense_flops": whole.dense}

        def contiguous(first: int, stop: int) -> bool:  # rows of one call: one run of the merged weight
            return not self.share or all(globally_next[first : stop - 1])

        if self.fuse == "always":
            if contiguous(0, len(layout)):
                return [whole], {"reason": "fuse='always'"}
            return exact, record | {"declined": True, "reason": "share_weights: the active rows are not contiguous in the merged weight"}
        best: list[tuple[tuple[float, int, int], list[_Run]]] = [((0.0, 0, 0), [])]
        for stop in range(1, len(layout) + 1):
            options = []
            for first in range(stop):
                if not contiguous(first, stop):
                    continue
                for r in candidates(first, stop):
                    (seconds, masked, runs), plan = best[first]
                    options.append(((seconds + r.seconds, masked + r.dense - r.edge, runs - 1), plan + [r]))
            # ties (to the picosecond) go to fewer masked FLOPs, then to more calls: exact unless faster
            best.append(min(options, key=lambda o: (round(o[0][0], 12), o[0][1], o[0][2])))
        runs = best[-1][1]
        reason = (f"cost model at batch {self.batch}: {sum(r.seconds for r in runs) * 1e3:.3f} ms in {len(runs)} calls, "
                  f"{sum(r.seconds for r in exact) * 1e3:.3f} ms exact in {len(exact)}, {whole.seconds * 1e3:.3f} ms as one")
        if all(r.stop - r.first == 1 and r.dense == r.edge for r in runs):
            return runs, record | {"declined": True, "reason": reason}
        return runs, {"reason": reason}

    def in_channels(self, node: fx.Node) -> list[int]:
        return self.channels(self.env[node.args[0].name].layer)

    def grouped_group(self, node: fx.Node, module: nn.Module, x: Any, task_set: TaskSet, idx: list[int], cols: list[int] | None) -> fx.Node:
        """One output group of a merged grouped conv (or of a dense op merged with its cross-origin
        connections absent) over its allowed input positions."""
        if isinstance(module, nn.Linear):
            return self.blocked_linear(node, module, x, task_set, idx, cols)
        bias = None if module.bias is None else self.tensor(module.bias, idx)
        if cols is None:
            in_channels, x_in = list(range(module.in_channels)), x
        else:
            in_channels = self.channels(x.layer)
            if not cols:
                constant = ConstantChannels(bias, len(idx), self.spatial(node))
                return self.graph.call_module(self.add_module(f"{node.target}.{self.label(task_set)}", constant), (self.input,))
            x_in = self.read(x.node, cols, len(in_channels), 1, _dims(node.args[0]))
            in_channels = [in_channels[p] for p in cols]
        return self.grouped_conv(node, module, idx, x_in, in_channels, bias, task_set)

    def grouped_conv(self, node: fx.Node, module: nn.Module, idx: list[int], x: fx.Node, flat: list[int], bias, task_set: TaskSet) -> fx.Node:
        """One output group of a merged grouped conv: each conv group's rows from that group's
        allowed columns ``flat`` (merged indices of ``x``'s channels), conv groups with equal row and
        column counts run as one grouped conv, rows whose conv group has no allowed column are
        their bias; then back in ``idx`` order."""
        out_ids, in_ids = node.meta[META_CONV_GROUPS]
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
        base = f"{node.target}.{self.label(task_set)}"
        pieces, order = [], []
        for conv_groups in buckets.values():
            out_pos = [p for g in conv_groups for p in rows_of[g]]
            in_pos = [q for g in conv_groups for q in cols_of[g]]
            weight = torch.cat([self.tensor(self.tensor(module.weight, [idx[p] for p in rows_of[g]]), [flat[q] for q in cols_of[g]], dim=1) for g in conv_groups])
            conv = rebuild(module, groups=len(conv_groups), weight=weight, bias=None if bias is None else bias[out_pos])
            x_in = x if in_pos == list(range(len(flat))) else self.gather(x, self.add_index(f"{base}.in", in_pos), _dims(node.args[0]))
            pieces.append(self.graph.call_module(self.add_module(base, conv), (x_in,)))
            order += out_pos
        if constant:
            constant_channels = ConstantChannels(None if bias is None else bias[constant], len(constant), self.spatial(node))
            pieces.append(self.graph.call_module(self.add_module(base, constant_channels), (self.input,)))
            order += constant
        return self.in_order(self.cat(pieces), order, base, _dims(node))

    def blocked_linear(self, node: fx.Node, module: nn.Module, x: Any, task_set: TaskSet, idx: list[int], cols: list[int]) -> fx.Node:
        """One output group of a linear op whose connections stay within blocks (``pamfx_conv_groups``):
        one call per block over its rows and their allowed input positions ``cols``, then back in
        ``idx`` order."""
        out_ids, in_ids = node.meta[META_CONV_GROUPS]
        in_channels = self.channels(x.layer)
        rows_of: dict[int, list[int]] = {}  # block -> positions in idx
        for p, r in enumerate(idx):
            rows_of.setdefault(int(out_ids[r]), []).append(p)
        base = f"{node.target}.{self.label(task_set)}"
        pieces, order = [], []
        for g, positions in rows_of.items():
            block_cols = tuple(q for q in cols if int(in_ids[in_channels[q]]) == g)
            pieces.append(self.call(node, module, base, [idx[p] for p in positions], block_cols, x)[0])
            order += positions
        return self.in_order(self.cat(pieces), order, base, _dims(node))

    def in_order(self, result: fx.Node, order: list[int], base: str, dims: int) -> fx.Node:
        """``result``, whose channels are an output group's positions ``order``, back in group order."""
        if order == list(range(len(order))):
            return result
        inverse = sorted(range(len(order)), key=order.__getitem__)
        return self.gather(result, self.add_index(f"{base}.order", inverse), dims)

    def head_chain(self, node: fx.Node, info: NodeInfo) -> None:
        if not self.combo & self.view.tasks.bit(info.task):
            return
        if info.role != Role.HEAD:
            self.env[node.name] = self.copy_plain(node)
            return
        module = self.modules[node.target]
        x: _Layer = self.env[node.args[0].name]
        cols = self.allowed(self.view.tasks.bit(info.task), x.layer) if x.node is not None else []
        rows = list(range(module.weight.shape[0]))
        self.env[node.name] = self.call(node, module, f"{node.target}.{self.label(self.view.tasks.bit(info.task))}", rows, tuple(cols), x)[0]


def _dims(node: fx.Node) -> int:
    """How many dimensions the merged network's value at ``node`` has (its shape propagation)."""
    return len(node.meta["tensor_meta"].shape)


def _is_span(idx: list[int]) -> bool:
    """Whether ``idx`` is a run of consecutive indices (a slice of a tensor, hence a view)."""
    return bool(idx) and list(idx) == list(range(idx[0], idx[0] + len(idx)))


def _chunks(cols: list[int], channels: list[int]) -> list[list[int]]:
    """``cols`` (positions) cut where either the position or its merged channel stops running on."""
    out: list[list[int]] = []
    for p in cols:
        if out and p == out[-1][-1] + 1 and channels[p] == channels[out[-1][-1]] + 1:
            out[-1].append(p)
        else:
            out.append([p])
    return out


def emit(
    merged: fx.GraphModule,
    tasks: Iterable[str] | str | TaskSet,
    *,
    fuse: str | FusionCostModel = "auto",
    batch: int = 1,
    fold_batchnorm: bool | None = None,
    usage: Mapping[TaskSet, float] | None = None,
    channels_last: bool | None = None,
    share_weights: bool = False,
) -> fx.GraphModule:
    """The standalone GraphModule of task combination ``tasks`` (names, one name or a bitmask).

    Its forward returns ``{task: output}`` for the tasks of the combination, equal to the merged
    network's outputs for those tasks; ``print(module.code)`` shows it as Python source. By default
    it is the fast form: BatchNorms folded into the convs before them (when the network is in eval
    mode; ``fold_batchnorm`` forces it on or off), each layer one tensor in the order of
    `group_orders`, and each dense op planned by the calibrated cost model (``fuse="auto"``, at
    ``batch`` samples per forward). ``fuse="never"``: every dense op computes only allowed
    connections (FLOPs = the edge count); ``"always"``: one masked call per dense op with two or
    more active output groups; or a `FusionCostModel` to plan with. ``usage``: the distribution over
    combinations the group order is optimised for (`combination_weights`; default uniform).
    ``channels_last``: run convolutions on channels-last activations (converted once at the input;
    default: for image inputs, unless ``share_weights``), which oneDNN computes about twice as
    fast on a CPU, and max pooling several times as fast.
    """
    view = inference_view(read_multitask(merged), fold_batchnorm)
    return emit_view(view, tasks, share_weights=share_weights, fuse=fuse, batch=batch, orders=group_orders(view, usage),
                     channels_last=channels_last)


def emit_view(
    view: MultitaskView,
    tasks: Iterable[str] | str | TaskSet,
    *,
    share_weights: bool = False,
    fuse: str | FusionCostModel = "auto",
    batch: int = 1,
    orders: dict[str, tuple[TaskSet, ...]] | None = None,
    channels_last: bool | None = None,
) -> fx.GraphModule:
    """`emit` from an IR view already read (`read_multitask`; BatchNorms as they are in it), so a
    caller emitting many combinations reads and checks the IR once; ``orders`` (default
    `group_orders` of the view) likewise. With ``share_weights`` the layout is the network's own
    channel order, and every weight a view of its weights."""
    if not (isinstance(fuse, FusionCostModel) or fuse in FUSE_MODES):
        raise InputError(f"fuse={fuse!r}: expected one of {FUSE_MODES} or a FusionCostModel")
    if not isinstance(batch, int) or batch < 1:
        raise InputError(f"batch={batch!r}: expected a positive batch size")
    if orders is None:
        orders = group_orders(view)
    unordered = [name for name, rec in view.records.items() if not set(rec.task_sets) <= set(orders.get(name, ()))]
    if unordered:
        raise InputError(f"orders: layers {unordered} are missing or lack some of their task sets")
    combo = view.tasks.select(tasks)
    example = example_from_meta(view.gm)
    if channels_last is None:
        channels_last = example.dim() == 4 and not share_weights
    gm = _Emitter(view, combo, share_weights, fuse, batch, orders, bool(channels_last)).run()
    shape_propagate(gm, example, f"emitted module {view.tasks.label(combo)!r}")
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
