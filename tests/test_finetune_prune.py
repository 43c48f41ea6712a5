"""Fine-tuning with gradient averaging and Taylor pruning of merged networks (docs/design.md §5)."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import pamfx
from pamfx.ir.task_set import popcount
from pamfx.passes.finetune import connection_masks, finetune, gradient_scales, multilabel_loss
from pamfx.passes.merge import as_multitask
from pamfx.passes.prune import prune_taylor, taylor_importance
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


def test_taylor_importance_scores_every_channel_and_flags_dead_ones():
    models = two_output_models("vgg", 2)
    layers = pamfx.organise_layers(models, example_input())
    merged = pamfx.merge(models, example_input(), "origin", layers=layers).eval()
    loader, label_map = synthetic_task_data(2)
    scores = taylor_importance(merged, loader, multilabel_loss(label_map), "A")
    view = pamfx.read_multitask(merged)
    for layer, s in scores.items():
        assert s.shape == (view.records[layer].width,)
        b_only = torch.tensor([t == view.tasks.bit("B") for t in view.records[layer].task_sets])
        assert torch.all(s[b_only] == 0)  # B's channels cannot affect A's loss
        assert s[~b_only].sum() > 0


@pytest.mark.parametrize("arch_name", ["lenet5", "resnet", "mobilenetv2"])
def test_pruning_shrinks_modules_monotonically_and_keeps_emit_equivalence(arch_name):
    models = two_output_models(arch_name, 2)
    layers = pamfx.organise_layers(models, example_input())
    merged = pamfx.merge(models, example_input(), pamfx.Grouping.random(layers, seed=1), layers=layers)
    loader, label_map = synthetic_task_data(2)
    result = prune_taylor(
        merged, loader, multilabel_loss(label_map), lambda net: {"A": 0.5, "B": 0.5},
        tolerance=0.0, reference={"A": 0.5, "B": 0.5}, step_fraction=0.3, finetune_steps=2, max_rounds=6, progress=False,
    )
    accepted = [s.flops for s in result.steps if s.accepted]
    assert accepted and all(a > b for a, b in zip([pamfx.cost(merged).flops] + accepted, accepted))
    pruned = result.network.eval()
    view = pamfx.read_multitask(pruned)
    assert all(rec.width >= 1 for rec in view.records.values())
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in merged.parameters())
    x = example_input(batch=4, seed=5)
    reference = pruned(x)
    for combo in view.tasks.combinations():
        emitted = pamfx.emit(pruned, combo).eval()
        for task, value in emitted(x).items():
            assert (value - reference[task]).abs().max() <= 1e-5
    for weight, mask in connection_masks(pruned):
        assert torch.count_nonzero(weight[mask == 0]) == 0


def test_pruning_never_empties_a_layer():
    models = two_output_models("lenet5", 2)
    single = as_multitask(models["A"], example_input(), "A")
    loader, label_map = synthetic_task_data(2)
    result = prune_taylor(
        single, loader, multilabel_loss(label_map), lambda net: {"A": 1.0}, tolerance=1.0,
        reference={"A": 1.0}, step_fraction=1.0, finetune_steps=1, max_rounds=30, progress=False,
    )
    widths = [rec.width for rec in pamfx.read_multitask(result.network).records.values()]
    assert min(widths) >= 1 and sum(widths) < sum(rec.width for rec in pamfx.read_multitask(single).records.values())


def test_rejected_steps_are_rolled_back():
    models = two_output_models("lenet5", 2)
    layers = pamfx.organise_layers(models, example_input())
    merged = pamfx.merge(models, example_input(), "origin", layers=layers)
    loader, label_map = synthetic_task_data(2)
    result = prune_taylor(
        merged, loader, multilabel_loss(label_map), lambda net: {"A": 0.0, "B": 0.0},
        tolerance=0.0, reference={"A": 1.0, "B": 1.0}, finetune_steps=1, max_rounds=4, progress=False,
    )
    assert result.steps and not any(s.accepted for s in result.steps)
    assert pamfx.cost(result.network) == pamfx.cost(merged)


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


def test_same_seed_gives_the_same_pruned_network():
    def run():
        models = two_output_models("lenet5", 2)
        layers = pamfx.organise_layers(models, example_input())
        merged = pamfx.merge(models, example_input(), pamfx.Grouping.random(layers, seed=6), layers=layers)
        loader, label_map = synthetic_task_data(2, seed=3)
        loss = multilabel_loss(label_map)
        finetune(merged, loader, loss, epochs=1, seed=5, progress=False)
        result = prune_taylor(merged, loader, loss, lambda net: {"A": 0.5, "B": 0.5}, tolerance=0.0,
                              reference={"A": 0.5, "B": 0.5}, step_fraction=0.2, finetune_steps=3, max_rounds=4,
                              seed=5, progress=False)
        return merged, result.network

    merged, first = run()
    _, second = run()
    assert pamfx.cost(first).flops < pamfx.cost(merged).flops  # the runs did prune
    assert pamfx.read_multitask(first).grouping() == pamfx.read_multitask(second).grouping()
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
