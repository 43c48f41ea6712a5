"""Merge pass: K single-task networks and a grouping → one multitask GraphModule.

Implements steps 1–4 of the PAM workflow (Sec. 4.5.1), with residual blocks (Sec. 4.5.3) and
K ≥ 3 tasks (Sec. 4.5.4): every neuron layer is widened to hold all K networks' channels; a
channel of task set τ1 in layer i−1 feeds a channel of task set τ2 in layer i iff τ2 ⊆ τ1
(dense ops, identity shortcuts and heads alike); an allowed connection that existed keeps its
weight, a new one across origins starts at 0, a forbidden one is masked to exactly 0
(``cross_origin`` can keep the new cross-origin ones absent, layer by layer). The
forward returns ``{task: output}``. The grouping and masks are kept in ``node.meta``. Grouped
convs, concatenations, squeeze-excitation gates, shared unknown ops and networks of different
depths (step 3) follow the channel rules of ``docs/op_rules.md``.
"""
from __future__ import annotations

import copy
import operator
from typing import Collection, Mapping

import torch
from torch import fx, nn

from pamfx.analysis.channel_rules import Role
from pamfx.analysis.layer_matching import match_layers, organise_layers
from pamfx.analysis.layer_organisation import NodeInfo, organise_graph
from pamfx.errors import GroupingError, InputError, MismatchError, UnsupportedOpError, check_type
from pamfx.frontend import shape_propagate
from pamfx.ir.diagonal import DiagonalConnection
from pamfx.ir.grouping import Grouping
from pamfx.ir.meta import META_CONV_GROUPS, META_DEPTHWISE, META_HEAD, META_LAYER, META_MASK, META_TASKS
from pamfx.ir.neuron_layer import LayerMap, LayerTaskSets, NeuronLayer
from pamfx.ir.task_set import is_subset, subset_matrix
from pamfx.ir.task_slices import TaskSlices
from pamfx.passes.module_surgery import attr_name, channel_tensors, dense_conv_weight, expand_mask, group_ids, rebuild


def resolve_grouping(grouping: Grouping | str, layers: LayerMap) -> Grouping:
    """Accept a `Grouping` or one of the names ``"origin"`` / ``"shared"``; validate it."""
    if isinstance(grouping, str):
        builders = {"origin": Grouping.origin, "shared": Grouping.shared}
        if grouping not in builders:
            raise GroupingError(f"grouping must be a Grouping, 'origin' or 'shared', got {grouping!r}")
        return builders[grouping](layers)
    if not isinstance(grouping, Grouping):
        raise GroupingError(f"grouping must be a Grouping, 'origin' or 'shared', got {type(grouping).__name__}")
    grouping.validate(layers)
    return grouping


#: ``cross_origin`` values of `merge` besides a collection of layer names.
CROSS_ORIGIN = ("dense", "absent", "absent-conv")


def _check_cross_origin(cross_origin: str | Collection[str], layers: LayerMap) -> str | frozenset[str]:
    if isinstance(cross_origin, str):
        if cross_origin not in CROSS_ORIGIN:
            raise InputError(f"cross_origin must be one of {CROSS_ORIGIN} or a collection of layer names, got {cross_origin!r}")
        return cross_origin
    if not isinstance(cross_origin, Collection):
        raise InputError(f"cross_origin must be one of {CROSS_ORIGIN} or a collection of layer names, "
                         f"got {type(cross_origin).__name__}")
    names = frozenset(cross_origin)
    unknown = sorted(names - {l.name for l in layers})
    if unknown:
        raise InputError(f"cross_origin names layers the networks do not have: {unknown}; layers: {[l.name for l in layers]}")
    return names


