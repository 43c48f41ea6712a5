"""P1: variational-information-bottleneck channel pruning (Dai et al., ICML 2018), for merged networks.

Every prunable neuron layer gets one multiplicative gate per channel on its value (after BN,
activation and pooling: the layer's output node), ``z = μ + ε·exp(½·logD)`` with ε ~ N(0, 1) while
training and ``z = μ`` on the kept channels (0 elsewhere) at evaluation. Initialisation, KL term and threshold follow VIBNet:
μ ~ N(1, 0.01), logD ~ N(−9, 0.01), ``KL = ½·log(1 + μ²/σ²)`` per channel, and a channel is
kept iff ``log α = log(σ²/μ²) < 0``. The loss is Σ_t L_t + β · Σ_c kl_mult_c · KL_c (β annealed upwards, see `prune_vib`),
where ``kl_mult`` is proportional to the channel's *expected* FLOPs over the task combinations
that run it (the paper's per-layer kl_mult, made cost-aware) and averages 1.

Schedule (Sec. 4.6.1): for a merged network, a joint phase (all tasks' losses) for the first half of
the epochs, then an alternating per-task phase (A → B → … per minibatch). Tasks take turns only
within an independent component (`task_components`): the networks of the unshared merge each train
on every minibatch, as baseline 1's single networks do. After every epoch the
gates are folded into the consumers' weights — a gate scales its channel's columns in every
dense op and head that reads the layer, exactly — pruned channels are removed with
`select_channels`, and the network is recorded in the trajectory, so `emit` and `cost` apply
unchanged; independent components are accepted apart, as baseline 1's networks are. Layers read
by a residual addition or an identity shortcut are not gated (a gate there cannot be folded into a
weight), as in the paper, which prunes ResNets with P2 only.
"""
from __future__ import annotations

import copy
from typing import Iterable, Mapping

import torch
from torch import fx, nn

from pamfx.analysis.cost import expected_channel_flops
from pamfx.analysis.channel_rules import Role
from pamfx.analysis.layer_organisation import Submodules
from pamfx.analysis.multitask_view import MultitaskView, read_multitask
from pamfx.analysis.task_components import task_components
from pamfx.errors import InputError
from pamfx.ir.task_set import TaskSet
from pamfx.passes.finetune import TaskLoss, finetune
from pamfx.passes.module_surgery import rebuild, set_module
from pamfx.passes.prune import Evaluate, Trajectory, tasks_within
from pamfx.passes.select_channels import select_channels


