"""Regrouping (Alg. 4, Alg. 5) against planted truth and a plain reference greedy."""
from __future__ import annotations

import json
import math
from itertools import combinations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import fx, nn

from pamfx.analysis.activations import collect_activations
from pamfx.analysis.mutual_information import (
    MIEstimator,
    as_feature_tensor,
    estimate_mi,
    label_columns,
    normalise_features,
)
from pamfx.analysis.regroup import DEFAULT_ALPHA, RunningKernel, greedy_order, regroup, regroup_features
from pamfx.errors import InputError
from pamfx.ir import Consumer, Grouping, LayerMap, LayerStructure, NeuronLayer, TaskSpace

SIGMA2 = MIEstimator().sigma2


def planted_layer(tasks, per_type, n=240, attributes=2, strength=2.0, seed=0, labels=None):
    """A merged layer whose neurons each carry information about exactly one task set (or none).

    A neuron of type τ is noise plus, for every task t in τ, ±strength × one of t's binary
    attributes. Types are every subset of the tasks (the empty one = label-independent), shuffled.
    Returns features [N, C], labels per task, and the planted type (a tuple of task names) per neuron.
    """
    rng = np.random.default_rng(seed)
    labels = labels or {t: rng.integers(0, 2, (n, attributes)) for t in tasks}
    types = [c for k in range(len(tasks) + 1) for c in combinations(tasks, k) for _ in range(per_type)]
    types = [types[i] for i in rng.permutation(len(types))]
    columns = []
    for planted in types:
        value = rng.standard_normal(n)
        for t in planted:
            attribute = labels[t][:, rng.integers(labels[t].shape[1])]
            value = value + strength * rng.choice([-1.0, 1.0]) * (attribute - 0.5)
        columns.append(value)
    return np.stack(columns, axis=1), labels, types


def expected_set(space: TaskSpace, planted: tuple[str, ...], variant: str = "full") -> int:
    """The group Alg. 4 / Alg. 5 should put a planted neuron in: τ itself, else the shared group."""
    if not planted or len(planted) == space.k or (variant == "simplified" and len(planted) > 1):
        return space.all
    return space.to_set(planted)


def recovery(task_sets, types, space, variant="full") -> float:
    return float(np.mean([t == expected_set(space, planted, variant) for t, planted in zip(task_sets, types)]))


def reference_greedy(features, target, pool, alpha_bits):
    """The plain oracle: one candidate at a time, every set's MI recomputed from scratch."""
    selected, values, remaining = [], [], sorted(pool)
    while remaining:
        scores = [estimate_mi(features[:, selected + [j]], target) for j in remaining]
        best = int(np.argmin(scores))
        selected.append(remaining.pop(best))
        values.append(scores[best])
        if values[-1] > alpha_bits:
            break
    return selected, values


class ReferenceKernel:
    """`RunningKernel`'s interface with from-scratch scoring, to drive `greedy_order` with the oracle."""

    def __init__(self, features, target):
        self.features, self.target = features, target
        self.estimator, self.sigma2, self.per_neuron = MIEstimator(), SIGMA2, 1
        self.selected: list[int] = []

    @property
    def dims(self) -> int:
        return len(self.selected)

    def scores(self, candidates):
        return torch.tensor(
            [estimate_mi(self.features[:, self.selected + [j]], self.target, unit="nats") for j in candidates],
            dtype=torch.float64,
        )

    def add(self, j: int) -> None:
        self.selected.append(j)


def running_kernel(features, target, dtype=torch.float64):
    normalised = normalise_features(as_feature_tensor(features))
    return RunningKernel(normalised, label_columns(target), MIEstimator(), SIGMA2, dtype)


# ----------------------------------------------------------------------------------------------
# The fast path against the oracle


