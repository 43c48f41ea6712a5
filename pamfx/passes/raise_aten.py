"""The torch.export front end: an ``ExportedProgram`` (or its ``.module()``) raised back to nn modules.

``torch.export`` records ATen ops that read their weights through ``get_attr``; layer
organisation reads conv / linear / BatchNorm *modules*. This pass rebuilds them: every
``aten.conv2d`` / ``aten.linear`` / ``aten.batch_norm`` becomes a call of an ``nn.Conv2d`` /
``nn.Linear`` / ``nn.BatchNorm{1,2}d`` holding the exported tensors, under the name of the
submodule that owned them (so layers keep the names eager tracing gives), and the element-wise,
pooling, reshaping and arithmetic ATen ops become their torch functions with the same
arguments. Every other op is kept as it is, so layer organisation refuses it by name rather
than guessing. torch.export's input guards (a module call whose result nothing reads) are
dropped: pamfx checks the input by propagating shapes. The result computes exactly what the
exported program computes.
"""
from __future__ import annotations

import copy
import operator
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from pamfx.errors import InputError, TraceError

aten = torch.ops.aten

SAME_ARGUMENTS: dict[Any, Callable[..., Any]] = {
    aten.relu.default: torch.relu, aten.relu_.default: torch.relu, aten.sigmoid.default: torch.sigmoid,
    aten.tanh.default: torch.tanh, aten.silu.default: F.silu, aten.silu_.default: F.silu,
    aten.hardswish.default: F.hardswish, aten.hardswish_.default: F.hardswish,
    aten.hardsigmoid.default: F.hardsigmoid, aten.gelu.default: F.gelu,
    aten.mul.Tensor: operator.mul, aten.sub.Tensor: operator.sub, aten.div.Tensor: operator.truediv,
    aten.mean.dim: torch.mean, aten.flatten.using_ints: torch.flatten, aten.view.default: torch.reshape,
    aten.reshape.default: torch.reshape, aten.max_pool2d.default: F.max_pool2d,
    aten.avg_pool2d.default: F.avg_pool2d, aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
    aten.dropout.default: F.dropout, aten.cat.default: torch.cat, aten.clone.default: torch.clone,
}


def is_exported(model: object) -> bool:
    """Whether ``model`` is an ExportedProgram or a GraphModule of ATen ops (``ep.module()``)."""
    if isinstance(model, torch.export.ExportedProgram):
        return True
    return isinstance(model, fx.GraphModule) and any(
        isinstance(n.target, torch._ops.OpOverload) for n in model.graph.nodes if n.op == "call_function"
    )


def _with_defaults(node: fx.Node, defaults: tuple, leading: int = 2) -> list[Any]:
    """The node's ``leading`` required arguments and the optional ones after them, defaults filled in."""
    given = list(node.args)
    return given + list(defaults[len(given) - leading:])


def _attribute(module: nn.Module, target: str) -> Any:
    try:
        return operator.attrgetter(target)(module)
    except AttributeError:
        return None


