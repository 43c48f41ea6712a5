"""The comparison of Sec. 4.6: baseline 1 (prune each network) vs. PAM (merge, then prune).

For one configuration: train (or load from the cache) K single-task networks, prune each one
separately (baseline 1), regroup + merge + fine-tune + prune the merged network (PAM), both held
to the same per-task accuracy tolerance on the *calibration* split, then report the FLOPs,
parameters and test accuracy of every task combination, the average and peak gain of PAM over
baseline 1, and the sharing ratio of every layer. Further baselines (MTZ) plug into
`Comparison.methods`.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import fx
from torch.utils.data import DataLoader, Dataset

from pamfx.analysis.cost import cost
from pamfx.analysis.layer_matching import organise_layers
from pamfx.analysis.multitask_view import read_multitask
from pamfx.analysis.regroup import regroup
from pamfx.data import load_dataset, task_split
from pamfx.errors import InputError
from pamfx.ir.task_set import TaskSpace
from pamfx.passes.finetune import finetune, multilabel_loss
from pamfx.passes.merge import as_multitask, merge
from pamfx.passes.prune import PruneResult, prune_taylor
from pamfx.zoo.train import evaluate_multitask, get_or_train


@dataclass
class ExperimentConfig:
    """Everything that defines one comparison run; the defaults are the built-in demo."""

    dataset: str = "tiled-digits"
    model: str = "lenet5"
    tasks: int = 2
    seed: int = 0
    n_train: int = 3000
    n_calib: int = 1000
    n_test: int = 1000
    width: float = 1.0
    epochs: int = 10
    lr: float = 3e-3
    batch_size: int = 32
    alpha: float = 0.1
    relative_alpha: bool = True
    regroup_samples: int = 300
    regroup_variant: str = "full"
    finetune_epochs: int = 2
    finetune_lr: float = 1e-3
    tolerance: float = 0.005
    prune_step: float = 0.1
    prune_finetune_steps: int = 60
    prune_rounds: int = 200
    cache: str | None = None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "ExperimentConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(values) - set(known)
        if unknown:
            raise InputError(f"unknown config keys {sorted(unknown)}; known keys are {sorted(known)}")
        config = cls(**dict(values))
        config.validate()
        return config

    def validate(self) -> None:
        if self.tolerance < 0 or self.tolerance > 1:
            raise InputError(f"config 'tolerance' must be an accuracy difference in [0, 1], got {self.tolerance}")
        if self.alpha < 0:
            raise InputError(f"config 'alpha' must be >= 0, got {self.alpha}")
        if self.regroup_samples < 2:
            raise InputError(f"config 'regroup_samples' must be >= 2, got {self.regroup_samples}")
        if not 0 < self.prune_step <= 1:
            raise InputError(f"config 'prune_step' must be in (0, 1], got {self.prune_step}")


@dataclass
class MethodResult:
    """One method's pruned network(s) and their per-combination cost and accuracy."""

    flops: dict[int, int]
    params: dict[int, int]
    accuracy: dict[str, float]
    prune: list[PruneResult]
    seconds: float


@dataclass
class Comparison:
    config: ExperimentConfig
    tasks: TaskSpace
    reference_accuracy: dict[str, float]
    methods: dict[str, MethodResult] = field(default_factory=dict)
    sharing_ratio: dict[str, dict[str, float]] = field(default_factory=dict)
    group_sizes: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    regrouping: Any = None


def _loader(data: Dataset, batch_size: int, seed: int, shuffle: bool) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))


def _evaluator(data: Dataset, label_map: Mapping[str, list[int]]):
    def evaluate(network: fx.GraphModule) -> dict[str, float]:
        tasks = read_multitask(network).tasks
        return evaluate_multitask(network, data, {t: label_map[t] for t in tasks})

    return evaluate


def _prune(network: fx.GraphModule, config: ExperimentConfig, train: DataLoader, calib: Dataset,
           label_map: Mapping[str, list[int]], reference: Mapping[str, float], progress: bool) -> PruneResult:
    tasks = list(read_multitask(network).tasks)
    return prune_taylor(
        network, train, multilabel_loss(label_map), _evaluator(calib, label_map),
        tolerance=config.tolerance, reference={t: reference[t] for t in tasks}, step_fraction=config.prune_step,
        finetune_steps=config.prune_finetune_steps, max_rounds=config.prune_rounds, seed=config.seed, progress=progress,
    )


