"""Latency of every task combination: PAM's emitted module against baseline 1's networks.

FLOPs are what the comparison optimises; latency is what a user pays. `measure_latency` times, for
every task combination S, what each method would ship for S:

- a merged network (PAM, MTZ): its emitted module ``pamfx.emit(network, S)``;
- baseline 1 (a ``{task: network}`` mapping of single-task networks): the emitted module of every
  task of S, run one after another;

in eager torch (``torch.set_num_threads(1)``, inference mode) and in onnxruntime (the files of
``pamfx.export_all``, one intra-op and one inter-op thread), at every batch size asked for. Each
module's outputs are first checked against its network's (the merged network, masked, runs every
task; emission must not change the tasks of S). Timing is interleaved: after warm-up, each repeat
runs every method once, in an order rotated from repeat to repeat, so that load on the machine
affects the methods alike; the figure is the median over the repeats of one forward of the batch.

The clock is by default the timing thread's CPU time (``clock="cpu"``, `time.thread_time`): with
one thread, torch and onnxruntime compute in the calling thread, so on an idle machine it equals
wall time, and on a shared one it leaves out the time the thread waits while other processes run.
On this project's 2-core machine shared by several jobs, wall-time medians of one module swung
from 1.9 to 10 ms from block to block while its CPU-time medians stayed within 5 %.
``clock="wall"`` (`time.perf_counter`) measures wall time, for a dedicated machine.

`seed_latency` writes one seed's measurements into the comparison's JSON results
(`pamfx.experiment`): per combination the seconds (``latency[method][backend][batch]``) and the
gain of PAM over every other method (``latency_gain[method][backend][batch]`` = t_method / t_pam);
`summarise_latency` adds to the summary their mean ± std over the seeds with the average and peak
gain over combinations.
"""
from __future__ import annotations

import contextlib
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import fx

from pamfx.codegen.emit import emit
from pamfx.codegen.export import export_all
from pamfx.errors import ExportError, InputError, IRError
from pamfx.frontend import eval_mode
from pamfx.ir.task_set import TaskSet, TaskSpace
from pamfx.progress import progress_bar

BACKENDS = ("torch", "onnxruntime")
CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.thread_time, "wall": time.perf_counter}
#: ``{combination: {method: {backend: {batch: seconds}}}}``
Latency = dict[TaskSet, dict[str, dict[str, dict[int, float]]]]
#: What a method ships: one merged network, or baseline 1's ``{task: single-task network}``.
Networks = Mapping[str, fx.GraphModule | Mapping[str, fx.GraphModule]]
PROTOCOL = ("median seconds of one forward of the whole batch over interleaved repeats after warm-up, on the clock "
            "of config latency_clock ('cpu': the timing thread's CPU time; 'wall': wall time); torch: "
            "pamfx.emit modules, 1 thread, inference mode; onnxruntime: pamfx.export_all files, 1 intra-op thread; "
            "baseline 1: its networks of the combination's tasks run one after another")
TOLERANCE = 1e-4

#: What a timed call runs: a function of the input batch.
Runner = Callable[[Any], Any]
#: Per method and combination: the (network, combination of that network) pairs run one after another.
Parts = dict[str, dict[TaskSet, list[tuple[fx.GraphModule, TaskSet]]]]
_SINGLE = 1  # the combination of a single-task network: its one task


def check_backends(backends: Sequence[str], clock: str = "cpu") -> None:
    """Raise `InputError` for an unknown backend or clock, or a backend whose packages are not installed."""
    if clock not in CLOCKS:
        raise InputError(f"latency clock must be one of {list(CLOCKS)}, got {clock!r}")
    if clock == "cpu" and time.get_clock_info("thread_time").resolution > 1e-6:
        raise InputError("latency clock 'cpu': this platform's thread clock is too coarse; use 'wall'")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise InputError(f"latency backends must be a non-empty list of {list(BACKENDS)}, got {list(backends)!r}")
    if "onnxruntime" in backends:
        missing = [m for m in ("onnx", "onnxruntime", "onnxsim") if importlib.util.find_spec(m) is None]
        if missing:
            raise InputError(f"latency backend 'onnxruntime' needs {missing}: pip install 'pamfx[export]', "
                             "or time eager torch only (latency_backends = [\"torch\"])")


