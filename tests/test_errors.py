"""Bad input gets a clear pamfx error naming the model, node or argument (docs/design.md §13)."""
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import pamfx
from pamfx.zoo.models import LeNet5
from pamfx.ir.meta import META_MASK
from tests.conftest import example_input, make_models, model_set


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # control flow on a tensor value: not traceable
            y = y * 2
        return self.fc(y.mean((2, 3)))


class ChannelSoftmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(F.softmax(self.conv(x), dim=1).mean((2, 3)))


def test_untraceable_model_names_where():
    with pytest.raises(pamfx.TraceError) as err:
        pamfx.organise_layers({"A": DataDependent(), "B": DataDependent()}, example_input())
    assert "A" in str(err.value) and "y.sum() > 0" in str(err.value)


@pytest.mark.parametrize("model, node", [(ChannelSoftmax, "softmax")])
def test_unsupported_op_names_the_node(model, node):
    with pytest.raises(pamfx.UnsupportedOpError, match=node):
        pamfx.organise_layers({"A": model(), "B": model()}, example_input())


def test_mismatched_networks_name_the_layer():
    class Wider(LeNet5):
        def __init__(self):
            super().__init__(2, 1, 16)
            self.conv2 = nn.Conv2d(6, 16, 3, padding=1)
            self.fc1 = nn.Linear(16 * 4 * 4, 120)

    with pytest.raises(pamfx.MismatchError, match="conv2"):
        pamfx.organise_layers({"A": LeNet5(2, 1, 16), "B": Wider()}, example_input())


def test_mismatched_depth():
    models = make_models("lenet5", 1)
    resnet = make_models("resnet", 1)["A"]
    with pytest.raises(pamfx.MismatchError):
        pamfx.organise_layers({"A": models["A"], "B": resnet}, example_input())


def test_wrong_input_shape_names_the_model():
    with pytest.raises(pamfx.TraceError, match="B"):
        pamfx.organise_layers({"A": LeNet5(2, 1, 16), "B": LeNet5(2, 3, 16)}, example_input())


def test_fewer_than_two_networks():
    with pytest.raises(pamfx.InputError, match="K >= 2"):
        pamfx.organise_layers({"A": LeNet5(2, 1, 16)}, example_input())


def test_grouping_with_wrong_size_names_the_layer():
    models, layers = model_set("lenet5", 2)
    mapping = {l.name: [{"A"}] * l.width for l in layers}
    mapping["conv2"] = mapping["conv2"][:-1]
    with pytest.raises(pamfx.GroupingError, match="conv2"):
        pamfx.Grouping.from_mapping(layers, mapping)


def test_grouping_with_an_empty_task_set_names_the_channel():
    models, layers = model_set("lenet5", 2)
    mapping = {l.name: [3] * l.width for l in layers}
    mapping["fc1"][4] = 0
    with pytest.raises(pamfx.GroupingError, match="fc1"):
        pamfx.Grouping.from_mapping(layers, mapping)


def test_grouping_string_must_be_known():
    models, layers = model_set("lenet5", 2)
    with pytest.raises(pamfx.GroupingError, match="shared"):
        pamfx.merge(models, example_input(), "everything", layers=layers)


def test_unknown_task_in_combination():
    models, layers = model_set("lenet5", 2)
    merged = pamfx.merge(models, example_input(), "origin", layers=layers)
    with pytest.raises(pamfx.InputError, match="Z"):
        pamfx.emit(merged, ["Z"])


def test_emit_rejects_a_plain_module():
    with pytest.raises(pamfx.IRError):
        pamfx.emit(pamfx.trace(LeNet5(2, 1, 16), example_input()), ["A"])


def test_merge_refuses_layers_of_other_models():
    old, layers = model_set("lenet5", 2)
    new = make_models("lenet5", 2, seed=5)
    with pytest.raises(pamfx.InputError, match="not organised from model 'A'"):
        pamfx.merge(new, example_input(), "origin", layers=layers)
    with pytest.raises(pamfx.InputError, match="tasks"):
        pamfx.merge(dict(reversed(list(old.items()))), example_input(), "origin", layers=layers)
    with pytest.raises(pamfx.InputError, match="shape"):
        pamfx.merge(old, torch.zeros(1, 1, 20, 20), "origin", layers=layers)


def test_merge_refuses_layers_of_a_model_changed_since():
    models = make_models("lenet5", 2, seed=3)
    layers = pamfx.organise_layers(models, example_input())
    with torch.no_grad():
        models["B"].fc1.weight[0, 0] += 1.0
    with pytest.raises(pamfx.InputError, match="'B'.*fc1.weight"):
        pamfx.merge(models, example_input(), "origin", layers=layers)


