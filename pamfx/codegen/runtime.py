"""A run-time container serving every task combination from one copy of the weights (docs/design.md §6)."""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import fx, nn

from pamfx.analysis.channel_order import group_orders
from pamfx.analysis.multitask_view import read_multitask
from pamfx.codegen.emit import emit_view
from pamfx.codegen.fusion import FusionCostModel
from pamfx.errors import InputError
from pamfx.frontend import example_from_meta
from pamfx.ir.meta import META_CONV_GROUPS
from pamfx.ir.task_set import TaskSet
from pamfx.passes.fold_batchnorm import inference_view
from pamfx.passes.select_channels import order_keep, select_from_view


class MultitaskRuntime(nn.Module):
    """Holds a merged (typically pruned) network and its 2^K − 1 specialised modules.

    The network is copied once, in eval mode, with its BatchNorms folded (``fold_batchnorm``, as in
    `pamfx.emit`), its channels reordered group by group in the layout codegen uses
    (`pamfx.order_channels` under the usage distribution ``usage``) and, for image inputs, its conv
    weights channels-last (activations follow, as in `pamfx.emit`); every specialisation is
    emitted with ``share_weights=True``, so its parameters are views into the network's: the memory
    is that of the one merged network, however many combinations have been served. Specialisations
    are emitted on first use (or all at once by `warm`). ``fuse`` and ``batch`` are passed to
    `emit` (a call whose rows are not one run of the merged weight stays per group;
    `fusion_report` says which).
    """

    def __init__(self, merged: fx.GraphModule, *, fuse: str | FusionCostModel = "auto", batch: int = 1,
                 fold_batchnorm: bool | None = None, usage: Mapping[TaskSet, float] | None = None):
        super().__init__()
        self.fuse, self.batch = fuse, batch
        view = read_multitask(merged)
        blocked = [node for node in merged.graph.nodes if META_CONV_GROUPS in node.meta]
        if blocked:
            raise InputError(f"MultitaskRuntime: node {blocked[0].name!r} ({blocked[0].target}) keeps its connections "
                             f"within blocks (a grouped conv, or a layer merged with cross_origin absent), whose "
                             f"weights cannot be views of one copy; use pamfx.emit per combination")
        ordered = select_from_view(view, order_keep(view, group_orders(view, usage))).eval()
        self._view = inference_view(read_multitask(ordered), fold_batchnorm)  # read and checked once, for every combination
        self.network = self._view.gm
        self.channels_last = example_from_meta(self.network).dim() == 4
        if self.channels_last:  # conv weights stored channels-last once: their slices stay views
            self.network.to(memory_format=torch.channels_last)
        self.tasks = self._view.tasks
        self._specialised: dict[TaskSet, fx.GraphModule] = {}

    def module(self, tasks: Iterable[str] | str | TaskSet) -> fx.GraphModule:
        """The specialised module of one task combination."""
        combo = self.tasks.select(tasks)
        if combo not in self._specialised:
            self._specialised[combo] = emit_view(
                self._view, combo, share_weights=True, fuse=self.fuse, batch=self.batch, channels_last=self.channels_last
            ).eval()
        return self._specialised[combo]

    def warm(self) -> "MultitaskRuntime":
        """Emit every combination now."""
        for combo in self.tasks.combinations():
            self.module(combo)
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor, tasks: Iterable[str] | str | TaskSet | None = None) -> dict[str, torch.Tensor]:
        return self.module(tasks)(x)

    def storage_bytes(self) -> int:
        """Bytes of distinct tensor storage behind the network and every emitted specialisation."""
        seen: dict[int, int] = {}
        holders = [self.network, *self._specialised.values()]
        for holder in holders:
            for t in list(holder.parameters()) + list(holder.buffers()):
                storage = t.untyped_storage()
                seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return sum(seen.values())
