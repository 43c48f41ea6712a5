"""Mutual information between a set of neurons and task labels (Sec. 4.5.2, docs/design.md §3).

The estimator is the pairwise-distance estimate of Kolchinsky & Tracey (2017): every calibration
sample i becomes a Gaussian component N(x_i, σ²·I) (the layer output with added noise T = L + ε),
and with squared distances D_ij over the chosen neurons

    H(T)   ≈ d/2·log(2πeσ²) − 1/N Σ_i log 1/N Σ_j exp(−D_ij / h),
    H(T|Y) ≈ Σ_y p_y · (the same within class y),          I(T; Y) = H(T) − H(T|Y),

where h = 2σ² for the KL divergence (the "KL upper bound" the paper uses) and h = 8σ² for the
Bhattacharyya divergence (the companion lower-bound form); the d·log term cancels. Everything is
evaluated in log space (``torch.logsumexp``) and returned in bits unless ``unit="nats"``.

**Features.** A neuron's per-sample representation is a vector of P values (P = 1 for a Linear
feature or a globally pooled channel, P = H·W for a full conv map). Activations are normalised
(``normalize="neuron"``, the default: each neuron centred and scaled to unit variance over the
calibration set, constant neurons set to 0), so σ² is relative to a neuron's spread and means the
same in every layer. A consequence: classes are resolved only relative to that spread.

**The default** (``leave_one_out=True, bias_correction=True, sigma2=0.5, dim_exponent=0.5``) leaves
each sample out of its own density estimate, scales σ² with √d and corrects the second-order bias
of the logs of the kernel sums, so that greedy regrouping, which grows sets neuron by neuron, is
never rewarded for label-independent neurons. Why, with the measured tables that motivate each
choice: docs/mutual_information.md (reprinted by ``python tools/mi_tables.py``).

**Bounds.** Leave-one-out, σ² scaling and the correction make an *estimate*, not a bound. The
rigorous Kolchinsky–Tracey bracket of I(T; Y) for the noisy empirical mixture is `mi_bounds`:
upper = H_KL(T) − H_BD(T|Y), lower = H_BD(T) − H_KL(T|Y) (each term bounds the same entropy, so
upper ≥ lower always). The two plain point estimates (KL for both terms, Bhattacharyya for both)
are *not* ordered in general: a five-point counterexample is in the tests.

**Labels.** A task's Y is a vector of class indices [N] or a matrix of categorical (usually binary)
attributes [N, A]. ``label_form="per_attribute"`` (default, what the authors' released code does)
sums I(T; Y_a) over the attributes; ``label_form="joint"`` treats each distinct label vector as one
class — the literal I(T; Y), which degenerates when most label vectors are unique: that case raises
`InputError` rather than returning a saturated number. The two forms agree on single-column labels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch

from pamfx.errors import InputError

Unit = Literal["bits", "nats"]
LabelForm = Literal["per_attribute", "joint"]
Normalisation = Literal["neuron", "layer", "none"]
Divergence = Literal["kl", "bhattacharyya"]

DEFAULT_SIGMA2 = 0.5
"""σ² relative to neuron-normalised activations, for one feature dimension (see the module docstring)."""

DEFAULT_DIM_EXPONENT = 0.5
"""σ² = sigma2 · d^dim_exponent for a set of d feature dimensions (see the module docstring)."""

DEGENERATE_JOINT_FRACTION = 0.5
"""The joint label form is refused when at least this fraction of samples has a unique label vector."""

SIGMA2_GRID = tuple(float(v) for v in np.geomspace(0.01, 10.0, 31))
"""Candidate σ² values (per dimension when scaled) for ``sigma2="loo-likelihood"``."""

_DIVERGENCE_FACTOR = {"kl": 2.0, "bhattacharyya": 8.0}


def to_unit(value_nats: float, unit: Unit) -> float:
    """Convert nats to ``unit`` ("bits" or "nats")."""
    if unit == "nats":
        return value_nats
    if unit == "bits":
        return value_nats / math.log(2.0)
    raise InputError(f"unit must be 'bits' or 'nats', got {unit!r}")


# ----------------------------------------------------------------------------------------------
# Labels


@dataclass(frozen=True)
class LabelColumns:
    """Categorical label variables of N samples: ``codes[:, m]`` holds 0..n_m−1 for column m.

    A class-index label is one column; a binary attribute matrix is one column per attribute. The
    union of several tasks' labels (Y^{∉τ} in Alg. 5) is the concatenation of their columns.
    """

    codes: torch.Tensor
    names: tuple[str, ...]
    counts: tuple[torch.Tensor, ...] = field(repr=False)

    @property
    def num_samples(self) -> int:
        return int(self.codes.shape[0])

    @property
    def num_columns(self) -> int:
        return int(self.codes.shape[1])

    def concat(self, other: "LabelColumns") -> "LabelColumns":
        if other.num_samples != self.num_samples:
            raise InputError(
                f"labels {list(other.names)} have {other.num_samples} samples, {list(self.names)} have {self.num_samples}"
            )
        return LabelColumns(
            torch.cat([self.codes, other.codes], dim=1), self.names + other.names, self.counts + other.counts
        )

    def in_form(self, form: LabelForm) -> "LabelColumns":
        """The columns the estimator sums over: themselves (per attribute), or one joint column."""
        if form == "per_attribute":
            _check_class_sizes(self)
            return self
        if form != "joint":
            raise InputError(f"label_form must be 'per_attribute' or 'joint', got {form!r}")
        _, joint, counts = torch.unique(self.codes, dim=0, return_inverse=True, return_counts=True)
        name = "(" + ", ".join(self.names) + ")" if self.num_columns > 1 else self.names[0]
        singletons = int(counts[joint].eq(1).sum())
        if self.num_columns > 1 and singletons >= DEGENERATE_JOINT_FRACTION * self.num_samples:
            raise InputError(
                f"joint label form is degenerate for {name}: {singletons} of {self.num_samples} samples have a "
                f"label vector no other sample has ({counts.numel()} distinct vectors), so I(T; Y) would saturate "
                f"at H(Y); use label_form='per_attribute' or more calibration samples"
            )
        joint_cols = LabelColumns(joint.reshape(-1, 1), (name,), (counts,))
        _check_class_sizes(joint_cols)
        return joint_cols


def _check_class_sizes(columns: LabelColumns) -> None:
    for name, counts in zip(columns.names, columns.counts):
        small = torch.nonzero(counts < 2).flatten()
        if small.numel():
            raise InputError(
                f"{name}: {small.numel()} class(es) have fewer than two samples (e.g. class code {int(small[0])}); "
                f"every class needs at least two calibration samples to estimate H(T|Y=y)"
            )


def label_columns(labels: torch.Tensor | np.ndarray | Sequence, name: str = "labels") -> LabelColumns:
    """Parse class indices [N] or categorical/binary attributes [N, A] into `LabelColumns`.

    Values must be integers (or bools, or floats holding integers); any set of values is re-coded
    to 0..n−1 per column.
    """
    try:
        tensor = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be an array of class indices or attributes: {exc}") from None
    if tensor.ndim not in (1, 2):
        raise InputError(f"{name} must be class indices [N] or attributes [N, A], got shape {list(tensor.shape)}")
    if tensor.shape[0] == 0 or (tensor.ndim == 2 and tensor.shape[1] == 0):
        raise InputError(f"{name} is empty (shape {list(tensor.shape)})")
    if tensor.is_floating_point() or tensor.is_complex():
        if tensor.is_complex() or not torch.isfinite(tensor).all() or not torch.equal(tensor, tensor.round()):
            raise InputError(f"{name} must hold integer class indices or attributes, found non-integer values")
    is_vector = tensor.ndim == 1
    tensor = tensor.to(torch.int64).reshape(tensor.shape[0], -1)
    codes, counts, names = [], [], []
    for m in range(tensor.shape[1]):
        _, inverse, count = torch.unique(tensor[:, m], return_inverse=True, return_counts=True)
        codes.append(inverse)
        counts.append(count)
        names.append(name if is_vector else f"{name}[:, {m}]")
    return LabelColumns(torch.stack(codes, dim=1), tuple(names), tuple(counts))


# ----------------------------------------------------------------------------------------------
# Features


def as_feature_tensor(features: torch.Tensor | np.ndarray, name: str = "features") -> torch.Tensor:
    """Features as float64 [N, C, P]: N samples, C neurons, P values per neuron (P = 1 for [N, C]).

    [N, C, H, W] conv maps become [N, C, H·W]. Raises `InputError` on NaN/inf, naming the neuron.
    """
    try:
        tensor = torch.as_tensor(features)
    except (TypeError, RuntimeError, ValueError) as exc:
        raise InputError(f"{name} must be an array or tensor, got {type(features).__name__} ({exc})") from exc
    if tensor.ndim < 2:
        raise InputError(f"{name} must be [N, C] or [N, C, ...], got shape {list(tensor.shape)}")
    if not (tensor.is_floating_point() or tensor.dtype in (torch.int32, torch.int64, torch.bool)):
        raise InputError(f"{name} must be a real-valued array, got dtype {tensor.dtype}")
    tensor = tensor.detach().to(device="cpu", dtype=torch.float64)
    tensor = tensor.reshape(tensor.shape[0], tensor.shape[1], -1)
    bad = ~torch.isfinite(tensor)
    if bad.any():
        sample, neuron, _ = (int(v) for v in torch.nonzero(bad)[0])
        raise InputError(
            f"{name} contains {int(bad.sum())} NaN/inf value(s), first at sample {sample}, neuron {neuron}"
        )
    return tensor


def normalise_features(features: torch.Tensor, mode: Normalisation = "neuron") -> torch.Tensor:
    """Normalise [N, C, P] features so that σ² is relative (docs/design.md §3).

    ``neuron``: centre each neuron and scale it to unit variance over samples and positions
    (a constant neuron becomes 0); ``layer``: centre each neuron and divide the whole layer by the
    root of its mean per-neuron variance (keeps relative neuron scales); ``none``: unchanged.
    """
    if mode == "none":
        return features
    centred = features - features.mean(dim=(0, 2), keepdim=True)
    if mode == "neuron":
        std = centred.pow(2).mean(dim=(0, 2), keepdim=True).sqrt()
        return torch.where(std > 0, centred / std.clamp_min(torch.finfo(std.dtype).tiny), torch.zeros_like(centred))
    if mode == "layer":
        scale = centred.pow(2).mean().sqrt()
        return centred / scale if scale > 0 else centred
    raise InputError(f"normalize must be 'neuron', 'layer' or 'none', got {mode!r}")


def pairwise_sq_distances(flat: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [N, N] between the rows of ``flat`` [N, d] (float64, exact 0 diagonal)."""
    norms = flat.pow(2).sum(dim=1)
    dist = (norms[:, None] + norms[None, :] - 2.0 * flat @ flat.T).clamp_min_(0.0)
    dist.fill_diagonal_(0.0)
    return dist


