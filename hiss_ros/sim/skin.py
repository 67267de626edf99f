"""Magnetic tactile skin (AnySkin-like): magnetised elastomer over 3-axis magnetometers.

The skin covers the hemispherical fingertip; each taxel is a magnetometer under a magnet layer
at height h (its own frame: z along the outward normal). Contact at point x (tool frame) with
normal force Fn and friction (shear) force Fs deforms the elastomer:

    compression  u_n = u_max tanh(Fn / F_sat)                       (the elastomer stiffens)
    shear        u_s = s_max Fs / (F_s,sat + |Fs|)                   (tool-frame vector)
    memory       u  <- 0.6 u + 0.2 play_r(u) + 0.2 creep(u)          (hysteresis, per channel)

where play_r is a backlash (Prandtl-Ishlinskii) operator of width r and creep a first-order
lag that follows loading fast (50 ms) and unloading slowly (400 ms), like a viscoelastic
elastomer. Above taxel i, with w_i = exp(-|x - q_i|^2 / 2 sigma^2) the deformation falloff:

    magnet offset  rho_i = (w_i [P_i u_s + b u_n P_i (q_i - x) / sigma],  h - w_i u_n)
    field          B_i   = K_i (3 rho_z rho / |rho|^5 - z / |rho|^3)    (dipole along z)

so pressing pulls the magnet closer (B_z grows as ~1/h^3: a saturating-then-steepening,
monotonic response) and shear or the bulge around an off-centre contact tilts the field
(B_x, B_y). The measurement adds the rest field, the geomagnetic field rotated into each taxel,
a temperature drift (remanence -0.12 %/K and per-channel offsets), white noise, and clips to
the magnetometer's range.

Simplified: one global deformation state (not per-taxel memory), point contact, no magnetic
crosstalk between magnets beyond a constant offset, the skin's thickness ignored in the
geometry. The device (taxel gains, offsets) is the same for every seed: one physical skin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

DEVICE_SEED = 20_240_611  # the skin's manufacturing variation, shared by every recording
EARTH_FIELD_DIRECTION = np.array([0.4, 0.0, -0.9165])  # world frame, mid-latitude (unit vector)


@dataclass(frozen=True)
class SkinParams:
    sigma: float = 0.006  # m, deformation falloff with distance from the contact
    height: float = 0.0025  # m, magnet above the magnetometer at rest
    compression_max: float = 0.001  # m
    force_sat: float = 10.0  # N
    shear_max: float = 0.0006  # m
    shear_sat: float = 4.0  # N
    bulge: float = 0.3  # lateral push of the material away from the contact, per unit compression
    rest_field_ut: float = 500.0  # |B| of each magnet at rest [uT]
    range_ut: float = 2000.0  # magnetometer full scale [uT], saturates beyond
    play: float = 0.08  # backlash width, fraction of compression_max / shear_max
    tau_load: float = 0.05  # s
    tau_unload: float = 0.4  # s
    weights: tuple[float, float, float] = (0.6, 0.2, 0.2)  # direct, play, creep
    remanence_tempco: float = -0.0012  # 1/K
    offset_tempco_ut: float = 2.0  # uT/K, sigma across channels


def taxel_layout(n: int, centre: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Taxel positions (n, 3) on the lower cap of the tip sphere, tool frame, and their frames
    (n, 3, 3) whose columns are the taxel's x, y, z axes (z = outward normal)."""
    if n == 1:
        polar, azim = np.zeros(1), np.zeros(1)
    elif n <= 9:  # one at the pole, the rest on a ring
        polar = np.r_[0.0, np.full(n - 1, np.deg2rad(35))]
        azim = np.r_[0.0, np.arange(n - 1) * 2 * np.pi / (n - 1)]
    else:  # golden-angle spiral over a 55 degree cap
        k = np.arange(n)
        polar = np.arccos(1 - (1 - np.cos(np.deg2rad(55))) * k / (n - 1))
        azim = k * np.pi * (3 - np.sqrt(5))
    normal = np.stack([np.sin(polar) * np.cos(azim), np.sin(polar) * np.sin(azim), -np.cos(polar)], 1)
    x = np.array([1.0, 0.0, 0.0]) - normal[:, :1] * normal  # tool x projected on the tangent plane
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = np.cross(normal, x)
    return centre + radius * normal, np.stack([x, y, normal], axis=2)


def hysteresis(x: np.ndarray, width: np.ndarray, dt: float, p: SkinParams) -> np.ndarray:
    """(n, c) -> (n, c): direct + backlash (play operator of ``width`` (c,)) + asymmetric creep,
    starting relaxed at x[0]. Monotone input gives monotone output."""
    w_direct, w_play, w_creep = p.weights
    a_up, a_down = 1 - np.exp(-dt / p.tau_load), 1 - np.exp(-dt / p.tau_unload)
    play_out, creep_out = np.empty_like(x), np.empty_like(x)
    play, creep = x[0].tolist(), x[0].tolist()
    r = width.tolist()
    for k, row in enumerate(x.tolist()):
        for j, v in enumerate(row):
            if v - r[j] > play[j]:
                play[j] = v - r[j]
            elif v + r[j] < play[j]:
                play[j] = v + r[j]
            c = creep[j]
            creep[j] = c + (v - c) * (a_up if abs(v) > abs(c) else a_down)
        play_out[k], creep_out[k] = play, creep
    return w_direct * x + w_play * play_out + w_creep * creep_out


