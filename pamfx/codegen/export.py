"""ONNX export of emitted modules, simplified with onnxsim and checked with onnxruntime (docs/design.md §6).

`export_onnx` writes one module: its input is named after the module's placeholder and has a
dynamic batch axis ``"batch"``; a ``{task: tensor}`` output becomes one named ONNX output per task,
in order (a plain tensor output is named ``"output"``). The module is exported in eval mode.

Exporter (``exporter=``): ``"torchscript"`` is torch.onnx's legacy tracer (``dynamo=False``),
``"dynamo"`` the torch.export-based one (needs onnxscript). Both run offline; the legacy one is
deprecated but some 30× faster on emitted modules (a fraction of a second against several
seconds), while only the dynamo one handles every emitted module (the legacy one loses the spatial
shape of a group of `ConstantChannels` feeding an adaptive pool). ``"auto"`` (default) tries the
legacy exporter first and falls back to the dynamo one when it fails or its model fails the check.

Nothing is written until the model has been exported, simplified and checked; it is then written
to a temporary file beside the target and renamed into place, so a failed export leaves neither
the target (an existing one is kept) nor a temporary file behind. `export_all` exports every task
combination of a merged network the same way, all files renamed into place together at the end,
``index.json`` last. Needs the ``export`` extra: ``pip install 'pamfx[export]'``.
"""
from __future__ import annotations

import importlib
import io
import json
import os
import re
import sys
import tempfile
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Literal

import numpy as np
import torch
from torch import fx, nn

from pamfx.analysis.channel_order import group_orders
from pamfx.analysis.cost import cost, merged_cost
from pamfx.analysis.multitask_view import read_multitask
from pamfx.codegen.emit import emit_view
from pamfx.codegen.fusion import FusionCostModel
from pamfx.errors import ExportError, InputError, check_type
from pamfx.frontend import eval_mode
from pamfx.ir.task_set import TaskSet, TaskSpace
from pamfx.passes.fold_batchnorm import inference_view
from pamfx.progress import progress_bar

Exporter = Literal["auto", "torchscript", "dynamo"]
EXPORTERS: tuple[str, ...] = ("torchscript", "dynamo")
BATCH_AXIS = "batch"
INDEX_FILE = "index.json"


