"""torchvision's mobile architectures merge exactly: origin reproduces, emit equals merged, cost = FlopCounterMode.

Two copies of each architecture (different random weights, BatchNorm statistics and head sizes),
input 1x3x64x64. Skipped where torchvision is not installed or does not load against this torch.
`tools/bench_architectures.py` runs the same checks on more architectures with timings.
"""
import pytest
import torch

import pamfx
from tests.conftest import randomise
from tests.test_emit import flop_counter_flops

try:
    import torchvision
except (ImportError, RuntimeError) as exc:  # RuntimeError: a torchvision wheel built for another torch
    pytest.skip(f"torchvision is not usable here: {exc}", allow_module_level=True)

pamfx.register_channel_rule(torchvision.ops.stochastic_depth)(lambda op: op.channelwise())  # scales whole samples


def build(name: str, classes: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomise(getattr(torchvision.models, name)(weights=None, num_classes=classes), seed)


def relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).abs().max() / reference.abs().max()).item()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0"])
def test_torchvision_architecture_merges_exactly(name):
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    models = {"A": build(name, 5, 1), "B": build(name, 3, 2)}
    layers = pamfx.organise_layers(models, x)
    with torch.no_grad():
        merged = pamfx.merge(models, x, "origin", layers=layers).eval()
        out = merged(x)
        for task, model in models.items():
            assert relative(out[task], model(x)) <= 1e-4
        grouped = pamfx.merge(models, x, pamfx.Grouping.random(layers, seed=0), layers=layers).eval()
        reference = grouped(x)
        for combo in layers.tasks.combinations():
            emitted = pamfx.emit(grouped, combo).eval()
            for task, value in emitted(x).items():
                assert relative(value, reference[task]) <= 1e-4, (combo, task)
            assert pamfx.cost(grouped, combo).flops == flop_counter_flops(emitted, x)
