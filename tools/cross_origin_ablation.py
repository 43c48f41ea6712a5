"""Are PAM's cross-origin connections needed? Remove them from the pruned network and measure.

    python tools/cross_origin_ablation.py configs/lenet5-2tasks-p2.toml --seeds 0 1 2

Merging (Sec. 4.5.1 step 4) connects a shared group's channels of different origin networks
densely; those connections start at 0 and are trained by the fine-tunes. A shared block therefore
costs up to K² times one network's, and `pamfx.analysis.cost.cross_origin_flops` shows how much of a
pruned network's FLOPs stay on them. Before building a structured option that keeps such blocks
absent (the IR, `cost` and `emit` would have to count and skip them), this measures what it could
give. For every seed, `pamfx run`'s baseline 1 and PAM (same config, same code) are run; then, on
PAM's selected checkpoint:

* *removed*: every cross-origin weight of the hidden layers set to 0 (calibration accuracy);
* *removed + fine-tune*: then ``--recover-epochs`` epochs of the protocol's fine-tune with those
  weights held at 0 by gradient hooks (calibration and test accuracy);
* *control*: the same fine-tune with nothing removed, so the extra training alone is visible;
* *per layer*: removed + fine-tune for one layer's cross-origin connections at a time.

It prints every task's calibration gap to its single-task network (points; the protocol keeps the
worst within the config's tolerance), test accuracies, every combination's MFLOPs for baseline 1,
PAM and PAM without its cross-origin FLOPs, the gains PAM / B1 both ways, and channel pruning's own
trade at the removal's loss (the cheapest accepted checkpoint of PAM's trajectory no further below;
its pruning stops at the config's search tolerance, so beyond that this favours removal); then
mean ± std over seeds. Calibration data chooses nothing here; test accuracy is only reported.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
from pathlib import Path
from typing import Collection

import torch
from torch import fx

from pamfx.analysis.channel_rules import Role
from pamfx.analysis.cost import cost, cross_origin_flops_by_layer
from pamfx.analysis.layer_organisation import Submodules
from pamfx.analysis.multitask_view import read_multitask
from pamfx.cli import load_config
from pamfx.experiment import ExperimentConfig, SeedSetup, gains, run_seed, seed_setup
from pamfx.passes.finetune import finetune, multilabel_loss
from pamfx.passes.module_surgery import expand_mask
from pamfx.zoo.train import evaluate_multitask


def same_origin_masks(gm: fx.GraphModule, layers: Collection[str] | None = None) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """The weights writing ``layers`` (default: every hidden layer) with 0/1 masks, 0 exactly on
    cross-origin connections."""
    view = read_multitask(gm)
    modules = Submodules(gm)
    out = []
    for node in gm.graph.nodes:
        info = view.layers.nodes.get(node.name)
        if info is None or info.role != Role.DENSE or info.source is None or (layers is not None and info.layer not in layers):
            continue
        same = view.records[info.layer].same_origin(view.records[info.source])
        weight = modules[node.target].weight
        out.append((weight, expand_mask(same, weight, view.layers.nodes[node.args[0].name].block).to(weight.dtype)))
    return out


class Ablation:
    """One seed's data and fine-tune, applied to copies of PAM's pruned network."""

    def __init__(self, config: ExperimentConfig, setup: SeedSetup, seed: int, epochs: int):
        self.config, self.setup, self.seed, self.epochs = config, setup, seed, epochs
        self.loss = multilabel_loss(setup.label_map)

    def gap(self, net: fx.GraphModule) -> dict[str, float]:
        """Calibration accuracy minus the single-task network's, per task, in points."""
        accuracy = evaluate_multitask(net, self.setup.data.calib, self.setup.label_map)
        return {t: 100 * (accuracy[t] - self.setup.calib_reference[t]) for t in accuracy}

    def finetune(self, net: fx.GraphModule) -> fx.GraphModule:
        loader = torch.utils.data.DataLoader(self.setup.data.train, batch_size=self.config.batch_size, shuffle=True,
                                             generator=torch.Generator().manual_seed(self.seed))
        return finetune(net, loader, self.loss, epochs=self.epochs, lr=self.config.finetune_lr, seed=self.seed,
                        schedule=self.config.finetune_schedule, progress=False)

    def without_cross_origin(self, pruned: fx.GraphModule, layers: Collection[str] | None = None
                             ) -> tuple[fx.GraphModule, dict[str, float]]:
        """A copy of ``pruned`` with the cross-origin weights of ``layers`` at 0, fine-tuned with them
        held there; also the calibration gap right after the removal."""
        net = copy.deepcopy(pruned)
        masks = same_origin_masks(net, layers)
        with torch.no_grad():
            for weight, mask in masks:
                weight.mul_(mask)
        removed_gap = self.gap(net)
        handles = [weight.register_hook(lambda g, m=mask: g * m) for weight, mask in masks]
        self.finetune(net)
        for h in handles:
            h.remove()
        leaked = sum(int(torch.count_nonzero(w * (1 - m))) for w, m in masks)
        if leaked:
            raise RuntimeError(f"{leaked} removed cross-origin weights moved during the fine-tune")
        return net, removed_gap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", help="default: the config's seeds")
    parser.add_argument("--recover-epochs", type=int, default=None, help="default: the config's recover_epochs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = dataclasses.replace(load_config(args.config), methods=["baseline1", "pam"], latency=False)
    epochs = config.recover_epochs if args.recover_epochs is None else args.recover_epochs
    rows = []
    for seed in args.seeds or config.seeds:
        run = run_seed(config, seed, progress=False, log=lambda _: None)
        setup = seed_setup(config, seed, progress=False)
        ablation = Ablation(config, setup, seed, epochs)
        pam, b1 = run.methods["pam"], run.methods["baseline1"]
        combos = list(run.tasks.combinations())
        by_layer = {c: cross_origin_flops_by_layer(pam.network, c) for c in combos}
        without = {c: cost(pam.network, c).flops - sum(by_layer[c].values()) for c in combos}
        run.methods["pam without cross-origin"] = dataclasses.replace(pam, flops=without)
        removed, removed_gap = ablation.without_cross_origin(pam.network)
        control = ablation.finetune(copy.deepcopy(pam.network))
        row = {
            "gap": {"PAM": {t: 100 * (a - setup.calib_reference[t]) for t, a in pam.calib_accuracy.items()},
                    "removed": removed_gap,
                    "removed + fine-tune": ablation.gap(removed), "control": ablation.gap(control)},
            "test": {"B1": b1.test_accuracy, "PAM": pam.test_accuracy,
                     "removed + fine-tune": evaluate_multitask(removed, setup.data.test, setup.label_map),
                     "control": evaluate_multitask(control, setup.data.test, setup.label_map)},
            "gain": {"PAM": gains(run, "baseline1"), "without": gains(run, "baseline1", "pam without cross-origin")},
        }
        # channel pruning's own trade at the same loss: its cheapest accepted checkpoint no further
        # below the single-task networks than the removal ends
        trajectory = pam.trajectories["pam"]
        loss_pt = -min(row["gap"]["removed + fine-tune"].values())
        same_loss = min((p for p in trajectory.accepted() if 100 * p.deficit(trajectory.reference) <= loss_pt),
                        key=lambda p: p.expected_flops, default=trajectory.checkpoints[0])
        row["same_loss"] = {"channel pruning": same_loss.expected_flops / 1e6,
                            "cross-origin removal": sum(run.weights[c] * without[c] for c in combos) / 1e6}
        expected = sum(run.weights[c] * pam.flops[c] for c in combos)
        row["layers"] = {}
        for layer in by_layer[max(combos)]:
            saved = sum(run.weights[c] * by_layer[c].get(layer, 0) for c in combos)
            if not saved:
                continue
            net, _ = ablation.without_cross_origin(pam.network, {layer})
            row["layers"][layer] = (saved / expected, min(ablation.gap(net).values()))
        rows.append(row)

        print(f"seed {seed}: PAM at {expected / 1e6:.3f} expected MFLOPs")
        for stage, gap in row["gap"].items():
            print(f"  calibration gap {stage:<20} " + "  ".join(f"{t} {v:+.2f}" for t, v in gap.items()))
        for method, accuracy in row["test"].items():
            print(f"  test accuracy   {method:<20} " + "  ".join(f"{t} {100 * v:.2f} %" for t, v in accuracy.items()))
        for c in combos:
            print(f"  {'&'.join(run.tasks.ordered_names(c)):<40} MFLOPs B1 {b1.flops[c] / 1e6:7.3f}  PAM "
                  f"{pam.flops[c] / 1e6:7.3f}  PAM without cross-origin {without[c] / 1e6:7.3f} ({without[c] / pam.flops[c]:.2f} of PAM)")
        print("  gain PAM/B1: " + "; ".join(f"{k} average {g['average']:.2f} peak {g['peak']:.2f}" for k, g in row["gain"].items()))
        print(f"  at the removal's worst-task loss ({-loss_pt:+.2f} pt), expected MFLOPs: "
              + ", ".join(f"{k} {v:.3f}" for k, v in row["same_loss"].items()))
        for layer, (share, worst) in row["layers"].items():
            print(f"  layer {layer:<12} cross-origin {100 * share:5.1f} % of PAM's expected FLOPs; removed + fine-tune: "
                  f"worst task {worst:+.2f} pt", flush=True)

    def summary(label: str, values: list[float], unit: str = "") -> None:
        sign = "+" if unit == " pt" else ""
        print(f"  {label:<62} {statistics.fmean(values):{sign}.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}{unit}")

    print(f"\nmean ± std over {len(rows)} seeds; tolerance {100 * config.tolerance:.2f} points, fine-tune {epochs} epochs")
    for stage in rows[0]["gap"]:
        summary(f"worst task's calibration gap, {stage}", [min(r["gap"][stage].values()) for r in rows], " pt")
    for method in rows[0]["same_loss"]:
        summary(f"expected MFLOPs at the removal's loss, {method}", [r["same_loss"][method] for r in rows])
    for which in rows[0]["gain"]:
        for stat in ("average", "peak"):
            summary(f"gain PAM/B1 {stat}, {which}", [r["gain"][which][stat] for r in rows])
    for layer in dict.fromkeys(layer for r in rows for layer in r["layers"]):
        measured = [r["layers"][layer] for r in rows if layer in r["layers"]]
        summary(f"layer {layer}: cross-origin share of expected FLOPs", [100 * share for share, _ in measured], " %")
        summary(f"layer {layer}: worst task after removal + fine-tune", [worst for _, worst in measured], " pt")


if __name__ == "__main__":
    main()
