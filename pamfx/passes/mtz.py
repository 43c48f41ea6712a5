"""Multi-Task Zipping (MTZ, He, Zhou & Thiele, NeurIPS 2018): baseline 2 of PAM (Sec. 4.6.1) as a merge pass.

The K networks are first merged under the ``origin`` grouping (no sharing), then zipped layer by
layer (Alg. 1 of MTZ, Sec. 2.3.4): in neuron layer l, a neuron P of the group already zipped (task
set τ_P) and a neuron Q of the next task k become one channel of task set τ_P ∪ {k}. Pairs are
chosen greedily by ascending functional difference ΔE (Eq. 2.14) and the zipped incoming weight is
the Hessian-weighted update f (Eq. 2.12, 2.16) over the layer-wise Hessian H = E[[x;1][x;1]ᵀ] of
the layer's input (a conv's unfolded patches, averaged over samples and positions). A short joint
fine-tune follows each layer when a training loader and loss are given. The result is an ordinary
pamfx multitask GraphModule (IR in ``node.meta``), so fine-tuning, pruning, ``cost`` and ``emit``
apply unchanged. ``docs/mtz.md`` derives every choice below.

- IR mapping of "weights from task-specific inputs stay task-specific" (Sec. 2.3.2.1): a zipped
  channel may read only channels whose task set contains its own (the connection rule), so those
  weights are removed; each side's weight is first compensated on the inputs it keeps by least
  squares (w_I + H_II⁻¹ H_IE w_E), and the error of removing them enters ΔE.
- Every task reads the same channel values in the merged network, so the per-task Hessians
  coincide (H_t = H); the zipped group's inverse Hessian is the sum of its tasks' (the issue's
  rule for K > 2), H_P⁻¹ = n_P H⁻¹, hence (H_P⁻¹ + H_Q⁻¹)⁻¹ = H / (n_P + n_Q) needs no inverse.
- The only inverse is the compensation solve, done with ``torch.linalg.solve`` on H_II + λI,
  λ = ``damping`` · mean(diag H_II): a singular H (dead or constant inputs) never yields NaN.
- BatchNorm right after a producer is folded into its weight and bias (Sec. 2.4.2.2); other
  per-channel modules of the layer (depthwise conv, later BatchNorms) read the zipped channel
  itself, where the update reduces to the same weighted average of the two sides.
- Residual blocks: layers joined by identity shortcuts are coupled; the first of them picks the
  pairs and the others zip the same pairs (the approximate method of Sec. 2.4.2.3); the producers
  of one layer (last conv and downsample) are zipped together as one neuron (ΔE summed).
- Differing widths: ⌊``zip_degree`` · min(|P|, |Q|)⌋ pairs for the first two tasks, min(|P|, |Q|)
  for each later task (it joins the zipped group, as in the authors' code); the rest stay exclusive.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from pamfx.analysis.activations import _batches, build_extractor
from pamfx.analysis.channel_rules import Role
from pamfx.analysis.layer_matching import organise_layers
from pamfx.analysis.layer_organisation import Submodules
from pamfx.analysis.multitask_view import MultitaskView, read_multitask
from pamfx.errors import InputError, UnsupportedOpError
from pamfx.ir.meta import META_LAYER, META_MASK
from pamfx.ir.neuron_layer import LayerMap, LayerTaskSets
from pamfx.ir.task_set import TaskSet, is_subset, popcount
from pamfx.passes.finetune import TaskLoss, finetune
from pamfx.passes.merge import merge
from pamfx.passes.module_surgery import channel_tensors, expand_mask
from pamfx.progress import progress_bar
from pamfx.passes.select_channels import select_channels

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class ZippedPair:
    """One zipped pair: channel ``merged`` (of the task being zipped in) became channel ``kept``.

    Channels are named by their origin ``(task, channel)`` in the original networks; ``cost`` is
    the pair's ΔE (for the later layers of a residual chain: of the pair their first layer chose).
    """

    layer: str
    kept: tuple[str, int]
    merged: tuple[str, int]
    cost: float


@dataclass
class _Producer:
    """A dense producer of the layer being zipped, its input and the BatchNorm folded into it."""

    node: fx.Node
    module: nn.Module
    source: str | None
    norm: nn.Module | None
    hessian: torch.Tensor | None = None


def _describe(node: fx.Node) -> str:
    return f"node {node.name!r} (submodule {node.target!r})"


def _norm_affine(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as y = a·x + c per channel (float64)."""
    a = norm.weight.detach().double() / torch.sqrt(norm.running_var.double() + norm.eps)
    return a, norm.bias.detach().double() - a * norm.running_mean.double()


