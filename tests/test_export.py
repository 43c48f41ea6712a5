"""ONNX export: onnxruntime reproduces the merged network per combination, batch axis dynamic, atomic writes."""
import json
import os
import re
import sys

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import pamfx
from pamfx.codegen import export as export_module
from pamfx.codegen.emit import ConstantChannels
from pamfx.codegen.export import ExportError, combination_files, export_all, export_onnx
from pamfx.ir import TaskSpace
from pamfx.zoo.models import build_model
from tests.conftest import INPUT_SIZE, example_input, model_set, perturb

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def merged_network(arch: str, k: int, seed: int):
    models, layers = model_set(arch, k)
    grouping = pamfx.Grouping.random(layers, seed=seed)
    return perturb(pamfx.merge(models, example_input(), grouping, layers=layers), seed).eval(), layers


def run_onnx(path, x: torch.Tensor) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert isinstance(inp.shape[0], str), "the batch axis must be symbolic"
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {inp.name: x.numpy()})))


def assert_onnx_equals_merged(path, merged, tasks: list[str]) -> None:
    """At a batch of 5 (exports are made at batch 1): the task outputs, by name, in order."""
    x = example_input(batch=5, seed=7)
    got = run_onnx(path, x)
    assert list(got) == tasks
    with torch.no_grad():
        reference = merged(x)
    for task in tasks:
        assert got[task].shape == tuple(reference[task].shape)
        assert np.abs(got[task] - reference[task].numpy()).max() <= 1e-4, task


def only_files(directory) -> list[str]:
    return sorted(os.listdir(directory))


@pytest.mark.parametrize("arch,k,seed", [("lenet5", 2, 0), ("vgg", 3, 1), ("resnet", 2, 2), ("mobilenetv2", 3, 3)])
def test_exported_combinations_equal_the_merged_network(tmp_path, arch, k, seed):
    merged, layers = merged_network(arch, k, seed)
    names = list(layers.tasks.names)
    for i, tasks in enumerate([names[:1], names[1:], names]):
        path = export_onnx(pamfx.emit(merged, tasks), example_input(batch=1), tmp_path / f"{i}.onnx")
        assert_onnx_equals_merged(path, merged, tasks)
    assert only_files(tmp_path) == ["0.onnx", "1.onnx", "2.onnx"]


def test_plain_module_in_training_mode_exports_its_inference_graph(tmp_path):
    model = build_model("vgg", 3, 1, INPUT_SIZE).train()
    path = export_onnx(model, example_input(batch=2), tmp_path / "plain.onnx")
    assert model.training, "export must leave the module's mode as it was"
    got = run_onnx(path, example_input(batch=3, seed=1))
    assert list(got) == ["output"]
    with torch.no_grad():
        assert np.abs(got["output"] - model.eval()(example_input(batch=3, seed=1)).numpy()).max() <= 1e-4


def test_group_without_inputs_exports_through_the_dynamo_fallback(tmp_path):
    """Layer 1 exclusive to A, the rest shared: the shared groups of layer 2 read nothing (bias only)."""
    models, layers = model_set("vgg", 2)
    first = next(iter(layers)).name
    grouping = pamfx.Grouping.from_mapping(layers, {l.name: ["A" if l.name == first else ["A", "B"]] * l.width for l in layers})
    merged = perturb(pamfx.merge(models, example_input(), grouping, layers=layers), 0).eval()
    emitted = pamfx.emit(merged, ["A", "B"])
    assert any(isinstance(m, ConstantChannels) for m in emitted.modules())
    with pytest.raises(ExportError, match="torchscript exporter"):
        export_onnx(emitted, example_input(batch=1), tmp_path / "legacy.onnx", exporter="torchscript")
    assert only_files(tmp_path) == []
    path = export_onnx(emitted, example_input(batch=1), tmp_path / "auto.onnx")
    assert_onnx_equals_merged(path, merged, ["A", "B"])


def corrupt_after_simplify(monkeypatch, fail_on_call: int = 1) -> None:
    """From the ``fail_on_call``-th simplification on, shift the largest weight of the model by 0.5."""
    simplify = export_module._simplify
    calls = []

    def corrupted(model):
        model = simplify(model)
        calls.append(1)
        if len(calls) >= fail_on_call:
            weight = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
            weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight) + 0.5, weight.name))
        return model

    monkeypatch.setattr(export_module, "_simplify", corrupted)


def test_mismatch_raises_and_keeps_the_old_file(tmp_path, monkeypatch):
    merged, _ = merged_network("lenet5", 2, 4)
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    corrupt_after_simplify(monkeypatch)
    with pytest.raises(ExportError, match=r"differs from the module by up to"):
        export_onnx(pamfx.emit(merged, ["A"]), example_input(batch=1), target, exporter="torchscript")
    assert only_files(tmp_path) == ["model.onnx"] and target.read_bytes() == b"old"


def test_failed_rename_leaves_no_temporary_file(tmp_path, monkeypatch):
    merged, _ = merged_network("lenet5", 2, 5)

    def no_rename(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="disk full"):
        export_onnx(pamfx.emit(merged, ["B"]), example_input(batch=1), tmp_path / "model.onnx")
    assert only_files(tmp_path) == []