class _Raiser:
    def __init__(self, source: fx.GraphModule, name: str):
        self.source = source
        self.name = name
        self.graph = fx.Graph()
        self.env: dict[str, Any] = {}
        self.modules: dict[str, nn.Module] = {}

    def tensor(self, arg: Any, node: fx.Node, role: str) -> torch.Tensor | None:
        if arg is None:
            return None
        if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
            raise InputError(f"{self.name}: node {node.name!r} ({node.target}) takes its {role} from a computed tensor")
        return _attribute(self.source, arg.target).detach().clone()

    def owner(self, weight: fx.Node, node: fx.Node) -> str:
        """The submodule that owned a weight (``stem.0.weight`` → ``stem.0``), made unique."""
        base = weight.target.rpartition(".")[0] if isinstance(weight, fx.Node) and weight.op == "get_attr" else node.name
        name, k = base or node.name, 1
        while name in self.modules:
            k += 1
            name = f"{base}_{k}"
        return name

    def module_call(self, node: fx.Node, module: nn.Module, x: Any) -> fx.Node:
        target = self.owner(node.args[1], node)
        self.modules[target] = module
        return self.graph.call_module(target, (self.env[x.name],))

    def conv2d(self, node: fx.Node) -> fx.Node:
        x, w, b, stride, padding, dilation, groups = _with_defaults(node, (None, 1, 0, 1, 1))
        weight = self.tensor(w, node, "weight")
        if isinstance(padding, str):
            raise InputError(f"{self.name}: node {node.name!r}: conv2d with padding={padding!r} is not supported")
        conv = nn.Conv2d(
            weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=stride, padding=padding,
            dilation=dilation, groups=groups, bias=b is not None,
        )
        conv.weight = nn.Parameter(weight)
        if b is not None:
            conv.bias = nn.Parameter(self.tensor(b, node, "bias"))
        return self.module_call(node, conv, x)

    def linear(self, node: fx.Node) -> fx.Node:
        x, w, b = _with_defaults(node, (None,))
        weight = self.tensor(w, node, "weight")
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=b is not None)
        linear.weight = nn.Parameter(weight)
        if b is not None:
            linear.bias = nn.Parameter(self.tensor(b, node, "bias"))
        return self.module_call(node, linear, x)

    def batch_norm(self, node: fx.Node) -> fx.Node:
        x, w, b, mean, var, training, momentum, eps = node.args[:8]
        dims = len(x.meta["val"].shape) if "val" in x.meta else 4
        cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}.get(dims)
        running_mean = self.tensor(mean, node, "running mean")
        if cls is None or running_mean is None and training is False:
            raise InputError(f"{self.name}: node {node.name!r}: batch_norm of a {dims}-d tensor is not supported")
        width = self.tensor(w if w is not None else mean, node, "weight").shape[0]
        bn = cls(width, eps=eps, momentum=momentum, affine=w is not None, track_running_stats=running_mean is not None)
        if w is not None:
            bn.weight = nn.Parameter(self.tensor(w, node, "weight"))
            bn.bias = nn.Parameter(self.tensor(b, node, "bias"))
        if running_mean is not None:
            bn.running_mean = running_mean
            bn.running_var = self.tensor(var, node, "running variance")
            tracked = _attribute(self.source, f"{mean.target.rpartition('.')[0]}.num_batches_tracked")
            if tracked is not None:
                bn.num_batches_tracked = tracked.detach().clone()
        bn.train(bool(training))
        return self.module_call(node, bn, x)

    def run(self) -> fx.GraphModule:
        rules = {aten.conv2d.default: self.conv2d, aten.linear.default: self.linear, aten.batch_norm.default: self.batch_norm}
        for node in self.source.graph.nodes:
            if node.op == "placeholder":
                new = self.graph.placeholder(node.name)
            elif node.op == "get_attr":
                if all(u.target in rules for u in node.users):
                    continue
                value = _attribute(self.source, node.target)
                self.modules[node.target] = value.detach().clone() if isinstance(value, torch.Tensor) else value
                new = self.graph.get_attr(node.target)
            elif node.op == "output":
                self.output(node)
                continue
            elif node.op == "call_module" and not node.users:
                continue  # torch.export's input guards (``_guards_fn``): checks whose result nothing reads
            elif node.op == "call_module":
                self.modules[node.target] = self.source.get_submodule(node.target)
                new = self.graph.node_copy(node, lambda n: self.env[n.name])
            elif node.op == "call_function" and node.target in rules:
                new = rules[node.target](node)
            elif node.op == "call_function" and node.target in SAME_ARGUMENTS:
                new = self.graph.call_function(SAME_ARGUMENTS[node.target], *self.mapped(node))
            elif node.op == "call_function" and node.target in (aten.hardtanh.default, aten.hardtanh_.default):
                x, low, high = _with_defaults(node, (-1.0, 1.0), leading=1)
                relu6 = (low, high) == (0.0, 6.0)
                args = (self.env[x.name],) if relu6 else (self.env[x.name], low, high)
                new = self.graph.call_function(F.relu6 if relu6 else F.hardtanh, args)
            elif node.op == "call_function" and node.target is aten.add.Tensor:
                args, kwargs = self.mapped(node)
                target = operator.add if kwargs.get("alpha", 1) == 1 else torch.add
                new = self.graph.call_function(target, args, {} if target is operator.add else kwargs)
            else:
                new = self.graph.node_copy(node, lambda n: self.env[n.name])
            stack = node.meta.get("nn_module_stack")
            if stack:  # keyed by module path, as torch.fx.symbolic_trace keys it
                new.meta["nn_module_stack"] = {path: (path, t) for path, t in stack.values()}
            self.env[node.name] = new
        gm = fx.GraphModule(self.modules, self.graph, class_name="ExportedModel")
        gm.graph.eliminate_dead_code()
        gm.recompile()
        gm.training = any(m.training for m in self.modules.values() if isinstance(m, nn.Module))
        return gm

    def mapped(self, node: fx.Node) -> tuple[tuple, dict]:
        return fx.map_arg(node.args, lambda n: self.env[n.name]), fx.map_arg(node.kwargs, lambda n: self.env[n.name])

    def output(self, node: fx.Node) -> None:
        (flat,) = node.args
        spec = getattr(self.source, "_out_spec", None)
        if spec is not None and not spec.is_leaf() or len(flat) != 1:
            raise InputError(f"{self.name}: an exported network must return one tensor")
        self.graph.output(self.env[flat[0].name])


def raise_exported(model: object, name: str = "model") -> fx.GraphModule:
    """A GraphModule of nn modules and torch functions computing what exported ``model`` computes."""
    source = model.module() if isinstance(model, torch.export.ExportedProgram) else model
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)
            source = copy.deepcopy(source)
    except Exception as exc:  # deepcopy raises whatever an attribute raises
        raise TraceError(f"{name}: cannot copy the exported program ({type(exc).__name__}: {exc})") from exc
    placeholders = [n for n in source.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise InputError(f"{name}: an exported network must take one input, this one takes {len(placeholders)}")
    return _Raiser(source, name).run()
