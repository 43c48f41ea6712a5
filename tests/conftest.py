"""Shared fixtures: small zoo networks of differing widths, with informative random weights."""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from torch import nn

import pamfx
from pamfx.zoo.models import build_model

torch.set_num_threads(1)  # many tiny ops: threads only contend on the 2-core CI machine

ARCHITECTURES = ["lenet5", "vgg", "resnet", "mobilenetv2"]
WIDTHS = [1.0, 0.5, 0.75, 0.625, 0.875]
TASK_NAMES = ["A", "B", "C", "D", "E"]
INPUT_SIZE = 16


def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Give BatchNorm layers non-trivial statistics so that every channel matters in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


def make_models(arch: str, k: int, seed: int = 0) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    return {
        TASK_NAMES[i]: randomise(build_model(arch, 2 + i, 1, INPUT_SIZE, WIDTHS[i]), seed + i) for i in range(k)
    }


def example_input(batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 1, INPUT_SIZE, INPUT_SIZE, generator=torch.Generator().manual_seed(seed))


@lru_cache(maxsize=None)
def model_set(arch: str, k: int) -> tuple[dict[str, nn.Module], pamfx.LayerMap]:
    models = make_models(arch, k)
    return models, pamfx.organise_layers(models, example_input())


def perturb(gm: torch.fx.GraphModule, seed: int) -> torch.fx.GraphModule:
    """Move every allowed weight (and new cross-origin connection) off its merge-time value."""
    g = torch.Generator().manual_seed(seed)
    from pamfx.ir.meta import META_MASK
    from pamfx.passes.module_surgery import expand_mask

    with torch.no_grad():
        for node in gm.graph.nodes:
            if META_MASK in node.meta:
                m = gm.get_submodule(node.target)
                block = m.weight.shape[1] // node.meta[META_MASK].shape[1] if m.weight.dim() == 2 else 1
                allowed = expand_mask(node.meta[META_MASK], m.weight, block)
                m.weight.add_(0.05 * torch.randn(m.weight.shape, generator=g) * allowed)
    return gm


@pytest.fixture(params=ARCHITECTURES)
def arch(request) -> str:
    return request.param
