"""The comparison of Sec. 4.6: baseline 1 (prune each network) vs. PAM (merge, then prune), over seeds.

For one configuration and each seed: build the data (seeded), train (or load from the cache) K
single-task networks, then

- **baseline1**: prune every single-task network on its own;
- **pam**: regroup (Alg. 4 / 5) + merge, then prune the merged network; with ``compare_unshared``
  the unshared merge (every neuron exclusive) is pruned too and the cheaper selection on the
  calibration split is kept (`choose_pruned`);

and optionally **mtz** (baseline 2: MTZ merge), all with the same pruner (P2 Taylor or P1 VIB),
schedule and fine-tuning budget per network: every network, single or merged, is fine-tuned for
``finetune_epochs`` before pruning, and every method keeps the cheapest of the same number of
pruning runs (`ExperimentConfig.pruning_runs`: ``prune_restarts``, ``equal_tries``).
Every pruning run records a trajectory (`pamfx.passes.prune.Trajectory`); each method's network
is its cheapest checkpoint at which every task's *calibration* accuracy stays within
``tolerance`` of its unpruned single-task network (matched accuracy), and only that checkpoint is
evaluated on the test split. Gains (Sec. 4.6.1) are per seed and then summarised as mean ± std.
With ``latency`` on, every method's selected network is then timed for every combination
(`pamfx.latency`: emitted modules in eager torch and onnxruntime, 1 thread, batch 1 and 8).
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import fx, nn
from torch.utils.data import DataLoader, Dataset

from pamfx.analysis.cost import combination_weights, cost, cross_origin_flops
from pamfx.analysis.layer_matching import organise_layers
from pamfx.analysis.multitask_view import read_multitask
from pamfx.analysis.regroup import RegroupResult, regroup
from pamfx.data import TiledDigits, load_dataset, task_split
from pamfx.errors import InputError
from pamfx.ir.grouping import Grouping
from pamfx.ir.neuron_layer import LayerMap
from pamfx.ir.task_set import TaskSet, TaskSpace
from pamfx.latency import Latency, check_backends, measure_latency, seed_latency, summarise_latency
from pamfx.passes.finetune import SCHEDULES, finetune, multilabel_loss
from pamfx.passes.merge import CROSS_ORIGIN, as_multitask, merge
from pamfx.passes.mtz import mtz_merge
from pamfx.passes.prune import Checkpoint, Trajectory, check_calibration_noise, compose_selection, recover
from pamfx.passes.taylor import prune_taylor
from pamfx.passes.vib import prune_vib
from pamfx.pruning_jobs import PruningJob, run_jobs
from pamfx.zoo.train import evaluate_multitask, get_or_train

PRUNERS = ("taylor", "vib")
METHODS = ("baseline1", "mtz", "pam")
METHOD_TITLES = {"baseline1": "baseline 1: every single-task network on its own",
                 "mtz": "baseline 2: MTZ merge (+ joint fine-tune)", "pam": "PAM: regroup, merge, fine-tune"}
METHOD_COLUMNS = {"baseline1": "B1", "mtz": "B2", "pam": "PAM"}


#: Keys added to `ExperimentConfig` whose default changed what a run computes, each with the value
#: that computes what runs saved before the key existed did (`pamfx.reproduce` reads such a run back
#: for that value only). ``balance_spare``: the accuracy balance was unbounded (clamped at 20);
#: ``compare_unshared``: PAM pruned the regrouped network only; ``component_selection``: independent
#: task components were selected and recovered together; ``equal_tries``: baseline 1 and MTZ pruned
#: each network once while PAM kept the cheaper of its two candidates.
SAVED_BEFORE_KEY: dict[str, Any] = {"balance_spare": 20.0, "compare_unshared": False, "component_selection": False,
                                    "equal_tries": False}

#: Pruning run r of a network draws its data order and fine-tuning seeds from seed + r × this stride.
RESTART_SEED_STRIDE = 100_003


@dataclass
class ExperimentConfig:
    """Everything that defines one comparison; the defaults are the built-in demo."""

    dataset: str = "tiled-mnist"
    model: str = "lenet5"
    tasks: int = 2
    labels: dict[str, list[int]] | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    methods: list[str] = field(default_factory=lambda: ["baseline1", "pam"])
    n_train: int = 3000
    n_calib: int = 3000
    n_test: int = 2000
    width: float = 1.0
    epochs: int = 3
    lr: float = 3e-3
    batch_size: int = 32
    alpha: float | list[float] = 0.1
    relative_alpha: bool = True
    compare_unshared: bool = True
    component_selection: bool = True
    component_rounds: bool = False
    regroup_samples: int = 300
    regroup_variant: str = "full"
    cross_origin: str = "dense"
    finetune_epochs: int = 2
    finetune_lr: float = 1e-3
    finetune_schedule: str = "cosine"
    pruner: str = "taylor"
    tolerance: float = 0.005
    search_tolerance: float = 0.01
    strict_noise: bool = False
    combination_weights: dict[str, float] | None = None
    prune_step: float = 0.1
    prune_finetune_steps: int = 100
    prune_rescue_steps: int = 0
    prune_rounds: int = 60
    prune_patience: int = 4
    prune_floor: float = 0.02
    importance_batches: int = 10
    prune_exclusive: bool = True
    prune_restarts: int = 1
    equal_tries: bool = True
    balance_spare: float = 1.0
    mtz_samples: int = 500
    mtz_finetune_steps: int = 200
    recover_candidates: int = 3
    recover_epochs: int = 2
    vib_epochs: int = 10
    vib_kl: float = 1e-4
    vib_kl_growth: float = 1.5
    vib_lr: float = 3e-3
    vib_alternate: bool = True
    vib_checkpoints: int = 4
    cache: str | None = None
    latency: bool = True
    latency_backends: list[str] = field(default_factory=lambda: ["torch", "onnxruntime"])
    latency_batches: list[int] = field(default_factory=lambda: [1, 8])
    latency_repeats: int = 20
    latency_clock: str = "cpu"

    @property
    def alphas(self) -> list[float]:
        """The α candidates: ``alpha`` itself, or the list PAM chooses from per seed (`choose_alpha`)."""
        return list(self.alpha) if isinstance(self.alpha, list) else [self.alpha]

    def pruning_runs(self, method: str) -> int:
        """How many times each network of ``method`` is pruned, each run with its own data order; the
        run whose selection is the cheapest matched one on the calibration split is kept
        (`choose_pruned`). PAM prunes each of its candidates (the regrouped merge, and with
        ``compare_unshared`` the unshared one) ``prune_restarts`` times and keeps the best of all;
        with ``equal_tries`` every other method keeps the best of as many runs as PAM in all, so no
        method wins by having more draws of the pruner's run-to-run spread."""
        if method == "pam" or not self.equal_tries:
            return self.prune_restarts
        return self.prune_restarts * (2 if self.compare_unshared else 1)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "ExperimentConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise InputError(f"unknown config keys {sorted(unknown)}; known keys are {sorted(known)}")
        config = cls(**dict(values))
        config.validate()
        return config

    def validate(self) -> None:
        checks = [
            (0 <= self.tolerance <= 1, f"'tolerance' must be an accuracy difference in [0, 1], got {self.tolerance}"),
            (self.search_tolerance >= self.tolerance,
             f"'search_tolerance' ({self.search_tolerance}) must be >= 'tolerance' ({self.tolerance})"),
            (bool(self.alphas) and all(isinstance(a, (int, float)) and a >= 0 for a in self.alphas)
             and len(set(self.alphas)) == len(self.alphas),
             f"'alpha' must be a number >= 0 or a list of distinct ones to choose from, got {self.alpha!r}"),
            (self.regroup_samples >= 2, f"'regroup_samples' must be >= 2, got {self.regroup_samples}"),
            (0 < self.prune_step <= 1, f"'prune_step' must be in (0, 1], got {self.prune_step}"),
            (0 <= self.prune_floor < 1, f"'prune_floor' must be in [0, 1), got {self.prune_floor}"),
            (isinstance(self.prune_rescue_steps, int) and not isinstance(self.prune_rescue_steps, bool)
             and self.prune_rescue_steps >= 0, f"'prune_rescue_steps' must be an int >= 0, got {self.prune_rescue_steps!r}"),
            (isinstance(self.compare_unshared, bool),
             f"'compare_unshared' must be true or false, got {self.compare_unshared!r}"),
            (isinstance(self.component_selection, bool),
             f"'component_selection' must be true or false, got {self.component_selection!r}"),
            (isinstance(self.component_rounds, bool),
             f"'component_rounds' must be true or false, got {self.component_rounds!r}"),
            (isinstance(self.prune_restarts, int) and not isinstance(self.prune_restarts, bool)
             and self.prune_restarts >= 1, f"'prune_restarts' must be an int >= 1, got {self.prune_restarts!r}"),
            (isinstance(self.equal_tries, bool), f"'equal_tries' must be true or false, got {self.equal_tries!r}"),
            (isinstance(self.balance_spare, (int, float)) and self.balance_spare >= 0,
             f"'balance_spare' must be a number of tolerances >= 0, got {self.balance_spare!r}"),
            (self.labels is None or (isinstance(self.labels, dict) and len(self.labels) >= 2 and all(
                isinstance(t, str) and "&" not in t and isinstance(v, list) and v for t, v in self.labels.items())),
             f"'labels' must map at least two task names (without '&') to non-empty label lists, got {self.labels!r}"),
            (self.finetune_schedule in SCHEDULES,
             f"'finetune_schedule' must be one of {SCHEDULES}, got {self.finetune_schedule!r}"),
            (self.pruner in PRUNERS, f"'pruner' must be one of {PRUNERS}, got {self.pruner!r}"),
            (self.cross_origin in CROSS_ORIGIN, f"'cross_origin' must be one of {CROSS_ORIGIN}, got {self.cross_origin!r}"),
            (isinstance(self.seeds, list) and len(self.seeds) > 0 and all(isinstance(s, int) and s >= 0 for s in self.seeds),
             f"'seeds' must be a non-empty list of non-negative ints, got {self.seeds!r}"),
            (self.vib_kl >= 0 and self.vib_epochs >= 1 and self.vib_kl_growth >= 1 and self.vib_checkpoints >= 1,
             "'vib_kl' must be >= 0, 'vib_kl_growth' >= 1, 'vib_epochs' >= 1 and 'vib_checkpoints' >= 1"),
            (isinstance(self.methods, list) and "pam" in self.methods and set(self.methods) <= set(METHODS)
             and len(set(self.methods)) == len(self.methods),
             f"'methods' must list distinct methods of {METHODS}, 'pam' among them, got {self.methods!r}"),
            (self.mtz_samples >= 2 and self.mtz_finetune_steps >= 1,
             "'mtz_samples' must be >= 2 and 'mtz_finetune_steps' >= 1"),
            (self.recover_candidates >= 0 and self.recover_epochs >= 1,
             "'recover_candidates' must be >= 0 and 'recover_epochs' >= 1"),
            (isinstance(self.latency_batches, list) and bool(self.latency_batches)
             and all(isinstance(b, int) and b >= 1 for b in self.latency_batches),
             f"'latency_batches' must be a non-empty list of positive ints, got {self.latency_batches!r}"),
            (self.latency_repeats >= 1, f"'latency_repeats' must be >= 1, got {self.latency_repeats}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(f"config {message}")
        if self.latency:
            try:
                check_backends(self.latency_backends, self.latency_clock)
            except InputError as err:
                raise InputError(f"config 'latency_backends' / 'latency_clock': {err}") from err


@dataclass
class MethodResult:
    """One method's selected network(s) on one seed: per-combination cost, accuracies, trajectories."""

    flops: dict[TaskSet, int]
    params: dict[TaskSet, int]
    test_accuracy: dict[str, float]
    calib_accuracy: dict[str, float]
    matched: bool
    trajectories: dict[str, Trajectory]
    network: fx.GraphModule | dict[str, fx.GraphModule]
    seconds: float = 0.0
    #: every pruning run's calibration selection (`PruningRun`), per pruned network: baseline 1's
    #: per task, PAM's per candidate ("regrouped", "unshared"), MTZ's under "mtz"
    runs: dict[str, list["PruningRun"]] = field(default_factory=dict)


@dataclass(frozen=True)
class PruningRun:
    """One pruning run of one network: its selection's expected FLOPs on the calibration split,
    whether every task was within the tolerance there, and whether the method kept this run."""

    expected_flops: float
    matched: bool
    kept: bool


@dataclass
class SeedRun:
    """The comparison on one seed."""

    seed: int
    tasks: TaskSpace
    reference: dict[str, float]
    calib_reference: dict[str, float]
    weights: dict[TaskSet, float]
    methods: dict[str, MethodResult] = field(default_factory=dict)
    sharing_ratio: dict[str, dict[str, float]] = field(default_factory=dict)
    group_sizes: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    cross_origin_share: dict[str, float] = field(default_factory=dict)
    regrouping: RegroupResult | None = None
    start: list[StartPoint] = field(default_factory=list)
    grouping: dict[str, Any] | None = None
    latency: Latency = field(default_factory=dict)


def _loader(data: Dataset, batch_size: int, seed: int) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


def _parse_weights(tasks: TaskSpace, spec: Mapping[str, float] | None) -> dict[TaskSet, float]:
    if spec is None:
        return combination_weights(tasks)
    try:
        return combination_weights(tasks, {tuple(key.split("&")): w for key, w in spec.items()})
    except InputError as err:
        raise InputError(f"config 'combination_weights': {err} (keys are task names joined by '&')") from err


class _Pruner:
    """The configured pruner (P1 or P2) bound to one seed's data; the same for every method."""

    def __init__(self, config: ExperimentConfig, seed: int, train: Dataset, calib: Dataset,
                 label_map: Mapping[str, list[int]], reference: Mapping[str, float], progress: bool):
        self.config, self.seed, self.train, self.calib = config, seed, train, calib
        self.label_map, self.reference, self.progress = label_map, reference, progress

    def __call__(self, network: fx.GraphModule, restart: int = 0) -> Trajectory:
        """Prune ``network`` (not modified). Run ``restart`` draws its data order and seeds from
        seed + `RESTART_SEED_STRIDE` × restart alone, so runs are independent (`pamfx.pruning_jobs`)."""
        c = self.config
        seed = self.seed + RESTART_SEED_STRIDE * restart
        train = _loader(self.train, c.batch_size, seed)
        tasks = read_multitask(network).tasks
        labels = {t: self.label_map[t] for t in tasks}
        loss = multilabel_loss(labels)
        weights = _parse_weights(tasks, c.combination_weights if len(tasks) > 1 else None)

        def evaluate(net: fx.GraphModule) -> dict[str, float]:
            return evaluate_multitask(net, self.calib, labels)

        common = dict(reference={t: self.reference[t] for t in tasks}, weights=weights, seed=seed,
                      progress=self.progress)
        if c.pruner == "taylor":
            trajectory = prune_taylor(network, train, loss, evaluate, search_tolerance=c.search_tolerance, tolerance=c.tolerance,
                                importance_batches=c.importance_batches, exclusive=c.prune_exclusive,
                                balance_spare=c.balance_spare,
                                step_fraction=c.prune_step,
                                finetune_steps=c.prune_finetune_steps, rescue_steps=c.prune_rescue_steps,
                                lr=c.finetune_lr, floor=c.prune_floor,
                                schedule=c.finetune_schedule,
                                max_rounds=c.prune_rounds, patience=c.prune_patience,
                                per_component=c.component_rounds, **common)
        else:
            trajectory = prune_vib(network, train, loss, evaluate, search_tolerance=c.search_tolerance,
                                   epochs=c.vib_epochs, kl_weight=c.vib_kl, kl_growth=c.vib_kl_growth,
                                   patience=c.prune_patience, checkpoints=c.vib_checkpoints,
                                   gate_lr=c.vib_lr, alternate=c.vib_alternate, lr=c.finetune_lr, **common)
        if c.component_selection:
            compose_selection(trajectory, evaluate, c.tolerance)
        if c.recover_candidates:
            recover(trajectory, train, loss, evaluate, tolerance=c.tolerance, candidates=c.recover_candidates,
                    epochs=c.recover_epochs, lr=c.finetune_lr, seed=seed, schedule=c.finetune_schedule,
                    per_component=c.component_selection, progress=self.progress)
        return trajectory


def _selected(trajectory: Trajectory, tolerance: float) -> tuple[Checkpoint, bool]:
    point = trajectory.select(tolerance)
    return point, trajectory.within(point, tolerance)


@dataclass
class SeedSetup:
    """One seed's data, task labels, trained single-task networks and their calibration accuracies."""

    data: TiledDigits
    label_map: dict[str, list[int]]
    models: dict[str, nn.Module]
    calib_reference: dict[str, float]

    @property
    def example(self) -> torch.Tensor:
        return self.data.train[0][0][None]


def task_labels(config: ExperimentConfig) -> dict[str, list[int]]:
    """Task name → label indices: the config's ``labels``, else `task_split` of its ``tasks``."""
    return dict(config.labels) if config.labels is not None else task_split(config.tasks)


def seed_setup(config: ExperimentConfig, seed: int, progress: bool = True) -> SeedSetup:
    """Build the seeded data and train (or load from the cache) the K single-task networks of ``config``."""
    data = load_dataset(config.dataset, seed=seed, n_train=config.n_train, n_calib=config.n_calib, n_test=config.n_test)
    label_map = task_labels(config)
    models = {
        t: get_or_train(data, config.model, label_map[t], width=config.width, epochs=config.epochs, lr=config.lr,
                        batch_size=config.batch_size, seed=seed * 100 + i, cache=config.cache, progress=progress).eval()
        for i, t in enumerate(label_map)
    }
    calib_reference = {t: evaluate_multitask(m, data.calib, {t: label_map[t]})[t] for t, m in models.items()}
    return SeedSetup(data, label_map, models, calib_reference)


@dataclass
class StartPoint:
    """PAM's merged network for one α (None: the unshared merge) after the fine-tune every method
    gets, before any pruning.

    ``gap``: per task, calibration accuracy minus the single-task network's; ``expected_flops``:
    under the config's combination weights.
    """

    alpha: float | None
    expected_flops: float
    sharing: dict[str, float]
    gap: dict[str, float]
    network: fx.GraphModule = field(repr=False)

    def matchable(self, tolerance: float) -> bool:
        """Every task within ``tolerance`` of its single-task network on the calibration split."""
        return min(self.gap.values()) >= -tolerance


def pam_start(config: ExperimentConfig, setup: SeedSetup, seed: int,
              progress: bool = True) -> tuple[RegroupResult, list[StartPoint], StartPoint | None]:
    """Regroup once for every α of ``config.alphas`` (Alg. 4 / 5: one greedy run serves them all), then
    merge and fine-tune each grouping (fresh, equally seeded loader per α) and measure its start; with
    ``compare_unshared`` also the unshared merge (`Grouping.origin`, returned last, else None)."""
    data, label_map = setup.data, setup.label_map
    n = min(config.regroup_samples, len(data.calib))
    layers = organise_layers(setup.models, setup.example)
    alphas = config.alphas
    result = regroup(layers, data.calib.images[:n], {t: data.calib.labels[:n, label_map[t]] for t in label_map},
                     alpha=alphas[0], alphas=alphas[1:], relative=config.relative_alpha, variant=config.regroup_variant,
                     progress=progress)
    points = [_start_point(config, setup, seed, layers, grouping, alpha, progress)
              for alpha, grouping in zip(alphas, (result.grouping, *result.groupings))]
    unshared = (_start_point(config, setup, seed, layers, Grouping.origin(layers), None, progress)
                if config.compare_unshared else None)
    return result, points, unshared


def _start_point(config: ExperimentConfig, setup: SeedSetup, seed: int, layers: LayerMap, grouping: Grouping,
                 alpha: float | None, progress: bool) -> StartPoint:
    """Merge with ``grouping``, fine-tune as every method is fine-tuned, and measure the start."""
    data, label_map = setup.data, setup.label_map
    merged = merge(setup.models, setup.example, grouping, layers=layers, cross_origin=config.cross_origin)
    train = _loader(data.train, config.batch_size, seed)
    finetune(merged, train, multilabel_loss(label_map), epochs=config.finetune_epochs, lr=config.finetune_lr,
             seed=seed, schedule=config.finetune_schedule, progress=progress)
    view = read_multitask(merged)
    weights = _parse_weights(view.tasks, config.combination_weights)
    accuracy = evaluate_multitask(merged, data.calib, label_map)
    return StartPoint(
        alpha=alpha, expected_flops=sum(w * cost(merged, c).flops for c, w in weights.items()),
        sharing={name: view.grouping().sharing_ratio(name) for name in view.grouping().layer_names},
        gap={t: accuracy[t] - setup.calib_reference[t] for t in label_map}, network=merged)


def choose_alpha(points: Sequence[StartPoint], tolerance: float) -> StartPoint:
    """The α of docs/pruning.md ("Choosing α"), on calibration data only: among the start points whose
    every task is within ``tolerance``, the cheapest in expected FLOPs (the fewest neurons left shared,
    each of which runs in every combination); when none is, the one whose worst task is least below."""
    matchable = [p for p in points if p.matchable(tolerance)]
    if matchable:
        return min(matchable, key=lambda p: p.expected_flops)
    return max(points, key=lambda p: min(p.gap.values()))


def choose_pruned(trajectories: Sequence[Trajectory], tolerance: float) -> int:
    """The pruning run a method keeps, on calibration data only (docs/pruning.md, "Choosing α" and
    "Pruning runs"): the index of the run whose selected checkpoint has every task within
    ``tolerance`` and the fewest expected FLOPs; when none has, the one whose selection is least
    below. Ties go to the first."""
    selected = [_selected(t, tolerance) for t in trajectories]
    matched = [i for i, (_, ok) in enumerate(selected) if ok]
    if matched:
        return min(matched, key=lambda i: selected[i][0].expected_flops)
    return min(range(len(selected)), key=lambda i: selected[i][0].deficit(trajectories[i].reference))


def best_run(named: Sequence[tuple[str, Trajectory]],
             tolerance: float) -> tuple[str, Trajectory, dict[str, list[PruningRun]]]:
    """Of pruning runs named by their candidate network (PAM's "regrouped" and "unshared", say), the
    run a method keeps (`choose_pruned`): its name, its trajectory, and every run's `PruningRun` per
    name."""
    pick = choose_pruned([t for _, t in named], tolerance)
    records: dict[str, list[PruningRun]] = {}
    for i, (name, trajectory) in enumerate(named):
        point, matched = _selected(trajectory, tolerance)
        records.setdefault(name, []).append(PruningRun(point.expected_flops, matched, i == pick))
    return named[pick][0], named[pick][1], records


def run_seed(config: ExperimentConfig, seed: int, progress: bool = True, log: Callable[[str], None] = print,
             workers: int = 1) -> SeedRun:
    """Run the configured methods on one seed (see the module docstring). Every method first builds
    the networks it prunes; then all pruning runs, of every method, run on ``workers`` processes at
    once (`pamfx.pruning_jobs.run_jobs`; the result does not depend on ``workers``)."""
    label_map = task_labels(config)
    tasks = TaskSpace(tuple(label_map))
    log(f"[seed {seed}] [1/{len(config.methods) + 2}] single-task networks: {config.model} on {config.dataset}, tasks {list(tasks)}")
    setup = seed_setup(config, seed, progress)
    data, models, calib_reference, example = setup.data, setup.models, setup.calib_reference, setup.example
    test_reference = {t: evaluate_multitask(m, data.test, {t: label_map[t]})[t] for t, m in models.items()}
    check_calibration_noise(calib_reference, len(data.calib), {t: len(label_map[t]) for t in tasks}, config.tolerance,
                            strict=config.strict_noise)
    run = SeedRun(seed, tasks, test_reference, calib_reference, _parse_weights(tasks, config.combination_weights))
    pruner = _Pruner(config, seed, data.train, data.calib, label_map, calib_reference, progress and workers == 1)

    loss = multilabel_loss(label_map)
    candidates: dict[str, dict[str, fx.GraphModule]] = {}  # per method, the networks it prunes
    seconds: dict[str, float] = {}
    starts: dict[str, StartPoint] = {}
    for step, method in enumerate(config.methods, start=2):
        log(f"[seed {seed}] [{step}/{len(config.methods) + 2}] {METHOD_TITLES[method]}")
        start = time.perf_counter()
        # every method gets its own loader with the same seed: a method's result never depends on
        # which methods ran before it
        train = _loader(data.train, config.batch_size, seed)
        if method == "baseline1":
            candidates[method] = {
                t: finetune(as_multitask(m, example, t), train, multilabel_loss({t: label_map[t]}),
                            epochs=config.finetune_epochs, lr=config.finetune_lr, seed=seed,
                            schedule=config.finetune_schedule, progress=progress)
                for t, m in models.items()}
        elif method == "pam":
            run.regrouping, run.start, unshared = pam_start(config, setup, seed, progress)
            chosen = choose_alpha(run.start, config.tolerance)
            run.regrouping = run.regrouping.with_alpha_first(chosen.alpha)
            if len(run.start) > 1:
                log(f"          α = {chosen.alpha:g} of {config.alphas} (calibration start: "
                    + ", ".join(f"{p.alpha:g} {p.expected_flops / 1e6:.2f} MFLOPs, worst task "
                                f"{100 * min(p.gap.values()):+.2f} pt" for p in run.start) + ")")
            starts = {"regrouped": chosen} if unshared is None else {"regrouped": chosen, "unshared": unshared}
            candidates[method] = {n: p.network for n, p in starts.items()}
        else:
            merged = mtz_merge(models, example, data.calib.images[:config.mtz_samples], train_loader=train, loss_fn=loss,
                               finetune_steps=config.mtz_finetune_steps, lr=config.finetune_lr, seed=seed,
                               progress=progress)
            finetune(merged, train, loss, epochs=config.finetune_epochs, lr=config.finetune_lr, seed=seed,
                     schedule=config.finetune_schedule, progress=progress)
            candidates[method] = {method: merged}
        seconds[method] = time.perf_counter() - start

    jobs = {(method, name, r): PruningJob(f"{method}/{name}", pruner, network, r, size=cost(network).flops)
            for method in config.methods for name, network in candidates[method].items()
            for r in range(config.pruning_runs(method))}
    log(f"[seed {seed}] [{len(config.methods) + 2}/{len(config.methods) + 2}] {config.pruner} pruning: "
        f"{len(jobs)} runs" + (f", {min(workers, len(jobs))} at once" if workers > 1 else ""))
    done = dict(zip(jobs, run_jobs(list(jobs.values()), workers, progress)))
    for method in config.methods:
        named = [(name, done[method, name, r]) for name in candidates[method] for r in range(config.pruning_runs(method))]
        seconds[method] += sum(result.seconds for _, result in named)
        if method == "baseline1":
            run.methods[method] = _baseline1({t: best_run([(t, r.trajectory) for n, r in named if n == t], config.tolerance)
                                              for t in candidates[method]}, config.tolerance, data.test, label_map)
        else:
            name, trajectory, runs = best_run([(n, r.trajectory) for n, r in named], config.tolerance)
            run.methods[method] = _merged(method, trajectory, config.tolerance, data.test, label_map)
            run.methods[method].runs = runs
            if method == "pam":
                if len(starts) > 1:
                    # per candidate, its best run: the kept one, else the cheapest matched, else the cheapest
                    run.grouping = {"chosen": name, "expected_flops": {
                        n: min(rs, key=lambda r: (not r.kept, not r.matched, r.expected_flops)).expected_flops
                        for n, rs in runs.items()}}
                    log(f"          PAM grouping: {name} (pruned, calibration: "
                        + ", ".join(f"{k} {v / 1e6:.3f} expected MFLOPs" for k, v in run.grouping["expected_flops"].items())
                        + ")")
                _sharing(run, starts[name].network, run.methods[method].network)
        run.methods[method].seconds = seconds[method]
        title = METHOD_COLUMNS[method]
        if config.pruning_runs(method) > 1:
            log(f"          {title} pruning runs (selection, calibration, expected MFLOPs; * kept): " + "; ".join(
                f"{n} " + " / ".join(f"{r.expected_flops / 1e6:.3f}{'*' * r.kept}{'' if r.matched else ' (unmatched)'}"
                                      for r in rs) for n, rs in run.methods[method].runs.items()))
        log(f"          {title}: {run.methods[method].seconds:.0f} s; " + ", ".join(
            f"{'&'.join(tasks.ordered_names(c))} {run.methods[method].flops[c] / 1e6:.3f} MFLOPs"
            for c in tasks.combinations() if c in (*(tasks.bit(t) for t in tasks), max(tasks.combinations()))))
    if config.latency:
        log(f"[seed {seed}] latency of every combination: {', '.join(config.latency_backends)}, "
            f"batch {', '.join(map(str, config.latency_batches))}")
        run.latency = measure_latency({m: r.network for m, r in run.methods.items()}, tasks, example,
                                      batches=config.latency_batches, backends=config.latency_backends,
                                      repeats=config.latency_repeats, clock=config.latency_clock, seed=seed,
                                      progress=progress)
    return run


def _baseline1(pruned: Mapping[str, tuple[str, Trajectory, dict[str, list[PruningRun]]]], tolerance: float,
               test: Dataset, label_map: Mapping[str, list[int]]) -> MethodResult:
    """Baseline 1: every single-task network (`as_multitask` form, fine-tuned as the merged networks
    are) pruned on its own, its best run kept (``pruned``: `best_run` per task); a combination costs
    the sum of its tasks'."""
    tasks = TaskSpace(tuple(pruned))
    singles = {t: trajectory for t, (_, trajectory, _) in pruned.items()}
    chosen = {t: _selected(trajectory, tolerance) for t, trajectory in singles.items()}
    single_cost = {t: cost(point.network) for t, (point, _) in chosen.items()}
    return MethodResult(
        flops={c: sum(single_cost[t].flops for t in tasks.ordered_names(c)) for c in tasks.combinations()},
        params={c: sum(single_cost[t].params for t in tasks.ordered_names(c)) for c in tasks.combinations()},
        test_accuracy={t: evaluate_multitask(p.network, test, {t: label_map[t]})[t] for t, (p, _) in chosen.items()},
        calib_accuracy={t: p.accuracy[t] for t, (p, _) in chosen.items()},
        matched=all(ok for _, ok in chosen.values()), trajectories=singles,
        network={t: p.network for t, (p, _) in chosen.items()},
        runs={t: records[t] for t, (_, _, records) in pruned.items()},
    )


def _merged(method: str, trajectory: Trajectory, tolerance: float, test: Dataset,
            label_map: Mapping[str, list[int]]) -> MethodResult:
    """A merged network (PAM or MTZ) pruned as a whole (its ``trajectory``); a combination costs its subgraph."""
    point, matched = _selected(trajectory, tolerance)
    combos = {c: cost(point.network, c) for c in trajectory.tasks.combinations()}
    return MethodResult(
        flops={c: k.flops for c, k in combos.items()}, params={c: k.params for c, k in combos.items()},
        test_accuracy=evaluate_multitask(point.network, test, label_map), calib_accuracy=dict(point.accuracy),
        matched=matched, trajectories={method: trajectory}, network=point.network,
    )


def _sharing(run: SeedRun, merged: fx.GraphModule, pruned: fx.GraphModule) -> None:
    """Sharing ratios and group sizes after merging and after pruning (Fig. 4.6), and the share of the
    FLOPs on cross-origin connections."""
    stages = {"merged": read_multitask(merged).grouping(), "pruned": read_multitask(pruned).grouping()}
    run.sharing_ratio = {stage: {name: g.sharing_ratio(name) for name in g.layer_names} for stage, g in stages.items()}
    run.group_sizes = {stage: {name: g.group_sizes(name) for name in g.layer_names} for stage, g in stages.items()}
    run.cross_origin_share = {"&".join(run.tasks.ordered_names(c)): cross_origin_flops(pruned, c) / cost(pruned, c).flops
                              for c in run.tasks.combinations()}


def run_comparison(config: ExperimentConfig, progress: bool = True, log: Callable[[str], None] = print,
                   workers: int = 1) -> list[SeedRun]:
    """`run_seed` for every seed of ``config``, each seed's pruning runs on ``workers`` processes."""
    config.validate()
    return [run_seed(config, seed, progress, log, workers) for seed in config.seeds]


def gains(run: SeedRun, baseline: str, method: str = "pam") -> dict[str, float]:
    """Average and peak of cost_baseline(S) / cost_method(S) over all combinations S (Sec. 4.6.1)."""
    base, ours = run.methods[baseline].flops, run.methods[method].flops
    ratios = [base[c] / ours[c] for c in run.tasks.combinations()]
    return {"average": sum(ratios) / len(ratios), "peak": max(ratios)}


def frontier(run: SeedRun, method: str, combo: TaskSet, thresholds: list[float]) -> list[float]:
    """FLOPs of ``combo`` for ``method`` at each allowed accuracy drop in ``thresholds``.

    Baseline 1 picks each task's network separately at the threshold; a merged network picks its
    one checkpoint (every task within the threshold, cheapest expected FLOPs).
    """
    result = run.methods[method]
    if method == "baseline1":
        return [sum(result.trajectories[t].select(d).expected_flops for t in run.tasks.ordered_names(combo))
                for d in thresholds]
    trajectory = next(iter(result.trajectories.values()))
    return [trajectory.select(d).flops[combo] for d in thresholds]


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _seed_dict(run: SeedRun, search_tolerance: float) -> dict[str, Any]:
    thresholds = [search_tolerance * k / 8 for k in range(9)]
    combos = []
    for c in run.tasks.combinations():
        names = run.tasks.ordered_names(c)
        combos.append({
            "tasks": names,
            "flops": {m: r.flops[c] for m, r in run.methods.items()},
            "params": {m: r.params[c] for m, r in run.methods.items()},
            "accuracy": {m: {t: r.test_accuracy[t] for t in names} for m, r in run.methods.items()},
        })
    trajectories = {
        m: {name: [{"round": p.round, "accepted": p.accepted, "expected_flops": p.expected_flops,
                    "flops": {"&".join(run.tasks.ordered_names(c)): f for c, f in p.flops.items()},
                    "calib_accuracy": p.accuracy} for p in traj.checkpoints]
            for name, traj in r.trajectories.items()}
        for m, r in run.methods.items()
    }
    return {
        "seed": run.seed,
        "reference_accuracy": run.reference,
        "calib_reference_accuracy": run.calib_reference,
        "combinations": combos,
        "gain": {m: gains(run, m) for m in run.methods if m != "pam"},
        "matched": {m: r.matched for m, r in run.methods.items()},
        "calib_accuracy": {m: r.calib_accuracy for m, r in run.methods.items()},
        "alpha": None if run.regrouping is None else run.regrouping.alpha,
        "grouping": run.grouping,
        "alpha_start": [{"alpha": p.alpha, "expected_flops": p.expected_flops, "sharing": p.sharing, "calib_gap": p.gap}
                        for p in run.start],
        "sharing_ratio": run.sharing_ratio,
        "group_sizes": run.group_sizes,
        "cross_origin_share": run.cross_origin_share,
        "seconds": {m: r.seconds for m, r in run.methods.items()},
        "pruning_runs": {m: {name: [dataclasses.asdict(x) for x in runs] for name, runs in r.runs.items()}
                         for m, r in run.methods.items()},
        "trajectories": trajectories,
        "frontier": {
            "tolerances": thresholds,
            "flops": {"&".join(run.tasks.ordered_names(c)): {m: frontier(run, m, c, thresholds) for m in run.methods}
                      for c in run.tasks.combinations()},
        },
    }


def seed_results(config: ExperimentConfig, run: SeedRun) -> dict[str, Any]:
    """One seed's JSON-ready results, latency included when measured (`results_from_seeds` assembles them)."""
    seed = _seed_dict(run, config.search_tolerance)
    return seed_latency(seed, run.latency, run.tasks) if run.latency else seed


def _test_accuracy(seed: Mapping[str, Any], method: str, task: str) -> float:
    return next(c for c in seed["combinations"] if c["tasks"] == [task])["accuracy"][method][task]


def results_from_seeds(config: ExperimentConfig, seeds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """JSON-ready results of ``config`` from its seeds' `seed_results` (one per seed of ``config``, in
    order): the per-seed details and a ``summary`` of means ± std over the seeds."""
    if [s["seed"] for s in seeds] != list(config.seeds):
        raise InputError(f"results_from_seeds: results of seeds {[s['seed'] for s in seeds]} for a config of seeds {config.seeds}")
    tasks = list(task_labels(config))
    methods = list(seeds[0]["combinations"][0]["flops"])
    summary_combos = []
    for i, entry in enumerate(seeds[0]["combinations"]):
        summary_combos.append({
            "tasks": entry["tasks"],
            "flops": {m: _mean_std([s["combinations"][i]["flops"][m] for s in seeds]) for m in methods},
            "accuracy": {m: _mean_std([statistics.fmean(s["combinations"][i]["accuracy"][m].values()) for s in seeds])
                         for m in methods},
        })
    accuracy_gap = {
        m: {t: _mean_std([_test_accuracy(s, "pam", t) - _test_accuracy(s, m, t) for s in seeds]) for t in tasks}
        for m in methods if m != "pam"
    }
    results = {
        "config": dataclasses.asdict(config),
        "tasks": tasks,
        "flops_convention": "2 x multiply-accumulates of conv and linear layers per input sample (FlopCounterMode)",
        "accuracy_metric": "mean binary accuracy over the task's labels on the test split",
        "selection": (f"cheapest checkpoint with every task's calibration accuracy within {config.tolerance} "
                      "of its unpruned single-task network"),
        "summary": {
            "seeds": config.seeds,
            "combinations": summary_combos,
            "gain": {m: {k: _mean_std([s["gain"][m][k] for s in seeds]) for k in ("average", "peak")}
                     for m in methods if m != "pam"},
            "reference_accuracy": {t: _mean_std([s["reference_accuracy"][t] for s in seeds]) for t in tasks},
            "test_accuracy_gap_pam_minus": accuracy_gap,
            "matched": {m: all(s["matched"][m] for s in seeds) for m in methods},
        },
        "seeds": list(seeds),
    }
    return summarise_latency(results) if all("latency_gain" in s for s in seeds) else results


def results_dict(config: ExperimentConfig, runs: list[SeedRun]) -> dict[str, Any]:
    """JSON-ready results of ``config`` run on every seed: `results_from_seeds` of the runs' `seed_results`."""
    return results_from_seeds(config, [seed_results(config, r) for r in runs])
