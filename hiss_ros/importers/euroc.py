"""EuRoC MAV / ASL-format sequences -> ROS 2 bags.

Reads ``mav0/imu0/data.csv`` (timestamp [ns], gyro xyz [rad/s], accel xyz [m/s^2], IMU frame S)
and ``mav0/state_groundtruth_estimate0/data.csv`` (timestamp [ns], p_RS_R xyz [m], q_RS wxyz,
v_RS_R xyz [m/s], gyro bias xyz, accel bias xyz). ``q_RS`` rotates IMU-frame (S) vectors into the
ground-truth world frame (R), the ROS convention for a pose's orientation; ``v_RS_R`` is the IMU's
velocity in R. A ground-truth file of 8 columns (timestamp, position, quaternion: a mocap pose)
is accepted too; its velocity is then derived from the positions.

Topics: ``/imu/data`` (sensor_msgs/Imu, frame ``imu``), ``/groundtruth/pose``
(geometry_msgs/PoseStamped, frame ``world``), ``/groundtruth/twist`` (geometry_msgs/TwistStamped,
frame ``imu``: v_body = R^T v_world from the file; angular rate from the derivative of q_RS by
default, or ``angular="gyro"``: the IMU gyro interpolated to the ground-truth stamps minus the
estimated gyro bias b_w). The file stamps (ns) are kept.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from hiss_ros.data.write import imu, pose, replace_bag, staged_bag, twist
from hiss_ros.importers.common import (
    DatasetError,
    ImportSummary,
    Stream,
    body_twist,
    excerpt,
    write_streams,
)

log = logging.getLogger(__name__)

IMU_CSV = "imu0/data.csv"
GT_CSV = "state_groundtruth_estimate0/data.csv"
TOPICS = {"imu": "/imu/data", "pose": "/groundtruth/pose", "twist": "/groundtruth/twist"}
IMU_LAYOUT = {7: "timestamp + gyro xyz + accel xyz"}
GT_LAYOUT = {17: "timestamp + position xyz + quaternion wxyz + velocity xyz + gyro bias xyz + accel bias xyz",
             8: "timestamp + position xyz + quaternion wxyz"}
ANGULAR = ("quat", "gyro")


def read_csv(path: str | Path, layouts: dict[int, str]) -> tuple[np.ndarray, np.ndarray]:
    """(stamps_ns int64 (n,), values float (n, k - 1)) of an ASL-format CSV whose rows all have
    one of the column counts in ``layouts`` (the first data row decides). Comment lines (``#``)
    and blank lines are skipped. Rows are sorted by stamp, repeated stamps dropped (logged)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    stamps: list[int] = []
    rows: list[list[float]] = []
    width = None
    want = " or ".join(f"{k} comma-separated numbers ({v})" for k, v in layouts.items())
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as exc:
        raise DatasetError(f"{path}: cannot read as a text CSV file ({exc})") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split(",")]
        if parts and parts[-1] == "":  # a trailing comma
            parts.pop()
        if lineno == 1 and not _is_float(parts[0]):
            continue  # a header row without '#'
        if width is None:
            if len(parts) not in layouts:
                raise DatasetError(f"{path}:{lineno}: expected {want}, got {len(parts)}")
            width = len(parts)
        elif len(parts) != width:
            raise DatasetError(f"{path}:{lineno}: expected {width} comma-separated numbers ({layouts[width]}), "
                               f"got {len(parts)}")
        try:
            stamps.append(int(parts[0]))
        except ValueError:
            raise DatasetError(f"{path}:{lineno}: expected an integer timestamp in ns in column 1, "
                               f"got {parts[0]!r}") from None
        try:
            rows.append([float(p) for p in parts[1:]])
        except ValueError:
            col, bad = next((i, p) for i, p in enumerate(parts[1:], start=2) if not _is_float(p))
            raise DatasetError(f"{path}:{lineno}: expected a number in column {col}, got {bad!r}") from None
    if not stamps:
        raise DatasetError(f"{path}: no data rows (expected {want} per row)")
    t = np.asarray(stamps, dtype=np.int64)
    v = np.asarray(rows, dtype=float)
    if np.any(np.diff(t) <= 0):
        order = np.argsort(t, kind="stable")
        t, v = t[order], v[order]
        keep = np.concatenate([[True], np.diff(t) > 0])
        log.warning("%s: rows not in strictly increasing time order: sorted, %d repeated stamp(s) dropped",
                    path, int((~keep).sum()))
        t, v = t[keep], v[keep]
    bad = ~np.isfinite(v).all(axis=1)
    if bad.any():
        log.warning("%s: %d row(s) holding NaN or inf dropped", path, int(bad.sum()))
        t, v = t[~bad], v[~bad]
    return t, v


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def resolve_paths(path: str | None, imu_csv: str | None, gt_csv: str | None) -> tuple[Path, Path]:
    """The IMU and ground-truth CSVs: from a ``mav0`` folder (or the sequence folder holding it),
    each overridable by an explicit file."""
    if path is None and (imu_csv is None or gt_csv is None):
        raise DatasetError("give the sequence folder (holding mav0/) or both --imu and --groundtruth")
    found: dict[str, Path] = {}
    if path is not None:
        root = Path(path)
        if not root.is_dir():
            raise DatasetError(f"{root}: no such folder (expected a EuRoC sequence holding mav0/, or mav0/ itself)")
        mav0 = root / "mav0" if (root / "mav0").is_dir() else root
        found = {"imu": mav0 / IMU_CSV, "gt": mav0 / GT_CSV}
        for key, explicit in (("imu", imu_csv), ("gt", gt_csv)):
            if explicit is None and not found[key].is_file():
                raise DatasetError(f"{root}: not a EuRoC/ASL sequence: no {found[key]}")
    imu_p = Path(imu_csv) if imu_csv else found["imu"]
    gt_p = Path(gt_csv) if gt_csv else found["gt"]
    return imu_p, gt_p


