"""Bag reading and training data: two streams on one topic, clocks that restart or disagree, and
config mistakes refused before any bag is read."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from hiss_ros.data import StreamSpec, read_streams
from hiss_ros.data.write import float_array, imu, wrench, write_bag
from hiss_ros.errors import ConfigError, HissError
from hiss_ros.train.config import TrainConfig
from hiss_ros.train.dataset import collect_segments, load_dataset

MS = 1_000_000
S = 1_000 * MS
WRENCH = "geometry_msgs/msg/WrenchStamped"
FORCE = StreamSpec("/wrench", WRENCH, tuple(f"wrench.force.{a}" for a in "xyz"))
TORQUE = StreamSpec("/wrench", WRENCH, tuple(f"wrench.torque.{a}" for a in "xyz"))
IMU_FIELDS = [f"{v}.{a}" for v in ("angular_velocity", "linear_acceleration") for a in "xyz"]


def records(seconds=10.0, restarts=1, truth_offset_ns=0, receive_offset_ns=0, straggler=False):
    """IMU at 200 Hz and a wrench at 100 Hz (force k, torque -k), header-stamped; with ``restarts``
    > 1 the header stamps start over each run while the receive time goes on. ``truth_offset_ns``
    shifts the wrench's header stamps (another clock). ``straggler``: the first run's last wrench
    arrives after the second run's first IMU sample."""
    runs, n = [], int(seconds * 200)
    for r in range(restarts):
        run = []
        for i in range(n):
            s = S + i * 5 * MS
            recv = s + r * 2 * n * 5 * MS + receive_offset_ns
            run.append(("/imu", recv, imu(s, (np.sin(i / 50), 0, 0), (0, np.cos(i / 30), 9.81))))
            if i % 2 == 0:
                k = r * n + i
                run.append(("/wrench", recv + MS, wrench(s + truth_offset_ns, (k, 2 * k, 3 * k), (-k, -2 * k, 1))))
        runs.append(run)
    if straggler:  # received right after the second run's first IMU sample
        last = max(j for j, rec in enumerate(runs[0]) if rec[0] == "/wrench")
        runs[1].insert(1, ("/wrench", runs[1][0][1] + MS // 2, runs[0].pop(last)[2]))
    return [rec for run in runs for rec in run]


def config(**edit):
    cfg = {"inputs": [{"topic": "/imu", "type": "sensor_msgs/msg/Imu", "fields": IMU_FIELDS}],
           "outputs": [FORCE.to_dict()], "input_rate_hz": 200, "output_rate_hz": 20,
           "model": {"kind": "hiss", "low": {"kind": "s4d", "d_model": 8, "n_layers": 1},
                     "high": {"kind": "mamba", "d_model": 8, "n_layers": 1}},
           "train": {"seq_chunks": 16, "val_fraction": 0.25}}
    cfg.update(edit)
    return TrainConfig.from_dict(cfg)


def test_two_streams_on_one_topic_each_get_their_own_fields(tmp_path):
    bag = write_bag(tmp_path / "b", records(seconds=1.0))
    data = read_streams([bag], [FORCE, TORQUE], progress=False)
    force, torque = data.timelines[0]
    np.testing.assert_array_equal(force.values[:, 0], np.arange(0, 200, 2))
    np.testing.assert_array_equal(torque.values[:, 0], -np.arange(0, 200, 2))
    np.testing.assert_array_equal(torque.values[:, 2], 1)
    cached = read_streams([bag], [FORCE, TORQUE], cache_dir=tmp_path / "cache", progress=False)
    again = read_streams([bag], [FORCE, TORQUE], cache_dir=tmp_path / "cache", progress=False)
    assert again.from_cache
    for a, b in zip(cached.timelines[0], again.timelines[0], strict=True):
        np.testing.assert_array_equal(a.values, b.values)

    # and the training targets: force columns, then torque columns
    seg = collect_segments(config(outputs=[FORCE.to_dict(), TORQUE.to_dict()]),
                           [write_bag(tmp_path / "long", records())], progress=False)
    y = np.concatenate(seg.train.y)
    assert y.shape[1] == 6
    np.testing.assert_allclose(y[:, 3:5], -y[:, 0:2])
    np.testing.assert_allclose(y[:, 5], 1)


def test_a_restarted_clock_starts_a_new_time_line_rather_than_dropping_the_rest(tmp_path):
    bag = write_bag(tmp_path / "b", records(seconds=4.0, restarts=2))
    whole = read_streams([bag], [FORCE], progress=False)  # no split asked: one hygiene rule, the rest late
    assert len(whole.timelines) == 1 and len(whole.streams["/wrench"].stamps_ns) == 400 == 800 - 399 - 1
    data = read_streams([bag], [StreamSpec("/imu", "sensor_msgs/msg/Imu", ("angular_velocity.x",)), FORCE],
                        restart_gap_s=0.5, progress=False)
    assert len(data.timelines) == 2 and data.reports[1].out_of_order == 0
    for run, (imu_line, wrench_line) in enumerate(data.timelines):
        np.testing.assert_array_equal(imu_line.stamps_ns, S + 5 * MS * np.arange(800))
        np.testing.assert_array_equal(wrench_line.values[:, 0], run * 800 + np.arange(0, 800, 2))
    with pytest.raises(ValueError, match="2 time lines"):
        _ = data.streams

    one = collect_segments(config(), [write_bag(tmp_path / "one", records())], progress=False)
    two = collect_segments(config(), [write_bag(tmp_path / "two", records(restarts=2))], progress=False)
    assert one.train.chunks > 100 and two.train.chunks == 2 * one.train.chunks
    assert two.val.chunks == 2 * one.val.chunks and two.counters.get("time_backwards", 0) == 0


def test_a_sample_of_the_old_time_line_arriving_after_the_restart_is_dropped_alone(tmp_path):
    bag = write_bag(tmp_path / "b", records(seconds=4.0, restarts=2, straggler=True))
    data = read_streams([bag], [StreamSpec("/imu", "sensor_msgs/msg/Imu", ("angular_velocity.x",)), FORCE],
                        restart_gap_s=0.5, progress=False)
    assert [len(line[1].stamps_ns) for line in data.timelines] == [399, 400]
    assert data.reports[1].out_of_order == 1


def test_fields_given_as_one_string_are_one_field():
    spec = StreamSpec.from_dict({"topic": "/tactile", "type": "std_msgs/msg/Float32MultiArray", "fields": "data"})
    assert spec.fields == ("data",)


@pytest.mark.parametrize("truth_offset_ns, receive_offset_ns, stamp", [
    (1_700_000_000 * 10**9, 0, None),  # ground truth on wall-clock time, the IMU on its device clock
    (0, 1_700_000_000 * 10**9, "receive"),  # the IMU read by its receive time, the truth by its header
])
def test_streams_on_different_clocks_are_named_as_the_likely_cause(tmp_path, truth_offset_ns, receive_offset_ns,
                                                                   stamp):
    bag = write_bag(tmp_path / "b", records(truth_offset_ns=truth_offset_ns, receive_offset_ns=receive_offset_ns))
    inputs = [{"topic": "/imu", "type": "sensor_msgs/msg/Imu", "fields": IMU_FIELDS,
               **({"stamp": stamp} if stamp else {})}]
    with pytest.raises(HissError) as err:
        load_dataset(config(inputs=inputs), [bag], progress=False)
    msg = str(err.value)
    assert "no training data" in msg and "different clocks" in msg and "shorter than" not in msg
    assert "input /imu 1.000 .. 10.995 s" in msg or "input /imu 1700000001." in msg
    assert "output /wrench" in msg and "stamp: receive" in msg and "stamp: header" in msg


def test_a_model_typo_is_refused_with_the_config_before_any_bag_is_read(tmp_path):
    model = {"kind": "hiss", "low": {"kind": "s4d", "d_model": 8, "d_modle": 8, "n_layers": 1},
             "high": {"kind": "mamba", "d_model": 8, "n_layers": 1}}
    with pytest.raises(ConfigError, match=r"hiss.low: unknown field\(s\) \['d_modle'\]"):
        config(model=model)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"inputs": [{"topic": "/imu", "type": "sensor_msgs/msg/Imu", "fields": IMU_FIELDS}],
                                    "outputs": [FORCE.to_dict()], "input_rate_hz": 200, "output_rate_hz": 20,
                                    "model": model}))
    with pytest.raises(ConfigError, match="d_modle"):
        TrainConfig.load(path)


def test_the_tactile_of_the_default_config_still_reads_as_one_field(tmp_path):
    bag = write_bag(tmp_path / "b", [("/tactile", S + k * 20 * MS, float_array([k, -k])) for k in range(10)])
    spec = StreamSpec.from_dict({"topic": "/tactile", "type": "std_msgs/msg/Float32MultiArray", "fields": "data"})
    np.testing.assert_array_equal(read_streams([bag], [spec], progress=False).streams["/tactile"].values[:, 1],
                                  -np.arange(10))
