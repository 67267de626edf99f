"""BROAD (Berlin Robust Orientation Estimation Assessment Dataset) trials -> ROS 2 bags.

One MATLAB v5 file per trial: ``imu_acc`` (m/s^2), ``imu_gyr`` (rad/s), ``imu_mag`` (uT),
``opt_quat`` (w, x, y, z) and ``opt_pos`` (m) from optical motion capture (NaN where the
markers were lost), ``movement``, ``info``, ``sampling_rate`` (285.714 Hz), all sampled together.

Frames, as measured by ``check_frames`` on the real trials (docs/DATASETS.md): ``opt_quat``
rotates IMU-frame vectors into the mocap world frame (ENU, z up), which is already the ROS
convention for a pose's orientation, so it is published as is (reordered to x, y, z, w).

Topics: ``/imu/data`` (sensor_msgs/Imu, frame ``imu``), ``/imu/mag`` (sensor_msgs/MagneticField,
Tesla, frame ``imu``), ``/mocap/pose`` (geometry_msgs/PoseStamped, frame ``world``) and
``/mocap/twist`` (geometry_msgs/TwistStamped, frame ``imu``: body-frame linear velocity of
``opt_pos`` and body angular rate, both from the mocap alone).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
from scipy.signal import savgol_filter
from scipy.spatial.transform import Rotation

from hiss_ros.data.write import imu, magnetic_field, pose, replace_bag, staged_bag, twist
from hiss_ros.importers.common import (
    DatasetError,
    ImportSummary,
    Stream,
    angular_velocity_from_quat,
    body_twist,
    excerpt,
    finite_runs,
    quat_mul,
    write_streams,
)

log = logging.getLogger(__name__)

T0_NS = 1_000 * 1_000_000_000  # stamp of a trial's first sample: 1000 s, positive and clearly not wall time
FIELDS = {"imu_acc": 3, "imu_gyr": 3, "imu_mag": 3, "opt_quat": 4, "opt_pos": 3}
TOPICS = {"imu": "/imu/data", "mag": "/imu/mag", "pose": "/mocap/pose", "twist": "/mocap/twist"}

ATTRIBUTION = """\
# Attribution

This bag is derived from the BROAD dataset (Berlin Robust Orientation Estimation Assessment
Dataset):

> D. Laidig, M. Caruso, A. Cereatti, T. Seel, "BROAD — A Benchmark for Robust Inertial
> Orientation Estimation", Data 6(7), 2021, doi:10.3390/data6070072.

License: Creative Commons Attribution 4.0 International (CC BY 4.0),
https://creativecommons.org/licenses/by/4.0/ — keep this attribution wherever the data, or
anything derived from it (bags, trained models), is shipped.

Changes made by `hiss-import broad` (hiss_ros): trial `{trial}`{excerpt}; samples stamped
t = {t0_s:g} s + i / {rate:g} Hz; magnetometer converted from µT to T; mocap samples holding NaN
left out;{lever} `/mocap/twist` derived from the motion capture (Savitzky–Golay derivative of `opt_pos`
rotated into the IMU frame with `opt_quat`, angular rate from the derivative of `opt_quat`).

## The trial's own description

{info}
"""


def load_trial(path: str | Path) -> dict[str, Any]:
    """Arrays of one BROAD trial, checked for the fields, shapes and sampling rate it needs."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    try:
        raw = scipy.io.loadmat(path)
    except Exception as exc:  # scipy raises ValueError, TypeError, MatReadError... on non-MAT input
        raise DatasetError(f"{path}: not a MATLAB .mat file ({type(exc).__name__}: {exc})") from None
    missing = [k for k in (*FIELDS, "sampling_rate") if k not in raw]
    if missing:
        raise DatasetError(f"{path}: not a BROAD trial: no {', '.join(missing)} "
                           f"(it has {', '.join(k for k in raw if not k.startswith('__')) or 'nothing'})")
    out: dict[str, Any] = {}
    n = None
    for key, cols in FIELDS.items():
        a = np.asarray(raw[key], dtype=float)
        if a.ndim != 2 or a.shape[1] != cols or (n is not None and len(a) != n):
            want = f"({n if n is not None else 'N'}, {cols})"
            raise DatasetError(f"{path}: {key} has shape {a.shape}, expected {want}")
        n = len(a)
        out[key] = a
    rate = float(np.asarray(raw["sampling_rate"], dtype=float).squeeze())
    if not np.isfinite(rate) or rate <= 0:
        raise DatasetError(f"{path}: sampling_rate = {rate}, expected a positive rate in Hz")
    out["sampling_rate"] = rate
    mov = raw.get("movement")
    out["movement"] = (np.asarray(mov).reshape(-1) != 0) if mov is not None and np.size(mov) == n \
        else np.ones(n, bool)
    info = raw.get("info")
    out["info"] = str(np.asarray(info).reshape(-1)[0]) if info is not None and np.size(info) else ""
    return out


