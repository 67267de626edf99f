"""Augmentation: rotation (train.augment_rotation_deg; physically consistent, checked, reproducible) and
bias (train.augment_bias_std)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import CHUNK
from safetensors import safe_open
from safetensors.torch import save_file

from hiss_ros.checkpoint import load_checkpoint
from hiss_ros.errors import ConfigError
from hiss_ros.pipeline import Normalization
from hiss_ros.train.augment import BiasAugment, RotationAugment, random_rotations
from hiss_ros.train.config import TrainConfig, TrainSettings
from hiss_ros.train.dataset import Dataset, Split
from hiss_ros.train.loop import STATE_FILE, train

SEQ = 8


def imu_config(**train) -> TrainConfig:
    """config/train_broad_velocity.yaml (gyro + accel -> body-frame velocity) with a tiny model."""
    data = yaml.safe_load(open("config/train_broad_velocity.yaml"))
    data.pop("strapdown")  # these tests hand the trainer datasets of the 6 IMU channels alone
    data["model"] = {"kind": "hiss", "low": {"kind": "s4d", "d_model": 8, "n_layers": 1, "dropout": 0.0},
                     "high": {"kind": "mamba", "d_model": 8, "n_layers": 1, "dropout": 0.0}}
    data["train"] = {"epochs": 2, "batch_size": 4, "lr": 3e-3, "seq_chunks": SEQ, "seed": 1, **train}
    return TrainConfig.from_dict(data)


def norm() -> Normalization:
    """Offsets and scales that differ per channel: a rotation in normalised units would be wrong."""
    return Normalization(np.array([0.1, -0.2, 0.3, 1.0, -2.0, 9.0]), np.array([0.5, 1.0, 2.0, 3.0, 1.5, 0.7]),
                         np.array([0.2, 0.0, -0.4]), np.array([0.3, 1.2, 0.8]))


def test_rotations_are_proper_and_within_the_angle():
    torch.manual_seed(0)
    r = random_rotations(500, 30.0)
    eye = torch.eye(3, dtype=torch.float64).expand(500, 3, 3)
    assert torch.allclose(r.transpose(1, 2) @ r, eye, atol=1e-12)
    assert torch.allclose(torch.linalg.det(r), torch.ones(500, dtype=torch.float64))
    angle = torch.rad2deg(torch.acos(((r.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2).clamp(-1, 1)))
    assert angle.max() <= 30.0 + 1e-6 and angle.max() > 25  # bounded, and the range is used
    assert torch.equal(random_rotations(4, 0.0), torch.eye(3, dtype=torch.float64).expand(4, 3, 3))


def test_inputs_and_targets_turn_together_in_physical_units():
    """One physical vector v as gyro, accel and target: after augmentation all three are R v
    (the same R per window, a different one per window), in physical units."""
    cfg, n = imu_config(augment_rotation_deg=90), norm()
    aug = RotationAugment(cfg.inputs, cfg.outputs, n, 90)
    rng = np.random.default_rng(0)
    v = rng.normal(size=(3, SEQ * CHUNK, 3))  # (b, L, 3) physical
    x = torch.from_numpy(n.inputs(np.concatenate([v, v], -1))).float()
    y = torch.from_numpy(n.outputs(v[:, CHUNK - 1::CHUNK])).float()
    torch.manual_seed(0)
    rot = aug.draw(3)
    xa, ya = aug(x, y, rot)
    xp = xa.double().numpy() * n.input_std + n.input_mean
    yp = ya.double().numpy() * n.output_std + n.output_mean
    want = np.einsum("bij,btj->bti", rot.numpy(), v)
    np.testing.assert_allclose(xp[..., :3], want, atol=1e-4)
    np.testing.assert_allclose(xp[..., 3:], want, atol=1e-4)
    np.testing.assert_allclose(yp, want[:, CHUNK - 1::CHUNK], atol=1e-4)
    assert not np.allclose(rot[0].numpy(), rot[1].numpy())
    assert xa.dtype == x.dtype and ya.dtype == y.dtype


@pytest.mark.parametrize("patch, message", [
    ({"inputs": [{"topic": "/imu/data", "type": "sensor_msgs/msg/Imu",
                  "fields": ["angular_velocity.x", "angular_velocity.z", "angular_velocity.y"]}]},
     "input channel /imu/data 'angular_velocity.x' is not part of a 3-vector"),
    ({"inputs": [{"topic": "/tactile", "type": "std_msgs/msg/Float32MultiArray", "fields": ["data"]}]},
     "input channel /tactile 'data' is not part of a 3-vector"),
    ({"outputs": [{"topic": "/mocap/pose", "type": "geometry_msgs/msg/PoseStamped", "derive": "world_velocity"}]},
     "output /mocap/pose is a world-frame velocity"),
    ({"outputs": [{"topic": "/ft", "type": "geometry_msgs/msg/WrenchStamped",
                   "fields": ["wrench.force.x", "wrench.force.y", "wrench.force.z", "wrench.torque.z"]}]},
     "output channel /ft 'wrench.torque.z' is not part of a 3-vector"),
])
def test_config_refuses_channels_a_rotation_cannot_turn(patch, message):
    data = yaml.safe_load(open("config/train_broad_velocity.yaml"))
    data.pop("strapdown")  # it names IMU channels some of these streams do not have
    data["train"]["augment_rotation_deg"] = 30
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict({**data, **patch})
    data["train"]["augment_rotation_deg"] = 0  # off: the same streams are fine
    TrainConfig.from_dict({**data, **patch})


@pytest.mark.parametrize("deg", [-1, 181, True])
def test_angle_is_validated(deg):
    with pytest.raises(ConfigError, match=r"train\.augment_rotation_deg"):
        TrainSettings(augment_rotation_deg=deg)


def imu_dataset() -> Dataset:
    rng = np.random.default_rng(4)

    def split(segments: int, chunks: int) -> Split:
        x = [rng.normal(size=(chunks, CHUNK, 6)).astype(np.float32) for _ in range(segments)]
        return Split(x, [xi[:, -1, 3:].astype(np.float32) for xi in x], [np.arange(chunks) for _ in x])

    return Dataset(split(3, 4 * SEQ), split(1, 2 * SEQ), (6,), 3, CHUNK, norm())


@pytest.mark.parametrize("setting", [{"augment_rotation_deg": 45.0}, {"augment_bias_std": 0.1},
                                     {"augment_rotation_deg": 45.0, "augment_bias_std": 0.1}])
def test_augmented_training_is_reproducible_and_changes_the_steps(tmp_path, setting):
    ds = imu_dataset()
    for name, kw in [("a", setting), ("b", setting), ("c", {})]:
        train(imu_config(**kw), ds, tmp_path / name, progress=False)
    wa, wb, wc = (load_checkpoint(tmp_path / n / "model.safetensors").model.state_dict() for n in "abc")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    losses = np.loadtxt(tmp_path / "a" / "metrics.csv", delimiter=",", skiprows=1, usecols=1)
    assert len(losses) == 2 and np.isfinite(losses).all()


def test_bias_offsets_each_windows_inputs_by_its_own_constant():
    """Every input channel of a window moves by one constant over the whole window, drawn N(0, s^2)
    per window and channel; the targets do not move."""
    torch.manual_seed(2)
    aug = BiasAugment(0.3, 6)
    x, y = torch.randn(4000, 2 * CHUNK, 6), torch.randn(4000, 2, 3)
    bias = aug.draw(len(x))
    xa, ya = aug(x, y, bias)
    shift = xa - x
    assert torch.equal(ya, y)
    assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-6)  # constant in time
    per = shift[:, 0]  # (windows, channels)
    assert per.std(0).sub(0.3).abs().max() < 0.03 and per.mean(0).abs().max() < 0.03
    assert torch.corrcoef(per.T).sub(torch.eye(6)).abs().max() < 0.1  # channels drawn independently
    with pytest.raises(ConfigError, match=r"train\.augment_bias_std = -0\.1: expected a number >= 0"):
        TrainSettings(augment_bias_std=-0.1)


def test_resume_with_another_angle_is_refused(tmp_path):
    """The angle is part of the run's recipe: --resume with another one must not mix them."""
    ds = imu_dataset()
    train(imu_config(augment_rotation_deg=30.0), ds, tmp_path, progress=False)
    with pytest.raises(ConfigError, match="augment_rotation_deg"):
        train(imu_config(augment_rotation_deg=60.0), ds, tmp_path, resume=True, progress=False)


def test_a_run_from_before_a_setting_existed_resumes(tmp_path):
    """A train state written before augment_rotation_deg / novelty_inflation existed trained with
    their defaults: --resume with the defaults continues it (another value is still refused)."""
    ds = imu_dataset()
    train(imu_config(epochs=1), ds, tmp_path, progress=False)
    with safe_open(str(tmp_path / STATE_FILE), framework="pt") as f:
        meta = json.loads(f.metadata()["train_state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key in ("augment_rotation_deg", "novelty_inflation"):
        del meta["config"]["train"][key]
    meta["config"]["train"]["epochs"] = 2
    save_file(tensors, str(tmp_path / STATE_FILE), metadata={"train_state": json.dumps(meta)})
    result = train(imu_config(epochs=2), ds, tmp_path, resume=True, progress=False)
    assert result.epochs_run == 2
    with pytest.raises(ConfigError, match=r"train\.augment_rotation_deg: 0\.0 -> 10\.0"):
        train(imu_config(epochs=3, augment_rotation_deg=10.0), ds, tmp_path, resume=True, progress=False)
