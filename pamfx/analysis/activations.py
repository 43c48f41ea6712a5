"""Neuron-layer activations of the K single-task networks on calibration data (Sec. 4.5.2, docs/design.md §3).

For every neuron layer L_i and task t, the value of ``structures[t].output_node`` in
``graphs[t]`` — for a residual block the block output after the addition (Sec. 4.5.3) — is
summarised per sample and per channel, batch by batch, so that only the per-neuron summaries the
estimator needs are ever held. Merged-layer features are the concatenation over tasks, ordered as
``NeuronLayer.origins``.

A conv channel's per-sample representation (``conv_summary``):

- ``"mean"`` (default): global average pool — one value per channel, the quantity a following
  global pooling or a pruning criterion sees; it keeps σ² and normalisation identical for conv
  and linear layers and the estimator's cost independent of H·W;
- ``"max"``: global max pool;
- ``"map"``: the full H×W map (P = H·W values per channel; D sums over them).

The calibration set is whatever the caller passes (a tensor or any iterable of batches — a
DataLoader); pamfx never reads a split on its own. Networks run in eval mode under
``torch.no_grad``; their previous train/eval state is restored afterwards.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal, Mapping, Sequence

import torch
from torch import fx

from pamfx.errors import InputError, MismatchError, check_type
from pamfx.frontend import eval_mode
from pamfx.ir.neuron_layer import LayerMap, NeuronLayer
from pamfx.ir.task_set import TaskSpace
from pamfx.progress import progress_bar

ConvSummary = Literal["mean", "max", "map"]


@dataclass(frozen=True)
class LayerActivations:
    """Per-neuron summaries of each merged neuron layer on N calibration samples.

    ``features[layer]`` is [N, width] (one value per channel) or [N, width, P] (``"map"``), its
    channels in the merged order of ``NeuronLayer.origins``.
    """

    tasks: TaskSpace
    features: Mapping[str, torch.Tensor]
    conv_summary: ConvSummary
    num_samples: int

    def __getitem__(self, layer: str) -> torch.Tensor:
        try:
            return self.features[layer]
        except KeyError:
            raise InputError(f"no activations for layer {layer!r}; collected {list(self.features)}") from None


def build_extractor(graph: fx.GraphModule, node_names: Sequence[str]) -> fx.GraphModule:
    """A GraphModule that returns the values of ``node_names`` (a tuple) instead of the network output.

    Shares parameters with ``graph``. Each requested value is cloned right where it is computed, so
    a later in-place op (``ReLU(inplace=True)``, ``x += ...``) cannot alter it; nodes not needed
    for the requested values are removed.
    """
    nodes = {node.name: node for node in graph.graph.nodes}
    missing = [n for n in node_names if n not in nodes]
    if missing:
        raise InputError(f"graph has no node(s) {missing}")
    wanted = set(node_names)
    new_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    captured: dict[str, fx.Node] = {}
    for node in graph.graph.nodes:
        if node.op == "output":
            continue
        env[node] = new_graph.node_copy(node, lambda n: env[n])
        if node.name in wanted:
            captured[node.name] = new_graph.call_function(torch.clone, (env[node],))
    new_graph.output(tuple(captured[n] for n in node_names))
    extractor = fx.GraphModule(graph, new_graph)
    extractor.graph.eliminate_dead_code()
    extractor.recompile()
    return extractor


def _batches(calibration_inputs: torch.Tensor | Iterable, batch_size: int) -> tuple[Iterator[torch.Tensor], int | None]:
    if isinstance(calibration_inputs, torch.Tensor):
        if calibration_inputs.ndim == 0 or calibration_inputs.shape[0] == 0:
            raise InputError(f"calibration_inputs is empty (shape {list(calibration_inputs.shape)})")
        return iter(calibration_inputs.split(batch_size)), math.ceil(calibration_inputs.shape[0] / batch_size)
    try:
        total = len(calibration_inputs)  # type: ignore[arg-type]
    except TypeError:
        total = None

    def unpack() -> Iterator[torch.Tensor]:
        for k, batch in enumerate(calibration_inputs):
            if isinstance(batch, (tuple, list)) and batch:
                batch = batch[0]
            if not isinstance(batch, torch.Tensor):
                raise InputError(
                    f"calibration_inputs batch {k} is a {type(batch).__name__}; expected a tensor or a "
                    f"(inputs, ...) tuple"
                )
            yield batch

    return unpack(), total


def _summarise(value: torch.Tensor, conv_summary: ConvSummary) -> torch.Tensor:
    if value.ndim == 2:
        return value
    flat = value.reshape(value.shape[0], value.shape[1], -1)
    if conv_summary == "mean":
        return flat.mean(dim=2)
    if conv_summary == "max":
        return flat.amax(dim=2)
    return flat


def _device_of(module: torch.nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


def collect_activations(
    layers: LayerMap,
    calibration_inputs: torch.Tensor | Iterable,
    *,
    conv_summary: ConvSummary = "mean",
    batch_size: int = 256,
    layer_names: Sequence[str] | None = None,
    progress: bool = True,
) -> LayerActivations:
    """Run the K networks on the calibration inputs and summarise every neuron layer's output.

    One extractor GraphModule per network returns all requested layer outputs in one pass per
    batch; a DataLoader is iterated once (all networks see the same batches). Raises `InputError`
    on NaN/inf activations (naming layer, task and channel) and `MismatchError` when a node's
    channel count differs from the layer structure.
    """
    check_type(layers, LayerMap, "layers")
    if conv_summary not in ("mean", "max", "map"):
        raise InputError(f"conv_summary must be 'mean', 'max' or 'map', got {conv_summary!r}")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    selected = [layers[n] for n in layer_names] if layer_names is not None else list(layers)
    tasks = layers.tasks
    missing = [t for t in tasks.names if t not in layers.graphs]
    if missing:
        raise InputError(f"layers.graphs has no network for task(s) {missing}")
    extractors = {
        t: build_extractor(layers.graphs[t], [layer.structures[t].output_node for layer in selected])
        for t in tasks.names
    }
    collected: dict[tuple[str, str], list[torch.Tensor]] = {(l.name, t): [] for l in selected for t in tasks.names}
    batches, total = _batches(calibration_inputs, batch_size)
    num_samples = 0
    with torch.no_grad(), eval_mode(*extractors.values()):
        for i, batch in enumerate(progress_bar(batches, total=total, desc="activations", enabled=progress)):
            _check_batch(i, batch, layers.example_input)
            num_samples += batch.shape[0]
            for task, extractor in extractors.items():
                outputs = extractor(batch.to(_device_of(extractor)))
                for layer, value in zip(selected, outputs):
                    collected[(layer.name, task)].append(_summarise(value, conv_summary).float().cpu())
    if num_samples == 0:
        raise InputError("calibration_inputs yielded no samples")
    features = {layer.name: _merge(layer, tasks, collected) for layer in selected}
    return LayerActivations(tasks, features, conv_summary, num_samples)


def _check_batch(i: int, batch: torch.Tensor, example: torch.Tensor) -> None:
    """Raise `InputError` unless calibration batch ``i`` holds samples shaped like the example input."""
    if tuple(batch.shape[1:]) != tuple(example.shape[1:]) or batch.dtype != example.dtype:
        raise InputError(
            f"calibration batch {i} has samples of shape {tuple(batch.shape[1:])} ({batch.dtype}); the networks were "
            f"organised on {tuple(example.shape[1:])} ({example.dtype})"
        )


def _merge(layer: NeuronLayer, tasks: TaskSpace, collected: Mapping[tuple[str, str], list[torch.Tensor]]) -> torch.Tensor:
    """Concatenate the tasks' summaries of one layer and order the channels as ``layer.origins``."""
    per_task, offsets, offset = [], {}, 0
    for task in tasks.names:
        value = torch.cat(collected[(layer.name, task)])
        structure = layer.structures[task]
        if value.shape[1] != structure.width:
            raise MismatchError(
                f"layer {layer.name!r}, task {task!r}: node {structure.output_node!r} has {value.shape[1]} channels, "
                f"the layer structure says {structure.width}"
            )
        bad = ~torch.isfinite(value)
        if bad.any():
            sample, channel = (int(v) for v in torch.nonzero(bad)[0][:2])
            raise InputError(
                f"layer {layer.name!r}, task {task!r}: activations of node {structure.output_node!r} contain NaN/inf "
                f"(first at calibration sample {sample}, channel {channel})"
            )
        per_task.append(value)
        offsets[task] = offset
        offset += value.shape[1]
    if len({v.shape[2:] for v in per_task}) > 1:
        raise MismatchError(
            f"layer {layer.name!r}: the tasks' feature maps differ in size {[list(v.shape[2:]) for v in per_task]}; "
            f"conv_summary='map' needs equal H×W"
        )
    index = torch.tensor([offsets[task] + j for task, j in layer.origins], dtype=torch.long)
    return torch.cat(per_task, dim=1).index_select(1, index)
