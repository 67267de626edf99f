"""Shared pieces of the dataset importers: errors, finite runs, body twist from poses, bag output.

The importers turn arrays (one row per sample) into ROS 2 bags with ``hiss_ros.data.write``.
Everything but building one rosbags message per sample is vectorised; messages are produced
lazily, in time order, so a whole trial never sits in memory twice.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from scipy.signal import savgol_filter
from scipy.spatial.transform import Rotation
from tqdm import tqdm

from hiss_ros.data.derive import continuous_quat, savgol_window, velocity_from_pose
from hiss_ros.data.write import write_bag
from hiss_ros.errors import HissError

log = logging.getLogger(__name__)

# The window and polynomial order of hiss_ros.data.derive.velocity_from_pose (its defaults), used
# for the angular rate too so the linear and angular parts of a twist are smoothed alike.
DERIVE_WINDOW_S = 0.05
DERIVE_POLYORDER = 2
# Files a bag folder written here may hold; --force deletes nothing else.


class DatasetError(HissError):
    """A dataset file is missing, of the wrong format, or holds a malformed row."""


# ----------------------------------------------------------------------------- time series


def finite_runs(valid: np.ndarray, stamps_ns: np.ndarray | None = None, max_gap: float = 3.0) -> np.ndarray:
    """(k, 2) [start, stop) index ranges of consecutive ``valid`` samples; with ``stamps_ns``, a
    run is also split where the time step exceeds ``max_gap`` times the median step."""
    valid = np.asarray(valid, bool)
    breaks = np.zeros(len(valid) + 1, bool)
    if stamps_ns is not None and len(stamps_ns) > 1:
        step = np.diff(stamps_ns)
        breaks[1:-1] = step > max_gap * np.median(step)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], valid.astype(np.int8), [0]])))
    runs = edges.reshape(-1, 2)
    out = []
    for a, b in runs:
        cuts = [a, *(np.flatnonzero(breaks[a + 1:b]) + a + 1), b]
        out += [(c0, c1) for c0, c1 in pairwise(cuts)]
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


def quat_mul(p: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Hamilton product of (n, 4) xyzw quaternions."""
    px, py, pz, pw = p.T
    rx, ry, rz, rw = r.T
    return np.stack([pw * rx + px * rw + py * rz - pz * ry, pw * ry - px * rz + py * rw + pz * rx,
                     pw * rz + px * ry - py * rx + pz * rw, pw * rw - px * rx - py * ry - pz * rz], axis=1)


def angular_velocity_from_quat(stamps_ns: np.ndarray, quat_xyzw: np.ndarray, window_s: float = DERIVE_WINDOW_S,
                               polyorder: int = DERIVE_POLYORDER) -> np.ndarray:
    """(n, 3) body-frame angular rate (rad/s) of body->world orientations: w = 2 vec(q* dq/dt),
    with q and dq/dt from the Savitzky-Golay filter that ``velocity_from_pose`` uses for position
    (resampled on a uniform grid, same window), so both halves of a twist are smoothed alike."""
    q = continuous_quat(quat_xyzw)
    t = (stamps_ns - stamps_ns[0]) / 1e9
    dt = float(np.median(np.diff(t)))
    grid = np.arange(0.0, t[-1] + dt / 2, dt)
    qg = np.stack([np.interp(grid, t, q[:, i]) for i in range(4)], axis=1)
    window = savgol_window(len(grid), dt, window_s, polyorder)
    q_s = savgol_filter(qg, window, polyorder, axis=0)
    q_d = savgol_filter(qg, window, polyorder, deriv=1, delta=dt, axis=0)
    conj = q_s * np.array([-1.0, -1.0, -1.0, 1.0])
    w_grid = 2.0 * quat_mul(conj, q_d)[:, :3] / np.sum(q_s**2, axis=1, keepdims=True)
    return np.stack([np.interp(t, grid, w_grid[:, i]) for i in range(3)], axis=1)


@dataclass
class TwistResult:
    """Body-frame twist per sample; rows without one (NaN pose, short run) hold NaN."""

    linear: np.ndarray
    angular: np.ndarray
    nonfinite: int = 0  # samples whose pose is not finite (no pose, no twist)
    short_runs: int = 0  # finite runs too short to differentiate
    short_run_samples: int = 0  # their samples (pose published, no twist)

    @property
    def valid(self) -> np.ndarray:
        return np.isfinite(self.linear).all(axis=1)


