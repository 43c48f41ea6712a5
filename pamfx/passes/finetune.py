"""Fine-tuning of a merged network (Sec. 4.5.1 step 5) and BatchNorm re-estimation.

All tasks' losses are computed together; a parameter of output channel c receives the *average*
of the gradients of the tasks that use it (the tasks of τ(c)): since only those tasks' losses
reach it, that is the gradient of the summed loss divided by |τ(c)|. Masked (forbidden)
connections get zero gradient and are re-zeroed after every step, so they stay exactly 0
whatever optimiser is used. The loop takes the user's loss and data loader.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from pamfx.analysis.channel_rules import Role
from pamfx.analysis.layer_organisation import Submodules
from pamfx.analysis.multitask_view import read_multitask
from pamfx.errors import InputError
from pamfx.ir.meta import META_MASK
from pamfx.ir.task_set import popcount
from pamfx.passes.module_surgery import expand_mask
from pamfx.progress import progress_bar

#: Learning-rate schedules of `finetune`.
SCHEDULES = ("constant", "cosine")

TaskLoss = Callable[[Mapping[str, torch.Tensor], torch.Tensor], Mapping[str, torch.Tensor]]


def multilabel_loss(label_map: Mapping[str, Sequence[int]]) -> TaskLoss:
    """Per-task BCE-with-logits on the label columns ``label_map[task]`` of a [N, L] target."""
    index = {t: torch.as_tensor(list(cols), dtype=torch.long) for t, cols in label_map.items()}

    def loss(outputs: Mapping[str, torch.Tensor], targets: torch.Tensor) -> dict[str, torch.Tensor]:
        missing = set(outputs) - set(index)
        if missing:
            raise InputError(f"multilabel_loss has no label columns for tasks {sorted(missing)}")
        return {t: F.binary_cross_entropy_with_logits(out, targets[:, index[t]]) for t, out in outputs.items()}

    return loss


def connection_masks(gm: fx.GraphModule) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Every masked weight of a merged network with its mask broadcast to the weight's shape."""
    view = read_multitask(gm)
    modules = Submodules(gm)
    out = []
    for node in gm.graph.nodes:
        info = view.layers.nodes.get(node.name)
        if info is not None and info.role in (Role.DENSE, Role.HEAD):
            weight = modules[node.target].weight
            block = view.layers.nodes[node.args[0].name].block
            out.append((weight, expand_mask(node.meta[META_MASK], weight, block).to(weight.dtype)))
    return out


def gradient_scales(gm: fx.GraphModule) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """1/|τ(c)| along the output-channel dimension of every per-channel parameter of a layer."""
    view = read_multitask(gm)
    modules = Submodules(gm)
    out: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    for node in gm.graph.nodes:
        info = view.layers.nodes.get(node.name)
        if info is None or info.layer is None or node.op != "call_module" or info.task is not None:
            continue
        scale = torch.tensor([1.0 / popcount(t) for t in view.records[info.layer].task_sets])
        for p in modules[node.target].parameters(recurse=False):
            if p.shape[0] == scale.shape[0]:
                out[id(p)] = (p, scale.view((-1,) + (1,) * (p.dim() - 1)).to(p.dtype))
    return list(out.values())


