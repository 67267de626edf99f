"""hiss-sim: physics consistency of the simulated end-effector, the skin model, and the bags."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from hiss_ros.data.bag import read_streams
from hiss_ros.data.streams import StreamSpec
from hiss_ros.data.write import TYPESTORE
from hiss_ros.errors import ConfigError
from hiss_ros.sim import SimConfig, simulate, train_config_dict
from hiss_ros.sim.bag import MAG_TOPIC, MAG_TYPE, TOPICS, TYPES, records
from hiss_ros.sim.cli import main
from hiss_ros.sim.imu import GRAVITY
from hiss_ros.sim.skin import MagneticSkin
from hiss_ros.sim.trajectory import PHASES

ARRAYS = ("imu_ns", "gyro", "accel", "tactile_ns", "tactile", "gt_ns", "position", "orientation",
          "linear_velocity", "angular_velocity", "force", "torque")


@pytest.fixture(scope="module")
def run() -> object:
    """20 s of contact work, default noise."""
    return simulate(SimConfig(seconds=20, seed=1))


@pytest.fixture(scope="module")
def clean() -> object:
    """Noise-free sensors, no texture vibration, ground truth at the IMU rate."""
    return simulate(SimConfig(seconds=15, seed=2, noise_scale=0, vibration=0, gt_rate_hz=400))


def _serialized(res) -> list[tuple[str, int, bytes]]:
    return [(t, s, bytes(TYPESTORE.serialize_cdr(m, m.__msgtype__))) for t, s, m in records(res, True)]


# --- determinism -----------------------------------------------------------------------------
def test_same_seed_same_data_and_messages_other_seed_differs() -> None:
    a, b, c = (simulate(SimConfig(seconds=2, seed=s)) for s in (7, 7, 8))
    for name in ARRAYS:
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert _serialized(a) == _serialized(b)
    for name in ("gyro", "accel", "tactile", "position"):
        assert not np.allclose(getattr(a, name), getattr(c, name)), name
    assert np.array_equal(a.imu_ns, c.imu_ns)  # same clock


def test_noise_scale_changes_sensors_not_motion() -> None:
    a, b = simulate(SimConfig(seconds=2, seed=3)), simulate(SimConfig(seconds=2, seed=3, noise_scale=0))
    assert np.array_equal(a.position, b.position) and np.array_equal(a.force, b.force)
    assert not np.allclose(a.gyro, b.gyro)


# --- IMU and kinematics ----------------------------------------------------------------------
def test_gravity_at_rest() -> None:
    noisy = simulate(SimConfig(seconds=3, seed=4, motion="still"))
    assert abs(np.linalg.norm(noisy.accel, axis=1).mean() - 9.81) < 0.25  # bias sigma 0.05 m/s^2/axis
    assert np.abs(noisy.gyro.mean(0)).max() < 0.03
    exact = simulate(SimConfig(seconds=3, seed=4, motion="still", noise_scale=0))
    np.testing.assert_allclose(np.linalg.norm(exact.accel, axis=1), 9.81, atol=1e-9)
    # +9.81 along world up, seen in the (tilted) sensor frame
    up = Rotation.from_quat(exact.orientation[0]).apply(exact.accel[0])
    np.testing.assert_allclose(up, [0, 0, 9.81], atol=1e-9)
    np.testing.assert_allclose(exact.gyro, 0, atol=1e-12)
    np.testing.assert_allclose(exact.linear_velocity, 0, atol=1e-12)


def test_contact_run_starts_still(run) -> None:
    start = run.imu_ns < run.imu_ns[0] + 400_000_000  # the first 0.4 s dwell
    assert run.phase[0] == PHASES.index("dwell")
    assert abs(np.linalg.norm(run.accel[start], axis=1).mean() - 9.81) < 0.25


def test_velocity_matches_differentiated_pose(run) -> None:
    dt = np.diff(run.gt_ns).mean() / 1e9
    v_world = (run.position[2:] - run.position[:-2]) / (2 * dt)  # central differences
    v_body = Rotation.from_quat(run.orientation[1:-1]).inv().apply(v_world)
    assert np.abs(run.linear_velocity).max() > 0.05  # it does move
    np.testing.assert_allclose(v_body, run.linear_velocity[1:-1], atol=5e-3)
    rot = Rotation.from_quat(run.orientation)
    w_mid = (rot[:-1].inv() * rot[1:]).as_rotvec() / dt  # body rate over each interval
    np.testing.assert_allclose(w_mid, (run.angular_velocity[:-1] + run.angular_velocity[1:]) / 2, atol=2e-3)


def test_gyro_integrates_to_the_pose_orientation(clean) -> None:
    dt = np.diff(clean.imu_ns).mean() / 1e9
    steps = Rotation.from_rotvec((clean.gyro[:-1] + clean.gyro[1:]) / 2 * dt)
    q = Rotation.from_quat(clean.orientation[0])
    est = [q]
    for step in steps:
        q = q * step
        est.append(q)
    est = Rotation.concatenate(est)
    assert np.array_equal(clean.imu_ns, clean.gt_ns)
    err = (est.inv() * Rotation.from_quat(clean.orientation)).magnitude()
    assert np.rad2deg(np.abs(clean.angular_velocity).max()) > 30  # the tool does rotate
    assert np.rad2deg(err.max()) < 0.05


def test_accelerometer_matches_twice_differentiated_pose(clean) -> None:
    dt = np.diff(clean.gt_ns).mean() / 1e9
    a_world = (clean.position[2:] - 2 * clean.position[1:-1] + clean.position[:-2]) / dt**2
    f = Rotation.from_quat(clean.orientation[1:-1]).inv().apply(a_world - GRAVITY)
    np.testing.assert_allclose(f, clean.accel[1:-1], atol=0.05)
    assert np.abs(clean.accel - clean.accel.mean(0)).max() > 1.0  # not just gravity


# --- contact wrench --------------------------------------------------------------------------
def test_wrench_zero_in_free_motion(run) -> None:
    free = ~run.in_contact
    assert free.mean() > 0.2
    assert np.array_equal(run.force[free], np.zeros_like(run.force[free]))
    assert np.array_equal(run.torque[free], np.zeros_like(run.torque[free]))
    for phase in ("dwell", "free"):
        assert not run.in_contact[run.phase == PHASES.index(phase)].any(), phase


def test_normal_force_pushes_out_of_the_surface_while_pressing(run) -> None:
    touching = run.in_contact
    assert touching.mean() > 0.2
    normal = np.einsum("ij,ij->i", run.force, run.surface_normal)
    np.testing.assert_allclose(normal[touching], run.normal_force[touching], rtol=1e-9)
    assert (normal[touching] > 0).all()
    pressing = np.isin(run.phase, [PHASES.index(p) for p in ("press", "slide", "hold")])
    assert touching[pressing].all() and run.normal_force[pressing].mean() > 2.0
    # The frames: the surface is fixed in the world, so the tool-frame normal rotated by the
    # published pose is one constant world vector, and the force's world normal part is Fn.
    to_world = Rotation.from_quat(run.orientation)
    n_world = to_world.apply(run.surface_normal)
    np.testing.assert_allclose(n_world, np.broadcast_to(n_world[0], n_world.shape), atol=1e-9)
    np.testing.assert_allclose(to_world.apply(run.force)[touching] @ n_world[0], run.normal_force[touching], rtol=1e-9)


def test_friction_opposes_sliding(run) -> None:
    cfg = run.config
    speed = np.linalg.norm(run.slip, axis=1)
    sliding = run.in_contact & (speed > 0.01)
    assert sliding.sum() > 50
    tangential = run.force - np.einsum("ij,ij->i", run.force, run.surface_normal)[:, None] * run.surface_normal
    cos = np.einsum("ij,ij->i", tangential, run.slip)[sliding] / (np.linalg.norm(tangential, axis=1) * speed)[sliding]
    np.testing.assert_allclose(cos, -1.0, atol=1e-9)  # exactly against the slip
    ft = np.linalg.norm(tangential, axis=1)[sliding]
    bound = cfg.friction_mu * run.normal_force[sliding] + cfg.viscous_friction * speed[sliding]
    assert (ft <= bound + 1e-9).all() and (ft > 0.5 * cfg.friction_mu * run.normal_force[sliding]).all()


def test_torque_is_contact_point_cross_force(run) -> None:
    cfg = run.config
    point = np.array([0, 0, -cfg.tool_length]) - cfg.tip_radius * run.surface_normal  # lowest point of the tip
    np.testing.assert_allclose(run.torque, np.cross(point, run.force), atol=1e-12)


# --- tactile skin ----------------------------------------------------------------------------
def _skin() -> MagneticSkin:
    return MagneticSkin(5, np.array([0.0, 0.0, -0.06]), 0.012)


@pytest.mark.parametrize("polar_deg, azimuth_deg", [(0, 0), (20, 45), (35, 0), (30, 200)])
def test_tactile_monotonic_in_normal_force(polar_deg, azimuth_deg) -> None:
    skin = _skin()
    pol, az = np.deg2rad(polar_deg), np.deg2rad(azimuth_deg)
    loc = np.array([0, 0, -0.06]) + 0.012 * np.array([np.sin(pol) * np.cos(az), np.sin(pol) * np.sin(az),
                                                      -np.cos(pol)])
    force = np.linspace(0.0, 30.0, 300)
    b = skin.respond(np.repeat(loc[None], len(force), 0), force, np.zeros((len(force), 3)), dt=0.0025)  # (n,5,3)
    step = np.diff(b, axis=0)
    for taxel in range(5):
        for axis in range(3):
            d = step[:, taxel, axis]
            assert (d >= -1e-9).all() or (d <= 1e-9).all(), (taxel, axis)
    nearest = np.argmin(np.linalg.norm(skin.positions - loc, axis=1))
    assert b[-1, nearest, 2] > 2 * b[0, nearest, 2]  # pressing pulls the magnet closer
    assert (np.diff(np.linalg.norm(b[:, nearest], axis=1)) > 0).all()


def test_tactile_hysteresis_and_saturation() -> None:
    skin = _skin()
    loc = np.repeat(skin.positions[:1], 400, 0)
    force = np.r_[np.linspace(0, 10, 200), np.linspace(10, 0, 200)]  # load, then unload
    bz = skin.respond(loc, force, np.zeros((400, 3)), dt=0.0025)[:, 0, 2]
    up, down = bz[100], bz[299]  # both at 5 N
    assert abs(force[100] - force[299]) < 0.1
    assert down > up + 20  # unloading lags behind: the skin remembers
    assert bz[-1] > bz[0] + 5  # still relaxing after the force is gone
    strong = skin.respond(loc[:1], np.array([200.0]), np.zeros((1, 3)), dt=0.0025)
    clipped = skin.measure(strong, Rotation.identity(1), np.zeros(1), 50.0, np.zeros_like(strong))
    assert clipped.max() == pytest.approx(skin.p.range_ut)


def test_tactile_reacts_to_contact(run) -> None:
    tac_in_contact = np.interp(run.tactile_ns, run.gt_ns, run.normal_force) > 3.0
    free = np.interp(run.tactile_ns, run.gt_ns, run.normal_force) == 0
    spread = np.ptp(run.tactile[free], axis=0).max()  # earth field rotation, drift, noise
    change = np.abs(run.tactile[tac_in_contact] - np.median(run.tactile[free], axis=0)).max(1)
    assert run.tactile.shape[1] == 15 and run.tactile.dtype == np.float32
    assert np.median(change) > spread


# --- configuration ---------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"imu_rate_hz": -1}, "imu_rate_hz = -1: expected a positive number"),
    ({"taxels": 0}, "taxels = 0"),
    ({"noise_scale": -0.5}, "noise_scale = -0.5"),
    ({"seconds": "long"}, "seconds = 'long'"),
    ({"motion": "dance"}, "motion = 'dance'"),
    ({"imu_rate_hz": 333, "tactile_rate_hz": 100}, "imu_rate_hz = 333"),
])
def test_bad_config_names_the_field(kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        SimConfig(**kwargs)


def test_yaml_config_unknown_key(tmp_path) -> None:
    p = tmp_path / "sim.yaml"
    p.write_text("seconds: 1\nimu_rate: 400\n")
    with pytest.raises(ConfigError, match="imu_rate"):
        SimConfig.load(p)


def test_train_config_matches_the_bag_topics() -> None:
    from hiss_ros.train.config import TrainConfig

    cfg = TrainConfig.from_dict(train_config_dict())
    assert cfg.input_rate_hz == SimConfig().imu_rate_hz
    for spec in cfg.inputs + cfg.outputs:
        assert TYPES[spec.topic] == spec.type


# --- bags and the CLI ------------------------------------------------------------------------
def _specs(taxels: int = 5) -> list[StreamSpec]:
    vec = ("x", "y", "z")
    return [
        StreamSpec(TOPICS["imu"], TYPES[TOPICS["imu"]], ("orientation_covariance", "angular_velocity.x",
                                                          "linear_acceleration.z")),
        StreamSpec(TOPICS["tactile"], TYPES[TOPICS["tactile"]], ("data",)),
        StreamSpec(TOPICS["wrench"], TYPES[TOPICS["wrench"]], tuple(f"wrench.force.{a}" for a in vec)),
        StreamSpec(TOPICS["twist"], TYPES[TOPICS["twist"]], tuple(f"twist.linear.{a}" for a in vec)),
        StreamSpec(TOPICS["pose"], TYPES[TOPICS["pose"]], ("pose.position.z", "pose.orientation.w")),
    ]


@pytest.mark.parametrize("storage, extra", [("mcap", ["--magnetic-field", "--zstd"]), ("sqlite3", [])])
def test_cli_writes_a_readable_bag(tmp_path, capsys, storage, extra) -> None:
    out = tmp_path / "sim"
    assert main(["--out", str(out), "--seconds", "2", "--seed", "5", "--storage", storage, "--quiet", *extra]) == 0
    assert (out / f"sim.{'mcap' if storage == 'mcap' else 'db3'}").is_file()
    summary = capsys.readouterr().out
    assert "/imu/data 800" in summary and str(out) in summary
    specs = _specs()
    if "--magnetic-field" in extra:
        specs += [StreamSpec(MAG_TOPIC.format(i), MAG_TYPE, ("magnetic_field.z",)) for i in range(5)]
    data = read_streams([out], specs, progress=False).streams
    rates = {TOPICS["imu"]: 400, TOPICS["tactile"]: 100, TOPICS["wrench"]: 100, TOPICS["twist"]: 100,
             TOPICS["pose"]: 100}
    for topic, hz in rates.items():
        s = data[topic]
        assert len(s.stamps_ns) == 2 * hz, topic
        assert np.median(np.diff(s.stamps_ns)) == pytest.approx(1e9 / hz), topic
        assert s.stamps_ns[0] == 1_000_000_000_000, topic
    assert data[TOPICS["tactile"]].values.shape == (200, 15)
    assert (data[TOPICS["imu"]].values[:, 0] == -1).all()  # no orientation estimate
    res = simulate(SimConfig(seconds=2, seed=5))
    np.testing.assert_allclose(data[TOPICS["tactile"]].values, res.tactile)
    np.testing.assert_allclose(data[TOPICS["wrench"]].values, res.force)
    if "--magnetic-field" in extra:
        np.testing.assert_allclose(data[MAG_TOPIC.format(3)].values[:, 0], res.tactile[:, 11] * 1e-6, rtol=1e-6)


def test_cli_config_file_and_overrides(tmp_path) -> None:
    cfg = tmp_path / "sim.yaml"
    cfg.write_text("seconds: 5\ntaxels: 3\ntactile_rate_hz: 50\n")
    out = tmp_path / "b"
    assert main(["--out", str(out), "--config", str(cfg), "--seconds", "1", "--quiet"]) == 0
    data = read_streams([out], [StreamSpec("/tactile", "std_msgs/msg/Float32MultiArray", ("data",))],
                        progress=False).streams["/tactile"]
    assert data.values.shape == (50, 9)  # 1 s (the flag wins) at 50 Hz, 3 taxels


def test_cli_existing_output_and_bad_settings_exit_2(tmp_path, capsys) -> None:
    out = tmp_path / "sim"
    assert main(["--out", str(out), "--seconds", "0.5", "--quiet"]) == 0
    before = sorted((f.name, f.stat().st_mtime_ns) for f in out.iterdir())
    assert main(["--out", str(out), "--seconds", "0.5", "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted((f.name, f.stat().st_mtime_ns) for f in out.iterdir()) == before
    assert main(["--out", str(out), "--seconds", "0.5", "--seed", "1", "--quiet", "--force"]) == 0
    assert main(["--out", str(tmp_path / "x"), "--taxels", "0", "--quiet"]) == 2
    assert "taxels = 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    other = tmp_path / "notabag"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    assert main(["--out", str(other), "--seconds", "0.5", "--quiet", "--force"]) == 2
    assert (other / "keep.txt").read_text() == "precious"
