"""The diagonal connection of a merged network: an identity shortcut restricted to allowed channels.

Channel ``src[k]`` of the source layer feeds channel ``dst[k]`` of the destination layer with
weight 1; every other destination channel receives 0. Merging replaces each identity shortcut by
one of these so that forbidden diagonal connections (τ_dst ⊄ τ_src) are absent (DESIGN.md §2).
"""
from __future__ import annotations

import torch
from torch import nn


class DiagonalConnection(nn.Module):
    def __init__(self, src: torch.Tensor, dst: torch.Tensor, out_channels: int):
        super().__init__()
        if src.shape != dst.shape:
            raise ValueError(f"src and dst must pair up, got {tuple(src.shape)} and {tuple(dst.shape)}")
        self.register_buffer("src", src.to(torch.long))
        self.register_buffer("dst", dst.to(torch.long))
        self.out_channels = int(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(x.shape[:1] + (self.out_channels,) + x.shape[2:])  # no list(): fx can re-trace it
        return out.index_copy(1, self.dst, x.index_select(1, self.src))

    def extra_repr(self) -> str:
        return f"pairs={self.src.numel()}, out_channels={self.out_channels}"
