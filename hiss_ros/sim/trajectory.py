"""Scripted end-effector motion: piecewise smooth segments with analytic derivatives.

The script moves the centre of the hemispherical fingertip, in the frame of the (possibly
tilted) surface: z is the height above the plane, so the tip touches the surface when
z < tip_radius, whatever the tool's orientation. Each segment goes from pose A to pose B:

    s(u)  = 10u^3 - 15u^4 + 6u^5,  u = (t - t0) / T          (minimum jerk: s', s'' = 0 at ends)
    p(t)  = pA + (pB - pA) s + sum_j d_j sin(j pi s)         (detour: strokes of "writing")
    R(t)  = RA Exp(s phi),  phi = Log(RA^T RB)              (rotation about a fixed axis)

so position, velocity and acceleration are exact (no numerical differentiation), as are the
body angular velocity  w = s' phi  and acceleration  dw/dt = s'' phi. Velocity and acceleration
are zero at each segment boundary, so segments join with continuous acceleration.

Segments follow a random script per seed: dwell, free moves (with tool rotation), approach
through the surface, then pressing (depth modulation, rolling the tip), sliding ("writing"
strokes at 3-12 cm/s), holding, and release.

Simplified: the robot tracks the script exactly (infinitely stiff position control); the
contact force does not deflect the motion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

PHASES = ("dwell", "free", "approach", "press", "slide", "hold", "release")
DETOUR_TERMS = 4
WORKSPACE = 0.12  # m: the tip stays within +-WORKSPACE of the origin in x and y


@dataclass(frozen=True)
class Segment:
    phase: str
    t0: float  # s
    duration: float  # s
    p0: np.ndarray  # (3,) tip centre at the start [m], surface frame
    p1: np.ndarray  # (3,) at the end
    detour: np.ndarray  # (DETOUR_TERMS, 3) sine-series amplitudes [m]
    q0: np.ndarray  # (4,) tool orientation (tool -> surface) at the start, xyzw
    rotvec: np.ndarray  # (3,) rotation from start to end, in the start tool frame [rad]


@dataclass
class Kinematics:
    """Tip-centre motion and tool orientation, surface frame, sampled at ``t``."""

    t: np.ndarray  # (n,) s
    p: np.ndarray  # (n, 3) tip centre position [m]
    v: np.ndarray  # (n, 3) [m/s]
    a: np.ndarray  # (n, 3) [m/s^2]
    quat: np.ndarray  # (n, 4) xyzw, tool -> surface
    w_body: np.ndarray  # (n, 3) angular velocity in the tool frame [rad/s]
    dw_body: np.ndarray  # (n, 3) angular acceleration in the tool frame [rad/s^2]
    phase: np.ndarray  # (n,) int8 index into PHASES


def min_jerk(u: np.ndarray, duration: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """s, ds/dt, d2s/dt2 of the minimum-jerk profile at u in [0, 1]."""
    s = u**3 * (10 - 15 * u + 6 * u**2)
    ds = 30 * u**2 * (1 - u) ** 2 / duration
    dds = 60 * u * (1 - u) * (1 - 2 * u) / duration**2
    return s, ds, dds


def evaluate(segments: list[Segment], t: np.ndarray) -> Kinematics:
    """The script at times ``t`` (sorted, s); times past the end hold the last pose."""
    n = len(t)
    out = Kinematics(t, np.empty((n, 3)), np.empty((n, 3)), np.empty((n, 3)), np.empty((n, 4)),
                     np.empty((n, 3)), np.empty((n, 3)), np.empty(n, np.int8))
    starts = np.array([seg.t0 for seg in segments])
    bounds = [*np.searchsorted(t, starts, side="left").tolist(), n]
    bounds[0] = 0
    j = np.arange(1, DETOUR_TERMS + 1) * np.pi  # (K,)
    for seg, lo, hi in zip(segments, bounds[:-1], bounds[1:], strict=True):
        if hi <= lo:
            continue
        u = np.clip((t[lo:hi] - seg.t0) / seg.duration, 0.0, 1.0)
        s, ds, dds = min_jerk(u, seg.duration)
        sin, cos = np.sin(np.outer(s, j)), np.cos(np.outer(s, j))  # (m, K)
        dp_ds = (seg.p1 - seg.p0) + (cos * j) @ seg.detour  # (m, 3)
        d2p_ds2 = -(sin * j**2) @ seg.detour
        out.p[lo:hi] = seg.p0 + np.outer(s, seg.p1 - seg.p0) + sin @ seg.detour
        out.v[lo:hi] = dp_ds * ds[:, None]
        out.a[lo:hi] = dp_ds * dds[:, None] + d2p_ds2 * (ds**2)[:, None]
        out.quat[lo:hi] = (Rotation.from_quat(seg.q0) * Rotation.from_rotvec(np.outer(s, seg.rotvec))).as_quat()
        out.w_body[lo:hi] = np.outer(ds, seg.rotvec)
        out.dw_body[lo:hi] = np.outer(dds, seg.rotvec)
        out.phase[lo:hi] = PHASES.index(seg.phase)
    return out


def _orientation(rng: np.random.Generator, max_tilt_deg: float, yaw: float) -> Rotation:
    """Tool z axis tilted from the surface normal by up to ``max_tilt_deg``, turned by ``yaw``."""
    az = rng.uniform(0, 2 * np.pi)
    tilt = np.deg2rad(rng.uniform(0, max_tilt_deg))
    return Rotation.from_rotvec(tilt * np.array([np.cos(az), np.sin(az), 0.0])) * Rotation.from_euler("z", yaw)


class _Planner:
    """Appends segments, keeping the current tip position, orientation and yaw."""

    def __init__(self, rng: np.random.Generator, radius: float) -> None:
        self.rng, self.r = rng, radius
        self.t = 0.0
        self.p = np.array([*rng.uniform(-0.05, 0.05, 2), radius + rng.uniform(0.01, 0.04)])
        self.yaw = rng.uniform(-np.pi, np.pi)
        self.q = _orientation(rng, 25, self.yaw)
        self.segments: list[Segment] = []

    def add(self, phase: str, duration: float, p1: np.ndarray, q1: Rotation | None = None,
            detour: np.ndarray | None = None) -> None:
        q1 = self.q if q1 is None else q1
        detour = np.zeros((DETOUR_TERMS, 3)) if detour is None else detour
        rotvec = (self.q.inv() * q1).as_rotvec()
        p1 = np.array(p1, dtype=float)
        self.segments.append(Segment(phase, self.t, duration, self.p.copy(), p1, detour,
                                     self.q.as_quat(), rotvec))
        self.t += duration
        self.p, self.q = p1, q1

    def turn(self, max_tilt_deg: float, max_yaw: float) -> Rotation:
        self.yaw += self.rng.uniform(-max_yaw, max_yaw)
        return _orientation(self.rng, max_tilt_deg, self.yaw)

    def xy(self, offset: np.ndarray) -> np.ndarray:
        return np.clip(self.p[:2] + offset, -WORKSPACE, WORKSPACE)

    def depth_detour(self, depth0: float, depth1: float, xy_sigma: float) -> np.ndarray:
        """Sine amplitudes: xy strokes of ``xy_sigma`` and a z ripple that keeps the tip in
        contact (|ripple| <= half the smaller depth)."""
        d = np.zeros((DETOUR_TERMS, 3))
        d[:, :2] = self.rng.normal(0, xy_sigma, (DETOUR_TERMS, 2)) / np.arange(1, DETOUR_TERMS + 1)[:, None]
        z = self.rng.uniform(-1, 1, DETOUR_TERMS)
        d[:, 2] = z / np.abs(z).sum() * 0.5 * min(depth0, depth1) * self.rng.uniform(0.2, 1.0)
        return d

    # --- the actions -------------------------------------------------------------------------
    def dwell(self, lo: float, hi: float, phase: str = "dwell") -> None:
        self.add(phase, self.rng.uniform(lo, hi), self.p)

    def free_move(self) -> None:
        rng = self.rng
        target = np.array([*self.xy(rng.normal(0, 0.06, 2)), self.r + rng.uniform(0.01, 0.04)])
        dist = np.linalg.norm(target - self.p)
        detour = np.zeros((DETOUR_TERMS, 3))
        detour[:2, :2] = rng.normal(0, 0.01, (2, 2))
        detour[0, 2] = rng.uniform(0, 0.02)  # sin(pi s) >= 0: arcs up, never down into the surface
        self.add("free", float(np.clip(dist / rng.uniform(0.08, 0.2) + 0.4, 0.6, 2.5)), target,
                 self.turn(30, np.pi / 2), detour)

    def depth(self) -> float:
        return self.r - self.p[2]

    def approach(self) -> None:
        rng = self.rng
        depth = rng.uniform(0.0005, 0.004)
        self.add("approach", rng.uniform(0.5, 1.2), [*self.xy(rng.normal(0, 0.003, 2)), self.r - depth],
                 self.turn(25, 0.1))

    def press(self) -> None:
        rng = self.rng
        depth = rng.uniform(0.0005, 0.006)
        self.add("press", rng.uniform(0.8, 2.5), [*self.xy(rng.normal(0, 0.001, 2)), self.r - depth],
                 self.turn(25, 0.5), self.depth_detour(self.depth(), depth, 0.0005))

    def slide(self) -> None:
        rng = self.rng
        depth = rng.uniform(0.0005, 0.004)
        length = rng.uniform(0.02, 0.1)
        heading = rng.uniform(0, 2 * np.pi)
        target = [*self.xy(length * np.array([np.cos(heading), np.sin(heading)])), self.r - depth]
        duration = max(0.8, length / rng.uniform(0.03, 0.12))
        self.add("slide", duration, target, self.turn(20, 0.8), self.depth_detour(self.depth(), depth, 0.012))

    def release(self) -> None:
        rng = self.rng
        self.add("release", rng.uniform(0.4, 1.0), [*self.xy(rng.normal(0, 0.003, 2)),
                                                     self.r + rng.uniform(0.01, 0.04)], self.turn(25, 0.2))


def plan(rng: np.random.Generator, seconds: float, tip_radius: float, motion: str = "contact") -> list[Segment]:
    """A random script covering at least ``seconds``."""
    pl = _Planner(rng, tip_radius)
    if motion == "still":
        pl.add("dwell", seconds, pl.p)
        return pl.segments
    pl.dwell(0.5, 1.0)  # a still start: the IMU sees only gravity
    while pl.t < seconds:
        pl.free_move()
        if rng.random() < 0.25:
            pl.dwell(0.2, 0.8)
        pl.approach()
        for _ in range(rng.integers(1, 5)):
            action = rng.choice(3, p=[0.35, 0.45, 0.2])
            if action == 0:
                pl.press()
            elif action == 1:
                pl.slide()
            else:
                pl.dwell(0.3, 1.5, "hold")
        pl.release()
    return pl.segments
