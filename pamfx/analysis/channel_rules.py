"""Channel rules: what each op does to channel spaces (the op table of layer organisation, Alg. 3).

Every tensor of a traced network lies in a *channel space* (the input X, a neuron layer, a task
head's output). A rule, registered for a module type or for a function / tensor-method name with
`register_channel_rule`, receives an `OpCall` and says what the op does with channels by calling
exactly one of its verbs:

- `OpCall.dense(width)`: a weighted op (Conv2d with groups=1, Linear) whose ``width`` output
  channels each read every input channel: it opens a new channel space.
- `OpCall.channelwise()`: channel c of the output depends on channel c of the input only
  (BatchNorm, activations, depthwise conv, pooling, dropout, scalar arithmetic): it stays in the
  input's space.
- `OpCall.spatial_mean()`: a mean over spatial dimensions (dim >= 2), channel-wise too.
- `OpCall.flatten()`: ``[N, C, H, W] -> [N, C·H·W]``: H·W features per channel from then on.
- `OpCall.product()`: an elementwise product of tensors of different spaces where all but one
  operand are computed only for this product — a squeeze-excitation gate ``x * gate(x)``: the
  gate's producer (its last conv) joins the layer of ``x``, so gate channel c, like x's channel c,
  has that layer's task set, and the gate's hidden layer is an ordinary neuron layer.
- `OpCall.residual()`: an elementwise sum / difference of tensors of *different* spaces (a
  residual block, Sec. 4.5.3); the organiser decides which operands become producers of the layer
  after the addition and which become identity shortcuts. Operands of one space: channel-wise.
- `OpCall.concat()`: ``torch.cat(tensors, 1)`` (DenseNet, Inception): a new neuron layer whose
  channels are the union of the operands' channels, fed channel to channel by identity (diagonal)
  connections from the operands' layers, so its channels have task sets of their own.
- `OpCall.opaque()`: an op without a rule under ``unknown_ops="share"``: a new layer that may
  read every channel of its input; merging shares it and what it reads among all tasks.
- `OpCall.refuse(why)`: an `UnsupportedOpError` naming the node, its submodule and ``why``.

pamfx's own rules below use the same registry (``docs/op_rules.md`` describes them); a user
teaches pamfx a new op the same way::

    @pamfx.register_channel_rule(MyScale)
    def _(op):
        op.channelwise()

Merging and codegen rely on these verbs meaning exactly what they say: a module declared
``channelwise`` may only hold per-channel tensors (``weight``, ``bias``, ``running_mean``,
``running_var`` of shape ``[C]``), a module declared ``dense`` must be a linear map of a
``weight`` of shape ``[out, in, ...]`` (plus ``bias``), like Conv2d and Linear.
"""
from __future__ import annotations

import operator
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import torch
import torch.nn.functional as F
from torch import fx, nn

from pamfx.errors import InputError, UnsupportedOpError
from pamfx.ir.diagonal import DiagonalConnection
from pamfx.ir.meta import META_DEPTHWISE
from pamfx.ir.task_slices import TaskSlices

if TYPE_CHECKING:
    from pamfx.analysis.layer_organisation import ChannelSpaces


class Role(str, Enum):
    """The part a node plays in the layer structure (what merge, emit and cost do with it)."""

    INPUT = "input"  # the network input X
    DENSE = "dense"  # a producer: conv / linear whose output channels are a layer's channels
    CHANNELWISE = "channelwise"  # per-channel op inside a layer (sliced along with its channels)
    FLATTEN = "flatten"  # [N, C, H, W] -> [N, C·H·W]
    RESIDUAL = "residual"  # the addition after which a residual block's layer lies (Sec. 4.5.3)
    CONCAT = "concat"  # a concatenation: a layer fed by identity connections from its operands' layers
    OPAQUE = "opaque"  # an op without a channel rule, merged as `TaskSlices` (``unknown_ops="share"``)
    SHORTCUT = "shortcut"  # a DiagonalConnection of a merged network
    HEAD = "head"  # a task's output op
    META = "meta"  # a non-tensor value (a shape, a size)


ChannelRule = Callable[["OpCall"], None]
_MODULE_RULES: dict[type, ChannelRule] = {}
_FUNCTION_RULES: dict[Any, ChannelRule] = {}
R = TypeVar("R", bound=ChannelRule)