def body_twist(stamps_ns: np.ndarray, position: np.ndarray, quat_xyzw: np.ndarray, min_run_s: float = 0.1,
               world_velocity: np.ndarray | None = None) -> TwistResult:
    """Body-frame twist from a pose stream with gaps: differentiated per finite run (a NaN never
    enters a filter window), runs shorter than ``min_run_s`` skipped. Linear velocity is
    ``hiss_ros.data.derive.velocity_from_pose(..., "body_velocity")``, or R^T ``world_velocity``
    where the dataset gives one; angular from the orientation (``angular_velocity_from_quat``)."""
    n = len(stamps_ns)
    lin = np.full((n, 3), np.nan)
    ang = np.full((n, 3), np.nan)
    finite = np.isfinite(position).all(axis=1) & np.isfinite(quat_xyzw).all(axis=1)
    if world_velocity is not None:
        finite &= np.isfinite(world_velocity).all(axis=1)
    res = TwistResult(lin, ang, nonfinite=int((~finite).sum()))
    for a, b in finite_runs(finite, stamps_ns):
        if b - a < 5 or (stamps_ns[b - 1] - stamps_ns[a]) / 1e9 < min_run_s:
            res.short_runs += 1
            res.short_run_samples += int(b - a)
            continue
        t, q = stamps_ns[a:b], quat_xyzw[a:b]
        if world_velocity is None:
            lin[a:b] = velocity_from_pose(t, np.concatenate([position[a:b], q], axis=1), "body_velocity")
        else:
            lin[a:b] = Rotation.from_quat(q).inv().apply(world_velocity[a:b])
        ang[a:b] = angular_velocity_from_quat(t, q)
    if res.short_runs:
        log.info("%d pose run(s) of %d samples shorter than %.3g s: poses kept, no twist", res.short_runs,
                 res.short_run_samples, min_run_s)
    return res


def excerpt(first_ns: int, last_ns: int, start_s: float | None, duration_s: float | None) -> tuple[int, int]:
    """[lo, hi) stamps of the excerpt ``start_s`` .. ``start_s + duration_s`` seconds after ``first_ns``."""
    start_s = start_s or 0.0
    if not (0 <= start_s < math.inf) or (duration_s is not None and not 0 < duration_s < math.inf):
        raise DatasetError(f"--start must be >= 0 and --duration > 0, got {start_s} and {duration_s}")
    lo = int(first_ns) + round(start_s * 1e9)
    hi = int(last_ns) + 1 if duration_s is None else lo + round(duration_s * 1e9)
    if lo > last_ns:
        raise DatasetError(f"--start {start_s:g} s selects nothing: the recording is "
                           f"{(last_ns - first_ns) / 1e9:.1f} s long")
    return lo, hi


# ----------------------------------------------------------------------------- messages

# ----------------------------------------------------------------------------- output


@dataclass
class Stream:
    """One topic to write: message ``make(i)`` for each index of ``index`` at ``stamps_ns``."""

    topic: str
    stamps_ns: np.ndarray  # (m,) int64, one per message
    index: np.ndarray  # (m,) row of the source arrays each message is built from
    make: Callable[[int], Any]


@dataclass
class ImportSummary:
    path: Path
    counts: dict[str, int]
    duration_s: float
    dropped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def line(self) -> str:
        msgs = ", ".join(f"{t} {n}" for t, n in self.counts.items())
        drops = ", ".join(f"{n} {what}" for what, n in self.dropped.items() if n) or "nothing dropped"
        return (f"{self.path}: {msgs} messages; {self.duration_s:.1f} s; {drops}; "
                f"{self.size_bytes / 1e6:.1f} MB in {self.seconds:.1f} s")


def write_streams(path: Path, streams: Sequence[Stream], storage: str = "mcap", zstd: bool = False,
                  progress: bool = True) -> dict[str, int]:
    """Write the streams' messages in time order (ties in stream order) to a new bag at ``path``;
    a failed write leaves no partial bag behind. Returns messages per topic."""
    stamps = np.concatenate([s.stamps_ns for s in streams])
    which = np.concatenate([np.full(len(s.stamps_ns), k) for k, s in enumerate(streams)])
    rows = np.concatenate([s.index for s in streams])
    order = np.lexsort((which, stamps))
    topics = [s.topic for s in streams]
    makers = [s.make for s in streams]
    bar = tqdm(total=len(order), unit="msg", desc=f"writing {path.name}", disable=not progress, leave=False)

    def records():
        for k, t, i in zip(which[order].tolist(), stamps[order].tolist(), rows[order].tolist(), strict=True):
            yield topics[k], t, makers[k](i)
            bar.update()

    try:
        write_bag(path, records(), storage=storage, zstd=zstd)
    except BaseException:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        raise
    finally:
        bar.close()
    return {s.topic: len(s.stamps_ns) for s in streams if len(s.stamps_ns)}
