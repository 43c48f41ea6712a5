"""Single-task training, multi-label evaluation and a disk cache of trained zoo networks.

A task is a list of label indices of a multi-label data set (see `pamfx.data.task_split`); a
single-task network outputs one logit per label of its task. Training uses BCEWithLogits and Adam;
accuracy is the mean binary accuracy over the task's labels with logits thresholded at 0.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pamfx.atomic import atomic_path
from pamfx.data.tiled import TiledDigits
from pamfx.errors import InputError
from pamfx.progress import progress_bar
from pamfx.zoo.models import build_model

#: Bump when training changes meaning, so that cached networks go stale.
CACHE_VERSION = 2
CACHE_ENV = "PAMFX_CACHE"
DEFAULT_CACHE_DIR = ".pamfx-cache"

Logits = torch.Tensor | Mapping[str, torch.Tensor]


#: Default evaluation batch: it sets the speed, not the result (in eval mode the zoo models' outputs
#: are bitwise equal at 64 and 512); batches of 64 keep a conv's output in the CPU cache where 512
#: do not, 1.2–3× faster on the zoo models with 1 thread (`tools/bench_evaluate.py`).
EVAL_BATCH_SIZE = 64


def _check_labels(label_indices: Sequence[int], dataset: Dataset) -> list[int]:
    labels = [int(i) for i in label_indices]
    num_labels = dataset[0][1].numel()
    if not labels or len(set(labels)) != len(labels) or not all(0 <= i < num_labels for i in labels):
        raise InputError(f"label_indices must be distinct indices in [0, {num_labels}), got {list(label_indices)!r}")
    return labels


def train_single_task(
    model: nn.Module,
    dataset: Dataset,
    label_indices: Sequence[int],
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    progress: bool = True,
    desc: str = "train",
) -> list[float]:
    """Train ``model`` in place on the labels ``label_indices`` of ``dataset``; return each epoch's mean loss.

    ``dataset`` yields ``(image, labels)``; the model must output ``len(label_indices)`` logits.
    Adam with a cosine-annealed learning rate (from ``lr`` to 0 over the run), so the network ends
    settled rather than wherever constant-rate steps left it. The run is deterministic for a fixed
    ``seed`` and leaves the global RNG state untouched.
    """
    labels = _check_labels(label_indices, dataset)
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise InputError(f"epochs and batch_size must be >= 1 and lr > 0, got {epochs=}, {batch_size=}, {lr=}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs * len(loader), 1))
        loss_fn = nn.BCEWithLogitsLoss()
        model.train()
        epoch_losses = []
        with progress_bar(total=epochs * len(loader), desc=desc, enabled=progress) as bar:
            for epoch in range(epochs):
                total, count = 0.0, 0
                for x, y in loader:
                    logits = model(x)
                    if logits.shape != (len(x), len(labels)):
                        raise InputError(f"model outputs shape {tuple(logits.shape)}, expected "
                                         f"({len(x)}, {len(labels)}) for label_indices {labels}")
                    loss = loss_fn(logits, y[:, labels])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    total, count = total + loss.item() * len(x), count + len(x)
                    bar.update()
                    bar.set_postfix(epoch=epoch + 1, loss=f"{total / count:.4f}")
                epoch_losses.append(total / count)
    model.eval()
    return epoch_losses


@torch.no_grad()
def evaluate_multitask(
    module: Callable[[torch.Tensor], Logits],
    dataset: Dataset,
    tasks: Mapping[str, Sequence[int]],
    batch_size: int = EVAL_BATCH_SIZE,
) -> dict[str, float]:
    """Mean binary accuracy of every task in ``tasks`` (name → label indices) on ``dataset``.

    ``module`` maps a batch of images to ``{task_name: logits}`` (a merged network) or, when
    ``tasks`` has one task, to that task's logits tensor. An ``nn.Module`` is run in eval mode and
    its training flag is restored afterwards. ``batch_size`` sets the speed, not the result
    (`EVAL_BATCH_SIZE`).
    """
    labels = {name: _check_labels(idx, dataset) for name, idx in tasks.items()}
    if not labels:
        raise InputError("tasks must name at least one task")
    was_training = isinstance(module, nn.Module) and module.training
    if isinstance(module, nn.Module):
        module.eval()
    correct = dict.fromkeys(labels, 0)
    total = 0
    try:
        for x, y in DataLoader(dataset, batch_size=batch_size):
            out = module(x)
            if isinstance(out, torch.Tensor):
                if len(labels) != 1:
                    raise InputError(f"module returned one tensor but tasks names {len(labels)} tasks; "
                                     "return a dict {task_name: logits}")
                out = {next(iter(labels)): out}
            for name, idx in labels.items():
                if name not in out:
                    raise InputError(f"module output has no task {name!r}; it has {sorted(out)}")
                correct[name] += ((out[name] > 0) == (y[:, idx] > 0.5)).sum().item()
            total += len(x)
    finally:
        if was_training:
            module.train()
    return {name: correct[name] / (total * len(idx)) for name, idx in labels.items()}


def evaluate(
    model: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    label_indices: Sequence[int],
    batch_size: int = EVAL_BATCH_SIZE,
) -> float:
    """Mean binary accuracy of a single-task ``model`` on the labels ``label_indices`` of ``dataset``."""
    return evaluate_multitask(model, dataset, {"task": label_indices}, batch_size)["task"]


def cache_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder: ``path`` if given, else ``$PAMFX_CACHE``, else ``./.pamfx-cache``."""
    return Path(path if path is not None else os.environ.get(CACHE_ENV, DEFAULT_CACHE_DIR))


def cache_key(config: Mapping[str, Any]) -> str:
    """A stable hash of a JSON-serialisable training config."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:24]


def _save_atomic(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)


def get_or_train(
    data: TiledDigits,
    model_name: str,
    label_indices: Sequence[int],
    *,
    width: float = 1.0,
    epochs: int = 10,
    lr: float = 3e-3,
    batch_size: int = 32,
    seed: int = 0,
    cache: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> nn.Module:
    """A zoo model ``model_name`` trained on ``data.train`` for ``label_indices``, from the cache if possible.

    The cache entry is keyed by the data set's config, the model name and width, the labels and
    every training argument; it is written atomically and read with ``weights_only=True``. The
    model is built under ``seed``, so a cache hit and a fresh run give identical weights.
    """
    labels = _check_labels(label_indices, data.train)
    config = {"data": data.config, "model": model_name, "width": width, "labels": labels, "epochs": epochs,
              "lr": lr, "batch_size": batch_size, "seed": seed, "version": CACHE_VERSION}

    def build() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_model(model_name, len(labels), data.in_channels, data.image_size, width)

    model = build()
    path = cache_dir(cache) / f"{model_name}-{cache_key(config)}.pt"
    if path.exists():
        try:
            entry = torch.load(path, weights_only=True, map_location="cpu")
            if entry["config"] == config:
                model.load_state_dict(entry["state_dict"])
                model.eval()
                return model
        except Exception as exc:  # an unreadable or stale entry is retrained, not fatal
            warnings.warn(f"ignoring unreadable cache entry {path}: {exc}", stacklevel=2)
            model = build()
    train_single_task(model, data.train, labels, epochs, lr, batch_size, seed, progress,
                      desc=f"{model_name} labels {labels}")
    _save_atomic({"config": config, "state_dict": model.state_dict()}, path)
    return model
