"""The demo's pipeline end to end at a reduced size, its outputs, and the command line."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pamfx

from pamfx.cli import load_config, main
from pamfx.errors import InputError
from pamfx.experiment import (ExperimentConfig, StartPoint, _seed_dict, best_run, choose_alpha, choose_pruned,
                              results_dict, run_comparison)
from pamfx.ir.task_set import TaskSpace
from pamfx.passes.prune import Checkpoint, Trajectory
from pamfx.report import format_table, write_report

TINY = dict(dataset="tiled-digits", n_train=240, n_calib=120, n_test=120, epochs=1, finetune_epochs=1,
            prune_rounds=2, prune_finetune_steps=2, prune_step=0.2, importance_batches=2, tolerance=0.05,
            search_tolerance=0.1, seeds=[0, 1], vib_epochs=2, latency=False)  # tests/test_latency.py times


@pytest.fixture(scope="module", params=["taylor", "vib"])
def tiny_results(request, tmp_path_factory):
    config = ExperimentConfig.from_mapping(dict(TINY, pruner=request.param, cache=str(tmp_path_factory.mktemp("cache"))))
    runs = run_comparison(config, progress=False, log=lambda *_: None)
    return runs, results_dict(config, runs)


def test_results_hold_every_seed_combination_and_the_gains(tiny_results):
    runs, results = tiny_results
    assert [r["seed"] for r in results["seeds"]] == [0, 1]
    for run in results["seeds"]:
        assert [c["tasks"] for c in run["combinations"]] == [["digits_0_4"], ["digits_5_9"], ["digits_0_4", "digits_5_9"]]
        for combo in run["combinations"]:
            assert set(combo["flops"]) == {"baseline1", "pam"}
            assert all(v > 0 for v in combo["flops"].values())
            assert set(combo["accuracy"]["pam"]) == set(combo["tasks"])
        b1 = [c["flops"]["baseline1"] for c in run["combinations"]]
        assert b1[2] == b1[0] + b1[1]
        ratios = [c["flops"]["baseline1"] / c["flops"]["pam"] for c in run["combinations"]]
        assert run["gain"]["baseline1"]["average"] == pytest.approx(sum(ratios) / 3)
        assert run["gain"]["baseline1"]["peak"] == pytest.approx(max(ratios))
        assert set(run["sharing_ratio"]) == {"merged", "pruned"}
    for run, record in zip(runs, results["seeds"]):  # PAM kept the cheaper of its two pruned groupings
        grouping = record["grouping"]
        assert grouping["chosen"] in ("regrouped", "unshared") and set(grouping["expected_flops"]) == {"regrouped", "unshared"}
        kept = run.methods["pam"].trajectories["pam"].select(results["config"]["tolerance"])
        assert kept.expected_flops == grouping["expected_flops"][grouping["chosen"]]
        if grouping["chosen"] == "unshared":
            assert all(r == 0 for stage in record["sharing_ratio"].values() for r in stage.values())
    averages = [r["gain"]["baseline1"]["average"] for r in results["seeds"]]
    summary = results["summary"]["gain"]["baseline1"]["average"]
    assert summary["mean"] == pytest.approx(sum(averages) / 2)
    assert summary["std"] == pytest.approx(abs(averages[0] - averages[1]) / 2 ** 0.5)
    table = format_table(results)
    assert "digits_0_4&digits_5_9" in table and "±" in table and "2 seeds" in table
    assert "PAM's grouping, chosen per seed" in table
    for run, record in zip(runs, results["seeds"]):  # baseline 1 kept the best of as many runs as PAM made
        tolerance = results["config"]["tolerance"]
        assert {n: len(r) for n, r in record["pruning_runs"]["pam"].items()} == {"regrouped": 1, "unshared": 1}
        for task, b1 in record["pruning_runs"]["baseline1"].items():
            assert len(b1) == 2 and sum(r["kept"] for r in b1) == 1
            kept = next(r for r in b1 if r["kept"])
            assert kept["expected_flops"] == run.methods["baseline1"].trajectories[task].select(tolerance).expected_flops
            if kept["matched"]:
                assert kept["expected_flops"] == min(r["expected_flops"] for r in b1 if r["matched"])
    assert "baseline1 the best of 2 per network" in table


def test_the_selected_network_is_the_cheapest_matched_checkpoint(tiny_results):
    runs, results = tiny_results
    tolerance = results["config"]["tolerance"]
    for run in runs:
        pam = run.methods["pam"]
        trajectory = pam.trajectories["pam"]
        chosen = trajectory.select(tolerance)
        assert pam.flops == chosen.flops
        matched = [p for p in trajectory.accepted() if trajectory.within(p, tolerance)]
        assert pam.matched == bool(matched)
        if matched:
            assert chosen.expected_flops == min(p.expected_flops for p in matched)
        frontier = results["seeds"][runs.index(run)]["frontier"]
        for name, curves in frontier["flops"].items():  # allowing more accuracy loss never costs more
            for curve in curves.values():
                assert all(a >= b for a, b in zip(curve, curve[1:]))


def test_report_files_are_written(tiny_results, tmp_path):
    runs, results = tiny_results
    paths = write_report(results, tmp_path, runs[0].regrouping)
    assert json.loads(paths["json"].read_text())["summary"] == json.loads(json.dumps(results["summary"]))
    assert paths["csv"].read_text().startswith("seed,tasks,method,flops,params,mean_accuracy")
    for kind in ("flops_plot", "frontier_plot", "sharing_plot", "alpha_trace_plot"):
        assert paths[kind].read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml")),
                         ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_names_its_seeds(path):
    config = load_config(path)
    assert len(config.seeds) >= 3 and config.dataset in ("tiled-mnist", "tiled-digits")


def test_config_files(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('model = "vgg"\ntasks = 5\nalpha = 0.1\n')
    config = load_config(toml)
    assert (config.model, config.tasks, config.alpha) == ("vgg", 5, 0.1)
    yaml = tmp_path / "c.yaml"
    yaml.write_text("dataset: tiled-mnist\ntolerance: 0.01\n")
    assert load_config(yaml).dataset == "tiled-mnist"
    bad = tmp_path / "bad.toml"
    bad.write_text("alhpa = 0.1\n")
    with pytest.raises(InputError, match="alhpa"):
        load_config(bad)
    for bad in (-1, [], [0.1, -0.2], [0.1, 0.1], "0.1"):
        with pytest.raises(InputError, match="alpha"):
            ExperimentConfig.from_mapping({"alpha": bad})
    assert ExperimentConfig.from_mapping({"alpha": [0.05, 0.3]}).alphas == [0.05, 0.3]
    with pytest.raises(InputError, match="seeds"):
        ExperimentConfig.from_mapping({"seeds": []})
    with pytest.raises(InputError, match="pruner"):
        ExperimentConfig.from_mapping({"pruner": "magnitude"})
    with pytest.raises(InputError, match="search_tolerance"):
        ExperimentConfig.from_mapping({"tolerance": 0.02, "search_tolerance": 0.01})
    with pytest.raises(InputError, match="finetune_schedule"):
        ExperimentConfig.from_mapping({"finetune_schedule": "step"})
    for bad in (-0.5, "1"):
        with pytest.raises(InputError, match="balance_spare"):
            ExperimentConfig.from_mapping({"balance_spare": bad})
    for key in ("compare_unshared", "component_selection", "component_rounds", "equal_tries"):
        with pytest.raises(InputError, match=key):
            ExperimentConfig.from_mapping({key: "yes"})
    for bad in (0, 1.5, True):
        with pytest.raises(InputError, match="prune_restarts"):
            ExperimentConfig.from_mapping({"prune_restarts": bad})
    for bad in (-1, 2.5, False):
        with pytest.raises(InputError, match="prune_rescue_steps"):
            ExperimentConfig.from_mapping({"prune_rescue_steps": bad})


@pytest.mark.parametrize("restarts", [1, 3])
@pytest.mark.parametrize("unshared", [True, False])
@pytest.mark.parametrize("equal", [True, False])
def test_every_method_keeps_the_best_of_as_many_pruning_runs_as_pam(restarts, unshared, equal):
    config = ExperimentConfig.from_mapping({"prune_restarts": restarts, "compare_unshared": unshared, "equal_tries": equal})
    pam = restarts * (2 if unshared else 1)  # PAM's runs in all: every candidate pruned `restarts` times
    assert config.pruning_runs("pam") == restarts
    for method in ("baseline1", "mtz"):
        assert config.pruning_runs(method) == (pam if equal else restarts)


def test_best_run_keeps_the_cheapest_matched_run_of_every_candidate_and_records_each():
    """Known trajectories per (candidate, restart): the kept run is `choose_pruned`'s over all runs,
    and every run is recorded under its candidate's name, in order."""
    points = {("R", 0): (5e3, 0.9, 0.9), ("R", 1): (2e3, 0.9, 0.8), ("U", 0): (4e3, 0.9, 0.9), ("U", 1): (3e3, 0.9, 0.9)}
    named = [(name, _trajectory([points[key, r]])) for name, key in (("regrouped", "R"), ("unshared", "U"))
             for r in range(2)]
    name, trajectory, runs = best_run(named, 0.01)
    assert name == "unshared" and trajectory is named[3][1]  # 2e3 misses the tolerance
    assert [(r.expected_flops, r.matched, r.kept) for r in runs["regrouped"]] == [(5e3, True, False), (2e3, False, False)]
    assert [(r.expected_flops, r.matched, r.kept) for r in runs["unshared"]] == [(4e3, True, False), (3e3, True, True)]


