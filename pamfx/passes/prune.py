"""Structured pruning P2: first-order Taylor channel importance (Molchanov et al., CVPR 2019).

A channel's importance for task t is the squared first-order Taylor estimate of the change of
task t's loss when the channel's output (the neuron layer's value, after a residual addition)
is zeroed: ``(Σ_{batch, positions} a_c · ∂L_t/∂a_c)²`` per minibatch, averaged over minibatches.
Residual-coupled channels are one channel of one neuron layer, so they are pruned together.

Pruning alternates over the per-task subgraphs (A → B → … → A, Sec. 4.5.1 / 4.6.1): in task t's
turn the candidates are the channels that task t uses (t ∈ τ(c)), scored with t's loss; the
least important fraction is removed by `select_channels` (real modules shrink, no masks), the
network is fine-tuned, and the step is kept only if every task's validation accuracy stays
within the tolerance of its reference; otherwise the step is halved (down to one channel), and a
task whose one-channel step is rejected is done. Pruning stops when every task is done, at a FLOPs target, or after
``max_rounds``. The same pass on a one-task network (`as_multitask`) is baseline 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch
from torch import fx
from tqdm.auto import tqdm

from pamfx.analysis.cost import channel_flops, cost
from pamfx.analysis.multitask_view import MultitaskView, read_multitask
from pamfx.errors import InputError
from pamfx.passes.finetune import TaskLoss, finetune
from pamfx.passes.select_channels import select_channels

Evaluate = Callable[[fx.GraphModule], Mapping[str, float]]


@dataclass
class PruneStep:
    round: int
    task: str
    removed: int
    accepted: bool
    flops: int
    accuracy: dict[str, float]


@dataclass
class PruneResult:
    """The pruned network, the accuracy it was held to, and every step taken."""

    network: fx.GraphModule
    reference: dict[str, float]
    accuracy: dict[str, float]
    steps: list[PruneStep] = field(default_factory=list)


def _instrumented(gm: fx.GraphModule, layer_nodes: dict[str, str]) -> fx.GraphModule:
    """A copy of ``gm`` whose forward also returns ``{layer: value}`` for every neuron layer."""
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    outputs = graph.graph_copy(gm.graph, val_map)
    by_name = {old.name: new for old, new in val_map.items()}
    graph.output((outputs, {layer: by_name[node] for layer, node in layer_nodes.items()}))
    return fx.GraphModule(gm, graph)


def taylor_importance(
    gm: fx.GraphModule, loader: Iterable, loss_fn: TaskLoss, task: str, max_batches: int = 8
) -> dict[str, torch.Tensor]:
    """Per layer, the Taylor importance of every channel for ``task``'s loss."""
    view = read_multitask(gm)
    layer_nodes = {l.name: l.output_node for l in view.layers.layers}
    probe = _instrumented(gm, layer_nodes).eval()
    scores = {name: torch.zeros(view.records[name].width) for name in layer_nodes}
    batches = 0
    for x, y in loader:
        if batches >= max_batches:
            break
        outputs, values = probe(x)
        loss = loss_fn({task: outputs[task]}, y)[task]
        grads = torch.autograd.grad(loss, list(values.values()), allow_unused=True)
        for (name, value), grad in zip(values.items(), grads):
            if grad is not None:
                dims = [d for d in range(value.dim()) if d != 1]
                scores[name] += (value * grad).sum(dim=dims).detach() ** 2
        batches += 1
    if batches == 0:
        raise InputError("taylor_importance: the data loader yielded no batch")
    return {name: s / batches for name, s in scores.items()}


def _channels_to_remove(view: MultitaskView, scores: dict[str, torch.Tensor], task: str, count: int) -> dict[str, list[int]]:
    """The ``count`` least important channels task ``task`` uses, never a layer's last channel."""
    bit = view.tasks.bit(task)
    candidates = sorted(
        (float(scores[layer][c]), layer, c)
        for layer, record in view.records.items()
        if layer not in view.fixed_layers
        for c, t in enumerate(record.task_sets)
        if t & bit
    )
    left = {layer: record.width for layer, record in view.records.items()}
    removal: dict[str, list[int]] = {}
    taken = 0
    for _, layer, c in candidates:
        if taken >= count:
            break
        if left[layer] > 1:
            removal.setdefault(layer, []).append(c)
            left[layer] -= 1
            taken += 1
    return removal


