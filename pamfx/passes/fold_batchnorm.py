"""Folding inference BatchNorms into the conv / linear before them, on a merged network (docs/design.md §6).

torch's `torch.fx.experimental.optimization.fuse` rewrites the graph without re-tracing (``no_trace``),
so every node keeps its ``node.meta`` and the result is again a merged network; folding scales the
rows of a weight, so masked weights stay exactly 0. Emitted modules, the run-time container and
ONNX export fold by default: a BatchNorm then costs nothing at run time.
"""
from __future__ import annotations

from torch import fx, nn
from torch.fx.experimental.optimization import fuse

from pamfx.analysis.multitask_view import MultitaskView, read_multitask
from pamfx.errors import InputError


def batchnorms(gm: fx.GraphModule) -> dict[str, nn.Module]:
    """The BatchNorm submodules of ``gm`` by qualified name."""
    return {name: m for name, m in gm.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def fold_batchnorm(view: MultitaskView) -> MultitaskView:
    """The view of a copy of ``view``'s network with every BatchNorm that alone reads a conv / linear
    folded into it; raises `InputError` naming the BatchNorms in training mode (their batch statistics
    cannot be folded)."""
    training = [name for name, m in batchnorms(view.gm).items() if m.training]
    if training:
        raise InputError(f"folding BatchNorm needs inference BatchNorms; these are in training mode: {training}")
    folded = fuse(view.gm, inplace=False, no_trace=True)
    folded.training = view.gm.training
    return read_multitask(folded)


def inference_view(view: MultitaskView, fold: bool | None = None) -> MultitaskView:
    """``view`` with its BatchNorms folded: always with ``fold=True``, never with ``False``, and with
    ``None`` where the network has BatchNorms and all are in eval mode (else the view as it is)."""
    if fold is None:
        norms = batchnorms(view.gm)
        fold = bool(norms) and not any(m.training for m in norms.values())
    return fold_batchnorm(view) if fold else view
