"""Transforms of fx graphs: merge, channel selection, fine-tuning, pruning, and the
`torch.fx.passes.infra` wrappers of `pamfx.passes.infra` (``pamfx.passes.SortChannelsPass()``...)."""
from __future__ import annotations

from typing import Any

_INFRA = ("EmitPass", "FoldBatchNormPass", "MultitaskPass", "SelectChannelsPass", "SortChannelsPass")


def __getattr__(name: str) -> Any:
    # imported lazily: pamfx.passes.infra needs pamfx.codegen, which itself imports pamfx.passes.module_surgery
    if name in _INFRA:
        from pamfx.passes import infra

        return getattr(infra, name)
    raise AttributeError(f"module 'pamfx.passes' has no attribute {name!r}")


__all__ = list(_INFRA)
