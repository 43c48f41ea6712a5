"""MTZ (baseline 2) as a merge pass: a valid multitask network, exact where the optimum is known."""
import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import pamfx
from pamfx.analysis.activations import build_extractor
from pamfx.passes.finetune import connection_masks, multilabel_loss
from pamfx.passes.mtz import compensate, mtz_merge
from tests.conftest import ARCHITECTURES, example_input, model_set, perturb, randomise
from tests.test_emit import check_all_combinations
from tests.test_finetune_prune import synthetic_task_data, two_output_models
from pamfx.zoo.models import build_model

CALIB = example_input(batch=24, seed=5)


def zipped(arch, k, **kwargs):
    models, layers = model_set(arch, k)
    return models, layers, mtz_merge(models, example_input(), CALIB, layers=layers, progress=False, **kwargs)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("arch_name", ARCHITECTURES)
def test_every_combination_emits_the_merged_network(arch_name, k):
    models, layers, merged = zipped(arch_name, k)
    view = pamfx.read_multitask(merged)
    everyone = layers.tasks.all
    for name in layers.names:  # widths differ: min(N_P, N_Q) pairs are zipped, the rest stay exclusive
        sets = view.records[name].task_sets
        assert sets.count(everyone) == min(layers[name].widths().values())
        assert len(sets) == layers[name].width - (k - 1) * sets.count(everyone)
    check_all_combinations(perturb(merged, 0).eval(), layers)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arch=st.sampled_from(ARCHITECTURES), k=st.sampled_from([2, 3]), degree=st.floats(0.0, 1.0), seed=st.integers(0, 2**16)
)
def test_any_zip_degree_and_calibration_set_gives_a_valid_network(arch, k, degree, seed):
    """Partial zipping leaves exclusive channels below zipped ones: the masks and emit must still agree."""
    models, layers = model_set(arch, k)
    calib = example_input(batch=6, seed=seed)
    merged = mtz_merge(models, example_input(), calib, layers=layers, zip_degree=degree, progress=False)
    view = pamfx.read_multitask(merged)
    for name in layers.names:  # the first two tasks zip a fraction of their pairs; a third joins that group
        widths = list(layers[name].widths().values())
        pairs = math.floor(degree * min(widths[:2]) + 1e-9)  # ⌊degree · min⌋, float products like 0.3 · 10 included
        assert view.records[name].task_sets.count(layers.tasks.all) == min([pairs] + widths[2:])
    for weight, mask in connection_masks(merged):
        assert torch.count_nonzero(weight[mask == 0]) == 0
    check_all_combinations(merged.eval(), layers)


def test_zip_degree_zero_reproduces_the_originals(arch):
    models, layers, merged = zipped(arch, 3, zip_degree=0.0)
    x = example_input(batch=5, seed=1)
    out = merged.eval()(x)
    unzipped = pamfx.merge(models, example_input(), "origin", layers=layers).eval()(x)
    for task, model in models.items():
        assert torch.equal(out[task], unzipped[task])  # nothing zipped: the origin merge, bit for bit
        assert (out[task] - model(x)).abs().max() <= 1e-5  # ...which computes the originals (wider sums)
    assert all(t != layers.tasks.all for name in layers.names for t in pamfx.read_multitask(merged).records[name].task_sets)


def test_zip_degree_is_the_fraction_of_pairs_zipped():
    models, layers, merged = zipped("vgg", 2, zip_degree=0.5)
    view = pamfx.read_multitask(merged)
    for name in layers.names:
        assert view.records[name].task_sets.count(layers.tasks.all) == min(layers[name].widths().values()) // 2