def stamps_ns(n: int, rate_hz: float, t0_ns: int = T0_NS) -> np.ndarray:
    """t0 + i / rate in integer nanoseconds."""
    return t0_ns + np.round(np.arange(n) * (1e9 / rate_hz)).astype(np.int64)


def quat_xyzw(opt_quat_wxyz: np.ndarray) -> np.ndarray:
    """BROAD's (w, x, y, z) IMU->world quaternions as ROS/scipy (x, y, z, w)."""
    return opt_quat_wxyz[:, [1, 2, 3, 0]]


def import_trial(mat_path: str | Path, out: str | Path, *, t0_ns: int = T0_NS, start_s: float | None = None,
                 duration_s: float | None = None, mag: bool = True, storage: str = "mcap", zstd: bool = False,
                 force: bool = False, progress: bool = True, min_run_s: float = 0.1,
                 lever_arm_m: tuple[float, float, float] | None = None) -> ImportSummary:
    """Write one BROAD trial (or an excerpt of it) to the bag ``out`` and ATTRIBUTION.md beside
    its files. The twist is derived from the whole trial, then cut, so an excerpt has no
    filter edge effects at its ends. ``lever_arm_m``: the IMU's position (m, IMU frame) relative
    to the point ``opt_pos`` tracks; pose and twist then refer to the IMU (p + R r)."""
    began = time.perf_counter()
    mat_path, out = Path(mat_path), Path(out)
    if t0_ns <= 0:
        raise DatasetError(f"--t0 must be positive, got {t0_ns} ns")
    d = load_trial(mat_path)
    replace_bag(out, force, delete=False)  # refused before the work
    n = len(d["imu_acc"])
    t = stamps_ns(n, d["sampling_rate"], t0_ns)
    q = quat_xyzw(d["opt_quat"])
    pos = d["opt_pos"]
    if lever_arm_m is not None and any(lever_arm_m):
        pos = pos + Rotation.from_quat(np.nan_to_num(q, nan=0.5)).apply(np.asarray(lever_arm_m, dtype=float))
        pos[~np.isfinite(q).all(axis=1)] = np.nan
    tw = body_twist(t, pos, q, min_run_s=min_run_s)
    lo, hi = excerpt(t[0], t[-1], start_s, duration_s)
    idx = np.flatnonzero((t >= lo) & (t < hi))
    if not len(idx):
        raise DatasetError(f"{mat_path}: --start {start_s} --duration {duration_s}: no samples in that excerpt "
                           f"(the trial lasts {(t[-1] - t[0]) / 1e9:.1f} s)")
    pose_ok = np.isfinite(pos).all(axis=1) & np.isfinite(q).all(axis=1)
    twist_ok = tw.valid
    bad_imu = int((~np.isfinite(np.concatenate([d["imu_gyr"], d["imu_acc"]], axis=1)).all(axis=1))[idx].sum())
    if bad_imu:
        raise DatasetError(f"{mat_path}: {bad_imu} IMU samples hold NaN or inf; BROAD's IMU data should not")
    gyr, acc = d["imu_gyr"].tolist(), d["imu_acc"].tolist()
    mag_t = (d["imu_mag"] * 1e-6).tolist()
    pos_l, q_l = pos.tolist(), q.tolist()
    lin, ang = tw.linear.tolist(), tw.angular.tolist()
    ts = t.tolist()

    streams = [Stream(TOPICS["imu"], t[idx], idx, lambda i: imu(ts[i], gyr[i], acc[i], "imu"))]
    if mag:
        imu_finite = np.isfinite(d["imu_mag"]).all(axis=1)[idx]
        streams.append(Stream(TOPICS["mag"], t[idx][imu_finite], idx[imu_finite],
                              lambda i: magnetic_field(ts[i], mag_t[i], "imu")))
    pi = idx[pose_ok[idx]]
    streams.append(Stream(TOPICS["pose"], t[pi], pi, lambda i: pose(ts[i], pos_l[i], q_l[i], "world")))
    ti = idx[twist_ok[idx]]
    streams.append(Stream(TOPICS["twist"], t[ti], ti, lambda i: twist(ts[i], lin[i], ang[i], "imu")))

    what = "" if len(idx) == n else \
        f", samples {idx[0]}..{idx[-1]} ({start_s or 0:g} s + {len(idx) / d['sampling_rate']:.3g} s)"
    lever = f" positions moved by the lever arm {list(lever_arm_m)} m (IMU frame);" \
        if lever_arm_m is not None and any(lever_arm_m) else ""
    with staged_bag(out, force) as bag:  # the bag and its attribution appear together, or not at all
        counts = write_streams(bag, streams, storage=storage, zstd=zstd, progress=progress)
        (bag / "ATTRIBUTION.md").write_text(ATTRIBUTION.format(trial=mat_path.stem, excerpt=what, t0_s=t0_ns / 1e9,
                                                               rate=d["sampling_rate"], info=d["info"].strip(),
                                                               lever=lever),
                                            encoding="utf-8")
    short_in = int((~twist_ok[idx] & pose_ok[idx]).sum())
    dropped = {"NaN mocap samples (no pose, no twist)": int((~pose_ok[idx]).sum()),
               "samples in mocap runs too short to differentiate (no twist)": short_in}
    return ImportSummary(out, counts, (t[idx[-1]] - t[idx[0]]) / 1e9, dropped, time.perf_counter() - began)


