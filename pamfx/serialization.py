"""Saving and loading pamfx GraphModules with their IR: `save` and `load`.

``torch.save`` of a GraphModule pickles its generated code and drops ``node.meta``, so a merged
network loses its IR. `save` writes the graph as data instead — every node (op, name, target,
arguments), every module it calls (type, plain attributes, parameters, buffers, training flag)
pamfx's ``node.meta`` keys (`pamfx.ir.meta`) and fx's ``nn_module_stack`` (module types as
names) — into a file that `load` reads with
``torch.load(weights_only=True)``: loading never unpickles code. Functions and module types are
named by their qualified names and resolved on load only inside an allowlist (``torch``,
``torch.nn.functional``, ``operator``, ``builtins.getattr``; modules of ``torch.nn`` and
``pamfx``), so a file cannot make `load` call anything else. Shapes are re-propagated on load.
Writes are atomic (`pamfx.atomic`).
"""
from __future__ import annotations

import builtins
import importlib
import operator
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from pamfx.atomic import atomic_path
from pamfx.errors import InputError
from pamfx.frontend import shape_propagate
from pamfx.ir.meta import ALL_KEYS
from pamfx.ir.neuron_layer import LayerTaskSets
from pamfx.ir.task_set import TaskSpace

FORMAT = "pamfx.graph_module"
VERSION = 1
TAG = "__pamfx__"
FUNCTION_NAMESPACES = {"torch": torch, "torch.nn.functional": F, "operator": operator}
BUILTINS = {"getattr": builtins.getattr}
MODULE_PREFIXES = ("torch.nn.", "pamfx.")
MEMORY_FORMATS = ("contiguous_format", "channels_last", "channels_last_3d", "preserve_format")
_BASE_ATTRS = frozenset(nn.Module().__dict__)
_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.Size)


def _function_name(target: Any, node: str) -> str:
    for prefix, namespace in FUNCTION_NAMESPACES.items():
        name = getattr(target, "__name__", None)
        if name is not None and getattr(namespace, name, None) is target:
            return f"{prefix}:{name}"
    for name, fn in BUILTINS.items():
        if fn is target:
            return f"builtins:{name}"
    raise InputError(f"save: node {node!r} calls {target!r}, which is outside the functions pamfx can save")


def _resolve_function(name: str) -> Any:
    prefix, _, attr = name.partition(":")
    if prefix == "builtins" and attr in BUILTINS:
        return BUILTINS[attr]
    if prefix in FUNCTION_NAMESPACES and hasattr(FUNCTION_NAMESPACES[prefix], attr):
        return getattr(FUNCTION_NAMESPACES[prefix], attr)
    raise InputError(f"load: function {name!r} is not one pamfx loads")


