"""The strapdown velocity feature (hiss_ros.pipeline.strapdown): physics, causality, episodes, config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from hiss_ros.data.streams import StreamSpec
from hiss_ros.errors import ConfigError
from hiss_ros.pipeline import Normalization, Pipeline, PipelineConfig, StrapdownConfig
from hiss_ros.pipeline.strapdown import Strapdown
from hiss_ros.train.augment import RotationAugment
from hiss_ros.train.config import TrainConfig

RATE = 400.0
G = np.array([0.0, 0.0, 9.81])
AXIS = np.array([1.0, 2.0, 0.5]) / np.linalg.norm([1.0, 2.0, 0.5])
R0 = Rotation.from_rotvec([0.3, -0.2, 0.1])  # tilted: gravity on every accelerometer axis


def imu_rows(R: Rotation, accel_world: np.ndarray, omega_world: np.ndarray) -> np.ndarray:
    """Exact IMU rows (gyro, accelerometer) in the body frame of a motion given in the world frame."""
    return np.c_[R.inv().apply(omega_world), R.inv().apply(accel_world + G)]


def feature(rows: np.ndarray, chunk: int = 10) -> np.ndarray:
    sd = Strapdown(StrapdownConfig((0, 1, 2), (3, 4, 5)), RATE)
    return np.concatenate([sd.rows(rows[i:i + chunk]) for i in range(0, len(rows), chunk)])


def test_a_sensor_at_rest_or_turning_in_place_reads_no_velocity():
    t = np.arange(int(20 * RATE)) / RATE
    still = imu_rows(R0 * Rotation.identity(len(t)), np.zeros((len(t), 3)), np.zeros((len(t), 3)))
    assert np.abs(feature(still)).max() < 1e-9  # from the first sample: it starts in the rest state
    # 5 rad/s about a tilted axis: the accelerometer sweeps gravity through every axis, the gyro
    # turns it back; a model that reads rotation as translation fails exactly here
    R = Rotation.from_rotvec(np.outer(5 * t, AXIS)) * R0
    turning = imu_rows(R, np.zeros((len(t), 3)), np.tile(5 * AXIS, (len(t), 1)))
    assert np.abs(feature(turning)).max() < 1e-9
    # without the gyro's transport the same data integrates gravity into metres per second
    assert np.abs(feature(np.c_[np.zeros((len(t), 3)), turning[:, 3:]])).max() > 1.0


def test_translation_and_rotation_about_a_pivot_read_as_body_velocity():
    t = np.arange(int(40 * RATE)) / RATE
    late = t > 25  # the episode starts moving, not at rest: that transient decays with the longer tau
    # shaking along a line at 2 Hz, no rotation
    w = 2 * np.pi * 2.0
    v_w = np.outer(0.4 * np.sin(w * t), [1.0, -0.5, 0.3])
    a_w = np.outer(0.4 * w * np.cos(w * t), [1.0, -0.5, 0.3])
    R = R0 * Rotation.identity(len(t))
    v = feature(imu_rows(R, a_w, np.zeros_like(a_w)))
    err = np.sqrt(((v - R.inv().apply(v_w))[late] ** 2).mean()) / np.sqrt((v_w[late] ** 2).mean())
    # gravity cancelled, the leaks' lag remains: relative error (1/t1 + 1/t2) / w = 0.11 at 2 Hz
    assert err < 0.13, err
    # swung at 10 rad/s about a pivot 5 cm away: constant body velocity, centripetal acceleration
    omega = 10.0 * AXIS
    R = Rotation.from_rotvec(np.outer(10.0 * t, AXIS)) * R0
    v_w = np.cross(omega, R.apply([0.05, 0.0, 0.02]))
    v = feature(imu_rows(R, np.cross(omega, v_w), np.tile(omega, (len(t), 1))))
    v_b = R.inv().apply(v_w)
    err = np.linalg.norm(v - v_b, axis=1)[late].mean() / np.linalg.norm(v_b, axis=1).mean()
    assert err < 0.15, err  # the leaky integrals' phase lag at 1.6 Hz; no sign of gravity


def test_it_turns_with_the_sensor():
    """Frame covariance: the IMU mounted turned by Q gives Q times the feature (so rotation
    augmentation may turn the derived channels like any body-frame 3-vector)."""
    rng = np.random.default_rng(0)
    rows = np.c_[rng.normal(0, 3, (2000, 3)), rng.normal(0, 3, (2000, 3)) + G]
    Q = Rotation.from_rotvec([0.7, -0.4, 1.1])
    turned = np.c_[Q.apply(rows[:, :3]), Q.apply(rows[:, 3:])]
    np.testing.assert_allclose(feature(turned), Q.apply(feature(rows)), atol=1e-9)


def pipeline_chunks(rows: np.ndarray, stamps: np.ndarray, chunk: int) -> tuple[np.ndarray, list[int]]:
    cfg = PipelineConfig((6,), RATE, RATE / chunk, strapdown=StrapdownConfig((0, 1, 2), (3, 4, 5)))
    eps = Pipeline(cfg).process([(stamps, rows)])
    return np.concatenate([e.x.reshape(-1, 9) for e in eps]), [len(e.stamps_ns) for e in eps]


def test_in_the_pipeline_causal_chunking_free_and_fresh_after_a_gap():
    rng = np.random.default_rng(1)
    n = 4000
    rows = np.c_[rng.normal(0, 2, (n, 3)), rng.normal(0, 2, (n, 3)) + G]
    stamps = (np.arange(n) * (1e9 / RATE)).astype(np.int64) + 10**9
    x10, _ = pipeline_chunks(rows, stamps, 10)
    x5, _ = pipeline_chunks(rows, stamps, 5)
    assert x10.shape == (n, 9)
    np.testing.assert_array_equal(x10[:, :6], rows)  # the inputs pass unchanged (no normalisation)
    np.testing.assert_allclose(x5, x10, atol=1e-12)  # chunk boundaries do not matter: state carried
    # causal: a different future leaves every earlier row as it was
    later = rows.copy()
    later[2500:] += 5.0
    np.testing.assert_array_equal(pipeline_chunks(later, stamps, 10)[0][:2500], x10[:2500])
    assert np.abs(pipeline_chunks(later, stamps, 10)[0][2500:, 6:] - x10[2500:, 6:]).max() > 0.1
    # a gap ends the episode: the feature starts afresh (at rest: 0), not from the moving state
    gapped = stamps.copy()
    gapped[2000:] += 10**9
    rest = rows.copy()
    rest[2000:] = np.r_[0.0, 0.0, 0.0, Rotation.from_rotvec([0.2, 0.1, 0.0]).inv().apply(G)]
    x, lengths = pipeline_chunks(rest, gapped, 10)
    assert lengths == [200, 200]
    assert np.abs(x[:2000, 6:]).max() > 0.1 and np.abs(x[2000:, 6:]).max() < 1e-9


def test_normalisation_covers_the_derived_channels():
    cfg = PipelineConfig((6, 2), RATE, RATE / 10, strapdown=StrapdownConfig((0, 1, 2), (3, 4, 5)))
    assert cfg.channels == 11
    with pytest.raises(ConfigError, match="normalization has 8 input channels, pipeline has 11"):
        Pipeline(cfg, Normalization.identity(8, 3))
    Pipeline(cfg, Normalization.identity(11, 3))


IMU = {"topic": "/imu/data", "type": "sensor_msgs/msg/Imu",
       "fields": [f"{v}.{a}" for v in ("angular_velocity", "linear_acceleration") for a in "xyz"]}


def train_config(strapdown) -> TrainConfig:
    return TrainConfig.from_dict({
        "inputs": [IMU], "input_rate_hz": 200, "output_rate_hz": 20, "strapdown": strapdown,
        "outputs": [{"topic": "/twist", "type": "geometry_msgs/msg/TwistStamped",
                     "fields": ["twist.linear.x", "twist.linear.y", "twist.linear.z"]}],
        "model": {"kind": "hiss", "low": {"kind": "s4d", "d_model": 8, "n_layers": 1},
                  "high": {"kind": "mamba", "d_model": 8, "n_layers": 1}}})


def test_config_names_the_imu_channels_and_refuses_what_does_not_fit():
    cfg = train_config({"gyro": "/imu/data:angular_velocity", "accel": "/imu/data:linear_acceleration"})
    pc = cfg.pipeline_config((6,))
    assert (pc.strapdown.gyro, pc.strapdown.accel, pc.strapdown.taus) == ((0, 1, 2), (3, 4, 5), (1.0, 3.0))
    assert pc.channels == 9
    stored = PipelineConfig((6,), 200, 20, strapdown=pc.strapdown.to_dict())  # the checkpoint's form
    assert stored == pc
    with pytest.raises(ConfigError, match=r"no input channel /imu/data:linear_accel\.x; the inputs are"):
        train_config({"gyro": "/imu/data:angular_velocity", "accel": "/imu/data:linear_accel"})
    with pytest.raises(ConfigError, match="taus"):
        train_config({"gyro": [0, 1, 2], "accel": [3, 4, 5], "taus": [3.0, 1.0]})
    with pytest.raises(ConfigError, match="6 different channels"):
        train_config({"gyro": [0, 1, 2], "accel": [2, 3, 4]})
    with pytest.raises(ConfigError, match="expected the keys gyro, accel"):
        train_config({"gyro": [0, 1, 2]})
    with pytest.raises(ConfigError, match="the inputs have 6 channels"):
        train_config({"gyro": [0, 1, 2], "accel": [3, 4, 6]}).pipeline_config((6,))


def test_rotation_augmentation_turns_the_derived_channels_too():
    specs = (StreamSpec.from_dict(IMU),)
    out = (StreamSpec.from_dict({"topic": "/twist", "type": "geometry_msgs/msg/TwistStamped",
                                 "fields": ["twist.linear.x", "twist.linear.y", "twist.linear.z"]}),)
    norm = Normalization(np.arange(9.0), np.linspace(1, 2, 9), np.zeros(3), np.ones(3))
    aug = RotationAugment(specs, out, norm, 90.0, derived_vectors=1)
    x, y = torch.randn(2, 5, 9), torch.randn(2, 1, 3)
    rot = aug.draw(2)
    xt, _ = aug(x, y, rot)
    phys = x.double() * torch.tensor(norm.input_std) + torch.tensor(norm.input_mean)
    turned = (xt.double() * torch.tensor(norm.input_std) + torch.tensor(norm.input_mean))
    for o in (0, 3, 6):
        expected = torch.einsum("bij,btj->bti", rot, phys[..., o:o + 3])
        torch.testing.assert_close(turned[..., o:o + 3], expected, atol=1e-5, rtol=1e-5)
