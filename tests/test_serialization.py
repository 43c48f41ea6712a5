"""pamfx.save / pamfx.load: the IR survives, loading never unpickles code, writes are atomic."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import pamfx
from pamfx.ir.meta import ALL_KEYS
from tests.conftest import ARCHITECTURES, example_input, model_set, perturb


def merged_network(arch: str, seed: int):
    models, layers = model_set(arch, 3)
    return perturb(pamfx.merge(models, example_input(), pamfx.Grouping.random(layers, seed), layers=layers), seed).eval()


def pamfx_meta(gm) -> dict:
    return {n.name: {k: n.meta[k] for k in ALL_KEYS if k in n.meta} for n in gm.graph.nodes}


def same_meta(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for name in a:
        if a[name].keys() != b[name].keys():
            return False
        for key, value in a[name].items():
            other = b[name][key]
            if isinstance(value, torch.Tensor):
                if not torch.equal(value, other):
                    return False
            elif value != other:
                return False
    return True


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(arch=st.sampled_from(ARCHITECTURES), seed=st.integers(0, 2**16))
def test_round_trip_keeps_the_ir_and_then_emits(tmp_path, arch, seed):
    merged = merged_network(arch, seed)
    loaded = pamfx.load(pamfx.save(merged, tmp_path / "merged.pamfx"))
    assert same_meta(pamfx_meta(loaded), pamfx_meta(merged))
    assert pamfx.read_multitask(loaded).grouping() == pamfx.read_multitask(merged).grouping()
    assert not loaded.training
    x = example_input(batch=3, seed=6)
    expected = merged(x)
    for combo in pamfx.read_multitask(loaded).tasks.combinations():
        emitted = pamfx.emit(loaded, combo)
        for task, value in emitted(x).items():
            assert torch.allclose(value, expected[task], atol=1e-5)
        assert pamfx.cost(loaded, combo) == pamfx.cost(merged, combo)


def test_emitted_modules_round_trip(tmp_path):
    merged = merged_network("resnet", 3)
    emitted = pamfx.emit(merged, ["A", "B"], fuse="always")
    loaded = pamfx.load(pamfx.save(emitted, tmp_path / "emitted.pamfx"))
    x = example_input(batch=2, seed=1)
    assert all(torch.equal(loaded(x)[t], emitted(x)[t]) for t in ("A", "B"))
    assert pamfx.fusion_report(loaded) == pamfx.fusion_report(emitted)


def test_foreign_or_malformed_files_are_refused(tmp_path):
    merged = merged_network("lenet5", 1)
    path = pamfx.save(merged, tmp_path / "m.pamfx")
    data = torch.load(path, weights_only=True)
    node = next(n for n in data["nodes"] if n["op"] == "call_function")
    node["target"] = "os:system"
    torch.save(data, path)
    with pytest.raises(pamfx.InputError, match="'os:system' is not one pamfx loads"):
        pamfx.load(path)
    data = torch.load(pamfx.save(merged, path), weights_only=True)
    del data["attributes"][next(iter(data["attributes"]))]  # a module the graph calls
    torch.save(data, path)
    with pytest.raises(pamfx.InputError, match="malformed"):
        pamfx.load(path)
    torch.save({"format": "pamfx.graph_module", "payload": nn.ReLU()}, path)  # needs unpickling a class
    with pytest.raises(pamfx.InputError, match="cannot read") as err:
        pamfx.load(path)
    assert err.value.__cause__ is not None


def test_failed_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    merged = merged_network("lenet5", 1)
    path = tmp_path / "m.pamfx"
    path.write_bytes(b"old")

    def broken(obj, f):
        open(f, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        pamfx.save(merged, path)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.pamfx"]


def test_what_cannot_be_saved_is_named(tmp_path):
    with pytest.raises(pamfx.InputError, match="GraphModule"):
        pamfx.save(nn.Linear(2, 2), tmp_path / "x")
    merged = merged_network("lenet5", 1)
    merged.get_submodule("conv1").odd = {1, 2}
    with pytest.raises(pamfx.InputError, match="'odd' of submodule 'conv1'"):
        pamfx.save(merged, tmp_path / "x")
    assert not (tmp_path / "x").exists()
