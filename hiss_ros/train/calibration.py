"""Calibration of the variance head: the post-hoc variance scale and how well variances fit errors.

Shapes: K chunks, O output channels. ``error`` is estimate - truth and ``variance`` the predicted
variance, both (K, O) in the same units (normalised, or physical); z = error / sqrt(variance) is
then unit-free, and a calibrated model has z ~ N(0, 1) per channel: mean(z^2) = 1, 68.3% / 95.4% /
99.7% of |z| within 1 / 2 / 3.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

import numpy as np

SIGMAS = (1, 2, 3)  # coverage reported within this many predicted standard deviations
# Central-interval probabilities of the reliability diagram: 5% .. 95% in steps of 5%, and 99%.
LEVELS = (*(round(0.05 * i, 2) for i in range(1, 20)), 0.99)


def variance_scale(error: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """(O,) per-channel factor s such that mean(error^2 / (s * variance)) = 1 over the K chunks."""
    return (error.astype(np.float64) ** 2 / variance).mean(0)


def gaussian_nll(error: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """(K, O) negative log-likelihood of each truth under N(estimate, variance), constant included."""
    return 0.5 * (math.log(2 * math.pi) + np.log(variance) + error.astype(np.float64) ** 2 / variance)


def coverage(error: np.ndarray, variance: np.ndarray, half_widths: np.ndarray) -> np.ndarray:
    """(O, P) fraction of chunks with |z| <= half_widths[p] (half-widths in standard deviations)."""
    z = np.abs(error) / np.sqrt(variance)  # (K, O)
    return (z[:, :, None] <= np.asarray(half_widths, dtype=np.float64)).mean(0)


def interval_half_width(level: float) -> float:
    """Half-width in standard deviations of the central interval holding ``level`` of a Gaussian."""
    return NormalDist().inv_cdf(0.5 + level / 2)


def calibration_metrics(error: np.ndarray, variance: np.ndarray, channels: list[str]) -> dict[str, Any]:
    """Coverage within 1/2/3 sigma, mean z^2 and Gaussian NLL per channel (NLL in the units given:
    normalised ones make channels comparable), and the reliability diagram's points."""
    sigma = coverage(error, variance, np.array(SIGMAS))  # (O, 3)
    nll = gaussian_nll(error, variance).mean(0)  # (O,)
    z2 = (error.astype(np.float64) ** 2 / variance).mean(0)
    observed = coverage(error, variance, np.array([interval_half_width(p) for p in LEVELS]))  # (O, P)

    def per_channel(values: np.ndarray) -> dict[str, float]:
        return dict(zip(channels, (round(float(v), 6) for v in values), strict=True))

    return {
        **{f"within_{k}_sigma": per_channel(sigma[:, i]) for i, k in enumerate(SIGMAS)},
        "ideal_within_sigma": [round(math.erf(k / math.sqrt(2)), 4) for k in SIGMAS],
        "mean_z2": per_channel(z2),
        "nll": per_channel(nll),
        "nll_mean": float(nll.mean()),
        "reliability": {"expected": list(LEVELS),
                        "observed": {c: [round(float(v), 4) for v in row] for c, row in zip(channels, observed,
                                                                                             strict=True)}},
    }
