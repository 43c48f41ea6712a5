"""Fine-tuning with gradient averaging, single networks as merged ones, and per-channel FLOPs."""
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import pamfx
from pamfx.ir.task_set import popcount
from pamfx.passes.finetune import connection_masks, finetune, gradient_scales, multilabel_loss
from pamfx.passes.merge import as_multitask
from tests.conftest import example_input, make_models


def synthetic_task_data(k: int, n: int = 96, seed: int = 0):
    """Images whose labels (2 per task) are thresholds of fixed random projections."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 16, 16, generator=g)
    projections = torch.randn(2 * k, 16 * 16, generator=g)
    y = (x.flatten(1) @ projections.T > 0).float()
    label_map = {t: [2 * i, 2 * i + 1] for i, t in enumerate("ABCDE"[:k])}
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed)), label_map


def two_output_models(arch: str, k: int):
    from tests.conftest import WIDTHS, randomise
    from pamfx.zoo.models import build_model

    torch.manual_seed(0)
    return {t: randomise(build_model(arch, 2, 1, 16, WIDTHS[i]), i) for i, t in enumerate("ABCDE"[:k])}


@pytest.mark.parametrize("arch_name", ["lenet5", "resnet"])
def test_finetune_keeps_forbidden_connections_zero_and_lowers_the_loss(arch_name):
    models = two_output_models(arch_name, 3)
    layers = pamfx.organise_layers(models, example_input())
    merged = pamfx.merge(models, example_input(), pamfx.Grouping.random(layers, seed=4), layers=layers)
    loader, label_map = synthetic_task_data(3)
    history: list[float] = []
    finetune(merged, loader, multilabel_loss(label_map), epochs=4, lr=3e-3, progress=False, history=history)
    assert history[-1] < history[0]
    for weight, mask in connection_masks(merged):
        assert torch.count_nonzero(weight[mask == 0]) == 0


@pytest.mark.parametrize("epochs, max_steps, steps", [(0, 7, 7), (0, 2, 2), (2, 4, 4), (2, None, 6), (1, 50, 3)])
def test_finetune_takes_max_steps_minibatches_over_as_many_passes_as_needed(epochs, max_steps, steps):
    """The loader holds 3 minibatches; ``epochs=0`` means exactly ``max_steps`` of them (a pruning
    round's fine-tune budget must not stop at one pass over a small training split)."""
    model = as_multitask(two_output_models("lenet5", 1)["A"], example_input(), "A")
    loader, label_map = synthetic_task_data(1)
    loss = multilabel_loss(label_map)
    calls: list[int] = []

    def counting_loss(outputs, targets):
        calls.append(1)
        return loss(outputs, targets)

    history: list[float] = []
    finetune(model, loader, counting_loss, epochs=epochs, max_steps=max_steps, progress=False, history=history,
             schedule="cosine")
    assert len(calls) == steps and len(history) == math.ceil(steps / len(loader))


def test_shared_parameters_get_the_average_of_their_tasks_gradients():
    models = two_output_models("lenet5", 3)
    layers = pamfx.organise_layers(models, example_input())
    merged = pamfx.merge(models, example_input(), pamfx.Grouping.random(layers, seed=2), layers=layers)
    view = pamfx.read_multitask(merged)
    scales = {id(p): s for p, s in gradient_scales(merged)}
    conv1 = merged.get_submodule("conv1")
    expected = torch.tensor([1.0 / popcount(t) for t in view.records["conv1"].task_sets])
    assert torch.equal(scales[id(conv1.weight)].flatten(), expected)
    x, y = next(iter(synthetic_task_data(3)[0]))
    loss_fn = multilabel_loss(synthetic_task_data(3)[1])
    per_task = []
    for task in "ABC":
        merged.zero_grad()
        loss_fn({task: merged(x)[task]}, y)[task].backward()
        per_task.append(conv1.weight.grad.clone())
    merged.zero_grad()
    sum(loss_fn(merged(x), y).values()).backward()
    from pamfx.passes.finetune import _average_and_mask

    _average_and_mask(connection_masks(merged), gradient_scales(merged))
    users = torch.tensor([popcount(t) for t in view.records["conv1"].task_sets]).view(-1, 1, 1, 1)
    assert torch.allclose(conv1.weight.grad, sum(per_task) / users, atol=1e-6)


def test_as_multitask_wraps_one_network_exactly(arch):
    models = make_models(arch, 1)
    single = as_multitask(models["A"], example_input(), "A").eval()
    x = example_input(batch=2, seed=6)
    assert torch.allclose(single(x)["A"], models["A"](x), atol=1e-6)
    assert pamfx.cost(single) == pamfx.cost(models["A"], example_input=example_input(batch=1))


@pytest.mark.parametrize("arch_name", ["vgg", "mobilenetv2"])
def test_channel_flops_is_what_removing_the_channel_saves(arch_name):
    from pamfx.analysis.cost import channel_flops

    models = two_output_models(arch_name, 3)
    layers = pamfx.organise_layers(models, example_input())
    merged = pamfx.merge(models, example_input(), pamfx.Grouping.random(layers, seed=3), layers=layers)
    per_channel = channel_flops(merged)
    total = pamfx.cost(merged).flops
    for layer in list(per_channel)[::2]:
        width = len(per_channel[layer])
        for c in (0, width - 1):
            smaller = pamfx.select_channels(merged, {layer: [i for i in range(width) if i != c]})
            assert total - pamfx.cost(smaller).flops == int(per_channel[layer][c])


def test_cosine_schedule_anneals_the_learning_rate_to_zero_over_the_run(monkeypatch):
    merged = pamfx.merge(two_output_models("lenet5", 2), example_input(),
                         pamfx.Grouping.random(pamfx.organise_layers(two_output_models("lenet5", 2), example_input()), seed=0))
    loader, label_map = synthetic_task_data(2)
    seen = []
    step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    finetune(merged, loader, multilabel_loss(label_map), epochs=2, lr=0.01, schedule="cosine", progress=False)
    total = 2 * len(loader)
    assert seen == pytest.approx([0.005 * (1 + math.cos(math.pi * k / total)) for k in range(total)])
    seen.clear()
    finetune(merged, loader, multilabel_loss(label_map), epochs=0, max_steps=2, lr=0.01, schedule="cosine", progress=False)
    assert seen == pytest.approx([0.005 * (1 + math.cos(math.pi * k / 2)) for k in range(2)])
    with pytest.raises(pamfx.InputError, match="schedule"):
        finetune(merged, loader, multilabel_loss(label_map), schedule="linear", progress=False)
