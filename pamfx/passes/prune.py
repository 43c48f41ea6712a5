"""The pruning protocol shared by P1 and P2: trajectories, matched-accuracy selection, noise check.

A pruner does not return one network. It records a **trajectory** (Sec. 4.6.1 "pruned while
preserving almost the same inference accuracy", made checkable): after every round, the FLOPs of
every task combination, the expected FLOPs under the usage distribution over combinations, and
every task's accuracy on the *calibration* split. The comparison then picks, per method, the
cheapest checkpoint at which every task stays within ``tolerance`` of its unpruned single-task
network (`Trajectory.select`), and only that checkpoint is ever evaluated on the test split.

`iterative_prune` is the round loop of P2 (and of any score-based pruner): a round removes the
channels a ``propose`` function picks, fine-tunes, evaluates; a round that leaves a task more than
``search_tolerance`` below its reference is *skipped* (reverted, step halved; an accepted round
doubles it again, up to ``step_fraction``, so one failure near a hard channel does not leave every
later round removing a single channel), and pruning goes on until a FLOPs floor, ``max_rounds``, or
``patience`` failed rounds in a row. A channel whose removal
alone failed a round is protected from then on, so one indispensable channel (the last few of a
first conv layer, say) does not end the search for cheaper channels elsewhere.

`recover` is the long fine-tune of the authors' schedule, given to every method alike: accepted
checkpoints cheaper than the selection (they missed the tolerance) are fine-tuned for longer,
searched by bisection, and the cheapest that comes back within the tolerance is kept.

Tasks that share no channel are independent components (`pamfx.analysis.task_components`). With
``per_component`` they are pruned apart in the same rounds (`iterative_prune`) and recovered apart
(`recover`); each can stop at its own checkpoint (`Trajectory.select_components`), and
`compose_selection` records the network composed of those parts (`pamfx.passes.compose_components`).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from torch import fx

from pamfx.analysis.cost import merged_cost
from pamfx.analysis.multitask_view import MultitaskView, read_multitask
from pamfx.analysis.task_components import task_components
from pamfx.errors import InputError
from pamfx.ir.task_set import TaskSet, TaskSpace
from pamfx.passes.compose_components import compose_components
from pamfx.passes.finetune import TaskLoss, finetune
from pamfx.passes.select_channels import select_channels
from pamfx.progress import progress_bar

Evaluate = Callable[[fx.GraphModule], Mapping[str, float]]
#: ``propose(checkpoint, flops_budget, protected) -> {layer: [channels to remove]}``: the channels a
#: round removes from the current checkpoint's network (its calibration accuracies may steer the
#: choice), never a channel of ``protected`` (``(layer, origin)`` pairs, see `channel_key`). A round
#: that prunes independent components apart asks once per component with the same checkpoint
#: object, and each round with a new one, so a pruner may score channels once per checkpoint object.
Propose = Callable[["Checkpoint", float, set], Mapping[str, list[int]]]


@dataclass
class Checkpoint:
    """One point of a pruning trajectory; ``network`` is kept for accepted points only."""

    round: int
    flops: dict[TaskSet, int]
    expected_flops: float
    accuracy: dict[str, float]
    accepted: bool
    network: fx.GraphModule | None = None

    def deficit(self, reference: Mapping[str, float], tasks: Iterable[str] | None = None) -> float:
        """The largest accuracy drop below the reference over ``tasks`` (default all; negative: all above)."""
        names = self.accuracy if tasks is None else tasks
        return max(reference[t] - self.accuracy[t] for t in names)

    def component_flops(self, component: TaskSet, weights: Mapping[TaskSet, float]) -> float:
        """The expected FLOPs of an independent component's channels, Σ_S w(S)·FLOPs(S ∩ component);
        for all tasks, `expected_flops` (the same sum, in the same order)."""
        return sum(weights[s] * self.flops[s & component] for s in self.flops if s & component)


@dataclass
class Trajectory:
    """Every round of one pruning run, with the reference accuracies it is held to."""

    tasks: TaskSpace
    reference: dict[str, float]
    weights: dict[TaskSet, float]
    checkpoints: list[Checkpoint] = field(default_factory=list)

    def record(self, round_: int, network: fx.GraphModule, accuracy: Mapping[str, float], accepted: bool) -> Checkpoint:
        view = read_multitask(network)  # read once for every combination
        flops = {c: merged_cost(view, c).flops for c in self.tasks.combinations()}
        point = Checkpoint(round_, flops, sum(self.weights[c] * f for c, f in flops.items()), dict(accuracy), accepted,
                           network if accepted else None)
        self.checkpoints.append(point)
        return point

    def record_components(self, round_: int, candidate: fx.GraphModule, accuracy: Mapping[str, float],
                          passed: Mapping[TaskSet, bool], previous: Checkpoint, evaluate: Evaluate) -> Checkpoint:
        """Record a round whose independent components (the keys of ``passed``) are judged apart:
        ``candidate`` as it is where every component passed (accepted) or none did (rejected);
        otherwise, accepted, the network composed of ``candidate``'s passing components and
        ``previous``'s others (`compose`; exact, as the components share no channel), evaluated by
        ``evaluate``. So one component's failure does not undo the others' progress."""
        if all(passed.values()) or not any(passed.values()):
            return self.record(round_, candidate, accuracy, accepted=all(passed.values()))
        network = self.compose({c: candidate if ok else previous.network for c, ok in passed.items()})
        return self.record(round_, network, evaluate(network), accepted=True)

    def accepted(self) -> list[Checkpoint]:
        return [c for c in self.checkpoints if c.accepted]

    def select(self, tolerance: float) -> Checkpoint:
        """The cheapest accepted checkpoint (expected FLOPs) with every task within ``tolerance``.

        When no checkpoint qualifies (the unpruned network itself is below the reference), the one
        with the smallest accuracy deficit is returned; `within` tells the caller.
        """
        return self.select_components(tolerance, [self.tasks.all])[self.tasks.all]

    def within(self, checkpoint: Checkpoint, tolerance: float, tasks: Iterable[str] | None = None) -> bool:
        return checkpoint.deficit(self.reference, tasks) <= tolerance + 1e-12

    def components(self) -> list[TaskSet]:
        """The independent task components of the unpruned network (`task_components`); pruning
        only removes channels, so they stay independent in every checkpoint."""
        return task_components(read_multitask(self.checkpoints[0].network))

    def compose(self, parts: Mapping[TaskSet, fx.GraphModule]) -> fx.GraphModule:
        """One network whose component ``c`` is ``parts[c]``'s, all pruned from this trajectory's start
        (`compose_components`)."""
        return compose_components(parts, base=self.checkpoints[0].network)

    def select_components(self, tolerance: float, components: Iterable[TaskSet]) -> dict[TaskSet, Checkpoint]:
        """`select` per independent component: the accepted checkpoint cheapest in the component's
        expected FLOPs with the component's tasks within ``tolerance`` (else the least deficient
        for them). For the single component of all tasks, exactly `select`."""
        candidates = self.accepted()
        if not candidates:
            raise InputError("the trajectory has no accepted checkpoint")
        chosen = {}
        for component in components:
            names = self.tasks.ordered_names(component)
            matched = [c for c in candidates if self.within(c, tolerance, names)]
            if matched:
                chosen[component] = min(matched, key=lambda c: (c.component_flops(component, self.weights), c.round))
            else:
                chosen[component] = min(candidates, key=lambda c: (c.deficit(self.reference, names),
                                                                   c.component_flops(component, self.weights)))
        return chosen


def tasks_within(accuracy: Mapping[str, float], reference: Mapping[str, float], tasks: Iterable[str],
                 tolerance: float) -> bool:
    """Whether every task of ``tasks`` is at most ``tolerance`` below its reference: how a round, a
    VIB checkpoint or a recovery fine-tune is judged, per independent component."""
    return all(accuracy[t] >= reference[t] - tolerance for t in tasks)


def channel_key(record_origins: tuple[tuple[str, int], ...], layer: str, channel: int) -> tuple[str, str, int]:
    """A channel's identity that survives channel selection: its layer and its origin (task, index)."""
    return (layer, *record_origins[channel])