# ----------------------------------------------------------------------------- frame check


def _angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    c = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return np.degrees(np.arccos(np.clip(c, -1.0, 1.0)))


def _quat_angle_deg(p: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.degrees(2 * np.arccos(np.clip(np.abs(np.sum(p * r, axis=1)), 0.0, 1.0)))


def _gyro_integration_error(q_ref: np.ndarray, gyr: np.ndarray, rate: float, starts: np.ndarray,
                            length: int) -> np.ndarray:
    """Orientation error (deg) after integrating body rates over ``length`` samples from each start
    (q_{k+1} = q_k * exp(w dt), q body->world), against ``q_ref`` at the window's end."""
    steps = Rotation.from_rotvec(gyr / rate).as_quat()
    q = q_ref[starts].copy()
    for k in range(length):
        q = quat_mul(q, steps[starts + k])
    return _quat_angle_deg(q / np.linalg.norm(q, axis=1, keepdims=True), q_ref[starts + length])


def _lag_samples(x: np.ndarray, y: np.ndarray, valid: np.ndarray, max_lag: int) -> float:
    """Lag L (samples, sub-sample by a parabola) maximising the correlation coefficient of
    x[i + L] and y[i] over the samples valid in both."""
    n = len(x)
    c = np.full(2 * max_lag + 1, -np.inf)
    for k, lag in enumerate(range(-max_lag, max_lag + 1)):
        i = np.arange(max(0, -lag), min(n, n - lag))
        m = valid[i] & valid[i + lag]
        if m.sum() > 10:
            xs, ys = x[i + lag][m], y[i][m]
            xs, ys = xs - xs.mean(), ys - ys.mean()
            c[k] = np.dot(xs, ys) / np.sqrt(np.dot(xs, xs) * np.dot(ys, ys) + 1e-300)
    k = int(np.argmax(c))
    off = 0.0
    if 0 < k < len(c) - 1 and np.isfinite(c[k - 1:k + 2]).all() and (den := c[k - 1] - 2 * c[k] + c[k + 1]) != 0:
        off = 0.5 * (c[k - 1] - c[k + 1]) / den
    return k + off - max_lag


def check_frames(mat_path: str | Path, window_s: float = 10.0) -> dict[str, Any]:
    """Measure BROAD's frame conventions against the data, for both readings of ``opt_quat``
    ("imu_to_world": R(q) maps IMU-frame vectors into the world; "world_to_imu": its inverse):

    - gravity: |imu_acc| at rest (movement == 0); mean R a at rest (world z up: +g on z); the
      median angle between R a and world +z over quasi-static samples (|a| ~ g, |w| small);
    - gyro: imu_gyr (minus its mean at rest) integrated as body rates for ``window_s`` from the
      mocap orientation at each window start, angle to the mocap orientation at the end;
    - angular rate: RMS of |gyro - mocap body rate| (quaternion derivative) per reading;
    - time offset: cross-correlation of |gyro| with |mocap rate| (positive: the IMU is late);
    - lever arm: least-squares r (IMU frame) and accelerometer bias in
      a - R^T (p'' + g z) = (w' x + w x w x) r + b, i.e. where ``opt_pos`` is relative to the IMU.
    """
    path = Path(mat_path)
    d = load_trial(path)
    rate = d["sampling_rate"]
    acc, gyr, mov = d["imu_acc"], d["imu_gyr"], d["movement"]
    n = len(acc)
    t = stamps_ns(n, rate)
    q = quat_xyzw(d["opt_quat"])
    ok = np.isfinite(q).all(axis=1) & np.isfinite(d["opt_pos"]).all(axis=1)
    q_safe = np.where(ok[:, None], q, [0.0, 0.0, 0.0, 1.0])
    q_safe = q_safe / np.linalg.norm(q_safe, axis=1, keepdims=True)
    readings = {"imu_to_world": q_safe, "world_to_imu": q_safe * np.array([-1.0, -1.0, -1.0, 1.0])}
    rest = ~mov & ok
    if rest.sum() < 10:  # no rest phase marked: use the quietest samples
        rest = ok & (np.linalg.norm(gyr, axis=1) < np.quantile(np.linalg.norm(gyr, axis=1), 0.1))
    g = float(np.linalg.norm(acc[rest], axis=1).mean())
    bias = gyr[rest].mean(axis=0)
    w_imu = gyr - bias
    res: dict[str, Any] = {"trial": path.stem, "samples": n, "rate_hz": rate, "rest_samples": int(rest.sum()),
                           "mocap_nan_samples": int((~ok).sum()), "gravity_at_rest_mps2": g,
                           "gyro_bias_rad_s": bias.tolist()}
    quasi = ok & (np.abs(np.linalg.norm(acc, axis=1) - g) < 0.03 * g) & (np.linalg.norm(w_imu, axis=1) < 0.5)
    if (quasi & mov).sum() > 100:  # moving but momentarily still: orientations other than level
        quasi &= mov
    up = np.tile([0.0, 0.0, 1.0], (int(quasi.sum()), 1))
    # Windows of gyro integration: start and end on a valid mocap sample, inside the movement.
    length = max(1, round(window_s * rate))
    cand = np.arange(0, n - length - 1, length)
    starts = cand[ok[cand] & ok[cand + length] & mov[cand]]
    runs = [(a, b) for a, b in finite_runs(ok) if b - a >= round(0.1 * rate)]
    for name, qr in readings.items():
        r = Rotation.from_quat(qr)
        res[f"gravity_world_at_rest_{name}"] = r[rest].apply(acc[rest]).mean(axis=0).tolist()
        res[f"tilt_error_deg_{name}"] = float(np.median(_angle_deg(r[quasi].apply(acc[quasi]), up))) \
            if quasi.any() else float("nan")
        err = _gyro_integration_error(qr, w_imu, rate, starts, length) if len(starts) else np.array([np.nan])
        res[f"gyro_vs_mocap_deg_{name}"] = {"median": float(np.median(err)), "max": float(np.max(err)),
                                            "windows": len(starts), "window_s": length / rate}
        w_moc = np.full((n, 3), np.nan)
        for a, b in runs:
            w_moc[a:b] = angular_velocity_from_quat(t[a:b], qr[a:b])
        both = np.isfinite(w_moc).all(axis=1)
        res[f"rate_rms_error_rad_s_{name}"] = float(np.sqrt(np.mean(np.sum((w_moc[both] - w_imu[both]) ** 2, 1))))
        if name == "imu_to_world":
            w_ref, both_ref = w_moc, both
    res["gyro_rms_rad_s"] = float(np.sqrt(np.mean(np.sum(w_imu[both_ref & mov] ** 2, 1))))
    lag = _lag_samples(np.linalg.norm(w_imu, axis=1), np.linalg.norm(np.nan_to_num(w_ref), axis=1), both_ref,
                       max_lag=round(0.25 * rate))
    res["time_offset_ms"] = 1e3 * lag / rate
    gyro_err = {k: res[f"gyro_vs_mocap_deg_{k}"]["median"] for k in readings}
    res["convention"] = min(gyro_err, key=lambda k: (np.nan_to_num(gyro_err[k], nan=np.inf),
                                                     res[f"tilt_error_deg_{k}"]))
    res.update(_lever_arm(acc, w_imu, d["opt_pos"], readings[res["convention"]], runs, mov, rate, g))
    res["world_z"] = "up" if res[f"gravity_world_at_rest_{res['convention']}"][2] > 0 else "down"
    return res


def _lever_arm(acc, w, pos, q, runs, mov, rate, g) -> dict[str, Any]:
    rows_a, rows_e = [], []
    win = max(5, round(0.1 * rate) | 1)
    for a, b in runs:
        if b - a <= win:
            continue
        pdd = savgol_filter(pos[a:b], win, 3, deriv=2, delta=1 / rate, axis=0)
        wd = savgol_filter(w[a:b], win, 3, deriv=1, delta=1 / rate, axis=0)
        ws = savgol_filter(w[a:b], win, 3, axis=0)
        f_pred = Rotation.from_quat(q[a:b]).inv().apply(pdd + np.array([0.0, 0.0, g]))
        e = savgol_filter(acc[a:b], win, 3, axis=0) - f_pred
        m = mov[a:b]
        rows_a.append((_skew(wd) + _skew(ws) @ _skew(ws))[m])
        rows_e.append(e[m])
    if not rows_a:
        return {"lever_arm_m": [float("nan")] * 3, "accel_bias_mps2": [float("nan")] * 3,
                "accel_residual_rms_mps2": float("nan")}
    A = np.concatenate(rows_a)
    e = np.concatenate(rows_e)
    M = np.concatenate([A.reshape(-1, 3), np.tile(np.eye(3), (len(A), 1))], axis=1)
    sol, *_ = np.linalg.lstsq(M, e.reshape(-1), rcond=None)
    resid = e.reshape(-1) - M @ sol
    return {"lever_arm_m": sol[:3].tolist(), "accel_bias_mps2": sol[3:].tolist(),
            "accel_residual_rms_mps2": float(np.sqrt(np.mean(resid.reshape(-1, 3) ** 2) * 3)),
            "accel_residual_rms_before_fit_mps2": float(np.sqrt(np.mean(np.sum(e ** 2, axis=1))))}


def _skew(v: np.ndarray) -> np.ndarray:
    z = np.zeros(len(v))
    return np.stack([np.stack([z, -v[:, 2], v[:, 1]], 1), np.stack([v[:, 2], z, -v[:, 0]], 1),
                     np.stack([-v[:, 1], v[:, 0], z], 1)], axis=1)


def format_check(res: dict[str, Any]) -> str:
    """One line of ``check_frames``'s findings."""
    c = res["convention"]
    alt = "world_to_imu" if c == "imu_to_world" else "imu_to_world"
    gi, ga = res[f"gyro_vs_mocap_deg_{c}"], res[f"gyro_vs_mocap_deg_{alt}"]
    lever = ", ".join(f"{x * 100:+.1f}" for x in res["lever_arm_m"])
    return (f"{res['trial']}: opt_quat is {c} (world z {res['world_z']}); |g| at rest "
            f"{res['gravity_at_rest_mps2']:.3f} m/s^2; tilt error {res[f'tilt_error_deg_{c}']:.2f} deg "
            f"(other reading {res[f'tilt_error_deg_{alt}']:.2f});"
            f" gyro integrated {gi['window_s']:.0f} s vs mocap {gi['median']:.2f} deg median, {gi['max']:.2f} max"
            f" over {gi['windows']} windows (other reading {ga['median']:.1f}); rate RMS error "
            f"{res[f'rate_rms_error_rad_s_{c}']:.3f} rad/s of {res['gyro_rms_rad_s']:.3f} (other reading "
            f"{res[f'rate_rms_error_rad_s_{alt}']:.3f}); time offset {res['time_offset_ms']:+.1f} ms (IMU late if +);"
            f" lever arm [{lever}] cm; mocap NaN samples {res['mocap_nan_samples']}")


# ----------------------------------------------------------------------------- inputs


def resolve_trials(inputs: list[str], trials: str | None) -> list[Path]:
    """The .mat files named by ``inputs`` (files, or folders of trials) and ``trials`` (comma list
    of trial numbers such as 01, names such as 01_undisturbed_slow_rotation_A, or file paths)."""
    files: list[Path] = []
    folders: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            folders.append(p)
        elif p.is_file():
            files.append(p)
        else:
            raise DatasetError(f"{p}: no such file or folder")
    available = sorted({f for folder in folders for f in folder.glob("*.mat")})
    if trials:
        for item in (s.strip() for s in trials.split(",") if s.strip()):
            if Path(item).is_file():
                files.append(Path(item))
                continue
            if not folders:
                raise DatasetError(f"--trials {item}: not a file; give the BROAD folder to pick trials from")
            match = [f for f in available if f.stem == item or f.stem == Path(item).stem
                     or (item.isdigit() and f.stem.split("_")[0].isdigit() and int(f.stem.split("_")[0]) == int(item))]
            if not match:
                names = ", ".join(f.stem for f in available) or "no .mat files"
                raise DatasetError(f"--trials {item}: no such trial in {', '.join(map(str, folders))} ({names})")
            files += match
    else:
        if folders and not available:
            raise DatasetError(f"{', '.join(map(str, folders))}: no .mat files")
        files += available
    if not files:
        raise DatasetError("no BROAD trial given: pass .mat files, or a folder (and --trials)")
    seen: dict[Path, None] = {}
    for f in files:
        seen.setdefault(f, None)
    return list(seen)