def _parts(networks: Networks, tasks: TaskSpace) -> Parts:
    """What every method runs for every combination (`Parts`)."""
    parts: Parts = {}
    for method, network in networks.items():
        if isinstance(network, fx.GraphModule):
            parts[method] = {c: [(network, c)] for c in tasks.combinations()}
        elif isinstance(network, Mapping) and set(network) == set(tasks):
            parts[method] = {c: [(network[t], _SINGLE) for t in tasks.ordered_names(c)] for c in tasks.combinations()}
        else:
            raise InputError(f"latency: method {method!r} must give a merged GraphModule or one network per task "
                             f"of {list(tasks)}, got {type(network).__name__}")
    return parts


def _close(got: Any, expected: torch.Tensor, what: str, error: type[Exception]) -> None:
    got = torch.as_tensor(np.asarray(got)) if not isinstance(got, torch.Tensor) else got
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=TOLERANCE, atol=TOLERANCE):
        gap = (got - expected).abs().max().item() if got.shape == expected.shape else f"shape {tuple(got.shape)}"
        raise error(f"latency: {what} differs from its network's output (max error {gap}); refusing to time it")


def _torch_runners(parts: Parts, x: torch.Tensor) -> dict[str, dict[TaskSet, Runner]]:
    """Emitted modules, checked against their networks on ``x``, as one runner per method and combination."""
    emitted: dict[tuple[int, TaskSet], fx.GraphModule] = {}
    runners: dict[str, dict[TaskSet, Runner]] = {}
    with torch.inference_mode():
        for method, combos in parts.items():
            runners[method] = {}
            for combo, pieces in combos.items():
                modules = []
                for network, sub in pieces:
                    key = (id(network), sub)
                    if key not in emitted:
                        module = emitted[key] = emit(network, sub).eval()
                        reference, out = network(x), module(x)
                        for task in out:
                            _close(out[task], reference[task], f"{method}'s emitted module for task {task!r}", IRError)
                    modules.append(emitted[key])
                runners[method][combo] = (lambda ms: lambda b: [m(b) for m in ms])(modules)
    return runners


