"""Merge pass: origin grouping reproduces the K networks; masks, initialisation, IR in node.meta."""
import pytest
import torch
from torch import fx

import pamfx
from pamfx.analysis.multitask_view import read_multitask
from pamfx.ir.meta import META_LAYER, META_MASK
from pamfx.passes.module_surgery import expand_mask
from tests.conftest import ARCHITECTURES, example_input, model_set, perturb


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("arch_name", ARCHITECTURES)
def test_origin_grouping_reproduces_the_originals(arch_name, k):
    models, layers = model_set(arch_name, k)
    merged = pamfx.merge(models, example_input(), "origin", layers=layers).eval()
    x = example_input(batch=5, seed=1)
    out = merged(x)
    assert list(out) == list(models)
    for task, model in models.items():
        expected = model(x)
        assert out[task].shape == expected.shape
        assert (out[task] - expected).abs().max().item() <= 1e-5
        assert expected.std(0).mean() > 1e-4  # the comparison is not between constants


def _masked_weights(merged):
    for node in merged.graph.nodes:
        if META_MASK in node.meta:
            module = merged.get_submodule(node.target)
            block = module.weight.shape[1] // node.meta[META_MASK].shape[1] if module.weight.dim() == 2 else 1
            yield node, module.weight, expand_mask(node.meta[META_MASK], module.weight, block)


def test_forbidden_connections_are_exactly_zero(arch):
    models, layers = model_set(arch, 3)
    for seed in range(3):
        merged = pamfx.merge(models, example_input(), pamfx.Grouping.random(layers, seed=seed), layers=layers)
        forbidden = 0
        for _, weight, allowed in _masked_weights(merged):
            assert torch.count_nonzero(weight[~allowed]) == 0
            forbidden += int((~allowed).sum())
        assert forbidden > 0


def test_initialisation_keeps_original_weights_and_zeroes_new_connections():
    models, layers = model_set("lenet5", 2)
    merged = pamfx.merge(models, example_input(), "shared", layers=layers)
    fc1 = merged.get_submodule("fc1").weight
    wa, wb = models["A"].fc1.weight, models["B"].fc1.weight
    # fc1 reads conv2 (16 + 8 channels, 4 features each): A's block is top-left, B's bottom-right
    assert torch.equal(fc1[:120, : 16 * 4], wa)
    assert torch.equal(fc1[120:, 16 * 4 :], wb)
    assert torch.count_nonzero(fc1[:120, 16 * 4 :]) == 0  # allowed under `shared`, started at 0
    assert torch.count_nonzero(fc1[120:, : 16 * 4]) == 0


def test_grouping_lives_in_node_meta():
    models, layers = model_set("resnet", 3)
    grouping = pamfx.Grouping.random(layers, seed=7)
    merged = pamfx.merge(models, example_input(), grouping, layers=layers)
    view = read_multitask(merged)
    assert set(view.records) == set(layers.names)
    for name, record in view.records.items():
        assert record.task_sets == grouping.masks(name)
        assert record.origins == layers[name].origins
    tagged = [n for n in merged.graph.nodes if META_LAYER in n.meta]
    assert len(tagged) > len(layers)


def test_chains_with_other_fx_passes():
    """A pass after merge that adds channel-wise ops keeps the IR usable; a breaking one is caught."""
    models, layers = model_set("vgg", 2)
    merged = perturb(pamfx.merge(models, example_input(), pamfx.Grouping.random(layers, seed=1), layers=layers), 0).eval()
    x = example_input()
    reference = merged(x)
    node = next(n for n in merged.graph.nodes if n.name == "features_2")
    with merged.graph.inserting_after(node):
        scaled = merged.graph.call_function(torch.mul, (node, 1.0))
    node.replace_all_uses_with(scaled, delete_user_cb=lambda u: u is not scaled)
    merged.recompile()
    for combo in layers.tasks.combinations():
        emitted = pamfx.emit(merged, combo).eval()
        for task, value in emitted(x).items():
            assert torch.allclose(value, reference[task], atol=1e-5)
    producer = next(n for n in merged.graph.nodes if n.name == "features_3")
    producer.meta[META_MASK] = ~producer.meta[META_MASK]
    with pytest.raises(pamfx.IRError, match="features_3"):
        pamfx.emit(merged, "A")


def test_merged_network_is_a_graphmodule_with_dict_output():
    models, layers = model_set("mobilenetv2", 2)
    merged = pamfx.merge(models, example_input(), "shared", layers=layers)
    assert isinstance(merged, fx.GraphModule)
    assert "def forward" in merged.code
    assert set(merged(example_input())) == {"A", "B"}
