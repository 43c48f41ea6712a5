"""P2: first-order Taylor channel pruning (Molchanov et al., CVPR 2019), for merged networks.

Importance. A channel's importance for task t is the squared first-order Taylor estimate of the
change of t's loss when the channel's output (its neuron layer's value, after a residual addition)
is zeroed — the gate gradient ``Σ_{positions} a_c · ∂L_t/∂a_c`` of a minibatch, squared, averaged
over ``batches`` minibatches. Scores are normalised per task (divided by the task's mean over the
channels it uses), so tasks with larger losses do not dominate, and a channel of task set τ takes
the **sum** of the normalised scores over the tasks in τ, each weighted by the task's accuracy
balance λ_t (`task_balance`): a shared channel is important if the tasks that use it need it
(Sec. 4.5.1: pruning must not take from task A what task B does not need).

Cost. A channel of task set τ costs its FLOPs in every combination S with S ∩ τ ≠ ∅; the pruner
minimises the *expected* FLOPs under a usage distribution over combinations (uniform by default,
`pamfx.analysis.cost.combination_weights`), and ranks channels globally across layers by
importance per expected FLOP (the FLOPs-regularised criterion of Molchanov et al.). Each round
removes the lowest-ranked channels worth a fixed fraction of the expected FLOPs, then fine-tunes
(`pamfx.passes.prune.iterative_prune`). Exclusive and shared groups compete on the same scale.
Residual-coupled channels are one channel of one neuron layer, so they are pruned together.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import fx

from pamfx.analysis.cost import expected_channel_flops
from pamfx.analysis.multitask_view import read_multitask
from pamfx.errors import InputError
from pamfx.ir.task_set import TaskSet, popcount
from pamfx.passes.finetune import TaskLoss
from pamfx.passes.prune import Checkpoint, Evaluate, Trajectory, channel_key, iterative_prune


def _instrumented(gm: fx.GraphModule, layer_nodes: dict[str, str]) -> fx.GraphModule:
    """A copy of ``gm`` whose forward also returns ``{layer: value}`` for every neuron layer."""
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    outputs = graph.graph_copy(gm.graph, val_map)
    by_name = {old.name: new for old, new in val_map.items()}
    graph.output((outputs, {layer: by_name[node] for layer, node in layer_nodes.items()}))
    return fx.GraphModule(gm, graph)


def taylor_importance(
    gm: fx.GraphModule, loader: Iterable, loss_fn: TaskLoss, batches: int = 10
) -> dict[str, dict[str, torch.Tensor]]:
    """Per task and layer, the Taylor importance of every channel for that task's loss (unnormalised)."""
    view = read_multitask(gm)
    layer_nodes = {l.name: l.output_node for l in view.layers.layers}
    probe = _instrumented(gm, layer_nodes).eval()
    scores = {t: {name: torch.zeros(view.records[name].width) for name in layer_nodes} for t in view.tasks}
    seen = 0
    for x, y in loader:
        if seen >= batches:
            break
        outputs, values = probe(x)
        losses = loss_fn(outputs, y)
        for t in view.tasks:
            grads = torch.autograd.grad(losses[t], list(values.values()), retain_graph=True, allow_unused=True)
            for (name, value), grad in zip(values.items(), grads):
                if grad is not None:
                    dims = [d for d in range(value.dim()) if d != 1]
                    scores[t][name] += (value * grad).sum(dim=dims).detach() ** 2
        seen += 1
    if seen == 0:
        raise InputError("taylor_importance: the data loader yielded no batch")
    return {t: {name: s / seen for name, s in per_layer.items()} for t, per_layer in scores.items()}


def task_balance(accuracy: Mapping[str, float], reference: Mapping[str, float], tolerance: float,
                 spare: float = 1.0) -> dict[str, float]:
    """λ_t = exp((reference_t − accuracy_t) / tolerance), at least exp(−``spare``): a task close to (or
    past) its accuracy tolerance weighs its channels up, a task with accuracy to spare weighs them
    down, so pruning takes from the tasks that can afford it (a multiplier in the spirit of a
    Lagrangian).

    Spare accuracy counts for at most ``spare`` tolerances. Unbounded, a merged network 4 points
    above its references (VGG and ResNet merges are) weighed that task's channels down by e^−8: one
    round then took nearly all its exclusive channels and the task fell 10–30 points, so the round
    failed, the step halved, and pruning stopped early (docs/pruning.md, "Accuracy balance")."""
    if spare < 0:
        raise InputError(f"spare must be >= 0, got {spare}")
    scale = max(tolerance, 1e-6)
    return {t: float(torch.exp(torch.tensor((reference[t] - a) / scale).clamp(-spare, 20))) for t, a in accuracy.items()}


