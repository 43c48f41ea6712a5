"""When to fuse a dense op's per-group calls into one masked dense call (docs/design.md §6).

An emitted dense op normally makes one conv / linear call per active output group, so it
multiplies no masked zero. Fused, it makes one call over all active rows and columns of the
merged weight, masked zeros included. `FusionCostModel` predicts the time of either choice as

    time ≈ calls × per_call_s + batch × (inputs × per_input_s + flops / flops_per_s)

where ``inputs`` counts the input elements the calls read per sample, each call its own
(a conv's im2col volume: input channels × kernel × output positions; a linear's input features)
and ``flops`` the multiply-accumulates × 2 per sample. The input term is what makes many small
calls slow on a CPU: every output group's call re-reads (and re-lays-out) all the input groups it
is allowed to read. Concatenations, slices and channel-wise ops are not counted.
`emit(..., fuse="auto")` fuses where the fused prediction is lower. The constants come from
`FusionCostModel.calibrate`, a micro-benchmark timed once per process, batch size and thread
count; a user may pass their own model (``per_input_s`` defaults to 0: the plain
calls-plus-FLOPs model).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

_RUNS = 15


@dataclass(frozen=True)
class FusionCostModel:
    """Seconds per conv / linear call, FLOPs per second, and seconds per input element read."""

    per_call_s: float
    flops_per_s: float
    per_input_s: float = 0.0

    def seconds(self, calls: int, inputs: int, flops: int, batch: int) -> float:
        """Predicted time of ``calls`` dense calls reading ``inputs`` elements and doing ``flops`` per sample."""
        return calls * self.per_call_s + batch * (inputs * self.per_input_s + flops / self.flops_per_s)

    @staticmethod
    def calibrate(batch: int = 1) -> "FusionCostModel":
        """The constants measured on this CPU at ``batch`` samples and the current thread count (cached).

        Three 3×3 convs are timed (best of a few runs, under ``torch.no_grad``, weights from a
        private generator so that the global random state is left alone): a tiny one (2→2
        channels on 4×4 inputs) gives ``per_call_s``; a square one (64→64 on 16×16) and a thin
        one (64→2 on 16×16) read the same inputs, so their difference gives ``flops_per_s``, and
        what the thin one takes beyond its call and FLOPs gives ``per_input_s``.
        """
        return _calibrated(batch, torch.get_num_threads())


def _conv_seconds(in_channels: int, out_channels: int, size: int, batch: int, generator: torch.Generator) -> tuple[float, int, int]:
    """Best time of one 3×3 conv call on ``batch`` samples, with its input elements and FLOPs per sample."""
    conv = nn.utils.skip_init(nn.Conv2d, in_channels, out_channels, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator))
        x = torch.randn(batch, in_channels, size, size, generator=generator)
        conv(x)
        samples = []
        for _ in range(_RUNS):
            start = time.perf_counter()
            conv(x)
            samples.append(time.perf_counter() - start)
    inputs = in_channels * 9 * size * size
    return min(samples), inputs, 2 * out_channels * inputs


@lru_cache(maxsize=None)
def _calibrated(batch: int, threads: int) -> FusionCostModel:
    """`FusionCostModel.calibrate`, keyed by the thread count that the timings depend on."""
    generator = torch.Generator().manual_seed(0)
    per_call, _, _ = _conv_seconds(2, 2, 4, batch, generator)
    thin, inputs, thin_flops = _conv_seconds(64, 2, 16, batch, generator)
    square, _, square_flops = _conv_seconds(64, 64, 16, batch, generator)
    flops_per_s = batch * (square_flops - thin_flops) / max(square - thin, per_call)
    per_input = max(thin - per_call - batch * thin_flops / flops_per_s, 0.0) / (batch * inputs)
    return FusionCostModel(per_call_s=per_call, flops_per_s=flops_per_s, per_input_s=per_input)