class _Merger:
    def __init__(self, layers: LayerMap, grouping: Grouping, cross_origin: str | frozenset[str] = "dense"):
        self.layers = layers
        self.cross_origin = cross_origin
        self.tasks = layers.tasks
        self.first = self.tasks.names[0]
        self.organised = {t: organise_graph(layers.graphs[t], t, t, layers.unknown_ops) for t in self.tasks}
        self.infos = {t: self.organised[t].nodes for t in self.tasks}
        self.nodes = {t: list(layers.graphs[t].graph.nodes) for t in self.tasks}
        shared = {l.name: (self.tasks.all,) * l.width for l in layers if l.name in layers.shared_layers}  # unknown_ops="share"
        self.records = {l.name: LayerTaskSets(l.name, shared.get(l.name) or grouping.masks(l.name), l.origins) for l in layers}
        self.by_name: dict[str, NeuronLayer] = {l.name: l for l in layers}
        self.modules: dict[str, nn.Module] = {}
        self.graph = fx.Graph()
        self.env: dict[str, fx.Node] = {}
        self.head_env: dict[str, dict[str, fx.Node]] = {t: {} for t in self.tasks}

    # -- helpers --------------------------------------------------------------------------------
    def module(self, task: str, position: int) -> nn.Module:
        return self.layers.graphs[task].get_submodule(self.nodes[task][position].target)

    def channels(self, layer: str, task: str, block: int = 1) -> slice:
        l = self.by_name[layer]
        start = l.offset(task)
        return slice(start * block, (start + l.widths()[task]) * block)

    def copy_node(self, tnode: fx.Node, arg_map, target=None, name: str | None = None, args=None) -> fx.Node:
        new_args = fx.map_arg(tnode.args, arg_map) if args is None else args
        new = self.graph.create_node(
            tnode.op, tnode.target if target is None else target, new_args, fx.map_arg(tnode.kwargs, arg_map),
            name=name or tnode.name,
        )
        new.meta = {k: v for k, v in tnode.meta.items() if k != "tensor_meta"}
        return new

    def trunk(self, n: fx.Node) -> fx.Node:
        return self.env[n.name]

    # -- the pass -----------------------------------------------------------------------------
    def build(self) -> fx.GraphModule:
        taken_over = set(self.layers.remainders.get(self.first, ()))
        for i, tnode in enumerate(self.nodes[self.first]):
            info = self.infos[self.first].get(tnode.name)
            if tnode.op == "output":
                for t in self.layers.remainders:
                    self.take_over(t)
                self.output(tnode)
            elif tnode.name in taken_over:
                continue
            elif info is not None and info.task is not None:
                self.head_chain(i, tnode, info)
            else:
                self.env[tnode.name] = self.trunk_node(i, tnode, info)
                if info is not None and info.layer is not None:
                    self.env[tnode.name].meta[META_LAYER] = self.records[info.layer]
        gm = fx.GraphModule(self.modules, self.graph, class_name="MultitaskNetwork")
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        return gm

    def trunk_node(self, i: int, tnode: fx.Node, info: NodeInfo | None) -> fx.Node:
        if tnode.op == "placeholder" or info is None or info.role == Role.META:
            return self.copy_node(tnode, self.trunk)
        if info.role == Role.DENSE:
            return self.dense(i, tnode, info)
        if info.role == Role.FLATTEN:
            return self.graph.call_function(torch.flatten, (self.trunk(tnode.args[0]), 1))
        if info.role == Role.RESIDUAL and any(n == tnode.name for n, _ in self.structure(info.layer).shortcuts):
            return self.residual_add(tnode, info)
        if info.role == Role.CONCAT:
            return self.concat(tnode, info)
        if info.role == Role.OPAQUE:
            return self.opaque(i, tnode, info)
        if tnode.op == "call_module":
            return self.channelwise_module(i, tnode, info)
        return self.copy_node(tnode, self.trunk)

    def structure(self, layer: str):
        return self.by_name[layer].structures[self.first]

    def dense(self, i: int, tnode: fx.Node, info: NodeInfo) -> fx.Node:
        """A conv / linear producer of layer ``info.layer`` reading ``info.source`` (or X).

        A grouped conv becomes a dense one whose connection mask also holds its group structure:
        merged output channel o of conv group g reads input channels of conv group g only (of any
        task, under the connection rule); the group of every row and column is kept in
        ``node.meta["pamfx_conv_groups"]`` for emit.
        """
        out_rec = self.records[info.layer]
        mods = {t: self.module(t, i) for t in self.tasks}
        ref = mods[self.first]
        weights = {t: dense_conv_weight(m) if isinstance(m, nn.Conv2d) else m.weight.detach() for t, m in mods.items()}
        in_width = weights[self.first].shape[1] if info.source is None else self.records[info.source].width
        in_block = self.infos[self.first][tnode.args[0].name].block
        shape = (out_rec.width, in_width * in_block) + tuple(ref.weight.shape[2:])
        weight = ref.weight.new_zeros(shape)
        bias = None if ref.bias is None else ref.bias.new_zeros(out_rec.width)
        for t, m in mods.items():
            rows = self.channels(info.layer, t)
            cols = slice(None) if info.source is None else self.channels(info.source, t, in_block)
            weight[rows, cols] = weights[t]
            if bias is not None:
                bias[rows] = m.bias.detach()
        if info.source is None:
            mask = torch.ones(out_rec.width, in_width, dtype=torch.bool)
        else:
            mask = subset_matrix(out_rec.task_sets, self.records[info.source].task_sets)
        conv_groups = getattr(ref, "groups", 1)
        absent = self.absent_cross_origin(info, ref)
        blocks = conv_groups > 1 or absent
        if blocks:
            if conv_groups > 1:
                out_ids = torch.cat([group_ids(m.out_channels, conv_groups) for m in mods.values()])
                in_ids = group_ids(in_width, conv_groups) if info.source is None else torch.cat(
                    [group_ids(m.in_channels, conv_groups) for m in mods.values()]
                )
            else:
                out_ids, in_ids = torch.zeros(out_rec.width, dtype=torch.long), torch.zeros(in_width, dtype=torch.long)
            if absent:  # connection group = (origin network, conv group)
                out_ids = out_ids + conv_groups * self.origin_index(info.layer)
                in_ids = in_ids + conv_groups * self.origin_index(info.source)
            mask &= out_ids[:, None] == in_ids[None, :]
        weight = weight * expand_mask(mask, weight, in_block)
        self.modules[tnode.target] = rebuild(ref, groups=1 if conv_groups > 1 else None, weight=weight, bias=bias)
        node = self.copy_node(tnode, self.trunk)
        node.meta[META_MASK] = mask
        if blocks:
            node.meta[META_CONV_GROUPS] = (out_ids, in_ids)
        return node

    def absent_cross_origin(self, info: NodeInfo, module: nn.Module) -> bool:
        """Whether the dense op writing ``info.layer`` keeps its cross-origin connections absent."""
        if info.source is None or self.cross_origin == "dense":
            return False
        if self.cross_origin == "absent-conv":
            return isinstance(module, nn.Conv2d)
        return self.cross_origin == "absent" or info.layer in self.cross_origin

    def origin_index(self, layer: str) -> torch.Tensor:
        """The origin network of every channel of ``layer``, as its position in the task space."""
        return torch.tensor([self.tasks.names.index(t) for t, _ in self.records[layer].origins])

    def channelwise_module(self, i: int, tnode: fx.Node, info: NodeInfo) -> fx.Node:
        """BatchNorm / depthwise conv: concatenate the K networks' per-channel tensors."""
        mods = [self.module(t, i) for t in self.tasks]
        tensors = channel_tensors(mods[0])
        if info.layer is None and tensors:
            raise UnsupportedOpError(
                f"{self.first}: {tnode.name!r} has parameters but acts on the shared input; it cannot be merged"
            )
        merged = {name: torch.cat([getattr(m, name).detach() for m in mods]) for name in tensors}
        self.modules[tnode.target] = rebuild(mods[0], **merged)
        node = self.copy_node(tnode, self.trunk)
        if isinstance(mods[0], nn.Conv2d):
            node.meta[META_DEPTHWISE] = True  # stays depthwise even when pruned to one channel
        return node

    def residual_add(self, tnode: fx.Node, info: NodeInfo) -> fx.Node:
        """A residual sum with an identity shortcut: the shortcut operand (positional or keyword)
        goes through a `DiagonalConnection`; the call itself (``alpha=``, ``sub``) is kept."""
        src = dict(self.structure(info.layer).shortcuts)[tnode.name]
        dst_rec, src_rec = self.records[info.layer], self.records[src]
        if dst_rec.origins != src_rec.origins:
            raise MismatchError(f"identity shortcut {tnode.name!r}: layers {src!r} and {info.layer!r} differ in width")
        allowed = [c for c in range(dst_rec.width) if is_subset(dst_rec.task_sets[c], src_rec.task_sets[c])]
        index = torch.tensor(allowed, dtype=torch.long)
        target = f"pamfx_shortcuts.{attr_name(tnode.name)}"
        self.modules[target] = DiagonalConnection(index, index, dst_rec.width)

        def arg_map(n: fx.Node) -> fx.Node:  # the operand from the source layer goes through the shortcut
            n_info = self.infos[self.first].get(n.name)
            if n_info is None or n_info.layer != src:
                return self.trunk(n)
            shortcut = self.graph.call_module(target, (self.trunk(n),))
            shortcut.meta[META_LAYER] = dst_rec
            return shortcut

        return self.copy_node(tnode, arg_map)

    def concat(self, tnode: fx.Node, info: NodeInfo) -> fx.Node:
        """``torch.cat(operands, 1)`` becomes the sum of one `DiagonalConnection` per operand: the
        operand's channel j of task t feeds the layer's channel (t, offset + j) where allowed."""
        layer, dst_rec = self.by_name[info.layer], self.records[info.layer]
        sources = [src for n, src in self.structure(info.layer).shortcuts if n == tnode.name]
        operands = tnode.args[0] if tnode.args else tnode.kwargs["tensors"]
        offsets = {t: layer.offset(t) for t in self.tasks}
        total = None
        for k, (operand, src) in enumerate(zip(operands, sources)):
            src_layer, src_rec = self.by_name[src], self.records[src]
            pairs = []
            for t in self.tasks:
                for j in range(src_layer.widths()[t]):
                    s, d = src_layer.offset(t) + j, offsets[t] + j
                    if is_subset(dst_rec.task_sets[d], src_rec.task_sets[s]):
                        pairs.append((s, d))
                offsets[t] += src_layer.widths()[t]
            target = f"pamfx_shortcuts.{attr_name(tnode.name)}_{k}"
            self.modules[target] = DiagonalConnection(
                torch.tensor([s for s, _ in pairs], dtype=torch.long), torch.tensor([d for _, d in pairs], dtype=torch.long), dst_rec.width
            )
            part = self.graph.call_module(target, (self.trunk(operand),))
            total = part if total is None else self.graph.call_function(operator.add, (total, part))
            part.meta[META_LAYER] = total.meta[META_LAYER] = dst_rec
        return total

    def opaque(self, i: int, tnode: fx.Node, info: NodeInfo) -> fx.Node:
        """An op without a channel rule: each task's own op on its own channels, as `TaskSlices`."""
        ops = []
        for t in self.tasks:
            node = self.nodes[t][i]
            graph = fx.Graph()
            x = graph.placeholder("x")
            graph.output(graph.node_copy(node, lambda _: x))
            ops.append(fx.GraphModule(self.layers.graphs[t], graph, class_name=f"{attr_name(t)}_op"))
        widths = None if info.source is None else list(self.by_name[info.source].widths().values())
        target = f"pamfx_shared.{attr_name(tnode.name)}"
        self.modules[target] = TaskSlices(copy.deepcopy(ops), widths)
        return self.graph.call_module(target, (self.trunk(tnode.args[0] if tnode.args else next(iter(tnode.all_input_nodes))),))

    def head_chain(self, i: int, tnode: fx.Node, info: NodeInfo) -> None:
        """The head and the ops after it, once per task, each from that task's own network."""
        for t in self.tasks:
            env = self.head_env[t]

            def arg_map(n: fx.Node, env=env) -> fx.Node:
                return env[n.name] if n.name in env else self.trunk(n)

            name = f"{tnode.name}_{attr_name(t)}"
            if tnode.op != "call_module":
                env[tnode.name] = self.copy_node(tnode, arg_map, name=name)
                continue
            target = f"{tnode.target}_{attr_name(t)}"
            module = self.module(t, i)
            if info.role == Role.HEAD:
                module = self.head_module(module, t, info, self.infos[self.first][tnode.args[0].name].block)
            elif channel_tensors(module):
                raise UnsupportedOpError(f"{t}: parametric op {tnode.name!r} after the head is not supported")
            else:
                module = rebuild(module)
            self.modules[target] = module
            env[tnode.name] = self.copy_node(tnode, arg_map, target=target, name=name)
            if info.role == Role.HEAD:
                env[tnode.name].meta[META_HEAD] = t
                rows = module.weight.shape[0]
                env[tnode.name].meta[META_MASK] = self.head_mask(t, info.source)[None, :].repeat(rows, 1)

    def take_over(self, task: str) -> None:
        """Sec. 4.5.1 step 3, networks of different depths: ``task``'s ops after the prefix all
        networks share, taken over unmerged — its own layers (every channel of task set {task}, the
        first one reading the merged layer's channels that serve the task) and its head."""
        graph, infos, bit = self.layers.graphs[task], self.infos[task], self.tasks.bit(task)
        position = {n.name: i for i, n in enumerate(self.nodes[task])}
        env = self.head_env[task]
        records = {  # the layers of its own
            l.name: LayerTaskSets(f"{l.name}[{task}]", (bit,) * l.width, tuple((task, j) for j in range(l.width)))
            for l in self.organised[task].layers[len(self.by_name):]
        }

        def arg_map(n: fx.Node) -> fx.Node:
            return env[n.name] if n.name in env else self.trunk(self.nodes[self.first][position[n.name]])

        for tnode in self.nodes[task]:
            if tnode.name not in self.layers.remainders[task]:
                continue
            info = infos.get(tnode.name)
            name = f"{tnode.name}_{attr_name(task)}"
            if tnode.op != "call_module":
                env[tnode.name] = self.copy_node(tnode, arg_map, name=name)
            else:
                module = copy.deepcopy(graph.get_submodule(tnode.target))
                dense = info is not None and info.role in (Role.DENSE, Role.HEAD)
                if dense and info.source in self.by_name:  # reads a merged layer: its own channels, where they serve it
                    module = self.head_module(module, task, info, infos[tnode.args[0].name].block)
                target = f"{tnode.target}_{attr_name(task)}"
                self.modules[target] = module
                env[tnode.name] = self.copy_node(tnode, arg_map, target=target, name=name)
                if dense:
                    source = self.records.get(info.source) or records.get(info.source)
                    serves = source.serves(bit) if source is not None else torch.ones(module.weight.shape[1], dtype=torch.bool)
                    env[tnode.name].meta[META_MASK] = serves[None, :].repeat(module.weight.shape[0], 1)
                if info is not None and info.role == Role.HEAD:
                    env[tnode.name].meta[META_HEAD] = task
            if info is not None and info.layer in records:
                env[tnode.name].meta[META_LAYER] = records[info.layer]

    def head_mask(self, task: str, source: str) -> torch.Tensor:
        return self.records[source].serves(self.tasks.bit(task))

    def head_module(self, module: nn.Module, task: str, info: NodeInfo, block: int) -> nn.Module:
        """Task ``task``'s head reading the merged layer: its own channels keep their weights."""
        width = self.records[info.source].width
        weight = module.weight.new_zeros((module.weight.shape[0], width * block) + tuple(module.weight.shape[2:]))
        weight[:, self.channels(info.source, task, block)] = module.weight.detach()
        mask = self.head_mask(task, info.source)[None, :].expand(weight.shape[0], -1)
        weight = weight * expand_mask(mask, weight, block)
        return rebuild(module, weight=weight, bias=None if module.bias is None else module.bias.detach())

    def output(self, tnode: fx.Node) -> None:
        rets = {t: (self.nodes[t][-1] if t in self.layers.remainders else tnode).args[0] for t in self.tasks}
        out = self.graph.output({t: self.head_env[t][ret.name] for t, ret in rets.items()})
        out.meta[META_TASKS] = self.tasks