def test_unwritable_targets_are_refused_before_exporting(tmp_path):
    merged, _ = merged_network("lenet5", 2, 6)
    emitted = pamfx.emit(merged, ["A"])
    with pytest.raises(pamfx.InputError, match="does not exist"):
        export_onnx(emitted, example_input(batch=1), tmp_path / "missing" / "model.onnx")
    with pytest.raises(pamfx.InputError, match="is a directory"):
        export_onnx(emitted, example_input(batch=1), tmp_path)
    assert only_files(tmp_path) == []


def test_missing_dependency_names_the_extra(tmp_path, monkeypatch):
    merged, _ = merged_network("lenet5", 2, 7)
    emitted = pamfx.emit(merged, ["A", "B"])
    monkeypatch.setitem(sys.modules, "onnxsim", None)
    with pytest.raises(ExportError, match=r"'onnxsim'.*pip install 'pamfx\[export\]'"):
        export_onnx(emitted, example_input(batch=1), tmp_path / "model.onnx")
    assert only_files(tmp_path) == []
    assert_onnx_equals_merged(export_onnx(emitted, example_input(batch=1), tmp_path / "model.onnx", simplify=False), merged, ["A", "B"])


def test_export_all_writes_every_combination_and_an_index(tmp_path):
    models, _ = model_set("lenet5", 3)
    named = dict(zip(["digits/0-4", "digits 5-9", "Digits_5-9"], models.values()))
    layers = pamfx.organise_layers(named, example_input())
    merged = perturb(pamfx.merge(named, example_input(), pamfx.Grouping.random(layers, seed=8), layers=layers), 8).eval()
    out = tmp_path / "out"
    index = export_all(merged, example_input(batch=1), out, progress=False)

    entries = index["combinations"]
    assert len(entries) == 2**3 - 1
    assert only_files(out) == sorted([e["file"] for e in entries.values()] + ["index.json"])
    assert json.loads((out / "index.json").read_text()) == index
    for label, entry in entries.items():
        assert label == "&".join(entry["tasks"])
        assert re.fullmatch(r"[A-Za-z0-9_.+-]+\.onnx", entry["file"])
        c = pamfx.cost(merged, entry["tasks"])
        assert (entry["flops"], entry["macs"], entry["params"]) == (c.flops, c.macs, c.params)
        assert entry["bytes"] == (out / entry["file"]).stat().st_size and entry["executed_flops"] >= entry["flops"]
        assert_onnx_equals_merged(out / entry["file"], merged, entry["tasks"])


@pytest.mark.parametrize("arch", ["vgg", "resnet"])
def test_export_all_runs_the_fast_form_in_onnxruntime_within_1e5(tmp_path, arch):
    """K = 3, every combination: the exported file is the default emitted module (BatchNorm folded,
    channel-ordered, cost-model plan) and onnxruntime reproduces it, and the merged network, to 1e-5."""
    merged, layers = merged_network(arch, 3, 12)
    index = export_all(merged, example_input(batch=1), tmp_path, progress=False, tolerance=1e-5)
    x = example_input(batch=5, seed=9)
    with torch.no_grad():
        reference = merged(x)
    for combo in layers.tasks.combinations():
        entry = index["combinations"][layers.tasks.label(combo)]
        model = onnx.load(str(tmp_path / entry["file"]))
        assert not any(node.op_type == "BatchNormalization" for node in model.graph.node)
        assert not any(node.op_type == "Transpose" for node in model.graph.node)  # gathers export as plain Gathers
        got = run_onnx(tmp_path / entry["file"], x)
        with torch.no_grad():
            emitted = pamfx.emit(merged, combo)(x)
        for task in entry["tasks"]:
            assert np.abs(got[task] - emitted[task].numpy()).max() <= 1e-5, (combo, task)
            assert np.abs(got[task] - reference[task].numpy()).max() <= 1e-5, (combo, task)


def test_failed_export_all_writes_nothing(tmp_path, monkeypatch):
    merged, _ = merged_network("lenet5", 2, 9)
    (tmp_path / "index.json").write_text("old")
    corrupt_after_simplify(monkeypatch, fail_on_call=2)
    with pytest.raises(ExportError):
        export_all(merged, example_input(batch=1), tmp_path, exporter="torchscript", progress=False)
    assert only_files(tmp_path) == ["index.json"] and (tmp_path / "index.json").read_text() == "old"


def test_combination_files_are_safe_and_distinct():
    tasks = TaskSpace(("a/b", "a b", "A_b", "x" * 300))
    files = combination_files(tasks)
    assert len(set(map(str.lower, files.values()))) == len(files) == 2**4 - 1
    assert all(re.fullmatch(r"[A-Za-z0-9_.+-]{1,200}\.onnx", f) for f in files.values())
    assert combination_files(TaskSpace(("A", "B")))[0b11] == "A+B.onnx"
    long = combination_files(TaskSpace(tuple(c * 50 for c in "abcdef")))
    assert len(set(long.values())) == 2**6 - 1 and max(map(len, long.values())) <= 200


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="aAbB+_ .-/&é", min_size=1, max_size=4), min_size=1, max_size=4, unique=True))
def test_no_two_combinations_share_a_file(names):
    assume("&" not in "".join(names))
    files = combination_files(TaskSpace(tuple(names)))
    assert len({f.lower() for f in files.values()}) == len(files) == 2 ** len(names) - 1
