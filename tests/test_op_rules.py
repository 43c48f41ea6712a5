"""Channel rules: residual forms (alpha=, keywords, sub), reused modules, named refusals, user rules."""
import operator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import pamfx
from pamfx.analysis.channel_rules import Role
from pamfx.ir.diagonal import DiagonalConnection
from tests.conftest import example_input, perturb, randomise
from tests.test_emit import check_all_combinations

def randomly_merged(models: dict[str, nn.Module], seed: int, x: torch.Tensor | None = None, unknown_ops: str = "refuse"):
    """The models merged under a random grouping, every allowed weight moved off its merge-time value."""
    x = example_input() if x is None else x
    layers = pamfx.organise_layers(models, x, unknown_ops=unknown_ops)
    merged = pamfx.merge(models, x, pamfx.Grouping.random(layers, seed=seed), layers=layers)
    return perturb(merged, seed).eval(), layers


RESIDUAL_FORMS = {
    "alpha": lambda out, x: torch.add(out, x, alpha=0.5),
    "keywords": lambda out, x: torch.add(input=out, other=x),
    "keywords_alpha": lambda out, x: torch.add(other=x, input=out, alpha=-2.0),
    "sub": lambda out, x: torch.sub(out, x, alpha=0.25),
    "shortcut_first": lambda out, x: operator.sub(x, out),
    "method": lambda out, x: out.add(x, alpha=3.0),
}


class Residual(nn.Module):
    """stem -> conv -> ``form(conv, stem)`` -> conv -> head: one identity shortcut in ``form``."""

    def __init__(self, form: str, width: int, classes: int):
        super().__init__()
        self.form = RESIDUAL_FORMS[form]
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.post = nn.Conv2d(width, width, 3, stride=2)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = torch.relu(self.form(self.bn(self.conv(x)), x))
        return self.head(self.post(y).mean((2, 3)))


def residual_models(form: str) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {"A": Residual(form, 6, 3).eval(), "B": Residual(form, 4, 2).eval()}


@pytest.mark.parametrize("form", sorted(RESIDUAL_FORMS))
def test_residual_forms_origin_emit_reproduces_each_model(form):
    models = residual_models(form)
    merged = pamfx.merge(models, example_input(), "origin").eval()
    x = example_input(batch=4, seed=2)
    assert any(isinstance(m, DiagonalConnection) for m in merged.modules()), "the shortcut must be a diagonal connection"
    for task, model in models.items():
        expected = model(x)
        assert (pamfx.emit(merged, task).eval()(x)[task] - expected).abs().max().item() <= 1e-5
        assert (merged(x)[task] - expected).abs().max().item() <= 1e-5


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(form=st.sampled_from(sorted(RESIDUAL_FORMS)), seed=st.integers(0, 2**16))
def test_residual_forms_random_groupings_emit_equals_merged(form, seed):
    models = residual_models(form)
    merged, layers = randomly_merged(models, seed)
    check_all_combinations(merged, layers)


@pytest.mark.parametrize("form", ["keywords", "keywords_alpha", "shortcut_first"])
def test_shortcut_obeys_the_connection_rule(form):
    """A's output must not move when only channels of task set {B} change (τ_dst ⊄ τ_src)."""
    models = residual_models(form)
    layers = pamfx.organise_layers(models, example_input())
    shared = pamfx.Grouping.shared(layers)
    b_only = layers.tasks.bit("B")
    sets = {n: [b_only] * 2 + list(shared.masks(n))[2:] for n in layers.names}  # a B-only path to B's head
    sets["stem"][:5] = [b_only] * 5  # the shortcut's source: 5 channels of B alone, 3 feed shared channels
    grouping = pamfx.Grouping(layers.tasks, sets)
    merged = perturb(pamfx.merge(models, example_input(), grouping, layers=layers), 0).eval()
    x = example_input(batch=4, seed=5)
    before = merged(x)
    with torch.no_grad():
        merged.get_submodule("stem").weight[:5] += 1.0
    after = merged(x)
    assert torch.equal(before["A"], after["A"])
    assert not torch.allclose(before["B"], after["B"])


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3)
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.act(self.stem(x))
        return self.head(self.act(self.c(self.act(self.c(x)))).mean((2, 3)))