def test_fast_path_selects_the_reference_neurons_in_the_reference_order():
    features, labels, _ = planted_layer(("A", "B"), per_type=4, n=160, seed=1)
    for own, other in (("A", "B"), ("B", "A")):
        alpha = 0.05
        expected_order, expected_values = reference_greedy(features, labels[other], range(16), alpha)
        order, values = greedy_order(running_kernel(features, labels[other]), range(16), alpha * math.log(2), 1)
        assert order == expected_order
        np.testing.assert_allclose(np.array(values) / math.log(2), expected_values, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_sums_that_underflow_are_recomputed_in_log_space(dtype):
    """An outlier 11 standard deviations out: in float32 the squared kernel of its row underflows
    (e^−238 < 1e−38), so its chunk is rescored exactly in log space instead of yielding −inf; in
    float64 the fast sums stay in range and must agree as well."""
    features, labels, _ = planted_layer(("A", "B"), per_type=2, n=120, seed=14)
    features[7, 3] = 1e4
    kernel = running_kernel(features, labels["B"], dtype)
    for step in range(3):
        scores = kernel.scores(range(8)).numpy() / math.log(2)
        expected = [estimate_mi(features[:, list(range(step)) + [j]], labels["B"]) for j in range(8)]
        assert np.all(np.isfinite(scores))
        np.testing.assert_allclose(scores, expected, atol=1e-4 if dtype == torch.float32 else 1e-9)
        kernel.add(step)


def test_lazy_policy_gives_the_same_order_with_the_oracle_and_the_running_kernel():
    """The lazy re-scoring policy is independent of the scoring engine: same picks, same order."""
    features, labels, _ = planted_layer(("A", "B"), per_type=4, n=160, seed=2)
    target = labels["B"]
    oracle = greedy_order(ReferenceKernel(features, target), range(16), math.inf, refresh_every=5, lazy_batch=3)
    fast = greedy_order(running_kernel(features, target), range(16), math.inf, refresh_every=5, lazy_batch=3)
    assert fast[0] == oracle[0]
    np.testing.assert_allclose(fast[1], oracle[1], atol=1e-9)


def test_lazy_float32_default_agrees_with_the_exact_float64_greedy_on_planted_layers():
    """Lazy re-scoring and float32 may reorder near-ties inside the flat first phase of a greedy
    (where every candidate's increment is within noise of 0); on planted layers the groupings at
    α are identical and the traces agree to 0.01 bits."""
    space = TaskSpace(("A", "B", "C"))
    features, labels, _ = planted_layer(space.names, per_type=3, n=200, seed=3)
    exact = regroup_features(features, space, labels, refresh_every=1, dtype=torch.float64)
    default = regroup_features(features, space, labels)
    assert default.assign(DEFAULT_ALPHA)[0] == exact.assign(DEFAULT_ALPHA)[0]
    for fast, slow in zip(default.traces[:3], exact.traces[:3]):
        n = min(len(fast.mi), len(slow.mi))
        np.testing.assert_allclose(fast.mi[:n], slow.mi[:n], atol=0.01)


# ----------------------------------------------------------------------------------------------
# Planted truth


def test_two_tasks_planted_groups_are_recovered():
    space = TaskSpace(("A", "B"))
    features, labels, types = planted_layer(space.names, per_type=8, seed=4)
    layer = regroup_features(features, space, labels)
    task_sets, _ = layer.assign(DEFAULT_ALPHA)
    assert recovery(task_sets, types, space) >= 0.95
    sizes = {space.label(t): task_sets.count(t) for t in (1, 2, 3)}
    assert sizes["A"] >= 7 and sizes["B"] >= 7  # the 8 planted A-only and B-only neurons


def test_three_tasks_planted_groups_are_recovered_including_pairs():
    space = TaskSpace(("A", "B", "C"))
    features, labels, types = planted_layer(space.names, per_type=4, seed=5)
    task_sets, _ = regroup_features(features, space, labels).assign(DEFAULT_ALPHA)
    assert recovery(task_sets, types, space) >= 0.95
    pair = space.to_set(("A", "B"))
    assert sum(t == pair for t in task_sets) >= 3  # {A, B} ⊂ {A, B, C}: a group of its own


def test_simplified_variant_has_exclusive_groups_and_one_shared_group():
    space = TaskSpace(("A", "B", "C"))
    features, labels, types = planted_layer(space.names, per_type=4, seed=5)
    task_sets, traces = regroup_features(features, space, labels, variant="simplified").assign(DEFAULT_ALPHA)
    assert set(task_sets) <= {1, 2, 4, space.all}
    assert {t.level for t in traces} == {1}
    assert recovery(task_sets, types, space, "simplified") >= 0.95


def test_task_inclusion_leaves_the_subtask_almost_no_exclusive_neurons():
    """Sec. 4.6.3.3: task B's labels are a subset of task A's."""
    rng = np.random.default_rng(6)
    a_labels = rng.integers(0, 2, (240, 4))
    labels = {"A": a_labels, "B": a_labels[:, :2]}
    features = []
    kinds = ["A-only"] * 10 + ["B"] * 10 + ["none"] * 6
    for k, kind in enumerate(kinds):
        attribute = {"A-only": 2 + k % 2, "B": k % 2}.get(kind)
        signal = 0.0 if attribute is None else 2.0 * (a_labels[:, attribute] - 0.5)
        features.append(rng.standard_normal(240) + signal)
    task_sets, _ = regroup_features(np.stack(features, 1), ("A", "B"), labels).assign(DEFAULT_ALPHA)
    assert task_sets.count(2) <= 1  # B-exclusive
    assert sum(t == 1 for t, kind in zip(task_sets, kinds) if kind == "A-only") >= 9


def test_more_related_tasks_share_more_neurons():
    """Sec. 4.6.3.2: Y^B copies each attribute of Y^A with probability ρ."""
    shared = []
    for rho in (0.0, 0.3, 0.9):
        rng = np.random.default_rng(7)
        ya = rng.integers(0, 2, (240, 2))
        yb = np.where(rng.random((240, 2)) < rho, ya, rng.integers(0, 2, (240, 2)))
        features = np.stack(
            [rng.standard_normal(240) + 2.0 * rng.choice([-1, 1]) * (y[:, j % 2] - 0.5) for y in (ya, yb) for j in range(8)],
            axis=1,
        )
        task_sets, _ = regroup_features(features, ("A", "B"), {"A": ya, "B": yb}).assign(DEFAULT_ALPHA)
        shared.append(task_sets.count(3))
    assert shared[0] <= 2 and shared[2] >= 14
    assert shared[0] < shared[1] < shared[2]


# ----------------------------------------------------------------------------------------------
# α, traces, determinism


def test_one_run_gives_the_grouping_of_every_smaller_alpha():
    space = TaskSpace(("A", "B"))
    features, labels, _ = planted_layer(space.names, per_type=5, n=200, seed=8)
    alphas = [0.01, 0.05, 0.2, 0.5]
    sweep = regroup_features(features, space, labels, alpha=max(alphas))
    sizes = []
    for alpha in alphas:
        task_sets, traces = sweep.assign(alpha)
        assert task_sets == regroup_features(features, space, labels, alpha=alpha).assign(alpha)[0]
        sizes.append([len(t.selected(sweep.alpha_bits(t.task_set, alpha))) for t in traces])
    # Each L'τ is a prefix of one greedy order, so it only grows with α.
    assert np.all(np.diff(np.array(sizes), axis=0) >= 0)
    assert sizes[0] != sizes[-1]
    with pytest.raises(InputError, match="alpha_max"):
        sweep.assign(0.6)


def test_algorithm5_reruns_level2_per_alpha_and_matches_a_fresh_run():
    space = TaskSpace(("A", "B", "C"))
    features, labels, _ = planted_layer(space.names, per_type=3, n=200, seed=9)
    sweep = regroup_features(features, space, labels, alpha=0.3, relative=False)
    for alpha in (0.02, 0.3):
        fresh = regroup_features(features, space, labels, alpha=alpha, relative=False)
        assert sweep.assign(alpha)[0] == fresh.assign(alpha)[0]


def test_trace_is_data_and_a_plot(tmp_path):
    space = TaskSpace(("A", "B"))
    features, labels, _ = planted_layer(space.names, per_type=3, n=160, seed=10)
    layer = regroup_features(features, space, labels, alpha=math.inf, relative=False, dtype=torch.float64)
    for trace in layer.traces:
        assert trace.exhausted and sorted(trace.order) == list(range(12))
        # The whole pool's running matrix gives the whole layer's estimate.
        assert trace.mi[-1] == pytest.approx(trace.reference_mi, abs=1e-9)
        assert trace.reference_mi == pytest.approx(estimate_mi(features, labels[trace.against]), abs=1e-9)
    from pamfx.analysis.alpha_trace import RegroupTrace

    trace = RegroupTrace({"layer": layer.traces})
    json.dumps(trace.to_dict())
    path = trace.plot(tmp_path / "trace.png", alphas=[0.05])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), variant=st.sampled_from(["full", "simplified"]))
