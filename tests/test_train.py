"""Single-task training, multi-label evaluation and the trained-network cache."""
from __future__ import annotations

import pytest
import torch

from pamfx.data import load_dataset, task_split
from pamfx.errors import InputError
from pamfx.zoo import build_model
from pamfx.zoo import train as train_mod
from pamfx.zoo.train import evaluate, evaluate_multitask, get_or_train, train_single_task

TASKS = task_split(2)
LABELS = TASKS["digits_0_4"]
FAST = {"epochs": 1, "lr": 3e-3, "batch_size": 32, "seed": 0, "progress": False}


@pytest.fixture(scope="module")
def data():
    return load_dataset("tiled-digits", seed=0, n_train=600, n_calib=20, n_test=400)


def lenet(data, labels=LABELS):
    torch.manual_seed(0)
    return build_model("lenet5", len(labels), data.in_channels, data.image_size)


def majority_accuracy(dataset, labels):
    """Accuracy of always predicting each label's more frequent value: the chance level to beat."""
    rate = dataset.labels[:, labels].mean(0)
    return torch.maximum(rate, 1 - rate).mean().item()


def test_training_lowers_the_loss_and_beats_chance(data):
    model = lenet(data)
    before = evaluate(model, data.test, LABELS)
    losses = train_single_task(model, data.train, LABELS, epochs=8, lr=3e-3, batch_size=32, seed=0, progress=False)
    assert len(losses) == 8
    assert losses[-1] < 0.85 * losses[0]
    after = evaluate(model, data.test, LABELS)
    assert after > majority_accuracy(data.test, LABELS) + 0.05
    assert after > before


def test_training_is_deterministic_and_leaves_global_rng_alone(data):
    state = torch.random.get_rng_state()
    models = [lenet(data) for _ in range(2)]
    torch.random.set_rng_state(state)
    losses = [train_single_task(m, data.train, LABELS, **FAST) for m in models]
    assert torch.equal(torch.random.get_rng_state(), state)
    assert losses[0] == losses[1]
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
        assert torch.equal(a, b)


def test_training_rejects_mismatched_outputs_and_bad_labels(data):
    with pytest.raises(InputError, match="label_indices"):
        train_single_task(lenet(data, [0, 1, 2]), data.train, LABELS, **FAST)
    with pytest.raises(InputError, match="label_indices"):
        train_single_task(lenet(data), data.train, [0, 1, 2, 3, 10], **FAST)


def constant(value, tasks):
    """A 'network' that predicts every label of every task as present (value > 0) or absent."""
    return lambda x: {name: torch.full((len(x), len(idx)), value) for name, idx in tasks.items()}


def test_evaluate_multitask_matches_label_frequencies(data):
    ds = data.test
    absent = evaluate_multitask(constant(-1.0, TASKS), ds, TASKS)
    present = evaluate_multitask(constant(1.0, TASKS), ds, TASKS)
    assert list(absent) == list(TASKS)
    for name, idx in TASKS.items():
        rate = ds.labels[:, idx].mean().item()
        assert absent[name] == pytest.approx(1 - rate)
        assert present[name] == pytest.approx(rate)
    single = lambda x: constant(-1.0, {"t": LABELS})(x)["t"]  # noqa: E731
    assert evaluate(single, ds, LABELS) == pytest.approx(absent["digits_0_4"])


@pytest.mark.parametrize("name", ["lenet5", "vgg"])
def test_evaluate_batch_size_sets_speed_not_result(data, name):
    torch.manual_seed(0)
    model = build_model(name, len(LABELS), data.in_channels, data.image_size).eval()
    train_single_task(model, data.train, LABELS, **FAST)
    accuracies = {bs: evaluate(model, data.test, LABELS, batch_size=bs) for bs in (7, 64, 512)}
    assert len(set(accuracies.values())) == 1, accuracies


def test_evaluate_restores_training_mode(data):
    model = lenet(data).train()
    evaluate(model, data.test, LABELS)
    assert model.training


def test_evaluate_multitask_rejects_outputs_that_do_not_match_tasks(data):
    single = lambda x: torch.zeros(len(x), len(LABELS))  # noqa: E731
    with pytest.raises(InputError, match="dict"):
        evaluate_multitask(single, data.test, TASKS)
    with pytest.raises(InputError, match="digits_5_9"):
        evaluate_multitask(constant(0.0, {"digits_0_4": LABELS}), data.test, TASKS)


def weights_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_cache_hit_returns_identical_weights_without_training(data, tmp_path, monkeypatch):
    first = get_or_train(data, "lenet5", LABELS, cache=tmp_path, **FAST)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"

    def no_training(*args, **kwargs):
        raise AssertionError("a cache hit must not train")

    loads = []
    real_load = torch.load

    def spy_load(*args, **kwargs):
        loads.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_single_task", no_training)
    monkeypatch.setattr(torch, "load", spy_load)
    second = get_or_train(data, "lenet5", LABELS, cache=tmp_path, **FAST)
    assert weights_equal(first, second)
    assert loads and all(kw.get("weights_only") is True for kw in loads)
    assert not weights_equal(first, lenet(data))


def test_cache_entry_loads_with_weights_only(data, tmp_path):
    get_or_train(data, "lenet5", LABELS, cache=tmp_path, **FAST)
    (path,) = tmp_path.iterdir()
    entry = torch.load(path, weights_only=True)
    assert set(entry) == {"config", "state_dict"}


def test_cache_key_covers_the_config(data, tmp_path):
    get_or_train(data, "lenet5", LABELS, cache=tmp_path, **FAST)
    get_or_train(data, "lenet5", LABELS, cache=tmp_path, **{**FAST, "lr": 1e-3})
    get_or_train(data, "lenet5", TASKS["digits_5_9"], cache=tmp_path, **FAST)
    other = load_dataset("tiled-digits", seed=1, n_train=600, n_calib=20, n_test=400)
    get_or_train(other, "lenet5", LABELS, cache=tmp_path, **FAST)
    assert len(list(tmp_path.iterdir())) == 4


def test_cache_dir_defaults_to_environment(data, tmp_path, monkeypatch):
    monkeypatch.setenv("PAMFX_CACHE", str(tmp_path / "env-cache"))
    get_or_train(data, "lenet5", LABELS, **FAST)
    assert len(list((tmp_path / "env-cache").glob("*.pt"))) == 1


def test_failed_save_leaves_no_file(data, tmp_path, monkeypatch):
    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        get_or_train(data, "lenet5", LABELS, cache=tmp_path, **FAST)
    assert list(tmp_path.iterdir()) == []