def _encode(value: Any, where: str) -> Any:
    """Graph arguments and IR values as data that ``torch.load(weights_only=True)`` reads."""
    if isinstance(value, fx.Node):
        return {TAG: "node", "name": value.name}
    if isinstance(value, _PLAIN) or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, slice):
        return {TAG: "slice", "args": [_encode(v, where) for v in (value.start, value.stop, value.step)]}
    if value is Ellipsis:
        return {TAG: "ellipsis"}
    if isinstance(value, LayerTaskSets):
        return {TAG: "LayerTaskSets", "name": value.name, "task_sets": list(value.task_sets), "origins": list(value.origins)}
    if isinstance(value, TaskSpace):
        return {TAG: "TaskSpace", "names": list(value.names)}
    if isinstance(value, torch.memory_format):  # e.g. emitted modules' x.contiguous(memory_format=torch.channels_last)
        return {TAG: "memory_format", "name": str(value).rpartition(".")[2]}
    if isinstance(value, tuple):
        return tuple(_encode(v, where) for v in value)
    if isinstance(value, list):
        return [_encode(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value) and TAG not in value:
        return {k: _encode(v, where) for k, v in value.items()}
    raise InputError(f"save: {where} holds a {type(value).__name__}, which pamfx cannot save")


def _decode(value: Any, nodes: dict[str, fx.Node]) -> Any:
    if isinstance(value, tuple):
        return tuple(_decode(v, nodes) for v in value)
    if isinstance(value, list):
        return [_decode(v, nodes) for v in value]
    if not isinstance(value, dict):
        return value
    kind = value.get(TAG)
    if kind is None:
        return {k: _decode(v, nodes) for k, v in value.items()}
    if kind == "node":
        return nodes[value["name"]]
    if kind == "slice":
        return slice(*(_decode(v, nodes) for v in value["args"]))
    if kind == "ellipsis":
        return Ellipsis
    if kind == "LayerTaskSets":
        return LayerTaskSets(value["name"], tuple(value["task_sets"]), tuple(tuple(o) for o in value["origins"]))
    if kind == "TaskSpace":
        return TaskSpace(tuple(value["names"]))
    if kind == "memory_format" and value["name"] in MEMORY_FORMATS:
        return getattr(torch, value["name"])
    raise InputError(f"load: unknown value kind {kind!r}")


def _encode_module(module: nn.Module, where: str) -> dict[str, Any]:
    cls = type(module)
    type_name = f"{cls.__module__}:{cls.__qualname__}"
    if not type_name.startswith(MODULE_PREFIXES):
        raise InputError(f"save: submodule {where!r} is a {type_name}; pamfx saves modules of torch.nn and pamfx only")
    attrs = {k: _encode(v, f"attribute {k!r} of submodule {where!r}") for k, v in vars(module).items() if k not in _BASE_ATTRS}
    return {
        "type": type_name,
        "attrs": attrs,
        "training": module.training,
        "parameters": {k: None if p is None else p.detach() for k, p in module._parameters.items()},
        "requires_grad": {k: p.requires_grad for k, p in module._parameters.items() if p is not None},
        "buffers": dict(module._buffers),
        "non_persistent": sorted(module._non_persistent_buffers_set),
        "children": {k: _encode_module(m, f"{where}.{k}") for k, m in module._modules.items() if m is not None},
    }


def _decode_module(data: dict[str, Any]) -> nn.Module:
    if not data["type"].startswith(MODULE_PREFIXES):
        raise InputError(f"load: module type {data['type']!r} is not one pamfx loads")
    module_name, _, qualname = data["type"].partition(":")
    cls: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise InputError(f"load: {data['type']!r} is not an nn.Module")
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    for key, value in data["attrs"].items():
        object.__setattr__(module, key, _decode(value, {}))
    for key, value in data["parameters"].items():
        param = None if value is None else nn.Parameter(value, requires_grad=data["requires_grad"][key])
        module.register_parameter(key, param)
    for key, value in data["buffers"].items():
        module.register_buffer(key, value, persistent=key not in data["non_persistent"])
    for key, child in data["children"].items():
        module.add_module(key, _decode_module(child))
    module.training = data["training"]
    return module


def _module_stack(node: fx.Node) -> dict[str, tuple[str, str]] | None:
    """fx's ``nn_module_stack`` (which names layers), the module types written as qualified names."""
    stack = node.meta.get("nn_module_stack")
    if stack is None:
        return None
    return {str(k): (str(path), t if isinstance(t, str) else f"{t.__module__}.{t.__qualname__}") for k, (path, t) in stack.items()}


def _rebuild(data: dict[str, Any]) -> fx.GraphModule:
    """The GraphModule that `save` described in ``data`` (shapes not yet propagated)."""
    root: dict[str, Any] = {
        name: _decode_module(value) if isinstance(value, dict) else value for name, value in data["attributes"].items()
    }
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for entry in data["nodes"]:
        target = _resolve_function(entry["target"]) if entry["op"] == "call_function" else entry["target"]
        if entry["op"] == "call_method" and not (target.isidentifier() and not target.startswith("_")):
            raise InputError(f"load: node {entry['name']!r} calls tensor method {target!r}, which pamfx does not load")
        args, kwargs = _decode(entry["args"], nodes), _decode(entry["kwargs"], nodes)
        if entry["op"] == "output":
            node = graph.output(args[0])
        else:
            node = graph.create_node(entry["op"], target, tuple(args), kwargs, name=entry["name"])
        node.meta.update({k: _decode(v, nodes) for k, v in entry["meta"].items()})
        if entry["module_stack"] is not None:
            node.meta["nn_module_stack"] = dict(entry["module_stack"])
        nodes[entry["name"]] = node
    return fx.GraphModule(root, graph, class_name=data["class_name"])


def encode(module: fx.GraphModule) -> dict[str, Any]:
    """``module`` (a merged network, an emitted module, any GraphModule of torch.nn modules) with its
    pamfx IR as plain data: tensors, numbers, strings, lists and dicts, what `save` writes and
    `decode` reads (also how worker processes hand networks back, `pamfx.pruning_jobs`)."""
    if not isinstance(module, fx.GraphModule):
        raise InputError(f"save: expected an fx.GraphModule (from pamfx.merge or pamfx.emit), got {type(module).__name__}")
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
    meta = placeholders[0].meta.get("tensor_meta") if len(placeholders) == 1 else None
    if meta is None:
        raise InputError("save: the module must have one input whose shape was propagated (pamfx.trace / merge / emit)")
    nodes, attributes = [], {}
    for node in module.graph.nodes:
        target = node.target
        if node.op == "call_function":
            target = _function_name(target, node.name)
        elif node.op == "call_module":
            attributes[target] = _encode_module(module.get_submodule(target), target)
        elif node.op == "get_attr":
            value = operator.attrgetter(target)(module)
            attributes[target] = _encode_module(value, target) if isinstance(value, nn.Module) else value.detach()
        nodes.append({
            "op": node.op, "name": node.name, "target": target,
            "args": _encode(node.args, f"node {node.name!r}"), "kwargs": _encode(dict(node.kwargs), f"node {node.name!r}"),
            "meta": {k: _encode(node.meta[k], f"node {node.name!r}") for k in ALL_KEYS if k in node.meta},
            "module_stack": _module_stack(node),
        })
    return {
        "format": FORMAT, "version": VERSION, "class_name": type(module).__name__, "training": module.training,
        "input": {"shape": list(meta.shape), "dtype": meta.dtype}, "nodes": nodes, "attributes": attributes,
    }


def decode(data: Any, where: str) -> fx.GraphModule:
    """The GraphModule `encode` gave ``data`` for, with its IR and shapes; ``where`` names the data's
    source in errors."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputError(f"load: {where} is not a file written by pamfx.save")
    if data.get("version") != VERSION:
        raise InputError(f"load: {where} has format version {data.get('version')}, this pamfx reads {VERSION}")
    try:
        gm = _rebuild(data)
        gm.training = bool(data["training"])
        example = torch.zeros([1] + list(data["input"]["shape"][1:]), dtype=data["input"]["dtype"])
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ImportError, RuntimeError) as exc:
        raise InputError(f"load: {where} is malformed ({type(exc).__name__}: {exc})") from exc
    return shape_propagate(gm, example, f"module loaded from {where}")


def save(module: fx.GraphModule, path: str | os.PathLike) -> Path:
    """Write ``module`` with its pamfx IR (`encode`) to ``path``, atomically; return the path. See `load`."""
    data = encode(module)
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
    return path


def load(path: str | os.PathLike) -> fx.GraphModule:
    """Read a GraphModule written by `save`, with its IR and shapes, without unpickling code."""
    try:
        data = torch.load(Path(path), weights_only=True)
    except Exception as exc:  # a missing, truncated or foreign file: torch raises many types
        raise InputError(f"load: cannot read {path} as a pamfx file ({type(exc).__name__}: {str(exc)[:200]})") from exc
    return decode(data, str(path))
