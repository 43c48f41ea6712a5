"""Choose α on calibration data: PAM alone, for several α, scored by its matched-accuracy cost.

    python tools/alpha_sweep.py configs/lenet5-2tasks-p2.toml --alphas 0.1 0.3 0.6 --seeds 0

For each α, PAM (regroup, merge, fine-tune, prune) runs under the config's protocol, and the
selected checkpoint's *expected* FLOPs over the task combinations — chosen on the calibration
split, at the config's tolerance — is printed with every combination's FLOPs. No test data is
read for the choice (the test accuracies printed alongside are for information only). A shorter
pruning budget (``--rounds``) makes the sweep cheaper; α's ranking is what matters.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path

import torch

from pamfx.cli import load_config
from pamfx.experiment import run_comparison


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.3, 0.6])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rounds", type=int, help="pruning rounds per run (default: the config's)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = load_config(args.config)
    rows = []
    for alpha in args.alphas:
        config = dataclasses.replace(base, alpha=alpha, methods=["pam"], seeds=args.seeds, compare_unshared=False,
                                     prune_rounds=args.rounds or base.prune_rounds)
        runs = run_comparison(config, progress=False, log=lambda line: None)
        expected = [r.methods["pam"].trajectories["pam"].select(config.tolerance).expected_flops for r in runs]
        flops = {"&".join(runs[0].tasks.ordered_names(c)): statistics.fmean(r.methods["pam"].flops[c] for r in runs)
                 for c in runs[0].tasks.combinations()}
        matched = all(r.methods["pam"].matched for r in runs)
        rows.append((alpha, statistics.fmean(expected), flops, matched))
        print(f"alpha {alpha:5.2f}: expected {statistics.fmean(expected) / 1e6:.3f} MFLOPs at matched calibration "
              f"accuracy{'' if matched else ' (NOT matched on some seed)'}; "
              + ", ".join(f"{k} {v / 1e6:.3f}" for k, v in flops.items()), flush=True)
    best = min((r for r in rows if r[3]), key=lambda r: r[1], default=None)
    print(f"chosen alpha: {best[0]}" if best else "no alpha reached matched accuracy")


if __name__ == "__main__":
    main()
