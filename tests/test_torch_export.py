"""The torch.export front end: ExportedProgram and ep.module() merge like the eager models."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pamfx
from tests.conftest import ARCHITECTURES, example_input, make_models
from tests.test_errors import ChannelSoftmax


def exported(models: dict) -> dict:
    """Task A as an ExportedProgram, the others as ``ep.module()``."""
    out = {}
    for i, (task, model) in enumerate(models.items()):
        program = torch.export.export(model, (example_input(),))
        out[task] = program if i == 0 else program.module()
    return out


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=st.sampled_from(ARCHITECTURES), seed=st.integers(0, 2**16))
def test_exported_models_merge_exactly_like_the_eager_ones(arch, seed):
    models = make_models(arch, 2, seed=seed % 7)
    programs = exported(models)
    layers = pamfx.organise_layers(programs, example_input())
    assert layers.names == pamfx.organise_layers(models, example_input()).names
    x = example_input(batch=4, seed=2)
    origin = pamfx.merge(programs, example_input(), "origin", layers=layers).eval()
    for task, model in models.items():
        assert torch.allclose(origin(x)[task], model(x), atol=1e-5)
    merged = pamfx.merge(programs, example_input(), pamfx.Grouping.random(layers, seed), layers=layers).eval()
    expected = merged(x)
    for combo in layers.tasks.combinations():
        for task, value in pamfx.emit(merged, combo)(x).items():
            assert torch.allclose(value, expected[task], atol=1e-5)


def test_an_exported_op_pamfx_does_not_know_is_refused_by_name():
    programs = exported({"A": ChannelSoftmax(), "B": ChannelSoftmax()})
    with pytest.raises(pamfx.UnsupportedOpError, match="softmax"):
        pamfx.organise_layers(programs, example_input())