# ----------------------------------------------------------------------------------------------
# The estimator


def kernel_mi_nats(
    log_kernel: torch.Tensor, columns: LabelColumns, leave_one_out: bool, bias_correction: bool = False
) -> float:
    """Σ over label columns of 1/N Σ_i [log p̂(x_i | y_i) − log p̂(x_i)] from a log-kernel [N, N].

    ``log_kernel[i, j] = −D_ij / h``; with ``leave_one_out`` the sample itself is excluded from
    both density estimates. This is H(T) − H(T|Y) of the pairwise estimate, in nats.

    ``bias_correction`` (leave-one-out only) removes the second-order (delta-method) bias of the
    logs of the two kernel sums, E[log S] ≈ log E[S] − Var[S] / (2 E[S]²): per sample it adds
    ½·(r_y − r) with r = Σ_j w_ij² / (Σ_j w_ij)² over the other samples and r_y the same over the
    other samples of its class. With labels independent of the features r_y ≈ r / p_y, so the
    correction cancels the negative bias of the class-conditional log; when the classes are
    separated, r_y = r and nothing changes.
    """
    n = log_kernel.shape[0]
    if bias_correction and not leave_one_out:
        raise InputError("bias_correction applies to the leave-one-out estimate only (leave_one_out=True)")
    if leave_one_out:
        log_kernel = log_kernel.clone()
        log_kernel.fill_diagonal_(-math.inf)
    offset = 1 if leave_one_out else 0
    log_sum = torch.logsumexp(log_kernel, dim=1)
    log_marginal = log_sum - math.log(n - offset)
    if bias_correction:
        spread = torch.exp(torch.logsumexp(2.0 * log_kernel, dim=1) - 2.0 * log_sum)
    total = 0.0
    for m in range(columns.num_columns):
        codes = columns.codes[:, m]
        masked = log_kernel.masked_fill(codes[:, None] != codes[None, :], -math.inf)
        log_class_sum = torch.logsumexp(masked, dim=1)
        class_size = columns.counts[m][codes].to(log_kernel.dtype)
        total += float((log_class_sum - torch.log(class_size - offset) - log_marginal).mean())
        if bias_correction:
            class_spread = torch.exp(torch.logsumexp(2.0 * masked, dim=1) - 2.0 * log_class_sum)
            total += float((0.5 * (class_spread - spread)).mean())
    return total