def accuracy_standard_error(accuracy: float, samples: int, labels: int = 1) -> float:
    """Binomial standard error of a mean binary accuracy over ``samples`` × ``labels`` decisions."""
    if samples < 1 or labels < 1:
        raise InputError(f"samples and labels must be >= 1, got {samples} and {labels}")
    p = min(max(accuracy, 0.0), 1.0)
    return math.sqrt(max(p * (1 - p), 1e-12) / (samples * labels))


def check_calibration_noise(reference: Mapping[str, float], samples: int, labels: Mapping[str, int],
                            tolerance: float, strict: bool = False) -> dict[str, float]:
    """Warn (or with ``strict`` raise `InputError`) when the tolerance is below 2 standard errors.

    The calibration split decides which checkpoint counts as "within tolerance"; when the
    tolerance is smaller than the accuracy estimate's noise, chance decides instead. Returns the
    standard error per task.
    """
    errors = {t: accuracy_standard_error(a, samples, labels[t]) for t, a in reference.items()}
    noisy = {t: e for t, e in errors.items() if 2 * e > tolerance}
    if noisy:
        worst = max(noisy.values())
        needed = math.ceil(samples * (2 * worst / tolerance) ** 2) if tolerance > 0 else None
        message = (f"the accuracy tolerance {tolerance:.4f} is below 2 standard errors of the calibration accuracy "
                   f"({', '.join(f'{t}: {2 * e:.4f}' for t, e in noisy.items())}) with {samples} calibration samples; "
                   + (f"use about {needed} samples or a larger tolerance" if needed else "use a tolerance > 0"))
        if strict:
            raise InputError(message)
        warnings.warn(message, stacklevel=2)
    return errors