def test_module_with_weights_called_twice_is_refused_by_name():
    with pytest.raises(pamfx.UnsupportedOpError, match=r"module 'c' \(Conv2d\).*called by 2 nodes \['c', 'c_1'\]"):
        pamfx.organise_layers({"A": Twice(), "B": Twice()}, example_input())


class ChannelSoftmax(nn.Module):
    def forward(self, x):
        return torch.softmax(x, dim=1)


class WithSoftmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Sequential(nn.ReLU(), ChannelSoftmax()))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def test_refusal_names_the_submodule_and_the_cause():
    with pytest.raises(pamfx.UnsupportedOpError) as err:
        pamfx.organise_layers({"A": WithSoftmax(), "B": WithSoftmax()}, example_input())
    message = str(err.value)
    assert "node 'softmax'" in message
    assert "submodule 'features.1.1' (ChannelSoftmax)" in message
    assert "no channel rule" in message


class InvertedResidualSE(nn.Module):
    """A MobileNetV3 / EfficientNet block: expand, depthwise, squeeze-excitation gate, project, residual."""

    def __init__(self, c: int, hidden: int, squeeze: int, classes: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.Hardswish())
        self.expand = nn.Sequential(nn.Conv2d(c, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden), nn.BatchNorm2d(hidden))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(hidden, squeeze, 1), nn.Conv2d(squeeze, hidden, 1)
        self.project = nn.Sequential(nn.Conv2d(hidden, c, 1), nn.BatchNorm2d(c))
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        x = self.stem(x)
        h = self.depthwise(self.expand(x))
        h = h * nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(self.pool(h)))))
        return self.head((self.project(h) + x).mean((2, 3)))


def se_models(k: int = 2) -> dict[str, nn.Module]:
    torch.manual_seed(2)
    sizes = [(6, 12, 3, 3), (4, 8, 2, 2), (5, 10, 3, 4)]
    return {name: randomise(InvertedResidualSE(*sizes[i]), i) for i, name in enumerate("ABC"[:k])}


def test_squeeze_excitation_gate_joins_the_layer_it_gates():
    models = se_models()
    layers = pamfx.organise_layers(models, example_input())
    expand = layers["expand.0"].structures["A"]
    assert expand.producers == ("expand_0", "fc2")  # the gate's last conv produces the gated layer
    assert "mul" in expand.channelwise
    assert layers["fc1"].structures["A"].consumers[0].node == "fc2"  # the gate's hidden layer: an ordinary layer
    merged = pamfx.merge(models, example_input(), "origin", layers=layers).eval()
    x = example_input(batch=4, seed=6)
    for task, model in models.items():
        assert (merged(x)[task] - model(x)).abs().max().item() <= 1e-5


class SpatialAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.att, self.head = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 1, 1), nn.Linear(4, 2)

    def forward(self, x):
        x = self.conv(x)
        return self.head((x * torch.sigmoid(self.att(x))).mean((2, 3)))


def test_a_product_that_is_not_channel_to_channel_is_refused():
    with pytest.raises(pamfx.UnsupportedOpError, match=r"node 'mul'.*layers of 4 and 1 channels"):
        pamfx.organise_layers({"A": SpatialAttention(), "B": SpatialAttention()}, example_input())


class GroupedBlock(nn.Module):
    """A ResNeXt / RegNet-style block: grouped stem, 1x1 reduce, grouped 3x3, 1x1 expand, residual."""

    def __init__(self, c: int, hidden: int, classes: int, groups: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, c, 3, padding=1, groups=2), nn.BatchNorm2d(c), nn.ReLU())
        self.reduce = nn.Sequential(nn.Conv2d(c, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1, groups=groups), nn.BatchNorm2d(hidden), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(hidden, c, 1), nn.BatchNorm2d(c))
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.relu(self.expand(self.grouped(self.reduce(x))) + x).mean((2, 3)))