@dataclass(frozen=True)
class MIEstimator:
    """Configuration of the pairwise-distance estimate of I(L'; Y) (module docstring explains the defaults).

    sigma2: noise variance per feature dimension relative to normalised activations, or
    ``"loo-likelihood"`` to choose it by leave-one-out likelihood; dim_exponent: σ² =
    sigma2·d^dim_exponent for a set of d feature dimensions (0: fixed σ²); leave_one_out: drop the
    self term; bias_correction: the second-order correction of `kernel_mi_nats` (needs
    leave_one_out);
    divergence: "kl" (h = 2σ²) or "bhattacharyya" (h = 8σ²); label_form: "per_attribute" or
    "joint"; normalize: "neuron", "layer" or "none".
    """

    sigma2: float | Literal["loo-likelihood"] = DEFAULT_SIGMA2
    dim_exponent: float = DEFAULT_DIM_EXPONENT
    leave_one_out: bool = True
    bias_correction: bool = True
    divergence: Divergence = "kl"
    label_form: LabelForm = "per_attribute"
    normalize: Normalisation = "neuron"

    def __post_init__(self) -> None:
        if isinstance(self.sigma2, str):
            if self.sigma2 != "loo-likelihood":
                raise InputError(f"sigma2 must be a positive number or 'loo-likelihood', got {self.sigma2!r}")
        elif not (isinstance(self.sigma2, (int, float)) and math.isfinite(self.sigma2) and self.sigma2 > 0):
            raise InputError(f"sigma2 must be a positive finite number or 'loo-likelihood', got {self.sigma2!r}")
        if not (isinstance(self.dim_exponent, (int, float)) and 0.0 <= self.dim_exponent <= 1.0):
            raise InputError(f"dim_exponent must be in [0, 1], got {self.dim_exponent!r}")
        if self.bias_correction and not self.leave_one_out:
            raise InputError("bias_correction=True needs leave_one_out=True")
        if self.divergence not in _DIVERGENCE_FACTOR:
            raise InputError(f"divergence must be 'kl' or 'bhattacharyya', got {self.divergence!r}")
        if self.label_form not in ("per_attribute", "joint"):
            raise InputError(f"label_form must be 'per_attribute' or 'joint', got {self.label_form!r}")
        if self.normalize not in ("neuron", "layer", "none"):
            raise InputError(f"normalize must be 'neuron', 'layer' or 'none', got {self.normalize!r}")

    def kernel_width(self, sigma2: float, dims: int) -> float:
        """h in exp(−D/h) for a set of ``dims`` feature dimensions."""
        return _DIVERGENCE_FACTOR[self.divergence] * scaled_variance(sigma2, dims, self.dim_exponent)

    def resolve_sigma2(self, normalised: torch.Tensor) -> float:
        """The numeric σ² to use for features [N, C, P] (runs the likelihood search if asked)."""
        if isinstance(self.sigma2, str):
            return select_sigma2(normalised, dim_exponent=self.dim_exponent)
        return float(self.sigma2)

    def estimate(
        self, features: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray | LabelColumns, unit: Unit = "bits"
    ) -> float:
        """I(features; labels) — see `estimate_mi`."""
        x = normalise_features(as_feature_tensor(features), self.normalize)
        columns = _as_columns(labels, x.shape[0]).in_form(self.label_form)
        sigma2 = self.resolve_sigma2(x)
        flat = x.reshape(x.shape[0], -1)
        log_kernel = -pairwise_sq_distances(flat) / self.kernel_width(sigma2, flat.shape[1])
        return to_unit(kernel_mi_nats(log_kernel, columns, self.leave_one_out, self.bias_correction), unit)