def iterative_prune(
    gm: fx.GraphModule,
    propose: Propose,
    train_loader: Iterable,
    loss_fn: TaskLoss,
    evaluate: Evaluate,
    *,
    reference: Mapping[str, float],
    weights: Mapping[TaskSet, float],
    search_tolerance: float,
    step_fraction: float = 0.1,
    finetune_steps: int = 100,
    lr: float = 1e-3,
    floor: float = 0.01,
    max_rounds: int = 60,
    patience: int = 3,
    seed: int = 0,
    schedule: str = "cosine",
    per_component: bool = False,
    tolerance: float | None = None,
    rescue_steps: int = 0,
    progress: bool = True,
) -> Trajectory:
    """Prune ``gm`` round by round (see the module docstring); ``gm`` itself is not modified.

    Each round asks ``propose`` for channels worth about ``step_fraction`` of the current expected
    FLOPs, removes them (`select_channels`), fine-tunes ``finetune_steps`` minibatches and
    evaluates on calibration data. ``floor`` is the fraction of the initial expected FLOPs at
    which pruning stops; ``schedule`` is the fine-tune's learning-rate schedule (`finetune`).

    With ``per_component``, the independent components of ``gm`` (`task_components`) are pruned
    apart in the same rounds, as if each were pruned on its own: each has its own step, failure
    count and patience, ``propose`` is asked for each component's channels (the others protected),
    and a round keeps the pruned and fine-tuned version of the components whose tasks stayed within
    ``search_tolerance`` and the previous version of the others, those that failed or were done
    (`compose_components`).

    With ``rescue_steps`` > 0, a round that leaves a pruned task more than ``tolerance`` (the
    selection tolerance, default ``search_tolerance``) below its reference is fine-tuned
    ``rescue_steps`` more minibatches before it is judged. Without it each accepted round keeps the
    accuracy its short fine-tune did not win back, the losses add up until the search tolerance
    stops the run, and where that drift crosses the selection tolerance depends on the data order
    (docs/pruning.md, "Rescue").
    """
    if not 0 < step_fraction <= 1:
        raise InputError(f"step_fraction must be in (0, 1], got {step_fraction}")
    if search_tolerance < 0 or not 0 <= floor < 1 or patience < 1 or max_rounds < 0 or rescue_steps < 0:
        raise InputError("need search_tolerance >= 0, 0 <= floor < 1, patience >= 1, max_rounds >= 0 and rescue_steps >= 0")
    drift = search_tolerance if tolerance is None else tolerance
    tasks = read_multitask(gm).tasks
    trajectory = Trajectory(tasks, dict(reference), dict(weights))
    current = trajectory.record(0, gm, evaluate(gm), accepted=True)
    components = trajectory.components() if per_component else [tasks.all]
    start = current.expected_flops
    fraction, failures = dict.fromkeys(components, step_fraction), dict.fromkeys(components, 0)
    protected: set[tuple[str, str, int]] = set()
    with progress_bar(total=max_rounds, desc="prune", enabled=progress) as bar:
        for round_ in range(1, max_rounds + 1):
            active = [c for c in components if failures[c] < patience]
            if current.expected_flops <= floor * start or not active:
                break
            view = read_multitask(current.network)
            asked, proposals = dataclasses.replace(current), {}  # one object per round: a pruner scores once a round
            for c in active:
                others = protected | _other_channels(view, c)
                removal = {k: v for k, v in propose(asked, fraction[c] * current.component_flops(c, weights),
                                                    others).items() if v}
                if removal:
                    proposals[c] = removal
            if not proposals:
                break
            removal: dict[str, list[int]] = {}
            for part in proposals.values():
                for layer, channels in part.items():
                    removal.setdefault(layer, []).extend(channels)
            keep = {layer: [c for c in range(view.records[layer].width) if c not in set(cs)] for layer, cs in removal.items()}
            candidate = finetune(select_channels(current.network, keep), train_loader, loss_fn, epochs=0,
                                 max_steps=finetune_steps, lr=lr, recalibrate_bn=False, seed=seed + round_, schedule=schedule,
                                 progress=False)
            accuracy = evaluate(candidate)
            if rescue_steps and any(reference[t] - accuracy[t] > drift for c in proposals for t in tasks.ordered_names(c)):
                candidate = finetune(candidate, train_loader, loss_fn, epochs=0, max_steps=rescue_steps, lr=lr,
                                     recalibrate_bn=False, seed=seed + round_ + max_rounds, schedule=schedule,
                                     progress=False)
                accuracy = evaluate(candidate)
            ok = {c: tasks_within(accuracy, reference, tasks.ordered_names(c), search_tolerance) for c in proposals}
            # a component not pruned this round stays as it was
            point = trajectory.record_components(round_, candidate, accuracy, {c: ok.get(c, False) for c in components},
                                                 current, evaluate)
            for c, removal in proposals.items():
                if ok[c]:
                    failures[c], fraction[c] = 0, min(step_fraction, 2 * fraction[c])
                else:
                    fraction[c], failures[c] = fraction[c] / 2, failures[c] + 1
                    if sum(len(v) for v in removal.values()) == 1:
                        (layer, (ch,)), = removal.items()
                        protected.add(channel_key(view.records[layer].origins, layer, ch))
            if point.accepted:
                current = point
            bar.update(1)
            bar.set_postfix(mflops=f"{current.expected_flops / 1e6:.3f}", ok=point.accepted)
    return trajectory