def _named_tensors(model: object) -> dict[str, torch.Tensor]:
    """A model's parameters and buffers by qualified name (an ExportedProgram's state dict)."""
    state = model.state_dict() if isinstance(model, nn.Module) else getattr(model, "state_dict", {})
    return dict(state)


def check_layers_belong(layers: LayerMap, models: Mapping[str, nn.Module], example_input: torch.Tensor) -> None:
    """Raise `InputError` unless ``layers`` was organised from ``models`` as they are now.

    The layer map holds pamfx's private copies of the networks; they must still equal the given
    ones: same tasks, same module types and every parameter and buffer equal, and an example
    input of the same per-sample shape and dtype.
    """
    check_type(layers, LayerMap, "layers (the result of pamfx.organise_layers)")
    if list(layers.tasks) != list(models):
        raise InputError(f"layers are over tasks {list(layers.tasks)}, models over {list(models)}")
    ref = layers.example_input
    if tuple(ref.shape[1:]) != tuple(example_input.shape[1:]) or ref.dtype != example_input.dtype:
        raise InputError(
            f"layers were organised on inputs of shape {tuple(ref.shape[1:])} ({ref.dtype}) per sample, "
            f"example_input has {tuple(example_input.shape[1:])} ({example_input.dtype})"
        )
    for task, model in models.items():
        graph = layers.graphs[task]
        given = _named_tensors(model)
        for name, tensor in graph.state_dict().items():
            other = given.get(name)
            if other is None or other.shape != tensor.shape or not torch.equal(other.detach(), tensor):
                raise InputError(
                    f"layers were not organised from model {task!r} as it is now (its {name!r} differs or is "
                    f"missing); call pamfx.organise_layers on these models"
                )
        if isinstance(model, nn.Module) and not isinstance(model, fx.GraphModule):
            for node in graph.graph.nodes:
                if node.op == "call_module" and not _same_type(model, node.target, graph):
                    raise InputError(
                        f"layers were not organised from model {task!r}: its submodule {node.target!r} "
                        f"is not a {type(graph.get_submodule(node.target)).__name__}"
                    )


