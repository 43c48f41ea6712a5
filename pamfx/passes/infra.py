"""pamfx's transforms as `torch.fx.passes.infra` passes, to chain in a `PassManager`.

Each pass is a `PassBase`: ``requires`` reads and checks the merged network's IR
(`read_multitask`, raising `IRError`) once, ``call`` transforms with that view and returns a
`PassResult`, ``ensures`` checks the IR of the result. With ``inplace=False`` (the default) the
pass returns a new GraphModule and leaves its input as it was; with ``inplace=True`` the input
GraphModule takes the result's graph and submodules (and is returned).

    PassManager([SortChannelsPass(), FoldBatchNormPass(), EmitPass(["A", "B"])])(merged).graph_module
"""
from __future__ import annotations

import abc
from typing import Any, Iterable, Mapping, Sequence

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from pamfx.analysis.multitask_view import MultitaskView, read_multitask
from pamfx.codegen.emit import emit_view
from pamfx.errors import InputError
from pamfx.ir.task_set import TaskSet
from pamfx.passes.fold_batchnorm import batchnorms, fold_batchnorm, inference_view
from pamfx.passes.select_channels import select_from_view, sort_keep


def replace_contents(gm: fx.GraphModule, new: fx.GraphModule) -> fx.GraphModule:
    """Make ``gm`` hold ``new``'s submodules, graph and training flag (the in-place form of a pass)."""
    for name in list(gm._modules):
        delattr(gm, name)
    for name, module in new.named_children():
        gm.add_module(name, module)
    gm._parameters.clear()
    gm._buffers.clear()
    for name, p in new._parameters.items():
        gm.register_parameter(name, p)
    for name, b in new._buffers.items():
        gm.register_buffer(name, b)
    graph = fx.Graph()
    value, old_output = graph.graph_copy(new.graph, {}, return_output_node=True)
    graph.output(value).meta = dict(old_output.meta)
    gm.graph = graph
    gm.training = new.training
    return gm


class MultitaskPass(PassBase):
    """A pass over a merged network: the IR is read and checked once in ``requires``."""

    def __init__(self, *, inplace: bool = False):
        self.inplace = bool(inplace)
        self._view: MultitaskView | None = None

    def requires(self, graph_module: fx.GraphModule) -> None:
        self._view = read_multitask(graph_module)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        view = self._view if self._view is not None and self._view.gm is graph_module else read_multitask(graph_module)
        self._view = None
        result = self.transform(view)
        if self.inplace:
            result = replace_contents(graph_module, result)
        return PassResult(result, True)

    def ensures(self, graph_module: fx.GraphModule) -> None:
        """Nothing to check on the input: the result is checked where the pass returns it."""

    @abc.abstractmethod
    def transform(self, view: MultitaskView) -> fx.GraphModule:
        """The transformed network, built from the IR view of the input."""


class SortChannelsPass(MultitaskPass):
    """`pamfx.sort_channels`: every layer's channels ordered by task set, so each group is contiguous."""

    def transform(self, view: MultitaskView) -> fx.GraphModule:
        return select_from_view(view, sort_keep(view))


class SelectChannelsPass(MultitaskPass):
    """`pamfx.select_channels`: keep (and reorder) channels ``keep[layer]`` of the named layers."""

    def __init__(self, keep: Mapping[str, Sequence[int]], *, inplace: bool = False):
        super().__init__(inplace=inplace)
        if not isinstance(keep, Mapping):
            raise InputError(f"keep must map layer names to channel indices, got {type(keep).__name__}")
        self.keep = {name: list(idx) for name, idx in keep.items()}

    def transform(self, view: MultitaskView) -> fx.GraphModule:
        return select_from_view(view, self.keep)


class FoldBatchNormPass(MultitaskPass):
    """Fold every BatchNorm into the conv / linear that alone feeds it (inference only).

    `pamfx.passes.fold_batchnorm.fold_batchnorm`: torch's `torch.fx.experimental.optimization.fuse`
    on the merged graph (no re-trace), so the IR in ``node.meta`` stays; masked weights stay
    exactly 0 since folding scales rows.
    """

    def requires(self, graph_module: fx.GraphModule) -> None:
        super().requires(graph_module)
        training = [name for name, m in batchnorms(graph_module).items() if m.training]
        if training:
            raise InputError(f"FoldBatchNormPass folds inference BatchNorms; these are in training mode: {training}")

    def transform(self, view: MultitaskView) -> fx.GraphModule:
        return fold_batchnorm(view).gm


class EmitPass(MultitaskPass):
    """`pamfx.emit`: the standalone module of task combination ``tasks`` (same options: BatchNorms
    folded in eval mode unless ``fold_batchnorm=False``)."""

    def __init__(self, tasks: Iterable[str] | str | TaskSet, *, inplace: bool = False, fold_batchnorm: bool | None = None, **options: Any):
        super().__init__(inplace=inplace)
        self.tasks = tasks
        self.fold_batchnorm = fold_batchnorm
        self.options = options

    def transform(self, view: MultitaskView) -> fx.GraphModule:
        return emit_view(inference_view(view, self.fold_batchnorm), self.tasks, **self.options)
