"""Organising, merging and emitting never mutate, or share state with, the user's models."""
import torch
from torch import fx, nn

import pamfx
from tests.conftest import example_input, randomise


class Net(nn.Module):
    """Conv-BN-ReLU-Dropout twice, spatial mean, linear head: every kind of shareable state."""

    def __init__(self, width: int, classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.conv2 = nn.Conv2d(width, 6, 3)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        x = self.drop(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.relu(self.bn2(self.conv2(x))).mean((2, 3)))


def models(train: bool = False) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    out = {"A": randomise(Net(4, 2), 1), "B": randomise(Net(5, 3), 2)}
    return {t: m.train(train) for t, m in out.items()}


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def tensors(module: nn.Module) -> set[int]:
    return {t.data_ptr() for t in list(module.parameters()) + list(module.buffers())}


def test_merged_and_emitted_share_no_module_or_tensor_with_the_models():
    ms = models()
    merged = pamfx.merge(ms, example_input(), "shared")
    emitted = pamfx.emit(merged, ["A", "B"])
    user_modules = {id(m) for model in ms.values() for m in model.modules()}
    user_tensors = set().union(*(tensors(m) for m in ms.values()))
    for built in (merged, emitted):
        assert not {id(m) for m in built.modules()} & user_modules
        assert not tensors(built) & user_tensors
    assert not {id(m) for m in emitted.modules()} & {id(m) for m in merged.modules()}
    assert not tensors(emitted) & tensors(merged)


def test_training_the_merged_network_leaves_the_models_alone():
    ms = models()
    before = {t: (state(m), flags(m)) for t, m in ms.items()}
    merged = pamfx.merge(ms, example_input(), pamfx.Grouping.random(pamfx.organise_layers(ms, example_input()), 1))
    merged.train()
    merged(example_input())  # moves running statistics and num_batches_tracked of the merged BNs
    pamfx.emit(merged, "A").train()(example_input())
    for t, m in ms.items():
        assert flags(m) == before[t][1] and not m.drop.training
        after = state(m)
        assert all(torch.equal(after[k], v) for k, v in before[t][0].items())
    assert merged.get_submodule("bn1").num_batches_tracked.item() == 1


def test_hooks_on_the_models_never_fire_in_pamfx_modules():
    ms = models()
    fired = []
    for m in ms.values():
        for sub in (m.conv1, m.relu, m.bn2, m.fc):
            sub.register_forward_hook(lambda mod, i, o: fired.append(type(mod).__name__))
            sub.register_forward_pre_hook(lambda mod, i: fired.append(type(mod).__name__))
    merged = pamfx.merge(ms, example_input(), "origin")
    fired.clear()
    merged(example_input())
    for combo in (["A"], ["B"], ["A", "B"]):
        pamfx.emit(merged, combo)(example_input())
    assert fired == []
    ms["A"](example_input())
    assert fired  # the hooks are still on the user's model


def test_organising_keeps_a_frozen_batchnorm_frozen_and_the_model_unwritten():
    ms = models(train=True)
    ms["A"].bn1.eval()  # a frozen BN inside a model in training mode
    before = {t: flags(m) for t, m in ms.items()}
    layers = pamfx.organise_layers(ms, example_input())
    merged = pamfx.merge(ms, example_input(), "origin", layers=layers)
    assert {t: flags(m) for t, m in ms.items()} == before
    assert merged.training and not merged.get_submodule("bn1").training and merged.get_submodule("bn2").training


def test_a_users_graphmodule_is_not_written_to():
    ms = {t: fx.symbolic_trace(m) for t, m in models().items()}
    code = {t: m.code for t, m in ms.items()}
    merged = pamfx.merge(ms, example_input(), "origin")
    for t, gm in ms.items():
        assert gm.code == code[t]
        assert all("tensor_meta" not in n.meta for n in gm.graph.nodes)
    x = example_input(batch=4, seed=3)
    for t, gm in ms.items():
        assert torch.allclose(merged(x)[t], gm(x), atol=1e-5)


def test_reading_the_ir_never_writes_to_the_merged_network():
    merged = pamfx.merge(models(), example_input(), "shared")
    node = next(n for n in merged.graph.nodes if n.name == "relu")
    with merged.graph.inserting_after(node):
        scaled = merged.graph.call_function(torch.mul, (node, 2.0))
    node.replace_all_uses_with(scaled, delete_user_cb=lambda u: u is not scaled)
    merged.recompile()
    metas = {n.name: dict(n.meta) for n in merged.graph.nodes}
    view = pamfx.read_multitask(merged)
    assert view.gm is not merged and "tensor_meta" in next(n for n in view.gm.graph.nodes if n.name == scaled.name).meta
    assert {n.name: dict(n.meta) for n in merged.graph.nodes} == metas


def test_hooks_on_the_merged_network_stay_there():
    merged = pamfx.merge(models(), example_input(), "shared")
    fired = []
    for module in merged.modules():
        if not isinstance(module, fx.GraphModule):
            module.register_forward_hook(lambda mod, i, o: fired.append(type(mod).__name__))
    pamfx.emit(merged, ["A", "B"])(example_input())
    assert fired == []
    merged(example_input())
    assert fired
