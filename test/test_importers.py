"""hiss-import: BROAD (.mat) and EuRoC/ASL (CSV) -> ROS 2 bags, read back with read_streams.

The inputs are generated here from an analytic trajectory (known pose, body velocity and body
rates), so every value in the bag is checked against ground truth; one test imports a short
excerpt of a real BROAD trial when the shared data set is present (it is in CI).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
from scipy.spatial.transform import Rotation

from hiss_ros.data.bag import read_streams
from hiss_ros.data.streams import StreamSpec
from hiss_ros.importers import broad, euroc
from hiss_ros.importers.cli import main
from hiss_ros.importers.common import DatasetError, finite_runs

RATE = 2000 / 7  # BROAD's 285.714 Hz: 3.5 ms steps
G = 9.81
R0 = Rotation.from_euler("xyz", [25.0, -15.0, 40.0], degrees=True)  # a tilted rest orientation
BROAD_DIR = Path(__file__).resolve().parents[2] / "shared/data/broad"

IMU = StreamSpec("/imu/data", "sensor_msgs/msg/Imu",
                 tuple(f"angular_velocity.{a}" for a in "xyz") + tuple(f"linear_acceleration.{a}" for a in "xyz"))
TWIST_FIELDS = tuple(f"twist.linear.{a}" for a in "xyz") + tuple(f"twist.angular.{a}" for a in "xyz")
POSE_FIELDS = tuple(f"pose.position.{a}" for a in "xyz") + tuple(f"pose.orientation.{a}" for a in "xyzw")


def _envelope(t):
    """0 before 2 s (the rest phase), 1 after 4 s, a C2 quintic ramp between."""
    s = np.clip((t - 2.0) / 2.0, 0.0, 1.0)
    return s**3 * (10 - 15 * s + 6 * s**2)


def _pose_at(t):
    e = _envelope(t)
    pos = np.stack([0.3 * np.sin(0.8 * t), 0.2 * np.sin(1.3 * t + 0.5), 0.1 * np.sin(0.6 * t)], 1) * e[:, None]
    ang = np.stack([0.8 * np.sin(0.7 * t), 0.5 * np.sin(1.1 * t + 0.3), 0.6 * np.sin(0.9 * t + 1.0)], 1) * e[:, None]
    return pos + np.array([0.5, -0.2, 1.0]), R0 * Rotation.from_euler("ZYX", ang)


def trajectory(t):
    """Analytic-trajectory samples at ``t`` (s): position, world velocity, world acceleration,
    body->world rotation, body angular rate (central differences of the analytic functions)."""
    h = 1e-4
    p, rot = _pose_at(t)
    p_m, r_m = _pose_at(t - h)
    p_p, r_p = _pose_at(t + h)
    vel = (p_p - p_m) / (2 * h)
    acc = (p_p - 2 * p + p_m) / h**2
    omega = (r_m.inv() * r_p).as_rotvec() / (2 * h)
    return p, vel, acc, rot, omega


def broad_arrays(seconds: float = 20.0, gyro_delay_s: float = 0.0):
    n = round(seconds * RATE)
    t = np.arange(n) / RATE
    p, vel, acc_w, rot, omega = trajectory(t)
    gyro = trajectory(t - gyro_delay_s)[4]
    accel = rot.inv().apply(acc_w + np.array([0.0, 0.0, G]))
    mag = rot.inv().apply([20.0, 5.0, -40.0])  # uT
    q_wxyz = rot.as_quat()[:, [3, 0, 1, 2]]
    return {"imu_acc": accel, "imu_gyr": gyro, "imu_mag": mag, "opt_quat": q_wxyz, "opt_pos": p,
            "movement": (t >= 2.0).astype(np.uint8)[:, None], "sampling_rate": np.array([[RATE]]),
            "info": np.array(["synthetic BROAD-like trial"])}, t, vel, rot, omega


# A mocap gap of 40 samples, then 10 valid samples (a run too short for a twist), then 3 more NaN.
GAP = slice(2000, 2040)
SHORT = slice(2040, 2050)
GAP2 = slice(2050, 2053)
N_NAN = 43


@pytest.fixture(scope="module")
def broad_mat(tmp_path_factory):
    arrays, t, vel, rot, omega = broad_arrays()
    for gap in (GAP, GAP2):
        arrays["opt_quat"][gap] = np.nan
        arrays["opt_pos"][gap] = np.nan
    path = tmp_path_factory.mktemp("broad") / "07_synthetic_trial.mat"
    scipy.io.savemat(path, arrays)
    return path, arrays, t, rot.inv().apply(vel), omega


def read(bag, *specs):
    return read_streams([bag], list(specs), progress=False).streams


def run(argv) -> int:
    return main([*argv, "--no-progress"])


def test_broad_round_trip(broad_mat, tmp_path, capsys):
    mat, arrays, t, v_body, omega = broad_mat
    out = tmp_path / "bag"
    assert run(["broad", str(mat), "--out", str(out)]) == 0
    line = capsys.readouterr().out
    n = len(t)
    assert str(out) in line and f"/imu/data {n}" in line and f"/mocap/pose {n - N_NAN}" in line
    assert f"{N_NAN} NaN mocap samples" in line and "10 samples in mocap runs too short" in line

    mag = StreamSpec("/imu/mag", "sensor_msgs/msg/MagneticField", tuple(f"magnetic_field.{a}" for a in "xyz"))
    s = read(out, IMU, mag, StreamSpec("/mocap/pose", "geometry_msgs/msg/PoseStamped", POSE_FIELDS),
             StreamSpec("/mocap/twist", "geometry_msgs/msg/TwistStamped", TWIST_FIELDS))
    stamps = broad.T0_NS + np.round(np.arange(n) * 3.5e6).astype(np.int64)
    np.testing.assert_array_equal(s["/imu/data"].stamps_ns, stamps)
    np.testing.assert_array_equal(s["/imu/data"].values, np.concatenate([arrays["imu_gyr"], arrays["imu_acc"]], 1))
    np.testing.assert_allclose(s["/imu/mag"].values, arrays["imu_mag"] * 1e-6)

    ok = np.ones(n, bool)
    ok[GAP] = ok[GAP2] = False
    np.testing.assert_array_equal(s["/mocap/pose"].stamps_ns, stamps[ok])
    np.testing.assert_array_equal(s["/mocap/pose"].values[:, :3], arrays["opt_pos"][ok])
    np.testing.assert_array_equal(s["/mocap/pose"].values[:, 3:], arrays["opt_quat"][ok][:, [1, 2, 3, 0]])

    has_twist = ok.copy()
    has_twist[SHORT] = False
    tw = s["/mocap/twist"]
    np.testing.assert_array_equal(tw.stamps_ns, stamps[has_twist])
    assert np.isfinite(tw.values).all()
    # Body velocity and rates against the analytic ones, also right next to the gap.
    assert np.abs(tw.values[:, :3] - v_body[has_twist]).max() < 2e-3
    assert np.abs(tw.values[:, 3:] - omega[has_twist]).max() < 2e-2
    assert np.abs(v_body[has_twist]).max() > 0.2  # the check above is not trivially small numbers

    attribution = (out / "ATTRIBUTION.md").read_text()
    assert "CC BY 4.0" in attribution and "doi:10.3390/data6070072" in attribution
    assert "synthetic BROAD-like trial" in attribution


def test_broad_excerpt_and_options(broad_mat, tmp_path):
    mat, arrays, *_ = broad_mat
    full, part = tmp_path / "full", tmp_path / "part"
    assert run(["broad", str(mat), "--out", str(full), "--no-mag", "--storage", "sqlite3"]) == 0
    assert run(["broad", str(mat), "--out", str(part), "--start", "5", "--duration", "4", "--t0", "50",
                "--zstd"]) == 0
    twist = StreamSpec("/mocap/twist", "geometry_msgs/msg/TwistStamped", TWIST_FIELDS)
    a, b = read(full, twist, IMU), read(part, twist, IMU)
    assert not list(full.glob("*.mcap")) and list(full.glob("*.db3"))
    with pytest.raises(Exception, match="no topic '/imu/mag'"):
        read(full, StreamSpec("/imu/mag", "sensor_msgs/msg/MagneticField", ("magnetic_field.x",)))
    t_imu = b["/imu/data"].stamps_ns
    assert len(t_imu) == round(4 * RATE)
    i0 = 1429  # the first sample at or after 5 s: 1429 * 3.5 ms = 5.0015 s
    assert t_imu[0] == 50_000_000_000 + i0 * 3_500_000  # t0 + i / rate: the trial's own sample grid
    np.testing.assert_array_equal(b["/imu/data"].values[:, :3], arrays["imu_gyr"][i0:i0 + len(t_imu)])
    # The excerpt's twist is the full trial's (derived before cutting: no edge effects at the cut).
    shift = 50_000_000_000 - broad.T0_NS
    sel = np.isin(a["/mocap/twist"].stamps_ns + shift, b["/mocap/twist"].stamps_ns)
    np.testing.assert_allclose(b["/mocap/twist"].values, a["/mocap/twist"].values[sel], atol=1e-12)
    assert "samples 1429..2571" in (part / "ATTRIBUTION.md").read_text()


def test_broad_lever_arm_moves_pose_and_twist_to_the_imu(broad_mat, tmp_path):
    mat, arrays, _, v_body, omega = broad_mat
    r = np.array([0.01, 0.02, -0.03])
    out = tmp_path / "lever"
    assert run(["broad", str(mat), "--out", str(out), "--lever-arm", "0.01,0.02,-0.03", "--duration", "5"]) == 0
    s = read(out, StreamSpec("/mocap/pose", "geometry_msgs/msg/PoseStamped", POSE_FIELDS),
             StreamSpec("/mocap/twist", "geometry_msgs/msg/TwistStamped", TWIST_FIELDS))
    n = len(s["/mocap/pose"].stamps_ns)  # the gap starts at 7 s: every sample has a pose and twist
    assert n == len(s["/mocap/twist"].stamps_ns) == round(5 * RATE)
    rot = Rotation.from_quat(arrays["opt_quat"][:n][:, [1, 2, 3, 0]])
    np.testing.assert_allclose(s["/mocap/pose"].values[:, :3], arrays["opt_pos"][:n] + rot.apply(r), atol=1e-12)
    expect = v_body[:n] + np.cross(omega[:n], r)  # the IMU's velocity: v + w x r (body frame)
    assert np.abs(s["/mocap/twist"].values[:, :3] - expect).max() < 2e-3
    assert run(["broad", str(mat), "--out", str(tmp_path / "x"), "--lever-arm", "1,2"]) == 2


def test_broad_several_trials_existing_output_and_bad_input(broad_mat, tmp_path, capsys):
    mat = broad_mat[0]
    folder = tmp_path / "trials"
    folder.mkdir()
    second = folder / "08_other.mat"
    second.write_bytes(mat.read_bytes())
    (folder / "07_synthetic_trial.mat").write_bytes(mat.read_bytes())
    out = tmp_path / "bags"
    assert run(["broad", str(folder), "--trials", "7,08_other", "--out", str(out), "--duration", "3"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["07_synthetic_trial", "08_other"]
    assert (out / "08_other" / "ATTRIBUTION.md").is_file()

    capsys.readouterr()
    assert run(["broad", str(second), "--out", str(out / "08_other"), "--duration", "1"]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert run(["broad", str(second), "--out", str(out / "08_other"), "--duration", "1", "--force"]) == 0
    assert len(read(out / "08_other", IMU)["/imu/data"].stamps_ns) == round(RATE)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    assert run(["broad", str(second), "--out", str(tmp_path / "notes"), "--force"]) == 2
    assert (tmp_path / "notes" / "keep.txt").is_file() and "not deleting" in capsys.readouterr().err

    assert run(["broad", str(folder), "--trials", "99", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--trials 99: no such trial" in err and "08_other" in err
    text = tmp_path / "fake.mat"
    text.write_text("not a mat file\n")
    assert run(["broad", str(text), "--out", str(tmp_path / "y")]) == 2
    assert "not a MATLAB .mat file" in capsys.readouterr().err
    scipy.io.savemat(tmp_path / "other.mat", {"imu_acc": np.zeros((5, 3))})
    assert run(["broad", str(tmp_path / "other.mat"), "--out", str(tmp_path / "z")]) == 2
    assert "not a BROAD trial: no imu_gyr" in capsys.readouterr().err
    assert run(["broad", str(tmp_path / "missing.mat"), "--out", str(tmp_path / "z")]) == 2
    assert run(["nosuchformat", "x"]) == 2
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


@pytest.mark.parametrize("stored", ["imu_to_world", "world_to_imu"])
def test_check_frames_identifies_the_convention(tmp_path, stored):
    arrays, *_ = broad_arrays(seconds=16.0, gyro_delay_s=0.007)  # the gyro 2 samples late
    if stored == "world_to_imu":
        arrays["opt_quat"][:, 1:] *= -1  # the conjugate: world->IMU
    arrays["opt_quat"][3000:3010] = np.nan
    path = tmp_path / "trial.mat"
    scipy.io.savemat(path, arrays)
    res = broad.check_frames(path, window_s=4.0)
    other = "world_to_imu" if stored == "imu_to_world" else "imu_to_world"
    assert res["convention"] == stored and res["world_z"] == "up"
    assert abs(res["gravity_at_rest_mps2"] - G) < 1e-6
    np.testing.assert_allclose(res[f"gravity_world_at_rest_{stored}"], [0, 0, G], atol=1e-6)
    # (quasi-static samples still accelerate a little: a few degrees, not the other reading's tens)
    assert res[f"tilt_error_deg_{stored}"] < 3 < 30 < res[f"tilt_error_deg_{other}"]
    assert res[f"gyro_vs_mocap_deg_{stored}"]["median"] < 1.0
    assert res[f"gyro_vs_mocap_deg_{other}"]["median"] > 20.0
    assert res[f"rate_rms_error_rad_s_{stored}"] < res[f"rate_rms_error_rad_s_{other}"] / 5
    assert abs(res["time_offset_ms"] - 7.0) < 1.0
    assert np.abs(res["lever_arm_m"]).max() < 0.005
    assert stored in broad.format_check(res)


def test_finite_runs_split_on_nan_and_time_gaps():
    valid = np.array([1, 1, 0, 1, 1, 1, 1, 0, 0, 1], bool)
    stamps = np.array([0, 1, 2, 3, 4, 10, 11, 12, 13, 14]) * 10
    np.testing.assert_array_equal(finite_runs(valid), [[0, 2], [3, 7], [9, 10]])
    np.testing.assert_array_equal(finite_runs(valid, stamps), [[0, 2], [3, 5], [5, 7], [9, 10]])


# ----------------------------------------------------------------------------- EuRoC

IMU_HEADER = ("#timestamp [ns],w_RS_S_x [rad s^-1],w_RS_S_y [rad s^-1],w_RS_S_z [rad s^-1],"
              "a_RS_S_x [m s^-2],a_RS_S_y [m s^-2],a_RS_S_z [m s^-2]")
GT_HEADER = ("#timestamp, p_RS_R_x [m], p_RS_R_y [m], p_RS_R_z [m], q_RS_w [], q_RS_x [], q_RS_y [], q_RS_z [], "
             "v_RS_R_x [m s^-1], v_RS_R_y [m s^-1], v_RS_R_z [m s^-1], b_w_RS_S_x [rad s^-1], "
             "b_w_RS_S_y [rad s^-1], b_w_RS_S_z [rad s^-1], b_a_RS_S_x [m s^-2], b_a_RS_S_y [m s^-2], "
             "b_a_RS_S_z [m s^-2]")
T_START = 1_403_636_579_758_555_392  # a EuRoC-like stamp (ns since 1970)
GYRO_BIAS = np.array([-0.002, 0.02, 0.08])


def _write_csv(path: Path, header: str, stamps, values) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [f"{s}," + ",".join(repr(float(x)) for x in row) for s, row in zip(stamps, values, strict=True)]
    path.write_text(header + "\n" + "\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def euroc_seq(tmp_path_factory):
    """mav0/ with an IMU at 200 Hz and ground truth at 200 Hz offset by 2 ms, 6 s."""
    root = tmp_path_factory.mktemp("euroc") / "MH_synthetic"
    t_imu = T_START + np.arange(1200) * 5_000_000
    t_gt = T_START + 2_000_000 + np.arange(1190) * 5_000_000
    s_imu, s_gt = (t_imu - T_START) / 1e9 + 3.0, (t_gt - T_START) / 1e9 + 3.0  # in the moving part
    _, _, acc_w, rot_i, omega_i = trajectory(s_imu)
    imu_vals = np.concatenate([omega_i + GYRO_BIAS, rot_i.inv().apply(acc_w + np.array([0.0, 0.0, G]))], 1)
    p, vel, _, rot, omega = trajectory(s_gt)
    q = rot.as_quat()[:, [3, 0, 1, 2]]
    gt_vals = np.concatenate([p, q, vel, np.tile(GYRO_BIAS, (len(t_gt), 1)), np.zeros((len(t_gt), 3))], 1)
    _write_csv(root / "mav0/imu0/data.csv", IMU_HEADER, t_imu, imu_vals)
    _write_csv(root / "mav0/state_groundtruth_estimate0/data.csv", GT_HEADER, t_gt, gt_vals)
    return root, t_imu, imu_vals, t_gt, gt_vals, rot.inv().apply(vel), omega


def test_euroc_folder_and_files(euroc_seq, tmp_path, capsys):
    root, t_imu, imu_vals, t_gt, gt_vals, v_body, omega = euroc_seq
    pose_spec = StreamSpec("/groundtruth/pose", "geometry_msgs/msg/PoseStamped", POSE_FIELDS)
    twist_spec = StreamSpec("/groundtruth/twist", "geometry_msgs/msg/TwistStamped", TWIST_FIELDS)
    mav0 = root / "mav0"
    outs = {"root": tmp_path / "a", "mav0": tmp_path / "b", "files": tmp_path / "c"}
    assert run(["euroc", str(root), "--out", str(outs["root"])]) == 0
    assert run(["euroc", str(mav0), "--out", str(outs["mav0"]), "--storage", "sqlite3"]) == 0
    assert run(["euroc", "--imu", str(mav0 / "imu0/data.csv"), "--groundtruth",
                str(mav0 / "state_groundtruth_estimate0/data.csv"), "--out", str(outs["files"])]) == 0
    assert "/imu/data 1200, /groundtruth/pose 1190, /groundtruth/twist 1190" in capsys.readouterr().out
    for out in outs.values():
        s = read(out, IMU, pose_spec, twist_spec)
        np.testing.assert_array_equal(s["/imu/data"].stamps_ns, t_imu)  # file stamps kept
        np.testing.assert_array_equal(s["/imu/data"].values, imu_vals)
        np.testing.assert_array_equal(s["/groundtruth/pose"].stamps_ns, t_gt)
        np.testing.assert_allclose(s["/groundtruth/pose"].values[:, :3], gt_vals[:, :3])
        np.testing.assert_allclose(s["/groundtruth/pose"].values[:, 3:], gt_vals[:, [4, 5, 6, 3]], atol=1e-12)
        tw = s["/groundtruth/twist"]
        np.testing.assert_allclose(tw.values[:, :3], v_body, atol=1e-9)  # R^T v_world, exact
        assert np.abs(tw.values[:, 3:] - omega).max() < 2e-2  # quaternion derivative
        assert np.abs(v_body).max() > 0.2


def test_euroc_angular_from_gyro_and_excerpt(euroc_seq, tmp_path):
    root, _, _, t_gt, _, _, omega = euroc_seq
    out = tmp_path / "g"
    assert run(["euroc", str(root), "--out", str(out), "--angular", "gyro", "--start", "1", "--duration", "2"]) == 0
    tw = read(out, StreamSpec("/groundtruth/twist", "geometry_msgs/msg/TwistStamped", TWIST_FIELDS))
    stamps = tw["/groundtruth/twist"].stamps_ns
    assert stamps[0] >= T_START + 1_000_000_000 and stamps[-1] < T_START + 3_000_000_000
    sel = np.isin(t_gt, stamps)
    assert sel.sum() == 400
    # gyro (bias added in the file) interpolated to the ground-truth stamps minus the bias column
    assert np.abs(tw["/groundtruth/twist"].values[:, 3:] - omega[sel]).max() < 5e-3


def test_euroc_malformed_row(euroc_seq, tmp_path, capsys):
    root = euroc_seq[0]
    lines = (root / "mav0/imu0/data.csv").read_text().splitlines()
    lines[16] = ",".join(lines[16].split(",")[:5])  # line 17: 5 fields
    bad = tmp_path / "imu" / "data.csv"
    bad.parent.mkdir()
    bad.write_text("\n".join(lines) + "\n")
    gt = str(root / "mav0/state_groundtruth_estimate0/data.csv")
    assert run(["euroc", "--imu", str(bad), "--groundtruth", gt, "--out", str(tmp_path / "o")]) == 2
    assert (f"{bad}:17: expected 7 comma-separated numbers (timestamp + gyro xyz + accel xyz), got 5"
            in capsys.readouterr().err)
    lines[16] = lines[17].replace(",", ",x", 1)
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"data.csv:17: expected a number in column 2, got 'x"):
        euroc.read_csv(bad, euroc.IMU_LAYOUT)
    assert run(["euroc", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a EuRoC/ASL sequence" in capsys.readouterr().err
    assert run(["euroc", "--imu", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- real data


def test_real_broad_excerpt(tmp_path):
    trial = BROAD_DIR / "01_undisturbed_slow_rotation_A.mat"
    assert trial.is_file(), f"the BROAD data set is expected at {BROAD_DIR}"
    out = tmp_path / "real"
    assert run(["broad", str(trial), "--out", str(out), "--duration", "5"]) == 0
    s = read(out, IMU, StreamSpec("/mocap/pose", "geometry_msgs/msg/PoseStamped", POSE_FIELDS),
             StreamSpec("/mocap/twist", "geometry_msgs/msg/TwistStamped", TWIST_FIELDS))
    acc = s["/imu/data"].values[:, 3:]
    assert len(acc) == round(5 * RATE)
    assert abs(np.linalg.norm(acc, axis=1).mean() - 9.81) < 0.15  # at rest: gravity
    # the published orientation maps the IMU frame into the world (ENU): gravity comes out on +z
    idx = np.searchsorted(s["/imu/data"].stamps_ns, s["/mocap/pose"].stamps_ns)
    up = Rotation.from_quat(s["/mocap/pose"].values[:, 3:]).apply(acc[idx]).mean(axis=0)
    np.testing.assert_allclose(up, [0, 0, 9.85], atol=0.15)
    tw = s["/mocap/twist"].values
    assert len(tw) > 0.9 * len(acc) and np.isfinite(tw).all()
    assert np.abs(tw[:, :3]).max() < 0.05  # at rest


def test_real_broad_frames_are_imu_to_world():
    """On a fast-rotation trial the gyro tells the two readings of opt_quat apart: the importer's
    (IMU -> world, world z up) must be the one the data supports."""
    from hiss_ros.importers.broad import check_frames

    res = check_frames(BROAD_DIR / "06_undisturbed_fast_rotation_A.mat")
    assert res["convention"] == "imu_to_world" and res["world_z"] == "up"
    assert res["gyro_vs_mocap_deg_imu_to_world"]["median"] < 5 < res["gyro_vs_mocap_deg_world_to_imu"]["median"]
    assert res["rate_rms_error_rad_s_imu_to_world"] < 0.2 * res["gyro_rms_rad_s"]
