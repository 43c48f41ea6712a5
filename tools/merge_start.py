"""PAM's merged network *before* pruning, for several α: can it be matched at all?

    python tools/merge_start.py configs/lenet5-2tasks-p2.toml --alphas 0.1 0.3 1.0 --seeds 0 1 2

The matched-accuracy protocol (docs/pruning.md) holds every task of a pruned network within the
tolerance of its unpruned single-task network. A merged network that is already below that after
merging and the fine-tune every method gets cannot be matched unless the fine-tunes between pruning
rounds bring it back. For each seed and α this regroups (Alg. 4/5 on the config's calibration
samples), merges, fine-tunes exactly as `pamfx run` does, and prints the merged network's expected
FLOPs, its sharing ratio per layer and every task's calibration accuracy minus the single-task
reference (points), the α a config with ``alpha = [...]`` would choose (`pamfx.experiment.choose_alpha`),
then the mean ± std over seeds per α. Calibration data only; single-task
networks come from the cache (``$PAMFX_CACHE``) when `pamfx run` trained them before.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path

import torch

from pamfx.cli import load_config
from pamfx.experiment import choose_alpha, pam_start, seed_setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.05, 0.1, 0.3, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", help="default: the config's seeds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = dataclasses.replace(load_config(args.config), alpha=args.alphas, compare_unshared=False)
    per_alpha: dict[float, list[dict]] = {a: [] for a in args.alphas}
    for seed in args.seeds or config.seeds:
        _, points, _ = pam_start(config, seed_setup(config, seed, progress=False), seed, progress=False)
        for point in points:
            record = {"alpha": point.alpha, "expected_mflops": point.expected_flops / 1e6, "sharing": point.sharing,
                      "gap": {t: 100 * g for t, g in point.gap.items()}}
            per_alpha[point.alpha].append(record)
            sharing = " ".join(f"{k} {v:.2f}" for k, v in record["sharing"].items())
            gaps = " ".join(f"{t} {g:+.2f}" for t, g in record["gap"].items())
            print(f"seed {seed}  alpha {record['alpha']:<5}  expected {record['expected_mflops']:.2f} MFLOPs  "
                  f"sharing {sharing}  calibration gap (points) {gaps}", flush=True)
        print(f"seed {seed}  chosen (alpha = a list in a config): {choose_alpha(points, config.tolerance).alpha:g}")
    print(f"\nmean ± std over seeds; tolerance {100 * config.tolerance:.2f} points")
    for alpha, records in per_alpha.items():
        tasks = list(records[0]["gap"])
        gaps = ", ".join(f"{t} {statistics.fmean(r['gap'][t] for r in records):+.2f} ± "
                         f"{statistics.pstdev(r['gap'][t] for r in records):.2f}" for t in tasks)
        worst = sum(min(r["gap"].values()) < -100 * config.tolerance for r in records)
        print(f"alpha {alpha:<5}  expected {statistics.fmean(r['expected_mflops'] for r in records):.2f} MFLOPs  "
              f"gap {gaps}  below the tolerance on {worst}/{len(records)} seeds")


if __name__ == "__main__":
    main()
