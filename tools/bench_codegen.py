"""Benchmark of codegen: emitted modules per task combination against the masked merged network.

Run ``python tools/bench_codegen.py`` (options ``--repeats``, ``--warmup``, ``--batch``,
``--threads``, ``--seed``, ``--scale``, ``--ks``). For K = 2 and K = 5 (``--ks``) VGG-style networks
(`build_model("vgg", ...)`, input 1×32×32, widths 1.0, 0.5, 0.75, 0.625, 0.875 × ``--scale`` ×
the base width, random weights and BatchNorm statistics) merged under ``Grouping.random``, and for
every task combination S, it prints:

- FLOPs(S): `pamfx.cost(merged, S).flops`, per sample — the subgraph's edges only;
- FLOP x = FLOPs merged / FLOPs(S): the ideal speed-up, where FLOPs merged is what the merged
  GraphModule executes per sample (FlopCounterMode: every channel of every task, masked zeros
  included — the same for every S, since it always runs all tasks);
- time (median CPU time of the thread, `pamfx.latency.interleaved_medians`, over ``--repeats`` runs at
  ``--batch`` samples, after warm-up, under
  ``torch.no_grad``, eval mode, ``torch.set_num_threads(--threads)``) of the merged network, of
  ``pamfx.emit(merged, S, batch=--batch)`` (the default fast form: BatchNorm folded, one tensor per
  layer, calls planned by the calibrated cost model), of the exact form ``pamfx.emit(merged, S,
  fuse="never", fold_batchnorm=False)`` and of the shared-weight runtime's module
  ``pamfx.MultitaskRuntime(merged, batch=--batch).module(S)``; speed-up = t merged / t module, and
  for the fast form also speed-up / FLOP x (the target: ≥ 0.75), its conv / linear calls and the
  FLOPs it executes. The modules are timed interleaved, run by run (order rotated), and on the
  thread's CPU clock, so that load on the machine affects them alike and little. Outputs are checked against the merged network before timing. The cost
  model's constants (`FusionCostModel.calibrate`) are printed first; the closing summary gives the
  median and worst combination per K, and the fast form's speed-up over the merged network with
  its BatchNorms folded and channels-last too (``pamfx.passes.FoldBatchNormPass``, ``.to(
  memory_format=torch.channels_last)``), which separates what those give from what the
  specialisation gives.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pamfx  # noqa: E402
from pamfx.codegen.emit import fusion_report  # noqa: E402
from pamfx.codegen.fusion import FusionCostModel  # noqa: E402
from pamfx.latency import interleaved_medians  # noqa: E402
from pamfx.passes import FoldBatchNormPass  # noqa: E402
from pamfx.zoo.models import build_model  # noqa: E402

TASK_NAMES = "ABCDE"
WIDTHS = (1.0, 0.5, 0.75, 0.625, 0.875)
INPUT_SIZE = 32


def merged_vgg(k: int, seed: int, scale: float) -> fx.GraphModule:
    """K VGG-style networks of differing widths merged under a random grouping, in eval mode."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    models = {}
    for i in range(k):
        model = build_model("vgg", 2 + i, 1, INPUT_SIZE, scale * WIDTHS[i]).eval()
        for m in model.modules():  # non-trivial BatchNorm statistics, so that folding them matters
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=generator) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
        models[TASK_NAMES[i]] = model
    x = torch.randn(1, 1, INPUT_SIZE, INPUT_SIZE)
    layers = pamfx.organise_layers(models, x)
    return pamfx.merge(models, x, pamfx.Grouping.random(layers, seed=seed), layers=layers).eval()


class ChannelsLast(nn.Module):
    """``module`` with its convs' weights and its input channels-last: the merged network given the
    same treatment as the emitted modules (with its BatchNorms folded), so that the speed-up over it
    is what specialisation alone gives."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.module(x.contiguous(memory_format=torch.channels_last))


def executed_flops(module: Callable, x: torch.Tensor) -> int:
    """FLOPs per sample that ``module`` executes on ``x`` (FlopCounterMode: 2 × MACs of conv / linear)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(x)
    return counter.get_total_flops() // x.shape[0]


def dense_ops(gm: fx.GraphModule) -> int:
    """How many conv / linear calls one forward of ``gm`` makes."""
    return sum(
        1 for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), (nn.Conv2d, nn.Linear))
    )


def check_outputs(merged: fx.GraphModule, modules: dict[str, Callable], x: torch.Tensor, tasks: list[str]) -> None:
    with torch.no_grad():
        reference = merged(x)
        for name, module in modules.items():
            out = module(x)
            if list(out) != tasks or any(not torch.allclose(out[t], reference[t], atol=1e-4) for t in tasks):
                raise SystemExit(f"{name} module of {'&'.join(tasks)} disagrees with the merged network")