def test_pruning_runs_in_worker_processes_give_exactly_the_results_of_one_process(tiny_results):
    """Every pruning run draws its own data order (`_Pruner`), so running a seed's runs on two
    worker processes (`run_jobs`) changes nothing but the time: every trajectory, selection and
    selected network is the one the fixture computed in this process. P2 checks both methods
    (baseline 1's second runs included); P1 checks PAM's runs, whose jobs carry the VIB pruner, run
    without baseline 1: so a method also does not depend on the methods run before it."""
    runs, results = tiny_results
    pruner = results["config"]["pruner"]
    methods = ["baseline1", "pam"] if pruner == "taylor" else ["pam"]
    config = ExperimentConfig.from_mapping(dict(TINY, pruner=pruner, seeds=[0], methods=methods,
                                                cache=results["config"]["cache"]))
    parallel = run_comparison(config, progress=False, log=lambda *_: None, workers=2)[0]
    alone = dataclasses.replace(runs[0], methods={m: runs[0].methods[m] for m in methods})

    def comparable(run):
        return {k: v for k, v in _seed_dict(run, config.search_tolerance).items() if k != "seconds"}

    assert comparable(parallel) == comparable(alone)
    for method, result in alone.methods.items():
        ours = result.network if isinstance(result.network, dict) else {method: result.network}
        theirs = (parallel.methods[method].network if isinstance(result.network, dict)
                  else {method: parallel.methods[method].network})
        for name, network in ours.items():
            a, b = network.state_dict(), theirs[name].state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            assert pamfx.read_multitask(network).grouping() == pamfx.read_multitask(theirs[name]).grouping()


