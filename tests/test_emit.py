"""Codegen: every emitted combination equals the merged network, costs its edge count, shares weights."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.fx.experimental.optimization import fuse as torch_fuse
from torch.fx.passes.infra.pass_manager import PassManager
from torch.utils.flop_counter import FlopCounterMode

import pamfx
from pamfx.analysis.channel_rules import Role
from pamfx.analysis.channel_order import group_orders
from pamfx.codegen.emit import ConstantChannels, emit_view, fusion_report, gather_channels
from pamfx.ir.meta import META_FUSED, META_GROUP
from pamfx.codegen.fusion import FusionCostModel
from tests.conftest import ARCHITECTURES, example_input, model_set, perturb


def flop_counter_flops(module, x) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        module(x)
    return counter.get_total_flops()


def check_all_combinations(merged, layers, combos=None, inputs=None):
    """Every combination's emitted modules equal the merged network: the exact form (``fuse="never"``,
    BatchNorm kept) costs the IR's FLOPs (FlopCounterMode) and parameters; the default fast form
    (BatchNorm folded, calls planned by the cost model) executes those FLOPs plus the overhead its
    fused calls report; both hold only active groups.

    ``inputs``: (one sample, a batch) to run, default 1-channel 16x16 ones."""
    x, batch = inputs or (example_input(batch=1, seed=3), example_input(batch=4, seed=4))
    reference = merged(batch)
    for combo in combos or layers.tasks.combinations():
        exact = pamfx.emit(merged, combo, fuse="never", fold_batchnorm=False).eval()
        fast = pamfx.emit(merged, combo).eval()
        names = layers.tasks.ordered_names(combo)
        for emitted in (exact, fast):
            out = emitted(batch)
            assert list(out) == names
            for task in names:
                assert (out[task] - reference[task]).abs().max().item() <= 1e-5, (combo, task)
            for node in emitted.graph.nodes:
                if META_GROUP in node.meta:
                    _, groups = node.meta[META_GROUP]
                    assert all(task_set & combo for task_set, _ in groups), f"emitted an inactive group at {node.name}"
        analytic = pamfx.cost(merged, combo)
        assert analytic.flops == flop_counter_flops(exact, x)
        assert analytic.params == sum(p.numel() for p in exact.parameters())
        overhead = sum(r["dense_flops"] - r["edge_flops"] for r in fusion_report(fast))
        assert flop_counter_flops(fast, x) == analytic.flops + overhead


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=st.sampled_from(ARCHITECTURES), k=st.sampled_from([2, 3]), seed=st.integers(0, 2**16))
def test_random_groupings_emit_equals_merged(arch, k, seed):
    models, layers = model_set(arch, k)
    grouping = pamfx.Grouping.random(layers, seed=seed)
    merged = perturb(pamfx.merge(models, example_input(), grouping, layers=layers), seed).eval()
    check_all_combinations(merged, layers)


@pytest.mark.parametrize("arch_name", ARCHITECTURES)
def test_five_tasks_every_combination(arch_name):
    models, layers = model_set(arch_name, 5)
    merged = perturb(pamfx.merge(models, example_input(), pamfx.Grouping.random(layers, seed=11), layers=layers), 1).eval()
    check_all_combinations(merged, layers)


def test_emitted_modules_hold_only_active_channels():
    models, layers = model_set("vgg", 3)
    merged = pamfx.merge(models, example_input(), pamfx.Grouping.random(layers, seed=5), layers=layers)
    view = pamfx.read_multitask(merged)
    for combo in layers.tasks.combinations():
        emitted = pamfx.emit(merged, combo)
        per_layer: dict[str, set[int]] = {}
        for node in emitted.graph.nodes:
            if META_GROUP in node.meta:
                layer, groups = node.meta[META_GROUP]
                per_layer.setdefault(layer, set()).update(c for _, idx in groups for c in idx)
        for layer, channels in per_layer.items():
            expected = {c for c, t in enumerate(view.records[layer].task_sets) if t & combo}
            assert channels == expected


def test_shared_grouping_costs_differ_only_by_heads(arch):
    models, layers = model_set(arch, 3)
    merged = pamfx.merge(models, example_input(), "shared", layers=layers)
    head_flops = {}
    for task in layers.tasks:
        head = merged.get_submodule(f"{next(n for n in merged.graph.nodes if n.meta.get('pamfx_head') == task).target}")
        head_flops[task] = 2 * head.weight.numel()
    trunk = {
        combo: pamfx.cost(merged, combo).flops - sum(head_flops[t] for t in layers.tasks.ordered_names(combo))
        for combo in layers.tasks.combinations()
    }
    assert len(set(trunk.values())) == 1


def test_origin_grouping_single_task_costs_the_original():
    models, layers = model_set("resnet", 3)
    merged = pamfx.merge(models, example_input(), "origin", layers=layers)
    for task, model in models.items():
        assert pamfx.cost(merged, task) == pamfx.cost(model, example_input=example_input(batch=1))


def test_emitted_module_prints_as_python_source():
    models, layers = model_set("lenet5", 2)
    merged = pamfx.merge(models, example_input(), pamfx.Grouping.random(layers, seed=2), layers=layers)
    source = pamfx.emit(merged, ["B"]).code
    assert "def forward(self, x)" in source
    assert "fc3_A" not in source and "fc3_B" in source


def test_runtime_serves_every_combination_from_one_copy_of_the_weights(arch):
    models, layers = model_set(arch, 3)
    merged = perturb(pamfx.merge(models, example_input(), pamfx.Grouping.random(layers, seed=9), layers=layers), 2).eval()
    runtime = pamfx.MultitaskRuntime(merged).warm()
    x = example_input(batch=2, seed=8)
    reference = merged(x)
    for combo in layers.tasks.combinations():
        for task, value in runtime(x, combo).items():
            assert torch.allclose(value, reference[task], atol=1e-5)
    weights = sum(t.untyped_storage().nbytes() for t in list(runtime.network.parameters()) + list(runtime.network.buffers()))
    # index buffers of shortcuts and constant channels are the only storage beyond the one network
    assert weights <= runtime.storage_bytes() <= 1.05 * weights


def test_emitting_never_changes_the_merged_network():
    models, layers = model_set("vgg", 2)  # VGG has Dropout: training mode would make outputs random
    merged = pamfx.merge(models, example_input(), pamfx.Grouping.random(layers, seed=3), layers=layers).eval()
    x = example_input(batch=3, seed=2)
    before = merged(x)
    emitted = pamfx.emit(merged, ["A"]).train()
    assert emitted.training and not merged.training
    after = merged(x)
    assert all(torch.equal(before[t], after[t]) for t in before)


def dense_layers_with_groups(merged, combo, at_least: int) -> list[str]:
    """The layers (in graph order) whose dense producer has at least ``at_least`` active output groups under ``combo``."""
    view = pamfx.read_multitask(merged)
    return [
        info.layer
        for info in view.layers.nodes.values()
        if info.role == Role.DENSE and len(view.groups(info.layer, combo)) >= at_least
    ]


def calls_to(module, types) -> list:
    """The call_module nodes of ``module`` whose submodule is one of ``types``."""
    return [n for n in module.graph.nodes if n.op == "call_module" and isinstance(module.get_submodule(n.target), types)]


def test_fused_modules_equal_merged_and_report_their_overhead(arch):
    models, layers = model_set(arch, 3)
    merged = perturb(pamfx.merge(models, example_input(), pamfx.Grouping.random(layers, seed=13), layers=layers), 3).eval()
    x = example_input(batch=1, seed=3)
    batch = example_input(batch=4, seed=4)
    reference = merged(batch)
    for combo in layers.tasks.combinations():
        fused = pamfx.emit(merged, combo, fuse="always").eval()
        out = fused(batch)
        assert list(out) == layers.tasks.ordered_names(combo)
        for task, value in out.items():
            assert (value - reference[task]).abs().max().item() <= 1e-5, (combo, task)
        report = fusion_report(fused)
        assert [r["layer"] for r in report] == dense_layers_with_groups(merged, combo, 2)
        assert all(r["fused"] and r["groups"] >= 2 and r["dense_flops"] >= r["edge_flops"] for r in report)
        executed, edges = pamfx.cost(fused).flops, pamfx.cost(merged, combo).flops
        assert executed == flop_counter_flops(fused, x) >= edges
        assert executed - edges == sum(r["dense_flops"] - r["edge_flops"] for r in report)
        view = pamfx.read_multitask(merged)
        for r in report:  # one call computes every active channel of the layer; no per-group call remains
            active = sum(1 for t in view.records[r["layer"]].task_sets if t & combo)
            assert fused.get_submodule(r["node"]).weight.shape[0] == active
        unfused = pamfx.emit(merged, combo, fuse="never")
        # dense groups that read no input (a shortcut with no allowed pair is an untagged zero constant)
        constant = [n.meta[META_GROUP][0] for n in calls_to(unfused, ConstantChannels) if META_GROUP in n.meta]
        # unfused, a layer makes one call per group that reads any input; fused, one call in all
        saved = len(calls_to(unfused, (nn.Conv2d, nn.Linear))) - len(calls_to(fused, (nn.Conv2d, nn.Linear)))
        assert saved == sum(r["groups"] - constant.count(r["layer"]) - 1 for r in report)


def test_fused_ops_say_so_in_meta_and_printed_source():
    models, layers = model_set("lenet5", 3)
    merged = pamfx.merge(models, example_input(), pamfx.Grouping.random(layers, seed=4), layers=layers)
    combo = layers.tasks.select(["A", "B", "C"])
    fused = pamfx.emit(merged, combo, fuse="always")
    nodes = [n for n in fused.graph.nodes if META_FUSED in n.meta]
    assert [n.name for n in nodes] == [r["node"] for r in fusion_report(fused)] and nodes
    assert all(n.target.endswith("_fused") and n.target in fused.code for n in nodes)
    readable = fused.print_readable(print_output=False, additional_meta=[META_FUSED])
    assert readable.count(f"# {META_FUSED}: ") == len(nodes)


def test_auto_fusion_follows_the_cost_model():
    models, layers = model_set("vgg", 3)
    merged = perturb(pamfx.merge(models, example_input(), pamfx.Grouping.random(layers, seed=6), layers=layers), 4).eval()
    batch = example_input(batch=2, seed=5)
    reference = merged(batch)
    costly_calls = FusionCostModel(per_call_s=1.0, flops_per_s=1e9)
    free_calls = FusionCostModel(per_call_s=0.0, flops_per_s=1e9)
    for combo in layers.tasks.combinations():
        fused = fusion_report(pamfx.emit(merged, combo, fuse=costly_calls))
        assert [r["node"] for r in fused] == [r["node"] for r in fusion_report(pamfx.emit(merged, combo, fuse="always"))]
        assert all("cost model at batch 1" in r["reason"] for r in fused)
        declined = pamfx.emit(merged, combo, fuse=free_calls)
        assert fusion_report(declined) == [] and declined.code == pamfx.emit(merged, combo, fuse="never").code
        considered = fusion_report(declined, declined=True)
        assert [r["layer"] for r in considered] == dense_layers_with_groups(merged, combo, 2)
        assert all(not r["fused"] and "cost model at batch 1" in r["reason"] for r in considered)
        auto = pamfx.emit(merged, combo, fuse="auto", batch=2).eval()
        assert all(torch.allclose(v, reference[t], atol=1e-5) for t, v in auto(batch).items())


def test_calibrated_cost_model_is_cached_and_positive():
    model = FusionCostModel.calibrate(batch=2)
    assert model is FusionCostModel.calibrate(batch=2)
    assert model.per_call_s > 0 and model.flops_per_s > 0 and model.per_input_s >= 0


def test_fusion_arguments_are_checked():
    models, layers = model_set("lenet5", 2)
    merged = pamfx.merge(models, example_input(), pamfx.Grouping.random(layers, seed=1), layers=layers)
    with pytest.raises(pamfx.InputError, match="fuse="):
        pamfx.emit(merged, ["A"], fuse="sometimes")
    with pytest.raises(pamfx.InputError, match="batch="):
        pamfx.emit(merged, ["A"], fuse="auto", batch=0)
    with pytest.raises(pamfx.InputError, match=r"orders: layers \["):
        emit_view(pamfx.read_multitask(merged), ["A"], orders={})


def test_fused_shared_weights_are_views_or_declined_as_not_contiguous(arch):
    models, layers = model_set(arch, 3)
    merged = perturb(pamfx.merge(models, example_input(), pamfx.Grouping.random(layers, seed=9), layers=layers), 2).eval()
    runtime = pamfx.MultitaskRuntime(merged)
    network = runtime.network
    storages = {t.untyped_storage().data_ptr() for t in list(network.parameters()) + list(network.buffers())}
    x = example_input(batch=2, seed=8)
    reference = network(x)
    outcomes = set()
    for combo in layers.tasks.combinations():
        fused = pamfx.emit(network, combo, share_weights=True, fuse="always").eval()
        for task, value in fused(x).items():
            assert torch.allclose(value, reference[task], atol=1e-5)
        report = fusion_report(fused, declined=True)
        assert [r["layer"] for r in report] == dense_layers_with_groups(network, combo, 2)
        assert all(r["fused"] or "not contiguous" in r["reason"] for r in report)
        outcomes.update(r["fused"] for r in report)
        weights = [fused.get_submodule(r["node"]).weight for r in report if r["fused"]]
        assert all(w.untyped_storage().data_ptr() in storages for w in weights)
        for task, value in runtime(x, combo).items():
            assert torch.allclose(value, reference[task], atol=1e-5)
    assert outcomes == {True, False}


def test_runtime_with_fusion_keeps_outputs_and_shares_weights():
    models, layers = model_set("vgg", 3)
    merged = perturb(pamfx.merge(models, example_input(), pamfx.Grouping.random(layers, seed=4), layers=layers), 3).eval()
    runtime = pamfx.MultitaskRuntime(merged, fuse="always").warm()
    x = example_input(batch=2, seed=1)
    reference = merged(x)
    fused = 0
    for combo in layers.tasks.combinations():
        module = runtime.module(combo)
        fused += len(pamfx.fusion_report(module))
        for task, value in module(x).items():
            assert torch.allclose(value, reference[task], atol=1e-5)
    assert fused > 0
    weights = sum(t.untyped_storage().nbytes() for t in list(runtime.network.parameters()) + list(runtime.network.buffers()))
    assert runtime.storage_bytes() <= 1.05 * weights


def gathers(module) -> int:
    """How many channel gathers (index_select, or its channels-last form) a module makes."""
    return sum(1 for n in module.graph.nodes if n.target in (torch.index_select, gather_channels))


def test_gathers_keep_activations_channels_last():
    """With channels-last activations (the default for image inputs) every gather of a K = 3
    network's emitted modules returns exactly torch.index_select's values, laid out channels-last,
    so the convolution after it reads them without a re-layout; NCHW modules gather with
    torch.index_select itself."""
    models, layers = model_set("vgg", 3)
    merged = perturb(pamfx.merge(models, example_input(), pamfx.Grouping.random(layers, seed=5), layers=layers), 5).eval()
    x = example_input(batch=4, seed=6)
    seen = 0

    class Recorder(torch.fx.Interpreter):
        def call_function(self, target, args, kwargs):
            out = super().call_function(target, args, kwargs)
            if target is gather_channels:
                nonlocal seen
                seen += 1
                assert out.dim() == 4 and out.is_contiguous(memory_format=torch.channels_last)
                assert torch.equal(out, torch.index_select(args[0], 1, args[1]))
            return out

    with torch.no_grad():
        for combo in layers.tasks.combinations():
            Recorder(pamfx.emit(merged, combo, fuse="never")).run(x)
            nchw = pamfx.emit(merged, combo, fuse="never", channels_last=False)
            assert not any(n.target is gather_channels for n in nchw.graph.nodes)
            assert gathers(nchw) == gathers(pamfx.emit(merged, combo, fuse="never"))
    assert seen > 0


@pytest.mark.parametrize("arch_name", ["lenet5", "vgg"])
def test_two_tasks_read_every_input_as_a_slice(arch_name):
    """K = 2 in the order A | A&B | B: every output group's allowed inputs are one contiguous run,
    so the exact form reads them as views (narrow), never as a gather, in every combination."""
    models, layers = model_set(arch_name, 2)
    merged = pamfx.merge(models, example_input(), pamfx.Grouping.random(layers, seed=21), layers=layers).eval()
    view = pamfx.read_multitask(merged)
    a, b = layers.tasks.to_set("A"), layers.tasks.to_set("B")
    for layer, order in group_orders(view).items():
        assert [t for t in order] in ([a, a | b, b], [b, a | b, a]) or len(order) < 3, (layer, order)
    for combo in layers.tasks.combinations():
        assert gathers(pamfx.emit(merged, combo, fuse="never")) == 0
    ordered = pamfx.read_multitask(pamfx.order_channels(merged))  # the same order, applied to the network
    for layer, order in group_orders(view).items():
        sets = ordered.records[layer].task_sets
        runs = [t for i, t in enumerate(sets) if i == 0 or sets[i - 1] != t]
        assert runs == [t for t in order if t in sets]


@pytest.mark.parametrize("k", [3, 5])
def test_group_order_needs_fewer_gathers_than_the_sorted_order(k):
    models, layers = model_set("vgg", k)
    merged = pamfx.merge(models, example_input(), pamfx.Grouping.random(layers, seed=k), layers=layers).eval()
    view = pamfx.read_multitask(merged)
    by_bitmask = {name: tuple(sorted(set(rec.task_sets))) for name, rec in view.records.items()}
    optimised = sum(gathers(emit_view(view, c, fuse="never")) for c in layers.tasks.combinations())
    sorted_order = sum(gathers(emit_view(view, c, fuse="never", orders=by_bitmask)) for c in layers.tasks.combinations())
    assert optimised < sorted_order


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=st.sampled_from(ARCHITECTURES), seed=st.integers(0, 2**16), fuse=st.sampled_from(["never", "always", "auto"]),
       usage=st.lists(st.floats(0.0, 1.0), min_size=7, max_size=7).filter(lambda w: sum(w) > 0))
def test_any_usage_order_and_plan_keeps_every_combination_exact(arch, seed, fuse, usage):
    """Emit-equivalence under the group order of any usage distribution and every planning mode."""
    models, layers = model_set(arch, 3)
    merged = perturb(pamfx.merge(models, example_input(), pamfx.Grouping.random(layers, seed=seed), layers=layers), seed).eval()
    weights = dict(zip(layers.tasks.combinations(), usage))
    x = example_input(batch=3, seed=seed % 7)
    reference = merged(x)
    for combo in layers.tasks.combinations():
        emitted = pamfx.emit(merged, combo, fuse=fuse, usage=weights).eval()
        for task, value in emitted(x).items():
            assert (value - reference[task]).abs().max().item() <= 1e-5, (combo, task)
        assert flop_counter_flops(emitted, x[:1]) == pamfx.cost(merged, combo).flops + sum(
            r["dense_flops"] - r["edge_flops"] for r in fusion_report(emitted)
        )


@pytest.mark.parametrize("arch", ["vgg", "resnet", "mobilenetv2"])  # LeNet-5 has no BatchNorm
def test_batchnorm_folding_is_exact_and_chains_with_fx_passes(arch):
    models, layers = model_set(arch, 3)
    merged = perturb(pamfx.merge(models, example_input(), pamfx.Grouping.random(layers, seed=17), layers=layers), 5).eval()
    x = example_input(batch=4, seed=6)
    reference = merged(x)
    chained = PassManager([pamfx.passes.FoldBatchNormPass(), pamfx.passes.SortChannelsPass()])(merged).graph_module
    for combo in layers.tasks.combinations():
        folded = pamfx.emit(merged, combo).eval()
        kept = pamfx.emit(merged, combo, fold_batchnorm=False).eval()
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        assert any(isinstance(m, nn.BatchNorm2d) for m in kept.modules())
        # torch's own fuse re-traces the emitted module: nothing left to fold, same outputs
        retraced = torch_fuse(folded)
        from_chain = PassManager([pamfx.passes.EmitPass(combo)])(chained).graph_module.eval()
        for module in (folded, kept, retraced, from_chain):
            for task, value in module(x).items():
                assert (value - reference[task]).abs().max().item() <= 1e-5, (combo, task)
    with pytest.raises(pamfx.InputError, match="training mode"):
        pamfx.emit(merged.train(), "A", fold_batchnorm=True)
    assert merged.training and any(isinstance(m, nn.BatchNorm2d) for m in pamfx.emit(merged, "A").modules())
