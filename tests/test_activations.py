"""Activations of neuron layers on calibration data (pamfx.analysis.activations)."""
from __future__ import annotations

import pytest
import torch
from torch import fx, nn
from torch.utils.data import DataLoader, TensorDataset

from pamfx.analysis.activations import build_extractor, collect_activations
from pamfx.errors import InputError, MismatchError
from pamfx.ir import Consumer, LayerMap, LayerStructure, NeuronLayer, TaskSpace

TASKS = TaskSpace(("A", "B"))


class ResNetLike(nn.Module):
    """A stem conv and one residual block whose neuron layer is the output after the addition."""

    def __init__(self, channels: int):
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels, 2)

    def stem_out(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.stem(x))

    def block_out(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem_out(x)
        return torch.relu(self.bn(self.conv(h)) + h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block_out(x).mean((2, 3)))


def _structure(name: str, width: int, output_node: str) -> LayerStructure:
    return LayerStructure(name, width, (output_node,), (), (Consumer("next"),), (), output_node)


def _origins(widths: dict[str, int]) -> tuple[tuple[str, int], ...]:
    return tuple((t, j) for t in TASKS.names for j in range(widths[t]))


def _mlp_layers(widths=None, origins=None) -> tuple[LayerMap, dict[str, nn.Sequential]]:
    widths = widths or {"A": 5, "B": 3}
    torch.manual_seed(0)
    models = {t: nn.Sequential(nn.Linear(4, w), nn.ReLU(), nn.Linear(w, 2)) for t, w in widths.items()}
    graphs = {t: fx.symbolic_trace(m) for t, m in models.items()}
    layer = NeuronLayer(
        "fc1",
        origins or _origins(widths),
        {t: _structure("fc1", widths[t], "_1") for t in TASKS.names},
    )
    return LayerMap(TASKS, (layer,), graphs, torch.zeros(1, 4)), models


def _res_layers() -> tuple[LayerMap, dict[str, ResNetLike]]:
    torch.manual_seed(1)
    widths = {"A": 3, "B": 4}
    models = {t: ResNetLike(w) for t, w in widths.items()}
    for model in models.values():  # non-trivial BN statistics
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    graphs = {t: fx.symbolic_trace(m) for t, m in models.items()}
    layers = tuple(
        NeuronLayer(name, _origins(widths), {t: _structure(name, widths[t], node) for t in TASKS.names})
        for name, node in (("stem", "relu"), ("block", "relu_1"))
    )
    return LayerMap(TASKS, layers, graphs, torch.zeros(1, 1, 6, 6)), models


def test_linear_features_are_the_hidden_outputs_concatenated_in_task_order():
    layers, models = _mlp_layers()
    x = torch.randn(37, 4)
    acts = collect_activations(layers, x, batch_size=8, progress=False)
    expected = torch.cat([models[t][:2](x) for t in TASKS.names], dim=1)
    assert acts.num_samples == 37
    torch.testing.assert_close(acts["fc1"], expected)


def test_channels_follow_the_origins_order():
    widths = {"A": 5, "B": 3}
    origins = (("B", 2), ("A", 0), ("A", 4), ("B", 0), ("A", 1), ("A", 2), ("B", 1), ("A", 3))
    layers, models = _mlp_layers(widths, origins)
    x = torch.randn(20, 4)
    acts = collect_activations(layers, x, progress=False)
    hidden = {t: models[t][:2](x) for t in TASKS.names}
    expected = torch.stack([hidden[t][:, j] for t, j in origins], dim=1)
    torch.testing.assert_close(acts["fc1"], expected)


@pytest.mark.parametrize("summary", ["mean", "max", "map"])
def test_conv_summaries_and_residual_output_after_the_addition(summary):
    layers, models = _res_layers()
    x = torch.randn(11, 1, 6, 6)
    acts = collect_activations(layers, x, conv_summary=summary, batch_size=4, progress=False)
    with torch.no_grad():
        for name, fn in (("stem", "stem_out"), ("block", "block_out")):
            maps = torch.cat([getattr(models[t].eval(), fn)(x) for t in TASKS.names], dim=1).flatten(2)
            expected = {"mean": maps.mean(2), "max": maps.amax(2), "map": maps}[summary]
            torch.testing.assert_close(acts[name], expected)
    # The block output is taken after the residual addition: it differs from the branch alone.
    with torch.no_grad():
        branch = torch.relu(models["A"].bn(models["A"].conv(models["A"].stem_out(x)))).mean((2, 3))
    assert not torch.allclose(acts["block"][:, :3] if summary != "map" else acts["block"][:, :3].mean(2), branch)


def test_dataloader_batches_and_tensor_give_the_same_features():
    layers, _ = _mlp_layers()
    x = torch.randn(50, 4)
    loader = DataLoader(TensorDataset(x, torch.zeros(50)), batch_size=7, shuffle=False)
    from_loader = collect_activations(layers, loader, progress=False)
    from_tensor = collect_activations(layers, x, batch_size=1000, progress=False)
    torch.testing.assert_close(from_loader["fc1"], from_tensor["fc1"])


def test_networks_run_in_eval_mode_and_their_mode_is_restored():
    layers, models = _res_layers()
    for model in models.values():
        model.train()
    before = {t: m.bn.running_mean.clone() for t, m in models.items()}
    collect_activations(layers, torch.randn(9, 1, 6, 6), progress=False)
    for t, model in models.items():
        assert all(module.training for module in model.modules())
        assert all(module.training for module in layers.graphs[t].modules())
        torch.testing.assert_close(model.bn.running_mean, before[t])  # eval mode: BN statistics untouched


def test_extractor_returns_the_requested_nodes_only():
    layers, models = _res_layers()
    extractor = build_extractor(layers.graphs["A"], ["relu", "relu_1"])
    x = torch.randn(3, 1, 6, 6)
    stem, block = extractor.eval()(x)
    torch.testing.assert_close(stem, models["A"].eval().stem_out(x))
    torch.testing.assert_close(block, models["A"].block_out(x))
    assert "head" not in {n.name for n in extractor.graph.nodes}  # dead code removed


def test_values_are_captured_before_later_in_place_ops():
    torch.manual_seed(2)
    models = {t: nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(inplace=True), nn.Linear(3, 2)) for t in "AB"}
    graphs = {t: fx.symbolic_trace(m) for t, m in models.items()}
    layers = tuple(
        NeuronLayer(name, _origins({"A": w, "B": w}), {t: _structure(name, w, node) for t in "AB"})
        for name, node, w in (("bn", "_1", 3), ("out", "_3", 2))
    )
    x = torch.randn(30, 4)
    acts = collect_activations(LayerMap(TASKS, layers, graphs, x[:1]), x, progress=False)
    expected = torch.cat([models[t].eval()[:2](x) for t in "AB"], dim=1)
    torch.testing.assert_close(acts["bn"], expected)
    assert (acts["bn"] < 0).any()  # the in-place ReLU that follows did not touch the captured values


