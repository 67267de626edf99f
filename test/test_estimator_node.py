"""The estimator node over real DDS: every estimate arrives and equals the offline model's."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import ROS_ENV, Listener
from rclpy.serialization import serialize_message
from test_train import config

from hiss_ros.checkpoint import load_checkpoint
from hiss_ros.data import StreamSpec, read_streams
from hiss_ros.data.synthetic import contact_bag
from hiss_ros.pipeline import Pipeline
from hiss_ros.pipeline.core import DROP_REASONS
from hiss_ros.serving import load_model
from hiss_ros.train.cli import main as train_main

IMU_FIELDS = tuple(f"{p}.{a}" for p in ("angular_velocity", "linear_acceleration") for a in "xyz")


@pytest.fixture(scope="module")
def imu_model(tmp_path_factory):
    """A small model trained on the IMU stream of a simulated contact bag (header stamps only,
    so live stamps equal the bag's)."""
    tmp = tmp_path_factory.mktemp("estimator")
    bag = contact_bag(tmp / "bag", seconds=20.0)
    cfg = yaml.safe_load(config(tmp, epochs=2).read_text())
    cfg["inputs"] = cfg["inputs"][:1]
    (tmp / "imu.yaml").write_text(yaml.safe_dump(cfg))
    assert train_main(["--config", str(tmp / "imu.yaml"), "--bag", str(bag), "--out", str(tmp / "run"), "--quiet",
                       "--cache-dir", str(tmp / "cache")]) == 0
    return bag, tmp / "run" / "model.safetensors"


def offline_estimates(bag, model_path):
    """{stamp_ns: estimate} from the offline forward pass over the whole recording."""
    served = load_model(model_path)
    spec = served.spec
    streams = read_streams([bag], spec.inputs, progress=False).streams
    pipe = Pipeline(spec.pipeline, spec.normalization)
    (ep,) = pipe.process([(streams[s.topic].stamps_ns, streams[s.topic].values) for s in spec.inputs])
    with torch.no_grad():
        y = served.model(torch.from_numpy(ep.x.reshape(1, -1, ep.x.shape[-1])))[0].numpy()
    return dict(zip(ep.stamps_ns.tolist(), spec.normalization.physical(y), strict=True))


class Driver:
    """The estimator node in its own process, and a test node that talks to it over DDS."""

    runs = 0

    def __init__(self, model_path, *params: str, twist_type: type | None = None, active: bool = True) -> None:
        # Topics of their own per run: a node of an earlier test may linger in DDS discovery.
        Driver.runs += 1
        # A namespace of their own per run (a node of an earlier test may linger in DDS discovery);
        # every topic of the node follows it: that is the namespacing users rely on.
        self.ns = f"/run_{Driver.runs}"
        self.imu_topic, self.prefix = f"{self.ns}/imu/data", f"{self.ns}/hiss_estimator"
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import WrenchStamped
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Imu
        from visualization_msgs.msg import MarkerArray

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hiss_ros.nodes.estimator", "--ros-args", "-p", f"model_path:={model_path}",
             "-p", "num_threads:=1", "-p", "diagnostics_period_s:=0.2", "-p", "step_backend:=eager",
             "-r", f"__ns:={self.ns}", *params],
            env={**os.environ, **ROS_ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.ros = Listener("estimator_test_driver")
        self.node = self.ros.node
        self.got: dict[int, np.ndarray] = {}
        self.diagnostics: dict[str, str] = {}
        self.status: tuple = (None, "", "")
        self.arrows: list = []
        self.wrenches: list = []
        self.twists: list = []
        subs = [self.node.create_subscription(WrenchStamped, f"{self.prefix}/wrench", self._on_estimate, 1000),
                self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 10)]
        if twist_type is not None:
            subs.append(self.node.create_subscription(twist_type, f"{self.prefix}/twist", self.twists.append, 1000))
        if "publish_markers:=true" in params:
            subs.append(self.node.create_subscription(MarkerArray, f"{self.prefix}/markers",
                                                      lambda m: self.arrows.append(m.markers), 1000))
        self.pub = self.node.create_publisher(Imu, self.imu_topic,
                                              QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE))
        self.Imu = Imu
        self.subs = subs
        if active:
            self.wait_until_active()

    def wait_until_active(self) -> None:
        subs = self.subs
        # Both directions discovered before any data flows (a volatile topic keeps nothing for late joiners).
        assert self.spin_until(lambda: self.pub.get_subscription_count() > 0
                               and all(sub.get_publisher_count() > 0 for sub in subs), 60), "estimator not discovered"
        # ... including the estimator's side of our IMU topic, or its first samples would be lost.
        # (after its compile with step_backend:=compile: up to a minute or so on a slow machine)
        assert self.spin_until(lambda: self.diagnostics.get("publishers imu/data") == "1", 120), self.diagnostics

    def _on_estimate(self, m) -> None:
        self.wrenches.append(m)
        t = m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec
        self.got[t] = np.array([m.wrench.force.x, m.wrench.force.y, m.wrench.force.z])

    def _on_diagnostics(self, m) -> None:
        for st in m.status:
            if st.name == f"{self.prefix.lstrip('/')}: estimator":
                self.diagnostics = {kv.key: kv.value for kv in st.values}
                self.status = (st.level, st.message, st.hardware_id)

    def spin_until(self, condition, timeout_s: float) -> bool:
        return self.ros.spin_until(condition, timeout_s)

    def set_parameter(self, value, name: str = "model_path") -> tuple[bool, str]:
        """Set one of the estimator's parameters over its service: (successful, reason)."""
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter

        client = self.node.create_client(SetParameters, f"{self.prefix}/set_parameters")
        assert self.spin_until(client.service_is_ready, 30)
        future = client.call_async(SetParameters.Request(
            parameters=[Parameter(name, value=str(value)).to_parameter_msg()]))
        assert self.spin_until(future.done, 30)
        result = future.result().results[0]
        return result.successful, result.reason

    def call(self, srv_type, name: str, request):
        """Call the estimator's service ``name`` (relative to the node) and return the response."""
        client = self.node.create_client(srv_type, f"{self.prefix}/{name}")
        assert self.spin_until(client.service_is_ready, 30), name
        future = client.call_async(request)
        assert self.spin_until(future.done, 30), name
        return future.result()

    def transition(self, label: str) -> bool:
        """Ask the lifecycle node for the transition ``label`` (configure, activate, ...)."""
        from lifecycle_msgs.msg import Transition
        from lifecycle_msgs.srv import ChangeState

        ids = {"configure": Transition.TRANSITION_CONFIGURE, "activate": Transition.TRANSITION_ACTIVATE,
               "deactivate": Transition.TRANSITION_DEACTIVATE, "cleanup": Transition.TRANSITION_CLEANUP}
        return self.call(ChangeState, "change_state", ChangeState.Request(transition=Transition(id=ids[label]))).success

    def arrow_stamps(self) -> list[int]:
        return [a[0].header.stamp.sec * 1_000_000_000 + a[0].header.stamp.nanosec for a in self.arrows]

    def publish(self, stamp_ns: int, gyro, accel, sec_nanosec: tuple[int, int] | None = None) -> None:
        msg = self.Imu()
        msg.header.stamp.sec, msg.header.stamp.nanosec = sec_nanosec or divmod(int(stamp_ns), 1_000_000_000)
        for dst, v in ((msg.angular_velocity, gyro), (msg.linear_acceleration, accel)):
            dst.x, dst.y, dst.z = (float(a) for a in v)
        self.pub.publish(msg)

    def close(self) -> str:
        self.proc.terminate()
        out = self.proc.communicate(timeout=30)[0]
        self.ros.close()
        print(f"--- the estimator's output (exit {self.proc.returncode}) ---\n{out}")  # shown if the test fails
        return out


