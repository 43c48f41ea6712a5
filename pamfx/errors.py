"""The exceptions pamfx raises for bad input; each names the model, node or argument at fault."""
from __future__ import annotations


class PamfxError(Exception):
    """Base class of every error pamfx raises on purpose."""


class TraceError(PamfxError):
    """A model could not be traced symbolically by torch.fx."""


class UnsupportedOpError(PamfxError):
    """A graph contains an op whose channel behaviour pamfx does not know."""


class MismatchError(PamfxError):
    """The K networks (or their inputs) do not match layer by layer."""


class GroupingError(PamfxError):
    """A grouping does not fit the neuron layers it is applied to."""


class InputError(PamfxError):
    """An argument (labels, activations, alpha, K, a path, ...) is out of range or malformed."""


class IRError(PamfxError):
    """A GraphModule carries no pamfx IR, or IR that contradicts its graph."""


class ExportError(PamfxError):
    """An ONNX export failed, or its model disagrees with the module on the example input."""


def check_type(value: object, expected: type | tuple[type, ...], what: str) -> None:
    """Raise `InputError` unless ``value`` is an ``expected``: public entry points check their
    arguments so that a wrong one is named, not met later as a raw AttributeError."""
    if not isinstance(value, expected):
        names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
        raise InputError(f"{what} must be a {names}, got {type(value).__name__}")