def _as_columns(labels: torch.Tensor | np.ndarray | LabelColumns, num_samples: int, name: str = "labels") -> LabelColumns:
    columns = labels if isinstance(labels, LabelColumns) else label_columns(labels, name)
    if columns.num_samples != num_samples:
        raise InputError(
            f"{name} has {columns.num_samples} samples but the features have {num_samples}; "
            f"labels must describe the calibration samples one to one"
        )
    return columns


def scaled_variance(sigma2: float, dims: int, dim_exponent: float) -> float:
    """The noise variance σ²·d^dim_exponent of a set of ``dims`` feature dimensions."""
    return sigma2 * dims**dim_exponent


def select_sigma2(
    normalised: torch.Tensor, dim_exponent: float = DEFAULT_DIM_EXPONENT, grid: Sequence[float] = SIGMA2_GRID
) -> float:
    """σ² maximising the leave-one-out log-likelihood of the Gaussian kernel density of T.

    LL(σ²) = 1/N Σ_i log 1/(N−1) Σ_{j≠i} N(x_i; x_j, σ²_d·I) with σ²_d = σ²·d^dim_exponent; the
    grid is searched exhaustively (deterministic). Returns σ² before the dimension scaling.
    """
    flat = normalised.reshape(normalised.shape[0], -1)
    n, dims = flat.shape
    if n < 3:
        raise InputError(f"choosing sigma2 by leave-one-out likelihood needs at least 3 samples, got {n}")
    dist = pairwise_sq_distances(flat)
    dist.fill_diagonal_(math.inf)
    best, best_ll = float(grid[0]), -math.inf
    for value in grid:
        variance = scaled_variance(value, dims, dim_exponent)
        ll = float((torch.logsumexp(-dist / (2 * variance), dim=1) - math.log(n - 1)).mean())
        ll -= 0.5 * dims * math.log(2 * math.pi * variance)
        if ll > best_ll:
            best, best_ll = float(value), ll
    return best