def _other_channels(view: MultitaskView, component: TaskSet) -> set[tuple[str, str, int]]:
    """The `channel_key` of every channel outside ``component`` (none when it holds every task)."""
    return {channel_key(rec.origins, name, c) for name, rec in view.records.items()
            for c, t in enumerate(rec.task_sets) if not t & component}


def compose_selection(trajectory: Trajectory, evaluate: Evaluate, tolerance: float) -> Checkpoint | None:
    """Where the pruned network has independent components (`task_components`; the unshared merge
    has one per task), let each stop at its own selection: record the network composed of every
    component's `Trajectory.select_components` checkpoint (`compose_components`), evaluated on the
    calibration split, and return it (None where one checkpoint is every component's selection).
    Each task computes what it computes in its component's checkpoint, so the composition is
    within the tolerance wherever those are, and no dearer in any combination than `select`."""
    chosen = trajectory.select_components(tolerance, trajectory.components())
    if len({id(point) for point in chosen.values()}) == 1:
        return None
    network = trajectory.compose({c: p.network for c, p in chosen.items()})
    return trajectory.record(max(p.round for p in chosen.values()), network, evaluate(network), accepted=True)


def recover(
    trajectory: Trajectory,
    train_loader: Iterable,
    loss_fn: TaskLoss,
    evaluate: Evaluate,
    *,
    tolerance: float,
    candidates: int = 3,
    epochs: int = 2,
    lr: float = 1e-3,
    seed: int = 0,
    schedule: str = "cosine",
    per_component: bool = True,
    progress: bool = True,
) -> Checkpoint | None:
    """Fine-tune accepted checkpoints cheaper than the current selection for ``epochs`` and add
    the cheapest one found that comes back within ``tolerance`` on the calibration split to the
    trajectory (so it becomes the selection); return it, or None.

    The more a checkpoint was pruned, the less it recovers, so the search is a bisection over the
    cheaper checkpoints: ``candidates`` fine-tunes find the cheapest recoverable one among
    2^candidates − 1 of them (the cheapest three were tried in turn before; on merged networks,
    whose cheapest checkpoints are far below the tolerance, that spent every fine-tune where none
    could succeed). With ``per_component``, a network with independent components
    (`Trajectory.components`) bisects for each component at once: every fine-tune trains the
    composition of the components' current candidates (`Trajectory.compose`), and each component
    judges it by its own tasks; the recovered components are composed at the end. The trajectory's
    networks are not modified."""
    if candidates < 0 or epochs < 1:
        raise InputError(f"need candidates >= 0 and epochs >= 1, got {candidates} and {epochs}")
    components = trajectory.components() if per_component else [trajectory.tasks.all]
    chosen = trajectory.select_components(tolerance, components)
    cheaper = {}
    for c in components:
        def flops(p: Checkpoint, c: TaskSet = c) -> float:
            return p.component_flops(c, trajectory.weights)
        cheaper[c] = sorted((p for p in trajectory.accepted() if flops(p) < flops(chosen[c])), key=flops)
    bounds = {c: (0, len(cheaper[c])) for c in components}
    found: dict[TaskSet, tuple[Checkpoint, fx.GraphModule, dict[str, float]]] = {}
    steps = max(len(points).bit_length() for points in cheaper.values())
    with progress_bar(total=min(candidates, steps), desc="recover", enabled=progress) as bar:
        for _ in range(candidates):
            picks = {c: cheaper[c][(low + high) // 2] for c, (low, high) in bounds.items() if low < high}
            if not picks:
                break
            network = (copy.deepcopy(next(iter(picks.values())).network) if len(components) == 1 else
                       trajectory.compose({c: picks[c].network if c in picks else chosen[c].network
                                           for c in components}))
            network = finetune(network, train_loader, loss_fn, epochs=epochs, lr=lr, recalibrate_bn=False,
                               seed=seed + max(p.round for p in picks.values()), schedule=schedule, progress=False)
            accuracy = evaluate(network)
            for c, point in picks.items():
                low, high = bounds[c]
                middle = (low + high) // 2
                if tasks_within(accuracy, trajectory.reference, trajectory.tasks.ordered_names(c), tolerance):
                    found[c], bounds[c] = (point, network, accuracy), (low, middle)
                else:
                    bounds[c] = (middle + 1, high)
            bar.update(1)
    if not found:
        return None
    if len(components) == 1:
        point, network, accuracy = found[components[0]]
        return trajectory.record(point.round, network, accuracy, accepted=True)
    network = trajectory.compose({c: found[c][1] if c in found else chosen[c].network for c in components})
    rounds = [found[c][0].round if c in found else chosen[c].round for c in components]
    return trajectory.record(max(rounds), network, evaluate(network), accepted=True)
