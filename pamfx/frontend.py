"""Front end: take a private copy of a model, trace it with torch.fx and propagate shapes.

pamfx never writes to a user's model: `trace` works on a deep copy (hooks stripped, every
module's training flag kept), so organising, merging and emitting share no module, parameter
or buffer with the models they were given (docs/design.md, "Isolation").
"""
from __future__ import annotations

import contextlib
import copy
import io
import linecache
import sys
import traceback
from typing import Iterator

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from pamfx.analysis.channel_rules import has_module_rule
from pamfx.errors import InputError, TraceError
from pamfx.ir.meta import META_TASKS
from pamfx.passes.raise_aten import is_exported, raise_exported

HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


class _PathTracer(fx.Tracer):
    """A tracer that remembers which submodule it is inside, to name it when tracing fails, and
    keeps every module with a registered channel rule as a leaf (one call_module node)."""

    def __init__(self) -> None:
        super().__init__()
        self.path: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return super().is_leaf_module(m, module_qualified_name) or has_module_rule(m)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        self.path.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self.path.pop()


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch: where in the user's code tracing broke."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename]
    if not frames:
        return "unknown location"
    f = frames[-1]
    line = (f.line or linecache.getline(f.filename, f.lineno)).strip()
    return f"{f.filename}:{f.lineno} in {f.name}: {line}"


def torch_message(exc: BaseException) -> str:
    """``Type: first line of the message`` of a torch exception, for pamfx error texts."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def strip_hooks(module: nn.Module) -> nn.Module:
    """Give ``module`` and its submodules empty hook tables (new ones: a shallow copy's tables
    are its original's, which must keep their hooks)."""
    for m in module.modules():
        for attr in HOOK_DICTS:
            hooks = getattr(m, attr, None)
            if hooks is not None:
                setattr(m, attr, type(hooks)())
    return module


def private_copy(model: nn.Module, name: str) -> nn.Module:
    """A deep copy of ``model`` without hooks: what pamfx traces, merges and hands back."""
    try:
        clone = copy.deepcopy(model)
    except Exception as exc:  # deepcopy raises whatever a user attribute raises
        raise TraceError(f"{name}: cannot copy {type(model).__name__} ({torch_message(exc)})") from exc
    return strip_hooks(clone)


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Run ``modules`` in evaluation mode, then give every submodule back its own training flag."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    for m, _ in flags:
        m.training = False
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def trace(
    model: nn.Module | fx.GraphModule, example_input: torch.Tensor, name: str = "model", *, single_task: bool = True
) -> fx.GraphModule:
    """Symbolically trace a private copy of ``model`` and run `ShapeProp` on it.

    ``model`` is an nn.Module, an fx.GraphModule, a ``torch.export.ExportedProgram`` or its
    ``.module()`` (raised back to nn modules by `pamfx.passes.raise_aten`). Every node of the result carries ``meta["tensor_meta"]``; ``model`` itself is
    never written to. A model that cannot be traced raises `TraceError` naming the submodule and
    source line where tracing broke; one that fails on ``example_input`` names the node and keeps
    torch's message. With ``single_task`` (the default: what merging takes) a merged network or a
    model whose output is not one tensor is refused with `InputError`.
    """
    if not isinstance(example_input, torch.Tensor):
        raise TraceError(f"{name}: example_input must be a torch.Tensor, got {type(example_input).__name__}")
    if example_input.dim() < 1 or example_input.shape[0] < 1:
        raise TraceError(f"{name}: example_input must hold at least one sample, got shape {tuple(example_input.shape)}")
    if is_exported(model):
        gm = raise_exported(model, name)
    elif isinstance(model, fx.GraphModule):
        gm = private_copy(model, name)
    elif isinstance(model, nn.Module):
        root = private_copy(model, name)
        tracer = _PathTracer()
        try:
            graph = tracer.trace(root)
        except Exception as exc:  # fx raises many types; all mean "not traceable"
            where = tracer.path[-1] if tracer.path else "<root>"
            raise TraceError(
                f"{name}: torch.fx cannot trace {type(model).__name__} (inside submodule {where!r}, "
                f"at {_user_frame(exc)}): {type(exc).__name__}: {exc}"
            ) from exc
        gm = fx.GraphModule(root, graph, type(model).__name__)
    else:
        raise TraceError(f"{name}: expected an nn.Module, fx.GraphModule or ExportedProgram, got {type(model).__name__}")
    for node in gm.graph.nodes:
        node.meta.pop("tensor_meta", None)
    shape_propagate(gm, example_input, name)
    if single_task:
        _check_single_task(gm, name)
    return gm


def _check_single_task(gm: fx.GraphModule, name: str) -> None:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    if META_TASKS in output.meta:
        raise InputError(f"{name}: is a merged multitask network; pamfx merges single-task networks")
    (ret,) = output.args
    if not (isinstance(ret, fx.Node) and isinstance(ret.meta.get("tensor_meta"), TensorMetadata)):
        raise InputError(
            f"{name}: a single-task network must return one tensor, this one returns "
            f"{type(ret).__name__.removeprefix('immutable_') if not isinstance(ret, fx.Node) else 'a non-tensor'}"
        )


def shape_propagate(gm: fx.GraphModule, example_input: torch.Tensor, name: str = "model") -> fx.GraphModule:
    """Record ``tensor_meta`` on every node of ``gm`` (run in evaluation mode, without gradients).

    A failure raises `TraceError` naming the node that failed, with torch's message, chained to
    torch's exception (ShapeProp's own wrapper, and the traceback it prints, are dropped).
    """
    interpreter = _NamingShapeProp(gm)
    printed = io.StringIO()
    try:
        with eval_mode(gm), torch.no_grad(), contextlib.redirect_stderr(printed):
            interpreter.propagate(example_input)
    except Exception as exc:
        cause = exc.__cause__ if str(exc).startswith("ShapeProp error") and exc.__cause__ is not None else exc
        node = interpreter.current
        where = f"node {node.name!r} ({node.format_node()})" if node is not None else "the start"
        placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        extra = f" (the model takes {len(placeholders)} inputs: {placeholders})" if len(placeholders) != 1 else ""
        raise TraceError(
            f"{name}: running on an input of shape {tuple(example_input.shape)} and dtype {example_input.dtype} "
            f"failed at {where}{extra}: {torch_message(cause)}"
        ) from cause
    sys.stderr.write(printed.getvalue())  # warnings the model printed while it ran
    return gm


class _NamingShapeProp(ShapeProp):
    """ShapeProp that remembers the node it is running, so a failure names the right one."""

    current: fx.Node | None = None

    def run_node(self, n: fx.Node):
        self.current = n
        return super().run_node(n)


def example_from_meta(gm: fx.GraphModule) -> torch.Tensor:
    """A zero input (batch 1) of the shape and dtype recorded on ``gm``'s placeholder by ShapeProp."""
    placeholder = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    meta = placeholder.meta.get("tensor_meta") if placeholder is not None else None
    if meta is None:
        raise TraceError("the GraphModule's input carries no shape; run pamfx.trace (ShapeProp) first")
    return torch.zeros((1,) + tuple(meta.shape[1:]), dtype=meta.dtype)