def test_cli_help_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "pamfx demo" in capsys.readouterr().out
    assert main(["run", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_any_set_of_methods_compares_mtz_as_baseline_2(tmp_path):
    config = ExperimentConfig.from_mapping(dict(TINY, seeds=[0], methods=["mtz", "pam"], mtz_samples=64,
                                                mtz_finetune_steps=2, cache=str(tmp_path)))
    runs = run_comparison(config, progress=False, log=lambda *_: None)
    results = results_dict(config, runs)
    assert set(results["summary"]["gain"]) == {"mtz"}
    combos = results["seeds"][0]["combinations"]
    assert all(set(c["flops"]) == {"mtz", "pam"} for c in combos)
    ratios = [c["flops"]["mtz"] / c["flops"]["pam"] for c in combos]
    assert results["seeds"][0]["gain"]["mtz"]["average"] == pytest.approx(sum(ratios) / 3)
    mtz = runs[0].methods["mtz"].network
    shared = pamfx.read_multitask(mtz).grouping()
    assert all(ratio > 0 for ratio in (shared.sharing_ratio(n) for n in shared.layer_names))
    assert "pam/mtz" in format_table(results)
    with pytest.raises(InputError, match="methods"):
        ExperimentConfig.from_mapping({"methods": ["baseline1", "mtz"]})


def test_a_config_may_name_its_tasks_labels():
    config = ExperimentConfig.from_mapping({"labels": {"low": [0, 1, 2], "high": [2, 3]}})
    assert config.labels == {"low": [0, 1, 2], "high": [2, 3]}
    for bad in ({"only": [0]}, {"a&b": [0], "c": [1]}, {"a": [], "b": [1]}):
        with pytest.raises(InputError, match="labels"):
            ExperimentConfig.from_mapping({"labels": bad})


def test_the_table_flags_every_seed_whose_test_accuracies_differ_beyond_the_tolerance(tiny_results):
    import copy

    _, results = tiny_results
    results = copy.deepcopy(results)
    tolerance = results["config"]["tolerance"]
    for run in results["seeds"]:  # make the methods agree exactly, then push seed 1's PAM off on one task
        for combo in run["combinations"]:
            combo["accuracy"]["pam"] = dict(combo["accuracy"]["baseline1"])
    assert "not at matched accuracy" not in format_table(results)
    single = next(c for c in results["seeds"][1]["combinations"] if c["tasks"] == ["digits_5_9"])
    single["accuracy"]["pam"]["digits_5_9"] -= 2 * tolerance
    lines = [line for line in format_table(results).splitlines() if "not at matched accuracy" in line]
    assert len(lines) == 1 and "digits_5_9" in lines[0] and "seed 1" in lines[0] and "seed 0" not in lines[0]


def test_the_table_flags_a_method_whose_unpruned_network_starts_below_the_tolerance(tiny_results):
    import copy

    _, results = tiny_results
    results = copy.deepcopy(results)
    tolerance = results["config"]["tolerance"]
    for run in results["seeds"]:  # every unpruned network exactly at its reference
        for trajectories in run["trajectories"].values():
            for trajectory in trajectories.values():
                for task in trajectory[0]["calib_accuracy"]:
                    trajectory[0]["calib_accuracy"][task] = run["calib_reference_accuracy"][task]
    assert "before any pruning" not in format_table(results)
    seed = results["seeds"][-1]
    start = seed["trajectories"]["pam"]["pam"][0]["calib_accuracy"]
    start["digits_5_9"] -= 2 * tolerance
    lines = [line for line in format_table(results).splitlines() if "before any pruning" in line]
    assert len(lines) == 1 and lines[0].startswith("note: pam:")
    assert f"seed {seed['seed']}: digits_5_9 {-200 * tolerance:+.2f}" in lines[0] and "digits_0_4" not in lines[0]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(1e3, 1e7), st.floats(-0.05, 0.05), st.floats(-0.05, 0.05)), min_size=1, max_size=6),
       st.floats(0, 0.03))