def with_new_head(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` whose last Linear (the task head) is re-drawn: the same trunk, another task."""
    twin = copy.deepcopy(model)
    head = [m for m in twin.modules() if isinstance(m, nn.Linear)][-1]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g))
    return twin


@pytest.mark.parametrize("arch_name", ARCHITECTURES)
def test_identical_trunks_zip_neuron_by_neuron_and_keep_both_outputs(arch_name):
    """Each neuron of B equals one of A: every pair costs 0 and the zipped network is exact."""
    torch.manual_seed(3)
    a = randomise(build_model(arch_name, 3, 1, 16), 3)
    models = {"A": a, "B": with_new_head(a, 4)}
    record = []
    merged = mtz_merge(models, example_input(), CALIB, record=record, progress=False).eval()
    x = example_input(batch=5, seed=2)
    out = merged(x)
    for task, model in models.items():
        assert (out[task] - model(x)).abs().max() <= 1e-4 * model(x).abs().max()
    assert record and all(z.kept[1] == z.merged[1] and abs(z.cost) < 1e-6 for z in record)
    view = pamfx.read_multitask(merged)
    assert all(set(r.task_sets) == {3} for r in view.records.values())


def test_one_layer_of_identical_neurons_zips_exactly_those_pairs():
    """B's conv1 copies three kernels of A's: those are the pairs, and conv1's output is unchanged."""
    models, _ = model_set("lenet5", 2)
    a, b = models["A"], copy.deepcopy(models["B"])
    copied = [4, 0, 2]  # B's kernel j is A's kernel copied[j]
    with torch.no_grad():
        b.conv1.weight.copy_(a.conv1.weight[copied])
        b.conv1.bias.copy_(a.conv1.bias[copied])
    models = {"A": a, "B": b}
    record = []
    merged = mtz_merge(models, example_input(), CALIB, record=record, progress=False).eval()
    conv1 = [z for z in record if z.layer == "conv1"]
    assert sorted((z.kept, z.merged) for z in conv1) == sorted((("A", i), ("B", j)) for j, i in enumerate(copied))
    assert all(abs(z.cost) < 1e-6 for z in conv1)
    layer = pamfx.organise_layers(models, example_input())["conv1"]
    x = example_input(batch=4, seed=6)
    (value,) = build_extractor(merged, [layer.structures["A"].output_node])(x)
    (original,) = build_extractor(pamfx.trace(a, example_input()), [layer.structures["A"].output_node])(x)
    origins = pamfx.read_multitask(merged).records["conv1"].origins
    assert [o for o in origins if o[0] == "B"] == []  # B's copies were zipped into A's kernels
    assert torch.allclose(value[:, [j for _, j in origins]], original, atol=1e-6)


def test_zipped_kernel_of_a_shared_input_layer_is_the_pair_mean():
    """conv1 reads the shared input X, so H_A = H_B and Eq. 2.16 gives the mean of the two kernels."""
    models, _ = model_set("lenet5", 2)
    record = []
    merged = mtz_merge(models, example_input(), CALIB, record=record, progress=False)
    zipped_weight = merged.get_submodule("conv1").weight
    origins = pamfx.read_multitask(merged).records["conv1"].origins
    for z in (z for z in record if z.layer == "conv1"):
        mean = (models["A"].conv1.weight[z.kept[1]] + models["B"].conv1.weight[z.merged[1]]) / 2
        assert torch.allclose(zipped_weight[origins.index(z.kept)], mean, atol=1e-6)


@pytest.mark.parametrize("calib", [torch.zeros(8, 1, 16, 16), example_input(batch=1, seed=9)], ids=["zeros", "one-sample"])
@pytest.mark.parametrize("arch_name", ["lenet5", "resnet"])
def test_singular_hessians_give_finite_weights(arch_name, calib):
    models, layers = model_set(arch_name, 3)
    merged = mtz_merge(models, example_input(), calib, layers=layers, progress=False).eval()
    assert all(torch.isfinite(t).all() for t in list(merged.parameters()) + list(merged.buffers()) if t.is_floating_point())
    assert all(torch.isfinite(v).all() for v in merged(example_input(batch=3, seed=2)).values())


def test_joint_finetune_keeps_forbidden_connections_exactly_zero():
    models = two_output_models("resnet", 3)
    loader, label_map = synthetic_task_data(3, n=64)
    merged = mtz_merge(  # the training loader doubles as the calibration set: (inputs, labels) batches
        models, example_input(), loader, train_loader=loader, loss_fn=multilabel_loss(label_map), finetune_steps=2,
        progress=False,
    )
    forbidden = 0
    for weight, mask in connection_masks(merged):
        assert torch.count_nonzero(weight[mask == 0]) == 0
        forbidden += int((mask == 0).sum())
    assert forbidden > 0
    check_all_combinations(merged.eval(), pamfx.organise_layers(models, example_input()))


def test_same_input_same_network():
    first, second = [], []
    _, _, a = zipped("mobilenetv2", 3, record=first)
    _, _, b = zipped("mobilenetv2", 3, record=second)
    assert first == second
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_user_models_are_not_changed():
    models, _ = model_set("resnet", 2)
    before = {t: copy.deepcopy(m.state_dict()) for t, m in models.items()}
    zipped("resnet", 2)
    for t, m in models.items():
        assert all(torch.equal(v, before[t][k]) for k, v in m.state_dict().items())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"zip_degree": 1.5}, "zip_degree"),
        ({"damping": 0.0}, "damping"),
        ({"loss_fn": lambda o, y: o}, "train_loader and loss_fn"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    models, layers = model_set("lenet5", 2)
    with pytest.raises(pamfx.InputError, match=match):
        mtz_merge(models, example_input(), CALIB, layers=layers, progress=False, **kwargs)


def test_a_one_shot_calibration_iterator_is_refused():
    models, layers = model_set("lenet5", 2)
    with pytest.raises(pamfx.InputError, match="one-shot"):
        mtz_merge(models, example_input(), iter(CALIB.split(8)), layers=layers, progress=False)


def test_compensation_is_the_least_squares_fit_on_the_kept_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 5, generator=g, dtype=torch.float64)
    z = torch.cat([x, torch.ones(300, 1, dtype=torch.float64)], dim=1)  # correlated inputs and the bias
    hessian = z.T @ z / z.shape[0]
    rows = torch.randn(3, 6, generator=g, dtype=torch.float64)
    own = torch.ones(6, dtype=torch.bool)
    keep = torch.tensor([True, False, True, True, False, True])
    v, cost = compensate(hessian, rows, own, keep, n=2, damping=1e-12)
    fit = torch.linalg.lstsq(z[:, keep], z @ rows.T).solution.T
    assert torch.allclose(v, fit, atol=1e-6)
    error = ((z[:, keep] @ fit.T - z @ rows.T) ** 2).mean(0)
    assert torch.allclose(cost, error / 2, rtol=1e-6)


def test_pair_costs_are_the_layerwise_error_and_pairs_come_in_ascending_order():
    """conv1 reads X: ΔE = ½ dᵀ(H_A⁻¹ + H_B⁻¹)⁻¹ d = ¼ dᵀHd with H = E[[patch;1][patch;1]ᵀ] from the calibration set."""
    models, _ = model_set("lenet5", 2)
    record = []
    mtz_merge(models, example_input(), CALIB, record=record, progress=False)
    patches = torch.nn.functional.unfold(CALIB, 5, padding=2).transpose(1, 2).reshape(-1, 25).double()
    z = torch.cat([patches, torch.ones(patches.shape[0], 1, dtype=torch.float64)], dim=1)
    hessian = z.T @ z / z.shape[0]

    def folded(conv, i):
        return torch.cat([conv.weight[i].flatten(), conv.bias[i : i + 1]]).double().detach()

    a, b = models["A"].conv1, models["B"].conv1
    every = torch.tensor([[float((d := folded(a, i) - folded(b, j)) @ hessian @ d) / 4 for j in range(3)] for i in range(6)])
    conv1 = [z for z in record if z.layer == "conv1"]
    costs = [z.cost for z in conv1]
    assert costs == sorted(costs) and costs[0] == pytest.approx(float(every.min()), rel=1e-6)
    for z in conv1:
        assert z.cost == pytest.approx(float(every[z.kept[1], z.merged[1]]), rel=1e-6)


def test_a_third_task_is_zipped_against_the_sum_of_the_merged_inverse_hessians():
    """H_AB⁻¹ = H_A⁻¹ + H_B⁻¹ = 2H⁻¹, so Eq. 2.16 gives the group 1/3 and task C 2/3 of the zipped kernel."""
    models, _ = model_set("lenet5", 3)
    record = []
    merged = mtz_merge(models, example_input(), CALIB, record=record, progress=False)
    origins = pamfx.read_multitask(merged).records["conv1"].origins
    partner = {(z.kept, z.merged[0]): z.merged for z in record if z.layer == "conv1"}
    weight = merged.get_submodule("conv1").weight
    triples = [kept for (kept, task) in partner if task == "C" and (kept, "B") in partner]
    assert triples
    for kept in triples:
        a = models["A"].conv1.weight[kept[1]]
        b = models["B"].conv1.weight[partner[(kept, "B")][1]]
        c = models["C"].conv1.weight[partner[(kept, "C")][1]]
        assert torch.allclose(weight[origins.index(kept)], (a + b) / 6 + 2 * c / 3, atol=1e-6)


def test_channel_selection_on_a_zipped_network_keeps_it_valid():
    """What structured pruning does to it: drop every third channel of every layer, shortcuts included."""
    models, layers, merged = zipped("resnet", 3, zip_degree=0.5)
    view = pamfx.read_multitask(merged)
    keep = {name: [c for c in range(record.width) if c % 3] for name, record in view.records.items()}
    check_all_combinations(pamfx.select_channels(merged, keep).eval(), layers)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda m: setattr(m.features, "1", nn.BatchNorm2d(m.features[1].num_features, affine=False).eval()),
         r"features_1.*features\.1.*affine"),
        (lambda m: setattr(m.features[0], "padding_mode", "reflect"), r"features_0.*features\.0.*padding"),
    ],
    ids=["batchnorm-without-affine", "reflect-padding"],
)
def test_what_cannot_be_zipped_exactly_is_refused_naming_node_and_submodule(change, match):
    models = {t: copy.deepcopy(m) for t, m in model_set("vgg", 2)[0].items()}
    for model in models.values():
        change(model)
    with pytest.raises(pamfx.UnsupportedOpError, match=match):
        mtz_merge(models, example_input(), CALIB, progress=False)
