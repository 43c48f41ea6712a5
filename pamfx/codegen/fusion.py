"""The cost model that plans an emitted dense op's calls (docs/design.md §6, docs/codegen.md).

An emitted dense op makes one conv / linear call per run of consecutive output groups (`emit`).
`FusionCostModel` predicts the time of one such call as

    time ≈ calls × per_call_s + batch × (inputs × per_input_s + flops / flops_per_s)

where ``inputs`` counts the input elements the call reads per sample (a conv's im2col volume:
input channels × kernel × output positions; a linear's input features) and ``flops`` its
multiply-accumulates × 2 per sample, both with channel counts rounded up to ``channel_block``:
oneDNN, which runs CPU convolutions, computes channels in blocks of the SIMD width (16 floats with
AVX-512, 8 with AVX2), so a conv of 17 → 17 channels costs about what 32 → 32 costs. The input term
is what makes many small calls slow on a CPU: every call re-reads (and re-lays-out) all the input
channels it reads. ``calls`` also counts a gather of input channels and a share of the final
concatenation. Channel-wise ops run once per layer whatever the plan, so they are not counted.

The constants come from `FusionCostModel.calibrate`, a micro-benchmark timed once per process,
batch size, thread count and memory format (cached); a user may pass their own model
(``per_input_s`` defaults to 0 and ``channel_block`` to 1: the plain calls-plus-FLOPs model).
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
    """Seconds per call, FLOPs per second, seconds per input element read, channel blocking."""

    per_call_s: float
    flops_per_s: float
    per_input_s: float = 0.0
    channel_block: int = 1

    def seconds(self, calls: int, inputs: int, flops: int, batch: int) -> float:
        """Predicted time of ``calls`` dense calls reading ``inputs`` elements and doing ``flops`` per sample."""
        return calls * self.per_call_s + batch * (inputs * self.per_input_s + flops / self.flops_per_s)

    def padded(self, channels: int) -> int:
        """``channels`` rounded up to a multiple of ``channel_block``: what a call computes."""
        return -(-channels // self.channel_block) * self.channel_block

    @staticmethod
    def calibrate(batch: int = 1, channels_last: bool = False) -> "FusionCostModel":
        """The constants measured on this CPU at ``batch`` samples, the current thread count and
        memory format (cached).

        ``channel_block`` is the SIMD width in floats of `torch.backends.cpu.get_cpu_capability`
        (16 for AVX-512, 8 for AVX2, else 1). Three 3×3 convs are timed (best of a few runs, under
        ``torch.no_grad``, weights from a private generator so that the global random state is left
        alone): a tiny one (one block → one block on 4×4 inputs) gives ``per_call_s``; a square one
        (64 → 64 on 16×16) and a thin one (64 → one block on 16×16) read the same inputs, so their
        difference gives ``flops_per_s``, and what the thin one takes beyond its call and FLOPs gives
        ``per_input_s``.
        """
        return _calibrated(batch, torch.get_num_threads(), channels_last)


def _channel_block() -> int:
    capability = torch.backends.cpu.get_cpu_capability()
    return 16 if capability.startswith("AVX512") else 8 if capability.startswith("AVX2") else 1


def _conv_seconds(in_channels: int, out_channels: int, size: int, batch: int, channels_last: bool,
                  generator: torch.Generator) -> tuple[float, int, int]:
    """Best time of one 3×3 conv call on ``batch`` samples, with its input elements and FLOPs per sample."""
    conv = nn.utils.skip_init(nn.Conv2d, in_channels, out_channels, 3, padding=1)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator))
        conv.to(memory_format=memory_format)
        x = torch.randn(batch, in_channels, size, size, generator=generator).contiguous(memory_format=memory_format)
        conv(x)
        samples = []
        for _ in range(_RUNS):
            start = time.perf_counter()
            conv(x)
            samples.append(time.perf_counter() - start)
    inputs = in_channels * 9 * size * size
    return min(samples), inputs, 2 * out_channels * inputs


@lru_cache(maxsize=None)
def _calibrated(batch: int, threads: int, channels_last: bool) -> FusionCostModel:
    """`FusionCostModel.calibrate`, keyed by the thread count that the timings depend on."""
    generator = torch.Generator().manual_seed(0)
    block = _channel_block()
    per_call, _, _ = _conv_seconds(block, block, 4, batch, channels_last, generator)
    thin, inputs, thin_flops = _conv_seconds(64, block, 16, batch, channels_last, generator)
    square, _, square_flops = _conv_seconds(64, 64, 16, batch, channels_last, generator)
    flops_per_s = batch * (square_flops - thin_flops) / max(square - thin, per_call)
    per_input = max(thin - per_call - batch * thin_flops / flops_per_s, 0.0) / (batch * inputs)
    return FusionCostModel(per_call_s=per_call, flops_per_s=flops_per_s, per_input_s=per_input, channel_block=block)