def _same_type(model: nn.Module, target: str, graph: fx.GraphModule) -> bool:
    try:
        return type(model.get_submodule(target)) is type(graph.get_submodule(target))
    except AttributeError:
        return False


def merge(
    models: Mapping[str, nn.Module],
    example_input: torch.Tensor,
    grouping: Grouping | str = "origin",
    *,
    layers: LayerMap | None = None,
    unknown_ops: str = "refuse",
    cross_origin: str | Collection[str] = "dense",
) -> fx.GraphModule:
    """Merge K single-task networks into one multitask GraphModule under ``grouping``.

    ``grouping`` is a `Grouping` over the layers of ``organise_layers(models, example_input)``
    (pass that map as ``layers`` to skip re-organising; it is checked to come from ``models``)
    or ``"origin"`` / ``"shared"``. ``unknown_ops`` (when ``layers`` is not given): see
    `organise_layers`. ``cross_origin``: ``"dense"`` connects the channels of a layer's
    different origin networks wherever the task sets allow (Sec. 4.5.1 step 4; new connections
    start at 0); ``"absent"`` keeps every hidden layer's cross-origin connections absent (a
    channel reads channels of its own origin network only, whatever their task sets),
    ``"absent-conv"`` only those of layers written by a conv, a collection of layer names only
    those of the named layers. Absent connections are masked like forbidden ones, so `cost`,
    `emit` and the passes skip them exactly. The result shares no module, parameter or buffer
    with ``models``; its modules keep the training flags of the modules they were made from.
    """
    check_type(models, Mapping, "models ({task_name: model})")
    check_type(example_input, torch.Tensor, "example_input")
    if layers is None:
        layers = organise_layers(models, example_input, unknown_ops=unknown_ops)
    else:
        check_layers_belong(layers, models, example_input)
    grouping = resolve_grouping(grouping, layers)
    return _build(layers, grouping, example_input, _check_cross_origin(cross_origin, layers))


def _build(layers: LayerMap, grouping: Grouping, example_input: torch.Tensor,
           cross_origin: str | frozenset[str] = "dense") -> fx.GraphModule:
    gm = _Merger(layers, grouping, cross_origin).build()
    shape_propagate(gm, example_input, "merged network")
    gm.training = layers.graphs[layers.tasks.names[0]].training
    return gm


def as_multitask(model: nn.Module, example_input: torch.Tensor, task: str) -> fx.GraphModule:
    """One single-task network in the merged-network form (K = 1, dict output).

    Baseline 1 prunes each network separately with the same passes as the merged network.
    """
    layers = match_layers({task: model}, example_input)
    return _build(layers, Grouping.origin(layers), example_input)
