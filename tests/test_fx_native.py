"""pamfx inside the fx ecosystem: PassManager passes, re-tracing, torch's fuse."""
import pytest
import torch
from torch import fx, nn
from torch.fx.experimental.optimization import fuse
from torch.fx.passes.infra.pass_base import PassResult
from torch.fx.passes.infra.pass_manager import PassManager

import pamfx
import pamfx.passes
from tests.conftest import example_input, model_set, perturb


def merged_network(arch: str, seed: int) -> fx.GraphModule:
    models, layers = model_set(arch, 3)
    return perturb(pamfx.merge(models, example_input(), pamfx.Grouping.random(layers, seed), layers=layers), seed).eval()


def assert_same_outputs(module, merged, x, tasks=None):
    expected, got = merged(x), module(x)
    for task in tasks or expected:
        assert torch.allclose(got[task], expected[task], atol=1e-5), task


@pytest.mark.parametrize("arch", ["resnet", "mobilenetv2"])
def test_a_merged_network_re_traces(arch):
    merged = merged_network(arch, 1)
    x = example_input(batch=4, seed=2)
    assert_same_outputs(fx.symbolic_trace(merged), merged, x)
    assert_same_outputs(fuse(merged), merged, x)


def torch_fuse(gm: fx.GraphModule) -> PassResult:
    """torch's conv/linear + BatchNorm fusion as a PassManager pass, on the graph as it is."""
    return PassResult(fuse(gm, no_trace=True), True)


@pytest.mark.parametrize("arch", ["resnet", "mobilenetv2"])
def test_pamfx_passes_chain_with_torchs_fuse_in_a_pass_manager(arch):
    merged = merged_network(arch, 4)
    x = example_input(batch=3, seed=1)
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in merged.modules())
    keep = {name: list(range(0, rec.width, 2)) for name, rec in pamfx.read_multitask(merged).records.items()}
    pruned = pamfx.select_channels(merged, keep)
    manager = PassManager(
        [pamfx.passes.SelectChannelsPass(keep), pamfx.passes.SortChannelsPass(), torch_fuse, pamfx.passes.EmitPass(["A", "C"])]
    )
    emitted = manager(merged).graph_module
    assert bns and not any(isinstance(m, nn.BatchNorm2d) for m in emitted.modules())
    assert_same_outputs(emitted, pruned, x, ["A", "C"])
    assert set(emitted(x)) == {"A", "C"}


def test_fold_batchnorm_pass_keeps_the_ir_and_the_outputs():
    merged = merged_network("resnet", 5)
    folded = pamfx.passes.FoldBatchNormPass()(merged).graph_module
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = example_input(batch=3, seed=4)
    view = pamfx.read_multitask(folded)
    assert view.grouping() == pamfx.read_multitask(merged).grouping()
    for combo in view.tasks.combinations():
        assert_same_outputs(pamfx.emit(folded, combo), merged, x, view.tasks.ordered_names(combo))
    with pytest.raises(pamfx.InputError, match="training mode"):
        pamfx.passes.FoldBatchNormPass()(merged.train())


@pytest.mark.parametrize("inplace", [False, True])
def test_inplace_flag(inplace):
    merged = merged_network("vgg", 6)
    x = example_input(batch=2, seed=3)
    before_code, before = merged.code, merged(x)
    result = pamfx.passes.SortChannelsPass(inplace=inplace)(merged).graph_module
    assert (result is merged) == inplace
    view = pamfx.read_multitask(result)
    for rec in view.records.values():
        assert list(rec.task_sets) == sorted(rec.task_sets)
    got = result(x)
    assert all(torch.allclose(got[t], before[t], atol=1e-5) for t in before)
    if not inplace:
        assert merged.code == before_code and not all(
            list(r.task_sets) == sorted(r.task_sets) for r in pamfx.read_multitask(merged).records.values()
        )


@pytest.mark.parametrize("make", [pamfx.passes.SortChannelsPass, lambda: pamfx.passes.EmitPass("A")])
def test_passes_require_a_merged_network(make):
    models, _ = model_set("lenet5", 2)
    with pytest.raises(pamfx.IRError):
        make()(fx.symbolic_trace(models["A"]))


def test_emit_pass_in_place_turns_the_merged_network_into_the_emitted_module():
    merged = merged_network("resnet", 8)
    x = example_input(batch=2, seed=5)
    expected = merged(x)["B"]
    result = pamfx.passes.EmitPass(["B"], inplace=True)(merged).graph_module
    assert result is merged and list(merged(x)) == ["B"]
    assert torch.allclose(merged(x)["B"], expected, atol=1e-5)
