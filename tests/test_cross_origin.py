"""Merging with cross-origin connections kept absent: exact cost, emit, pruning, fine-tuning, save/load."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pamfx
from pamfx.analysis.channel_rules import Role
from pamfx.analysis.cost import cross_origin_flops_by_layer
from pamfx.errors import InputError
from pamfx.ir.meta import META_MASK
from pamfx.passes.finetune import finetune, multilabel_loss
from tests.conftest import ARCHITECTURES, example_input, model_set, perturb
from tests.test_emit import check_all_combinations


def _absent_layers(merged, mode) -> set[str]:
    """The layers whose writer keeps its cross-origin connections absent under ``mode``."""
    view = pamfx.read_multitask(merged)
    out = set()
    for node in merged.graph.nodes:
        info = view.layers.nodes.get(node.name)
        if info is None or info.role != Role.DENSE or info.source is None:
            continue
        conv = isinstance(merged.get_submodule(node.target), torch.nn.Conv2d)
        if mode == "absent" or (mode == "absent-conv" and conv) or (not isinstance(mode, str) and info.layer in mode):
            out.add(info.layer)
    return out


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=st.sampled_from(ARCHITECTURES), k=st.sampled_from([2, 3]), seed=st.integers(0, 2**16),
       mode=st.sampled_from(["absent", "absent-conv", "some"]))
def test_absent_cross_origin_costs_exactly_what_it_removes_and_emits_exactly(arch, k, seed, mode):
    models, layers = model_set(arch, k)
    grouping = pamfx.Grouping.random(layers, seed=seed)
    if mode == "some":
        names = [l.name for l in layers]
        mode = set(names[seed % 2 :: 2])
    dense = pamfx.merge(models, example_input(), grouping, layers=layers)
    merged = perturb(pamfx.merge(models, example_input(), grouping, layers=layers, cross_origin=mode), seed).eval()
    absent = _absent_layers(merged, mode)
    for combo in layers.tasks.combinations():
        crossing = cross_origin_flops_by_layer(dense, combo)
        removed = sum(crossing.get(layer, 0) for layer in absent)
        assert pamfx.cost(dense, combo).flops - pamfx.cost(merged, combo).flops == removed
        left = cross_origin_flops_by_layer(merged, combo)
        assert all(left.get(layer, 0) == 0 for layer in absent)
        assert all(left.get(layer, 0) == crossing[layer] for layer in crossing if layer not in absent)
    check_all_combinations(merged, layers)


def test_absent_cross_origin_reads_its_own_origin_only():
    """Under ``"absent"`` every hidden channel depends on its own origin network's channels only:
    with origin B's rows of every dense op zeroed, origin A's channels keep their values."""
    models, layers = model_set("vgg", 2)
    merged = perturb(pamfx.merge(models, example_input(), "shared", layers=layers, cross_origin="absent"), 0).eval()
    view = pamfx.read_multitask(merged)
    dense = {node.target: torch.tensor([t == "A" for t, _ in view.records[info.layer].origins])
             for node in merged.graph.nodes
             if (info := view.layers.nodes.get(node.name)) is not None and info.role == Role.DENSE}
    x = example_input(batch=4, seed=5)

    def origin_a_values():
        values = {}
        hooks = [merged.get_submodule(t).register_forward_hook(lambda m, i, o, t=t: values.update({t: o[:, dense[t]]}))
                 for t in dense]
        merged(x)
        for h in hooks:
            h.remove()
        return values

    before = origin_a_values()
    with torch.no_grad():
        for target, rows in dense.items():
            merged.get_submodule(target).weight[~rows] = 0.0
    after = origin_a_values()
    assert len(before) >= 5
    assert all(torch.allclose(after[t], before[t], atol=1e-6) for t in dense)
    assert any(before[t].abs().max() > 0 for t in dense)


def test_absent_cross_origin_survives_pruning_fine_tuning_and_save_load(tmp_path):
    models, layers = model_set("lenet5", 2)
    merged = pamfx.merge(models, example_input(), pamfx.Grouping.random(layers, seed=3), layers=layers,
                         cross_origin="absent-conv")
    view = pamfx.read_multitask(merged)
    keep = {name: list(range(0, rec.width, 2)) for name, rec in view.records.items()}
    pruned = pamfx.select_channels(merged, keep)
    data = [(example_input(batch=8, seed=s), torch.rand(8, 5)) for s in range(4)]
    finetune(pruned, data, multilabel_loss({"A": [0, 1], "B": [2, 3, 4]}), epochs=1, progress=False)
    pamfx.read_multitask(pruned)  # raises if a fine-tuned weight left its mask
    absent = [node for node in pruned.graph.nodes if node.name == "conv2"][0]
    assert not absent.meta[META_MASK].all()
    pamfx.save(pruned, tmp_path / "net.pt")
    loaded = pamfx.load(tmp_path / "net.pt")
    check_all_combinations(loaded.eval(), layers)
    assert all(pamfx.cost(loaded, c) == pamfx.cost(pruned, c) for c in layers.tasks.combinations())


def test_cross_origin_argument_is_checked():
    models, layers = model_set("lenet5", 2)
    with pytest.raises(InputError, match="cross_origin must be one of"):
        pamfx.merge(models, example_input(), "shared", layers=layers, cross_origin="sparse")
    with pytest.raises(InputError, match="do not have: \\['fc9'\\]"):
        pamfx.merge(models, example_input(), "shared", layers=layers, cross_origin=["conv2", "fc9"])
    merged = pamfx.merge(models, example_input(), "shared", layers=layers, cross_origin=["fc1"])
    with pytest.raises(InputError, match="node 'fc1' .* cross_origin absent"):
        pamfx.MultitaskRuntime(merged)