def register_channel_rule(*targets: type | Callable[..., Any] | str) -> Callable[[R], R]:
    """Decorator registering a channel rule for module types, functions or tensor-method names.

    A module type's rule also applies to its subclasses (the most specific registered type wins),
    and `pamfx.trace` keeps such modules as single calls (fx leaves) instead of tracing into them;
    registering a target again replaces its rule. Style of
    `torch.utils.flop_counter.register_flop_formula`.
    """
    if not targets:
        raise InputError("register_channel_rule needs at least one module type, function or method name")
    for target in targets:
        if isinstance(target, type) and not issubclass(target, nn.Module):
            raise InputError(f"register_channel_rule: {target.__name__} is not an nn.Module subclass")
        if not (isinstance(target, (type, str)) or callable(target)):
            raise InputError(f"register_channel_rule: cannot register a rule for {target!r}")

    def decorator(rule: R) -> R:
        for target in targets:
            (_MODULE_RULES if isinstance(target, type) else _FUNCTION_RULES)[target] = rule
        return rule

    return decorator


def has_module_rule(module: nn.Module) -> bool:
    """Whether a rule is registered for the module's type: tracing keeps such a module as one call."""
    return any(t in _MODULE_RULES for t in type(module).__mro__)


def rule_for(node: fx.Node, module: nn.Module | None) -> ChannelRule | None:
    """The registered rule of a call_module node's module type, or of a function / method target."""
    if module is not None:
        return next((_MODULE_RULES[t] for t in type(module).__mro__ if t in _MODULE_RULES), None)
    try:
        return _FUNCTION_RULES.get(node.target)
    except TypeError:  # an unhashable target
        return None


def submodule_of(node: fx.Node) -> str:
    """The submodule a node belongs to, as ``'path' (Type)``, from the call itself or fx's nn_module_stack."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "the root module"
    path, kind = next(reversed(stack.values()))
    kind = kind.__name__ if isinstance(kind, type) else str(kind).rsplit(".", 1)[-1]
    return f"submodule {path!r} ({kind})"


def target_name(node: fx.Node) -> str:
    """A node's target as text: a module path or method name, or a function's ``__name__``."""
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def describe(node: fx.Node) -> str:
    """``node 'mul' (call_function mul) in submodule 'features.1.block.1' (SqueezeExcitation)``."""
    return f"node {node.name!r} ({node.op} {target_name(node)}) in {submodule_of(node)}"


class OpCall:
    """One op being organised: its node, module (for call_module), tensor operands, and the verbs."""

    def __init__(self, spaces: "ChannelSpaces", node: fx.Node, module: nn.Module | None, inputs: list[fx.Node]):
        self.spaces = spaces
        self.node = node
        self.module = module
        self.inputs = inputs

    def argument(self, position: int, name: str, default: Any = None) -> Any:
        """The op's argument ``name`` (or positional ``position``), else ``default``."""
        if name in self.node.kwargs:
            return self.node.kwargs[name]
        return self.node.args[position] if len(self.node.args) > position else default

    def refuse(self, why: str) -> UnsupportedOpError:
        """The error to raise for an op (or a use of it) pamfx cannot handle exactly."""
        return self.spaces.unsupported(self.node, why)

    def only_input(self) -> fx.Node:
        if len(self.inputs) != 1:
            raise self.refuse(f"reads {len(self.inputs)} tensors, this op's rule expects one")
        return self.inputs[0]

    def same_space(self) -> bool:
        """Whether every tensor operand lies in one channel space."""
        return len({self.spaces.space_id(x) for x in self.inputs}) == 1

    def dense(self, width: int) -> None:
        weight = getattr(self.module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise self.refuse("a dense op must be a module with a weight [out, in, ...] (like Conv2d, Linear)")
        self.spaces.dense(self.node, self.only_input(), width, conv=weight.dim() > 2)

    def channelwise(self, spatial: bool = False) -> None:
        if not self.same_space():
            raise self.refuse("combines tensors of different neuron layers elementwise (only a residual sum is supported)")
        self.spaces.channelwise(self.node, self.inputs[0], spatial)

    def spatial_mean(self) -> None:
        self.spaces.mean(self.node, self.only_input(), self.argument(1, "dim"))

    def flatten(self) -> None:
        self.spaces.flatten(self.node, self.only_input())

    def opaque(self) -> None:
        """An op without a rule (``unknown_ops="share"``): its output opens a new layer that may
        depend on every channel it reads; both layers are then shared by all tasks."""
        self.spaces.opaque(self.node, self.only_input())

    def product(self) -> None:
        self.combine(self.spaces.product, "an elementwise product")

    def concat(self) -> None:
        tensors, dim = self.argument(0, "tensors"), self.argument(1, "dim", 0)
        if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) for t in tensors):
            raise self.refuse("concatenates something other than a list of tensors")
        rank = len(self.node.meta["tensor_meta"].shape)
        if dim % rank != 1:
            raise self.refuse(f"concatenates along dim {dim}, not the channel dimension 1")
        if len(tensors) == 1:
            return self.channelwise()
        self.spaces.concat(self.node, list(tensors))

    def residual(self) -> None:
        self.combine(self.spaces.residual, "a residual sum")

    def combine(self, join: Callable[[fx.Node, fx.Node, fx.Node], None], what: str) -> None:
        """Two operands of one space: channel-wise; of two spaces: ``join`` them."""
        if self.same_space():
            return self.channelwise()
        if len(self.inputs) != 2:
            raise self.refuse(f"{what} must combine two tensors, this one reads {len(self.inputs)}")
        join(self.node, *self.inputs)


