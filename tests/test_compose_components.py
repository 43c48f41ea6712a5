"""Independent task components, and one network composed from several prunings, one per component."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pamfx
from pamfx.analysis.task_components import task_components
from pamfx.errors import InputError
from pamfx.passes.compose_components import compose_components
from pamfx.passes.select_channels import select_channels
from tests.conftest import ARCHITECTURES, example_input, model_set, perturb


def partitioned_grouping(layers: pamfx.LayerMap, parts: list[int], seed: int) -> pamfx.Grouping:
    """A random grouping whose channels share only within their origin's part of the tasks."""
    rng = np.random.default_rng(seed)
    tasks = layers.tasks
    sets = {}
    for layer in layers:
        sets[layer.name] = []
        for task, _ in layer.origins:
            part = next(p for p in parts if p & tasks.bit(task))
            sets[layer.name].append(int(rng.integers(1, tasks.all + 1)) & part | tasks.bit(task))
    return pamfx.Grouping(tasks, sets)


def random_pruning(gm: torch.fx.GraphModule, seed: int) -> torch.fx.GraphModule:
    """Drop about a third of every layer's channels (each task keeps one per layer), then move the weights."""
    view = pamfx.read_multitask(gm)
    rng = np.random.default_rng(seed)
    keep = {}
    for name, rec in view.records.items():
        if name in view.fixed_layers:
            continue
        chosen = {c for c in range(rec.width) if rng.random() > 0.35}
        for t in view.tasks:
            serving = [c for c in range(rec.width) if rec.task_sets[c] & view.tasks.bit(t)]
            if not chosen.intersection(serving):
                chosen.add(int(rng.choice(serving)))
        keep[name] = sorted(chosen)
    return perturb(select_channels(gm, keep), seed).eval()


def outputs(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return gm.eval()(example_input(batch=4, seed=3))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=st.sampled_from(ARCHITECTURES), k=st.sampled_from([2, 3]), seed=st.integers(0, 10_000),
       split=st.booleans(), nested=st.booleans())
def test_each_component_computes_what_its_donor_computes(arch, k, seed, split, nested):
    models, layers = model_set(arch, k)
    tasks = layers.tasks
    parts = ([tasks.bit(t) for t in tasks] if not split or k == 2
             else [tasks.to_set(["A", "B"]), tasks.bit("C")])
    merged = pamfx.merge(models, example_input(), partitioned_grouping(layers, parts, seed), layers=layers)
    view = pamfx.read_multitask(merged)
    components = task_components(view)
    assert all(any(c & p == c for p in parts) for c in components)  # never coarser than the parts
    # nested: a chain of prunings, as along a trajectory, each component taking a different link;
    # else independent prunings of one network, which is then passed as the base
    chain = [perturb(merged, seed).eval()]
    for i in range(len(parts)):
        chain.append(random_pruning(chain[-1 if nested else 0], seed + i))
    donors = {p: chain[(i + 1 + seed) % len(chain)] for i, p in enumerate(parts)}
    base = None if nested else chain[0]
    composed = compose_components(donors, base=base)
    got = outputs(composed)
    for part, donor in donors.items():
        expected = outputs(donor)
        for t in tasks.to_names(part):
            assert torch.allclose(got[t], expected[t], atol=1e-5), t
        for name, rec in pamfx.read_multitask(composed).records.items():
            mine = [o for o, s in zip(rec.origins, rec.task_sets) if s & part]
            theirs = [o for o, s in zip(pamfx.read_multitask(donor).records[name].origins,
                                        pamfx.read_multitask(donor).records[name].task_sets) if s & part]
            assert sorted(mine) == sorted(theirs)
        assert pamfx.cost(composed, part) == pamfx.cost(donor, part)
    before = {k: v.clone() for k, v in chain[-1].state_dict().items()}
    compose_components(donors, base=base)
    assert all(torch.equal(before[k], v) for k, v in chain[-1].state_dict().items())  # donors untouched


def test_components_of_the_unshared_merge_and_of_a_shared_one():
    models, layers = model_set("lenet5", 3)
    unshared = pamfx.merge(models, example_input(), pamfx.Grouping.origin(layers), layers=layers)
    assert task_components(pamfx.read_multitask(unshared)) == [1, 2, 4]
    shared = pamfx.merge(models, example_input(), pamfx.Grouping.shared(layers), layers=layers)
    assert task_components(pamfx.read_multitask(shared)) == [7]


def test_composing_coupled_tasks_or_unrelated_networks_is_refused():
    models, layers = model_set("lenet5", 2)
    shared = pamfx.merge(models, example_input(), pamfx.Grouping.shared(layers), layers=layers)
    with pytest.raises(InputError, match="share channels"):
        compose_components({1: shared, 2: shared})
    unshared = pamfx.merge(models, example_input(), pamfx.Grouping.origin(layers), layers=layers)
    with pytest.raises(InputError, match="partition"):
        compose_components({1: unshared})
    view = pamfx.read_multitask(unshared)
    first = view.layers.layers[0].name
    task_sets = view.records[first].task_sets

    def without_one(task: int) -> torch.fx.GraphModule:
        dropped = task_sets.index(task)
        return select_channels(unshared, {first: [c for c in range(len(task_sets)) if c != dropped]})

    # A from a network missing one of B's channels, B from one missing one of A's: neither holds both
    with pytest.raises(InputError, match="no donor holds"):
        compose_components({1: without_one(2), 2: without_one(1)})
