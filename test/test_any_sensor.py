"""Bring your own sensor: custom message types, field paths, zero header stamps, rate checks, and
bags of every kind (mcap without metadata, sqlite3 without definitions, ROS 1), written for real."""

from __future__ import annotations

import json
import logging
import sqlite3

import numpy as np
import pytest
import yaml

from hiss_ros.data import StreamSpec, read_streams
from hiss_ros.data.types import typestore
from hiss_ros.data.write import imu, wrench, write_bag
from hiss_ros.errors import BagError, ConfigError
from hiss_ros.serving import load_model
from hiss_ros.train.cli import main as train_main
from hiss_ros.train.evaluate import main as eval_main

MS = 1_000_000
TACTILE_MSG = """\
# A tactile pad: per-taxel pressures and the pad's total force (a vendor driver's own message).
std_msgs/Header header
float32[] pressure
geometry_msgs/Vector3 total_force
geometry_msgs/Vector3[] cells
"""
TACTILE = "my_tactile_msgs/msg/TactileArray"


@pytest.fixture
def msgs(tmp_path):
    """A folder of .msg files as an interface package keeps them: <package>/msg/<Name>.msg."""
    folder = tmp_path / "msgs"
    (folder / "my_tactile_msgs" / "msg").mkdir(parents=True)
    (folder / "my_tactile_msgs" / "msg" / "TactileArray.msg").write_text(TACTILE_MSG)
    return folder


def tactile(store, stamp_ns, pressure, force_z):
    T = store.types
    sec, nanosec = divmod(int(stamp_ns), 1_000_000_000)
    header = T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec), frame_id="pad")
    vec = T["geometry_msgs/msg/Vector3"]
    cells = [vec(x=float(p), y=0.0, z=-float(p)) for p in pressure[:3]]
    return T[TACTILE](header=header, pressure=np.asarray(pressure, dtype=np.float32),
                      total_force=vec(x=0.0, y=0.0, z=float(force_z)), cells=cells)