def channel_importance(gm: fx.GraphModule, scores: Mapping[str, Mapping[str, torch.Tensor]],
                       balance: Mapping[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Per layer, Σ_{t ∈ τ(c)} λ_t · task t's score normalised by its mean over the channels t uses
    (λ_t = 1 unless ``balance`` gives it)."""
    view = read_multitask(gm)
    out = {name: torch.zeros(rec.width) for name, rec in view.records.items()}
    for t in view.tasks:
        serves = {name: rec.serves(view.tasks.bit(t)) for name, rec in view.records.items()}
        used = torch.cat([scores[t][name][serves[name]] for name in out])
        scale = float(used.mean()) if used.numel() and float(used.mean()) > 0 else 1.0
        scale /= balance.get(t, 1.0) if balance is not None else 1.0
        for name in out:
            out[name] = torch.where(serves[name], out[name] + scores[t][name] / scale, out[name])
    return out


def channels_to_remove(gm: fx.GraphModule, importance: Mapping[str, torch.Tensor],
                       channel_cost: Mapping[str, torch.Tensor], flops_budget: float,
                       protected: set = frozenset(), exclusive: bool = True) -> dict[str, list[int]]:
    """The channels of lowest importance per expected FLOP, until they cost ``flops_budget`` (at least one).

    A task never loses its last channel of a layer, a layer never its last channel, and no channel
    of ``protected`` (`pamfx.passes.prune.channel_key`) is removed. With ``exclusive=False`` the
    channels of one-task groups of a multitask network are kept (the authors' code prunes the
    shared groups only).
    """
    view = read_multitask(gm)
    multitask = len(view.tasks) > 1
    ranked = sorted(
        (float(importance[layer][c]) / max(float(channel_cost[layer][c]), 1.0), layer, c)
        for layer, rec in view.records.items()
        if layer not in view.fixed_layers  # read or written by an op without a channel rule
        for c in range(rec.width)
        if exclusive or not multitask or popcount(rec.task_sets[c]) > 1
    )
    left = {(layer, t): sum(1 for s in rec.task_sets if s & view.tasks.bit(t))
            for layer, rec in view.records.items() for t in view.tasks}
    removal: dict[str, list[int]] = {}
    spent = 0.0
    for _, layer, c in ranked:
        if removal and spent >= flops_budget:
            break
        users = [t for t in view.tasks if view.records[layer].task_sets[c] & view.tasks.bit(t)]
        if any(left[layer, t] <= 1 for t in users) or channel_key(view.records[layer].origins, layer, c) in protected:
            continue
        for t in users:
            left[layer, t] -= 1
        removal.setdefault(layer, []).append(c)
        spent += float(channel_cost[layer][c])
    return removal


def prune_taylor(
    gm: fx.GraphModule,
    train_loader: Iterable,
    loss_fn: TaskLoss,
    evaluate: Evaluate,
    *,
    reference: Mapping[str, float],
    weights: Mapping[TaskSet, float],
    search_tolerance: float,
    tolerance: float | None = None,
    importance_batches: int = 10,
    balance: bool = True,
    balance_spare: float = 1.0,
    exclusive: bool = True,
    **loop: object,
) -> Trajectory:
    """P2 on a merged (or one-task, `pamfx.passes.merge.as_multitask`) network; returns the trajectory.

    ``evaluate(network) -> {task: accuracy}`` runs on calibration data (never the test split);
    ``reference`` holds the accuracies to stay near, ``weights`` the usage distribution over
    combinations. With ``balance`` the tasks' scores are weighted by `task_balance` of the current
    calibration accuracies on the scale of ``tolerance`` (default ``search_tolerance``; a no-op for
    one task), spare accuracy counting for at most ``balance_spare`` tolerances; ``exclusive=False``
    prunes the shared groups only (`channels_to_remove`). ``loop`` takes the round-loop options of
    `iterative_prune` (``step_fraction``, ``finetune_steps``, ``lr``, ``floor``, ``max_rounds``,
    ``patience``, ``seed``, ``schedule``, ``per_component``, ``rescue_steps``, ``progress``); ``tolerance``
    is also the round loop's rescue threshold.
    """
    scored: dict[str, object] = {}  # this round's scores: a round may ask once per component (`Propose`)

    def propose(point: Checkpoint, budget: float, protected: set) -> dict[str, list[int]]:
        network = point.network
        if scored.get("point") is not point:
            lam = (task_balance(point.accuracy, reference, tolerance if tolerance is not None else search_tolerance,
                                balance_spare) if balance else None)
            scored.update(point=point, cost=expected_channel_flops(network, weights), importance=channel_importance(
                network, taylor_importance(network, train_loader, loss_fn, importance_batches), lam))
        return channels_to_remove(network, scored["importance"], scored["cost"], budget, protected, exclusive)

    return iterative_prune(gm, propose, train_loader, loss_fn, evaluate, reference=reference, weights=weights,
                           search_tolerance=search_tolerance, tolerance=tolerance, **loop)