def grouped_models(k: int = 2) -> dict[str, nn.Module]:
    torch.manual_seed(3)
    sizes = [(8, 12, 3), (4, 8, 2), (6, 16, 4)]
    return {name: randomise(GroupedBlock(*sizes[i], groups=4), i) for i, name in enumerate("ABC"[:k])}


def two_channel_input(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 2, 12, 12, generator=torch.Generator().manual_seed(seed))


def test_grouped_conv_keeps_its_group_structure():
    models = grouped_models()
    x = two_channel_input(4, 1)
    layers = pamfx.organise_layers(models, x)
    assert "grouped.0" in layers.names  # a grouped conv opens a neuron layer like a dense one
    merged = pamfx.merge(models, x, "origin", layers=layers).eval()
    for task, model in models.items():
        assert (merged(x)[task] - model(x)).abs().max().item() <= 1e-5
    emitted = pamfx.emit(merged, "A")
    convs = [m for m in emitted.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert {m.groups for m in convs} == {2, 4}  # task A alone runs its own grouped convs
    assert pamfx.cost(merged, "A").flops == pamfx.cost(models["A"], example_input=x).flops


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(k=st.sampled_from([2, 3]), seed=st.integers(0, 2**16))
def test_grouped_conv_random_groupings_emit_equals_merged(k, seed):
    merged, layers = randomly_merged(grouped_models(k), seed, two_channel_input(2, 0))
    check_all_combinations(merged, layers, inputs=(two_channel_input(1, 3), two_channel_input(4, 4)))


def test_grouped_conv_survives_channel_selection():
    merged, layers = randomly_merged(grouped_models(3), 1, two_channel_input(2, 0))
    keep = {name: list(range(0, layers[name].width, 2)) for name in ("grouped.0", "reduce.0")}
    pruned = pamfx.select_channels(merged, keep).eval()
    check_all_combinations(pruned, layers, inputs=(two_channel_input(1, 3), two_channel_input(4, 4)))


class Inception(nn.Module):
    """GoogLeNet-style: four branches concatenated, twice; the second block also pools a branch."""

    def __init__(self, c: int, classes: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.b1 = nn.Conv2d(c, c, 1)
        self.b2 = nn.Sequential(nn.Conv2d(c, c // 2, 1), nn.ReLU(), nn.Conv2d(c // 2, c, 3, padding=1))
        self.b3 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(c, c // 2, 1))
        self.c1 = nn.Conv2d(5 * c // 2, c, 1)
        self.c2 = nn.Conv2d(5 * c // 2, c, 3, padding=1)
        self.head = nn.Linear(2 * c, classes)

    def forward(self, x):
        x = self.stem(x)
        y = torch.relu(torch.cat([self.b1(x), self.b2(x), self.b3(x)], 1))
        z = torch.cat(tensors=[self.c1(y), self.c2(y)], dim=1)
        return self.head(nn.functional.adaptive_avg_pool2d(z, 1).flatten(1))


class Dense(nn.Module):
    """DenseNet-style: every layer reads BatchNorm-ReLU of the concatenation of all earlier features."""

    def __init__(self, c: int, growth: int, classes: int):
        super().__init__()
        widths = [c + k * growth for k in range(3)]
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.norms = nn.ModuleList(nn.BatchNorm2d(w) for w in widths)
        self.convs = nn.ModuleList(nn.Conv2d(w, growth, 3, padding=1) for w in widths)
        self.head = nn.Linear(c + 3 * growth, classes)

    def forward(self, x):
        features = [self.stem(x)]
        for norm, conv in zip(self.norms, self.convs):
            features.append(conv(torch.relu(norm(torch.cat(features, 1)))))
        return self.head(torch.cat(features, 1).mean((2, 3)))


def concat_models(kind: str, k: int = 2) -> dict[str, nn.Module]:
    torch.manual_seed(4)
    sizes = {"inception": [(6, 3), (4, 2), (8, 4)], "dense": [(4, 3, 3), (3, 2, 2), (5, 2, 4)]}[kind]
    build = Inception if kind == "inception" else Dense
    return {name: randomise(build(*sizes[i]), i) for i, name in enumerate("ABC"[:k])}


@pytest.mark.parametrize("kind", ["inception", "dense"])
def test_concatenation_origin_reproduces_each_model(kind):
    models = concat_models(kind)
    layers = pamfx.organise_layers(models, example_input())
    cat = next(layer for layer in layers if layer.name.startswith("cat"))
    assert cat.structures["A"].producers == () and len(cat.structures["A"].shortcuts) >= 2
    assert cat.widths()["A"] == sum(layers[src].widths()["A"] for _, src in cat.structures["A"].shortcuts)
    merged = pamfx.merge(models, example_input(), "origin", layers=layers).eval()
    x = example_input(batch=4, seed=7)
    for task, model in models.items():
        assert (merged(x)[task] - model(x)).abs().max().item() <= 1e-5
    assert set(pamfx.read_multitask(merged).records) == set(layers.names)  # the merged network keeps the names


def test_concatenation_survives_channel_selection():
    merged, layers = randomly_merged(concat_models("dense", 3), 2)
    keep = {name: list(range(1, layers[name].width, 2)) for name in layers.names[:3]}
    check_all_combinations(pamfx.select_channels(merged, keep).eval(), layers)


class ChannelScale(nn.Module):
    """A user's op pamfx does not know: a learned per-channel scale."""

    def __init__(self, c: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return x * self.weight[None, :, None, None]


class Scaled(nn.Module):
    def __init__(self, width: int, classes: int):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3)
        self.scale = ChannelScale(width)
        self.conv2 = nn.Conv2d(width, width, 3)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.conv2(self.scale(self.conv(x))).mean((2, 3)))


def test_user_registers_a_rule_for_a_custom_module():
    torch.manual_seed(1)
    models = {"A": Scaled(5, 3).eval(), "B": Scaled(3, 2).eval()}
    with pytest.raises(pamfx.UnsupportedOpError, match=r"submodule 'scale' \(ChannelScale\)"):
        pamfx.organise_layers(models, example_input())

    @pamfx.register_channel_rule(ChannelScale)
    def _(op: pamfx.OpCall) -> None:
        op.channelwise()

    layers = pamfx.organise_layers(models, example_input())
    assert layers["conv"].structures["A"].channelwise == ("scale",)
    assert pamfx.organise_graph(layers.graphs["A"], "A", "A").nodes["scale"].role is Role.CHANNELWISE
    merged = pamfx.merge(models, example_input(), "origin", layers=layers).eval()
    x = example_input(batch=3, seed=1)
    for task, model in models.items():
        assert (merged(x)[task] - model(x)).abs().max().item() <= 1e-5
    grouped = pamfx.merge(models, example_input(), pamfx.Grouping.random(layers, seed=3), layers=layers)
    check_all_combinations(perturb(grouped, 3).eval(), layers)


def test_a_rule_that_calls_no_verb_is_refused():
    class Mystery(nn.Module):
        def forward(self, x):
            return x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.m, self.head = nn.Conv2d(1, 3, 3), Mystery(), nn.Linear(3, 2)

        def forward(self, x):
            return self.head(self.m(self.conv(x)).mean((2, 3)))

    pamfx.register_channel_rule(Mystery)(lambda op: None)
    with pytest.raises(pamfx.UnsupportedOpError, match="node 'm' .*without calling a verb"):
        pamfx.organise_layers({"A": Net(), "B": Net()}, example_input())


def test_register_channel_rule_checks_its_targets():
    with pytest.raises(pamfx.InputError):
        pamfx.register_channel_rule()
    with pytest.raises(pamfx.InputError, match="not an nn.Module"):
        pamfx.register_channel_rule(int)


def test_shared_weights_refuse_a_grouped_conv_by_name():
    models = grouped_models()
    x = two_channel_input(2, 0)
    merged = pamfx.sort_channels(pamfx.merge(models, x, "shared"))
    with pytest.raises(pamfx.InputError, match="node 'stem_0'.*grouped conv"):
        pamfx.emit(merged, "A", share_weights=True)


class SpatialCat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(1, 3, 1), nn.Conv2d(1, 3, 3, padding=1), nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], 2).mean((2, 3)))


class ChannelsLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv2d(1, 4, 3), nn.LayerNorm(4), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.norm(self.conv(x).permute(0, 2, 3, 1)).mean((1, 2)))


@pytest.mark.parametrize(
    "model, match",
    [(SpatialCat, r"node 'cat' .*in the root module: concatenates along dim 2"), (ChannelsLast, r"node 'permute' .*channel dimension")],
)
def test_unsupported_families_are_refused_with_their_cause(model, match):
    with pytest.raises(pamfx.UnsupportedOpError, match=match):
        pamfx.organise_layers({"A": model(), "B": model()}, example_input())


def test_merged_network_with_shortcuts_and_concatenations_retraces():
    """Diagonal connections trace symbolically: fx.symbolic_trace and fx's conv-BN fuse take a merged network."""
    from torch.fx.experimental.optimization import fuse

    for models in (residual_models("alpha"), concat_models("dense")):
        layers = pamfx.organise_layers(models, example_input())
        merged = pamfx.merge(models, example_input(), pamfx.Grouping.random(layers, seed=5), layers=layers).eval()
        x = example_input(batch=3, seed=8)
        reference = merged(x)
        retraced = torch.fx.symbolic_trace(merged)
        assert any(n.op == "call_method" and n.target == "index_select" for n in retraced.graph.nodes)  # traced through
        fused = fuse(merged)
        for task in reference:
            assert torch.equal(retraced(x)[task], reference[task])
            assert (fused(x)[task] - reference[task]).abs().max().item() <= 1e-5


class Chain(nn.Module):
    """conv-BN-ReLU layers of the given widths, a spatial mean and a linear head."""

    def __init__(self, widths: list[int], classes: int):
        super().__init__()
        layers, c = [], 1
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
            c = w
        self.features, self.head = nn.Sequential(*layers), nn.Linear(c, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def depth_models(k: int = 3) -> dict[str, nn.Module]:
    torch.manual_seed(5)
    specs = [([6, 5], 3), ([4, 3, 5, 2], 2), ([3, 4, 6], 4)]
    return {name: randomise(Chain(*specs[i]), i) for i, name in enumerate("ABC"[:k])}


def test_different_depths_share_the_shallower_layers_and_take_over_the_rest():
    """Sec. 4.5.1 step 3: layers 1..N_A merged; the deeper networks' remaining layers taken over unmerged."""
    models = depth_models()
    layers = pamfx.organise_layers(models, example_input())
    assert layers.names == ["features.0", "features.3"]  # N_A = 2 shared layers
    assert layers.remainders["A"] == ("mean", "head")  # A takes over its output layer only
    merged = pamfx.merge(models, example_input(), "origin", layers=layers).eval()
    x = example_input(batch=4, seed=9)
    for task, model in models.items():
        assert (merged(x)[task] - model(x)).abs().max().item() <= 1e-5
    records = pamfx.read_multitask(merged).records
    assert set(records) == {"features.0", "features.3", "features.6[B]", "features.9[B]", "features.6[C]"}
    assert set(records["features.9[B]"].task_sets) == {layers.tasks.bit("B")}  # B's own layers serve B alone
    only_a = pamfx.emit(merged, "A")
    assert pamfx.cost(only_a, example_input=x).flops == pamfx.cost(models["A"], example_input=x).flops


def test_different_depths_with_residual_blocks_of_its_own_are_refused():
    class Deeper(Chain):
        def forward(self, x):
            for m in list(self.features)[:6]:
                x = m(x)
            h = x
            for m in list(self.features)[6:]:
                x = m(x)
            return self.head((x + h).mean((2, 3)))

    models = {"A": Chain([4, 3], 2), "B": Deeper([4, 3, 3], 2)}
    with pytest.raises(pamfx.MismatchError, match="differ at node 'mean' / 'features_6'"):
        pamfx.organise_layers(models, example_input())


FAMILIES = {
    "squeeze_excitation": se_models,
    "inception": lambda k: concat_models("inception", k),
    "dense": lambda k: concat_models("dense", k),
    "different_depths": depth_models,
}


@settings(max_examples=24, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(family=st.sampled_from(sorted(FAMILIES)), k=st.sampled_from([2, 3]), seed=st.integers(0, 2**16))
def test_op_families_random_groupings_emit_equals_merged(family, k, seed):
    merged, layers = randomly_merged(FAMILIES[family](k), seed)
    check_all_combinations(merged, layers)


def test_different_depths_survive_channel_selection():
    merged, layers = randomly_merged(depth_models(3), 4)
    keep = {"features.6[B]": [0, 2], "features.3": list(range(1, layers["features.3"].width, 2))}
    check_all_combinations(pamfx.select_channels(merged, keep).eval(), layers)


class Unknown(nn.Module):
    """Ops pamfx has no channel rule for: GroupNorm, a transposed conv, a softmax over channels."""

    def __init__(self, c: int, h: int, classes: int):
        super().__init__()
        self.conv1, self.norm = nn.Conv2d(1, c, 3, padding=1), nn.GroupNorm(1, c)
        self.up, self.conv2 = nn.ConvTranspose2d(c, h, 3, padding=1), nn.Conv2d(h, h, 1)
        self.head = nn.Linear(h, classes)

    def forward(self, x):
        y = torch.softmax(self.up(torch.relu(self.norm(self.conv1(x)))), dim=1)
        return self.head(torch.relu(self.conv2(y)).mean((2, 3)))


def unknown_models(k: int) -> dict[str, nn.Module]:
    torch.manual_seed(6)
    sizes = [(5, 4, 3), (3, 6, 2), (4, 3, 2)]
    return {name: randomise(Unknown(*sizes[i]), i) for i, name in enumerate("ABC"[:k])}


def test_unknown_ops_are_refused_by_default_and_shared_on_request():
    models = unknown_models(2)
    with pytest.raises(pamfx.UnsupportedOpError, match="node 'norm' .*GroupNorm has no channel rule"):
        pamfx.organise_layers(models, example_input())
    with pytest.raises(pamfx.InputError, match="unknown_ops='guess'"):
        pamfx.organise_layers(models, example_input(), unknown_ops="guess")
    layers = pamfx.organise_layers(models, example_input(), unknown_ops="share")
    assert layers.shared_layers == {"conv1", "norm", "up", "softmax"}  # what they touch, and what that reads
    merged = pamfx.merge(models, example_input(), pamfx.Grouping.random(layers, seed=0), layers=layers).eval()
    records = pamfx.read_multitask(merged).records
    assert all(set(records[name].task_sets) == {layers.tasks.all} for name in layers.shared_layers)
    x = example_input(batch=4, seed=3)
    origin = pamfx.merge(models, example_input(), "origin", unknown_ops="share").eval()
    for task, model in models.items():
        assert (origin(x)[task] - model(x)).abs().max().item() <= 1e-5
    with pytest.raises(pamfx.InputError, match=r"\['up'\] are read or written by an op without a channel rule"):
        pamfx.select_channels(merged, {"up": [0, 1]})
    check_all_combinations(pamfx.sort_channels(merged).eval(), layers)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(k=st.sampled_from([2, 3]), seed=st.integers(0, 2**16))
def test_shared_unknown_ops_random_groupings_emit_equals_merged(k, seed):
    """Emitted modules run each shared unknown op whole; cost counts its FLOPs as FlopCounterMode does."""
    merged, layers = randomly_merged(unknown_models(k), seed, unknown_ops="share")
    check_all_combinations(merged, layers)
