"""A gravity-free velocity feature from an IMU alone, computed in the pipeline (causal, state carried).

For each time constant tau, p_tau is a leaky integral of the raw specific force f (the
accelerometer), carried in the body frame by the gyro w:

    dp/dt = f - w x p - p / tau.

The transport term (- w x p) makes p the body-frame view of a world-frame leaky integral: p_tau =
R^T \\int exp(-(t - s) / tau) R(s) f(s) ds. Gravity is constant in the world frame, so its part of
every p_tau settles at tau * g (whatever the motion), while the rest is a leaky integral of the
kinematic acceleration, i.e. a leaky body-frame velocity. With two time constants t1 < t2,

    v = (t2 * p_t1 - t1 * p_t2) / (t2 - t1)

cancels gravity exactly and keeps the velocity (both leaky integrals agree on motion faster than
t1). No attitude estimate is needed: only the gyro's rotation from sample to sample. Each episode
starts at rest (p_tau = tau * f_0, the steady state of a sensor at rest), so there is no start-up
transient when it does; motion at the start decays away with t2.

Why it is there (docs/ACCURACY.md, "A strapdown velocity feature"): a learned model has to find
the ``w x p`` coupling from data, and recordings of pure rotation and pure translation never show
it; on BROAD's combined-motion trial every model failed where this feature does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation

from hiss_ros.errors import ConfigError

AXES = ("x", "y", "z")
CHANNELS = tuple(f"strapdown:velocity.{a}" for a in AXES)  # the derived channels' names


def _vector(value: Any, names: Sequence[str], key: str) -> tuple[int, int, int]:
    """``"topic:path"`` (the channels topic:path.x, .y, .z of the inputs) or 3 channel indices."""
    if isinstance(value, str):
        if ":" not in value:
            raise ConfigError(f"strapdown.{key} = {value!r}: expected 'topic:field' such as "
                              f"'/imu/data:angular_velocity' (its .x, .y, .z channels) or 3 channel indices")
        idx = []
        for a in AXES:
            try:
                idx.append(list(names).index(f"{value}.{a}"))
            except ValueError:
                raise ConfigError(f"strapdown.{key} = {value!r}: no input channel {value}.{a}; the inputs are "
                                  f"{list(names)}") from None
        return tuple(idx)  # type: ignore[return-value]
    if (isinstance(value, (list, tuple)) and len(value) == 3
            and all(isinstance(i, int) and not isinstance(i, bool) for i in value)):
        return tuple(value)  # type: ignore[return-value]
    raise ConfigError(f"strapdown.{key} = {value!r}: expected 'topic:field' or 3 channel indices")


@dataclass(frozen=True)
class StrapdownConfig:
    """Which input channels are the gyro (rad/s) and the accelerometer (m/s^2), as indices into
    the pipeline's row of all input channels, and the two time constants (s)."""

    gyro: tuple[int, int, int]
    accel: tuple[int, int, int]
    taus: tuple[float, float] = (1.0, 3.0)

    def __post_init__(self) -> None:
        taus = self.taus
        if (not isinstance(taus, (list, tuple)) or len(taus) != 2
                or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0 for t in taus)
                or not taus[0] < taus[1]):
            raise ConfigError(f"strapdown.taus = {taus!r}: expected two time constants in seconds, "
                              "0 < first < second (e.g. [1.0, 3.0])")
        object.__setattr__(self, "taus", (float(taus[0]), float(taus[1])))
        for key in ("gyro", "accel"):
            v = getattr(self, key)
            if len(v) != 3 or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in v):
                raise ConfigError(f"strapdown.{key} = {v!r}: expected 3 channel indices >= 0")
            object.__setattr__(self, key, tuple(v))
        if len(set(self.gyro + self.accel)) != 6:
            raise ConfigError(f"strapdown: gyro {list(self.gyro)} and accel {list(self.accel)} must be 6 "
                              "different channels")

    @classmethod
    def from_dict(cls, data: Any, channel_names: Sequence[str]) -> StrapdownConfig:
        """``{gyro: 'topic:field' | [i, j, k], accel: ..., taus: [t1, t2]}``; ``channel_names``:
        ``topic:field`` per input channel, in the pipeline's order."""
        if not isinstance(data, dict) or not {"gyro", "accel"} <= set(data) or set(data) - {"gyro", "accel", "taus"}:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ConfigError(f"strapdown: expected the keys gyro, accel (and optionally taus), got {got}; e.g. "
                              "{gyro: '/imu/data:angular_velocity', accel: '/imu/data:linear_acceleration'}")
        taus = data.get("taus", cls.taus)
        return cls(_vector(data["gyro"], channel_names, "gyro"), _vector(data["accel"], channel_names, "accel"),
                   tuple(taus) if isinstance(taus, list) else taus)

    def to_dict(self) -> dict[str, list]:
        return {"gyro": list(self.gyro), "accel": list(self.accel), "taus": list(self.taus)}


class Strapdown:
    """The feature's state over one episode; ``rows`` advances it over consecutive input rows."""

    def __init__(self, config: StrapdownConfig, rate_hz: float) -> None:
        self.config = config
        self.dt = 1.0 / rate_hz
        self._decay = np.exp(-self.dt / np.asarray(config.taus))  # (2,)
        # Per tick p <- decay * turn @ p + dt * f: a constant (world) f settles at f * dt / (1 - decay),
        # the discrete tau; mixing with these cancels gravity exactly, not to O(dt).
        self._taus = self.dt / (1.0 - self._decay)
        t1, t2 = self._taus
        self._mix = np.array([t2, -t1]) / (t2 - t1)  # v = p @ mix
        self._gyro, self._accel = list(config.gyro), list(config.accel)
        self.p: np.ndarray | None = None  # (3, 2): p_t1 and p_t2 as columns; None: a new episode

    def reset(self) -> None:
        self.p = None

    def rows(self, raw: np.ndarray) -> np.ndarray:
        """Input rows (n, C) in physical units -> the velocity feature after each row (n, 3)."""
        # (n, 3, 3): R_k^T R_{k-1}, the body turning over one tick
        turn = Rotation.from_rotvec(-raw[:, self._gyro] * self.dt).as_matrix()
        push = self.dt * raw[:, self._accel, None]  # (n, 3, 1)
        ps = np.empty((len(raw), 3, 2))
        p, k = self.p, self._decay
        for i in range(len(raw)):
            if p is None:  # at rest: the steady state of f_0
                p = push[i] / self.dt * self._taus
            else:
                p = turn[i] @ p
                p *= k
                p += push[i]
            ps[i] = p
        self.p = p
        return ps @ self._mix

