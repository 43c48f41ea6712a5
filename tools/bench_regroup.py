"""Benchmark of the regrouping greedy: one layer of 512 + 512 GAP neurons, N = 1000.

Run ``python tools/bench_regroup.py``. The layer is synthetic but shaped like the real thing: each
neuron is the global average pool of a 4×4 ReLU map driven by the network's own 5 binary
attributes (half of each network's neurons also by the other task's attributes), plus noise. The
script times the fast path (`regroup_features`, defaults: lazy re-scoring, float32) to the end of
both greedies of Algorithm 4 with α_max chosen to place about half the neurons in exclusive groups,
then times the plain reference — one candidate at a time, the set's MI recomputed from scratch, an
exact greedy — on a sample of candidates at a sub-range of steps and extrapolates it to the steps
the greedy took (stated as an extrapolation in the output). ``--check-steps K`` also runs the exact
fast greedy (``refresh_every=1``) for K steps and reports how often the lazy greedy agreed.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pamfx.analysis.mutual_information import (  # noqa: E402
    MIEstimator,
    as_feature_tensor,
    estimate_mi,
    label_columns,
    normalise_features,
)
from pamfx.analysis.regroup import DEFAULT_ALPHA, RunningKernel, greedy_order, regroup_features  # noqa: E402
from pamfx.ir.task_set import TaskSpace  # noqa: E402


def gap_layer(n: int = 1000, width: int = 512, attributes: int = 5, positions: int = 16, seed: int = 0):
    """Synthetic GAP features of two single-task conv networks and their 5-attribute labels."""
    rng = np.random.default_rng(seed)
    labels = {t: rng.integers(0, 2, (n, attributes)) for t in ("A", "B")}
    centred = {t: y - 0.5 for t, y in labels.items()}
    columns = []
    for own, other in (("A", "B"), ("B", "A")):
        for j in range(width):
            pre = np.zeros(n)
            for source in (own, other) if j % 2 else (own,):
                weights = np.zeros(attributes)
                weights[rng.choice(attributes, rng.integers(1, 3), replace=False)] = rng.normal(0, 2, 1)
                pre = pre + centred[source] @ weights
            maps = pre[:, None] + rng.normal(0, 1.0, (n, positions)) + rng.normal(0, 0.5)
            columns.append(np.maximum(maps, 0.0).mean(axis=1))
    return np.stack(columns, axis=1), labels


def reference_seconds_per_candidate(features, target, steps, samples: int, order) -> np.ndarray:
    """Seconds to score one candidate from scratch at each step in ``steps`` (set = the greedy's prefix)."""
    out = []
    rest = [j for j in range(features.shape[1]) if j not in set(order)]
    for step in steps:
        prefix = list(order[:step])
        start = time.perf_counter()
        for j in rest[:samples]:
            estimate_mi(features[:, prefix + [j]], target)
        out.append((time.perf_counter() - start) / samples)
    return np.asarray(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--width", type=int, default=512, help="neurons per network")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="relative α_max")
    parser.add_argument("--check-steps", type=int, default=0, help="exact fast steps to compare the lazy greedy with")
    args = parser.parse_args()

    features, labels = gap_layer(args.samples, args.width)
    space = TaskSpace(("A", "B"))
    total = features.shape[1]
    print(f"layer: {args.width} + {args.width} GAP neurons, N = {args.samples}, 5 binary attributes per task; "
          f"torch threads: {torch.get_num_threads()}; load average before: {os.getloadavg()[0]:.2f}")

    start = time.perf_counter()
    layer = regroup_features(features, space, labels, alpha=args.alpha)
    fast_seconds = time.perf_counter() - start
    task_sets, traces = layer.assign(args.alpha)
    placed = sum(t != space.all for t in task_sets)
    steps = {t.label: len(t.order) for t in traces}
    print(f"fast path (lazy, float32), both greedies of Alg. 4 to relative alpha_max = {args.alpha}: "
          f"{fast_seconds:.1f} s")
    print(f"  greedy steps: {steps}; candidate sets scored: { {t.label: t.evaluations for t in traces} }; "
          f"placed in exclusive groups: {placed} of {total}; groups: { {space.label(m): task_sets.count(m) for m in (1, 2, 3)} }")

    # The reference: an exact greedy scoring every remaining candidate from scratch at every step.
    probe = [0, 64, 128, 192, 255]
    sample = 4
    reference_total = 0.0
    for trace in traces:
        target = labels[trace.against]
        taken = len(trace.order)
        at = [s for s in probe if s < taken] or [0]
        per_candidate = reference_seconds_per_candidate(features, target, at, sample, trace.order)
        fit = np.polyfit(at, per_candidate, 1) if len(at) > 1 else np.array([0.0, per_candidate[0]])
        reference_total += sum(np.polyval(fit, s) * (total - s) for s in range(taken))
        print(f"  reference, greedy {trace.label}: {', '.join(f'{c * 1e3:.0f} ms' for c in per_candidate)} per "
              f"candidate at steps {at} ({sample} candidates each)")
    print(f"reference (extrapolated from those timings to {sum(steps.values())} steps x every remaining candidate): "
          f"{reference_total:.0f} s = {reference_total / 3600:.2f} h")
    print(f"speed-up of the fast path over the reference: {reference_total / fast_seconds:.0f}x (extrapolated)")

    # The exact fast greedy on a sub-range: engine speed-up alone, and agreement with the lazy one.
    normalised = normalise_features(as_feature_tensor(features))
    target = label_columns(labels["B"]).in_form("per_attribute")
    kernel = RunningKernel(normalised, target, MIEstimator(), MIEstimator().sigma2)
    exact_steps = max(args.check_steps, 2)
    start = time.perf_counter()
    exact_order, _ = greedy_order(kernel, range(total), math.inf, refresh_every=1, max_steps=exact_steps)
    exact_seconds = (time.perf_counter() - start) / exact_steps
    print(f"exact fast greedy (refresh_every=1): {exact_seconds:.1f} s per step at {total} candidates "
          f"({exact_seconds / total * 1e3:.2f} ms per candidate); the whole layer would take about "
          f"{exact_seconds * sum((total - s) / total for tr in traces for s in range(len(tr.order))):.0f} s "
          f"(extrapolated)")
    if args.check_steps:
        lazy_order = traces[0].order[: len(exact_order)]
        agree = sum(a == b for a, b in zip(lazy_order, exact_order))
        print(f"lazy vs exact greedy A, first {len(exact_order)} steps: {agree} identical picks, "
              f"{len(set(lazy_order) & set(exact_order))} common neurons")


if __name__ == "__main__":
    main()
