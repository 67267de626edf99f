"""The simulated end-effector: script -> kinematics -> contact -> IMU, skin and ground truth.

    res = simulate(SimConfig(seconds=60, seed=0))
    res.imu_ns, res.gyro, res.accel            # (m,), (m, 3), (m, 3)       at imu_rate_hz
    res.tactile_ns, res.tactile                # (k,), (k, 3 * taxels)      at tactile_rate_hz
    res.gt_ns, res.position, res.orientation   # (g,), (g, 3), (g, 4) xyzw  at gt_rate_hz
    res.linear_velocity, res.angular_velocity  # (g, 3) body frame
    res.force, res.torque                      # (g, 3) tool frame, on the tool

Everything is computed on one base grid (the sensor rates' least common multiple, 400 Hz by
default) and each sensor takes every k-th sample, so all streams describe the same motion.
Pure numpy/scipy; no ROS. Frames: world (z up, gravity -z); surface (the plane through the
world origin, tilted by up to surface_tilt_deg); tool = imu (origin at the IMU, z along the
tool, away from the fingertip, whose sphere centre is at (0, 0, -tool_length)).

Randomness is drawn from independent streams of the seed (script, surface, IMU, skin noise,
temperature), so e.g. changing noise_scale leaves the motion unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial.transform import Rotation

from hiss_ros.data.derive import continuous_quat
from hiss_ros.sim.config import SimConfig
from hiss_ros.sim.contact import ContactParams, contact, texture_vibration
from hiss_ros.sim.imu import GRAVITY, noisy_imu
from hiss_ros.sim.skin import MagneticSkin
from hiss_ros.sim.trajectory import PHASES, Segment, evaluate, plan

NS = 1_000_000_000


@dataclass
class SimResult:
    config: SimConfig
    imu_ns: np.ndarray  # (m,) int64 header stamps
    gyro: np.ndarray  # (m, 3) rad/s, imu frame
    accel: np.ndarray  # (m, 3) m/s^2, specific force, imu frame
    tactile_ns: np.ndarray  # (k,) int64 (bag receive time: the array has no header)
    tactile: np.ndarray  # (k, 3 * taxels) float32 uT, taxel-major [b0x, b0y, b0z, b1x, ...]
    gt_ns: np.ndarray  # (g,) int64
    position: np.ndarray  # (g, 3) m, tool origin in the world
    orientation: np.ndarray  # (g, 4) xyzw, tool -> world, sign-continuous
    linear_velocity: np.ndarray  # (g, 3) m/s, tool frame: R^T v_world
    angular_velocity: np.ndarray  # (g, 3) rad/s, tool frame
    force: np.ndarray  # (g, 3) N, tool frame, exerted by the surface on the tool
    torque: np.ndarray  # (g, 3) N m, tool frame, about the tool origin
    # Extra truth for analysis and tests, at the ground-truth rate:
    normal_force: np.ndarray  # (g,) N
    in_contact: np.ndarray  # (g,) bool
    surface_normal: np.ndarray  # (g, 3) the surface's outward normal in the tool frame
    slip: np.ndarray  # (g, 3) m/s, tangential velocity of the tip at the contact, tool frame
    phase: np.ndarray  # (g,) int8 index into PHASES
    temperature: np.ndarray  # (k,) K, skin temperature change at the tactile samples
    segments: list[Segment] = field(default_factory=list)

    @property
    def phase_names(self) -> tuple[str, ...]:
        return PHASES


def _temperature(rng: np.random.Generator, t: np.ndarray, scale: float) -> np.ndarray:
    """Slow skin temperature change [K]: warming towards an offset plus a slow oscillation."""
    amp = scale * rng.uniform(0.5, 1.0) * rng.choice([-1.0, 1.0])
    tau, period, phase = rng.uniform(60, 240), rng.uniform(200, 600), rng.uniform(0, 2 * np.pi)
    return amp * (1 - np.exp(-t / tau)) + 0.3 * abs(amp) * (np.sin(2 * np.pi * t / period + phase) - np.sin(phase))


def simulate(cfg: SimConfig) -> SimResult:
    rng_plan, rng_surface, rng_imu, rng_skin, rng_temp = (
        np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(5))
    base = cfg.base_rate_hz
    n = int(np.floor(cfg.seconds * base + 1e-9))
    k = np.arange(n)
    t = k / base
    stamps = round(cfg.start_s * NS) + np.round(k * (NS / base)).astype(np.int64)

    # Kinematics: tip centre in the surface frame -> world; tool origin = centre + R (0, 0, L)
    segments = plan(rng_plan, cfg.seconds, cfg.tip_radius, cfg.motion)
    kin = evaluate(segments, t)
    az, tilt = rng_surface.uniform(0, 2 * np.pi), np.deg2rad(rng_surface.uniform(0, cfg.surface_tilt_deg))
    surface = Rotation.from_rotvec(tilt * np.array([np.cos(az), np.sin(az), 0.0]))
    normal = surface.apply([0.0, 0.0, 1.0])
    rot = surface * Rotation.from_quat(kin.quat)  # tool -> world, (n,)
    centre, centre_vel, centre_acc = surface.apply(kin.p), surface.apply(kin.v), surface.apply(kin.a)
    lever = np.array([0.0, 0.0, cfg.tool_length])  # tip centre -> tool origin, tool frame
    w_b, dw_b = kin.w_body, kin.dw_body
    origin = centre + rot.apply(lever)
    vel_world = centre_vel + rot.apply(np.cross(w_b, lever))
    acc_world = centre_acc + rot.apply(np.cross(dw_b, lever) + np.cross(w_b, np.cross(w_b, lever)))

    params = ContactParams(cfg.tip_radius, cfg.contact_stiffness, cfg.contact_damping, cfg.friction_mu,
                           cfg.viscous_friction, cfg.slip_velocity)
    c = contact(params, normal, centre, centre_vel, rot, origin, rot.apply(w_b))

    # IMU
    i = k[:: cfg.decimation(cfg.imu_rate_hz)]
    vib = texture_vibration(rng_surface, c, rot, normal, cfg.vibration, cfg.imu_rate_hz)
    accel_true = rot[i].inv().apply(acc_world[i] - GRAVITY) + vib[i]
    ns = cfg.noise_scale
    gyro, accel = noisy_imu(rng_imu, w_b[i], accel_true, cfg.imu_rate_hz, ns * cfg.gyro_noise_density,
                            ns * cfg.accel_noise_density, ns * cfg.gyro_bias_walk, ns * cfg.accel_bias_walk,
                            ns * cfg.gyro_bias_init, ns * cfg.accel_bias_init)

    # Tactile skin: memory on the base grid, field at the tactile samples
    skin = MagneticSkin(cfg.taxels, -lever, cfg.tip_radius)
    u_n, u_s = skin.with_memory(*skin.deformation(c.normal_force, c.friction_body), 1.0 / base)
    j = k[:: cfg.decimation(cfg.tactile_rate_hz)]
    magnet = skin.field(c.point_body[j], u_n[j], u_s[j])
    temperature = _temperature(rng_temp, t[j], ns * cfg.temperature_drift_k)
    noise = rng_skin.normal(0.0, ns * cfg.tactile_noise_ut, magnet.shape)
    tactile = skin.measure(magnet, rot[j], temperature, cfg.earth_field_ut, noise)

    # Ground truth
    g = k[:: cfg.decimation(cfg.gt_rate_hz)]
    inv = rot[g].inv()
    return SimResult(
        config=cfg, imu_ns=stamps[i], gyro=gyro, accel=accel,
        tactile_ns=stamps[j], tactile=tactile,
        gt_ns=stamps[g], position=origin[g], orientation=continuous_quat(rot[g].as_quat()),
        linear_velocity=inv.apply(vel_world[g]), angular_velocity=w_b[g].copy(),
        force=c.force_body[g], torque=c.torque_body[g],
        normal_force=c.normal_force[g], in_contact=c.in_contact[g], surface_normal=inv.apply(normal),
        slip=inv.apply(c.slip_world[g]), phase=kin.phase[g], temperature=temperature, segments=segments,
    )