@torch.no_grad()
def recalibrate_batchnorm(gm: nn.Module, loader: Iterable, max_batches: int | None = None) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics on ``loader`` (cumulative average)."""
    norms = [m for m in gm.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return gm
    saved = [(m, m.momentum) for m in norms]
    training = gm.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    gm.train()
    try:
        for i, (x, _) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            gm(x)
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        gm.train(training)
    return gm


def finetune(
    gm: fx.GraphModule,
    loader: Iterable,
    loss_fn: TaskLoss,
    *,
    epochs: int = 1,
    max_steps: int | None = None,
    lr: float = 1e-3,
    recalibrate_bn: bool = True,
    seed: int = 0,
    progress: bool = True,
    history: list[float] | None = None,
    module: nn.Module | None = None,
    penalty: Callable[[], torch.Tensor] | None = None,
    extra_params: Sequence[nn.Parameter] = (),
    extra_lr: float | None = None,
    alternate: bool = False,
    alternate_groups: Sequence[Sequence[str]] | None = None,
    schedule: str = "constant",
) -> fx.GraphModule:
    """Fine-tune a merged network in place on all tasks together; returns it.

    It runs ``epochs`` passes over ``loader``, stopping early after ``max_steps`` minibatches if
    given; with ``epochs=0`` it runs exactly ``max_steps`` minibatches, passing over the loader as
    often as that takes.

    ``loss_fn(outputs, targets)`` gives one loss per task. Shared parameters get the average of
    their tasks' gradients, forbidden connections stay exactly zero. Mean loss per epoch is
    appended to ``history`` when given. ``module`` runs the forward instead of ``gm`` (a module
    built over ``gm``'s parameters, e.g. with pruning gates), ``penalty()`` is added to the loss,
    ``extra_params`` (e.g. the gates) are trained with ``extra_lr``; ``alternate`` uses one task's
    loss per step, in turn (A → B → … → A, Sec. 4.6.1), instead of all tasks' losses. The tasks
    take turns within each of ``alternate_groups`` (default: one group of every task), every group
    at once: tasks whose parameters are disjoint (independent components) need not take turns, and
    each then trains on every step, as it would alone.
    ``schedule="cosine"`` anneals every learning rate to 0 over the run (`CosineAnnealingLR`, one
    step per minibatch): the network ends at a settled point instead of wherever the last constant-
    rate steps left it, which makes the accuracies of successive pruning checkpoints comparable.
    """
    if epochs < 1 and max_steps is None:
        raise InputError(f"finetune needs epochs >= 1 or max_steps, got epochs={epochs}")
    if schedule not in SCHEDULES:
        raise InputError(f"finetune schedule must be one of {SCHEDULES}, got {schedule!r}")
    masks = connection_masks(gm)
    scales = gradient_scales(gm)
    run = gm if module is None else module
    if recalibrate_bn:
        recalibrate_batchnorm(run, loader)
    groups = [{"params": [p for p in gm.parameters() if p.requires_grad], "lr": lr}]
    if extra_params:
        groups.append({"params": list(extra_params), "lr": extra_lr if extra_lr is not None else lr})
    optimiser = torch.optim.Adam(groups)
    scheduler = None
    if schedule == "cosine":
        bounds = [n for n in (epochs * len(loader) if epochs >= 1 and hasattr(loader, "__len__") else None, max_steps)
                  if n is not None]
        if not bounds:
            raise InputError("finetune schedule='cosine' needs max_steps or a loader with a length")
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(min(bounds), 1))
    steps, epoch = 0, 0
    turns: list[list[str]] | None = None  # the groups that take turns, fixed at the first minibatch
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        run.train()
        while epochs < 1 or epoch < epochs:
            epoch += 1
            total, batches = 0.0, 0
            for x, y in progress_bar(loader, desc=f"fine-tune {epoch}/{epochs or '…'}", enabled=progress):
                losses = loss_fn(run(x), y)
                if alternate:
                    if turns is None:
                        turns = [sorted(g) for g in alternate_groups] if alternate_groups else [sorted(losses)]
                        if unknown := {t for g in turns for t in g} - set(losses):
                            raise InputError(f"finetune: alternate_groups name tasks {sorted(unknown)} that the "
                                             f"loss does not have (its tasks: {sorted(losses)})")
                    losses = {g[steps % len(g)]: losses[g[steps % len(g)]] for g in turns}
                loss = sum(losses.values())
                if penalty is not None:
                    loss = loss + penalty()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                _average_and_mask(masks, scales)
                optimiser.step()
                if scheduler is not None:
                    scheduler.step()
                with torch.no_grad():
                    for weight, mask in masks:
                        weight.mul_(mask)
                total += float(loss.detach()) / len(losses)
                batches += 1
                steps += 1
                if max_steps is not None and steps >= max_steps:
                    break
            if history is not None and batches:
                history.append(total / batches)
            if not batches or (max_steps is not None and steps >= max_steps):
                break
    run.eval()
    gm.eval()
    return gm


def _average_and_mask(masks: list[tuple[nn.Parameter, torch.Tensor]], scales: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    with torch.no_grad():
        for p, scale in scales:
            if p.grad is not None:
                p.grad.mul_(scale)
        for weight, mask in masks:
            if weight.grad is not None:
                weight.grad.mul_(mask)
