"""pamfx: Pruning-Aware Merging of single-task networks into one multitask network, on torch.fx.

Pipeline (docs/design.md §1): ``trace`` → ``organise_layers`` → (``regroup``) → ``merge`` →
fine-tune / prune → ``emit`` one standalone module per task combination.
"""
from pamfx.analysis.cost import Cost, cost
from pamfx.analysis.channel_rules import OpCall, Role, register_channel_rule
from pamfx.analysis.layer_matching import organise_layers
from pamfx.analysis.layer_organisation import organise_graph
from pamfx.analysis.activations import LayerActivations, collect_activations
from pamfx.analysis.alpha_trace import RegroupTrace
from pamfx.analysis.multitask_view import read_multitask
from pamfx.analysis.mutual_information import MIEstimator, estimate_mi, mi_bounds
from pamfx.analysis.regroup import RegroupResult, regroup, regroup_features
from pamfx.codegen.emit import emit, fusion_report
from pamfx.codegen.export import export_all, export_onnx
from pamfx.codegen.fusion import FusionCostModel
from pamfx.codegen.runtime import MultitaskRuntime
from pamfx.errors import (
    ExportError,
    GroupingError,
    IRError,
    InputError,
    MismatchError,
    PamfxError,
    TraceError,
    UnsupportedOpError,
)
from pamfx.frontend import trace
from pamfx.ir import Grouping, LayerMap, NeuronLayer, TaskSpace
from pamfx.passes.merge import merge
from pamfx.passes.mtz import ZippedPair, mtz_merge
from pamfx.passes.select_channels import order_channels, select_channels, sort_channels
from pamfx.serialization import load, save

__version__ = "0.1.0"

__all__ = [
    "Cost",
    "ExportError",
    "Grouping",
    "FusionCostModel",
    "GroupingError",
    "IRError",
    "InputError",
    "LayerActivations",
    "LayerMap",
    "MIEstimator",
    "MismatchError",
    "MultitaskRuntime",
    "NeuronLayer",
    "OpCall",
    "PamfxError",
    "RegroupResult",
    "RegroupTrace",
    "Role",
    "TaskSpace",
    "TraceError",
    "UnsupportedOpError",
    "ZippedPair",
    "collect_activations",
    "cost",
    "emit",
    "export_all",
    "export_onnx",
    "estimate_mi",
    "fusion_report",
    "merge",
    "mi_bounds",
    "mtz_merge",
    "order_channels",
    "organise_graph",
    "organise_layers",
    "read_multitask",
    "regroup",
    "regroup_features",
    "load",
    "save",
    "register_channel_rule",
    "select_channels",
    "sort_channels",
    "trace",
]