def is_depthwise(module: nn.Module) -> bool:
    """A conv with one group per channel (channel c reads only input channel c)."""
    return isinstance(module, nn.Conv2d) and 1 < module.groups == module.in_channels == module.out_channels


# -- pamfx's own rules ------------------------------------------------------------------------------

@register_channel_rule(nn.Conv2d)
def _conv2d(op: OpCall) -> None:
    """Depthwise: channel-wise. Dense or grouped (ResNeXt, RegNet): a dense op; merging keeps a
    grouped conv's block structure as a connection mask and emit runs it as grouped convs."""
    if op.node.meta.get(META_DEPTHWISE) or is_depthwise(op.module):
        return op.channelwise()
    op.dense(op.module.out_channels)


@register_channel_rule(nn.Linear)
def _linear(op: OpCall) -> None:
    op.dense(op.module.out_features)


@register_channel_rule(
    nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.ELU, nn.Mish, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity,
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.mish,
    torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.elu, F.dropout, F.dropout1d, F.dropout2d,
    "relu", "sigmoid", "tanh", "contiguous", "clone", "float",
)
def _channelwise(op: OpCall) -> None:
    op.channelwise()


@register_channel_rule(operator.mul, operator.imul, operator.truediv, torch.mul, torch.div, "mul", "div", "mul_")
def _product(op: OpCall) -> None:
    """``x * s`` (scalar), ``x * y`` (one space), or a gate ``x * gate(x)`` (squeeze-excitation)."""
    op.product()


@register_channel_rule(
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
)
def _pool(op: OpCall) -> None:
    op.channelwise(spatial=True)


@register_channel_rule(torch.mean, "mean")
def _mean(op: OpCall) -> None:
    op.spatial_mean()


@register_channel_rule(nn.Flatten, torch.flatten, "flatten")
def _flatten(op: OpCall) -> None:
    if op.module is not None:
        start, end = op.module.start_dim, op.module.end_dim
    else:
        start, end = op.argument(1, "start_dim", 0), op.argument(2, "end_dim", -1)
    if start != 1 or end != -1:
        raise op.refuse(f"only flatten(x, 1) (start_dim=1, end_dim=-1) is supported, got ({start}, {end})")
    op.flatten()


@register_channel_rule(torch.reshape, "view", "reshape")
def _reshape(op: OpCall) -> None:
    op.flatten()


@register_channel_rule(operator.add, operator.iadd, torch.add, "add", "add_", operator.sub, torch.sub, "sub")
def _sum(op: OpCall) -> None:
    """``a + b``, ``torch.add(input=a, other=b, alpha=s)``, ``a - b``: a residual when a and b
    lie in different spaces (the shortcut keeps its coefficient: merge and emit keep the call)."""
    op.residual()


@register_channel_rule(torch.cat, torch.concat, torch.concatenate)
def _concatenate(op: OpCall) -> None:
    op.concat()


@register_channel_rule(torch.permute, torch.transpose, "permute", "transpose")
def _permute(op: OpCall) -> None:
    raise op.refuse(
        "moving the channel dimension (ConvNeXt's channels-last LayerNorm, channel shuffle) is not "
        "supported: pamfx keeps channels on dim 1"
    )


@register_channel_rule(TaskSlices)
def _task_slices(op: OpCall) -> None:
    op.opaque()


@register_channel_rule(DiagonalConnection)
def _diagonal(op: OpCall) -> None:
    op.spaces.diagonal(op.node, op.only_input())
