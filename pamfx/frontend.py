"""Front end: trace a model with torch.fx and propagate shapes (DESIGN.md §1, first box)."""
from __future__ import annotations

import linecache
import traceback

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from pamfx.analysis.channel_rules import has_module_rule
from pamfx.errors import TraceError


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


def trace(model: nn.Module | fx.GraphModule, example_input: torch.Tensor, name: str = "model") -> fx.GraphModule:
    """Symbolically trace ``model`` (or take the user's GraphModule) and run `ShapeProp` on it.

    Every node then carries ``meta["tensor_meta"]``. A model that cannot be traced raises
    `TraceError` naming the submodule and source line where tracing broke.
    """
    if not isinstance(example_input, torch.Tensor):
        raise TraceError(f"{name}: example_input must be a torch.Tensor, got {type(example_input).__name__}")
    if isinstance(model, fx.GraphModule):
        gm = model
    elif isinstance(model, nn.Module):
        tracer = _PathTracer()
        try:
            graph = tracer.trace(model)
        except Exception as exc:  # fx raises many types; all mean "not traceable"
            where = tracer.path[-1] if tracer.path else "<root>"
            raise TraceError(
                f"{name}: torch.fx cannot trace {type(model).__name__} (inside submodule {where!r}, "
                f"at {_user_frame(exc)}): {type(exc).__name__}: {exc}"
            ) from None
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    else:
        raise TraceError(f"{name}: expected an nn.Module or fx.GraphModule, got {type(model).__name__}")
    for node in gm.graph.nodes:
        node.meta.pop("tensor_meta", None)
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    except Exception as exc:
        node = next((n for n in gm.graph.nodes if "tensor_meta" not in n.meta and n.op != "output"), None)
        where = f"node {node.name!r} ({node.format_node()})" if node is not None else "the output"
        raise TraceError(
            f"{name}: running on an input of shape {tuple(example_input.shape)} failed at {where}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    finally:
        gm.train(was_training)
    return gm


def shape_propagate(gm: fx.GraphModule, example_input: torch.Tensor) -> fx.GraphModule:
    """Record ``tensor_meta`` on every node of ``gm`` (run in evaluation mode, without gradients)."""
    training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    finally:
        gm.train(training)
    return gm


def example_from_meta(gm: fx.GraphModule) -> torch.Tensor:
    """A zero input (batch 1) of the shape and dtype recorded on ``gm``'s placeholder by ShapeProp."""
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    meta = placeholder.meta.get("tensor_meta")
    if meta is None:
        raise TraceError(f"{placeholder.name!r} carries no shape; run pamfx.trace (ShapeProp) first")
    return torch.zeros((1,) + tuple(meta.shape[1:]), dtype=meta.dtype)
