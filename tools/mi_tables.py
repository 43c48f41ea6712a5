"""The measured tables behind the MI estimator's default (docs/mutual_information.md).

Run ``python tools/mi_tables.py`` to reprint them: one weak neuron plus k pure-noise neurons per
estimator variant, and sets of m label-independent neurons (pure noise, and clustered like another
task's neurons) with the step an informative neuron adds.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pamfx.analysis.mutual_information import estimate_mi  # noqa: E402

PLAIN = dict(leave_one_out=False, bias_correction=False)
DRIFT_VARIANTS = {
    "plain, sigma2=0.5 (paper)": dict(sigma2=0.5, dim_exponent=0.0, **PLAIN),
    "leave-one-out, sigma2=0.5": dict(sigma2=0.5, dim_exponent=0.0, bias_correction=False),
    "plain, sigma2=0.5*sqrt(d)": dict(sigma2=0.5, dim_exponent=0.5, **PLAIN),
    "leave-one-out, sigma2=0.25*d": dict(sigma2=0.25, dim_exponent=1.0, bias_correction=False),
    "leave-one-out, sigma2=0.5*sqrt(d)": dict(sigma2=0.5, dim_exponent=0.5, bias_correction=False),
    "corrected leave-one-out, 0.5*sqrt(d) (default)": dict(sigma2=0.5, dim_exponent=0.5),
}


def noise_drift_table(
    noise_counts: Sequence[int] = (0, 5, 10, 20, 50), num_samples: int = 1000, seed: int = 0
) -> dict[str, list[float]]:
    """I (bits) of one weak neuron (x = y + N(0, 1), binary y) plus k pure-noise neurons, per estimator."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, num_samples)
    signal = (y + rng.standard_normal(num_samples))[:, None]
    noise = rng.standard_normal((num_samples, max(noise_counts)))
    return {
        name: [estimate_mi(np.hstack([signal, noise[:, :k]]), y, **options) for k in noise_counts]  # type: ignore[arg-type]
        for name, options in DRIFT_VARIANTS.items()
    }


def neutral_set_table(
    set_sizes: Sequence[int] = (8, 32, 128, 512), num_samples: int = 1000, seed: int = 0
) -> dict[str, list[tuple[float, float, float]]]:
    """Per estimator and set size m, in bits, with a binary label y:

    - I of m pure-noise neurons (the floor a greedy starts from),
    - its increase when one informative neuron x = 1.5·y + N(0, 1) joins (the step it must see),
    - I of m label-independent but clustered neurons (each ±2 × one of 5 binary attributes that are
      independent of y, plus noise — like neurons of another task).
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, num_samples)
    informative = (1.5 * y + rng.standard_normal(num_samples))[:, None]
    noise = rng.standard_normal((num_samples, max(set_sizes)))
    other = rng.integers(0, 2, (num_samples, 5))
    picks = rng.integers(0, 5, max(set_sizes))
    signs = rng.choice([-2.0, 2.0], max(set_sizes))
    clustered = signs * (other[:, picks] - 0.5) + rng.standard_normal((num_samples, max(set_sizes)))
    table = {}
    for name, options in DRIFT_VARIANTS.items():
        rows = []
        for m in set_sizes:
            floor = estimate_mi(noise[:, :m], y, **options)  # type: ignore[arg-type]
            step = estimate_mi(np.hstack([noise[:, :m], informative]), y, **options) - floor  # type: ignore[arg-type]
            rows.append((floor, step, estimate_mi(clustered[:, :m], y, **options)))  # type: ignore[arg-type]
        table[name] = rows
    return table


def main() -> None:
    """Print both tables."""
    print("one weak neuron + k noise neurons, k = 0, 5, 10, 20, 50 (bits)")
    for row_name, values in noise_drift_table().items():
        print(f"  {row_name:48s}", "  ".join(f"{v:6.3f}" for v in values))
    print("m = 8, 32, 128, 512: I(m noise neurons), its step when an informative neuron joins, I(m clustered")
    print("label-independent neurons) (bits)")
    for row_name, rows in neutral_set_table().items():
        print(f"  {row_name:48s}", " | ".join(f"{a:6.3f} {b:+6.3f} {c:6.3f}" for a, b, c in rows))


if __name__ == "__main__":
    main()
