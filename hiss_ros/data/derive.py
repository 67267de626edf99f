"""Targets derived from a pose stream: linear velocity in the world or the body frame.

For rigs whose ground truth is motion capture: the position is resampled on a uniform grid,
differentiated with a Savitzky-Golay filter (a local polynomial fit: smooth and unbiased for
smooth motion), and, for the body frame, rotated by the inverse of the pose's orientation
(v_body = R^T v_world). Offline only: these are training targets, not estimator inputs, so the
symmetric (non-causal) smoothing window is fine.
"""

from __future__ import annotations

import numpy as np
from scipy.signal import savgol_filter
from scipy.spatial.transform import Rotation

from hiss_ros.errors import BagError

DERIVATIONS = ("world_velocity", "body_velocity")
# Fields read from each pose-carrying type: position xyz, then orientation xyzw.
POSE_FIELDS = {
    "geometry_msgs/msg/PoseStamped": tuple(f"pose.position.{a}" for a in "xyz")
    + tuple(f"pose.orientation.{a}" for a in "xyzw"),
    "nav_msgs/msg/Odometry": tuple(f"pose.pose.position.{a}" for a in "xyz")
    + tuple(f"pose.pose.orientation.{a}" for a in "xyzw"),
}

# The twist an Odometry message carries: velocity in its child frame (the body).
ODOM_BODY_VELOCITY = tuple(f"twist.twist.linear.{a}" for a in "xyz")
ZERO_NORM = 1e-9  # a quaternion this short has no usable direction


def velocity_from_pose(stamps_ns: np.ndarray, pose: np.ndarray, frame: str, window_s: float = 0.05,
                       polyorder: int = 2, where: str = "pose", msgtype: str = "") -> np.ndarray:
    """(n, 3) velocity at ``stamps_ns`` from (n, 7) poses [x, y, z, qx, qy, qz, qw]; ``where``
    (the topic) and ``msgtype`` name the stream in errors. Orientations need not be unit length
    (they are normalised); zero or non-finite ones are refused (``BagError``) for the body frame."""
    _check_pose(pose, frame, where, msgtype)
    t = (stamps_ns - stamps_ns[0]) / 1e9
    dt = float(np.median(np.diff(t)))
    grid = np.arange(0.0, t[-1] + dt / 2, dt)
    pos = np.stack([np.interp(grid, t, pose[:, i]) for i in range(3)], axis=1)
    window = savgol_window(len(grid), dt, window_s, polyorder)
    v_grid = savgol_filter(pos, window, polyorder, deriv=1, delta=dt, axis=0)
    v = np.stack([np.interp(t, grid, v_grid[:, i]) for i in range(3)], axis=1)
    if frame == "world_velocity":
        return v
    return Rotation.from_quat(pose[:, 3:7]).inv().apply(v)


def _check_pose(pose: np.ndarray, frame: str, where: str, msgtype: str) -> None:
    """Refuse, in one line, poses the derivation cannot use: non-finite positions, and for the
    body frame orientations of zero (near-zero) norm or with non-finite values, e.g. odometry
    whose publisher fills only the twist. Counts them and names the first."""
    n = len(pose)
    bad = ~np.isfinite(pose[:, :3]).all(axis=1)
    if bad.any():
        raise BagError(f"{where}: {int(bad.sum())} of {n} positions are non-finite (first at sample "
                       f"{int(np.argmax(bad))}); cannot derive {frame}")
    if frame != "body_velocity":
        return
    norm = np.linalg.norm(pose[:, 3:7], axis=1)
    bad = ~(np.isfinite(pose[:, 3:7]).all(axis=1) & (norm > ZERO_NORM))
    if not bad.any():
        return
    if msgtype == "nav_msgs/msg/Odometry":
        fix = ("this Odometry message carries the body velocity itself: instead of derive, use fields "
               f"[{', '.join(ODOM_BODY_VELOCITY)}] (in the child frame, i.e. the body)")
    else:
        fix = "fix the orientations in the recording, or derive world_velocity (which needs no orientation)"
    raise BagError(f"{where}: {int(bad.sum())} of {n} orientations are zero-norm or non-finite (first at "
                   f"sample {int(np.argmax(bad))}), so body_velocity cannot be derived; {fix}")


def savgol_window(n: int, dt: float, window_s: float, polyorder: int) -> int:
    """Savitzky-Golay window of about ``window_s`` for samples ``dt`` apart: odd (an even one
    would evaluate half a sample off the stamp), longer than the polynomial, at most ``n``."""
    window = max(polyorder + 2, round(window_s / dt)) | 1
    return min(window, n - (1 - n % 2))


def continuous_quat(quat: np.ndarray) -> np.ndarray:
    """(n, 4) quaternions with signs flipped so consecutive ones lie in one hemisphere (the same
    rotations, but smooth enough to interpolate and differentiate)."""
    q = np.array(quat, dtype=float)
    if len(q) > 1:
        flip = np.sum(q[1:] * q[:-1], axis=1) < 0
        q[1:] *= np.cumprod(np.where(flip, -1.0, 1.0))[:, None]
    return q
