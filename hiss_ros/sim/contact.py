"""Contact between the hemispherical fingertip and a flat surface: wrench and texture vibration.

With n the surface's outward unit normal (world), c the tip-sphere centre and r its radius:

    penetration  d  = r - n.c                       (the plane passes through the origin)
    normal force Fn = max(0, k d + c_d dd/dt)  where d > 0, else 0        (spring-damper)
    contact point x = c - r n ;  slip  v_t = (v_c + w x (x - c)) projected on the plane
    friction     Ft = -(mu Fn / sqrt(|v_t|^2 + v_s^2) + b [Fn > 0]) v_t   (smoothed Coulomb + viscous)
    F = Fn n + Ft,   wrench in the tool frame:  F_b = R^T F,   tau_b = r_b x F_b

where r_b is the contact point in the tool frame (tool origin = IMU). The wrench is the one the
surface exerts on the tool (so the normal component is positive, pointing out of the surface).

Simplified: one contact point (no line or patch contact), a rigid plane, no stick-slip
(the friction is a smooth function of the slip velocity), and the force does not deflect the
scripted motion. Texture vibration is a phenomenological acceleration of the compliant finger
mount that the IMU feels while sliding (sub-micrometre: not part of the pose ground truth).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

TEXTURE_WAVES = 6


@dataclass
class ContactParams:
    radius: float  # m, fingertip hemisphere
    stiffness: float  # N/m
    damping: float  # N s/m
    mu: float
    viscous: float  # N s/m
    slip_velocity: float  # m/s


@dataclass
class Contact:
    depth: np.ndarray  # (n,) penetration [m], negative when clear of the surface
    normal_force: np.ndarray  # (n,) [N], >= 0
    in_contact: np.ndarray  # (n,) bool, normal_force > 0
    point_body: np.ndarray  # (n, 3) contact point (lowest point of the tip) in the tool frame [m]
    point_world: np.ndarray  # (n, 3) [m]
    slip_world: np.ndarray  # (n, 3) tangential velocity of the tip's material at the contact [m/s]
    force_world: np.ndarray  # (n, 3) [N] on the tool
    force_body: np.ndarray  # (n, 3)
    friction_body: np.ndarray  # (n, 3) tangential part of force_body
    torque_body: np.ndarray  # (n, 3) [N m] about the tool origin


def contact(params: ContactParams, normal: np.ndarray, centre: np.ndarray, centre_vel: np.ndarray,
            tool_rot: Rotation, tool_origin: np.ndarray, w_world: np.ndarray) -> Contact:
    """Contact of a tip centred at ``centre`` (n, 3) moving at ``centre_vel`` (n, 3), tool
    orientation ``tool_rot`` (tool -> world), tool origin ``tool_origin`` (n, 3), angular velocity
    ``w_world`` (n, 3), with the plane through the origin of unit normal ``normal`` (3,)."""
    n = normal / np.linalg.norm(normal)
    depth = params.radius - centre @ n  # (n,)
    depth_rate = -(centre_vel @ n)
    fn = np.where(depth > 0, np.maximum(params.stiffness * depth + params.damping * depth_rate, 0.0), 0.0)
    point = centre - params.radius * n  # (n, 3)
    v_point = centre_vel + np.cross(w_world, point - centre)
    slip = v_point - np.outer(v_point @ n, n)
    speed2 = np.einsum("ij,ij->i", slip, slip)
    in_contact = fn > 0
    gain = params.mu * fn / np.sqrt(speed2 + params.slip_velocity**2) + params.viscous * in_contact
    friction = -gain[:, None] * slip
    force = np.outer(fn, n) + friction
    inv = tool_rot.inv()
    force_b = inv.apply(force)
    point_b = inv.apply(point - tool_origin)
    return Contact(depth, fn, in_contact, point_b, point, slip, force, force_b, inv.apply(friction),
                   np.cross(point_b, force_b))


def texture_vibration(rng: np.random.Generator, c: Contact, tool_rot: Rotation, normal: np.ndarray,
                      gain: float, imu_rate_hz: float) -> np.ndarray:
    """(n, 3) acceleration [m/s^2] in the tool frame from sliding over a random surface texture:
    waves of 2-8 mm wavelength excite the finger at f = v_t . k; amplitude grows with the normal
    force and the slip speed; frequencies above 0.4 x the IMU rate are attenuated (the IMU's
    anti-aliasing filter)."""
    wavelength = rng.uniform(0.002, 0.008, TEXTURE_WAVES)
    heading = rng.uniform(0, 2 * np.pi, TEXTURE_WAVES)
    phase0 = rng.uniform(0, 2 * np.pi, TEXTURE_WAVES)
    # wave vectors in the surface plane [1/m], (M, 3)
    e1 = np.cross(normal, [1.0, 0.0, 0.0] if abs(normal[0]) < 0.9 else [0.0, 1.0, 0.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(normal, e1)
    k = (np.outer(np.cos(heading), e1) + np.outer(np.sin(heading), e2)) / wavelength[:, None]
    freq = np.abs(c.slip_world @ k.T)  # (n, M) Hz
    lowpass = 1.0 / np.sqrt(1.0 + (freq / (0.4 * imu_rate_hz)) ** 4)
    wave = (lowpass * np.sin(2 * np.pi * c.point_world @ k.T + phase0)).sum(1) / np.sqrt(TEXTURE_WAVES)
    speed = np.linalg.norm(c.slip_world, axis=1)
    amp = gain * c.normal_force * np.tanh(speed / 0.01) * wave  # (n,)
    slip_dir = c.slip_world / np.maximum(speed, 1e-9)[:, None]
    direction = tool_rot.inv().apply(normal[None, :] + 0.5 * slip_dir)  # mostly along the normal
    return amp[:, None] * direction