def estimate_mi(
    features: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    *,
    sigma2: float | Literal["loo-likelihood"] = DEFAULT_SIGMA2,
    dim_exponent: float = DEFAULT_DIM_EXPONENT,
    leave_one_out: bool = True,
    bias_correction: bool = True,
    divergence: Divergence = "kl",
    label_form: LabelForm = "per_attribute",
    normalize: Normalisation = "neuron",
    unit: Unit = "bits",
) -> float:
    """Estimate I(L'; Y) between neuron features and labels (Sec. 4.5.2; Kolchinsky & Tracey 2017).

    features: [N, C] (one value per neuron) or [N, C, P] / [N, C, H, W] (P values per neuron);
    labels: class indices [N] or attributes [N, A]. Returns bits (or nats). The defaults are the
    bias-corrected leave-one-out form with σ² ∝ √d that regrouping uses; ``sigma2=0.5,
    dim_exponent=0, leave_one_out=False, bias_correction=False`` is the plain estimate of the paper. Raises `InputError` on a sample-count
    mismatch, NaN/inf features, a class with fewer than two samples or degenerate joint labels.
    """
    estimator = MIEstimator(sigma2, dim_exponent, leave_one_out, bias_correction, divergence, label_form, normalize)
    return estimator.estimate(features, labels, unit=unit)


@dataclass(frozen=True)
class MIBounds:
    """The Kolchinsky–Tracey bracket lower ≤ I(T; Y) ≤ upper of the noisy empirical mixture."""

    lower: float
    upper: float
    unit: Unit


def mi_bounds(
    features: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    *,
    sigma2: float = DEFAULT_SIGMA2,
    dim_exponent: float = DEFAULT_DIM_EXPONENT,
    label_form: LabelForm = "per_attribute",
    normalize: Normalisation = "neuron",
    unit: Unit = "bits",
) -> MIBounds:
    """Rigorous bounds on I(T; Y), T = L' + N(0, σ²) with L' uniform over the calibration samples.

    H_BD ≤ H ≤ H_KL holds for the entropy of any Gaussian mixture (Kolchinsky & Tracey 2017), so
    upper = H_KL(T) − H_BD(T|Y) and lower = H_BD(T) − H_KL(T|Y); per-attribute labels sum the
    bracket over attributes. Unlike the two point estimates, these are always ordered.
    """
    x = normalise_features(as_feature_tensor(features), normalize)
    columns = _as_columns(labels, x.shape[0]).in_form(label_form)
    flat = x.reshape(x.shape[0], -1)
    dist = pairwise_sq_distances(flat)
    variance = scaled_variance(sigma2, flat.shape[1], dim_exponent)
    n = flat.shape[0]
    # Entropies without the common d/2·log(2πeσ²) term: −mean_i log mean_j exp(−D_ij / (f·σ²)).
    h_kl, h_bd = (float(math.log(n) - torch.logsumexp(-dist / (f * variance), dim=1).mean()) for f in (2.0, 8.0))
    lower = upper = 0.0
    for m in range(columns.num_columns):
        codes = columns.codes[:, m]
        same = codes[:, None] == codes[None, :]
        log_counts = torch.log(columns.counts[m][codes].double())
        cond_kl, cond_bd = (
            float((log_counts - torch.logsumexp((-dist / (f * variance)).masked_fill(~same, -math.inf), dim=1)).mean())
            for f in (2.0, 8.0)
        )
        upper += h_kl - cond_bd
        lower += h_bd - cond_kl
    return MIBounds(to_unit(lower, unit), to_unit(upper, unit), unit)