def bag_imu(bag):
    """(stamps_ns, gyro, accel) of the bag's IMU messages, in order."""
    data = read_streams([bag], [StreamSpec("/imu/data", "sensor_msgs/msg/Imu", IMU_FIELDS)], progress=False)
    s = data.streams["/imu/data"]
    return s.stamps_ns, s.values[:, :3], s.values[:, 3:]


@pytest.mark.parametrize("step_backend, intake", [("eager", "paced"), ("auto", "paced"), ("eager", "callbacks")])
def test_live_estimates_equal_offline(imu_model, monkeypatch, step_backend, intake):
    bag, model_path = imu_model
    expected = offline_estimates(bag, model_path)
    for k, v in ROS_ENV.items():
        monkeypatch.setenv(k, v)
    d = Driver(model_path, "-p", "publish_markers:=true", "-p", f"step_backend:={step_backend}",
               "-p", f"intake:={intake}")
    try:
        # auto: the node estimates eagerly while it compiles in the background; test the compiled step
        want = "compile" if step_backend == "auto" else step_backend
        assert d.spin_until(lambda: d.diagnostics.get("step_backend") == want, 180), d.diagnostics
        stamps, gyro, accel = bag_imu(bag)
        for n in range(len(stamps)):
            d.publish(stamps[n], gyro[n], accel[n])
            if (n + 1) % 10 == 0:  # flow control: let the estimate of this chunk arrive first
                assert d.spin_until(lambda n=n: len(d.got) >= (n + 1) // 10 - 1, 20), f"stalled at {len(d.got)}"
        assert d.spin_until(lambda: len(d.got) >= len(expected), 20)
        last = max(expected)
        d.spin_until(lambda: last in d.arrow_stamps(), 10)
        backend = d.diagnostics.get("step_backend")
        assert d.spin_until(lambda: float(d.diagnostics.get("step_ms_p50", 0)) > 0, 10), d.diagnostics
        timing = {k: float(d.diagnostics[k]) for k in ("inference_ms_p50", "step_ms_p50", "glue_cpu_ms_p50")}
        decoded_by = d.diagnostics.get("decoded_by imu/data")
        # Three samples more, short of a chunk: they wait for one (nodes.pacing, nodes.deferral); the diagnostics
        # report counts them.
        for k in range(1, 4):
            d.publish(stamps[-1] + k * (stamps[-1] - stamps[-2]), gyro[-1], accel[-1])
        assert d.spin_until(lambda: d.diagnostics.get("received imu/data") == str(len(stamps) + 3), 10), d.diagnostics
        batched = int(d.diagnostics.get("samples_batched", 0))  # of every sample, now all reported
        taken_by, lost = d.diagnostics.get("intake"), d.diagnostics.get("lost imu/data")
    finally:
        out = d.close()
    assert backend == want, out[-3000:]  # not fallen back to eager
    assert taken_by == intake, out[-3000:]  # not fallen back to callbacks
    assert lost == "0", lost  # the middleware's message-lost count is read (Fast DDS has it)
    assert decoded_by == "bytes", decoded_by  # raw bytes, read at the offsets checked with the bag reader's decoding
    assert batched > len(stamps) // 2, batched  # most samples were taken with others
    # the node's own work per estimate: the step within it, the CPU time beyond the step positive and smaller
    assert 0 < timing["step_ms_p50"] <= timing["inference_ms_p50"] and 0 < timing["glue_cpu_ms_p50"] < 5, timing
    assert sorted(d.got) == sorted(expected), f"{len(d.got)} estimates, {len(expected)} expected\n{out[-2000:]}"
    diff = max(np.abs(d.got[t] - expected[t]).max() for t in expected)
    assert diff <= 1e-4, diff
    # RViz arrows: one per output, from the origin to the estimated force.
    assert last in d.arrow_stamps(), "no marker for the last estimate"
    tip = d.arrows[d.arrow_stamps().index(last)][0].points[1]
    np.testing.assert_allclose([tip.x, tip.y, tip.z], expected[last], atol=1e-4)


def test_bad_input_is_counted_and_estimation_recovers(imu_model, monkeypatch):
    """NaN, a duplicated stamp, truncated bytes, time jumping back and a long gap: the node survives, counts each,
    resets its state, and estimates later good data."""
    _, model_path = imu_model
    for k, v in ROS_ENV.items():
        monkeypatch.setenv(k, v)
    d = Driver(model_path)
    period = 5_000_000  # 200 Hz
    rng = np.random.default_rng(0)

    def burst(t0, n=60):
        for k in range(n):
            d.publish(t0 + k * period, rng.standard_normal(3), rng.standard_normal(3))
            if k % 10 == 9:
                d.ros.executor.spin_once(timeout_sec=0.01)

    try:
        t0 = 10_000_000_000
        burst(t0)
        assert d.spin_until(lambda: len(d.got) >= 5, 20), d.diagnostics
        d.publish(t0 + 60 * period, [np.nan, 0, 0], [0, 0, 0])  # non-finite
        d.publish(t0 + 59 * period, [0, 0, 0], [0, 0, 0])  # duplicate of the last good stamp
        for _ in range(4):  # truncated bytes: the node decodes raw messages itself; warned of once per 5 s
            d.pub.publish(serialize_message(d.Imu())[:40])
        burst(t0 - 5_000_000_000)  # time jumps back 5 s (a bag loop)
        burst(t0 + 20_000_000_000)  # then a 25 s gap
        assert d.spin_until(lambda: sum(t > t0 + 20_000_000_000 for t in d.got) >= 5, 20), "no estimates after gap"
        assert d.spin_until(lambda: int(d.diagnostics.get("resets", 0)) >= 2, 10), d.diagnostics
        diag = d.diagnostics
    finally:
        out = d.close()
    assert d.proc.returncode is not None and "Traceback" not in out, out[-3000:]
    assert int(diag["pipeline nonfinite"]) >= 1
    assert int(diag["pipeline duplicate"]) >= 1
    assert int(diag["unreadable imu/data"]) == 4 and out.count("do not decode as sensor_msgs/msg/Imu") == 1, out[-3000:]
    assert int(diag["pipeline time_backwards"]) >= 1
    assert int(diag["pipeline gap"]) >= 1


def test_hot_reload_swaps_good_checkpoints_and_refuses_bad_ones(imu_model, monkeypatch, tmp_path):
    import json
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    bag, model_path = imu_model
    other = tmp_path / "other.safetensors"
    shutil.copy(model_path, other)  # same streams: swapped in
    wrong = tmp_path / "wrong.safetensors"  # expects another IMU topic: refused
    with safe_open(str(model_path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["hiss_ros"])
    meta["data"]["inputs"][0]["topic"] = "/imu/other"
    save_file(tensors, str(wrong), metadata={"hiss_ros": json.dumps(meta)})
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    # Hostile checkpoints that once killed the node or made it publish NaN (#12).
    meta["data"]["inputs"][0]["topic"] = "/imu/data"
    hostile = {"nan_weights": ({k: v.clone().fill_(float("nan")) if k == "head.weight" else v
                                for k, v in tensors.items()}, meta),
               "list_metadata": (tensors, []),
               "huge_config": (tensors, {**meta, "model": {**meta["model"], "high": {
                   **meta["model"]["high"], "d_model": 10**9}}}),
               "zero_std": (tensors, {**meta, "normalization": {
                   **meta["normalization"], "input_std": [0.0] * len(meta["normalization"]["input_std"])}})}
    for name, (t, m) in hostile.items():
        save_file(t, str(tmp_path / f"{name}.safetensors"), metadata={"hiss_ros": json.dumps(m)})
    for k, v in ROS_ENV.items():
        monkeypatch.setenv(k, v)
    d = Driver(model_path)
    set_model = d.set_parameter

    try:
        ok, reason = set_model("elsewhere", "frame_id")  # fixed at start-up: refused, not silently ignored
        assert not ok and "read-only" in reason, reason
        ok, reason = set_model(garbage)
        assert not ok and "not a readable safetensors file" in reason
        ok, reason = set_model(wrong)
        assert not ok and "/imu/other" in reason and "restart the node" in reason
        for name in hostile:
            ok, reason = set_model(tmp_path / f"{name}.safetensors")
            assert not ok and reason.startswith("model_path refused: ") and "\n" not in reason, (name, reason)
        stamps, gyro, accel = bag_imu(bag)
        for n in range(100):
            d.publish(stamps[n], gyro[n], accel[n])
        assert d.spin_until(lambda: len(d.got) >= 9, 20), "the old model stopped estimating after refusals"
        ok, reason = set_model(other)
        assert ok, reason
        for n in range(100, 200):
            d.publish(stamps[n], gyro[n], accel[n])
        assert d.spin_until(lambda: len(d.got) >= 19 and d.diagnostics.get("reloads") == "1"
                            and d.diagnostics.get("model_path") == str(other), 20), d.diagnostics
    finally:
        out = d.close()
    assert "Traceback" not in out, out[-3000:]


def test_hot_reload_with_compiled_step(imu_model, monkeypatch, tmp_path):
    """step_backend:=compile: compiled before the node spins; a hot-reloaded model estimates
    with the eager step at once, then with its own compiled step once the background compile is
    done."""
    import shutil

    bag, model_path = imu_model
    other = tmp_path / "other.safetensors"
    shutil.copy(model_path, other)
    for k, v in ROS_ENV.items():
        monkeypatch.setenv(k, v)
    d = Driver(model_path, "-p", "step_backend:=compile")
    try:
        assert d.spin_until(lambda: d.diagnostics.get("compile") == "in use", 30), d.diagnostics
        assert d.diagnostics["step_backend"] == "compile"
        ok, reason = d.set_parameter(other)
        assert ok, reason
        assert d.spin_until(lambda: d.diagnostics.get("reloads") == "1" and d.diagnostics.get("compile") == "in use"
                            and d.diagnostics.get("step_backend") == "compile", 180), d.diagnostics
        stamps, gyro, accel = bag_imu(bag)
        for n in range(100):
            d.publish(stamps[n], gyro[n], accel[n])
        assert d.spin_until(lambda: len(d.got) >= 9, 20), "no estimates from the reloaded, compiled model"
    finally:
        out = d.close()
    assert "Traceback" not in out, out[-3000:]
    assert "compiled step in use" in out and "failed" not in out, out[-3000:]


def test_sim_time_replay_with_header_less_tactile(tmp_path, monkeypatch):
    """Replay node with /clock + estimator with use_sim_time: the header-less tactile stream is
    stamped with the bag's time, so every chunk of the recording is estimated, in bag time."""
    for k, v in ROS_ENV.items():
        monkeypatch.setenv(k, v)
    from geometry_msgs.msg import WrenchStamped

    bag = contact_bag(tmp_path / "train_bag", seconds=20.0, seed=3)
    assert train_main(["--config", str(config(tmp_path, epochs=1)), "--bag", str(bag), "--out", str(tmp_path / "run"),
                       "--quiet", "--cache-dir", str(tmp_path / "cache")]) == 0
    demo = contact_bag(tmp_path / "demo_bag", seconds=5.0, seed=4)
    est = subprocess.Popen(
        [sys.executable, "-m", "hiss_ros.nodes.estimator", "--ros-args", "-p",
         f"model_path:={tmp_path / 'run' / 'model.safetensors'}", "-p", "use_sim_time:=true",
         "-p", "step_backend:=eager", "-r", "__ns:=/simtime"],
        env={**os.environ, **ROS_ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    ros = Listener("sim_time_listener")
    stamps: list[int] = []
    sub = ros.node.create_subscription(WrenchStamped, "/simtime/hiss_estimator/wrench", lambda m: stamps.append(
        m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec), 1000)
    replay = None
    try:
        assert ros.spin_until(lambda: sub.get_publisher_count() > 0, 60), "estimator not up"
        replay = subprocess.Popen(
            [sys.executable, "-m", "hiss_ros.nodes.replay", str(demo), "--clock", "--rate", "2", "--topics",
             "/imu/data", "/tactile", "--wait-for-subscribers", "30",
             "--ros-args", "-r", "/imu/data:=/simtime/imu/data", "-r", "/tactile:=/simtime/tactile"],
            env={**os.environ, **ROS_ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        ros.spin_until(lambda: len(stamps) >= 95, 60)
    finally:
        for p in (replay, est):
            if p is not None:
                p.terminate()
        out = est.communicate(timeout=30)[0]
        ros.close()
    # 5 s at 20 Hz = 100 chunks; the first starts at the first IMU sample (bag time 1.0 s).
    assert len(stamps) >= 95, f"{len(stamps)} estimates\n{out[-2000:]}"
    assert 1_000_000_000 < stamps[0] < 1_200_000_000 and np.all(np.diff(stamps) == 50_000_000)


def test_frame_ids_velocity_covariance_and_max_gap_override(tmp_path, monkeypatch):
    """Per-kind frame ids, twists with the checkpoint's validation error as covariance, and a
    deployment max_gap_s tighter than the training one."""
    from geometry_msgs.msg import TwistWithCovarianceStamped

    from hiss_ros.sim import SimConfig, simulate
    from hiss_ros.sim.bag import write_sim_bag
    from hiss_ros.sim.train_config import train_config_dict

    bag = write_sim_bag(tmp_path / "sim", simulate(SimConfig(seconds=20.0, seed=1)))
    cfg = train_config_dict()
    cfg["inputs"] = cfg["inputs"][:1]  # the IMU: header stamps only
    cfg["outputs"][1]["fields"] = ["twist.linear.x", "twist.linear.y", "twist.linear.z"]  # no angular rate
    cfg["model"] = {"kind": "hiss", "low": {"kind": "s4d", "d_model": 8, "n_layers": 1},
                    "high": {"kind": "mamba", "d_model": 8, "n_layers": 1}}
    cfg["train"] = {"epochs": 1, "batch_size": 8, "seq_chunks": 16}
    (tmp_path / "sim.yaml").write_text(yaml.safe_dump(cfg))
    assert train_main(["--config", str(tmp_path / "sim.yaml"), "--bag", str(bag), "--out", str(tmp_path / "run"),
                       "--quiet", "--cache-dir", str(tmp_path / "cache")]) == 0
    model_path = tmp_path / "run" / "model.safetensors"
    variance = load_checkpoint(model_path).data["validation"]["mse_per_channel"]  # wrench 6, then twist 3
    assert len(variance) == 9 and all(v > 0 for v in variance)
    for k, v in ROS_ENV.items():
        monkeypatch.setenv(k, v)
    d = Driver(model_path, "-p", "wrench_frame_id:=ft_sensor", "-p", "twist_frame_id:=base_link",
               "-p", "velocity_covariance:=true", "-p", "max_gap_s:=0.05", twist_type=TwistWithCovarianceStamped)
    period = 2_500_000  # 400 Hz
    rng = np.random.default_rng(0)
    gravity = np.array([0.0, 0.0, 9.81])
    try:
        t0 = 10_000_000_000
        for burst_start in (t0, t0 + 100 * period + 100_000_000):  # then a 0.1 s gap: < 0.5 s trained, > 0.05 s
            for k in range(100):
                d.publish(burst_start + k * period, rng.standard_normal(3), rng.standard_normal(3) + gravity)
                if k % 10 == 9:
                    d.ros.executor.spin_once(timeout_sec=0.01)
        assert d.spin_until(lambda: len(d.twists) >= 15 and int(d.diagnostics.get("resets", 0)) >= 1, 20), (
            len(d.twists), d.diagnostics)
        diag = d.diagnostics
    finally:
        out = d.close()
    assert "Traceback" not in out, out[-3000:]
    assert {m.header.frame_id for m in d.wrenches} == {"ft_sensor"}
    assert {m.header.frame_id for m in d.twists} == {"base_link"}
    cov = np.asarray(d.twists[-1].twist.covariance).reshape(6, 6)
    # linear: the validation MSE; angular, not estimated: the "unknown" variance
    np.testing.assert_allclose(np.diag(cov), [*variance[6:], 1e6, 1e6, 1e6], rtol=1e-12)
    assert not (cov - np.diag(np.diag(cov))).any()
    assert int(diag["pipeline gap"]) >= 1  # the 0.1 s gap broke the input under the tighter max_gap_s


def thread_policies(pid: int) -> set[tuple[int, int]]:
    """The (scheduling policy, priority) of every thread of process ``pid``."""
    tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    return {(os.sched_getscheduler(t), os.sched_getparam(t).sched_priority) for t in tids}


def test_lifecycle_namespace_reset_and_diagnostics_levels(imu_model, monkeypatch):
    """autostart:=false waits for a lifecycle manager: configure loads, activate estimates,
    deactivate stops; ~/reset forgets the stream; every topic sits under the namespace;
    /diagnostics is WARN until data flows, OK while it does, WARN once it goes stale. While active,
    every thread of the node runs SCHED_FIFO at the default priority, where permitted."""
    from diagnostic_msgs.msg import DiagnosticStatus
    from std_srvs.srv import Trigger
    from test_realtime import fifo_permitted

    bag, model_path = imu_model
    for k, v in ROS_ENV.items():
        monkeypatch.setenv(k, v)
    d = Driver(model_path, "-p", "autostart:=false", "-p", "sensor_timeout_s:=0.5", active=False)
    stamps, gyro, accel = bag_imu(bag)
    try:
        assert d.spin_until(lambda: d.status[1] == "unconfigured", 30), d.status
        assert d.status[0] == DiagnosticStatus.WARN and d.subs[0].get_publisher_count() == 0
        assert d.transition("configure") and d.spin_until(lambda: "inactive" in d.status[1], 10), d.status
        assert d.diagnostics["scheduling"] == "normal (inactive)" and thread_policies(d.proc.pid) == {(0, 0)}
        assert d.transition("activate")
        d.wait_until_active()
        if fifo_permitted():
            assert d.diagnostics["scheduling"] == "SCHED_FIFO 10", d.diagnostics
            assert thread_policies(d.proc.pid) == {(os.SCHED_FIFO, 10)}  # the executor's timer thread too
        else:
            assert d.diagnostics["scheduling"].startswith("normal (SCHED_FIFO refused"), d.diagnostics
        assert d.status[0] == DiagnosticStatus.WARN and "waiting for data on " + d.imu_topic in d.status[1]
        names = {t for t, _ in d.node.get_topic_names_and_types()}
        assert {d.imu_topic, f"{d.prefix}/wrench"} <= names and not {"/imu/data", "/hiss_estimator/wrench"} & names
        for n in range(100):
            d.publish(stamps[n], gyro[n], accel[n])
        assert d.spin_until(lambda: len(d.got) >= 9 and d.status[0] == DiagnosticStatus.OK, 20), d.status
        reply = d.call(Trigger, "reset", Trigger.Request())
        assert reply.success and d.spin_until(lambda: d.diagnostics.get("pipeline reset_service") == "1", 10)
        assert d.spin_until(lambda: "stale" in d.status[1], 10), d.status  # no data for > 0.5 s
        assert d.transition("deactivate")
        before = len(d.got)
        for n in range(100, 200):
            d.publish(stamps[n], gyro[n], accel[n])
        assert d.spin_until(lambda: "inactive" in d.status[1], 10), d.status
        assert len(d.got) == before  # inactive: nothing is estimated
        assert d.diagnostics["scheduling"] == "normal (inactive)" and thread_policies(d.proc.pid) == {(0, 0)}
        assert d.transition("cleanup") and d.spin_until(lambda: d.status[1] == "unconfigured", 10), d.status
    finally:
        out = d.close()
    assert "Traceback" not in out, out[-3000:]


def test_parameters_are_described_one_by_one(imu_model, monkeypatch):
    """Each parameter has a descriptor of its own (one shared descriptor once made rclpy report every
    read-only parameter as `publish_markers`, a bool)."""
    from rcl_interfaces.msg import ParameterType
    from rcl_interfaces.srv import DescribeParameters

    for k, v in ROS_ENV.items():
        monkeypatch.setenv(k, v)
    d = Driver(imu_model[1])
    try:
        got = d.call(DescribeParameters, "describe_parameters",
                     DescribeParameters.Request(names=["device", "max_gap_s", "model_path"])).descriptors
    finally:
        d.close()
    assert [(g.name, g.type, g.read_only) for g in got] == [
        ("device", ParameterType.PARAMETER_STRING, True), ("max_gap_s", ParameterType.PARAMETER_DOUBLE, True),
        ("model_path", ParameterType.PARAMETER_STRING, False)]


def test_header_less_samples_keep_their_spacing_under_a_coarse_sim_clock(tmp_path, monkeypatch):
    """use_sim_time with /clock at 40 Hz (ros2 bag play's default): header-less tactile samples
    arriving between two ticks are stamped on the IMU's time line by their receipt, so none is
    a duplicate and none is lost."""
    from rosgraph_msgs.msg import Clock
    from std_msgs.msg import Float32MultiArray

    for k, v in ROS_ENV.items():
        monkeypatch.setenv(k, v)
    bag = contact_bag(tmp_path / "bag", seconds=20.0)
    assert train_main(["--config", str(config(tmp_path, epochs=1)), "--bag", str(bag), "--out", str(tmp_path / "run"),
                       "--quiet", "--cache-dir", str(tmp_path / "cache")]) == 0
    d = Driver(tmp_path / "run" / "model.safetensors", "-p", "use_sim_time:=true", active=False)
    clock = d.node.create_publisher(Clock, "/clock", 10)
    tactile = d.node.create_publisher(Float32MultiArray, f"{d.ns}/tactile", 100)
    sim_ns = [1_000_000_000]

    def tick(condition) -> bool:
        """Advance sim time by one 40 Hz /clock tick (the node's diagnostics run on it); then ``condition()``."""
        sim_ns[0] += 25_000_000
        msg = Clock()
        msg.clock.sec, msg.clock.nanosec = divmod(sim_ns[0], 1_000_000_000)
        clock.publish(msg)
        return condition()

    sent = 0
    try:
        assert d.spin_until(lambda: tick(lambda: tactile.get_subscription_count() > 0
                                         and d.pub.get_subscription_count() > 0
                                         and d.diagnostics.get("publishers tactile") == "1"), 60), d.diagnostics
        t0 = sim_ns[0]
        for k in range(400):  # 2 s of IMU at 200 Hz, tactile at 50 Hz, /clock at 40 Hz
            if k % 5 == 0:
                tick(lambda: True)
            d.publish(t0 + k * 5_000_000, [0.0, 0.0, 0.0], [0.0, 0.0, 9.81])
            if k % 4 == 2:
                tactile.publish(Float32MultiArray(data=[0.1, 0.2, 0.3]))
                sent += 1
            d.spin_until(lambda: False, 0.004)  # paces the stream at about real time while spinning
        assert d.spin_until(lambda: tick(lambda: d.diagnostics.get("received tactile") == str(sent)), 20), (
            sent, d.diagnostics)
        diag = d.diagnostics
    finally:
        out = d.close()
    assert "Traceback" not in out, out[-3000:]
    assert int(diag.get("pipeline duplicate", 0)) == 0 and int(diag.get("pipeline out_of_order", 0)) == 0, diag
    assert int(diag["pipeline accepted"]) == 400 + sent and len(d.got) >= 35


def test_fuzzed_input_never_crashes_the_node_nor_poisons_its_estimates(monkeypatch):
    """A few thousand seeded hostile messages (NaN, Inf, 1e30, wrong sizes, duplicate, late,
    +-1 h stamps, bursts) into the shipped contact model: the node lives, every received sample is
    counted exactly once (used or dropped for one reason), and clean data afterwards gives finite
    estimates again."""
    from std_msgs.msg import Float32MultiArray

    for k, v in ROS_ENV.items():
        monkeypatch.setenv(k, v)
    d = Driver("contact", "-p", "qos_depth:=1000", active=False)
    tactile = d.node.create_publisher(Float32MultiArray, f"{d.ns}/tactile", 1000)
    d.wait_until_active()
    assert d.spin_until(lambda: d.diagnostics.get("publishers tactile") == "1", 30), d.diagnostics
    rng = np.random.default_rng(7)
    period, hour = 2_500_000, 3_600_000_000_000
    t, sent, hostile = 100_000_000_000, 0, 0
    try:
        for k in range(3000):
            t += period
            stamp, gyro, accel = t, rng.standard_normal(3), rng.standard_normal(3)
            kind = rng.integers(12) if k < 2600 else 99  # the last 400 samples (1 s) are clean
            if kind == 0:
                gyro[rng.integers(3)] = np.nan
            elif kind == 1:
                accel[0] = np.inf
            elif kind == 2:
                accel[:] = 1e30
            elif kind == 3:
                stamp = t - period  # a duplicate of the last stamp
            elif kind == 4:
                stamp = t - 3 * period  # late
            elif kind == 5:
                stamp = t + rng.choice([-hour, hour])  # a clock jump either way
            # 40 ms of stamps at the end of ROS time, nanoseconds over a second: a chunk there once killed the node
            end_of_time = (2**31 - 1, 1_000_000_000 + (k - 1000) * period) if 1000 <= k < 1016 else None
            hostile += kind <= 5 or end_of_time is not None
            d.publish(stamp, gyro, accel, end_of_time)
            if k % 4 == 0:
                taxels = rng.standard_normal(rng.choice([15, 15, 15, 14, 16, 0]) if k < 2600 else 15)
                if k < 2600 and rng.random() < 0.1:
                    taxels[:1] = rng.choice([np.nan, 1e30])
                tactile.publish(Float32MultiArray(data=taxels.astype(np.float32).tolist()))
                sent += 1
            if k % 250 != 249:  # bursts of 250 messages, then the node gets to catch up
                continue
            d.spin_until(lambda: False, 0.05)
        sent += 3000
        clean_from = t - 400 * period
        assert d.spin_until(lambda: any(s > clean_from + 100_000_000 for s in d.got), 30), "no estimates after fuzz"
        assert d.spin_until(lambda: int(d.diagnostics.get("received imu/data", 0))
                            + int(d.diagnostics.get("received tactile", 0)) == int(d.diagnostics.get(
                                "pipeline accepted", -1)) + sum(int(d.diagnostics.get(f"pipeline {r}", 0))
                                                                 for r in DROP_REASONS), 10), (
            d.diagnostics)
        alive = d.proc.poll() is None
        diag, status = d.diagnostics, d.status
    finally:
        out = d.close()
    assert alive and "Traceback" not in out, out[-3000:]
    assert hostile > 1000 and int(diag["nonfinite_outputs"]) == 0 and status[0] != b"\x02", status
    for r in ("nonfinite", "duplicate", "out_of_order", "out_of_range", "wrong_size", "bad_stamp", "time_backwards",
              "gap"):
        assert int(diag.get(f"pipeline {r}", 0)) > 0, (r, diag)
    assert all(np.isfinite(v).all() for v in d.got.values())
    received = int(diag["received imu/data"]) + int(diag["received tactile"])
    assert received + int(diag["lost imu/data"]) + int(diag["lost tactile"]) <= sent


def test_the_params_file_applies_under_a_namespace(imu_model, monkeypatch, tmp_path):
    """config/estimator.yaml sits under `/**:`: a copy with another frame applies to a node in any
    namespace (under a `hiss_estimator:` key it silently applied to none)."""
    for k, v in ROS_ENV.items():
        monkeypatch.setenv(k, v)
    params = yaml.safe_load(open("config/estimator.yaml"))
    params["/**"]["ros__parameters"].update(frame_id="from_params_file", model_path="contact")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    d = Driver(imu_model[1], "--params-file", str(tmp_path / "params.yaml"), "-p", f"model_path:={imu_model[1]}")
    stamps, gyro, accel = bag_imu(imu_model[0])
    try:
        for n in range(100):
            d.publish(stamps[n], gyro[n], accel[n])
        assert d.spin_until(lambda: len(d.wrenches) >= 5, 20), d.diagnostics
    finally:
        out = d.close()
    assert "Traceback" not in out, out[-3000:]
    assert d.ns != "/" and {m.header.frame_id for m in d.wrenches} == {"from_params_file"}


def test_per_estimate_variance_is_published_and_equals_the_offline_model(tmp_path, monkeypatch):
    """A model with the variance head: each wrench estimate comes with its predicted variance on
    ~/wrench_variance (same stamp), equal to the offline forward pass's to 1e-4 (the novelty
    inflation included), and /diagnostics reports the predicted std against the validation error;
    a frozen IMU then raises the variance and /diagnostics warns."""
    bag = contact_bag(tmp_path / "bag", seconds=20.0)
    cfg = yaml.safe_load(config(tmp_path, epochs=2, loss="nll", nll_beta=1.0).read_text())
    cfg["inputs"] = cfg["inputs"][:1]  # the IMU: header stamps only, so live stamps equal the bag's
    cfg["model"]["variance"] = True
    (tmp_path / "var.yaml").write_text(yaml.safe_dump(cfg))
    assert train_main(["--config", str(tmp_path / "var.yaml"), "--bag", str(bag), "--out", str(tmp_path / "run"),
                       "--quiet", "--cache-dir", str(tmp_path / "cache")]) == 0
    model_path = tmp_path / "run" / "model.safetensors"
    served = load_model(model_path)
    streams = read_streams([bag], served.spec.inputs, progress=False).streams
    (ep,) = Pipeline(served.spec.pipeline, served.spec.normalization).process(
        [(streams[s.topic].stamps_ns, streams[s.topic].values) for s in served.spec.inputs])
    with torch.no_grad():
        _, log_var = served.model.split_output(served.model(torch.from_numpy(ep.x.reshape(1, -1, ep.x.shape[-1])))[0])
    offline = dict(zip(ep.stamps_ns.tolist(), served.spec.physical_variance(log_var.numpy(), ep.x), strict=True))

    from diagnostic_msgs.msg import DiagnosticStatus
    from geometry_msgs.msg import WrenchStamped

    for k, v in ROS_ENV.items():
        monkeypatch.setenv(k, v)
    d = Driver(model_path, active=False)
    variances: dict[int, np.ndarray] = {}
    d.subs.append(d.node.create_subscription(WrenchStamped, f"{d.prefix}/wrench_variance", lambda m: variances.update(
        {m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec:
         np.array([m.wrench.force.x, m.wrench.force.y, m.wrench.force.z])}), 1000))
    d.wait_until_active()
    stamps, gyro, accel = bag_imu(bag)
    try:
        for n in range(400):
            d.publish(stamps[n], gyro[n], accel[n])
            if (n + 1) % 10 == 0:  # flow control: let the estimate of this chunk arrive first
                assert d.spin_until(lambda n=n: len(variances) >= (n + 1) // 10 - 1, 20), f"stalled at {n}"
        assert d.spin_until(lambda: len(variances) >= 35 and len(d.got) >= 35
                            and "predicted_std_over_validation_rmse_median" in d.diagnostics, 30), d.diagnostics
        normal, status = dict(variances), d.status
        # An injected sensor fault: the IMU frozen at its last reading. The variance rises and
        # /diagnostics warns that the input is unlike the training data.
        for n in range(400, 800):
            d.publish(stamps[n], gyro[399], accel[399])
            if (n + 1) % 10 == 0:
                assert d.spin_until(lambda n=n: len(variances) >= (n + 1) // 10 - 1, 20), f"stalled at {n}"
        assert d.spin_until(lambda: "unlike the training data" in d.status[1], 30), (d.status, d.diagnostics)
    finally:
        out = d.close()
    assert "Traceback" not in out, out[-3000:]
    assert set(normal) <= set(d.got) and set(normal) <= set(offline)
    for t, v in normal.items():
        np.testing.assert_allclose(v, offline[t], rtol=1e-4)
    assert status[0] == DiagnosticStatus.OK, status
    assert float(d.diagnostics["predicted_std_over_validation_rmse_median"]) > 0
    frozen = [v for t, v in variances.items() if t > stamps[420]]  # chunks wholly of frozen samples
    assert len(frozen) >= 30
    typical = np.median(list(normal.values()))
    assert np.median(frozen) > 5 * typical, (np.median(frozen), typical)
    assert float(d.diagnostics["input_novelty_warn_level"]) > 1 and float(d.diagnostics["input_novelty_median"]) > 1


def test_any_sensor_type_zero_stamps_and_a_live_rate_unlike_training(tmp_path, monkeypatch):
    """An input of a type outside the usual few (geometry_msgs/Vector3Stamped, looked up in the
    installed interface package) whose driver leaves header stamps at zero: trained on receive
    times, stamped on receipt live (said once). An IMU at half its trained rate: WARN naming both."""
    from diagnostic_msgs.msg import DiagnosticStatus
    from geometry_msgs.msg import Vector3, Vector3Stamped

    from hiss_ros.data.write import TYPESTORE, imu, wrench, write_bag

    T = TYPESTORE.types
    recs = []
    for k in range(200 * 20):
        t = 1_000_000_000 + k * 5_000_000
        recs.append(("/imu/data", t, imu(t, (np.sin(k / 40), 0, 0), (np.cos(k / 30), 0, 9.8))))
        if k % 4 == 0:  # 50 Hz, header stamp never set
            header = T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](sec=0, nanosec=0), frame_id="")
            vec = T["geometry_msgs/msg/Vector3"](x=float(np.sin(k / 50)), y=1.0, z=0.0)
            recs.append(("/ext/accel", t + 1_000_000, T["geometry_msgs/msg/Vector3Stamped"](header=header, vector=vec)))
        if k % 2 == 0:
            recs.append(("/wrench_gt", t, wrench(t, (np.sin(k / 45), 0, 0), (0, 0, 0))))
    bag = write_bag(tmp_path / "bag", recs)
    cfg = yaml.safe_load(config(tmp_path, epochs=1).read_text())
    cfg["inputs"] = [cfg["inputs"][0], {"topic": "/ext/accel", "type": "geometry_msgs/Vector3Stamped",
                                        "fields": ["vector.x", "vector.y"], "rate_hz": 50}]
    cfg["outputs"][0]["fields"] = ["wrench.force.x"]
    (tmp_path / "ext.yaml").write_text(yaml.safe_dump(cfg))
    assert train_main(["--config", str(tmp_path / "ext.yaml"), "--bag", str(bag), "--out", str(tmp_path / "run"),
                       "--quiet", "--cache-dir", str(tmp_path / "cache")]) == 0
    model_path = tmp_path / "run" / "model.safetensors"
    assert load_model(model_path).spec.input_stamps == ("header", "receive")
    for k, v in ROS_ENV.items():
        monkeypatch.setenv(k, v)
    d = Driver(model_path, "-p", "diagnostics_period_s:=0.1")
    ext = d.node.create_publisher(Vector3Stamped, f"{d.ns}/ext/accel", 1000)
    try:
        assert d.spin_until(lambda: d.diagnostics.get("publishers ext/accel") == "1", 30), d.diagnostics
        t = 2_000_000_000

        def like_training(k: int) -> None:  # the training bag's signals (constant ones would be novel input)
            d.publish(t, (np.sin(k / 40), 0, 0), (np.cos(k / 30), 0, 9.8))
            if k % 4 == 0:
                ext.publish(Vector3Stamped(vector=Vector3(x=float(np.sin(k / 50)), y=1.0)))  # stamp 0, as sent

        for k in range(600):  # 3 s at the trained 200 Hz
            t += 5_000_000
            like_training(k)
            if (k + 1) % 10 == 0:
                assert d.spin_until(lambda k=k: len(d.got) >= (k + 1) // 10 - 2, 20), f"stalled at {len(d.got)}"
        assert d.spin_until(lambda: d.diagnostics.get("sample_rate_hz imu/data") == "200.0"
                            and d.status[0] == DiagnosticStatus.OK, 10), (d.status, d.diagnostics)
        base, warned = len(d.got), None
        for k in range(1000):  # up to 10 s at 100 Hz: half the trained rate (a chunk of 10 ticks every 5 samples)
            t += 10_000_000
            like_training(2 * k)  # the other input goes on too (a silent one would end the episode)
            if (k + 1) % 10 == 0:
                assert d.spin_until(lambda k=k: len(d.got) >= base + (k + 1) // 5 - 4, 20), (len(d.got) - base, k)
                if d.status[1] == "imu/data at 100 Hz, trained at 200 Hz":  # once a 2 s window is all 100 Hz
                    warned = d.status
                    break
        assert warned is not None and k >= 200, (k, d.status)  # a verdict only once 2 s of stamps are seen
        assert warned[0] == DiagnosticStatus.WARN
    finally:
        out = d.close()
    assert out.count("ext/accel: header stamp is zero") == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]


def test_live_message_classes_come_from_the_installed_interface_packages():
    """Any type's class is looked up at run time; a missing package or message, or a field the
    installed definition lacks, is one line naming what to install or fix."""
    from hiss_ros.errors import HissError
    from hiss_ros.nodes.common import input_class, message_class

    assert message_class("sensor_msgs/Range").__name__ == "Range"  # the ROS 1 form too
    assert input_class(StreamSpec("/p", "sensor_msgs/msg/FluidPressure", ("fluid_pressure",))).__name__ == \
        "FluidPressure"
    assert input_class(StreamSpec("/j", "sensor_msgs/msg/JointState", ("position[0:7]", "effort[2]")))
    with pytest.raises(HissError, match=r"interface package 'xela_msgs' is not installed here; install it "
                                        r"\(apt install ros-jazzy-xela-msgs\) or build it in a workspace"):
        message_class("xela_msgs/msg/Taxels")
    with pytest.raises(HissError, match="package 'sensor_msgs' has no message 'Imuu'"):
        message_class("sensor_msgs/msg/Imuu")
    with pytest.raises(HissError, match=r"no field 'vector\.w' \(fields at vector: \['x', 'y', 'z'\]\), in the "
                                        "definition installed here"):
        input_class(StreamSpec("/v", "geometry_msgs/msg/Vector3Stamped", ("vector.w",)))
    with pytest.raises(HissError, match="stamp = header, but the installed std_msgs/msg/Float64 has no header"):
        input_class(StreamSpec("/f", "std_msgs/msg/Float64", ("data",), stamp="header"))


def test_repeated_warnings_are_throttled_per_key_by_a_clock_read_first():
    """A node's repeated warnings go through ``Throttle`` (one per key and period), never through
    rclpy's ``throttle_duration_sec``, which looks up its caller's source on every call, printed or not."""
    from pathlib import Path

    import hiss_ros.nodes
    from hiss_ros.nodes.common import Throttle

    now = [100.0]
    throttle = Throttle(clock=lambda: now[0])
    assert throttle.due(("unreadable", 0), 5.0) and not throttle.due(("unreadable", 0), 5.0)
    assert throttle.due(("unreadable", 1), 5.0)  # another input's is its own
    now[0] += 4.9
    assert not throttle.due(("unreadable", 0), 5.0)
    now[0] += 0.2
    assert throttle.due(("unreadable", 0), 5.0) and not throttle.due(("unreadable", 0), 5.0)
    sources = Path(hiss_ros.nodes.__file__).parent.glob("*.py")
    assert not [f.name for f in sources if "throttle_duration_sec" in f.read_text()]
