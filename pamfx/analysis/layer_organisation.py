"""Layer organisation: Algorithm 3 generalised to fx graphs.

Every tensor in a traced network lies in a *channel space*: the input X, a neuron layer, or a
task head's output. Walking the graph in topological order, each op's channel rule
(`pamfx.analysis.channel_rules`) says whether it opens a new space (dense ops), stays in its
input's space (channel-wise ops) or joins spaces (a residual sum makes the neuron layer of the
block *after the addition*, Sec. 4.5.3: an operand used only by the addition — the last conv of
the block, a downsample conv — joins that layer as a producer, an operand read elsewhere too —
the block input — becomes an identity shortcut, a diagonal connection from its own layer). The
spaces that residual sums join are the connected components of a union-find
(`networkx.utils.UnionFind`). An op without a rule raises `UnsupportedOpError` naming the node,
its submodule and the cause.

The same analysis reads a merged multitask GraphModule (dict output, one head per task, identity
shortcuts replaced by `DiagonalConnection`), so passes and codegen recover the layer structure
from the graph itself rather than from a side table. Matching the K networks' layers is
`pamfx.analysis.layer_matching`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from networkx.utils import UnionFind
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from pamfx.analysis.channel_rules import OpCall, Role, describe, rule_for, target_name
from pamfx.errors import InputError, UnsupportedOpError
from pamfx.ir.diagonal import DiagonalConnection
from pamfx.ir.meta import META_LAYER
from pamfx.ir.neuron_layer import Consumer, LayerStructure

@dataclass(frozen=True)
class NodeInfo:
    """What the layer organisation learnt about one node.

    role: what the node is to the layer structure (`Role`);
    layer: the neuron layer its value lies in (None for the input X, head outputs and non-tensors);
    source: for dense ops, heads and shortcuts, the layer they read (None: the input X);
    block: input features per channel of the value (H·W after flatten, else 1);
    task: for heads and the ops after them, the task whose output they make.
    """

    role: Role
    layer: str | None = None
    source: str | None = None
    block: int = 1
    task: str | None = None


@dataclass
class GraphLayers:
    """The neuron layers of one GraphModule, in order, and the role of every node."""

    layers: list[LayerStructure]
    nodes: dict[str, NodeInfo]
    heads: dict[str, str]

    def layer(self, name: str) -> LayerStructure:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise InputError(f"no neuron layer named {name!r}")


class Submodules:
    """``gm``'s submodules by qualified name; unlike ``dict(named_modules())`` it finds a module
    registered under several names (a ReLU reused by several calls) under each of them."""

    def __init__(self, gm: nn.Module):
        self.gm = gm

    def __getitem__(self, target: str) -> nn.Module:
        return self.gm.get_submodule(target)


class _Space:
    """A channel space while organising: its width and the nodes whose values lie in it."""

    def __init__(self, sid: int, width: int, is_input: bool, origin_node: str):
        self.sid = sid
        self.width = width
        self.is_input = is_input
        self.origin_node = origin_node
        self.producers: list[str] = []
        self.channelwise: list[str] = []
        self.consumers: list[Consumer] = []
        self.shortcuts: list[tuple[str, int]] = []
        self.nodes: list[str] = []

    def absorb(self, other: "_Space") -> None:
        self.producers += other.producers
        self.channelwise += other.channelwise
        self.consumers += other.consumers
        self.shortcuts += other.shortcuts
        self.nodes += other.nodes


UNKNOWN_OPS = ("refuse", "share")


def is_tensor(node: Any) -> bool:
    return isinstance(node, fx.Node) and isinstance(node.meta.get("tensor_meta"), TensorMetadata)


def shape_of(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["tensor_meta"].shape)


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


class ChannelSpaces:
    """One pass over a graph in topological order: the channel spaces and the nodes in each.

    The rules of `pamfx.analysis.channel_rules` act on it through `OpCall`'s verbs.
    """

    def __init__(self, gm: fx.GraphModule, model_name: str, task_name: str | None, unknown_ops: str = "refuse"):
        if unknown_ops not in UNKNOWN_OPS:
            raise InputError(f"unknown_ops={unknown_ops!r}: expected one of {UNKNOWN_OPS}")
        self.unknown_ops = unknown_ops
        self.gm = gm
        self.model_name = model_name
        self.task_name = task_name
        self.modules = Submodules(gm)
        self.spaces: dict[int, _Space] = {}  # root id of each component -> its space
        self.components = UnionFind()
        self.value: dict[str, tuple[int, int] | None] = {}  # node -> (space id, block)
        self.pending: dict[str, int] = {}  # DiagonalConnection node -> source space id
        self.roles: dict[str, Role] = {}
        self.input_sid: int | None = None
        self.order: list[str] = [n.name for n in gm.graph.nodes]
        self.by_name: dict[str, fx.Node] = {n.name: n for n in gm.graph.nodes}
        self.source_of: dict[str, int] = {}
        self.output: fx.Node | None = None

    # -- channel spaces -------------------------------------------------------------------------
    def find(self, sid: int) -> int:
        return self.components[sid]

    def new_space(self, width: int, origin: str, is_input: bool = False) -> _Space:
        sid = len(self.components.parents)
        self.components[sid]  # noqa: B018 - registers sid as its own component
        self.spaces[sid] = _Space(sid, width, is_input, origin)
        return self.spaces[sid]

    def join(self, into: _Space, other: _Space) -> _Space:
        """Unite two spaces' components; the result keeps ``into``'s width and origin."""
        into.absorb(other)
        del self.spaces[into.sid], self.spaces[other.sid]
        self.components.union(into.sid, other.sid)
        into.sid = self.find(into.sid)
        self.spaces[into.sid] = into
        return into

    def space_id(self, node: fx.Node) -> int:
        return self.find(self.value[node.name][0])

    def space_of(self, node: fx.Node) -> _Space:
        return self.spaces[self.space_id(node)]

    def enter(self, space: _Space, node: fx.Node, role: Role, block: int = 1) -> None:
        space.nodes.append(node.name)
        if role is Role.DENSE:
            space.producers.append(node.name)
        else:
            space.channelwise.append(node.name)
        self.roles[node.name] = role
        self.value[node.name] = (space.sid, block)

    def unsupported(self, node: fx.Node, why: str) -> UnsupportedOpError:
        return UnsupportedOpError(f"{self.model_name}: {describe(node)}: {why}")

    # -- the walk -------------------------------------------------------------------------------
    def tensor_args(self, node: fx.Node) -> list[fx.Node]:
        flat, _ = torch.utils._pytree.tree_flatten((node.args, node.kwargs))
        return [a for a in flat if isinstance(a, fx.Node) and is_tensor(a)]

    def run(self) -> GraphLayers:
        self.check_reuse()
        for node in self.gm.graph.nodes:
            self.visit(node)
        return self.finish()

    def check_reuse(self) -> None:
        """A module with parameters or buffers called more than once is refused: its calls would
        lie in different neuron layers, each needing its own connection mask and widths."""
        calls: dict[int, list[fx.Node]] = {}
        for node in self.gm.graph.nodes:
            if node.op == "call_module" and _has_state(self.modules[node.target]):
                calls.setdefault(id(self.modules[node.target]), []).append(node)
        for nodes in calls.values():
            if len(nodes) > 1:
                raise self.unsupported(
                    nodes[1],
                    f"module {nodes[0].target!r} ({type(self.modules[nodes[0].target]).__name__}) with weights is "
                    f"called by {len(nodes)} nodes {[n.name for n in nodes]}; give each call its own module",
                )

    def visit(self, node: fx.Node) -> None:
        if node.op == "output":
            self.output = node
            return
        if node.op == "placeholder":
            if not is_tensor(node):
                raise self.unsupported(node, "only tensor inputs are supported")
            if self.input_sid is not None:
                raise self.unsupported(node, "models with more than one input are not supported")
            space = self.new_space(shape_of(node)[1] if len(shape_of(node)) > 1 else 1, node.name, is_input=True)
            self.input_sid = space.sid
            self.value[node.name] = (space.sid, 1)
            self.roles[node.name] = Role.INPUT
            return
        if not is_tensor(node):
            self.value[node.name] = None
            self.roles[node.name] = Role.META
            return
        if node.op == "get_attr":
            raise self.unsupported(node, "tensors read from attributes outside a module call are not supported")
        inputs = self.tensor_args(node)
        if not inputs:
            raise self.unsupported(node, "creates a tensor that does not depend on the input")
        if node.op not in ("call_module", "call_function", "call_method"):
            raise self.unsupported(node, f"op kind {node.op!r} is not supported")
        module = self.modules[node.target] if node.op == "call_module" else None
        rule = rule_for(node, module)
        if rule is None and self.unknown_ops == "share":
            rule = OpCall.opaque
        if rule is None:
            what = f"module type {type(module).__name__}" if module is not None else "this function"
            raise self.unsupported(
                node, f"{what} has no channel rule (pamfx never guesses; see pamfx.register_channel_rule)"
            )
        rule(OpCall(self, node, module, inputs))
        if node.name not in self.value and node.name not in self.pending:
            raise self.unsupported(node, "its channel rule returned without calling a verb (dense, channelwise, ...)")

    # -- verbs (called through OpCall) ------------------------------------------------------------
    def dense(self, node: fx.Node, x: fx.Node, width: int, conv: bool) -> None:
        sid, block = self.value[x.name]
        src = self.spaces[self.find(sid)]
        if conv and block != 1:
            raise self.unsupported(node, "a conv reading a flattened tensor is not supported")
        if not conv and block == 1 and len(shape_of(x)) != 2:
            raise self.unsupported(node, "a Linear must read a [N, features] tensor (flatten first)")
        if x.name in self.pending:
            raise self.unsupported(node, "a shortcut must feed a residual add")
        if not src.is_input:
            src.consumers.append(Consumer(node.name, block))
        self.enter(self.new_space(width, node.name), node, Role.DENSE)
        self.source_of[node.name] = src.sid

    def channelwise(self, node: fx.Node, x: fx.Node, spatial: bool = False) -> None:
        if x.name in self.pending:
            raise self.unsupported(node, "a diagonal connection must feed a residual add directly")
        sid, block = self.value[x.name]
        if spatial and block != 1:
            raise self.unsupported(node, "pooling a flattened tensor is not supported")
        in_shape, out_shape = shape_of(x), shape_of(node)
        if block != 1 and in_shape != out_shape:
            raise self.unsupported(node, f"changes a flattened shape {in_shape} -> {out_shape}")
        if len(out_shape) < 2 or out_shape[:2] != in_shape[:2]:
            raise self.unsupported(
                node, f"changes the batch or channel dimension ({in_shape} -> {out_shape}); not channel-wise"
            )
        self.enter(self.spaces[self.find(sid)], node, Role.CHANNELWISE, block)

    def mean(self, node: fx.Node, x: fx.Node, dims: Any) -> None:
        ndim = len(shape_of(x))
        dims = (dims,) if isinstance(dims, int) else dims
        if dims is None or any((d % ndim) < 2 for d in dims):
            raise self.unsupported(node, "only a mean over spatial dimensions (dim >= 2) is channel-wise")
        sid, block = self.value[x.name]
        if block != 1:
            raise self.unsupported(node, "a mean over a flattened tensor is not supported")
        self.enter(self.spaces[self.find(sid)], node, Role.CHANNELWISE)

    def flatten(self, node: fx.Node, x: fx.Node) -> None:
        in_shape, out_shape = shape_of(x), shape_of(node)
        sid, block = self.value[x.name]
        if len(out_shape) != 2 or out_shape[0] != in_shape[0]:
            raise self.unsupported(node, f"reshape {in_shape} -> {out_shape} is not a flatten to [N, features]")
        if block == 1 and len(in_shape) > 2:
            for d in in_shape[2:]:
                block *= d
        space = self.spaces[self.find(sid)]
        if space.is_input:
            raise self.unsupported(node, "flattening the input itself is not supported")
        self.enter(space, node, Role.FLATTEN, block)

    def diagonal(self, node: fx.Node, x: fx.Node) -> None:
        sid, block = self.value[x.name]
        if block != 1:
            raise self.unsupported(node, "a diagonal connection from a flattened tensor is not supported")
        self.pending[node.name] = self.find(sid)
        self.value[node.name] = (sid, 1)

    def private(self, space: _Space, add: fx.Node) -> bool:
        """True when the space's values are read only inside the space and by ``add``."""
        members = set(space.nodes)
        for name in space.nodes:
            for user in self.by_name[name].users:
                if user is add or user.name in members or not is_tensor(user):
                    continue
                return False
        return True

    def residual(self, node: fx.Node, a: fx.Node, b: fx.Node) -> None:
        if self.value[a.name][1] != 1 or self.value[b.name][1] != 1:
            raise self.unsupported(node, "a residual add of flattened tensors is not supported")
        if shape_of(a) != shape_of(b):
            raise self.unsupported(node, f"adds tensors of different shapes {shape_of(a)} and {shape_of(b)}")
        pend = [x for x in (a, b) if x.name in self.pending]
        plain = [x for x in (a, b) if x.name not in self.pending]
        plain_spaces = [self.space_of(x) for x in plain]
        if any(s.is_input for s in plain_spaces) or any(self.spaces[self.pending[p.name]].is_input for p in pend):
            raise self.unsupported(node, "a residual add that reads the model input directly is not supported")
        layer = self.new_space(shape_of(node)[1], node.name)
        for space in plain_spaces:
            if self.private(space, node):
                layer = self.join(layer, space)
            else:
                layer.shortcuts.append((node.name, space.sid))
        for p in pend:
            layer.shortcuts.append((p.name, self.pending.pop(p.name)))
        self.enter(layer, node, Role.RESIDUAL)

    def product(self, node: fx.Node, a: fx.Node, b: fx.Node) -> None:
        """``a * b`` of different spaces: every operand's space computed only for this product
        (a gate) joins the one that is read elsewhere too (or a new layer if none is)."""
        if a.name in self.pending or b.name in self.pending:
            raise self.unsupported(node, "a diagonal connection must feed a residual add directly")
        if self.value[a.name][1] != 1 or self.value[b.name][1] != 1:
            raise self.unsupported(node, "a product of flattened tensors of different neuron layers is not supported")
        spaces = [self.space_of(a), self.space_of(b)]
        if any(s.is_input for s in spaces):
            raise self.unsupported(node, "a product with the model input itself is not supported")
        if spaces[0].width != spaces[1].width or shape_of(node)[1] != spaces[0].width:
            raise self.unsupported(
                node, f"multiplies layers of {spaces[0].width} and {spaces[1].width} channels (not channel to channel)"
            )
        shared = [s for s in spaces if not self.private(s, node)]
        if len(shared) > 1:
            raise self.unsupported(
                node, "multiplies two neuron layers that are both read elsewhere; only a gate computed for this "
                "product alone (squeeze-excitation) can be merged exactly"
            )
        layer = shared[0] if shared else self.new_space(shape_of(node)[1], node.name)
        for space in spaces:
            if space is not layer:
                layer = self.join(layer, space)
        self.enter(layer, node, Role.CHANNELWISE)

    def opaque(self, node: fx.Node, x: fx.Node) -> None:
        """An op without a rule: a new layer reading every channel of ``x``'s space (or of X)."""
        if x.name in self.pending:
            raise self.unsupported(node, "a diagonal connection must feed a residual add directly")
        sid, block = self.value[x.name]
        if block != 1 or len(shape_of(node)) < 2 or shape_of(node)[0] != shape_of(x)[0]:
            raise self.unsupported(node, "an op without a channel rule must map [N, C, ...] to [N, C', ...] to be shared")
        if any(isinstance(a, fx.Node) and a is not x for a in node.all_input_nodes):
            raise self.unsupported(node, "an op without a channel rule may read only one tensor to be shared")
        src = self.spaces[self.find(sid)]
        if not src.is_input:
            src.consumers.append(Consumer(node.name, block))
        self.enter(self.new_space(shape_of(node)[1], node.name), node, Role.OPAQUE)
        self.source_of[node.name] = src.sid

    def concat(self, node: fx.Node, operands: list[fx.Node]) -> None:
        """``torch.cat(operands, 1)``: a new layer fed by an identity shortcut from each operand's
        layer, in operand order (its channels are the union of theirs)."""
        if len(set(operands)) != len(operands):
            raise self.unsupported(node, "concatenates one tensor several times")
        for x in operands:
            if x.name in self.pending:
                raise self.unsupported(node, "a diagonal connection must feed a residual add directly")
            if self.value[x.name][1] != 1 or shape_of(x)[2:] != shape_of(node)[2:]:
                raise self.unsupported(node, f"concatenates a flattened or differently shaped tensor {x.name!r}")
            if self.space_of(x).is_input:
                raise self.unsupported(node, "a concatenation that reads the model input directly is not supported")
        layer = self.new_space(shape_of(node)[1], node.name)
        layer.shortcuts += [(node.name, self.space_id(x)) for x in operands]
        self.enter(layer, node, Role.CONCAT)

    # -- heads and results ---------------------------------------------------------------------
    def outputs(self) -> dict[str, fx.Node]:
        (ret,) = self.output.args
        if isinstance(ret, fx.Node) and self.task_name is not None:
            return {self.task_name: ret}
        if isinstance(ret, dict) and all(isinstance(v, fx.Node) for v in ret.values()):
            return dict(ret)
        raise UnsupportedOpError(
            f"{self.model_name}: the output must be one tensor (a single-task network) or a dict "
            f"{{task: tensor}} (a merged network), got {type(ret).__name__}"
        )

    def finish(self) -> GraphLayers:
        if self.pending:
            name = next(iter(self.pending))
            raise UnsupportedOpError(f"{self.model_name}: diagonal connection {name!r} does not feed a residual add")
        heads: dict[str, str] = {}
        head_spaces: dict[int, str] = {}
        for task, ret in self.outputs().items():
            if not is_tensor(ret) or self.value.get(ret.name) is None:
                raise UnsupportedOpError(f"{self.model_name}: output {task!r} is not a tensor")
            space = self.space_of(ret)
            if space.is_input or len(space.producers) != 1 or space.shortcuts or space.consumers:
                raise UnsupportedOpError(
                    f"{self.model_name}: output {task!r} ({ret.name!r}) must come from a single Linear/Conv "
                    f"head whose output nothing else reads"
                )
            if space.sid in head_spaces:
                raise UnsupportedOpError(f"{self.model_name}: tasks {head_spaces[space.sid]!r} and {task!r} share a head")
            head_spaces[space.sid] = task
            heads[task] = space.producers[0]
        head_of_node = {heads[t]: t for t in heads}
        position = {name: i for i, name in enumerate(self.order)}
        names: dict[int, str] = {}
        for sid in sorted(self.spaces, key=lambda s: min((position[n] for n in self.spaces[s].nodes), default=-1)):
            space = self.spaces[sid]
            if not space.is_input and sid not in head_spaces:
                names[sid] = self.layer_name(space, set(names.values()))
        layers: list[LayerStructure] = []
        for sid, name in names.items():
            space = self.spaces[sid]
            members = set(space.nodes)
            output_node = [n for n in self.order if n in members and self.value[n][1] == 1][-1]
            consumers = tuple(Consumer(c.node, c.block, head_of_node.get(c.node)) for c in space.consumers)
            shortcuts = tuple((node, names[self.find(src)]) for node, src in space.shortcuts)
            channelwise = set(space.channelwise)
            layers.append(
                LayerStructure(
                    name=name,
                    width=space.width,
                    producers=tuple(space.producers),
                    channelwise=tuple(n for n in self.order if n in channelwise),
                    consumers=consumers,
                    shortcuts=shortcuts,
                    output_node=output_node,
                )
            )
        return GraphLayers(layers, self.node_infos(names, head_spaces, head_of_node), heads)

    def layer_name(self, space: _Space, taken: set[str]) -> str:
        """The layer's origin module path, or submodule path + function name; a merged network's
        layer keeps the name its pamfx_layer record was made under."""
        node = self.by_name[space.origin_node]
        if META_LAYER in node.meta:
            base = node.meta[META_LAYER].name
        elif node.op == "call_module":
            base = str(node.target)
        else:
            stack = node.meta.get("nn_module_stack") or {}
            path = next(reversed(stack)) if stack else ""
            base = f"{path}.{target_name(node)}" if path else node.name
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}#{k}"
        return name

    def node_infos(self, names: dict[int, str], head_spaces: dict[int, str], head_of_node: dict[str, str]) -> dict[str, NodeInfo]:
        infos: dict[str, NodeInfo] = {}
        for name in self.order:
            role = self.roles.get(name)
            if role in (Role.INPUT, Role.META):
                infos[name] = NodeInfo(role)
                continue
            val = self.value.get(name)
            if val is None:
                continue
            sid = self.find(val[0])
            source = self.source_of.get(name)
            source_layer = names.get(self.find(source)) if source is not None else None
            if sid in head_spaces:
                role = Role.HEAD if name in head_of_node else Role.CHANNELWISE
                infos[name] = NodeInfo(role, None, source_layer, val[1], head_spaces[sid])
            elif self.spaces[sid].is_input:
                infos[name] = NodeInfo(Role.CHANNELWISE, None, None, val[1])
            else:
                infos[name] = NodeInfo(role, names[sid], source_layer, val[1])
        for space_sid, layer_name in names.items():
            for node, src in self.spaces[space_sid].shortcuts:
                if self.is_diagonal(node):
                    infos[node] = NodeInfo(Role.SHORTCUT, layer_name, names[self.find(src)])
        return infos

    def is_diagonal(self, name: str) -> bool:
        node = self.by_name[name]
        return node.op == "call_module" and isinstance(self.modules[node.target], DiagonalConnection)


def organise_graph(
    gm: fx.GraphModule, model_name: str = "model", task_name: str | None = None, unknown_ops: str = "refuse"
) -> GraphLayers:
    """Find the neuron layers of one traced network (shapes must be propagated: see `pamfx.trace`).

    ``task_name`` names the task of a single-task network (its one output); a merged network's
    dict output names its tasks itself. ``unknown_ops``: ``"refuse"`` an op without a channel
    rule (`UnsupportedOpError`), or ``"share"`` it: it opens a layer reading every channel of its
    input, and merging shares both layers (and the layers they read) among all tasks.
    """
    return ChannelSpaces(gm, model_name, task_name, unknown_ops).run()
