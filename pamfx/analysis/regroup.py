"""Regrouping of merged neuron layers into task-set groups L'τ (Sec. 4.5.2, Alg. 4; Sec. 4.5.4, Alg. 5).

For each neuron layer L_i = ∪_t L_i^t and each task set τ, a greedy grows L'τ from the pool S by
the neuron that keeps I(L'τ; Y^{∉τ}) smallest, while it stays ≤ α (Y^{∉τ}: the labels of the
tasks not in τ; the neuron that first pushes I above α is not kept). K = 2 is Algorithm 4; K ≥ 3
runs Algorithm 5 over |τ| = n = 1..K−1 (``variant="full"``) or only n = 1 (``variant=
"simplified"``: K exclusive groups plus one group shared by all tasks, as in the authors' released
code). At each level, a neuron picked by more than one τ is removed from all of them and stays in
S (for K = 2 this is Alg. 4 line 15: it goes back to the shared set — read literally, the
pseudocode would drop it from every group); the neurons picked by exactly one τ leave S; what
remains after the last level is shared by every task.

I is the default estimate of `pamfx.analysis.mutual_information` (bias-corrected leave-one-out,
σ² = 0.5·√d; the reasons are there, the measurements in docs/mutual_information.md). α is
absolute (bits) or, by default, relative to I(L_i; Y^{∉τ}) of the whole layer, global or per
layer. The greedy order does not depend on α, so one run up to α_max yields the grouping for every α ≤ α_max (`RegroupResult.grouping_at`) and
the I-versus-iteration trace (Fig. 4.7). With the full Algorithm 5 and K ≥ 3 the pool of level
n ≥ 2 depends on α (it is what level n−1 left), so those greedies are rerun per distinct pool;
level 1 is shared by all α.

On wide layers the first phase of a greedy (label-independent neurons, Fig. 4.7) can dip below 0,
and the greedy then runs until the misplaced information is paid back; there α is best read off
the trace (`RegroupResult.plot_trace`). Measurements: docs/regroup.md.

Speed. The squared distances are additive over neurons, D(S ∪ {j}) = D(S) + D({j}): a
greedy keeps one running matrix D(L'τ) and scores a chunk of candidates at once as
exp(−(D(L'τ) + D_j)/h) — D_j from a batched rank-(P+2) product; the class-conditional and marginal
sums (and those of the squared kernel, for the bias correction) from matrix products with the
one-hot labels, over the upper block triangle of the symmetric kernel only — in bounded memory, on
all cores (torch intra-op threads). Chunks whose sums underflow are rescored exactly in log space.
Scores are re-used lazily: between full re-scorings (every ``refresh_every`` steps) only the
candidates whose last increment, rescaled by the kernel-width ratio, could still beat the best
fresh one are re-scored (CELF-style); ``refresh_every=1`` scores every candidate at every step (the
exact greedy, which the tests compare with a from-scratch reference). Lazy scoring may reorder
near-ties among label-independent neurons (measured in docs/regroup.md).
Ties are broken by the lower channel index: there is no randomness anywhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from itertools import combinations
from typing import Iterable, Literal, Mapping, Sequence

import numpy as np
import torch

from pamfx.analysis.activations import ConvSummary, LayerActivations, collect_activations
from pamfx.analysis.alpha_trace import GreedyTrace, RegroupTrace, plot_trace
from pamfx.analysis.mutual_information import (
    LabelColumns,
    MIEstimator,
    as_feature_tensor,
    kernel_mi_nats,
    label_columns,
    normalise_features,
    pairwise_sq_distances,
    to_unit,
)
from pamfx.errors import InputError, check_type
from pamfx.ir.grouping import Grouping
from pamfx.ir.neuron_layer import LayerMap
from pamfx.ir.task_set import TaskSet, TaskSpace, popcount
from pamfx.progress import progress_bar

Variant = Literal["full", "simplified"]
AlphaSpec = float | Mapping[str, float]

DEFAULT_ALPHA = 0.01
"""Default threshold α: 1 % of I(L_i; Y^{∉τ}) of the whole layer (``relative=True``, the default).

