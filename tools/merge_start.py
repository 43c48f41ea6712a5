"""PAM's merged network *before* pruning, for several α: can it be matched at all?

    python tools/merge_start.py configs/lenet5-2tasks-p2.toml --alphas 0.1 0.3 1.0 --seeds 0 1 2

The matched-accuracy protocol (docs/pruning.md) holds every task of a pruned network within the
tolerance of its unpruned single-task network. A merged network that is already below that after
merging and the fine-tune every method gets cannot be matched unless the fine-tunes between pruning
rounds bring it back. For each seed and α this regroups (Alg. 4/5 on the config's calibration
samples), merges, fine-tunes exactly as `pamfx run` does, and prints the merged network's expected
FLOPs, its sharing ratio per layer and every task's calibration accuracy minus the single-task
reference (points), then the mean ± std over seeds per α. Calibration data only; single-task
networks come from the cache (``$PAMFX_CACHE``) when `pamfx run` trained them before.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from pamfx.analysis.cost import merged_cost
from pamfx.analysis.layer_matching import organise_layers
from pamfx.analysis.multitask_view import read_multitask
from pamfx.analysis.regroup import regroup
from pamfx.cli import load_config
from pamfx.experiment import ExperimentConfig, _loader, _parse_weights, seed_setup
from pamfx.passes.finetune import finetune, multilabel_loss
from pamfx.passes.merge import merge
from pamfx.zoo.train import evaluate_multitask


def start_points(config: ExperimentConfig, seed: int, alphas: list[float]) -> list[dict]:
    """One record per α: expected FLOPs, sharing ratio per layer and accuracy gap per task."""
    setup = seed_setup(config, seed, progress=False)
    data, label_map, models, reference, example = (setup.data, setup.label_map, setup.models, setup.calib_reference,
                                                   setup.example)
    n = min(config.regroup_samples, len(data.calib))
    layers = organise_layers(models, example)
    result = regroup(layers, data.calib.images[:n], {t: data.calib.labels[:n, label_map[t]] for t in label_map},
                     alpha=alphas[0], alphas=alphas[1:], relative=config.relative_alpha, variant=config.regroup_variant,
                     progress=False)
    groupings = [result.grouping, *result.groupings]
    records = []
    for alpha, grouping in zip(alphas, groupings):
        merged = merge(models, example, grouping, layers=layers)
        finetune(merged, _loader(data.train, config.batch_size, seed), multilabel_loss(label_map),
                 epochs=config.finetune_epochs, lr=config.finetune_lr, seed=seed, schedule=config.finetune_schedule,
                 progress=False)
        view = read_multitask(merged)
        weights = _parse_weights(view.tasks, config.combination_weights)
        accuracy = evaluate_multitask(merged, data.calib, label_map)
        records.append({
            "alpha": alpha,
            "expected_mflops": sum(w * merged_cost(view, c).flops for c, w in weights.items()) / 1e6,
            "sharing": {name: view.grouping().sharing_ratio(name) for name in view.grouping().layer_names},
            "gap": {t: 100 * (accuracy[t] - reference[t]) for t in label_map},
        })
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", help="default: the config's seeds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_config(args.config)
    per_alpha: dict[float, list[dict]] = {a: [] for a in args.alphas}
    for seed in args.seeds or config.seeds:
        for record in start_points(config, seed, args.alphas):
            per_alpha[record["alpha"]].append(record)
            sharing = " ".join(f"{k} {v:.2f}" for k, v in record["sharing"].items())
            gaps = " ".join(f"{t} {g:+.2f}" for t, g in record["gap"].items())
            print(f"seed {seed}  alpha {record['alpha']:<5}  expected {record['expected_mflops']:.2f} MFLOPs  "
                  f"sharing {sharing}  calibration gap (points) {gaps}", flush=True)
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
