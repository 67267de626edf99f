"""Simulator settings: one validated dataclass, loadable from YAML (keys = field names).

    cfg = SimConfig(seconds=60, seed=3, noise_scale=0.5)
    cfg = SimConfig.load("sim.yaml", seconds=120)     # YAML values, then overrides

Every error names the field and the value, e.g. ``imu_rate_hz = -1: expected a positive number``.
Noise, bias and drift amplitudes are multiplied by ``noise_scale`` (0 = perfect sensors; the
physics -- contact, friction, hysteresis, saturation, vibration -- stays).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from fractions import Fraction
from pathlib import Path
from typing import Any

from hiss_ros.configfile import read_yaml, reject_unknown
from hiss_ros.errors import ConfigError

MOTIONS = ("contact", "still")  # scripted contact work, or one stationary pose in free space
MAX_BASE_RATE_HZ = 20_000
MAX_TAXELS = 64


@dataclass(frozen=True)
class SimConfig:
    seconds: float = 60.0
    seed: int = 0
    imu_rate_hz: float = 400.0
    tactile_rate_hz: float = 100.0
    gt_rate_hz: float = 100.0
    taxels: int = 5  # magnetometers (3 channels each)
    noise_scale: float = 1.0
    motion: str = "contact"
    start_s: float = 1000.0  # stamp of the first sample, so stamps are positive
    # Geometry [m]: the tip is a hemisphere of tip_radius whose centre is tool_length below the
    # tool frame origin (= the IMU) along the tool's -z axis.
    tip_radius: float = 0.012
    tool_length: float = 0.06
    surface_tilt_deg: float = 10.0  # the surface plane is tilted by up to this, at random per seed
    # Contact (spring-damper normal force, smoothed Coulomb + viscous friction)
    contact_stiffness: float = 2500.0  # N/m
    contact_damping: float = 25.0  # N s/m
    friction_mu: float = 0.5
    viscous_friction: float = 4.0  # N s/m, while in contact
    slip_velocity: float = 0.004  # m/s: Coulomb friction reaches ~70 % of mu*Fn at this slip speed
    vibration: float = 0.04  # m/s^2 per N: texture vibration the IMU feels while sliding
    # IMU (Kalibr-style densities; per-sample sigma = density * sqrt(rate))
    gyro_noise_density: float = 2.5e-4  # rad/s/sqrt(Hz)
    accel_noise_density: float = 2.0e-3  # m/s^2/sqrt(Hz)
    gyro_bias_walk: float = 1.0e-4  # rad/s^2/sqrt(Hz)
    accel_bias_walk: float = 1.0e-3  # m/s^3/sqrt(Hz)
    gyro_bias_init: float = 0.005  # rad/s, sigma of the initial bias
    accel_bias_init: float = 0.05  # m/s^2
    # Tactile skin
    tactile_noise_ut: float = 1.0  # microtesla, white noise sigma per channel
    temperature_drift_k: float = 3.0  # kelvin: scale of the slow temperature change
    earth_field_ut: float = 50.0  # magnitude of the geomagnetic field the magnetometers also see

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "motion":
                if v not in MOTIONS:
                    raise ConfigError(f"motion = {v!r}: expected one of {list(MOTIONS)}")
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"{f.name} = {v!r}: expected a number")
        for name in ("seed", "taxels"):
            if not isinstance(getattr(self, name), int):
                raise ConfigError(f"{name} = {getattr(self, name)!r}: expected an integer")
        if self.seed < 0:
            raise ConfigError(f"seed = {self.seed}: expected a non-negative integer")
        if not 1 <= self.taxels <= MAX_TAXELS:
            raise ConfigError(f"taxels = {self.taxels}: expected an integer in [1, {MAX_TAXELS}]")
        positive = ("seconds", "imu_rate_hz", "tactile_rate_hz", "gt_rate_hz", "tip_radius", "tool_length",
                    "contact_stiffness", "slip_velocity")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} = {getattr(self, name)!r}: expected a positive number")
        for f in fields(self):
            if f.name not in positive and f.name != "motion" and getattr(self, f.name) < 0:
                raise ConfigError(f"{f.name} = {getattr(self, f.name)!r}: expected a non-negative number")
        if self.surface_tilt_deg > 45:
            raise ConfigError(f"surface_tilt_deg = {self.surface_tilt_deg}: expected at most 45")
        n_base = self.seconds * self.base_rate_hz  # also validates the rates' common multiple
        if n_base < 2:
            raise ConfigError(f"seconds = {self.seconds}: too short for even two samples at "
                              f"{self.base_rate_hz:g} Hz")

    @property
    def base_rate_hz(self) -> float:
        """The simulation rate: the least common multiple of the sensor rates, so each sensor is
        an exact decimation of it."""
        rates = {"imu_rate_hz": self.imu_rate_hz, "tactile_rate_hz": self.tactile_rate_hz,
                 "gt_rate_hz": self.gt_rate_hz}
        fracs = {k: Fraction(v).limit_denominator(1000) for k, v in rates.items()}
        for k, fr in fracs.items():
            if abs(float(fr) - rates[k]) > 1e-9 * rates[k]:
                raise ConfigError(f"{k} = {rates[k]!r}: expected a rate with a common multiple (e.g. a whole "
                                  "number of Hz)")
        num = math.lcm(*(fr.numerator for fr in fracs.values()))
        den = math.gcd(*(fr.denominator for fr in fracs.values()))
        base = num / den
        if base > MAX_BASE_RATE_HZ:
            listing = ", ".join(f"{k} = {v:g}" for k, v in rates.items())
            raise ConfigError(f"{listing}: their least common multiple {base:g} Hz exceeds {MAX_BASE_RATE_HZ} Hz; "
                              "choose rates that divide a common rate (e.g. 400, 100, 100)")
        return base

    def decimation(self, rate_hz: float) -> int:
        """Base samples per sample of a sensor at ``rate_hz``."""
        return round(self.base_rate_hz / rate_hz)

    def replace(self, **changes: Any) -> SimConfig:
        return SimConfig.from_dict({**asdict(self), **changes})

    @classmethod
    def from_dict(cls, data: Any, source: str = "sim config") -> SimConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
        reject_unknown(data, cls, source)
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> SimConfig:
        """YAML settings from ``path``, then ``overrides`` (None values are ignored)."""
        data = read_yaml(path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of settings at the top level")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data, source=str(path))