def test_nan_activations_are_reported_with_layer_and_task():
    layers, models = _mlp_layers()
    with torch.no_grad():
        models["B"][0].bias[1] = float("nan")
    with pytest.raises(InputError, match=r"layer 'fc1', task 'B'.*NaN"):
        collect_activations(layers, torch.randn(10, 4), progress=False)


def test_width_mismatch_and_bad_arguments_are_refused():
    widths = {"A": 5, "B": 3}
    layers, _ = _mlp_layers(widths)
    wrong = NeuronLayer(
        "fc1", _origins({"A": 5, "B": 4}),
        {"A": _structure("fc1", 5, "_1"), "B": _structure("fc1", 4, "_1")},
    )
    bad = LayerMap(TASKS, (wrong,), layers.graphs, layers.example_input)
    with pytest.raises(MismatchError, match="task 'B'.*3 channels"):
        collect_activations(bad, torch.randn(4, 4), progress=False)
    with pytest.raises(InputError, match="conv_summary"):
        collect_activations(layers, torch.randn(4, 4), conv_summary="median", progress=False)
    with pytest.raises(InputError, match="empty"):
        collect_activations(layers, torch.randn(0, 4), progress=False)
    with pytest.raises(InputError, match="batch 0"):
        collect_activations(layers, [{"x": torch.randn(2, 4)}], progress=False)