def _without(view: MultitaskView, removal: dict[str, list[int]]) -> fx.GraphModule:
    keep = {layer: [c for c in range(view.records[layer].width) if c not in set(cs)] for layer, cs in removal.items()}
    return select_channels(view.gm, keep)


def prune_taylor(
    gm: fx.GraphModule,
    train_loader: Iterable,
    loss_fn: TaskLoss,
    evaluate: Evaluate,
    *,
    tolerance: float = 0.005,
    reference: Mapping[str, float] | None = None,
    step_fraction: float = 0.1,
    finetune_steps: int = 60,
    lr: float = 1e-3,
    importance_batches: int = 8,
    cost_aware: bool = True,
    flops_target: float | None = None,
    max_rounds: int = 200,
    seed: int = 0,
    progress: bool = True,
) -> PruneResult:
    """Prune a merged (or one-task) network channel by channel; see the module docstring.

    ``evaluate(network) -> {task: accuracy}`` is run on validation data (never the test split).
    ``reference`` is the accuracy each task must stay within ``tolerance`` of (default: the
    accuracy of ``gm`` itself). ``cost_aware`` ranks channels by importance per FLOP they cost
    (the FLOPs-regularised criterion of Molchanov et al.; the objective here is FLOPs), else by
    importance alone. ``flops_target`` stops at that many FLOPs for all tasks together.
    """
    if not 0 < step_fraction <= 1:
        raise InputError(f"step_fraction must be in (0, 1], got {step_fraction}")
    if tolerance < 0:
        raise InputError(f"tolerance must be >= 0, got {tolerance}")
    tasks = list(read_multitask(gm).tasks)
    reference = dict(reference) if reference is not None else dict(evaluate(gm))
    accuracy = dict(evaluate(gm))
    fraction = {t: step_fraction for t in tasks}
    result = PruneResult(gm, reference, accuracy)
    flops_now = cost(gm).flops
    bar = tqdm(total=max_rounds, desc="prune", disable=not progress, leave=False)
    for round_ in range(max_rounds):
        active = [t for t in tasks if fraction[t] > 0]
        if not active or (flops_target is not None and flops_now <= flops_target):
            break
        task = active[round_ % len(active)]
        view = read_multitask(result.network)
        bit = view.tasks.bit(task)
        usable = sum(1 for r in view.records.values() for t in r.task_sets if t & bit)
        count = max(1, math.floor(fraction[task] * usable))
        scores = taylor_importance(result.network, train_loader, loss_fn, task, importance_batches)
        if cost_aware:
            flops = channel_flops(result.network)
            scores = {layer: s / flops[layer].clamp_min(1.0).to(s.dtype) for layer, s in scores.items()}
        removal = _channels_to_remove(view, scores, task, count)
        if not removal:
            fraction[task] = 0.0
            continue
        candidate = finetune(
            _without(view, removal), train_loader, loss_fn,
            epochs=0, max_steps=finetune_steps, lr=lr, recalibrate_bn=False, seed=seed + round_, progress=False,
        )
        acc = dict(evaluate(candidate))
        ok = all(acc[t] >= reference[t] - tolerance for t in tasks)
        removed = sum(len(v) for v in removal.values())
        candidate_flops = cost(candidate).flops
        result.steps.append(PruneStep(round_, task, removed, ok, candidate_flops, acc))
        if ok:
            result.network, result.accuracy, flops_now = candidate, acc, candidate_flops
        else:
            fraction[task] = 0.0 if count == 1 else fraction[task] / 2
        bar.update(1)
        bar.set_postfix(task=task, flops=flops_now, ok=ok)
    bar.close()
    return result
