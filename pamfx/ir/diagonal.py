"""The diagonal connection of a merged network: an identity shortcut restricted to allowed channels.

Channel ``src[k]`` of the source layer feeds channel ``dst[k]`` of the destination layer with
weight 1; every other destination channel receives 0. Merging replaces each identity shortcut by
one of these so that forbidden diagonal connections (τ_dst ⊄ τ_src) are absent (docs/design.md §2).
"""
from __future__ import annotations

import torch
from torch import nn


class DiagonalConnection(nn.Module):
    """Channel ``src[k]`` of the input feeds channel ``dst[k]`` of the output; other outputs are 0.

    The forward is one gather over the input with a zero channel prepended (``gather[d]`` is
    ``src + 1`` where ``d`` is some ``dst``, else 0), so it has no shape arithmetic and a merged
    network re-traces with torch.fx (`torch.fx.symbolic_trace`, `torch.fx.experimental.optimization.fuse`).
    """

    def __init__(self, src: torch.Tensor, dst: torch.Tensor, out_channels: int):
        super().__init__()
        if src.shape != dst.shape:
            raise ValueError(f"src and dst must pair up, got {tuple(src.shape)} and {tuple(dst.shape)}")
        self.register_buffer("src", src.to(torch.long))
        self.register_buffer("dst", dst.to(torch.long))
        self.out_channels = int(out_channels)
        gather = torch.zeros(self.out_channels, dtype=torch.long)
        gather[self.dst] = self.src + 1
        self.register_buffer("gather", gather)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = torch.cat([torch.zeros_like(x[:, :1]), x], 1)
        return padded.index_select(1, self.gather)

    def extra_repr(self) -> str:
        return f"pairs={self.src.numel()}, out_channels={self.out_channels}"
