"""The ``node.meta`` keys of pamfx's IR: one place that names them all (docs/design.md, "The IR").

A merged multitask GraphModule carries its IR in ``node.meta``; every pamfx module reads and
writes these keys through the constants below. Types and carriers:

- ``META_TASKS`` (`TaskSpace`): the output node of a merged network; its presence marks one.
- ``META_LAYER`` (`LayerTaskSets`): every node whose value lies in a hidden neuron layer — task
  set and origin of each channel. Nodes a foreign pass adds may lack it; they inherit their
  layer's record when the IR is read.
- ``META_MASK`` (bool tensor [out, in]): dense producers and task heads — the connection mask
  τ_out ⊆ τ_in over channels (a head's rows repeat the channels its task may read).
- ``META_HEAD`` (str): a task head — the task whose output it computes.
- ``META_DEPTHWISE`` (bool): a depthwise conv, which stays depthwise even when pruned to one
  channel (where groups = in = out = 1 would read as a dense conv).
- ``META_CONV_GROUPS`` (tuple[tuple[int, ...], tuple[int, ...]]): a dense op whose connections
  stay within blocks — a merged grouped conv, or a layer merged with ``cross_origin`` absent; the
  block id (conv group, and origin network where absent) of every output and every input channel.
- ``META_GROUP`` (tuple[str, tuple[tuple[int, tuple[int, ...]], ...]]): emitted modules — the
  layer, and the groups (task set, merged channel indices) a node's value holds, in channel order.
- ``META_FUSED`` / ``META_DECLINED`` (dict): emitted dense calls that multiply masked zeros or
  serve several groups, or dense ops planned exactly although fusion was considered — layer,
  groups, edge_flops, dense_flops, reason.
"""
from __future__ import annotations

META_TASKS = "pamfx_tasks"
META_LAYER = "pamfx_layer"
META_MASK = "pamfx_mask"
META_HEAD = "pamfx_head"
META_DEPTHWISE = "pamfx_depthwise"
META_CONV_GROUPS = "pamfx_conv_groups"
META_GROUP = "pamfx_group"
META_FUSED = "pamfx_fused"
META_DECLINED = "pamfx_fusion_declined"

ALL_KEYS = (META_TASKS, META_LAYER, META_MASK, META_HEAD, META_DEPTHWISE, META_CONV_GROUPS, META_GROUP, META_FUSED, META_DECLINED)