def test_alpha_is_the_cheapest_matchable_start_else_the_least_deficient(starts, tolerance):
    points = [StartPoint(alpha=i / 10, expected_flops=f, sharing={}, gap={"A": a, "B": b}, network=None)
              for i, (f, a, b) in enumerate(starts)]
    chosen = choose_alpha(points, tolerance)
    matchable = [p for p in points if min(p.gap.values()) >= -tolerance]
    if matchable:
        assert chosen in matchable and all(chosen.expected_flops <= p.expected_flops for p in matchable)
    else:
        assert all(min(chosen.gap.values()) >= min(p.gap.values()) for p in points)


def _trajectory(points: list[tuple[float, float, float]]) -> Trajectory:
    """Accepted checkpoints (expected FLOPs, accuracy of A, of B) against references of 0.9."""
    trajectory = Trajectory(TaskSpace(("A", "B")), {"A": 0.9, "B": 0.9}, {})
    trajectory.checkpoints = [Checkpoint(i, {}, f, {"A": a, "B": b}, True) for i, (f, a, b) in enumerate(points)]
    return trajectory


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(st.floats(1e3, 1e7), st.floats(0.85, 0.95), st.floats(0.85, 0.95)), min_size=1,
                         max_size=5), min_size=1, max_size=3),
       st.floats(0, 0.03))