def test_nonzero_weight_on_a_masked_connection_is_an_ir_error():
    models, layers = model_set("vgg", 2)
    merged = pamfx.merge(models, example_input(), pamfx.Grouping.random(layers, seed=2), layers=layers)
    node = next(n for n in merged.graph.nodes if META_MASK in n.meta and not bool(n.meta[META_MASK].all()))
    out, inp = (~node.meta[META_MASK]).nonzero()[0].tolist()
    with torch.no_grad():
        weight = merged.get_submodule(node.target).weight
        weight[(out, inp) + (0,) * (weight.dim() - 2)] += 0.5  # what a careless foreign pass does
    with pytest.raises(pamfx.IRError, match=f"{node.name}.*1 weights on masked connections"):
        pamfx.read_multitask(merged)
    with pytest.raises(pamfx.IRError, match=node.name):
        pamfx.emit(merged, ["A"])


def test_task_names_cannot_read_as_a_task_set():
    with pytest.raises(pamfx.InputError, match="'&'"):
        pamfx.TaskSpace(("A", "B", "A&B"))


class DictOutput(ChannelSoftmax):
    def forward(self, x):
        return {"y": self.fc(self.conv(x).mean((2, 3)))}


class TwoInputs(DictOutput):
    def forward(self, x, y):
        return self.fc(self.conv(x + y).mean((2, 3)))


@pytest.mark.parametrize(
    "models, x, error, text",
    [
        ({"A": LeNet5(2, 1, 16), "B": LeNet5(2, 1, 16)}, torch.zeros(2, 3, 16, 16), pamfx.TraceError,
         r"'conv1'.*expected input\[2, 3, 16, 16\] to have 1 channels"),
        ({"A": LeNet5(2, 1, 16).double(), "B": LeNet5(2, 1, 16)}, example_input(), pamfx.TraceError,
         r"A: .*'conv1'.*Input type \(float\) and bias type \(double\)"),
        ({"A": TwoInputs(), "B": TwoInputs()}, example_input(), pamfx.TraceError, r"node 'y'.*2 inputs"),
        ({"A": LeNet5(2, 1, 16), "B": LeNet5(2, 1, 16)}, torch.zeros(0, 1, 16, 16), pamfx.TraceError, "one sample"),
        ({"A": fx.symbolic_trace(DictOutput()), "B": DictOutput()}, example_input(), pamfx.InputError, "A: .*one tensor.*dict"),
    ],
    ids=["channels", "float64", "two-inputs", "batch-0", "dict-output"],
)
def test_a_model_that_fails_on_the_input_keeps_torchs_cause(models, x, error, text):
    with pytest.raises(error, match=text) as err:
        pamfx.organise_layers(models, x)
    if error is pamfx.TraceError and x.shape[0]:
        assert isinstance(err.value.__cause__, RuntimeError) and "ShapeProp" not in str(err.value)


def test_a_merged_network_is_not_an_input_model():
    models, layers = model_set("lenet5", 2)
    merged = pamfx.merge(models, example_input(), "origin", layers=layers)
    with pytest.raises(pamfx.InputError, match="A: is a merged multitask network"):
        pamfx.merge({"A": merged, "B": models["B"]}, example_input())


@pytest.mark.parametrize("bad", [LeNet5(2, 1, 16), [1], None])
def test_ir_readers_refuse_what_is_not_a_merged_network(bad):
    for entry in (pamfx.emit, pamfx.select_channels, pamfx.read_multitask):
        args = (bad, {}) if entry is pamfx.select_channels else (bad,) if entry is pamfx.read_multitask else (bad, "A")
        with pytest.raises(pamfx.IRError, match="merged network"):
            entry(*args)


def test_calibration_data_of_the_wrong_shape_is_named():
    models, layers = model_set("lenet5", 2)
    batches = [example_input(batch=2), torch.zeros(2, 3, 16, 16)]
    with pytest.raises(pamfx.InputError, match=r"calibration batch 1 .*\(3, 16, 16\).*\(1, 16, 16\)"):
        pamfx.collect_activations(layers, batches, progress=False)


def _entry_points():
    models, layers = model_set("lenet5", 2)
    merged = pamfx.merge(models, example_input(), "origin", layers=layers)
    labels = {"A": torch.zeros(3), "B": torch.zeros(3)}
    return {
        "select_channels keep": lambda: pamfx.select_channels(merged, [1, 2]),
        "select_channels indices": lambda: pamfx.select_channels(merged, {"conv1": "ab"}),
        "regroup layers": lambda: pamfx.regroup(None, example_input(), labels),
        "cost tasks": lambda: pamfx.cost(merged, 5.5),
        "export_onnx module": lambda: pamfx.export_onnx(None, example_input(), "unused.onnx"),
        "Grouping.from_mapping": lambda: pamfx.Grouping.from_mapping(layers, None),
        "Grouping.random": lambda: pamfx.Grouping.random(None),
        "collect_activations": lambda: pamfx.collect_activations(None, example_input()),
        "fusion_report": lambda: pamfx.fusion_report(None),
        "estimate_mi": lambda: pamfx.estimate_mi(None, None),
    }


@pytest.mark.parametrize("entry", list(_entry_points()))
def test_public_entry_points_name_a_wrong_argument(entry):
    with pytest.raises(pamfx.InputError):
        _entry_points()[entry]()