class MagneticSkin:
    """The skin of ``taxels`` magnetometers on a tip of ``radius`` centred at ``centre`` (tool frame)."""

    def __init__(self, taxels: int, centre: np.ndarray, radius: float, params: SkinParams | None = None) -> None:
        self.p = params or SkinParams()
        self.n = taxels
        self.positions, self.frames = taxel_layout(taxels, np.asarray(centre, float), radius)  # (N,3), (N,3,3)
        dev = np.random.default_rng(DEVICE_SEED)
        self.gain = 1 + 0.1 * dev.standard_normal(taxels)  # (N,) magnet strength variation
        self.offset_ut = 30.0 * dev.standard_normal((taxels, 3))  # neighbouring magnets, hard iron
        self.offset_tempco = self.p.offset_tempco_ut * dev.standard_normal((taxels, 3))  # uT/K

    # --- mechanics --------------------------------------------------------------------------
    def deformation(self, normal_force: np.ndarray, shear_force: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Static elastomer displacement: compression (n,) [m] and shear (n, 3) [m], tool frame."""
        p = self.p
        u_n = p.compression_max * np.tanh(np.maximum(normal_force, 0.0) / p.force_sat)
        mag = np.linalg.norm(shear_force, axis=1, keepdims=True)
        return u_n, p.shear_max * shear_force / (p.shear_sat + mag)

    def with_memory(self, u_n: np.ndarray, u_s: np.ndarray, dt: float) -> tuple[np.ndarray, np.ndarray]:
        """Hysteresis of the displacement time series sampled every ``dt`` seconds."""
        width = self.p.play * np.array([self.p.compression_max, *[self.p.shear_max] * 3])
        y = hysteresis(np.column_stack([u_n, u_s]), width, dt, self.p)
        return np.maximum(y[:, 0], 0.0), y[:, 1:]

    # --- magnetics --------------------------------------------------------------------------
    def field(self, location: np.ndarray, u_n: np.ndarray, u_s: np.ndarray) -> np.ndarray:
        """(n, N, 3) magnet field [uT] in each taxel's frame for a contact at ``location`` (n, 3,
        tool frame) with compression ``u_n`` (n,) and shear ``u_s`` (n, 3). Noise-free, static."""
        p = self.p
        d = self.positions[None] - location[:, None]  # (n, N, 3) contact -> taxel
        w = np.exp(-np.einsum("nij,nij->ni", d, d) / (2 * p.sigma**2))  # (n, N)
        lateral_tool = u_s[:, None] + p.bulge * u_n[:, None, None] * d / p.sigma  # (n, N, 3)
        lateral = np.einsum("nij,ijk->nik", lateral_tool, self.frames)  # taxel-frame components
        rho = np.empty_like(lateral)
        rho[..., :2] = w[..., None] * lateral[..., :2]
        rho[..., 2] = p.height - w * u_n[:, None]
        r2 = np.einsum("nij,nij->ni", rho, rho)
        k = self.gain * p.rest_field_ut * p.height**3 / 2  # (N,)
        b = 3 * rho * rho[..., 2:3] / r2[..., None] ** 2.5
        b[..., 2] -= 1 / r2**1.5
        return k[None, :, None] * b

    def respond(self, location: np.ndarray, normal_force: np.ndarray, shear_force: np.ndarray,
                dt: float) -> np.ndarray:
        """(n, N, 3) noise-free magnet field [uT] for a contact time series sampled every ``dt``."""
        u_n, u_s = self.with_memory(*self.deformation(normal_force, shear_force), dt)
        return self.field(location, u_n, u_s)

    def measure(self, magnet_field: np.ndarray, tool_rot: Rotation, delta_temp: np.ndarray,
                earth_field_ut: float, noise: np.ndarray) -> np.ndarray:
        """(n, N*3) float32 readings [uT], taxel-major [b0x, b0y, b0z, b1x, ...]: the magnet field
        (n, N, 3) with temperature ``delta_temp`` (n,) [K], the geomagnetic field seen through
        ``tool_rot`` (tool -> world), constant offsets, additive ``noise`` (n, N, 3), clipped."""
        earth_tool = tool_rot.inv().apply(earth_field_ut * EARTH_FIELD_DIRECTION)  # (n, 3)
        earth = np.einsum("nj,ijk->nik", earth_tool, self.frames)  # (n, N, 3)
        dt_k = delta_temp[:, None, None]
        b = magnet_field * (1 + self.p.remanence_tempco * dt_k) + self.offset_ut + self.offset_tempco * dt_k
        b = np.clip(b + earth + noise, -self.p.range_ut, self.p.range_ut)
        return b.reshape(len(b), -1).astype(np.float32)