def run_comparison(config: ExperimentConfig, progress: bool = True, log=print) -> Comparison:
    """Run baseline 1 and PAM on ``config`` (see the module docstring)."""
    config.validate()
    data = load_dataset(config.dataset, seed=config.seed, n_train=config.n_train, n_calib=config.n_calib, n_test=config.n_test)
    label_map = task_split(config.tasks)
    tasks = TaskSpace(tuple(label_map))
    log(f"[1/4] single-task networks: {config.model} on {config.dataset}, tasks {list(tasks)}")
    models = {
        t: get_or_train(data, config.model, label_map[t], width=config.width, epochs=config.epochs, lr=config.lr,
                        batch_size=config.batch_size, seed=config.seed + i, cache=config.cache, progress=progress).eval()
        for i, t in enumerate(tasks)
    }
    example = data.train[0][0][None]
    train = _loader(data.train, config.batch_size, config.seed, shuffle=True)
    calib_reference = {t: evaluate_multitask(m, data.calib, {t: label_map[t]})[t] for t, m in models.items()}
    test_reference = {t: evaluate_multitask(m, data.test, {t: label_map[t]})[t] for t, m in models.items()}
    comparison = Comparison(config, tasks, test_reference)

    log("[2/4] baseline 1: pruning every single-task network separately")
    start = time.perf_counter()
    singles = {t: _prune(as_multitask(models[t], example, t), config, train, data.calib, label_map, calib_reference, progress)
               for t in tasks}
    log(f"      pruned in {time.perf_counter() - start:.1f} s ({sum(len(r.steps) for r in singles.values())} steps)")
    single_cost = {t: cost(r.network) for t, r in singles.items()}
    single_acc = {t: evaluate_multitask(r.network, data.test, {t: label_map[t]})[t] for t, r in singles.items()}
    comparison.methods["baseline1"] = MethodResult(
        flops={c: sum(single_cost[t].flops for t in tasks.ordered_names(c)) for c in tasks.combinations()},
        params={c: sum(single_cost[t].params for t in tasks.ordered_names(c)) for c in tasks.combinations()},
        accuracy=single_acc, prune=list(singles.values()), seconds=time.perf_counter() - start,
    )

    log(f"[3/4] PAM: regroup (alpha={config.alpha}{' relative' if config.relative_alpha else ' bits'}), merge, fine-tune")
    start = time.perf_counter()
    layers = organise_layers(models, example)
    # The regrouping greedy costs O(N^2) per scored candidate: it reads the first
    # ``regroup_samples`` calibration samples (the calibration split is already shuffled).
    n = min(config.regroup_samples, len(data.calib))
    calib_x = data.calib.images[:n]
    labels = {t: data.calib.labels[:n, label_map[t]] for t in tasks}
    comparison.regrouping = regroup(layers, calib_x, labels, alpha=config.alpha, relative=config.relative_alpha,
                                    variant=config.regroup_variant, progress=progress)
    log(f"      regrouped in {time.perf_counter() - start:.1f} s; shared channels per layer: "
        + ", ".join(f"{n} {100 * comparison.regrouping.grouping.sharing_ratio(n):.0f}%" for n in layers.names))
    merged = merge(models, example, comparison.regrouping.grouping, layers=layers)
    finetune(merged, train, multilabel_loss(label_map), epochs=config.finetune_epochs, lr=config.finetune_lr,
             seed=config.seed, progress=progress)
    log("[4/4] PAM: pruning the merged network, alternating over tasks")
    prune_start = time.perf_counter()
    pruned = _prune(merged, config, train, data.calib, label_map, calib_reference, progress)
    log(f"      pruned in {time.perf_counter() - prune_start:.1f} s ({len(pruned.steps)} steps)")
    network = pruned.network
    pam_cost = {c: cost(network, c) for c in tasks.combinations()}
    comparison.methods["pam"] = MethodResult(
        flops={c: k.flops for c, k in pam_cost.items()},
        params={c: k.params for c, k in pam_cost.items()},
        accuracy=evaluate_multitask(network, data.test, label_map), prune=[pruned], seconds=time.perf_counter() - start,
    )
    stages = {"merged": read_multitask(merged).grouping(), "pruned": read_multitask(network).grouping()}
    comparison.sharing_ratio = {
        stage: {name: g.sharing_ratio(name) for name in g.layer_names} for stage, g in stages.items()
    }
    comparison.group_sizes = {
        stage: {name: g.group_sizes(name) for name in g.layer_names} for stage, g in stages.items()
    }
    return comparison


def gains(comparison: Comparison, baseline: str, method: str = "pam") -> dict[str, float]:
    """Average and peak of cost_baseline(S) / cost_method(S) over all combinations S (Sec. 4.6.1)."""
    base, ours = comparison.methods[baseline].flops, comparison.methods[method].flops
    ratios = [base[c] / ours[c] for c in comparison.tasks.combinations()]
    return {"average": sum(ratios) / len(ratios), "peak": max(ratios)}


def results_dict(comparison: Comparison) -> dict[str, Any]:
    """The JSON-ready results: ``combinations``, ``gain``, accuracies, sharing ratios, config."""
    tasks = comparison.tasks
    methods = comparison.methods
    combos = []
    for c in tasks.combinations():
        names = tasks.ordered_names(c)
        combos.append({
            "tasks": names,
            "flops": {m: r.flops[c] for m, r in methods.items()},
            "params": {m: r.params[c] for m, r in methods.items()},
            "accuracy": {m: {t: r.accuracy[t] for t in names} for m, r in methods.items()},
        })
    return {
        "config": dataclasses.asdict(comparison.config),
        "tasks": list(tasks),
        "flops_convention": "2 x multiply-accumulates of conv and linear layers per input sample (FlopCounterMode)",
        "accuracy_metric": "mean binary accuracy over the task's labels on the test split",
        "reference_accuracy": comparison.reference_accuracy,
        "combinations": combos,
        "gain": {m: gains(comparison, m) for m in methods if m != "pam"},
        "sharing_ratio": comparison.sharing_ratio,
        "group_sizes": comparison.group_sizes,
        "seconds": {m: r.seconds for m, r in methods.items()},
        "prune_steps": {m: [len(p.steps) for p in r.prune] for m, r in methods.items()},
    }

