"""Composing one merged network from several prunings of it, one per independent task component.

The components of a merged network (`pamfx.analysis.task_components`) share no channel, so the
tasks of one component compute the same outputs whatever the other components' channels and
weights are. `compose_components` takes, for every component, a network pruned (and fine-tuned)
from the same merged network and returns one network holding each component's channels and
weights from its own donor: task t of the result computes exactly what task t of its donor
computes. Pruning uses it to let each component stop at its own cheapest checkpoint.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import fx, nn

from pamfx.analysis.channel_rules import Role
from pamfx.analysis.layer_organisation import NodeInfo
from pamfx.analysis.multitask_view import MultitaskView, read_multitask
from pamfx.analysis.task_components import task_components
from pamfx.errors import InputError, IRError
from pamfx.ir.task_set import TaskSet, active
from pamfx.passes.module_surgery import channel_tensors
from pamfx.passes.select_channels import feature_index, select_channels


def compose_components(donors: Mapping[TaskSet, fx.GraphModule], base: fx.GraphModule | None = None) -> fx.GraphModule:
    """One merged network whose component ``c`` (a key of ``donors``) is ``donors[c]``'s.

    The keys must be unions of independent components of every donor, partitioning the tasks, and
    the donors prunings of one merged network: ``base``, the network they were pruned from (by
    default the donor that holds every channel the others keep, as the least pruned point of a
    pruning trajectory does). Neither the donors nor ``base`` are modified; the result owns its
    modules.
    """
    if not donors:
        raise InputError("compose_components: no donor networks")
    views = {c: read_multitask(gm) for c, gm in donors.items()}
    first = next(iter(views.values()))
    _check_components(views, first)
    wanted = {name: {v.records[name].origins[i] for c, v in views.items()
                     for i in active(v.records[name].task_sets, c)} for name in first.records}

    def holds_all(view: MultitaskView) -> bool:
        return set(view.records) == set(wanted) and all(wanted[n] <= set(r.origins) for n, r in view.records.items())

    if base is not None:
        origin = read_multitask(base)
        if not holds_all(origin):
            raise InputError("compose_components: the base network lacks channels the donors keep; it must be the "
                             "network they were pruned from")
    else:
        origin = next((v for v in views.values() if holds_all(v)), None)
        if origin is None:
            raise InputError("compose_components: no donor holds every channel the others keep; pass the network "
                             "they were pruned from as base")
    out = read_multitask(select_channels(origin.gm, {
        name: [i for i, key in enumerate(rec.origins) if key in wanted[name]]
        for name, rec in origin.records.items() if name not in origin.fixed_layers}))
    with torch.no_grad():
        for component, view in views.items():
            if view is not origin:
                _graft(out, view, component)
    return out.gm


def _check_components(views: Mapping[TaskSet, MultitaskView], first: MultitaskView) -> None:
    keys = list(views)
    if sum(keys) != first.tasks.all or any(a & b for i, a in enumerate(keys) for b in keys[i + 1:]):
        raise InputError(f"compose_components: the donors' task sets {[first.tasks.label(c) for c in keys]} do not "
                         f"partition the tasks {list(first.tasks)}")
    for c, view in views.items():
        if view.tasks != first.tasks or set(view.records) != set(first.records):
            raise InputError(f"compose_components: donor of {view.tasks.label(c)} is not a pruning of the same merged "
                             "network (its tasks or neuron layers differ)")
        if any(part & c and part & ~c for part in task_components(view)):
            raise InputError(f"compose_components: in the donor of {view.tasks.label(c)}, tasks of "
                             f"{view.tasks.label(c)} share channels with other tasks; only independent components "
                             "can come from different networks")


def _rows(out: MultitaskView, donor: MultitaskView, layer: str | None, component: TaskSet
          ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The indices, in ``out`` and in ``donor``, of ``layer``'s channels of ``component`` (None: the input X)."""
    if layer is None:
        return None
    index = {key: i for i, key in enumerate(donor.records[layer].origins)}
    rec = out.records[layer]
    mine = active(rec.task_sets, component)
    return torch.tensor(mine, dtype=torch.long), torch.tensor([index[rec.origins[i]] for i in mine], dtype=torch.long)


def _graft(out: MultitaskView, donor: MultitaskView, component: TaskSet) -> None:
    """Overwrite, in place, ``out``'s weights of ``component``'s channels with ``donor``'s."""
    for node in out.gm.graph.nodes:
        if node.op != "call_module":
            continue
        info = out.layers.nodes.get(node.name, NodeInfo(Role.OPAQUE))
        module, source = out.gm.get_submodule(node.target), donor.gm.get_submodule(node.target)
        if info.role == Role.HEAD:
            if out.tasks.bit(info.task) & component:
                _copy_dense(module, source, None, _rows(out, donor, info.source, component),
                            out.layers.nodes[node.args[0].name].block)
        elif info.role == Role.DENSE:
            _copy_dense(module, source, _rows(out, donor, info.layer, component),
                        _rows(out, donor, info.source, component), out.layers.nodes[node.args[0].name].block)
        elif info.role == Role.CHANNELWISE and info.layer is not None:
            rows, rows_d = _rows(out, donor, info.layer, component)
            for name, tensor in channel_tensors(module).items():
                tensor[rows] = channel_tensors(source)[name][rows_d]
        elif info.task is not None and out.tasks.bit(info.task) & component:
            _copy_all(node, module, source)
        elif any(True for _ in module.parameters()) and not all(
                torch.equal(a, b) for a, b in zip(module.state_dict().values(), source.state_dict().values())):
            raise IRError(f"compose_components: node {node.name!r} ({node.target}) has weights that belong to no "
                          f"component, and they differ between the donors")


def _copy_dense(module: nn.Module, source: nn.Module, rows: tuple[torch.Tensor, torch.Tensor] | None,
                cols: tuple[torch.Tensor, torch.Tensor] | None, block: int) -> None:
    """A conv / linear: ``module.weight[rows, cols] = source.weight[rows_d, cols_d]`` (all rows / columns
    where None), and the bias of those rows."""
    r, r_d = rows if rows is not None else (torch.arange(module.weight.shape[0]), torch.arange(source.weight.shape[0]))
    if cols is None:
        module.weight[r] = source.weight[r_d]
    else:
        c, c_d = (feature_index(i, block) for i in cols)
        module.weight[r[:, None], c] = source.weight[r_d[:, None], c_d]
    if module.bias is not None:
        module.bias[r] = source.bias[r_d]


def _copy_all(node: fx.Node, module: nn.Module, source: nn.Module) -> None:
    for (name, tensor), other in zip(module.state_dict().items(), source.state_dict().values()):
        if tensor.shape != other.shape:
            raise IRError(f"compose_components: node {node.name!r} ({node.target}): {name} has shape "
                          f"{tuple(other.shape)} in the donor and {tuple(tensor.shape)} in the composed network")
        tensor.copy_(other)