On planted layers the first neuron carrying information about Y^{∉τ} raises I(L'τ; Y^{∉τ}) by
3–5 % of the whole layer's value (less in wider layers), while the label-independent first phase
of a greedy stays within ±2 % of it."""

DEFAULT_REFRESH = 128
"""Every candidate is re-scored at least every this many greedy steps (1 = exact greedy)."""

_LOG2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------
# The fast path: one running log-kernel matrix per greedy


class RunningKernel:
    """Scores I(L' ∪ {j}; Y) for many candidates j from the running distance matrix of L'.

    features: normalised [N, C, P] float64; target: the label columns of Y^{∉τ} (already in the
    estimator's label form). Scores are in nats, computed in ``dtype`` (D itself is accumulated in
    float64). The kernel matrices of a chunk of candidates are formed ``block_rows`` × ``block_rows``
    at a time (upper block triangle only; ``max_chunk_bytes`` bounds that buffer, which then stays
    in cache).
    """

    def __init__(
        self,
        features: torch.Tensor,
        target: LabelColumns,
        estimator: MIEstimator,
        sigma2: float,
        dtype: torch.dtype = torch.float32,
        max_chunk_bytes: int = 8 << 20,
        block_rows: int = 256,
    ):
        n, _, p = features.shape
        self.estimator, self.sigma2, self.dtype, self.target = estimator, sigma2, dtype, target
        self.features = features
        self.x = features.to(dtype)
        self.sq = features.pow(2).sum(dim=2).to(dtype)
        self.loo = estimator.leave_one_out
        self.dist = torch.zeros(n, n, dtype=torch.float64)
        if self.loo:
            self.dist.fill_diagonal_(math.inf)
        self.dims, self.per_neuron = 0, p
        # Row sums against [1 | one-hot of every label column]; own_class[m, i] = the column of
        # sample i's class in label column m.
        blocks, own, offset = [torch.ones(1, n, dtype=dtype)], [], 1
        extra = 1 if self.loo else 0
        self.log_norm = torch.zeros(n, dtype=torch.float64)
        for m in range(target.num_columns):
            codes = target.codes[:, m]
            blocks.append(torch.nn.functional.one_hot(codes).T.to(dtype))
            own.append(codes + offset)
            offset += blocks[-1].shape[0]
            self.log_norm += math.log(n - extra) - torch.log(target.counts[m][codes].double() - extra)
        self.weights_t = torch.cat(blocks, dim=0)  # [Q, N]
        self.bias_correction = estimator.bias_correction
        self.own_class = torch.stack(own, dim=0)  # [M, N]
        self.tiny = 1e-30 if dtype == torch.float32 else 1e-290
        self.block = min(n, block_rows)
        self.chunk = max(1, int(max_chunk_bytes // (self.block * self.block * torch.finfo(dtype).bits // 8)))
        self._buffer = torch.empty(0, dtype=dtype)
        self._base: tuple[int, torch.Tensor] | None = None
        self.evaluations = 0

    def add(self, j: int) -> None:
        """Move neuron j into L' (D(L') += D_j, exactly symmetric)."""
        x = self.features[:, j, :]
        self.dist += (x[:, None, :] - x[None, :, :]).pow(2).sum(dim=2)
        self.dims += self.per_neuron

    def scores(self, candidates: Sequence[int]) -> torch.Tensor:
        """I(L' ∪ {j}; Y) in nats for each candidate j (float64 [len(candidates)])."""
        width = self.estimator.kernel_width(self.sigma2, self.dims + self.per_neuron)
        if self._base is None or self._base[0] != self.dims:
            self._base = (self.dims, (self.dist * (-1.0 / width)).to(self.dtype))
        out = torch.empty(len(candidates), dtype=torch.float64)
        self.evaluations += len(candidates)
        cand = torch.as_tensor(list(candidates), dtype=torch.long)
        for start in range(0, len(cand), self.chunk):
            out[start : start + self.chunk] = self._score_chunk(self._base[1], cand[start : start + self.chunk], width)
        return out

    def _score_chunk(self, base: torch.Tensor, cand: torch.Tensor, width: float) -> torch.Tensor:
        b, n = cand.numel(), base.shape[0]
        x = self.x[:, cand, :].permute(1, 0, 2)  # [b, N, P]
        sq = self.sq[:, cand].T.unsqueeze(2)  # [b, N, 1]
        ones = torch.ones_like(sq)
        # left_i · right_k = (2⟨x_i, x_k⟩ − |x_i|² − |x_k|²) / h = −D_j(i, k) / h
        left = torch.cat([x, sq, ones], dim=2)
        right = torch.cat([x * (2.0 / width), ones * (-1.0 / width), sq * (-1.0 / width)], dim=2).transpose(1, 2)
        # Row sums of the symmetric kernel matrix against [1 | one-hot labels], from its upper
        # block triangle only: block (I, K) serves the rows of I and, transposed, those of K.
        # With the bias correction, the same sums of the squared kernel are needed (`kernel_mi_nats`).
        parts = 2 if self.bias_correction else 1
        sums = torch.zeros(parts, b, self.weights_t.shape[0], n, dtype=self.dtype)
        edges = list(range(0, n, self.block)) + [n]
        for bi, (i0, i1) in enumerate(zip(edges, edges[1:])):
            for k0, k1 in zip(edges[bi:], edges[bi + 1 :]):
                kernel = self._block_buffer(b, i1 - i0, k1 - k0)
                torch.bmm(left[:, i0:i1], right[:, :, k0:k1], out=kernel)
                kernel.add_(base[i0:i1, k0:k1]).exp_()
                for part in range(parts):
                    if part:
                        kernel.square_()
                    sums[part, :, :, k0:k1] += torch.matmul(self.weights_t[:, i0:i1], kernel)
                    if k0 != i0:
                        sums[part, :, :, i0:i1] += torch.matmul(kernel, self.weights_t[:, k0:k1].T).transpose(1, 2)
        # Only the marginal sums and those of each sample's own class enter the estimate.
        marginal = sums[:, :, 0, :]  # [parts, b, N]
        own = sums.gather(2, self.own_class.expand(parts, b, -1, -1))  # [parts, b, M, N]
        if min(float(marginal.min()), float(own.min())) < self.tiny:
            return self._score_chunk_exact(cand, width)
        log_marginal, log_own = marginal.double().log_(), own.double().log_()
        per_row = log_own[0].sum(dim=1) - self.target.num_columns * log_marginal[0] + self.log_norm
        if self.bias_correction:
            class_spread = torch.exp(log_own[1] - 2.0 * log_own[0]).sum(dim=1)
            spread = torch.exp(log_marginal[1] - 2.0 * log_marginal[0])
            per_row += 0.5 * (class_spread - self.target.num_columns * spread)
        return per_row.mean(dim=1)

    def _block_buffer(self, b: int, rows: int, cols: int) -> torch.Tensor:
        size = b * rows * cols
        if self._buffer.numel() < size:
            self._buffer = torch.empty(size, dtype=self.dtype)
        return self._buffer[:size].view(b, rows, cols)

    def _score_chunk_exact(self, cand: torch.Tensor, width: float) -> torch.Tensor:
        """The same scores in float64 log space (for a chunk where some kernel sum underflows)."""
        out = torch.empty(cand.numel(), dtype=torch.float64)
        for c, j in enumerate(cand.tolist()):
            x = self.features[:, j, :]
            log_k = -(self.dist + (x[:, None, :] - x[None, :, :]).pow(2).sum(dim=2)) / width
            out[c] = kernel_mi_nats(log_k, self.target, self.loo, self.estimator.bias_correction)
        return out


def greedy_order(
    kernel: RunningKernel,
    pool: Sequence[int],
    alpha_max_nats: float,
    refresh_every: int = DEFAULT_REFRESH,
    lazy_batch: int = 8,
    progress: bool = False,
    description: str = "",
    max_steps: int | None = None,
) -> tuple[list[int], list[float]]:
    """Grow L' from ``pool`` by argmin_j I(L' ∪ {j}; Y) until I exceeds ``alpha_max_nats``.

    Returns the neurons in the order added and I (nats) after each addition; the last value is the
    first one above α_max unless the pool ran out (or ``max_steps`` were taken). ``kernel`` must
    start empty.
    """
    if refresh_every < 1 or lazy_batch < 1:
        raise InputError(f"refresh_every and lazy_batch must be >= 1, got {refresh_every} and {lazy_batch}")
    remaining = sorted(int(j) for j in pool)
    order: list[int] = []
    values: list[float] = []
    current = 0.0
    last_increment = np.zeros(max(remaining, default=-1) + 1)
    last_width = np.ones_like(last_increment)
    last_step = np.full(last_increment.shape, -(10**9), dtype=np.int64)
    bar = progress_bar(total=len(remaining), desc=description, enabled=progress)
    step = 0
    while remaining:
        width = kernel.estimator.kernel_width(kernel.sigma2, kernel.dims + kernel.per_neuron)
        cand = np.asarray(remaining)
        if step - int(last_step[cand].min()) >= refresh_every:
            scored, fresh = cand, kernel.scores(cand.tolist()).numpy()
        else:
            scored, fresh = _lazy_scores(kernel, cand, current, last_increment, last_width, width, lazy_batch)
        last_increment[scored] = fresh - current
        last_width[scored] = width
        last_step[scored] = step
        best = int(np.argmin(fresh))  # the first minimum: candidates are in increasing index order
        choice, current = int(scored[best]), float(fresh[best])
        kernel.add(choice)
        remaining.remove(choice)
        order.append(choice)
        values.append(current)
        bar.update(1)
        step += 1
        if current > alpha_max_nats or step == max_steps:
            break
    bar.close()
    return order, values


def _lazy_scores(
    kernel: RunningKernel,
    cand: np.ndarray,
    current: float,
    last_increment: np.ndarray,
    last_width: np.ndarray,
    width: float,
    batch: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-score candidates in order of their stale increments until none left can beat the best fresh one.

    A stale increment is rescaled by (old kernel width / new width): the contribution D_j / h of a
    neuron independent of L' shrinks as the kernel widens with |L'|. Returns the re-scored
    candidates (in increasing index order) and their fresh I in nats.
    """
    estimate = last_increment[cand] * (last_width[cand] / width)
    rank = np.lexsort((cand, estimate))
    ranked, ranked_estimate = cand[rank], estimate[rank]
    done, best = 0, math.inf
    scored: list[np.ndarray] = []
    fresh: list[np.ndarray] = []
    while done < len(ranked):
        take = ranked[done : done + batch]
        values = kernel.scores(take.tolist()).numpy()
        scored.append(take)
        fresh.append(values)
        best = min(best, float(values.min()) - current)
        done += len(take)
        if done < len(ranked) and ranked_estimate[done] >= best:
            break
    chosen, values = np.concatenate(scored), np.concatenate(fresh)
    order = np.argsort(chosen, kind="stable")
    return chosen[order], values[order]


# ----------------------------------------------------------------------------------------------
# One layer


def _alpha_value(alpha: AlphaSpec, layer: str, argument: str = "alpha") -> float:
    if isinstance(alpha, Mapping):
        if layer not in alpha:
            raise InputError(f"{argument} gives no value for layer {layer!r}; it has {sorted(alpha)}")
        value = alpha[layer]
    else:
        value = alpha
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{argument} for layer {layer!r} must be a number, got {value!r}") from None
    if math.isnan(value) or value < 0:
        raise InputError(f"{argument} for layer {layer!r} must be >= 0, got {value}")
    return value


class LayerRegrouping:
    """The regrouping of one neuron layer: its greedy traces and its task sets for any α ≤ α_max.

    Built by `regroup_features`; ``alpha_max`` (bits, or a fraction of I(L_i; Y^{∉τ}) when
    ``relative``) is how far the level-1 greedies run.
    """

    def __init__(
        self,
        name: str,
        features: torch.Tensor,
        tasks: TaskSpace,
        labels: Mapping[str, LabelColumns],
        alpha_max: float,
        relative: bool,
        variant: Variant,
        estimator: MIEstimator,
        dtype: torch.dtype,
        refresh_every: int,
        progress: bool,
    ):
        if variant not in ("full", "simplified"):
            raise InputError(f"variant must be 'full' or 'simplified', got {variant!r}")
        self.name, self.tasks, self.variant, self.relative = name, tasks, variant, relative
        self.estimator, self.dtype, self.refresh_every, self.progress = estimator, dtype, refresh_every, progress
        self.features = normalise_features(features, estimator.normalize)
        self.width = int(features.shape[1])
        self.sigma2 = estimator.resolve_sigma2(self.features)
        self._targets = {
            tau: self._target(labels, tau) for n in self.levels for tau in _task_sets_of_size(tasks, n)
        }
        flat = self.features.reshape(self.features.shape[0], -1)
        log_kernel = -pairwise_sq_distances(flat) / estimator.kernel_width(self.sigma2, flat.shape[1])
        self.reference_mi = {
            tau: to_unit(kernel_mi_nats(log_kernel, target, estimator.leave_one_out, estimator.bias_correction), "bits")
            for tau, target in self._targets.items()
        }
        self.alpha_max = alpha_max
        self._greedies: dict[tuple[TaskSet, tuple[int, ...]], GreedyTrace] = {}
        for tau in _task_sets_of_size(tasks, 1):
            self.greedy(tau, tuple(range(self.width)))

    @property
    def levels(self) -> list[int]:
        """The task-set sizes n the algorithm visits (Alg. 5 line 5)."""
        return [1] if self.variant == "simplified" else list(range(1, self.tasks.k))

    def _target(self, labels: Mapping[str, LabelColumns], tau: TaskSet) -> LabelColumns:
        others = [t for t in self.tasks.names if not self.tasks.bit(t) & tau]
        target = labels[others[0]]
        for t in others[1:]:
            target = target.concat(labels[t])
        return target.in_form(self.estimator.label_form)

    def alpha_bits(self, tau: TaskSet, alpha: float) -> float:
        """The absolute threshold (bits) for task set τ at α (relative α scales I(L_i; Y^{∉τ}))."""
        if math.isinf(alpha) or not self.relative:
            return alpha
        return alpha * max(self.reference_mi[tau], 0.0)

    def greedy(self, tau: TaskSet, pool: Sequence[int]) -> GreedyTrace:
        """The greedy of τ over ``pool`` run to α_max (cached per pool)."""
        key = (tau, tuple(pool))
        if key not in self._greedies:
            alpha_max = self.alpha_bits(tau, self.alpha_max)
            kernel = RunningKernel(self.features, self._targets[tau], self.estimator, self.sigma2, self.dtype)
            label = self.tasks.label(tau)
            order, values = greedy_order(
                kernel, pool, alpha_max * _LOG2, self.refresh_every, progress=self.progress,
                description=f"{self.name} L'^{label}",
            )
            self._greedies[key] = GreedyTrace(
                layer=self.name, task_set=tau, label=label, against=self.tasks.label(self.tasks.all & ~tau),
                level=popcount(tau), pool=tuple(pool), order=tuple(order),
                mi=tuple(v / _LOG2 for v in values), reference_mi=self.reference_mi[tau], alpha_max=alpha_max,
                exhausted=len(order) == len(pool) and not (values and values[-1] / _LOG2 > alpha_max),
                evaluations=kernel.evaluations,
            )
        return self._greedies[key]

    def assign(self, alpha: float) -> tuple[list[TaskSet], list[GreedyTrace]]:
        """Task set of every channel at α (Alg. 4 / Alg. 5) and the greedies that decided it."""
        if alpha > self.alpha_max:
            raise InputError(
                f"layer {self.name!r}: alpha={alpha} is above the alpha_max={self.alpha_max} the greedy ran to"
            )
        pool = list(range(self.width))
        task_sets = [self.tasks.all] * self.width
        used = []
        for n in self.levels:
            picks: dict[TaskSet, tuple[int, ...]] = {}
            for tau in _task_sets_of_size(self.tasks, n):
                trace = self.greedy(tau, pool)
                used.append(trace)
                picks[tau] = trace.selected(self.alpha_bits(tau, alpha))
            times = np.bincount(np.concatenate([np.asarray(p, dtype=np.int64) for p in picks.values()]),
                                minlength=self.width)
            for tau, picked in picks.items():
                for c in picked:
                    if times[c] == 1:
                        task_sets[c] = tau
            pool = [c for c in pool if times[c] != 1]
        return task_sets, used

    @property
    def traces(self) -> tuple[GreedyTrace, ...]:
        """Every greedy run so far, level by level."""
        return tuple(sorted(self._greedies.values(), key=lambda t: (t.level, t.task_set, len(t.pool))))


def _task_sets_of_size(tasks: TaskSpace, n: int) -> list[TaskSet]:
    return [sum(1 << i for i in combo) for combo in combinations(range(tasks.k), n)]


# ----------------------------------------------------------------------------------------------
# Public entry points


def _task_space(tasks: TaskSpace | Sequence[str]) -> TaskSpace:
    space = tasks if isinstance(tasks, TaskSpace) else TaskSpace(tuple(tasks))
    if space.k < 2:
        raise InputError(f"regrouping needs at least two tasks, got {list(space.names)}")
    return space


def _label_columns_per_task(
    tasks: TaskSpace, labels: Mapping[str, object], num_samples: int
) -> dict[str, LabelColumns]:
    if not isinstance(labels, Mapping):
        raise InputError(f"labels must be a mapping from task name to labels, got {type(labels).__name__}")
    missing = [t for t in tasks.names if t not in labels]
    if missing:
        raise InputError(f"labels has no entry for task(s) {missing}; every task in {list(tasks.names)} needs labels")
    unknown = [t for t in labels if t not in tasks.names]
    if unknown:
        raise InputError(f"labels names unknown task(s) {unknown}; the tasks are {list(tasks.names)}")
    out = {}
    for task in tasks.names:
        columns = label_columns(labels[task], f"labels[{task!r}]")  # type: ignore[arg-type]
        if columns.num_samples != num_samples:
            raise InputError(
                f"labels[{task!r}] has {columns.num_samples} samples but the calibration set has {num_samples}"
            )
        out[task] = columns
    return out


def _max_alpha(layer: str, alpha: AlphaSpec, alphas: Sequence[AlphaSpec]) -> float:
    values = [_alpha_value(alpha, layer)] + [_alpha_value(a, layer, "alphas") for a in alphas]
    return max(values)


def regroup_features(
    features: torch.Tensor | np.ndarray,
    tasks: TaskSpace | Sequence[str],
    labels: Mapping[str, torch.Tensor | np.ndarray],
    alpha: float = DEFAULT_ALPHA,
    *,
    alphas: Sequence[float] = (),
    relative: bool = True,
    variant: Variant = "full",
    estimator: MIEstimator = MIEstimator(),
    dtype: torch.dtype = torch.float32,
    refresh_every: int = DEFAULT_REFRESH,
    progress: bool = False,
    name: str = "layer",
) -> LayerRegrouping:
    """Regroup one layer given its merged features [N, C] or [N, C, P] (the network-free core).

    ``labels[t]`` holds task t's class indices [N] or attributes [N, A]. The greedies run up to the
    largest of ``alpha`` and ``alphas``; `LayerRegrouping.assign` gives the task sets for any α up
    to that. See `regroup` for the other arguments.
    """
    space = _task_space(tasks)
    x = as_feature_tensor(features)
    columns = _label_columns_per_task(space, labels, x.shape[0])
    return LayerRegrouping(
        name, x, space, columns, _max_alpha(name, alpha, alphas), relative, variant, estimator, dtype,
        refresh_every, progress,
    )


@dataclass
class RegroupResult:
    """The grouping at ``alpha``, one per entry of ``alphas``, and the traces of every greedy."""

    grouping: Grouping
    groupings: tuple[Grouping, ...]
    alpha: AlphaSpec
    alphas: tuple[AlphaSpec, ...]
    relative: bool
    layers: dict[str, LayerRegrouping] = field(repr=False)

    def grouping_at(self, alpha: AlphaSpec) -> Grouping:
        """The grouping for another α (global or per layer) up to the α_max the greedies ran to.

        Free for Alg. 4 and the simplified variant; the full Alg. 5 (K ≥ 3) reruns the greedies of
        level n ≥ 2 whose pool differs at this α.
        """
        return _grouping(self.layers, alpha)

    def with_alpha_first(self, alpha: AlphaSpec) -> "RegroupResult":
        """The same result with ``alpha``, one of ``alpha`` and ``alphas``, as the main threshold."""
        order = (self.alpha, *self.alphas)
        if alpha not in order:
            raise InputError(f"regroup: alpha {alpha!r} is not one of the result's {list(order)}")
        i = order.index(alpha)
        groupings = (self.grouping, *self.groupings)
        return replace(self, alpha=alpha, grouping=groupings[i], alphas=order[:i] + order[i + 1:],
                                   groupings=groupings[:i] + groupings[i + 1:])

    @property
    def trace(self) -> RegroupTrace:
        """The greedy traces that decided ``grouping`` (plus level-1 traces shared by every α)."""
        out = {}
        for name, layer in self.layers.items():
            out[name] = tuple(layer.assign(_alpha_value(self.alpha, name))[1])
        return RegroupTrace(out)

    def plot_trace(self, path: str, layers: Sequence[str] | None = None) -> str:
        """Save the Fig. 4.7 plot of ``trace`` as a PNG, with the thresholds of a global ``alpha``."""
        alphas: Iterable[float] = () if isinstance(self.alpha, Mapping) else (float(self.alpha),)
        return str(plot_trace(self.trace, path, layers=layers, alphas=alphas, relative=self.relative))


def _grouping(layers: Mapping[str, LayerRegrouping], alpha: AlphaSpec) -> Grouping:
    tasks = next(iter(layers.values())).tasks
    return Grouping(tasks, {name: layer.assign(_alpha_value(alpha, name))[0] for name, layer in layers.items()})


def regroup(
    layers: LayerMap,
    calibration_inputs: torch.Tensor | Iterable | LayerActivations,
    labels: Mapping[str, torch.Tensor | np.ndarray],
    alpha: AlphaSpec = DEFAULT_ALPHA,
    *,
    alphas: Sequence[AlphaSpec] = (),
    relative: bool = True,
    variant: Variant = "full",
    estimator: MIEstimator = MIEstimator(),
    conv_summary: ConvSummary = "mean",
    batch_size: int = 256,
    dtype: torch.dtype = torch.float32,
    refresh_every: int = DEFAULT_REFRESH,
    progress: bool = True,
) -> RegroupResult:
    """Regroup every neuron layer of ``layers`` (Alg. 4 for K = 2, Alg. 5 for K ≥ 3).

    calibration_inputs: a tensor, a DataLoader / iterable of batches, or activations already
    collected by `collect_activations`; labels: per task, class indices [N] or attributes [N, A] of
    those calibration samples. alpha: the threshold of the returned ``grouping`` — a number or
    ``{layer: number}``; absolute bits, or (``relative=True``, the default) a fraction of
    I(L_i; Y^{∉τ}) of the whole layer. alphas: further thresholds whose groupings come from the same
    greedy run. variant: "full" (Alg. 5) or "simplified" (n = 1 only). estimator: the MI estimate
    (defaults explained in `pamfx.analysis.mutual_information`). dtype: the precision of the
    candidate scores (float64 is ~2× slower). refresh_every: lazy re-scoring period (1 = exact).
    """
    check_type(layers, LayerMap, "layers")
    _task_space(layers.tasks)
    if len(layers) == 0:
        raise InputError("layers has no neuron layer to regroup")
    if isinstance(calibration_inputs, LayerActivations):
        activations = calibration_inputs
        if activations.tasks != layers.tasks:
            raise InputError(f"activations are over tasks {list(activations.tasks)}, layers over {list(layers.tasks)}")
    else:
        activations = collect_activations(
            layers, calibration_inputs, conv_summary=conv_summary, batch_size=batch_size, progress=progress
        )
    columns = _label_columns_per_task(layers.tasks, labels, activations.num_samples)
    per_layer = {}
    for layer in layers:
        per_layer[layer.name] = LayerRegrouping(
            layer.name, as_feature_tensor(activations[layer.name], f"activations of layer {layer.name!r}"),
            layers.tasks, columns, _max_alpha(layer.name, alpha, alphas), relative, variant, estimator, dtype,
            refresh_every, progress,
        )
    return RegroupResult(
        grouping=_grouping(per_layer, alpha),
        groupings=tuple(_grouping(per_layer, a) for a in alphas),
        alpha=alpha,
        alphas=tuple(alphas),
        relative=relative,
        layers=per_layer,
    )