def test_regrouping_is_deterministic(seed, variant):
    space = TaskSpace(("A", "B", "C"))
    features, labels, _ = planted_layer(space.names, per_type=1, n=60, seed=seed)
    first = regroup_features(features, space, labels, variant=variant)
    second = regroup_features(features.copy(), space, {t: v.copy() for t, v in labels.items()}, variant=variant)
    assert first.assign(DEFAULT_ALPHA) == second.assign(DEFAULT_ALPHA)


# ----------------------------------------------------------------------------------------------
# Networks end to end, and bad input


def _mlp_layer_map() -> LayerMap:
    torch.manual_seed(0)
    tasks = TaskSpace(("A", "B"))
    widths = {"A": 6, "B": 5}
    models = {t: nn.Sequential(nn.Linear(3, w), nn.ReLU(), nn.Linear(w, 4), nn.ReLU(), nn.Linear(4, 2)) for t, w in widths.items()}
    graphs = {t: fx.symbolic_trace(m) for t, m in models.items()}

    def layer(name, node, width_of):
        structures = {
            t: LayerStructure(name, width_of(t), (node,), (), (Consumer("next"),), (), node) for t in tasks.names
        }
        return NeuronLayer(name, tuple((t, j) for t in tasks.names for j in range(width_of(t))), structures)

    layers = (layer("fc1", "_1", widths.__getitem__), layer("fc2", "_3", lambda t: 4))
    return LayerMap(tasks, layers, graphs, torch.zeros(1, 3))


