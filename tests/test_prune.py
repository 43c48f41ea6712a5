"""Pruning: trajectories and matched-accuracy selection, expected cost, P2 (Taylor) and P1 (VIB)."""
import math
import warnings

import pytest
import torch

import pamfx
from pamfx.analysis.cost import (channel_flops, combination_weights, cross_origin_flops, cross_origin_flops_by_layer,
                                 expected_channel_flops)
from pamfx.errors import InputError
from pamfx.ir.task_set import TaskSpace
from pamfx.passes.finetune import connection_masks, finetune, multilabel_loss
from pamfx.passes.merge import as_multitask
from pamfx.passes.prune import (Checkpoint, Trajectory, accuracy_standard_error, check_calibration_noise,
                                compose_selection, iterative_prune, recover)
from pamfx.passes.taylor import channel_importance, channels_to_remove, prune_taylor, taylor_importance
from pamfx.passes.vib import fold_and_prune, gateable_layers, gated_network, prune_vib
from tests.conftest import example_input, model_set
from tests.test_finetune_prune import synthetic_task_data, two_output_models


def merged_network(arch: str, k: int = 2, seed: int = 1):
    models = two_output_models(arch, k)
    layers = pamfx.organise_layers(models, example_input())
    return pamfx.merge(models, example_input(), pamfx.Grouping.random(layers, seed=seed), layers=layers)


def assert_emit_equivalent(network):
    network = network.eval()
    view = pamfx.read_multitask(network)
    x = example_input(batch=4, seed=5)
    reference = network(x)
    for combo in view.tasks.combinations():
        emitted = pamfx.emit(network, combo).eval()
        for task, value in emitted(x).items():
            assert (value - reference[task]).abs().max() <= 1e-5
    for weight, mask in connection_masks(network):
        assert torch.count_nonzero(weight[mask == 0]) == 0


# --- the protocol -------------------------------------------------------------------------------

def synthetic_trajectory() -> Trajectory:
    tasks = TaskSpace(("A", "B"))
    trajectory = Trajectory(tasks, {"A": 0.90, "B": 0.80}, combination_weights(tasks))
    # (expected FLOPs, accuracy A, accuracy B, accepted)
    points = [(100, 0.91, 0.80, True), (80, 0.897, 0.799, True), (60, 0.893, 0.801, True),  # 60: A -0.7 points
              (50, 0.20, 0.20, False), (55, 0.896, 0.797, True), (40, 0.880, 0.790, True)]
    for i, (flops, a, b, ok) in enumerate(points):
        trajectory.checkpoints.append(Checkpoint(i, {1: flops, 2: flops, 3: flops}, flops, {"A": a, "B": b}, ok, None))
    return trajectory


def test_selection_is_the_cheapest_checkpoint_within_the_tolerance():
    trajectory = synthetic_trajectory()
    # within 0.5 points: rounds 0, 1 and 4; round 4 (55) is the cheapest — not the last accepted round,
    # not the rejected round 3 (50), not round 2 (60, A 0.7 points below).
    assert trajectory.select(0.005).round == 4
    assert trajectory.select(0.008).round == 4
    assert trajectory.select(0.0).round == 0
    assert trajectory.select(0.03).round == 5
    assert [trajectory.within(p, 0.005) for p in trajectory.checkpoints] == [True, True, False, False, True, False]


def test_selection_without_a_matched_checkpoint_returns_the_least_deficient():
    tasks = TaskSpace(("A",))
    trajectory = Trajectory(tasks, {"A": 0.9}, combination_weights(tasks))
    for i, (flops, acc) in enumerate([(10, 0.85), (5, 0.80), (3, 0.87)]):
        trajectory.checkpoints.append(Checkpoint(i, {1: flops}, flops, {"A": acc}, True, None))
    point = trajectory.select(0.01)
    assert point.round == 2 and not trajectory.within(point, 0.01)


