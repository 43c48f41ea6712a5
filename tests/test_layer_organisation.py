"""Layer organisation (Alg. 3 generalised): neuron layers, their producers/consumers, matching."""
import torch
from torch import fx

import pamfx
from pamfx.analysis.channel_rules import Role
from pamfx.analysis.layer_organisation import organise_graph
from tests.conftest import example_input, make_models, model_set


def test_lenet_layers_and_flatten_block():
    _, layers = model_set("lenet5", 2)
    assert layers.names == ["conv1", "conv2", "fc1", "fc2"]
    conv2 = layers["conv2"].structures["A"]
    # 16x16 input: conv1 keeps 16, pool -> 8, conv2 (5x5) -> 4, pool -> 2: fc1 reads 2*2 features per channel
    assert [(c.node, c.block) for c in conv2.consumers] == [("fc1", 4)]
    assert layers["fc2"].structures["B"].consumers[0].head == "B"
    assert layers["conv1"].widths() == {"A": 6, "B": 3}


def test_origins_are_task_by_task():
    _, layers = model_set("vgg", 3)
    for layer in layers:
        widths = layer.widths()
        expected = [(t, j) for t in ("A", "B", "C") for j in range(widths[t])]
        assert list(layer.origins) == expected
        assert layer.offset("B") == widths["A"]


def test_resnet_block_output_is_a_layer_after_the_addition():
    _, layers = model_set("resnet", 2)
    identity = layers["layer1.0.add"].structures["A"]
    assert identity.producers == ("layer1_0_conv2",)
    assert identity.shortcuts == (("add", "stem.0"),)
    assert identity.output_node == "relu_1"  # the activation after the addition
    downsample = [l for l in layers if l.name.startswith("layer2.0.add")][0].structures["A"]
    assert set(downsample.producers) == {"layer2_0_conv2", "layer2_0_downsample_0"}
    assert downsample.shortcuts == ()


def test_depthwise_conv_stays_inside_its_layer():
    _, layers = model_set("mobilenetv2", 2)
    expand = layers["blocks.0.block.0"].structures["A"]
    assert "blocks_0_block_3" in expand.channelwise  # the 3x3 depthwise conv
    assert expand.consumers[0].node == "blocks_0_block_6"  # the linear 1x1 projection


def test_every_dense_op_is_a_producer_or_a_head(arch):
    models, layers = model_set(arch, 2)
    gm = layers.graphs["A"]
    organised = organise_graph(gm, "A", "A")
    convs = [n.name for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), (torch.nn.Linear,)) or (
        n.op == "call_module" and isinstance(gm.get_submodule(n.target), torch.nn.Conv2d) and gm.get_submodule(n.target).groups == 1)]
    producers = {p for l in organised.layers for p in l.producers}
    assert set(convs) == producers | {organised.heads["A"]}
    assert all(organised.nodes[p].role == Role.DENSE for p in producers)


def test_accepts_a_user_traced_graphmodule():
    models = make_models("lenet5", 2)
    traced = {t: fx.symbolic_trace(m) for t, m in models.items()}
    layers = pamfx.organise_layers(traced, example_input())
    assert layers.names == model_set("lenet5", 2)[1].names


def test_trace_propagates_shapes(arch):
    models = make_models(arch, 1)
    gm = pamfx.trace(models["A"], example_input())
    assert all("tensor_meta" in n.meta for n in gm.graph.nodes if n.op not in ("output",) and n.op == "call_module")