def _ort_runners(parts: Parts, x: torch.Tensor, folder: Path, progress: bool) -> dict[str, dict[TaskSet, Runner]]:
    """onnxruntime sessions of `export_all`'s files, checked against the networks on ``x``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sessions: dict[int, dict[TaskSet, Any]] = {}
    runners: dict[str, dict[TaskSet, Runner]] = {}
    for method, combos in parts.items():
        runners[method] = {}
        for combo, pieces in combos.items():
            chosen = []
            for network, sub in pieces:
                if id(network) not in sessions:
                    out = folder / f"{len(sessions)}"
                    index = export_all(network, x[:1], out, progress=progress)
                    tasks = TaskSpace(tuple(index["tasks"]))
                    sessions[id(network)] = {
                        tasks.select(entry["tasks"]): (ort.InferenceSession(str(out / entry["file"]), options,
                                                                            providers=["CPUExecutionProvider"]),
                                                       index["input"]["name"], entry["tasks"])
                        for entry in index["combinations"].values()
                    }
                    with torch.inference_mode():
                        reference = network(x)
                    for session, name, names in sessions[id(network)].values():
                        for task, value in zip(names, session.run(names, {name: x.numpy()})):
                            _close(value, reference[task], f"{method}'s ONNX model for task {task!r}", ExportError)
                chosen.append(sessions[id(network)][sub])
            runners[method][combo] = (lambda cs: lambda b: [s.run(n, {i: b}) for s, i, n in cs])(chosen)
    return runners


def interleaved_medians(runners: Mapping[str, Callable[[], Any]], repeats: int, warmup: int,
                        clock: Callable[[], float] = time.thread_time) -> dict[str, float]:
    """Median seconds on ``clock`` of each runner, run in turn (order rotated every repeat) after
    ``warmup`` runs of each."""
    names = list(runners)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(warmup):
        for name in names:
            runners[name]()
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = clock()
            runners[name]()
            samples[name].append(clock() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def measure_latency(
    networks: Networks,
    tasks: TaskSpace,
    example: torch.Tensor,
    *,
    batches: Sequence[int] = (1, 8),
    backends: Sequence[str] = BACKENDS,
    repeats: int = 20,
    warmup: int = 3,
    clock: str = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> Latency:
    """Median seconds per forward of every method for every combination, backend and batch size.

    ``networks`` maps a method to its merged network or to baseline 1's ``{task: network}``;
    ``example`` is one input (its batch size is ignored); inputs are drawn with ``seed``. ``clock``:
    ``"cpu"`` (the timing thread's CPU time) or ``"wall"`` (see the module's docstring).
    """
    check_backends(backends, clock)
    if not batches or any(not isinstance(b, int) or b < 1 for b in batches):
        raise InputError(f"latency batches must be positive ints, got {list(batches)!r}")
    if repeats < 1 or warmup < 0:
        raise InputError(f"latency needs repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    parts = _parts(networks, tasks)
    generator = torch.Generator().manual_seed(seed)
    inputs = {b: torch.randn((b, *example.shape[1:]), generator=generator, dtype=example.dtype) for b in batches}
    check = inputs[max(batches)]
    result: Latency = {c: {m: {b: {} for b in backends} for m in parts} for c in tasks.combinations()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    networks_of = [n for net in networks.values() for n in ([net] if isinstance(net, fx.GraphModule) else net.values())]
    try:
        with tempfile.TemporaryDirectory(prefix="pamfx-latency-") as folder, eval_mode(*networks_of):
            for backend in backends:
                if backend == "torch":
                    runners, feed = _torch_runners(parts, check), inputs
                else:
                    runners, feed = _ort_runners(parts, check, Path(folder), progress), {b: x.numpy() for b, x in inputs.items()}
                jobs = [(b, c) for b in batches for c in tasks.combinations()]
                with torch.inference_mode() if backend == "torch" else contextlib.nullcontext():
                    for batch, combo in progress_bar(jobs, desc=f"latency ({backend})", enabled=progress):
                        timed = {m: (lambda run, x: lambda: run(x))(runners[m][combo], feed[batch]) for m in parts}
                        for method, seconds in interleaved_medians(timed, repeats, warmup, CLOCKS[clock]).items():
                            result[combo][method][backend][batch] = seconds
    finally:
        torch.set_num_threads(threads)
    return result


# ------------------------------------------------------------------------------------------- results


def _gain(latency: Mapping[str, Any], method: str, reference: str = "pam") -> dict[str, dict[str, float]]:
    return {backend: {batch: seconds / latency[reference][backend][batch] for batch, seconds in times.items()}
            for backend, times in latency[method].items()}


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _across(trees: list[Any], reduce: Callable[[list[float]], Any]) -> Any:
    """``reduce`` applied leaf-wise across nested dicts of the same keys."""
    if isinstance(trees[0], dict):
        return {key: _across([t[key] for t in trees], reduce) for key in trees[0]}
    return reduce(trees)


def seed_latency(seed: dict[str, Any], latency: Latency, tasks: TaskSpace) -> dict[str, Any]:
    """Write one seed's `Latency` into its JSON results (`pamfx.experiment.seed_results`); return it.

    Per combination: ``latency`` (seconds) and ``latency_gain`` (t_method / t_pam, for every method
    but PAM); per seed: ``latency_gain`` per method, backend and batch, the average and peak over
    combinations, like the FLOPs gain.
    """
    for entry in seed["combinations"]:
        times = latency[tasks.select(entry["tasks"])]
        entry["latency"] = {m: {b: {str(n): s for n, s in per.items()} for b, per in by.items()} for m, by in times.items()}
        entry["latency_gain"] = {m: _gain(entry["latency"], m) for m in entry["latency"] if m != "pam"}
    seed["latency_gain"] = {
        m: _across([c["latency_gain"][m] for c in seed["combinations"]],
                   lambda v: {"average": statistics.fmean(v), "peak": max(v)})
        for m in seed["combinations"][0]["latency_gain"]
    }
    return seed


def summarise_latency(results: dict[str, Any]) -> dict[str, Any]:
    """Add to comparison ``results`` whose seeds carry `seed_latency` the mean ± std over the seeds of
    every combination's latency and latency gain, and of the average and peak gains; return it."""
    if not all("latency_gain" in seed for seed in results["seeds"]):
        raise InputError("summarise_latency: some seed of the results has no latency measurement")
    summary = results["summary"]
    for i, entry in enumerate(summary["combinations"]):
        for key in ("latency", "latency_gain"):
            entry[key] = _across([run["combinations"][i][key] for run in results["seeds"]], _stats)
    summary["latency_gain"] = _across([run["latency_gain"] for run in results["seeds"]], _stats)
    results["latency_protocol"] = PROTOCOL
    return results
