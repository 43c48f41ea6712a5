"""Merge two copies of torchvision architectures and check pamfx is exact on them; time and memory.

For each architecture: two copies with different random weights (and BatchNorm statistics) and
head sizes, input 1x3x64x64. Checks that the "origin" grouping reproduces each original (relative
error <= 1e-4), and that under a random grouping every combination's emitted module equals the
merged network and `pamfx.cost` equals FlopCounterMode. Prints one row per architecture: seconds
to organise / merge / emit all combinations, and the peak resident memory of the process that
ran it (each architecture runs in a fresh child process).

    python tools/bench_architectures.py [ARCH ...] [--groupings N]

Needs torchvision. EfficientNet's `torchvision.ops.stochastic_depth` is taught to pamfx here with
`pamfx.register_channel_rule` (it scales whole samples: channel-wise).
"""
from __future__ import annotations

import argparse
import multiprocessing
import resource
import time
from concurrent.futures import ProcessPoolExecutor

import torch
from torch.utils.flop_counter import FlopCounterMode

import pamfx

ARCHITECTURES = ["mobilenet_v3_small", "efficientnet_b0", "densenet121", "googlenet", "resnext50_32x4d", "regnet_x_400mf"]
TOLERANCE = 1e-4


def build(name: str, classes: int, seed: int) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(seed)
    extra = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = getattr(torchvision.models, name)(weights=None, num_classes=classes, **extra)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():  # informative BatchNorm statistics: every channel matters in eval mode
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).abs().max() / reference.abs().max()).item()


def flop_counter(module: torch.nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(x)
    return counter.get_total_flops()


def check(name: str, groupings: int) -> dict:
    import torchvision

    pamfx.register_channel_rule(torchvision.ops.stochastic_depth)(lambda op: op.channelwise())
    torch.set_num_threads(1)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    models = {"A": build(name, 5, 1), "B": build(name, 3, 2)}
    row: dict = {"arch": name}
    try:
        start = time.perf_counter()
        layers = pamfx.organise_layers(models, x)
        row["organise_s"] = time.perf_counter() - start
        start = time.perf_counter()
        merged = pamfx.merge(models, x, "origin", layers=layers).eval()
        row["merge_s"] = time.perf_counter() - start
        with torch.no_grad():
            out = merged(x)
            row["origin_rel_err"] = max(relative_error(out[t], m(x)) for t, m in models.items())
        worst_emit, flops_ok, start = 0.0, True, time.perf_counter()
        for seed in range(groupings):
            grouped = pamfx.merge(models, x, pamfx.Grouping.random(layers, seed=seed), layers=layers).eval()
            with torch.no_grad():
                reference = grouped(x)
            for combo in layers.tasks.combinations():
                emitted = pamfx.emit(grouped, combo).eval()
                with torch.no_grad():
                    value = emitted(x)
                worst_emit = max(worst_emit, *(relative_error(value[t], reference[t]) for t in value))
                flops_ok &= pamfx.cost(grouped, combo).flops == flop_counter(emitted, x)
        row.update(emit_s=time.perf_counter() - start, emit_rel_err=worst_emit, cost_equals_flopcounter=flops_ok)
        row["layers"] = len(layers)
        row["exact"] = row["origin_rel_err"] <= TOLERANCE and worst_emit <= TOLERANCE and flops_ok
    except pamfx.PamfxError as exc:
        row["refused"] = f"{type(exc).__name__}: {exc}"
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arch", nargs="*", default=ARCHITECTURES)
    parser.add_argument("--groupings", type=int, default=1, help="random groupings per architecture")
    args = parser.parse_args()
    context = multiprocessing.get_context("fork")  # a fresh process per architecture: its own peak memory
    print(f"{'architecture':20} {'layers':>6} {'organise s':>10} {'merge s':>8} {'emit s':>8} "
          f"{'origin err':>10} {'emit err':>9} {'cost=FC':>7} {'peak MiB':>8}")
    for name in args.arch:
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            row = pool.submit(check, name, args.groupings).result()
        if "refused" in row:
            print(f"{name:20} refused: {row['refused'][:200]}  (peak {row['peak_rss_mib']:.0f} MiB)")
            continue
        print(f"{name:20} {row['layers']:6d} {row['organise_s']:10.2f} {row['merge_s']:8.2f} {row['emit_s']:8.2f} "
              f"{row['origin_rel_err']:10.1e} {row['emit_rel_err']:9.1e} {str(row['cost_equals_flopcounter']):>7} "
              f"{row['peak_rss_mib']:8.0f}")


if __name__ == "__main__":
    main()