def recording(store, seconds=40.0, imu_hz=200, pad_hz=50, zero_stamps=True, seed=0):
    """IMU at ``imu_hz`` (real header stamps), the custom tactile pad at ``pad_hz`` with header
    stamps left at zero by its driver (``zero_stamps``), and the ground-truth wrench at 100 Hz."""
    rng = np.random.default_rng(seed)
    recs, force = [], 0.0
    n = int(seconds * imu_hz)
    for i in range(n):
        t = 1_000 * MS + round(i * 1e9 / imu_hz)
        accel = np.sin(2 * np.pi * 0.5 * i / imu_hz + np.arange(3))
        force = 0.98 * force + 0.02 * 3 * accel[0]
        recs.append(("/imu/data", t, imu(t, 0.1 * rng.standard_normal(3), accel)))
        if i % (imu_hz // pad_hz) == 0:
            p = np.abs(np.sin(i / imu_hz + np.arange(8))) * (1 + force)
            recs.append(("/pad", t + 2 * MS, tactile(store, 0 if zero_stamps else t, p, force)))
        if i % (imu_hz // 100) == 0:
            recs.append(("/wrench_gt", t + MS, wrench(t, (force, 0, 0), (0, 0, 0))))
    return recs


def train_config(tmp_path, **top):
    cfg = {
        "inputs": [{"topic": "/imu/data", "type": "sensor_msgs/Imu",  # the ROS 1 form of the name
                    "fields": ["angular_velocity.x", "linear_acceleration.x", "linear_acceleration.y"]},
                   {"topic": "/pad", "type": TACTILE, "fields": ["pressure[0:6]", "total_force.z", "cells[1].z"],
                    "rate_hz": 50}],
        "outputs": [{"topic": "/wrench_gt", "type": "geometry_msgs/WrenchStamped", "fields": ["wrench.force.x"]}],
        "input_rate_hz": 200, "output_rate_hz": 20, "max_gap_s": 0.5,
        "model": {"kind": "hiss", "low": {"kind": "s4d", "d_model": 8, "n_layers": 1},
                  "high": {"kind": "mamba", "d_model": 8, "n_layers": 1}},
        "train": {"epochs": 2, "batch_size": 4, "seq_chunks": 16},
        **top,
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def hiss_train(tmp_path, config, bag, *extra):
    return train_main(["--config", str(config), "--bag", str(bag), "--out", str(tmp_path / "run"), "--quiet",
                       "--cache-dir", str(tmp_path / "cache"), *extra])


def test_custom_tactile_message_with_zero_stamps_trains_from_the_definitions_the_bag_carries(
        tmp_path, msgs, caplog, capsys):
    store = typestore([msgs])  # to write the bag; reading needs no --msg-path: the mcap carries the definition
    bag = write_bag(tmp_path / "custom", recording(store), typestore=store)
    with caplog.at_level(logging.WARNING):
        assert hiss_train(tmp_path, train_config(tmp_path), bag) == 0, capsys.readouterr()
    said = [r.getMessage() for r in caplog.records if "header stamps are zero" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("/pad: ") and "receive time" in said[0], caplog.text
    served = load_model(tmp_path / "run")
    assert served.spec.input_stamps == ("header", "receive")
    imu_rate, pad_rate = served.spec.input_rates_hz
    assert imu_rate == pytest.approx(200, rel=1e-3) and pad_rate == pytest.approx(50, rel=1e-3)
    assert served.spec.inputs[0].type == "sensor_msgs/msg/Imu"
    assert served.spec.pipeline.input_dims == (3, 8)  # 6 pressures + total force + one cell's z
    # hiss-eval reads the same bag with the checkpoint's streams
    assert eval_main(["--model", str(tmp_path / "run"), "--bag", str(bag), "--out", str(tmp_path / "eval"),
                      "--quiet", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["chunks"] > 0


def test_fields_index_slice_and_nested_arrays_of_a_custom_message(tmp_path, msgs):
    store = typestore([msgs])
    recs = [("/pad", (1000 + 20 * k) * MS, tactile(store, (1000 + 20 * k) * MS, [k, 2 * k, 3 * k, 4, 5], -k))
            for k in range(10)]
    bag = write_bag(tmp_path / "b", recs, typestore=store)
    spec = StreamSpec("/pad", TACTILE, ("pressure[1:3]", "pressure[-1]", "cells[2].x", "total_force.z", "cells[0].z"))
    s = read_streams([bag], [spec], progress=False).streams["/pad"]
    k = np.arange(10)
    np.testing.assert_array_equal(s.values, np.stack([2 * k, 3 * k, np.full(10, 5), 3 * k, -k, -k], 1))
    for fields, match in [(("pressure[9]",), r"'pressure\[9\]': index 9 is out of range \(the array has 5"),
                          (("total_force[0]",), "is not an array"),
                          (("cells",), "is not numeric"),
                          (("pressure[7:9]",), "is empty in the first message"),
                          (("cells[0].w",), r"no field 'cells\[0\]\.w' \(fields at cells: \['x', 'y', 'z'\]\)")]:
        with pytest.raises(ConfigError, match=match):
            read_streams([bag], [StreamSpec("/pad", TACTILE, fields)], progress=False)
    for bad in ("pressure[1:2].x", "pressure[a]", "pressure.", "1x"):
        with pytest.raises(ConfigError, match="field"):
            StreamSpec("/pad", TACTILE, (bad,))


def test_sqlite3_bag_without_definitions_needs_msg_path(tmp_path, msgs):
    """Bags of rosbag2 before Iron name their types but carry no definitions: a custom type then
    comes from --msg-path, and without it the error says so."""
    store = typestore([msgs])
    bag = write_bag(tmp_path / "old", recording(store, seconds=6.0), storage="sqlite3", typestore=store)
    db = next(bag.glob("*.db3"))
    with sqlite3.connect(db) as con:
        con.execute("DELETE FROM message_definitions")
    spec = StreamSpec("/pad", TACTILE, ("pressure",))
    with pytest.raises(BagError, match=r"does not define message type\(s\) my_tactile_msgs/msg/TactileArray.*"
                                       r"--msg-path <folder with my_tactile_msgs/msg/TactileArray.msg>"):
        read_streams([bag], [spec], progress=False)
    s = read_streams([bag], [spec], progress=False, msg_paths=[msgs]).streams["/pad"]
    assert s.values.shape[1] == 8
    # standard types need nothing: Jazzy's definitions are built in
    assert read_streams([bag], [StreamSpec("/imu/data", "sensor_msgs/msg/Imu", ("angular_velocity.x",))],
                        progress=False).streams["/imu/data"].values.shape == (1200, 1)
    assert hiss_train(tmp_path, train_config(tmp_path, msg_paths=["msgs"]), bag) == 0  # relative to the config


def test_msg_path_errors_name_the_folder_or_file(tmp_path):
    with pytest.raises(ConfigError, match="no such folder"):
        typestore([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"no \.msg files"):
        typestore([tmp_path / "empty"])
    (tmp_path / "bad" / "pkg" / "msg").mkdir(parents=True)
    (tmp_path / "bad" / "pkg" / "msg" / "Broken.msg").write_text("float32[ x\n")
    with pytest.raises(ConfigError, match=r"Broken.msg: not a valid .msg definition"):
        typestore([tmp_path / "bad"])


def test_zero_header_stamps_fall_back_to_receive_time_or_are_kept_when_asked(tmp_path, caplog):
    recs = [("/imu", (1000 + 5 * k) * MS, imu(0, (k, 0, 0), (0, 0, 9.81))) for k in range(100)]
    bag = write_bag(tmp_path / "b", recs)
    fields = ("angular_velocity.x",)
    with caplog.at_level(logging.WARNING):
        data = read_streams([bag], [StreamSpec("/imu", "sensor_msgs/msg/Imu", fields)], progress=False)
    assert "100 of 100 header stamps are zero" in caplog.text
    np.testing.assert_array_equal(data.streams["/imu"].stamps_ns, (1000 + 5 * np.arange(100)) * MS)
    assert data.report["/imu"].stamp_source == "receive"
    kept = read_streams([bag], [StreamSpec("/imu", "sensor_msgs/msg/Imu", fields, stamp="header")], progress=False)
    assert kept.report["/imu"].duplicate_stamps_dropped == 99  # asked for: the header it is
    constant = [("/imu", (1000 + 5 * k) * MS, imu(7 * MS, (k, 0, 0), (0, 0, 9.81))) for k in range(100)]
    data = read_streams([write_bag(tmp_path / "c", constant)], [StreamSpec("/imu", "sensor_msgs/msg/Imu", fields)],
                        progress=False)
    assert data.report["/imu"].stamp_source == "receive" and len(data.streams["/imu"].stamps_ns) == 100
    with pytest.raises(ConfigError, match="stamp = header, but std_msgs/msg/Float32MultiArray has no header"):
        from hiss_ros.data.write import float_array

        read_streams([write_bag(tmp_path / "f", [("/a", MS * (k + 1), float_array([k])) for k in range(5)])],
                     [StreamSpec("/a", "std_msgs/msg/Float32MultiArray", ("data",), stamp="header")], progress=False)


def test_zero_stamps_train_where_they_used_to_leave_nothing(tmp_path, capsys):
    """An IMU driver that never sets header stamps: this used to end in 'every segment is shorter
    than one training sequence' (all but one sample dropped as duplicates)."""
    recs = []
    for k in range(200 * 30):
        t = 1000 * MS + k * 5 * MS
        recs.append(("/imu/data", t, imu(0, (np.sin(k / 50), 0, 0), (np.cos(k / 30), 1, 2))))
        if k % 2 == 0:
            recs.append(("/wrench_gt", t + MS, wrench(t, (np.sin(k / 40), 0, 0), (0, 0, 0))))
    bag = write_bag(tmp_path / "zero", recs)
    cfg = yaml.safe_load(train_config(tmp_path).read_text())
    cfg["inputs"] = cfg["inputs"][:1]
    (tmp_path / "imu.yaml").write_text(yaml.safe_dump(cfg))
    assert hiss_train(tmp_path, tmp_path / "imu.yaml", bag) == 0, capsys.readouterr().err
    assert load_model(tmp_path / "run").spec.input_stamps == ("receive",)


@pytest.mark.parametrize("recorded_hz, configured_hz", [(30, 50), (50, 200)])
def test_a_rate_mismatch_is_one_line_naming_both_rates_or_a_warning_when_allowed(
        tmp_path, capsys, caplog, recorded_hz, configured_hz):
    recs = [("/imu/data", (1000 * MS + round(k * 1e9 / recorded_hz)),
             imu(1000 * MS + round(k * 1e9 / recorded_hz), (np.sin(k / 9), 0, 0), (np.cos(k / 7), 0, 9.8)))
            for k in range(int(40 * recorded_hz))]
    recs += [("/wrench_gt", 1000 * MS + k * 10 * MS, wrench(1000 * MS + k * 10 * MS, (np.sin(k / 20), 0, 0), (0, 0, 0)))
             for k in range(4000)]
    bag = write_bag(tmp_path / "imu", recs)
    cfg = yaml.safe_load(train_config(tmp_path).read_text())
    cfg["inputs"] = cfg["inputs"][:1]
    cfg["input_rate_hz"], cfg["output_rate_hz"] = configured_hz, configured_hz / 10
    (tmp_path / "imu.yaml").write_text(yaml.safe_dump(cfg))
    assert hiss_train(tmp_path, tmp_path / "imu.yaml", bag) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"/imu/data is recorded at {recorded_hz} Hz, but the config expects {configured_hz} Hz" in err[0]
    assert f"set input_rate_hz: {recorded_hz}" in err[0] and "--allow-rate-mismatch" in err[0]
    with caplog.at_level(logging.WARNING):
        assert hiss_train(tmp_path, tmp_path / "imu.yaml", bag, "--allow-rate-mismatch") == 0
    assert "going on anyway (allow_rate_mismatch)" in caplog.text
    # the checkpoint records the measured rate: the node compares it with the live one, hiss-eval with the bag's
    assert load_model(tmp_path / "run").spec.input_rates_hz[0] == pytest.approx(recorded_hz, rel=1e-3)
    slower = [(t, s, m) for k, (t, s, m) in enumerate(r for r in recs if r[0] == "/imu/data") if k % 2 == 0]
    slower += [r for r in recs if r[0] != "/imu/data"]
    other = write_bag(tmp_path / "slower", sorted(slower, key=lambda r: r[1]))
    assert eval_main(["--model", str(tmp_path / "run"), "--bag", str(other), "--out", str(tmp_path / "ev"),
                      "--quiet", "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"/imu/data is recorded at {recorded_hz / 2:g} Hz, but the model was trained at " \
        f"{recorded_hz} Hz" in err[0], err


def test_mcap_file_without_metadata_and_ros1_style_names(tmp_path):
    bag = write_bag(tmp_path / "b", [("/imu", (1000 + 5 * k) * MS, imu((1000 + 5 * k) * MS, (k, 0, 0), (0, 0, 1)))
                                     for k in range(20)])
    (bag / "metadata.yaml").unlink()
    mcap = next(bag.glob("*.mcap"))
    s = read_streams([mcap], [StreamSpec("/imu", "sensor_msgs/Imu", ("angular_velocity.x",))], progress=False)
    np.testing.assert_array_equal(s.streams["/imu"].values[:, 0], np.arange(20))


def test_ros1_bag_of_a_custom_message_with_ros1_names(tmp_path):
    """A ROS 1 bag carries its definitions; the config may name its types the ROS 1 way."""
    from rosbags.rosbag1 import Writer
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    ts = get_typestore(Stores.ROS1_NOETIC)
    ts.register(get_types_from_msg("Header header\nfloat32[] taxels\n", "xela_msgs/msg/Taxels"))
    T = ts.types
    path = tmp_path / "husky.bag"
    with Writer(path) as w:
        conn = w.add_connection("/xela", "xela_msgs/msg/Taxels", typestore=ts)
        for k in range(20):
            sec, nsec = divmod((1000 + 10 * k) * MS, 1_000_000_000)
            msg = T["xela_msgs/msg/Taxels"](
                header=T["std_msgs/msg/Header"](seq=k, stamp=T["builtin_interfaces/msg/Time"](sec=sec, nanosec=nsec),
                                                frame_id="x"),
                taxels=np.array([k, -k, 0.5], dtype=np.float32))
            w.write(conn, (1000 + 10 * k) * MS, ts.serialize_ros1(msg, "xela_msgs/msg/Taxels"))
    s = read_streams([path], [StreamSpec("/xela", "xela_msgs/Taxels", ("taxels[0:2]",))], progress=False)
    np.testing.assert_array_equal(s.streams["/xela"].values, np.stack([np.arange(20), -np.arange(20)], 1))
    assert s.report["/xela"].stamp_source == "header"


def test_the_readme_custom_sensor_example_runs(tmp_path, capsys):
    """examples/custom_sensor: its bag writer, then hiss-train with its config (epochs cut short)."""
    import importlib.util
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "custom_sensor"
    spec = importlib.util.spec_from_file_location("custom_sensor_write_bag", example / "write_bag.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(tmp_path / "pad_bag")]) == 0
    cfg = yaml.safe_load((example / "train.yaml").read_text())
    cfg["train"].update(epochs=1)
    cfg["model"] = {"kind": "hiss", "low": {"kind": "s4d", "d_model": 8, "n_layers": 1},
                    "high": {"kind": "mamba", "d_model": 8, "n_layers": 1}}
    cfg["msg_paths"] = [str(example)]
    (tmp_path / "pad.yaml").write_text(yaml.safe_dump(cfg))
    assert hiss_train(tmp_path, tmp_path / "pad.yaml", tmp_path / "pad_bag") == 0, capsys.readouterr().err
    served = load_model(tmp_path / "run")
    assert served.spec.inputs[1].type == "my_tactile_msgs/msg/TactileArray"
    assert served.spec.input_stamps == ("header", "receive") and served.spec.pipeline.input_dims == (6, 9)


def test_a_later_message_that_does_not_fit_the_fields_is_named(tmp_path):
    from hiss_ros.data.write import float_array

    recs = [("/a", (k + 1) * MS, float_array(np.arange(4 if k < 10 else 2))) for k in range(20)]
    bag = write_bag(tmp_path / "b", recs)
    with pytest.raises(BagError, match=r"/a: message 10 does not fit fields \['data\[3\]'\] as the first one did"):
        read_streams([bag], [StreamSpec("/a", "std_msgs/msg/Float32MultiArray", ("data[3]",))], progress=False)


def test_msg_paths_in_a_config_take_one_folder_or_a_list(tmp_path):
    from hiss_ros.train.config import TrainConfig

    path = train_config(tmp_path, msg_paths="msgs")
    assert TrainConfig.load(path).msg_paths == (str(tmp_path / "msgs"),)
    with pytest.raises(ConfigError, match="msg_paths = 5: expected a folder or a list"):
        TrainConfig.load(train_config(tmp_path, msg_paths=5))


def test_hot_reload_compares_what_is_read_not_declared_rates():
    from dataclasses import replace

    from hiss_ros.serving import load_model

    spec = load_model("contact").spec
    declared = replace(spec, inputs=(spec.inputs[0], replace(spec.inputs[1], rate_hz=100.0)))
    assert spec.same_streams(declared)
    assert not replace(spec, input_stamps=("header", "receive")).same_streams(
        replace(spec, input_stamps=("header", "header")))