def test_the_kept_run_is_the_cheapest_matched_selection_else_the_least_deficient(candidates, tolerance):
    trajectories = [_trajectory(points) for points in candidates]
    pick = choose_pruned(trajectories, tolerance)
    selected = [t.select(tolerance) for t in trajectories]
    matched = [i for i, t in enumerate(trajectories) if t.within(selected[i], tolerance)]
    if matched:
        assert pick in matched and all(selected[pick].expected_flops <= selected[i].expected_flops for i in matched)
    else:
        deficits = [p.deficit(t.reference) for p, t in zip(selected, trajectories)]
        assert deficits[pick] == min(deficits)


def test_pam_chooses_alpha_per_seed_on_calibration_and_one_alpha_is_the_scalar_run(tmp_path):
    base = dict(TINY, seeds=[0], methods=["pam"], cache=str(tmp_path))
    runs = run_comparison(ExperimentConfig.from_mapping(dict(base, alpha=[0.05, 0.3])), progress=False, log=lambda *_: None)
    run = runs[0]
    assert [p.alpha for p in run.start] == [0.05, 0.3]
    chosen = choose_alpha(run.start, TINY["tolerance"])
    assert run.regrouping.alpha == chosen.alpha and run.regrouping.alphas == tuple(a for a in (0.05, 0.3) if a != chosen.alpha)
    assert run.methods["pam"].trajectories["pam"].checkpoints[0].network is not None
    results = results_dict(ExperimentConfig.from_mapping(dict(base, alpha=[0.05, 0.3])), runs)
    assert results["seeds"][0]["alpha"] == chosen.alpha and len(results["seeds"][0]["alpha_start"]) == 2
    assert f"seed 0: {chosen.alpha:g}" in format_table(results)
    scalar = run_comparison(ExperimentConfig.from_mapping(dict(base, alpha=chosen.alpha)), progress=False, log=lambda *_: None)
    assert scalar[0].methods["pam"].flops == run.methods["pam"].flops
    assert scalar[0].methods["pam"].test_accuracy == run.methods["pam"].test_accuracy


def test_run_0_of_every_network_is_the_run_made_without_equal_tries(tiny_results):
    """docs/pruning.md, "Pruning runs": run 0 draws the seed's own data order, so with one run per
    network (``equal_tries = false``) baseline 1 computes exactly its run 0 of the default."""
    runs, results = tiny_results
    config = ExperimentConfig.from_mapping(dict(results["config"], seeds=[0], equal_tries=False))
    once = run_comparison(config, progress=False, log=lambda *_: None)[0]
    b1 = once.methods["baseline1"]
    assert {t: len(r) for t, r in b1.runs.items()} == {t: 1 for t in b1.runs}
    first = {t: r[0]["expected_flops"] for t, r in results["seeds"][0]["pruning_runs"]["baseline1"].items()}
    assert {t: r[0].expected_flops for t, r in b1.runs.items()} == first
    assert once.methods["pam"].flops == runs[0].methods["pam"].flops
