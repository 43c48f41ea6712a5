"""The latency harness: what it times computes the networks' outputs, every combination, backend and
batch is measured, and the comparison's results, table, CSV and plot carry the figures. Speed is
never asserted: it depends on the machine."""
import dataclasses
import json
import statistics

import pytest
import torch

import pamfx
from pamfx.errors import InputError, IRError
from pamfx.experiment import ExperimentConfig, results_dict, run_comparison
from pamfx.latency import _ort_runners, _parts, _torch_runners, measure_latency
from pamfx.passes.merge import as_multitask
from pamfx.report import format_table, write_report

from conftest import example_input, model_set

BATCHES = (1, 3)


@pytest.fixture(scope="module")
def networks():
    models, layers = model_set("lenet5", 3)
    x = example_input()
    merged = pamfx.merge(models, x, pamfx.Grouping.random(layers, seed=0), layers=layers).eval()
    singles = {t: as_multitask(m, x, t).eval() for t, m in models.items()}
    return {"baseline1": singles, "pam": merged}, pamfx.read_multitask(merged).tasks, x


def _outputs(out: list, names: list[str]) -> dict[str, torch.Tensor]:
    """A runner's result as {task: output}: torch runners give one dict per module, onnxruntime runners
    one list of arrays per session, in the combination's task order."""
    if isinstance(out[0], dict):
        return {task: value for piece in out for task, value in piece.items()}
    return dict(zip(names, (torch.from_numpy(a) for piece in out for a in piece)))


def test_timed_modules_compute_the_networks_outputs(networks, tmp_path):
    nets, tasks, x = networks
    parts = _parts(nets, tasks)
    with torch.no_grad():
        reference = nets["pam"](x)
        singles = {t: nets["baseline1"][t](x)[t] for t in tasks}
    for backend, runners, feed in (("torch", _torch_runners(parts, x), x),
                                   ("onnxruntime", _ort_runners(parts, x, tmp_path, False), x.numpy())):
        for combo in tasks.combinations():
            names = tasks.ordered_names(combo)
            with torch.inference_mode():
                pam, b1 = runners["pam"][combo](feed), runners["baseline1"][combo](feed)
            assert len(pam) == 1 and len(b1) == len(names), backend  # one module for PAM, one network per task for B1
            pam, b1 = _outputs(pam, names), _outputs(b1, names)
            assert list(pam) == list(b1) == names
            for task in names:
                assert torch.allclose(pam[task], reference[task], atol=1e-4), (backend, task)
                assert torch.allclose(b1[task], singles[task], atol=1e-4), (backend, task)


def test_every_combination_backend_and_batch_is_measured(networks):
    nets, tasks, x = networks
    for clock in ("cpu", "wall"):
        latency = measure_latency(nets, tasks, x, batches=BATCHES, repeats=2, warmup=1, clock=clock, progress=False)
        assert list(latency) == tasks.combinations()
        for combo, methods in latency.items():
            assert set(methods) == {"baseline1", "pam"}
            for backends in methods.values():
                assert set(backends) == {"torch", "onnxruntime"}
                for seconds in backends.values():
                    assert set(seconds) == set(BATCHES) and all(s > 0 for s in seconds.values())


def test_a_module_that_disagrees_with_its_network_is_not_timed(networks, monkeypatch):
    nets, tasks, x = networks

    def wrong_emit(network, combo):  # an emitter bug: every weight of the emitted module off by 0.1
        module = pamfx.emit(network, combo)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.1)
        return module

    monkeypatch.setattr("pamfx.latency.emit", wrong_emit)
    with pytest.raises(IRError, match="differs from its network"):
        measure_latency(nets, tasks, x, backends=["torch"], repeats=1, progress=False)


