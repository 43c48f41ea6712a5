"""Bad input gets a clear pamfx error naming the model, node or argument (DESIGN.md §9.6)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pamfx
from pamfx.zoo.models import LeNet5
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
