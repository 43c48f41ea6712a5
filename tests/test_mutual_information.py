"""The pairwise-distance MI estimator (pamfx.analysis.mutual_information)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import integrate, stats
from scipy.special import logsumexp

from pamfx.analysis.mutual_information import (
    estimate_mi,
    mi_bounds,
    select_sigma2,
    as_feature_tensor,
    normalise_features,
)
from pamfx.errors import InputError
from tools.mi_tables import noise_drift_table

PLAIN = dict(sigma2=0.5, dim_exponent=0.0, leave_one_out=False, bias_correction=False)  # the paper's literal estimate


def _clusters(n_per_class: int, classes: int, dims: int, spread: float, seed: int):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n_per_class)
    centres = rng.normal(0.0, spread, (classes, dims))
    return centres[y] + rng.standard_normal((y.size, dims)), y


def test_bits_and_nats_are_consistent():
    x, y = _clusters(40, 3, 4, 1.0, 0)
    for options in ({}, PLAIN):
        bits = estimate_mi(x, y, **options)
        nats = estimate_mi(x, y, unit="nats", **options)
        assert bits == pytest.approx(nats / math.log(2), rel=1e-12)
    with pytest.raises(InputError, match="unit"):
        estimate_mi(x, y, unit="bans")


@pytest.mark.parametrize("options", [dict(sigma2=0.05), PLAIN, dict(sigma2=0.05, divergence="bhattacharyya")])
def test_well_separated_clusters_carry_the_label_entropy(options):
    """Four tight clusters at 50·e_c: after normalisation they are ≥ 2.3 apart per coordinate,
    far beyond the kernel width, so I = H(Y) = 2 bits. Leaving each sample out of its own class
    density (N_y − 1 = 49 others) lifts the ceiling to log2(199 / 49) = 2.022 bits."""
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(4), 50)
    x = 50.0 * np.eye(4)[y] + rng.standard_normal((200, 4))
    value = estimate_mi(x, y, **options)
    ceiling = math.log2(199 / 49) if options.get("leave_one_out", True) else 2.0
    assert 2.0 - 0.01 <= value <= ceiling + 1e-9


def test_label_independent_features_carry_nothing():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((600, 8))
    y = rng.integers(0, 3, 600)
    attributes = rng.integers(0, 2, (600, 4))
    assert abs(estimate_mi(x, y)) < 0.02
    assert abs(estimate_mi(x, attributes)) < 0.04  # a sum over four attributes


def test_gaussian_mixture_matches_the_closed_form():
    """x | y ~ N(2y, 1), balanced binary y: I(X; Y) by quadrature is 0.486 bits.

    Tolerance 0.04 bits: the sample-to-sample spread of the estimate at N = 2000 is about 0.015
    bits (seeds 0–3 give 0.460–0.503) plus a small smoothing bias at σ² = 0.05.
    """
    p0, p1 = stats.norm(0, 1).pdf, stats.norm(2, 1).pdf

    def term(p):
        return integrate.quad(lambda t: p(t) * np.log2(p(t) / (0.5 * p0(t) + 0.5 * p1(t))), -15, 17)[0]

    truth = 0.5 * term(p0) + 0.5 * term(p1)
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 2000)
    x = (2.0 * y + rng.standard_normal(2000))[:, None]
    assert truth == pytest.approx(0.486, abs=0.001)
    assert estimate_mi(x, y, sigma2=0.05) == pytest.approx(truth, abs=0.04)


def test_bounds_contain_a_monte_carlo_reference():
    """The Kolchinsky–Tracey bracket contains I(T; Y) of the noisy empirical mixture, sampled."""
    x, y = _clusters(50, 3, 2, 1.5, 4)
    sigma2 = 0.3
    bounds = mi_bounds(x, y, sigma2=sigma2, dim_exponent=0.0)
    centres = normalise_features(as_feature_tensor(x)).numpy()[:, :, 0]
    rng = np.random.default_rng(5)
    samples = 20000
    index = rng.integers(0, len(y), samples)
    t = centres[index] + rng.standard_normal((samples, 2)) * math.sqrt(sigma2)
    log_k = -((t[:, None, :] - centres[None, :, :]) ** 2).sum(-1) / (2 * sigma2)
    log_marginal = logsumexp(log_k, axis=1) - math.log(len(y))
    log_conditional = np.empty(samples)
    for c in range(3):
        rows, members = y[index] == c, y == c
        log_conditional[rows] = logsumexp(log_k[rows][:, members], axis=1) - math.log(members.sum())
    values = (log_conditional - log_marginal) / math.log(2)
    mc, error = values.mean(), values.std() / math.sqrt(samples)
    assert bounds.lower - 4 * error <= mc <= bounds.upper + 4 * error


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    n_per_class=st.integers(2, 12),
    classes=st.integers(2, 4),
    dims=st.integers(1, 3),
    sigma2=st.floats(0.01, 10.0),
    spread=st.floats(0.0, 5.0),
)
def test_upper_bound_is_never_below_lower_bound(seed, n_per_class, classes, dims, sigma2, spread):
    x, y = _clusters(n_per_class, classes, dims, spread, seed)
    bounds = mi_bounds(x, y, sigma2=sigma2)
    assert bounds.lower <= bounds.upper + 1e-12


def test_plain_kl_and_bhattacharyya_estimates_are_not_ordered_in_general():
    """Why `mi_bounds` exists: KL-for-both-terms can fall below Bhattacharyya-for-both-terms."""
    x = np.array([-1.8498816481461333, -1.849881648161904, 1.4170554107534916, -1.8443214682054485, 1.4061871309802894])
    y = np.array([1, 1, 0, 0, 1])
    options = dict(
        sigma2=0.3476355928425827, dim_exponent=0.0, leave_one_out=False, bias_correction=False, normalize="none",
        unit="nats",
    )
    kl = estimate_mi(x[:, None], y, **options)
    bd = estimate_mi(x[:, None], y, divergence="bhattacharyya", **options)
    assert kl < bd - 1e-6
    bounds = mi_bounds(x[:, None], y, sigma2=options["sigma2"], dim_exponent=0.0, normalize="none", unit="nats")
    assert bounds.lower <= min(kl, bd) and max(kl, bd) <= bounds.upper


def test_joint_and_per_attribute_forms_agree_on_a_single_attribute():
    x, y = _clusters(30, 2, 3, 1.0, 6)
    as_column = y[:, None]
    values = [estimate_mi(x, labels, label_form=form) for labels in (y, as_column) for form in ("joint", "per_attribute")]
    assert max(values) - min(values) < 1e-12


def test_per_attribute_form_sums_the_attributes():
    rng = np.random.default_rng(7)
    attributes = rng.integers(0, 2, (300, 3))
    x = attributes @ rng.normal(0, 1, (3, 4)) + rng.standard_normal((300, 4))
    total = estimate_mi(x, attributes)
    assert total == pytest.approx(sum(estimate_mi(x, attributes[:, a]) for a in range(3)), rel=1e-10)
    joint = estimate_mi(x, attributes, label_form="joint")  # 8 joint classes, each well populated
    assert joint > 0


def test_degenerate_joint_labels_are_refused():
    rng = np.random.default_rng(8)
    attributes = rng.integers(0, 2, (200, 12))  # 4096 possible vectors for 200 samples
    x = rng.standard_normal((200, 3))
    with pytest.raises(InputError, match="degenerate"):
        estimate_mi(x, attributes, label_form="joint")
    assert np.isfinite(estimate_mi(x, attributes, label_form="per_attribute"))


def test_the_default_does_not_reward_label_independent_neurons():
    """docs/design.md §3: one weak neuron plus k noise neurons. The plain estimate drifts to H(Y) = 1 bit;
    the default (corrected leave-one-out, σ² ∝ √d) never rises above the neuron alone."""
    table = noise_drift_table(noise_counts=(0, 5, 10, 20))
    plain = table["plain, sigma2=0.5 (paper)"]
    default = table["corrected leave-one-out, 0.5*sqrt(d) (default)"]
    assert plain[0] < 0.3 and plain[-1] > 0.95
    assert all(b <= a + 0.005 for a, b in zip(default, default[1:]))
    assert all(v > 0.05 for v in default)  # the informative neuron still counts


def test_bias_correction_removes_the_leave_one_out_drift_on_clustered_features():
    """Neurons that encode other, independent attributes form clusters; the uncorrected
    leave-one-out estimate reads them as negative information about y, the default does not."""
    rng = np.random.default_rng(13)
    other = rng.integers(0, 2, (800, 5))
    features = 2.0 * (other[:, rng.integers(0, 5, 96)] - 0.5) + rng.standard_normal((800, 96))
    y = rng.integers(0, 2, (800, 3))
    uncorrected = estimate_mi(features, y, bias_correction=False)
    corrected = estimate_mi(features, y)
    assert uncorrected < -0.02
    assert abs(corrected) < 0.5 * abs(uncorrected) and abs(corrected) < 0.02


def test_normalisation_makes_the_estimate_scale_free():
    x, y = _clusters(40, 3, 3, 1.0, 9)
    rescaled = x * np.array([100.0, 0.01, 3.0]) + np.array([5.0, -2.0, 0.0])
    assert estimate_mi(rescaled, y) == pytest.approx(estimate_mi(x, y), rel=1e-9)
    permutation = np.random.default_rng(0).permutation(len(y))
    assert estimate_mi(x[permutation][:, [2, 0, 1]], y[permutation]) == pytest.approx(estimate_mi(x, y), rel=1e-9)


def test_conv_maps_are_accepted_as_several_values_per_neuron():
    rng = np.random.default_rng(10)
    y = rng.integers(0, 2, 120)
    maps = rng.standard_normal((120, 3, 2, 2)) + y[:, None, None, None]
    assert estimate_mi(maps, y) == pytest.approx(estimate_mi(maps.reshape(120, 3, 4), y), rel=1e-12)
    assert estimate_mi(maps, y) > 0.2


def test_data_driven_sigma2_shrinks_with_more_samples():
    rng = np.random.default_rng(11)
    chosen = []
    for n in (100, 2000):
        x = normalise_features(as_feature_tensor(rng.standard_normal((n, 2))))
        chosen.append(select_sigma2(x))
    assert chosen[1] < chosen[0]
    y = rng.integers(0, 2, 300)
    assert np.isfinite(estimate_mi(rng.standard_normal((300, 2)), y, sigma2="loo-likelihood"))


def test_bad_input_is_named():
    x, y = _clusters(10, 2, 2, 1.0, 12)
    with pytest.raises(InputError, match="labels has 19 samples but the features have 20"):
        estimate_mi(x, y[:-1])
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(InputError, match="NaN/inf.*sample 3, neuron 1"):
        estimate_mi(bad, y)
    lonely = y.copy()
    lonely[0] = 7
    with pytest.raises(InputError, match="fewer than two samples"):
        estimate_mi(x, lonely)
    with pytest.raises(InputError, match="integer"):
        estimate_mi(x, y + 0.5)
    with pytest.raises(InputError, match="sigma2"):
        estimate_mi(x, y, sigma2=-1.0)
    with pytest.raises(InputError, match="label_form"):
        estimate_mi(x, y, label_form="both")