class VIBGates(nn.Module):
    """One information-bottleneck gate per channel of a neuron layer (VIBNet's parameterisation)."""

    def __init__(self, channels: int, generator: torch.Generator | None = None):
        super().__init__()
        self.mu = nn.Parameter(1 + 0.01 * torch.randn(channels, generator=generator))
        self.log_d = nn.Parameter(-9 + 0.01 * torch.randn(channels, generator=generator))

    def _shape(self, x: torch.Tensor) -> tuple[int, ...]:
        return (1, -1) + (1,) * (x.dim() - 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            z = self.mu + torch.randn_like(self.mu) * torch.exp(0.5 * self.log_d)
        else:
            z = self.mu * self.keep()
        return x * z.view(self._shape(x))

    def kl(self) -> torch.Tensor:
        """Per channel, ½·log(1 + μ²/σ²)."""
        return 0.5 * torch.log1p(self.mu**2 / torch.exp(self.log_d))

    def log_alpha(self) -> torch.Tensor:
        return self.log_d - torch.log(self.mu**2 + 1e-12)

    def keep(self) -> torch.Tensor:
        return self.log_alpha() < 0


def gateable_layers(view: MultitaskView) -> list[str]:
    """The layers whose output node is read only by dense ops and heads (directly or after a flatten),
    except those an op without a channel rule reads or writes (their channels stay)."""
    roles = view.layers.nodes
    nodes = {n.name: n for n in view.gm.graph.nodes}

    def dense_only(node: fx.Node) -> bool:
        for user in node.users:
            role = roles[user.name].role if user.name in roles else None
            if role == Role.FLATTEN:
                if not dense_only(user):
                    return False
            elif role not in (Role.DENSE, Role.HEAD):
                return False
        return bool(node.users)

    return [l.name for l in view.layers.layers
            if l.name not in view.fixed_layers and dense_only(nodes[l.output_node])]


def gated_network(gm: fx.GraphModule, layers: list[str], seed: int = 0) -> tuple[fx.GraphModule, dict[str, VIBGates]]:
    """A module running ``gm``'s graph with a `VIBGates` after the output node of each of ``layers``.

    It shares ``gm``'s parameters (training it trains ``gm``); the gates are new submodules.
    """
    view = read_multitask(gm)
    generator = torch.Generator().manual_seed(seed)
    root = nn.Module()
    root.net = gm
    gates = {layer: VIBGates(view.records[layer].width, generator) for layer in layers}
    root.gates = nn.ModuleDict({f"g{i}": g for i, g in enumerate(gates.values())})
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    outputs = graph.graph_copy(gm.graph, val_map)
    by_name = {old.name: new for old, new in val_map.items()}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            node.target = f"net.{node.target}"
    for i, layer in enumerate(layers):
        value = by_name[view.layers.layer(layer).output_node]
        with graph.inserting_after(value):
            gate = graph.call_module(f"gates.g{i}", (value,))
        value.replace_all_uses_with(gate, delete_user_cb=lambda user: user is not gate)
    graph.output(outputs)
    return fx.GraphModule(root, graph), gates


def fold_gates(gm: fx.GraphModule, scales: Mapping[str, torch.Tensor]) -> fx.GraphModule:
    """A copy of ``gm`` in which every dense op and head reading a layer of ``scales`` has its
    input columns multiplied by that layer's per-channel scale: ``W·diag(z)·h`` exactly."""
    view = read_multitask(gm)
    new = copy.deepcopy(gm)
    modules = Submodules(new)
    for node in new.graph.nodes:
        info = view.layers.nodes.get(node.name)
        if info is None or info.role not in (Role.DENSE, Role.HEAD) or info.source not in scales or node.op != "call_module":
            continue
        module = modules[node.target]
        block = view.layers.nodes[node.args[0].name].block
        z = scales[info.source].detach().to(module.weight.dtype)
        column = z.repeat_interleave(block) if block > 1 else z
        shape = (1, -1) + (1,) * (module.weight.dim() - 2)
        set_module(new, node.target, rebuild(module, weight=module.weight.detach() * column.view(shape)))
    return new


def fold_and_prune(gm: fx.GraphModule, gates: Mapping[str, VIBGates]) -> fx.GraphModule:
    """The deterministic gated network (``z = μ``, pruned gates 0) as a plain merged network:
    gates folded into the consumers, channels with log α ≥ 0 removed. A task keeps at least its
    most open channel of every layer."""
    view = read_multitask(gm)
    keep: dict[str, list[int]] = {}
    scales: dict[str, torch.Tensor] = {}
    for layer, gate in gates.items():
        with torch.no_grad():
            kept = gate.keep().clone()
            log_alpha = gate.log_alpha()
            for t in view.tasks:
                serves = view.records[layer].serves(view.tasks.bit(t))
                if not bool((kept & serves).any()):
                    kept[int(torch.where(serves, log_alpha, torch.full_like(log_alpha, float("inf"))).argmin())] = True
            scales[layer] = gate.mu.detach() * kept
        keep[layer] = torch.nonzero(kept).flatten().tolist()
    return select_channels(fold_gates(gm, scales), keep)


def prune_vib(
    gm: fx.GraphModule,
    train_loader: Iterable,
    loss_fn: TaskLoss,
    evaluate: Evaluate,
    *,
    reference: Mapping[str, float],
    weights: Mapping[TaskSet, float],
    search_tolerance: float,
    epochs: int = 8,
    kl_weight: float = 1e-4,
    kl_growth: float = 1.5,
    lr: float = 1e-3,
    gate_lr: float = 1e-2,
    alternate: bool = True,
    patience: int = 3,
    checkpoints: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> Trajectory:
    """P1 on a merged (or one-task) network; returns the trajectory (``checkpoints`` per epoch).

    With ``alternate`` (the paper's schedule) the second half of the epochs alternates per task;
    otherwise every epoch is joint. The KL weight starts at ``kl_weight`` and grows by ``kl_growth`` per epoch (KL annealing): the
    gates of a constant weight cross the threshold almost together, within an epoch, which leaves
    no trajectory to select from; a growing weight prunes a few more channels every epoch.
    ``checkpoints`` > 1 splits every epoch into that many equal runs of minibatches, each followed
    by a checkpoint, with the KL weight grown by ``kl_growth ** (1 / checkpoints)`` after each: the
    same schedule, sampled finer where a merged network's gates close within one epoch.
    ``gm`` itself is not modified. Independent task components (`task_components`; the unshared
    merge has one per task) are judged apart, as if each were pruned on its own: a component whose
    tasks fall more than ``search_tolerance`` below their references fails the checkpoint, and
    after ``patience`` epochs' worth of failures in a row it is done. A checkpoint where every
    component passes is recorded as it is, one where none does as rejected, and otherwise the
    network composed of the passing components' new version and the others' last accepted one
    (`Trajectory.record_components`). Training stops when every component is done.
    """
    if epochs < 1 or kl_weight < 0 or kl_growth < 1 or patience < 1 or checkpoints < 1:
        raise InputError(f"need epochs >= 1, kl_weight >= 0, kl_growth >= 1, patience >= 1 and checkpoints >= 1, "
                         f"got {epochs}, {kl_weight}, {kl_growth}, {patience}, {checkpoints}")
    steps = None
    if checkpoints > 1:
        if not hasattr(train_loader, "__len__"):
            raise InputError("prune_vib: checkpoints > 1 needs a training loader with a length (a DataLoader)")
        steps = -(-len(train_loader) // checkpoints)
    net = copy.deepcopy(gm)
    view = read_multitask(net)
    layers = gateable_layers(view)
    if not layers:
        raise InputError("prune_vib: no neuron layer can be gated (every layer feeds a residual addition)")
    gated, gates = gated_network(net, layers, seed)
    flops = expected_channel_flops(net, weights)
    mean_cost = float(torch.cat([flops[l] for l in layers]).mean())
    kl_mult = {l: (flops[l] / max(mean_cost, 1.0)).to(torch.float32) for l in layers}

    weight = [kl_weight]
    components = task_components(view)
    turns = [view.tasks.ordered_names(c) for c in components]

    def penalty() -> torch.Tensor:
        return weight[0] * sum((kl_mult[l] * g.kl()).sum() for l, g in gates.items())

    trajectory = Trajectory(view.tasks, dict(reference), dict(weights))
    current = trajectory.record(0, gm, evaluate(gm), accepted=True)
    gate_params = [p for g in gates.values() for p in g.parameters()]
    failures, done = dict.fromkeys(components, 0), patience * checkpoints  # a component is done after `done` failures
    for step in range(1, epochs * checkpoints + 1):
        epoch = -(-step // checkpoints)
        finetune(net, train_loader, loss_fn, epochs=1, max_steps=steps, lr=lr, recalibrate_bn=False, seed=seed + step,
                 progress=progress, module=gated, penalty=penalty, extra_params=gate_params, extra_lr=gate_lr,
                 alternate=alternate and len(view.tasks) > 1 and epoch > epochs // 2, alternate_groups=turns)
        candidate = fold_and_prune(net, gates)
        accuracy = evaluate(candidate)
        ok = {c: failures[c] < done and tasks_within(accuracy, reference, view.tasks.ordered_names(c), search_tolerance)
              for c in components}
        point = trajectory.record_components(step, candidate, accuracy, ok, current, evaluate)
        if point.accepted:
            current = point
        weight[0] *= kl_growth ** (1 / checkpoints)
        for c in components:
            failures[c] = 0 if ok[c] else failures[c] + 1
        if all(f >= done for f in failures.values()):
            break
    return trajectory