def test_regroup_on_networks_equals_regroup_features_on_their_activations(tmp_path):
    layers = _mlp_layer_map()
    rng = np.random.default_rng(11)
    x = torch.randn(120, 3)
    labels = {"A": (x[:, 0] > 0).long(), "B": rng.integers(0, 2, (120, 2))}
    alpha = {"fc1": 0.1, "fc2": 0.3}
    result = regroup(layers, x, labels, alpha=alpha, alphas=[0.0, 0.3], progress=False)
    result.grouping.validate(layers)
    activations = collect_activations(layers, x, progress=False)
    for name in ("fc1", "fc2"):
        alone = regroup_features(activations[name], layers.tasks, labels, alpha=0.3)
        assert list(result.grouping.masks(name)) == alone.assign(alpha[name])[0]
        assert list(result.groupings[0].masks(name)) == alone.assign(0.0)[0]
    assert regroup(layers, activations, labels, alpha=alpha, progress=False).grouping == result.grouping
    assert result.grouping_at(0.3) == result.groupings[1]
    first = result.with_alpha_first(0.3)
    assert (first.alpha, first.grouping) == (0.3, result.groupings[1])
    assert first.alphas == (alpha, 0.0) and first.groupings == (result.grouping, result.groupings[0])
    with pytest.raises(InputError, match="not one of"):
        result.with_alpha_first(0.7)
    assert isinstance(result.grouping_at({"fc1": 0.0, "fc2": 0.1}), Grouping)
    assert (tmp_path / "t.png").exists() is False
    result.plot_trace(str(tmp_path / "t.png"))
    assert (tmp_path / "t.png").stat().st_size > 0


def test_bad_input_is_refused_with_the_culprit_named():
    space = TaskSpace(("A", "B"))
    features, labels, _ = planted_layer(space.names, per_type=1, n=40, seed=12)
    with pytest.raises(InputError, match=r"labels\['B'\] has 39 samples but the calibration set has 40"):
        regroup_features(features, space, {"A": labels["A"], "B": labels["B"][:-1]})
    bad = features.copy()
    bad[5, 2] = np.inf
    with pytest.raises(InputError, match="NaN/inf"):
        regroup_features(bad, space, labels)
    with pytest.raises(InputError, match="alpha .* must be >= 0"):
        regroup_features(features, space, labels, alpha=-0.1)
    with pytest.raises(InputError, match=r"no entry for task\(s\) \['B'\]"):
        regroup_features(features, space, {"A": labels["A"]})
    with pytest.raises(InputError, match="unknown task"):
        regroup_features(features, space, {**labels, "C": labels["A"]})
    lonely = labels["A"].copy()
    lonely[:, 1] = 0
    lonely[0, 1] = 1
    with pytest.raises(InputError, match=r"labels\['A'\]\[:, 1\].*fewer than two samples"):
        regroup_features(features, space, {"A": lonely, "B": labels["B"]})
    with pytest.raises(InputError, match="at least two tasks"):
        regroup_features(features, ("A",), {"A": labels["A"]})
    with pytest.raises(InputError, match="variant"):
        regroup_features(features, space, labels, variant="greedy")
    layers = _mlp_layer_map()
    with pytest.raises(InputError, match="no value for layer 'fc2'"):
        regroup(layers, torch.randn(30, 3), {"A": np.arange(30) % 2, "B": np.arange(30) % 3}, alpha={"fc1": 0.1},
                progress=False)
