"""Rebuilding conv / linear / BatchNorm modules with new tensors (wider, narrower, sliced)."""
from __future__ import annotations

import copy
import re

import torch
from torch import nn

from pamfx.frontend import strip_hooks

from pamfx.analysis.channel_rules import is_depthwise


def rebuild(module: nn.Module, share: bool = False, groups: int | None = None, **tensors: torch.Tensor | None) -> nn.Module:
    """A copy of ``module`` whose named parameters / buffers are replaced by ``tensors``.

    The copy owns fresh copies of ``tensors`` and of every other parameter, buffer and submodule
    (BatchNorm's ``num_batches_tracked`` included) and carries no hooks, unless ``share`` is set,
    in which case it holds them as given (views of another module's weights stay views). Its size
    attributes (in/out channels, features, groups of a depthwise conv, num_features) follow the new
    tensors; a conv given ``groups`` becomes a grouped conv with that many groups (1: dense).
    """
    new = copy.copy(module)
    new._parameters = {
        k: v if share or v is None else nn.Parameter(v.detach().clone(), requires_grad=v.requires_grad)
        for k, v in module._parameters.items()
    }
    new._buffers = {k: v if share or v is None else v.detach().clone() for k, v in module._buffers.items()}
    new._modules = {k: v if share or v is None else copy.deepcopy(v) for k, v in module._modules.items()}
    strip_hooks(new)
    for name, value in tensors.items():
        if value is None:
            new._parameters[name] = None
        elif name in module._parameters:
            old = module._parameters[name]
            data = value.detach() if share else value.detach().clone()
            new._parameters[name] = nn.Parameter(data, requires_grad=old is None or old.requires_grad)
        elif name in module._buffers:
            new._buffers[name] = value.detach() if share else value.detach().clone()
        else:
            raise AttributeError(f"{type(module).__name__} has no parameter or buffer {name!r}")
    _fix_sizes(new, depthwise=groups is None and is_depthwise(module), groups=groups)
    return new


def dense_conv_weight(conv: nn.Conv2d) -> torch.Tensor:
    """A grouped conv's weight as the dense ``[out, in, kh, kw]`` weight, zero between groups."""
    if conv.groups == 1:
        return conv.weight.detach()
    out_per, in_per = conv.out_channels // conv.groups, conv.in_channels // conv.groups
    weight = conv.weight.new_zeros((conv.out_channels, conv.in_channels) + tuple(conv.weight.shape[2:]))
    for g in range(conv.groups):
        weight[g * out_per : (g + 1) * out_per, g * in_per : (g + 1) * in_per] = conv.weight[g * out_per : (g + 1) * out_per].detach()
    return weight


def group_ids(width: int, groups: int) -> torch.Tensor:
    """The conv group of each of ``width`` channels split into ``groups`` equal runs."""
    return torch.arange(width) // (width // groups)


def _fix_sizes(module: nn.Module, depthwise: bool, groups: int | None = None) -> None:
    if isinstance(module, nn.Conv2d):
        out = module.weight.shape[0]
        module.out_channels = out
        if depthwise:
            module.in_channels = module.groups = out
        else:
            module.groups = module.groups if groups is None else groups
            module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        module.num_features = module.running_mean.shape[0] if module.running_mean is not None else module.weight.shape[0]


def channel_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The per-channel tensors of a channel-wise module (BatchNorm, depthwise conv)."""
    names = ("weight", "bias", "running_mean", "running_var")
    return {n: getattr(module, n) for n in names if isinstance(getattr(module, n, None), torch.Tensor)}


def expand_mask(mask: torch.Tensor, weight: torch.Tensor, block: int = 1) -> torch.Tensor:
    """Broadcast a channel-level connection mask [out, in_channels] to a weight's shape."""
    if weight.dim() == 4:
        return mask[:, :, None, None].expand_as(weight)
    return mask.repeat_interleave(block, dim=1)


def attr_name(text: str) -> str:
    """``text`` made usable as a Python attribute / submodule name (non-word characters → ``_``)."""
    return re.sub(r"\W", "_", text)


def set_module(root: nn.Module, target: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``target`` of ``root`` by ``module``."""
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)