def test_bad_input_is_named(networks):
    nets, tasks, x = networks
    with pytest.raises(InputError, match="backends"):
        measure_latency(nets, tasks, x, backends=["tensorrt"], progress=False)
    with pytest.raises(InputError, match="one network per task"):
        measure_latency({"baseline1": {"A": nets["baseline1"]["A"]}}, tasks, x, progress=False)
    with pytest.raises(InputError, match="batches"):
        measure_latency(nets, tasks, x, batches=[0], progress=False)
    with pytest.raises(InputError, match="clock"):
        measure_latency(nets, tasks, x, clock="sundial", progress=False)
    for bad in (dict(latency_backends=["cuda"]), dict(latency_batches=[]), dict(latency_repeats=0),
                dict(latency_clock="sundial")):
        with pytest.raises(InputError, match="latency"):
            ExperimentConfig.from_mapping(bad)


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    from test_experiment import TINY

    config = ExperimentConfig.from_mapping(dict(TINY, latency=True, latency_batches=[1, 2], latency_repeats=2,
                                                cache=str(tmp_path_factory.mktemp("cache"))))
    runs = run_comparison(config, progress=False, log=lambda *_: None)
    return runs, results_dict(config, runs)


def test_results_carry_latency_per_combination_method_backend_and_batch(tiny_results):
    runs, results = tiny_results
    for run, saved in zip(runs, results["seeds"]):
        for combo in saved["combinations"]:
            measured = run.latency[run.tasks.select(combo["tasks"])]
            assert combo["latency"] == {m: {b: {str(n): s for n, s in t.items()} for b, t in by.items()}
                                        for m, by in measured.items()}
            for backend in ("torch", "onnxruntime"):
                for batch in ("1", "2"):
                    assert combo["latency_gain"]["baseline1"][backend][batch] == pytest.approx(
                        combo["latency"]["baseline1"][backend][batch] / combo["latency"]["pam"][backend][batch])
        gains = [c["latency_gain"]["baseline1"]["torch"]["2"] for c in saved["combinations"]]
        assert saved["latency_gain"]["baseline1"]["torch"]["2"] == {"average": pytest.approx(statistics.fmean(gains)),
                                                                    "peak": max(gains)}
    for i, combo in enumerate(results["summary"]["combinations"]):
        per_seed = [s["combinations"][i]["latency"]["pam"]["onnxruntime"]["1"] for s in results["seeds"]]
        assert combo["latency"]["pam"]["onnxruntime"]["1"] == {"mean": pytest.approx(statistics.fmean(per_seed)),
                                                              "std": pytest.approx(statistics.stdev(per_seed))}
    assert set(results["summary"]["latency_gain"]["baseline1"]) == {"torch", "onnxruntime"}


def test_report_renders_latency(tiny_results, tmp_path):
    runs, results = tiny_results
    table = format_table(results)
    assert "time pam/baseline1 b2" in table and "time pam/baseline1 b1" in table
    assert "PAM latency gain over baseline1, onnxruntime: batch 2 average" in table
    paths = write_report(results, tmp_path)
    saved = json.loads(paths["json"].read_text())
    assert saved["seeds"][0]["combinations"][0]["latency"] == results["seeds"][0]["combinations"][0]["latency"]
    assert paths["latency_plot"].read_bytes()[:4] == b"\x89PNG"
    header = paths["csv"].read_text().splitlines()[0].split(",")
    assert {"latency_ms_torch_batch2", "latency_ms_onnxruntime_batch1"} <= set(header)


def test_latency_can_be_left_out(tiny_results, tmp_path):
    runs, results = tiny_results
    config = ExperimentConfig.from_mapping(dict(results["config"], latency=False))
    results = results_dict(config, [dataclasses.replace(run, latency={}) for run in runs])
    assert "latency" not in results["seeds"][0]["combinations"][0] and "latency_gain" not in results["summary"]
    assert "time pam" not in format_table(results)
    assert "latency_plot" not in write_report(results, tmp_path)


def test_pam_alone_is_timed_without_gains(networks, tmp_path):
    from test_experiment import TINY

    config = ExperimentConfig.from_mapping(dict(TINY, seeds=[0], methods=["pam"], latency=True, latency_repeats=1,
                                                cache=str(tmp_path)))
    runs = run_comparison(config, progress=False, log=lambda *_: None)
    results = results_dict(config, runs)
    assert set(results["seeds"][0]["combinations"][0]["latency"]) == {"pam"}
    assert results["summary"]["latency_gain"] == {}
    assert "latency_plot" not in write_report(results, tmp_path / "out")