def _require(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ExportError(f"ONNX export needs the {name!r} package: pip install 'pamfx[export]'") from exc


@contextmanager
def _output_dropped_on_error() -> Iterator[None]:
    """Capture file descriptors 1 and 2; replay what was written on success, drop it on an error.

    The legacy exporter dumps its whole TorchScript graph to stdout from C++ when it fails; in
    ``"auto"`` mode that failure is handled (the dynamo exporter takes over) and the dump is noise.
    """
    streams = {1: sys.stdout, 2: sys.stderr}
    with ExitStack() as stack:
        captured = {fd: stack.enter_context(tempfile.TemporaryFile()) for fd in streams}
        saved = {}
        for fd, stream in streams.items():
            stream.flush()
            saved[fd] = os.dup(fd)
            os.dup2(captured[fd].fileno(), fd)
        try:
            yield
        finally:
            for fd, stream in streams.items():
                stream.flush()
                os.dup2(saved[fd], fd)
                os.close(saved[fd])
        for fd, stream in streams.items():
            captured[fd].seek(0)
            stream.write(captured[fd].read().decode(errors="replace"))


def _outputs(module: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """The module's outputs as ``{name: array}``: a dict's keys, or ``"output"`` for one tensor."""
    with torch.no_grad():
        out = module(x)
    if isinstance(out, torch.Tensor):
        out = {"output": out}
    if not isinstance(out, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in out.items()):
        raise InputError(f"export needs a module returning a tensor or a dict of tensors, got {type(out).__name__}")
    return {k: v.detach().cpu().numpy() for k, v in out.items()}


def _input_name(module: nn.Module, outputs: list[str]) -> str:
    placeholders = [n.name for n in module.graph.nodes if n.op == "placeholder"] if isinstance(module, fx.GraphModule) else []
    if len(placeholders) > 1:
        raise InputError(f"export needs a module with one input, this one has {placeholders}")
    name = placeholders[0] if placeholders else "input"
    while name in outputs:
        name = "_" + name
    return name


def _export_torchscript(module: nn.Module, x: torch.Tensor, input_name: str, outputs: list[str]) -> Any:
    onnx = _require("onnx")
    buffer = io.BytesIO()
    with _output_dropped_on_error(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx\.")
        # emitted index_add targets are distinct channels by construction (and `_check` runs the model)
        warnings.filterwarnings("ignore", message=".*duplicated values in 'index' field", category=UserWarning)
        torch.onnx.export(
            module, (x,), buffer, dynamo=False, input_names=[input_name], output_names=outputs,
            dynamic_axes={name: {0: BATCH_AXIS} for name in [input_name, *outputs]},
        )
    return onnx.load_from_string(buffer.getvalue())


def _export_dynamo(module: nn.Module, x: torch.Tensor, input_name: str, outputs: list[str]) -> Any:
    _require("onnxscript")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*treespec, LeafSpec", category=FutureWarning)
        program = torch.onnx.export(
            module, (x,), dynamo=True, input_names=[input_name], output_names=outputs,
            dynamic_shapes=({0: torch.export.Dim(BATCH_AXIS)},), verbose=False,
        )
    return program.model_proto


_EXPORT = {"torchscript": _export_torchscript, "dynamo": _export_dynamo}


def _simplify(model: Any) -> Any:
    simplified, ok = _require("onnxsim").simplify(model)
    if not ok:
        raise ExportError("onnxsim could not validate the simplified model")
    return simplified


def _check(data: bytes, module: nn.Module, x: torch.Tensor, input_name: str, outputs: list[str], tolerance: float) -> None:
    """Run the ONNX model with onnxruntime on ``x`` and on a batch one larger; compare by output name."""
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    if names != outputs:
        raise ExportError(f"ONNX outputs are {names}, expected {outputs}")
    for batch in (x, torch.cat([x, x[:1]])):
        expected = _outputs(module, batch)
        got = session.run(outputs, {input_name: batch.detach().cpu().numpy()})
        for name, value in zip(outputs, got):
            if value.shape != expected[name].shape:
                raise ExportError(f"ONNX output {name!r} has shape {value.shape}, the module's {expected[name].shape}")
            if not np.allclose(value, expected[name], rtol=tolerance, atol=tolerance):
                error = float(np.abs(value - expected[name]).max())
                raise ExportError(
                    f"ONNX output {name!r} differs from the module by up to {error:.3g} on a batch of "
                    f"{len(batch)} (tolerance {tolerance:g})"
                )


def _summary(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else ""
    return f"{type(exc).__name__}: {first[:200]}{'...' if len(first) > 200 else ''}"


def _onnx_bytes(
    module: nn.Module,
    x: torch.Tensor,
    *,
    simplify: bool,
    check: bool,
    exporter: Exporter,
    tolerance: float,
    input_name: str | None = None,
) -> bytes:
    """The serialised ONNX model of ``module``: exported, simplified and checked, in memory."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"example_input must be a torch.Tensor, got {type(x).__name__}")
    if exporter != "auto" and exporter not in EXPORTERS:
        raise InputError(f"exporter must be 'auto' or one of {list(EXPORTERS)}, got {exporter!r}")
    for dependency, needed in (("onnx", True), ("onnxsim", simplify), ("onnxruntime", check)):
        if needed:
            _require(dependency)
    failures: list[str] = []
    last: Exception | None = None
    with eval_mode(module):
        outputs = list(_outputs(module, x))
        input_name = input_name or _input_name(module, outputs)
        for name in EXPORTERS if exporter == "auto" else (exporter,):
            try:
                model = _EXPORT[name](module, x, input_name, outputs)
                data = (_simplify(model) if simplify else model).SerializeToString()
                if check:
                    _check(data, module, x, input_name, outputs, tolerance)
                return data
            except Exception as exc:  # the exporters raise many types; each is one failed attempt
                failures.append(f"{name} exporter: {exc if isinstance(exc, ExportError) else _summary(exc)}")
                last = exc
    raise ExportError("ONNX export failed: " + "; ".join(failures)) from last


class _AtomicFiles:
    """Files written under temporary names beside their targets and renamed into place on success.

    On leaving the ``with`` block without an error every file is renamed, in the order written;
    on an error (or a failed rename) the temporary files not yet renamed are removed.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []

    def write(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        self._staged.append((Path(tmp), path))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def __enter__(self) -> "_AtomicFiles":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            while exc_type is None and self._staged:
                tmp, path = self._staged[0]
                os.replace(tmp, path)
                self._staged.pop(0)
        finally:
            for tmp, _ in self._staged:
                tmp.unlink(missing_ok=True)


def _target(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a directory, not a file to write the ONNX model to")
    if not path.parent.is_dir():
        raise InputError(f"directory {path.parent} does not exist")
    return path


def export_onnx(
    module: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike,
    *,
    simplify: bool = True,
    check: bool = True,
    exporter: Exporter = "auto",
    tolerance: float = 1e-4,
) -> Path:
    """Export an emitted module (or any one-input module) to the ONNX file ``path``; return the path.

    ``simplify`` runs onnxsim; ``check`` runs the model with onnxruntime on ``example_input`` (and
    on a batch one larger) and raises `ExportError` where an output differs from the module's by
    more than ``tolerance`` (absolute and relative). On any failure no file is left behind.
    """
    check_type(module, nn.Module, "export_onnx: module")
    target = _target(path)
    data = _onnx_bytes(module, example_input, simplify=simplify, check=check, exporter=exporter, tolerance=tolerance)
    with _AtomicFiles() as files:
        files.write(target, data)
    return target


def combination_files(tasks: TaskSpace) -> dict[TaskSet, str]:
    """A safe, distinct file name for every task combination, e.g. ``A&B`` → ``A+B.onnx``.

    Characters other than letters, digits, ``_``, ``-`` and ``.`` become ``_``; a name too long for
    a file system becomes ``combination_<bitmask>.onnx``. Where two names would then coincide
    (case-insensitively, as on some file systems) every task's part is prefixed with its index,
    which makes them distinct: no combination's file can overwrite another's.
    """
    stems = [re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".")[:40] or "task" for name in tasks]
    files = _files(tasks, stems)
    if len({f.lower() for f in files.values()}) < len(files):
        files = _files(tasks, [f"{i}_{s}" for i, s in enumerate(stems)])
    return files


def _files(tasks: TaskSpace, stems: list[str]) -> dict[TaskSet, str]:
    files = {}
    for combo in tasks.combinations():
        name = "+".join(s for i, s in enumerate(stems) if combo >> i & 1) + ".onnx"
        files[combo] = name if len(name) <= 200 else f"combination_{combo}.onnx"
    return files


def export_all(
    merged: fx.GraphModule,
    example_input: torch.Tensor,
    out_dir: str | os.PathLike,
    *,
    simplify: bool = True,
    check: bool = True,
    exporter: Exporter = "auto",
    tolerance: float = 1e-4,
    progress: bool = True,
    fuse: str | FusionCostModel = "auto",
    batch: int = 1,
    fold_batchnorm: bool | None = None,
) -> dict[str, Any]:
    """Export the emitted module of every task combination of ``merged`` into ``out_dir``.

    The modules are `pamfx.emit`'s fast form, emitted from one inference copy of ``merged`` (eval
    mode, BatchNorms folded unless ``fold_batchnorm=False``; ``fuse`` and ``batch`` as in `emit`).
    Writes one ONNX file per combination (`combination_files`) and ``index.json``: the tasks, the
    input, and per combination (keyed by its label, e.g. ``A&B``) its tasks, file, file size in
    bytes, FLOPs, MACs and parameters of its subgraph (`pamfx.cost` of the inference network) and
    the FLOPs the exported module executes (more than its subgraph's where the cost model fused
    masked connections). Returns the index. Files appear only once every combination has been
    exported (and checked); ``index.json`` is renamed into place last.
    """
    if not isinstance(example_input, torch.Tensor):
        raise InputError(f"example_input must be a torch.Tensor, got {type(example_input).__name__}")
    with eval_mode(merged):
        view = inference_view(read_multitask(merged), fold_batchnorm)
    orders = group_orders(view)
    tasks = view.tasks
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    files = combination_files(tasks)
    input_name = _input_name(merged, list(tasks.names))
    options = dict(simplify=simplify, check=check, exporter=exporter, tolerance=tolerance, input_name=input_name)
    combinations: dict[str, Any] = {}
    with _AtomicFiles() as staged:
        for combo in progress_bar(tasks.combinations(), desc="ONNX export", unit="combination", enabled=progress, leave=True):
            module = emit_view(view, combo, fuse=fuse, batch=batch, orders=orders)
            data = _onnx_bytes(module, example_input, **options)
            staged.write(out / files[combo], data)
            c = merged_cost(view, combo)
            combinations[tasks.label(combo)] = {
                "tasks": tasks.ordered_names(combo), "file": files[combo], "bytes": len(data), "flops": c.flops, "macs": c.macs,
                "params": c.params, "executed_flops": cost(module).flops,
            }
        index = {
            "tasks": list(tasks.names),
            "input": {"name": input_name, "shape": [BATCH_AXIS, *example_input.shape[1:]]},
            "cost": "per sample; flops = 2 x MACs of conv and linear ops (pamfx.cost) of the subgraph, executed_flops of the exported module; bytes = file size",
            "combinations": combinations,
        }
        staged.write(out / INDEX_FILE, (json.dumps(index, indent=2) + "\n").encode())
    return index