def test_calibration_noise_check_fires_when_the_tolerance_is_below_two_standard_errors():
    se = accuracy_standard_error(0.93, 1000, 5)
    assert se == pytest.approx((0.93 * 0.07 / 5000) ** 0.5)
    with pytest.warns(UserWarning, match="below 2 standard errors"):
        check_calibration_noise({"A": 0.93}, 1000, {"A": 5}, tolerance=0.005)
    with pytest.raises(InputError, match="samples"):
        check_calibration_noise({"A": 0.93}, 1000, {"A": 5}, tolerance=0.005, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        errors = check_calibration_noise({"A": 0.93, "B": 0.9}, 3000, {"A": 5, "B": 5}, tolerance=0.005)
    assert set(errors) == {"A", "B"} and all(2 * e < 0.005 for e in errors.values())


def test_combination_weights_are_normalised_and_checked():
    tasks = TaskSpace(("A", "B"))
    assert combination_weights(tasks) == {1: pytest.approx(1 / 3), 2: pytest.approx(1 / 3), 3: pytest.approx(1 / 3)}
    assert combination_weights(tasks, {"A": 3, ("A", "B"): 1}) == {1: 0.75, 2: 0.0, 3: 0.25}
    with pytest.raises(InputError):
        combination_weights(tasks, {"A": -1})
    with pytest.raises(InputError):
        combination_weights(tasks, {"A": 0})


# --- expected cost ------------------------------------------------------------------------------

@pytest.mark.parametrize("arch_name", ["lenet5", "vgg"])
def test_channel_flops_of_a_combination_is_what_removing_the_channel_saves_there(arch_name):
    merged = merged_network(arch_name, 3, seed=3)
    view = pamfx.read_multitask(merged)
    for combo in (1, 6, 7):
        per_channel = channel_flops(merged, combo)
        total = pamfx.cost(merged, combo).flops
        for layer in list(per_channel)[::2]:
            width = view.records[layer].width
            for c in (0, width // 2, width - 1):
                smaller = pamfx.select_channels(merged, {layer: [i for i in range(width) if i != c]})
                assert total - pamfx.cost(smaller, combo).flops == int(per_channel[layer][c])
                if not view.records[layer].task_sets[c] & combo:
                    assert per_channel[layer][c] == 0


def test_cross_origin_flops_count_the_connections_between_origin_networks():
    """Under `shared` every hidden layer connects both origins densely: a layer of kernel k and P
    output positions spends 2·k²·P·(out_A·in_B + out_B·in_A) FLOPs across origins, with the widths
    read off the original networks; under `origin` nothing crosses."""
    models, layers = model_set("lenet5", 2)
    positions = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: positions.update({n: o[0, 0].numel()}))
             for n, m in models["A"].named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    models["A"](example_input())
    for h in hooks:
        h.remove()
    shared = pamfx.merge(models, example_input(), "shared", layers=layers)
    by_layer = cross_origin_flops_by_layer(shared, ["A"])
    assert by_layer == cross_origin_flops_by_layer(shared, ["A", "B"])  # every channel serves every task
    expected = {}
    for name in ("conv2", "fc1", "fc2"):
        wa, wb = models["A"].get_submodule(name).weight, models["B"].get_submodule(name).weight
        kernel = wa[0, 0].numel()
        expected[name] = 2 * kernel * positions[name] * (wa.shape[0] * wb.shape[1] + wb.shape[0] * wa.shape[1])
    assert by_layer == expected  # LeNet-5's neuron layers are named after the modules that write them
    assert cross_origin_flops(shared, ["A"]) == sum(expected.values())
    origin = pamfx.merge(models, example_input(), "origin", layers=layers)
    assert all(cross_origin_flops(origin, c) == 0 for c in (["A"], ["B"], ["A", "B"]))


def test_channels_of_likelier_combinations_rank_as_more_expensive():
    merged = merged_network("lenet5", 2)
    view = pamfx.read_multitask(merged)
    flat = {layer: torch.ones(rec.width) for layer, rec in view.records.items()}
    for task, other in (("A", "B"), ("B", "A")):
        weights = combination_weights(view.tasks, {task: 0.9, other: 0.05, ("A", "B"): 0.05})
        cost = expected_channel_flops(merged, weights)
        bit, other_bit = view.tasks.bit(task), view.tasks.bit(other)
        for layer, rec in view.records.items():
            mine = [c for c, t in enumerate(rec.task_sets) if t == bit]
            theirs = [c for c, t in enumerate(rec.task_sets) if t == other_bit]
            uniform = expected_channel_flops(merged, combination_weights(view.tasks))[layer]
            for c in mine:  # used by the likely combination: dearer than under uniform usage
                assert cost[layer][c] > uniform[c] or uniform[c] == 0
            for c in theirs:
                assert cost[layer][c] < uniform[c] or uniform[c] == 0
        # equal importance everywhere: the first channels to go are the ones the likely task pays for
        removal = channels_to_remove(merged, flat, cost, flops_budget=0.0)
        (layer, (c,)), = removal.items()
        assert view.records[layer].task_sets[c] & bit


@pytest.mark.parametrize("seed", [0, 3])
def test_without_exclusive_pruning_only_shared_channels_go(seed):
    merged = merged_network("lenet5", 3, seed=seed)
    view = pamfx.read_multitask(merged)
    flat = {layer: torch.ones(rec.width) for layer, rec in view.records.items()}
    cost = expected_channel_flops(merged, combination_weights(view.tasks))
    everything = float(sum(c.sum() for c in cost.values()))
    removed = channels_to_remove(merged, flat, cost, flops_budget=everything, exclusive=False)
    assert removed and all(bin(view.records[layer].task_sets[c]).count("1") > 1 for layer, cs in removed.items() for c in cs)
    default = channels_to_remove(merged, flat, cost, flops_budget=everything)
    assert any(bin(view.records[layer].task_sets[c]).count("1") == 1 for layer, cs in default.items() for c in cs)
    single = as_multitask(two_output_models("lenet5", 2)["A"], example_input(), "A")
    single_cost = expected_channel_flops(single, combination_weights(TaskSpace(("A",))))
    assert channels_to_remove(single, {l: torch.ones(len(c)) for l, c in single_cost.items()}, single_cost,
                              flops_budget=1.0, exclusive=False)  # one task: its channels are all prunable


def test_shared_channels_sum_their_tasks_normalised_scores():
    merged = merged_network("lenet5", 2)
    view = pamfx.read_multitask(merged)
    loader, label_map = synthetic_task_data(2)
    scores = taylor_importance(merged, loader, multilabel_loss(label_map), batches=2)
    importance = channel_importance(merged, scores)
    for t in view.tasks:
        other = [u for u in view.tasks if u != t][0]
        for layer, rec in view.records.items():
            only_other = torch.tensor([s == view.tasks.bit(other) for s in rec.task_sets])
            assert torch.all(scores[t][layer][only_other] == 0)  # another task's channels cannot move t's loss
    means = {t: torch.cat([scores[t][l][rec.serves(view.tasks.bit(t))] for l, rec in view.records.items()]).mean()
             for t in view.tasks}
    for layer, rec in view.records.items():
        for c, s in enumerate(rec.task_sets):
            expected = sum(float(scores[t][layer][c] / means[t]) for t in view.tasks if s & view.tasks.bit(t))
            assert float(importance[layer][c]) == pytest.approx(expected, rel=1e-5)


# --- P2 -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch_name", ["lenet5", "resnet", "mobilenetv2"])
def test_taylor_pruning_shrinks_and_keeps_emit_equivalence(arch_name):
    merged = merged_network(arch_name)
    view = pamfx.read_multitask(merged)
    loader, label_map = synthetic_task_data(2)
    trajectory = prune_taylor(merged, loader, multilabel_loss(label_map), lambda net: {"A": 0.5, "B": 0.5},
                              reference={"A": 0.5, "B": 0.5}, weights=combination_weights(view.tasks),
                              search_tolerance=0.0, step_fraction=0.3, finetune_steps=2, max_rounds=5,
                              importance_batches=2, progress=False)
    flops = [p.expected_flops for p in trajectory.accepted()]
    assert len(flops) == 6 and all(a > b for a, b in zip(flops, flops[1:]))
    pruned = trajectory.select(0.0).network
    assert pruned is trajectory.checkpoints[-1].network
    for layer, rec in pamfx.read_multitask(pruned).records.items():
        assert all(int(rec.serves(view.tasks.bit(t)).sum()) >= 1 for t in view.tasks)
    assert_emit_equivalent(pruned)
    assert pamfx.cost(merged) == pamfx.cost(trajectory.checkpoints[0].network)  # the input is not modified


def test_failed_rounds_are_skipped_and_pruning_goes_on():
    single = as_multitask(two_output_models("lenet5", 2)["A"], example_input(), "A")
    loader, label_map = synthetic_task_data(2)
    calls = iter(range(100))

    def evaluate(net):
        return {"A": 0.0 if next(calls) in (2, 3) else 1.0}  # the 2nd and 3rd rounds fail

    trajectory = prune_taylor(single, loader, multilabel_loss({"A": label_map["A"]}), evaluate, reference={"A": 1.0},
                              weights=combination_weights(TaskSpace(("A",))), search_tolerance=0.0, step_fraction=0.2,
                              finetune_steps=1, max_rounds=6, patience=3, importance_batches=1, progress=False)
    assert [p.accepted for p in trajectory.checkpoints] == [True, True, False, False, True, True, True]
    assert trajectory.select(0.0).round == 6


def test_a_failed_round_halves_the_step_and_an_accepted_round_doubles_it_back():
    single = as_multitask(two_output_models("lenet5", 2)["A"], example_input(), "A")
    loader, label_map = synthetic_task_data(2)
    weights = combination_weights(TaskSpace(("A",)))
    fractions = []

    def propose(point, budget, protected):
        fractions.append(budget / point.expected_flops)
        uniform = {name: torch.ones(rec.width) for name, rec in pamfx.read_multitask(point.network).records.items()}
        return channels_to_remove(point.network, uniform, expected_channel_flops(point.network, weights), budget, protected)

    outcomes = iter([1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0])  # the unpruned network, then rounds 1-6: 2 and 3 fail
    trajectory = iterative_prune(single, propose, loader, multilabel_loss({"A": label_map["A"]}),
                                 lambda net: {"A": next(outcomes)}, reference={"A": 1.0}, weights=weights,
                                 search_tolerance=0.0, step_fraction=0.2, finetune_steps=1, max_rounds=6, patience=3,
                                 progress=False)
    assert [p.accepted for p in trajectory.checkpoints] == [True, True, False, False, True, True, True]
    assert fractions == pytest.approx([0.2, 0.2, 0.1, 0.05, 0.1, 0.2])


def test_a_round_that_drifts_past_the_tolerance_is_fine_tuned_longer_before_it_is_judged(monkeypatch):
    single = as_multitask(two_output_models("lenet5", 2)["A"], example_input(), "A")
    loader, label_map = synthetic_task_data(2)
    weights = combination_weights(TaskSpace(("A",)))
    steps = []

    def counting_finetune(gm, *args, max_steps=None, **kwargs):
        steps.append(max_steps)
        return finetune(gm, *args, max_steps=max_steps, **kwargs)

    monkeypatch.setattr("pamfx.passes.prune.finetune", counting_finetune)

    def propose(point, budget, protected):
        uniform = {name: torch.ones(rec.width) for name, rec in pamfx.read_multitask(point.network).records.items()}
        return channels_to_remove(point.network, uniform, expected_channel_flops(point.network, weights), budget, protected)

    # the unpruned network; round 1 drifts 0.7 points (within the search tolerance) and is rescued to
    # -0.1; round 2 falls 2 points and is rescued to -0.8 (accepted); round 3 needs no rescue; round 4
    # falls 3 points and stays 2 below after its rescue (failed)
    outcomes = iter([1.0, 0.993, 0.999, 0.98, 0.992, 0.996, 0.97, 0.98])
    trajectory = iterative_prune(single, propose, loader, multilabel_loss({"A": label_map["A"]}),
                                 lambda net: {"A": next(outcomes)}, reference={"A": 1.0}, weights=weights,
                                 search_tolerance=0.01, tolerance=0.005, rescue_steps=7, step_fraction=0.1,
                                 finetune_steps=1, max_rounds=4, progress=False)
    assert steps == [1, 7, 1, 7, 1, 1, 7]
    assert [(p.accepted, p.accuracy["A"]) for p in trajectory.checkpoints] == [
        (True, 1.0), (True, 0.999), (True, 0.992), (True, 0.996), (False, 0.98)]
    assert next(outcomes, None) is None


def test_patience_stops_after_failed_rounds_in_a_row():
    merged = merged_network("lenet5")
    loader, label_map = synthetic_task_data(2)
    trajectory = prune_taylor(merged, loader, multilabel_loss(label_map), lambda net: {"A": 0.0, "B": 0.0},
                              reference={"A": 1.0, "B": 1.0}, weights=combination_weights(TaskSpace(("A", "B"))),
                              search_tolerance=0.0, finetune_steps=1, max_rounds=10, patience=2,
                              importance_batches=1, progress=False)
    assert [p.accepted for p in trajectory.checkpoints] == [True, False, False]
    assert pamfx.cost(trajectory.select(0.5).network) == pamfx.cost(merged)


def test_same_seed_gives_the_same_pruned_network():
    def run():
        merged = merged_network("lenet5", seed=6)
        loader, label_map = synthetic_task_data(2, seed=3)
        trajectory = prune_taylor(merged, loader, multilabel_loss(label_map), lambda net: {"A": 0.5, "B": 0.5},
                                  reference={"A": 0.5, "B": 0.5}, weights=combination_weights(TaskSpace(("A", "B"))),
                                  search_tolerance=0.0, step_fraction=0.2, finetune_steps=3, max_rounds=3, seed=5,
                                  importance_batches=2, progress=False)
        return merged, trajectory.select(0.0).network

    merged, first = run()
    _, second = run()
    assert pamfx.cost(first).flops < pamfx.cost(merged).flops
    assert pamfx.read_multitask(first).grouping() == pamfx.read_multitask(second).grouping()
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- P1 -----------------------------------------------------------------------------------------

def set_gates(gates, seed: int):
    """Random gate values with some channels past the VIB threshold, never all of a task's."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in gates.values():
            n = gate.mu.numel()
            gate.mu.copy_(torch.rand(n, generator=g) * 2 - 0.5)
            gate.log_d.copy_(torch.full((n,), -4.0))
            gate.log_d[torch.rand(n, generator=g) < 0.3] = 3.0


@pytest.mark.parametrize("arch_name", ["lenet5", "vgg", "mobilenetv2"])
@pytest.mark.parametrize("k", [1, 2])
def test_vib_gates_folded_into_the_weights_give_the_gated_outputs(arch_name, k):
    models = two_output_models(arch_name, 2)
    network = (as_multitask(models["A"], example_input(), "A") if k == 1 else merged_network(arch_name)).eval()
    view = pamfx.read_multitask(network)
    layers = gateable_layers(view)
    assert layers
    gated, gates = gated_network(network, layers, seed=0)
    set_gates(gates, seed=3)
    pruned = fold_and_prune(network, gates)
    x = example_input(batch=4, seed=7)
    expected = gated.eval()(x)
    got = pruned.eval()(x)
    for task in view.tasks:
        assert torch.allclose(got[task], expected[task], atol=1e-5)
    assert pamfx.cost(pruned).flops < pamfx.cost(network).flops
    assert_emit_equivalent(pruned)


def test_vib_does_not_gate_layers_read_by_a_residual_addition():
    view = pamfx.read_multitask(merged_network("resnet"))
    gated = set(gateable_layers(view))
    sources = {source for layer in view.layers.layers for _, source in layer.shortcuts}
    assert sources and not sources & gated
    assert gated  # the others are gated

@pytest.mark.parametrize("k", [1, 2])
def test_vib_pruning_records_a_trajectory_and_keeps_emit_equivalence(k):
    models = two_output_models("lenet5", 2)
    network = as_multitask(models["A"], example_input(), "A") if k == 1 else merged_network("lenet5")
    view = pamfx.read_multitask(network)
    loader, label_map = synthetic_task_data(2)
    loss = multilabel_loss({t: label_map[t] for t in view.tasks})
    trajectory = prune_vib(network, loader, loss, lambda net: {t: 0.5 for t in view.tasks},
                           reference={t: 0.5 for t in view.tasks}, weights=combination_weights(view.tasks),
                           search_tolerance=0.0, epochs=3, kl_weight=1.0, gate_lr=0.2, progress=False)
    assert [p.round for p in trajectory.checkpoints] == [0, 1, 2, 3]
    pruned = trajectory.select(0.0).network
    assert pamfx.cost(pruned).flops < pamfx.cost(network).flops
    assert_emit_equivalent(pruned)


def test_vib_checkpoints_within_epochs_and_patience_counts_epochs():
    network = merged_network("lenet5")
    view = pamfx.read_multitask(network)
    loader, label_map = synthetic_task_data(2)
    loss = multilabel_loss({t: label_map[t] for t in view.tasks})
    common = dict(reference={t: 0.5 for t in view.tasks}, weights=combination_weights(view.tasks), search_tolerance=0.0,
                  epochs=2, kl_weight=1.0, gate_lr=0.2, progress=False)
    fine = prune_vib(network, loader, loss, lambda net: {t: 0.5 for t in view.tasks}, checkpoints=3, **common)
    assert [p.round for p in fine.checkpoints] == list(range(7)) and all(p.accepted for p in fine.checkpoints)
    for point in fine.checkpoints:
        assert_emit_equivalent(point.network)
    scores = iter([{t: 0.5 for t in view.tasks}] + [{t: 0.4 for t in view.tasks}] * 6)  # every pruned one fails
    stopped = prune_vib(network, loader, loss, lambda net: next(scores), checkpoints=3, patience=1, **common)
    assert [p.round for p in stopped.checkpoints] == [0, 1, 2, 3] and not any(p.accepted for p in stopped.checkpoints[1:])
    with pytest.raises(InputError, match="checkpoints"):
        prune_vib(network, loader, loss, lambda net: {}, checkpoints=0, **common)


def test_vib_alternates_tasks_only_within_an_independent_component():
    """In the alternating phase the tasks of one component take turns; the networks of the unshared
    merge are independent components, so each trains on every minibatch: exactly the joint schedule."""
    models = two_output_models("lenet5", 2)
    layers = pamfx.organise_layers(models, example_input())
    loader, label_map = synthetic_task_data(2)
    loss = multilabel_loss(label_map)
    common = dict(reference={t: 0.5 for t in "AB"}, weights=combination_weights(TaskSpace(("A", "B"))),
                  search_tolerance=0.0, epochs=2, kl_weight=1.0, gate_lr=0.2, progress=False)
    for grouping, independent in ((pamfx.Grouping.origin(layers), True), ("shared", False)):
        network = pamfx.merge(models, example_input(), grouping, layers=layers)
        runs = [prune_vib(network, synthetic_task_data(2)[0], loss, lambda net: {t: 0.5 for t in "AB"},
                          alternate=alternate, **common) for alternate in (True, False)]  # the same data order
        first, second = (run.checkpoints[-1].network.state_dict() for run in runs)
        same = first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
        assert same == independent
    with pytest.raises(InputError, match="alternate_groups name tasks"):
        finetune(network, loader, loss, epochs=1, alternate=True, alternate_groups=[["A", "C"]], progress=False)


def test_vib_accepts_independent_components_apart():
    """On the unshared merge a task that fails keeps its last accepted version and is done after
    ``patience`` failures; the other task's pruning goes on exactly as if every checkpoint passed."""
    models = two_output_models("lenet5", 2)
    layers = pamfx.organise_layers(models, example_input())
    merged = pamfx.merge(models, example_input(), pamfx.Grouping.origin(layers), layers=layers)
    label_map = synthetic_task_data(2)[1]
    common = dict(reference={"A": 1.0, "B": 1.0}, weights=combination_weights(TaskSpace(("A", "B"))),
                  search_tolerance=0.0, epochs=4, kl_weight=1.0, gate_lr=0.2, patience=1, progress=False)

    def run(evaluate):  # the same data order and gates: evaluation does not steer training
        return prune_vib(merged, synthetic_task_data(2)[0], multilabel_loss(label_map), evaluate, **common)

    free = run(lambda net: {"A": 1.0, "B": 1.0}).checkpoints
    assert len({p.flops[1] for p in free}) > 2 and len({p.flops[2] for p in free}) > 2  # both tasks are pruned
    floor_a = free[2].flops[1]  # A fails below its FLOPs at checkpoint 2, B never
    apart = run(lambda net: {"A": 1.0 if pamfx.cost(net, "A").flops >= floor_a else 0.9, "B": 1.0}).checkpoints
    assert [p.round for p in apart] == [p.round for p in free] and all(p.accepted for p in apart)
    assert [p.flops[2] for p in apart] == [p.flops[2] for p in free]  # B as if pruned on its own
    last_a = max(p.round for p in free if p.flops[1] >= floor_a)
    assert last_a < len(free) - 1
    for point in apart[last_a + 1:]:  # A is done: it stays at its last accepted version
        assert point.flops[1] == floor_a
        assert torch.allclose(task_outputs(point.network, "A"), task_outputs(apart[last_a].network, "A"), atol=1e-6)
        assert_emit_equivalent(point.network)


@pytest.mark.parametrize("recoverable", [0, 2, 5, 6])
def test_recovery_bisects_for_the_cheapest_checkpoint_that_comes_back(recoverable):
    single = as_multitask(two_output_models("lenet5", 2)["A"], example_input(), "A")
    loader, label_map = synthetic_task_data(2)
    loss = multilabel_loss({"A": label_map["A"]})
    scores = iter([1.0] + [0.99] * 6)  # the unpruned network matches; pruned ones are 1 point short
    trajectory = prune_taylor(single, loader, loss, lambda net: {"A": next(scores)}, reference={"A": 1.0},
                              weights=combination_weights(TaskSpace(("A",))), search_tolerance=0.02, step_fraction=0.2,
                              finetune_steps=1, max_rounds=6, importance_batches=1, progress=False)
    assert trajectory.select(0.005).round == 0
    cheaper = sorted(trajectory.accepted()[1:], key=lambda p: p.expected_flops)
    assert len(cheaper) == 6
    before = {k: v.clone() for k, v in cheaper[0].network.state_dict().items()}
    # a checkpoint comes back iff it is no cheaper than the `recoverable`-th cheapest (6: none does)
    threshold = cheaper[recoverable].expected_flops if recoverable < 6 else math.inf
    tried = []

    def evaluate(net):
        tried.append(pamfx.cost(net).flops)
        return {"A": 1.0 if pamfx.cost(net).flops >= threshold else 0.99}

    point = recover(trajectory, loader, loss, evaluate, tolerance=0.005, candidates=3, epochs=1, progress=False)
    assert len(tried) <= 3  # 3 fine-tunes bisect 2^3 - 1 = 7 >= 6 candidates
    if recoverable == 6:
        assert point is None and trajectory.select(0.005).round == 0
        return
    assert point is trajectory.select(0.005) and point.round == cheaper[recoverable].round
    assert point.expected_flops == cheaper[recoverable].expected_flops and point.network is not cheaper[recoverable].network
    assert all(torch.equal(before[k], v) for k, v in cheaper[0].network.state_dict().items())


def unshared_trajectory(rounds: int = 6):
    """P2 on the unshared merge of two networks, every round accepted (accuracies set by the caller)."""
    models = two_output_models("lenet5", 2)
    layers = pamfx.organise_layers(models, example_input())
    merged = pamfx.merge(models, example_input(), pamfx.Grouping.origin(layers), layers=layers)
    loader, label_map = synthetic_task_data(2)
    loss = multilabel_loss(label_map)
    trajectory = prune_taylor(merged, loader, loss, lambda net: {"A": 1.0, "B": 1.0}, reference={"A": 1.0, "B": 1.0},
                              weights=combination_weights(TaskSpace(("A", "B"))), search_tolerance=0.0,
                              step_fraction=0.2, finetune_steps=1, max_rounds=rounds, importance_batches=1,
                              progress=False)
    assert len(trajectory.accepted()) == rounds + 1
    return trajectory, loader, loss


def task_outputs(network, task):
    with torch.no_grad():
        return network.eval()(example_input(batch=4, seed=5))[task]


def test_each_independent_component_stops_at_its_own_selection():
    trajectory, _, _ = unshared_trajectory()
    assert trajectory.components() == [1, 2]
    for point in trajectory.checkpoints:  # A is 1 point short from round 3 on, B never
        point.accuracy = {"A": 0.99 if point.round >= 3 else 1.0, "B": 1.0}
    joint = trajectory.select(0.005)
    assert joint.round == 2
    composed = compose_selection(trajectory, lambda net: {"A": 1.0, "B": 1.0}, 0.005)
    a, b = trajectory.checkpoints[2], trajectory.checkpoints[6]
    assert composed is trajectory.select(0.005) and composed.round == 6
    assert composed.flops == {1: a.flops[1], 2: b.flops[2], 3: a.flops[1] + b.flops[2]}
    assert all(composed.flops[c] <= joint.flops[c] for c in composed.flops) and composed.flops[2] < joint.flops[2]
    assert torch.allclose(task_outputs(composed.network, "A"), task_outputs(a.network, "A"), atol=1e-6)
    assert torch.allclose(task_outputs(composed.network, "B"), task_outputs(b.network, "B"), atol=1e-6)
    assert_emit_equivalent(composed.network)
    # one network of coupled tasks: nothing to compose
    shared = Trajectory(TaskSpace(("A", "B")), {"A": 1.0, "B": 1.0}, combination_weights(TaskSpace(("A", "B"))))
    shared.record(0, merged_network("lenet5"), {"A": 1.0, "B": 1.0}, accepted=True)
    assert shared.components() == [3] and compose_selection(shared, lambda net: {}, 0.005) is None


@pytest.mark.parametrize("recoverable", [(0, 2), (4, 6), (6, 1)])
def test_recovery_bisects_for_every_independent_component_at_once(recoverable):
    trajectory, loader, loss = unshared_trajectory()
    for point in trajectory.checkpoints:  # every pruned checkpoint 1 point short on both tasks
        point.accuracy = {"A": 0.99, "B": 0.99} if point.round else {"A": 1.0, "B": 1.0}
    start = trajectory.checkpoints[0].flops
    cheaper = {t: sorted(p.flops[bit] for p in trajectory.accepted() if p.flops[bit] < start[bit])
               for t, bit in (("A", 1), ("B", 2))}
    # task t comes back iff its component is no cheaper than its `recoverable`-th cheapest pruned
    # checkpoint's (past the last: never; the unpruned network is within the tolerance)
    thresholds = {t: cheaper[t][r] if r < len(cheaper[t]) else math.inf for t, r in zip("AB", recoverable)}
    tried = []

    def evaluate(net):
        flops = {t: pamfx.cost(net, t).flops for t in "AB"}
        tried.append(flops)
        return {t: 1.0 if flops[t] >= thresholds[t] or flops[t] == start[trajectory.tasks.bit(t)] else 0.99
                for t in "AB"}

    point = recover(trajectory, loader, loss, evaluate, tolerance=0.005, candidates=3, epochs=1, progress=False)
    assert len(tried) <= 4  # 3 fine-tunes bisect both components; one evaluation of the composition
    assert point is trajectory.select(0.005)
    for t, r, bit in zip("AB", recoverable, (1, 2)):
        assert point.flops[bit] == (cheaper[t][r] if r < len(cheaper[t]) else start[bit])


def test_independent_components_prune_apart_in_the_same_rounds():
    models = two_output_models("lenet5", 2)
    layers = pamfx.organise_layers(models, example_input())
    merged = pamfx.merge(models, example_input(), pamfx.Grouping.origin(layers), layers=layers)
    loader, label_map = synthetic_task_data(2)
    floor_a = 0.75 * pamfx.cost(merged, "A").flops  # A fails below 75 % of its FLOPs, B never

    def evaluate(net):
        return {"A": 1.0 if pamfx.cost(net, "A").flops >= floor_a else 0.9, "B": 1.0}

    def run(per_component):
        return prune_taylor(merged, loader, multilabel_loss(label_map), evaluate, reference={"A": 1.0, "B": 1.0},
                            weights=combination_weights(TaskSpace(("A", "B"))), search_tolerance=0.0,
                            step_fraction=0.2, finetune_steps=1, max_rounds=10, patience=2, importance_batches=1,
                            per_component=per_component, progress=False)

    joint, apart = run(False), run(True)
    accepted = apart.accepted()
    assert all(p.flops[1] >= floor_a for p in accepted)
    assert apart.select(0.0).flops[2] < joint.select(0.0).flops[2]  # B goes on where A stopped
    # a round that pruned B but not A kept A exactly as it was
    mixed = [(a, b) for a, b in zip(accepted, accepted[1:]) if a.flops[1] == b.flops[1] and b.flops[2] < a.flops[2]]
    assert mixed
    for before, after in mixed:
        assert torch.allclose(task_outputs(after.network, "A"), task_outputs(before.network, "A"), atol=1e-6)
        assert_emit_equivalent(after.network)


def test_task_balance_weighs_up_the_task_nearest_its_tolerance():
    from pamfx.passes.taylor import task_balance

    accuracy, reference = {"A": 0.93, "B": 0.905, "C": 0.91, "D": 0.913}, {"A": 0.92, "B": 0.91, "C": 0.91, "D": 0.91}
    lam = task_balance(accuracy, reference, tolerance=0.005, spare=3.0)
    assert lam["C"] == pytest.approx(1.0)
    assert lam["B"] == pytest.approx(math.exp(1.0), rel=1e-6)  # 1 tolerance below
    assert lam["A"] == pytest.approx(math.exp(-2.0), rel=1e-6)  # 2 tolerances to spare
    bounded = task_balance(accuracy, reference, tolerance=0.005)  # spare accuracy counts for 1 tolerance at most
    assert bounded["A"] == pytest.approx(math.exp(-1.0), rel=1e-6)
    assert bounded["D"] == pytest.approx(math.exp(-0.6), rel=1e-6)
    assert bounded["B"] == pytest.approx(lam["B"], rel=1e-6)
    with pytest.raises(InputError, match="spare"):
        task_balance(accuracy, reference, tolerance=0.005, spare=-1.0)
    merged = merged_network("lenet5")
    view = pamfx.read_multitask(merged)
    loader, label_map = synthetic_task_data(2)
    scores = taylor_importance(merged, loader, multilabel_loss(label_map), batches=2)
    plain = channel_importance(merged, scores)
    weighted = channel_importance(merged, scores, {"A": 4.0, "B": 1.0})
    for layer, rec in view.records.items():
        for c, s in enumerate(rec.task_sets):
            if s == view.tasks.bit("A"):
                assert float(weighted[layer][c]) == pytest.approx(4 * float(plain[layer][c]), rel=1e-5)
            if s == view.tasks.bit("B"):
                assert float(weighted[layer][c]) == pytest.approx(float(plain[layer][c]), rel=1e-5)
