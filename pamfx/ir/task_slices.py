"""An op pamfx has no channel rule for, merged under ``unknown_ops="share"``.

Each task's own op runs on that task's channels of the input layer (or on the whole input X), and
the outputs are concatenated task by task: the merged network computes each original op exactly.
The layers it reads and writes are shared by all tasks, so every combination runs it whole.
"""
from __future__ import annotations

import torch
from torch import fx, nn


class TaskSlices(nn.Module):
    def __init__(self, ops: list[fx.GraphModule], in_widths: list[int] | None):
        super().__init__()
        self.ops = nn.ModuleList(ops)
        self.in_widths = None if in_widths is None else list(in_widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_widths is None:  # every task's op reads the whole input X
            return torch.cat([op(x) for op in self.ops], 1)
        outputs, start = [], 0
        for op, width in zip(self.ops, self.in_widths):
            outputs.append(op(x.narrow(1, start, width)))
            start += width
        return torch.cat(outputs, 1)

    def extra_repr(self) -> str:
        return f"tasks={len(self.ops)}, in_widths={self.in_widths}"