def bench(k: int, args: argparse.Namespace) -> dict[str, list[float]]:
    """Print the table of one K; return the speed-ups of every combination."""
    merged = merged_vgg(k, args.seed, args.scale)
    folded = ChannelsLast(FoldBatchNormPass()(merged).graph_module.eval())
    tasks = pamfx.read_multitask(merged).tasks
    runtime = pamfx.MultitaskRuntime(merged, batch=args.batch)
    x = torch.randn(args.batch, 1, INPUT_SIZE, INPUT_SIZE, generator=torch.Generator().manual_seed(args.seed))
    check_outputs(merged, {"BatchNorm-folded merged": folded}, x, list(tasks.names))
    dense = executed_flops(merged, x[:1])
    widths = [rec.width for rec in pamfx.read_multitask(merged).records.values()]
    print(f"\nK = {k}: merged network: {dense_ops(merged)} conv/linear calls, layer widths {widths}, "
          f"grouping Grouping.random(seed={args.seed}); executes {dense / 1e6:.2f} MFLOPs/sample, "
          f"all-task subgraph (pamfx.cost) {pamfx.cost(merged).flops / 1e6:.2f} MFLOPs/sample")
    header = (f"{'combination':<12} {'FLOPs(S)':>9} {'FLOP x':>6} | {'t merged':>9} | {'ops':>4} {'fused':>5} {'FLOPs':>7} "
              f"{'t fast':>9} {'speed-up':>8} {'/FLOP x':>7} | {'ops':>4} {'t exact':>9} {'speed-up':>8} | "
              f"{'ops':>4} {'t runtime':>9} {'speed-up':>8}")
    print(header)
    print(f"{'':<12} {'MFLOP':>9} {'':>6} | {'ms':>9} | {'':>4} {'':>5} {'MFLOP':>7} {'ms':>9} {'':>8} {'':>7} | "
          f"{'':>4} {'ms':>9} {'':>8} | {'':>4} {'ms':>9} {'':>8}")
    print("-" * len(header))
    speedups: dict[str, list[float]] = {"fast": [], "exact": [], "runtime": [], "flops": [], "ratio": [], "folded": []}
    for combo in tasks.combinations():
        names = tasks.ordered_names(combo)
        modules = {
            "merged": merged,
            "folded": folded,
            "fast": pamfx.emit(merged, combo, batch=args.batch).eval(),
            "exact": pamfx.emit(merged, combo, fuse="never", fold_batchnorm=False).eval(),
            "runtime": runtime.module(combo),
        }
        check_outputs(merged, {n: m for n, m in modules.items() if n not in ("merged", "folded")}, x, names)
        with torch.no_grad():
            t = interleaved_medians({name: (lambda m: lambda: m(x))(m) for name, m in modules.items()},
                                    args.repeats, args.warmup, clock=time.thread_time)
        flops = pamfx.cost(merged, combo).flops
        row = {name: t["merged"] / t[name] for name in ("fast", "exact", "runtime")} | {"flops": dense / flops}
        row["ratio"] = row["fast"] / row["flops"]
        row["folded"] = t["folded"] / t["fast"]
        for key, value in row.items():
            speedups[key].append(value)
        fast = modules["fast"]
        print(f"{tasks.label(combo):<12} {flops / 1e6:>9.2f} {row['flops']:>6.2f} | {t['merged'] * 1e3:>9.3f} | "
              f"{dense_ops(fast):>4} {len(fusion_report(fast)):>5} {pamfx.cost(fast).flops / 1e6:>7.2f} "
              f"{t['fast'] * 1e3:>9.3f} {row['fast']:>7.2f}x {row['ratio']:>7.2f} | "
              f"{dense_ops(modules['exact']):>4} {t['exact'] * 1e3:>9.3f} {row['exact']:>7.2f}x | "
              f"{dense_ops(modules['runtime']):>4} {t['runtime'] * 1e3:>9.3f} {row['runtime']:>7.2f}x")
    return speedups


def describe(values: list[float], unit: str = "x") -> str:
    return f"median {statistics.median(values):.2f}{unit}, min {min(values):.2f}{unit}, max {max(values):.2f}{unit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per module and combination")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per module first")
    parser.add_argument("--batch", type=int, default=8, help="samples per forward")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, the grouping and the input")
    parser.add_argument("--scale", type=float, default=2.0, help="width multiplier of every network")
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 5], choices=range(2, 6), help="numbers of networks merged")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch}, input 1x{INPUT_SIZE}x{INPUT_SIZE}, "
          f"median of {args.repeats} runs after {args.warmup} warm-up runs; FLOPs = 2 x MACs of conv/linear per sample")
    print("FLOP x = FLOPs merged / FLOPs(S) (the ideal speed-up); ops = conv/linear calls per forward; "
          "speed-up = t merged / t module; /FLOP x = speed-up / FLOP x (target >= 0.75); fused = calls the cost model "
          "fused (masked zeros or several groups); FLOPs = what the fast module executes per sample")
    model = FusionCostModel.calibrate(args.batch, channels_last=True)
    print(f"cost model (FusionCostModel.calibrate({args.batch}, channels_last=True)): channel_block {model.channel_block}, per_call_s {model.per_call_s * 1e6:.1f} us, "
          f"flops_per_s {model.flops_per_s / 1e9:.1f} GFLOP/s, per_input_s {model.per_input_s * 1e9:.3f} ns")
    start = time.perf_counter()
    summary = {k: bench(k, args) for k in args.ks}
    print()
    for k, s in summary.items():
        worst = min(range(len(s["ratio"])), key=s["ratio"].__getitem__)
        print(f"K = {k}: fast vs merged {describe(s['fast'])}; FLOP ratio {describe(s['flops'])}; "
              f"speed-up / FLOP ratio {describe(s['ratio'], '')} (worst: {s['fast'][worst]:.2f}x against {s['flops'][worst]:.2f}x); "
              f"{sum(r >= 0.75 for r in s['ratio'])}/{len(s['ratio'])} combinations within 25 %")
        print(f"        exact vs merged {describe(s['exact'])}; runtime vs merged {describe(s['runtime'])}; "
              f"fast vs merged folded and channels-last {describe(s['folded'])}, / FLOP ratio "
              f"{describe([a / b for a, b in zip(s['folded'], s['flops'])], '')}")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