def _set_norm(norm: nn.Module, c: int, scale: float, shift: float, mean: float, var: float) -> None:
    """Make channel ``c`` of an eval-mode BatchNorm compute scale·x + shift, with running stats (mean, var)."""
    with torch.no_grad():
        norm.running_mean[c] = mean
        norm.running_var[c] = var
        norm.weight[c] = scale * math.sqrt(var + norm.eps)
        norm.bias[c] = shift + scale * mean


def _check_norm(node: fx.Node, norm: nn.Module) -> None:
    if not norm.affine or not norm.track_running_stats:
        raise UnsupportedOpError(
            f"mtz: {_describe(node)}: a BatchNorm without affine parameters or running statistics cannot hold "
            f"a zipped channel"
        )


def compensate(
    hessian: torch.Tensor, rows: torch.Tensor, own: torch.Tensor, keep: torch.Tensor, n: int, damping: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares targets on the kept features and the error of dropping the others, per row.

    Rows read features ``own`` (bool); the zipped channel may read only ``keep`` ⊆ own. Over the
    input Hessian H, the best weight on I = keep is v = w_I + (H_II + λI)⁻¹ H_IE w_E (E = own − keep,
    λ = ``damping`` · mean diag H_II), and dropping E costs w_Eᵀ(H_EE − H_EI H_II⁻¹ H_IE)w_E, here
    under the Hessian H / n of a side of n tasks. Returns ``(v [rows, |I|], cost [rows])``.
    """
    drop = own & ~keep
    v = rows[:, keep].clone()
    if not drop.any():
        return v, rows.new_zeros(rows.shape[0])
    h_ii = hessian[keep][:, keep]
    ridge = damping * h_ii.diagonal().mean().clamp_min(1e-12)
    rhs = hessian[keep][:, drop] @ rows[:, drop].T
    solved = torch.linalg.solve(h_ii + ridge * torch.eye(h_ii.shape[0], dtype=hessian.dtype), rhs)
    w_e = rows[:, drop]
    residual = ((w_e @ hessian[drop][:, drop]) * w_e).sum(1) - (rhs * solved).sum(0)
    return v + solved.T, residual.clamp_min(0) / n


class _Zipper:
    def __init__(self, gm: fx.GraphModule, calib, batch_size: int, damping: float, zip_degree: float):
        self.gm = gm
        self.calib = calib
        self.batch_size = batch_size
        self.damping = damping
        self.zip_degree = zip_degree
        self.tasks = read_multitask(gm).tasks
        self.hessians: dict[str, list[torch.Tensor]] = {}  # per layer; its inputs do not change while it is zipped

    # -- the layer's producers and their input Hessians -----------------------------------------
    def producers(self, view: MultitaskView, layer: str) -> list[_Producer]:
        modules = Submodules(self.gm)
        by_name = {n.name: n for n in self.gm.graph.nodes}
        out = []
        for name in view.layers.layer(layer).producers:
            node = by_name[name]
            module = modules[node.target]
            if isinstance(module, nn.Conv2d) and (module.padding_mode != "zeros" or isinstance(module.padding, str)):
                raise UnsupportedOpError(
                    f"mtz: {_describe(node)}: only numeric zero padding is supported (got padding={module.padding!r}, "
                    f"padding_mode={module.padding_mode!r})"
                )
            users = list(node.users)
            norm = None
            if len(users) == 1 and users[0].op == "call_module" and isinstance(modules[users[0].target], BATCHNORMS):
                norm = modules[users[0].target]
                _check_norm(users[0], norm)
            out.append(_Producer(node, module, view.layers.nodes[name].source, norm))
        return out

    def features(self, producer: _Producer, x: torch.Tensor) -> torch.Tensor:
        """The producer's input features per output position: [positions, F] (+ a column of ones)."""
        m = producer.module
        if isinstance(m, nn.Conv2d):
            try:
                x = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
            except RuntimeError as e:
                raise UnsupportedOpError(f"mtz: {_describe(producer.node)}: cannot unfold its input: {e}") from e
            x = x.transpose(1, 2).reshape(-1, x.shape[1])
        ones = x.new_ones(x.shape[0], 1)
        return torch.cat([x, ones], dim=1) if self.has_bias(producer) else x

    @staticmethod
    def has_bias(producer: _Producer) -> bool:
        return producer.module.bias is not None or producer.norm is not None

    @torch.no_grad()
    def collect_hessians(self, layer: str, producers: list[_Producer]) -> None:
        """H = E[[x;1][x;1]ᵀ] of every producer's input on the calibration data (float64)."""
        if layer in self.hessians:
            for p, h in zip(producers, self.hessians[layer]):
                p.hessian = h
            return
        extractor = build_extractor(self.gm, [p.node.args[0].name for p in producers])
        sums: list[torch.Tensor | None] = [None] * len(producers)
        counts = [0] * len(producers)
        batches, _ = _batches(self.calib, self.batch_size)
        self.gm.eval()
        for batch in batches:
            for i, (p, x) in enumerate(zip(producers, extractor(batch))):
                f = self.features(p, x.float())
                outer = (f.T @ f).double()
                sums[i] = outer if sums[i] is None else sums[i] + outer
                counts[i] += f.shape[0]
        if not counts[0]:
            raise InputError(
                f"mtz: calib yielded no samples for layer {layer!r} (calib is read once per layer: pass a tensor or "
                f"a DataLoader, not a one-shot iterator)"
            )
        for p, total, n in zip(producers, sums, counts):
            p.hessian = total / n
            if not torch.isfinite(p.hessian).all():
                raise InputError(f"mtz: {_describe(p.node)}: its input contains NaN/inf on the calibration data")
        self.hessians[layer] = [p.hessian for p in producers]

    # -- weights as vectors over the input features ------------------------------------------------
    def weight_rows(self, p: _Producer) -> torch.Tensor:
        """Each output neuron's effective incoming weight [out, F(+1)]: BatchNorm and bias folded in."""
        w = p.module.weight.detach().double().reshape(p.module.weight.shape[0], -1)
        b = p.module.bias.detach().double() if p.module.bias is not None else w.new_zeros(w.shape[0])
        if p.norm is not None:
            a, c = _norm_affine(p.norm)
            w, b = a[:, None] * w, a * b + c
        return torch.cat([w, b[:, None]], dim=1) if self.has_bias(p) else w

    def allowed(self, view: MultitaskView, p: _Producer, task_set: TaskSet) -> torch.Tensor:
        """Bool over p's input features: may a channel of ``task_set`` read it (τ ⊆ τ_in)?"""
        width = p.module.weight[0].numel()  # input channels × (kernel positions or flattened block)
        if p.source is None:
            feats = torch.ones(width, dtype=torch.bool)
        else:
            per_channel = torch.tensor([is_subset(task_set, t) for t in view.records[p.source].task_sets])
            feats = per_channel.repeat_interleave(width // per_channel.numel())
        return torch.cat([feats, torch.ones(1, dtype=torch.bool)]) if self.has_bias(p) else feats

    # -- one zipping step: task ``task`` into the group ``group`` ---------------------------------
    def pair_costs(self, view: MultitaskView, producers: list[_Producer], side_p: list[int], side_q: list[int],
                   group: TaskSet, bit: TaskSet) -> tuple[torch.Tensor, list]:
        """ΔE of every (P, Q) pair summed over the producers (Eq. 2.14 plus the removed inputs' error),
        and per producer the compensated targets of both sides on the zipped channel's inputs."""
        n_p, n_q = popcount(group), popcount(bit)
        cost = torch.zeros(len(side_p), len(side_q), dtype=torch.float64)
        prepared = []
        for p in producers:
            rows = self.weight_rows(p)
            keep = self.allowed(view, p, group | bit)
            v_p, r_p = compensate(p.hessian, rows[side_p], self.allowed(view, p, group), keep, n_p, self.damping)
            v_q, r_q = compensate(p.hessian, rows[side_q], self.allowed(view, p, bit), keep, n_q, self.damping)
            metric = p.hessian[keep][:, keep] / (n_p + n_q)  # (H_P⁻¹ + H_Q⁻¹)⁻¹ with H_P⁻¹ = n_P H⁻¹
            quad_p = ((v_p @ metric) * v_p).sum(1)
            quad_q = ((v_q @ metric) * v_q).sum(1)
            cost += 0.5 * (quad_p[:, None] + quad_q[None, :] - 2 * v_p @ metric @ v_q.T)
            cost += 0.5 * (r_p[:, None] + r_q[None, :])
            prepared.append((p, keep, v_p, v_q))
        return cost, prepared

    def step(self, layer: str, group: TaskSet, task: str,
             chosen: list[tuple[tuple[str, int], tuple[str, int]]] | None) -> list[ZippedPair]:
        """Zip ``task``'s channels of ``layer`` into those of task set ``group`` (``chosen``: the pairs,
        by origin, that the first layer of a residual chain picked); returns the zipped pairs."""
        view = read_multitask(self.gm)
        record = view.records[layer]
        bit = self.tasks.bit(task)
        side_p = [c for c, t in enumerate(record.task_sets) if t == group]
        side_q = [c for c, t in enumerate(record.task_sets) if t == bit]
        n_p, n_q = popcount(group), popcount(bit)
        producers = self.producers(view, layer)
        self.collect_hessians(layer, producers)
        cost, prepared = self.pair_costs(view, producers, side_p, side_q, group, bit)
        new_set = group | bit
        origin = record.origins
        if chosen is None:
            degree = self.zip_degree if n_p == 1 else 1.0  # later tasks join the whole zipped group
            pairs = self.greedy(cost, math.floor(degree * min(len(side_p), len(side_q)) + 1e-9))
        else:
            index_p = {origin[c]: i for i, c in enumerate(side_p)}
            index_q = {origin[c]: j for j, c in enumerate(side_q)}
            pairs = [(index_p[a], index_q[b]) for a, b in chosen]
        weight_q = n_p / (n_p + n_q)  # H_P⁻¹(H_P⁻¹ + H_Q⁻¹)⁻¹ = n_P / (n_P + n_Q)
        for i, j in pairs:
            r, q = side_p[i], side_q[j]
            for p, keep, v_p, v_q in prepared:
                self.write_producer(p, r, keep, v_p[i] + weight_q * (v_q[j] - v_p[i]))
            self.zip_channelwise(view, layer, r, q, weight_q, {id(p.norm) for p in producers})
            self.move_readers(view, layer, r, q)
        zips = [ZippedPair(layer, origin[side_p[i]], origin[side_q[j]], float(cost[i, j])) for i, j in pairs]
        sets = list(record.task_sets)
        for i, _ in pairs:
            sets[side_p[i]] = new_set
        self.retag(view, layer, LayerTaskSets(layer, tuple(sets), record.origins))
        dropped = {side_q[j] for _, j in pairs}
        if dropped:
            self.gm = select_channels(self.gm, {layer: [c for c in range(record.width) if c not in dropped]})
        return zips

    @staticmethod
    def greedy(cost: torch.Tensor, count: int) -> list[tuple[int, int]]:
        """Pairs by ascending ΔE, each neuron used once (ties broken by index), ``count`` of them."""
        pairs: list[tuple[int, int]] = []
        if count <= 0:
            return pairs
        used_p, used_q = set(), set()
        for flat in np.argsort(cost.numpy().ravel(), kind="stable"):
            i, j = divmod(int(flat), cost.shape[1])
            if i not in used_p and j not in used_q:
                pairs.append((i, j))
                used_p.add(i)
                used_q.add(j)
                if len(pairs) == count:
                    break
        return pairs

    # -- writing the zipped channel ----------------------------------------------------------
    @torch.no_grad()
    def write_producer(self, p: _Producer, r: int, keep: torch.Tensor, v: torch.Tensor) -> None:
        """Row r of the producer computes v·[x;1] on the kept features; a folded BatchNorm keeps
        running statistics equal to the zipped output's statistics on the calibration data."""
        weight = p.module.weight
        flat = torch.zeros(keep.numel(), dtype=torch.float64)
        flat[keep] = v
        w, b = (flat[:-1], float(flat[-1])) if self.has_bias(p) else (flat, 0.0)
        weight[r] = w.reshape(weight.shape[1:]).to(weight.dtype)
        if p.norm is None:
            if p.module.bias is not None:
                p.module.bias[r] = b
            return
        if p.module.bias is not None:
            p.module.bias[r] = 0.0
        h = p.hessian
        mean = float(w @ h[:-1, -1])
        var = max(float(w @ h[:-1, :-1] @ w) - mean**2, 0.0)
        _set_norm(p.norm, r, 1.0, b, mean, var)

    @torch.no_grad()
    def zip_channelwise(
        self, view: MultitaskView, layer: str, r: int, q: int, weight_q: float, folded: set[int]
    ) -> None:
        """Per-channel modules after the producers (depthwise conv, BatchNorm): channel r becomes the
        weighted average of r and q (MTZ's update when both sides read the same input)."""
        modules = Submodules(self.gm)
        by_name = {n.name: n for n in self.gm.graph.nodes}
        for name in view.layers.layer(layer).channelwise:
            node = by_name[name]
            if node.op != "call_module":
                continue
            module = modules[node.target]
            if id(module) in folded:
                continue
            if isinstance(module, BATCHNORMS):
                _check_norm(node, module)
                a, c = _norm_affine(module)
                mean, var = module.running_mean.double(), module.running_var.double()
                mixed = [float(t[r] + weight_q * (t[q] - t[r])) for t in (a, c, mean, var)]
                _set_norm(module, r, *mixed)
            elif isinstance(module, nn.Conv2d):
                for t in channel_tensors(module).values():
                    t[r] += weight_q * (t[q] - t[r])
            elif channel_tensors(module):
                raise UnsupportedOpError(
                    f"mtz: {_describe(node)}: per-channel module {type(module).__name__} cannot be zipped"
                )

    @torch.no_grad()
    def move_readers(self, view: MultitaskView, layer: str, r: int, q: int) -> None:
        """Whatever read channel q now reads channel r: consumer and head columns (their supports are
        disjoint under the connection rule, so they add) and identity shortcuts leaving the layer."""
        modules = Submodules(self.gm)
        by_name = {n.name: n for n in self.gm.graph.nodes}
        for consumer in view.layers.layer(layer).consumers:
            node = by_name[consumer.node]
            weight = modules[node.target].weight
            cols = weight.view(weight.shape[0], node.meta[META_MASK].shape[1], -1)
            cols[:, r] += cols[:, q]
            cols[:, q] = 0
        for node in self.gm.graph.nodes:
            info = view.layers.nodes.get(node.name)
            if info is not None and info.role == Role.SHORTCUT and info.source == layer:
                shortcut = modules[node.target]
                shortcut.src = torch.where(shortcut.src == q, r, shortcut.src)  # a new tensor: src may alias dst

    def retag(self, view: MultitaskView, layer: str, record: LayerTaskSets) -> None:
        """Write the layer's new task sets into node.meta and recompute the masks that touch it."""
        view.records[layer] = record
        modules = Submodules(self.gm)
        for node in self.gm.graph.nodes:
            if META_LAYER in node.meta and node.meta[META_LAYER].name == layer:
                node.meta[META_LAYER] = record
            info = view.layers.nodes.get(node.name)
            if info is None or META_MASK not in node.meta:
                continue
            if info.role == Role.DENSE and layer in (info.layer, info.source):
                mask = view.rule_mask(info.layer, info.source, node.meta[META_MASK].shape[1])
            elif info.role == Role.HEAD and info.source == layer:
                mask = record.serves(self.tasks.bit(info.task))[None, :].repeat(node.meta[META_MASK].shape[0], 1)
            else:
                continue
            node.meta[META_MASK] = mask
            weight = modules[node.target].weight
            block = view.layers.nodes[node.args[0].name].block
            with torch.no_grad():
                weight.mul_(expand_mask(mask, weight, block).to(weight.dtype))


def _coupled(layers: LayerMap) -> dict[str, str]:
    """Each layer's residual chain, named by its first layer: layers joined by identity shortcuts."""
    first = layers.tasks.names[0]
    root: dict[str, str] = {}
    for layer in layers:
        root[layer.name] = layer.name
        for _, source in layer.structures[first].shortcuts:
            root[layer.name] = root[source]
    return root


def mtz_merge(
    models: Mapping[str, nn.Module],
    example_input: torch.Tensor,
    calib: torch.Tensor | Iterable,
    *,
    train_loader: Iterable | None = None,
    loss_fn: TaskLoss | None = None,
    zip_degree: float = 1.0,
    damping: float = 1e-2,
    finetune_steps: int = 50,
    lr: float = 1e-3,
    batch_size: int = 32,
    layers: LayerMap | None = None,
    record: list[ZippedPair] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> fx.GraphModule:
    """Merge K single-task networks by Multi-Task Zipping into one multitask GraphModule.

    ``calib``: inputs for the layer-wise Hessians (a tensor, or a DataLoader of inputs or
    ``(inputs, ...)`` batches, as `collect_activations` takes); read once per layer. Tasks are zipped
    in the order of ``models``. ``zip_degree``: the fraction of the min(N_1, N_2) possible pairs of
    the first two tasks zipped per layer (1.0, the paper's: all); each later task is zipped into
    that group as far as widths allow. With ``train_loader`` and ``loss_fn`` (as for
    `finetune`) each layer is followed by ``finetune_steps`` joint fine-tuning steps (optimiser
    steps, over as many passes of the loader as that takes). ``damping``:
    relative ridge on H in the compensation solve. ``batch_size``: calibration inputs per pass when
    ``calib`` is a tensor (a conv's unfolded patches of one batch are held at once). ``record``,
    when given, receives every `ZippedPair`.
    """
    if not 0.0 <= zip_degree <= 1.0:
        raise InputError(f"mtz: zip_degree must be in [0, 1], got {zip_degree}")
    if not damping > 0:
        raise InputError(f"mtz: damping must be > 0, got {damping}")
    if (train_loader is None) != (loss_fn is None):
        raise InputError("mtz: the joint fine-tune needs both train_loader and loss_fn (or neither)")
    if finetune_steps < 1:
        raise InputError(f"mtz: finetune_steps must be >= 1, got {finetune_steps}")
    if layers is None:
        layers = organise_layers(models, example_input)
    training = next(iter(models.values())).training
    zipper = _Zipper(merge(models, example_input, "origin", layers=layers), calib, batch_size, damping, zip_degree)
    chains = _coupled(layers)
    decided: dict[tuple[str, str], list[tuple[tuple[str, int], tuple[str, int]]]] = {}
    names = layers.tasks.names
    for layer in progress_bar(layers.names, desc="mtz", enabled=progress):
        for k in range(1, len(names)):
            group = layers.tasks.to_set(names[:k])
            zips = zipper.step(layer, group, names[k], decided.get((chains[layer], names[k])))
            decided.setdefault((chains[layer], names[k]), [(z.kept, z.merged) for z in zips])
            if record is not None:
                record.extend(zips)
        if train_loader is not None:
            finetune(zipper.gm, train_loader, loss_fn, epochs=finetune_steps, max_steps=finetune_steps, lr=lr,
                     recalibrate_bn=False, seed=seed, progress=False)  # exactly finetune_steps steps
    gm = zipper.gm
    gm.train(training)
    return gm