def import_sequence(imu_csv: str | Path, gt_csv: str | Path, out: str | Path, *, angular: str = "quat",
                    start_s: float | None = None, duration_s: float | None = None, storage: str = "mcap",
                    zstd: bool = False, force: bool = False, progress: bool = True,
                    min_run_s: float = 0.1) -> ImportSummary:
    """Write a EuRoC/ASL sequence (or an excerpt) to the bag ``out``."""
    began = time.perf_counter()
    out = Path(out)
    if angular not in ANGULAR:
        raise DatasetError(f"--angular {angular!r}: expected one of {', '.join(ANGULAR)}")
    t_imu, v_imu = read_csv(imu_csv, IMU_LAYOUT)
    t_gt, v_gt = read_csv(gt_csv, GT_LAYOUT)
    if angular == "gyro" and v_gt.shape[1] != 16:
        raise DatasetError(f"{gt_csv}: --angular gyro needs the gyro bias columns of "
                           "state_groundtruth_estimate0/data.csv (17 columns)")
    replace_bag(out, force, delete=False)  # refused before the work
    gyr, acc = v_imu[:, 0:3], v_imu[:, 3:6]
    position = v_gt[:, 0:3]
    q = v_gt[:, [4, 5, 6, 3]]  # w, x, y, z -> x, y, z, w
    norm = np.linalg.norm(q, axis=1, keepdims=True)
    if np.any(np.abs(norm - 1) > 0.1):
        raise DatasetError(f"{gt_csv}: quaternion norms range {norm.min():.3f}..{norm.max():.3f}; "
                           "expected unit quaternions in columns 5-8 (w, x, y, z)")
    q = q / norm
    v_world = v_gt[:, 7:10] if v_gt.shape[1] == 16 else None
    tw = body_twist(t_gt, position, q, min_run_s=min_run_s, world_velocity=v_world)
    dropped = {"ground-truth samples in runs too short to differentiate (no twist)": tw.short_run_samples}
    if angular == "gyro":
        inside = (t_gt >= t_imu[0]) & (t_gt <= t_imu[-1])
        gyro_at_gt = np.stack([np.interp(t_gt, t_imu, gyr[:, i]) for i in range(3)], axis=1) - v_gt[:, 10:13]
        tw.angular = np.where(inside[:, None], gyro_at_gt, np.nan)
        tw.linear[~inside] = np.nan
        dropped["ground-truth samples outside the IMU's time span (no twist)"] = int((~inside).sum())

    first, last = min(t_imu[0], t_gt[0]), max(t_imu[-1], t_gt[-1])
    lo, hi = excerpt(first, last, start_s, duration_s)
    ii = np.flatnonzero((t_imu >= lo) & (t_imu < hi))
    gi = np.flatnonzero((t_gt >= lo) & (t_gt < hi))
    ti = gi[tw.valid[gi]]
    ts_imu, ts_gt = t_imu.tolist(), t_gt.tolist()
    gyr_l, acc_l, pos_l, q_l = gyr.tolist(), acc.tolist(), position.tolist(), q.tolist()
    lin, ang = tw.linear.tolist(), tw.angular.tolist()
    streams = [
        Stream(TOPICS["imu"], t_imu[ii], ii,
               lambda i: imu(ts_imu[i], gyr_l[i], acc_l[i], "imu")),
        Stream(TOPICS["pose"], t_gt[gi], gi, lambda i: pose(ts_gt[i], pos_l[i], q_l[i], "world")),
        Stream(TOPICS["twist"], t_gt[ti], ti, lambda i: twist(ts_gt[i], lin[i], ang[i], "imu")),
    ]
    if not len(ii) and not len(gi):
        raise DatasetError(f"--start {start_s} --duration {duration_s}: no samples in that excerpt")
    with staged_bag(out, force) as bag:
        counts = write_streams(bag, streams, storage=storage, zstd=zstd, progress=progress)
    stamps = np.concatenate([t_imu[ii], t_gt[gi]])
    return ImportSummary(out, counts, (stamps.max() - stamps.min()) / 1e9, dropped, time.perf_counter() - began)
