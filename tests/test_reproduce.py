"""`pamfx reproduce` end to end on a tiny plan, and the label splits of the ablations."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pamfx.cli import main
from pamfx.data import inclusion_split, load_dataset, overlap_split
from pamfx.errors import InputError
from pamfx.experiment import SAVED_BEFORE_KEY, ExperimentConfig, run_seed
from pamfx.reproduce import (FULL, PAPER_TABLE_4_2, QUICK, ReproductionPlan, _gains_over, _spread, label_relatedness,
                             reproduce, run_into, saved_results, saved_seed)

TINY_RUN = dict(dataset="tiled-digits", n_train=160, n_calib=120, n_test=80, epochs=1, finetune_epochs=1,
                prune_rounds=1, prune_finetune_steps=2, prune_step=0.3, importance_batches=1, tolerance=0.05,
                search_tolerance=0.1, vib_epochs=1, mtz_samples=40, mtz_finetune_steps=2, recover_candidates=0,
                regroup_samples=60, methods=["baseline1", "mtz", "pam"], width=0.5, latency=False)
TINY = ReproductionPlan(
    name="tiny", seeds=[0, 1], common=TINY_RUN,
    tables={"4.2-P1": dict(model="lenet5", tasks=2), "4.2-P2": dict(model="lenet5", tasks=2),
            "4.4-P2": dict(model="lenet5", tasks=5, regroup_variant="simplified", width=0.25),
            "4.5-P2": dict(model="resnet", tasks=2, width=0.25)},
    ablation=dict(model="lenet5", tasks=2, pruner="taylor", methods=["baseline1", "pam"], compare_unshared=False),
    alphas=[0.05, 0.5], overlaps=[0, 5], task_size=5, inclusion=(10, 5),
)
SECTIONS = ["Table 4.2 analogue", "Table 4.4 analogue", "Table 4.5 analogue", "Fig. 4.5 analogue", "Fig. 4.6 analogue",
            "Fig. 4.7 analogue", "Sec. 4.6.3.1 analogue", "Sec. 4.6.3.2 analogue", "Sec. 4.6.3.3 analogue"]


@pytest.fixture(scope="module")
def reproduction(tmp_path_factory, monkeypatch_module):
    out = tmp_path_factory.mktemp("reproduction")
    monkeypatch_module.setenv("PAMFX_CACHE", str(tmp_path_factory.mktemp("cache")))
    lines: list[str] = []
    path = reproduce(out, TINY, progress=False, log=lines.append)
    return out, path, lines


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.mark.slow
def test_the_document_has_every_section_the_paper_columns_and_its_plots(reproduction):
    out, path, _ = reproduction
    text = path.read_text()
    positions = [text.index(f"## {section}") for section in SECTIONS]
    assert positions == sorted(positions)
    assert text.count("paper MFLOPs B1 / B2 / PAM") == 3  # Table 4.2 P1 and P2, Table 4.4 P2
    for pruner in ("P1", "P2"):
        for (acc, flops) in PAPER_TABLE_4_2[pruner].values():
            assert " / ".join(f"{v:.2f}" for v in flops) in text
    assert "1.51–1.69" in text and "1.07–1.64" in text  # the paper's gain ranges beside ours
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert len(images) == 5
    for image in images:
        assert (out / image).read_bytes()[:4] == b"\x89PNG"
    for name in list(TINY.tables) + ["alpha-0.05", "alpha-0.5", "overlap-0", "overlap-5", "inclusion"]:
        assert f"| {name} |" in text  # its wall time
    assert not [p for p in out.rglob(".*")]  # no temp files left


@pytest.mark.slow
def test_the_numbers_are_those_of_the_runs(reproduction):
    out, path, _ = reproduction
    text = path.read_text()
    for setting in TINY.tables:
        results = json.loads((out / setting / "results.json").read_text())
        assert results["config"]["seeds"] == TINY.seeds
        gain = results["summary"]["gain"]["mtz"]["average"]
        assert f"{gain['mean']:.2f} ± {gain['std']:.2f}" in text
        # the gain helper of the α sweep agrees with the comparison's own
        ours = _gains_over(results, results)
        for kind in ("average", "peak"):
            assert ours[kind]["mean"] == pytest.approx(results["summary"]["gain"]["baseline1"][kind]["mean"])
    # the α sweep prunes the networks of 4.2-P2 again, so it reuses that run's baseline 1
    sweep = json.loads((out / "alpha-0.05" / "results.json").read_text())
    assert sweep["config"]["methods"] == ["pam"] and sweep["config"]["alpha"] == 0.05
    inclusion = json.loads((out / "inclusion" / "results.json").read_text())
    assert inclusion["config"]["labels"] == inclusion_split(10, 5)
    assert inclusion["tasks"] == list(inclusion_split(10, 5))


def _saved_without(out, folder, key):
    """A copy of ``out``'s 4.2-P2 run in ``folder`` whose record lacks config ``key`` (as written
    before the key existed); returns the removed value and the record."""
    shutil.copytree(out / "4.2-P2", folder)
    target = folder / "results.json"
    record = json.loads(target.read_text())
    value = record["config"].pop(key)
    target.write_text(json.dumps(record))
    return value, record


def test_a_run_saved_before_a_config_key_existed_is_read_back(reproduction, tmp_path):
    """A key added to the configuration later (here ``cross_origin``) takes its default in older
    records, so they still count for configurations that leave it at the default, and only those."""
    out, _, _ = reproduction
    config = TINY.table_config("4.2-P2")
    _, record = _saved_without(out, tmp_path / "4.2-P2", "cross_origin")
    assert saved_results(tmp_path / "4.2-P2", config) == record
    assert saved_results(tmp_path / "4.2-P2", dataclasses.replace(config, cross_origin="absent")) is None


@pytest.mark.parametrize("key", sorted(SAVED_BEFORE_KEY))
def test_a_run_saved_before_a_default_changed_counts_for_the_old_behaviour_only(reproduction, tmp_path, key):
    """Each `SAVED_BEFORE_KEY` key changed what a run computes (``balance_spare``: the balance was
    unbounded; ``compare_unshared``: PAM pruned the regrouped network only; ``component_selection``:
    independent components selected together; ``equal_tries``: baseline 1 pruned each network once);
    a record without the key
    counts for its old value and not for the new default."""
    out, _, _ = reproduction
    config = TINY.table_config("4.2-P2")
    value, record = _saved_without(out, tmp_path / "4.2-P2", key)
    assert value == getattr(ExperimentConfig(), key)
    assert saved_results(tmp_path / "4.2-P2", config) is None
    old = dataclasses.replace(config, **{key: SAVED_BEFORE_KEY[key]})
    assert saved_results(tmp_path / "4.2-P2", old) == record


@pytest.mark.slow
def test_a_second_call_reads_every_run_back(reproduction):
    out, path, _ = reproduction
    before = {p: p.read_text() for p in out.glob("*/results.json")}
    lines: list[str] = []
    reproduce(out, TINY, progress=False, log=lines.append)
    assert len([line for line in lines if "read back" in line]) == len(before)
    assert {p: p.read_text() for p in out.glob("*/results.json")} == before


TIMINGS = ("wall_seconds", "seconds", "latency", "latency_gain", "latency_protocol")


def _timeless(results):
    """``results`` without its timings (wall times, per-method seconds, latency), which differ from run to run."""
    if isinstance(results, dict):
        return {k: _timeless(v) for k, v in results.items() if k not in TIMINGS}
    return [_timeless(v) for v in results] if isinstance(results, list) else results


@pytest.mark.slow
def test_parallel_jobs_write_the_same_document(reproduction, tmp_path, capfd):
    out, path, _ = reproduction
    again = tmp_path / "again"
    shutil.copytree(out, again)
    rerun = ["4.2-P2", "overlap-0"]
    for name in rerun:
        shutil.rmtree(again / name)
    before = {p.relative_to(again): p.read_text() for p in again.glob("*/results.json")}
    lines: list[str] = []
    document = reproduce(again, TINY, progress=False, log=lines.append, jobs=2).read_text()
    assert sorted(line for line in lines if line.endswith(": done")) == sorted(f"{name}: done" for name in rerun)
    assert sum("read back" in line for line in lines) == len(before)
    workers = capfd.readouterr().out
    assert all(f"{name}: [seed {seed}]" in workers for name in rerun for seed in TINY.seeds)  # each seed in a worker
    assert {p: (again / p).read_text() for p in before} == before
    for name in rerun:
        assert _timeless(json.loads((again / name / "results.json").read_text())) == \
            _timeless(json.loads((out / name / "results.json").read_text()))
        assert sorted(p.name for p in (again / name / "seeds").iterdir()) == [f"seed-{s}.json" for s in TINY.seeds]
    assert document.split("## Table 4.2 analogue")[1] == path.read_text().split("## Table 4.2 analogue")[1]
    for bad in (dict(jobs=0), dict(workers=0)):
        with pytest.raises(InputError, match="jobs and workers must be >= 1"):
            reproduce(out, TINY, **bad)


@pytest.mark.slow
def test_a_run_cut_off_midway_keeps_its_finished_seeds(reproduction, tmp_path, monkeypatch):
    out, _, _ = reproduction
    config = TINY.table_config("4.2-P2")
    folder = tmp_path / "4.2-P2"
    calls: list[int] = []

    def cut_off_at_the_last_seed(config, seed, progress, log, workers):
        calls.append(seed)
        if seed == config.seeds[-1]:
            raise RuntimeError("the machine stopped")
        return run_seed(config, seed, progress, log, workers=workers)

    monkeypatch.setattr("pamfx.reproduce.run_seed", cut_off_at_the_last_seed)
    with pytest.raises(RuntimeError, match="the machine stopped"):
        run_into(folder, config, progress=False, log=lambda line: None)
    assert calls == [0, 1] and not (folder / "results.json").exists()
    assert (folder / "alpha_trace.png").exists() and saved_seed(folder, config, 0) is not None

    calls.clear()
    passed: list[int] = []

    def record_workers(c, s, p, log, workers):  # the workers run_into passes on; this process runs the seed
        calls.append(s)
        passed.append(workers)
        return run_seed(c, s, p, log)

    monkeypatch.setattr("pamfx.reproduce.run_seed", record_workers)
    lines: list[str] = []
    results = run_into(folder, config, progress=False, log=lines.append, workers=3)
    assert calls == [1] and passed == [3] and lines[0] == f"seed 0: read back from {folder / 'seeds' / 'seed-0.json'}"
    assert _timeless(results) == _timeless(json.loads((out / "4.2-P2" / "results.json").read_text()))
    assert results["wall_seconds"] == pytest.approx(sum(saved_seed(folder, config, s)["wall_seconds"] for s in (0, 1)))

    assert saved_seed(folder, dataclasses.replace(config, tolerance=0.06), 0) is None  # another configuration
    calls.clear()
    more = run_into(folder, dataclasses.replace(config, seeds=[0, 1, 2]), progress=False, log=lambda line: None)
    assert calls == [2] and more["seeds"][:2] == results["seeds"]  # a run with more seeds reuses the saved ones


@pytest.mark.slow
def test_a_partial_reproduction_reports_what_has_run(reproduction, tmp_path):
    out, path, _ = reproduction
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    gone = ["4.2-P2", "overlap-0", "overlap-5", "inclusion"]
    for name in gone[1:]:
        shutil.rmtree(partial / name)
    (partial / "4.2-P2" / "results.json").unlink()  # cut off after its seeds: they stay
    before = {p: p.read_text() for p in partial.glob("*/results.json")}
    lines: list[str] = []
    document = reproduce(partial, TINY, progress=False, log=lines.append, report_only=True).read_text()
    assert lines == [] and {p: p.read_text() for p in partial.glob("*/results.json")} == before  # nothing ran
    assert not (partial / "4.2-P2" / "results.json").exists()
    total = len(list(out.glob("*/results.json")))
    assert f"Partial: {len(gone)} of {total} runs have not finished** (4.2-P2 (seeds 0, 1 saved), overlap-0," in document
    assert all(f"## {s}" in document for s in SECTIONS)
    assert "Not run yet: overlap-0, overlap-5." in document and "Not run yet: inclusion." in document
    table_4_2 = document.split("## Table 4.2 analogue")[1].split("## Table 4.4 analogue")[0]
    assert "### P1 (vib)" in table_4_2 and "### P2" not in table_4_2  # 4.2-P2's rows are absent
    assert "comes from the 4.2-P2 run, which has not run yet" in document  # the sweep's baseline 1
    assert document.count("Not run yet") == 2
    empty = reproduce(tmp_path / "empty", TINY, report_only=True).read_text()
    assert empty.count("Not run yet") == len(SECTIONS)


def test_runs_sharing_networks_are_spread_apart():
    configs = {name: TINY.table_config(name) for name in TINY.tables}
    configs.update({f"alpha-{a}": TINY.ablation_config(alpha=a) for a in TINY.alphas})
    order = _spread(configs)
    assert sorted(order) == sorted(configs)
    # 4.2-P1, 4.2-P2 and the α sweep train the same LeNet-5s; the 5-task and ResNet runs come between
    assert order[:3] == ["4.2-P1", "4.4-P2", "4.5-P2"] and order[3] == "4.2-P2"


def test_relatedness_grows_with_the_overlap():
    bits = [label_relatedness("tiled-digits", 0, overlap_split(5, o), 600) for o in range(6)]
    assert all(a < b for a, b in zip(bits, bits[1:]))
    # identical tasks: I(Y; Y) = H(Y)
    labels = load_dataset("tiled-digits", seed=0, n_train=600, n_calib=1, n_test=1).train.labels[:, :5]
    _, counts = np.unique(labels.numpy(), axis=0, return_counts=True)
    p = counts / counts.sum()
    assert bits[-1] == pytest.approx(float(-(p * np.log2(p)).sum()))


@given(st.integers(1, 10), st.data())
def test_overlap_split_shares_exactly_the_overlap(task_size, data):
    overlap = data.draw(st.integers(max(0, 2 * task_size - 10), task_size))
    split = overlap_split(task_size, overlap)
    (a, la), (b, lb) = split.items()
    assert a != b
    assert len(la) == len(lb) == task_size
    assert len(set(la) & set(lb)) == overlap
    assert set(la) | set(lb) <= set(range(10))


@given(st.integers(2, 10), st.data())
def test_inclusion_split_makes_b_a_proper_subset_of_a(size_a, data):
    size_b = data.draw(st.integers(1, size_a - 1))
    (a, la), (b, lb) = inclusion_split(size_a, size_b).items()
    assert a != b and len(la) == size_a and len(lb) == size_b
    assert set(lb) < set(la)


@pytest.mark.parametrize("args", [(5, 6), (5, -1), (6, 1), (0, 0), (11, 0), (5.0, 1), (True, 0)])
def test_overlap_split_rejects_bad_sizes(args):
    with pytest.raises(InputError):
        overlap_split(*args)


@pytest.mark.parametrize("args", [(5, 5), (5, 6), (5, 0), (11, 5), (1, 0), (10, 2.5)])
def test_inclusion_split_rejects_bad_sizes(args):
    with pytest.raises(InputError):
        inclusion_split(*args)


@pytest.mark.parametrize("plan", [FULL, QUICK], ids=["full", "quick"])
def test_the_shipped_plans_are_valid(plan):
    plan.validate()
    configs = [plan.table_config(s) for s in plan.tables] + [plan.ablation_config()]
    assert all(c.seeds == plan.seeds for c in configs)
    assert {c.pruner for c in configs} == {"taylor", "vib"}
    assert {c.model for c in configs} >= {"lenet5", "vgg", "resnet"}
    assert all(len(overlap_split(plan.task_size, o)) == 2 for o in plan.overlaps)


def test_the_command_line_runs_the_chosen_plan(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr("pamfx.reproduce.reproduce", lambda out, plan, **kw: calls.append((out, plan, kw)) or out)
    assert main(["reproduce", "--quick", "--seeds", "3", "4", "--out", str(tmp_path), "--no-progress"]) == 0
    (out, plan, kw), = calls
    assert out == tmp_path and plan.name == "quick" and plan.seeds == [3, 4]
    assert kw["command"] == "pamfx reproduce --quick --seeds 3 4" and kw["progress"] is False
    assert main(["reproduce", "--seeds", "-1"]) == 2  # refused before any run
    bad = dataclasses.replace(TINY, tables={"4.3-P2": {}})
    with pytest.raises(InputError, match="unknown setting '4.3-P2'"):
        bad.validate()
    with pytest.raises(InputError, match="overlap"):
        dataclasses.replace(TINY, overlaps=[6]).validate()
