"""``make demo``: the whole product on one machine, no ROS install needed.

1. starts the estimator node with the shipped ``contact`` model (``models/contact.safetensors``;
   on CUDA when torch sees a GPU, else on the CPU, or as ``--device`` says; its step compiled
   ahead) and the replay node on the shipped sample bag (``data/sample/contact_sim``: 60 s of the
   simulated sensorized end-effector, a recording the model never saw; the topics the estimator
   and the comparison read), as separate processes over real DDS, with sim time from the
   replayed /clock;
2. prints a line per second: estimated vs ground-truth wrench and velocity, latency;
3. writes ``demo.png`` (estimates against ground truth) and ``summary.json`` (RMSE, latency,
   estimates received and expected, dropped samples, device and step backend), and exits 0 when
   the estimator tracked the ground truth.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from dataclasses import field as dc_field
from operator import attrgetter
from pathlib import Path

import numpy as np

THREADS = 1  # the estimator's torch threads; the step compiled ahead of it is made for that count


class _Series:
    def __init__(self) -> None:
        self.t: list[int] = []
        self.v: list[list[float]] = []

    def add(self, t: int, v: list[float]) -> None:
        self.t.append(t)
        self.v.append(v)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.array(self.t, dtype=np.int64), np.array(self.v).reshape(-1, 3)

    def at(self, t: int) -> np.ndarray:
        ts, vs = self.arrays()
        return np.array([np.interp(t, ts, vs[:, i]) for i in range(3)])


PUBLISHED_AS_IS = ("geometry_msgs/msg/WrenchStamped", "geometry_msgs/msg/TwistStamped",
                   "geometry_msgs/msg/TwistWithCovarianceStamped")


@dataclass
class _Output:
    """One output stream of the model: its ground truth in the bag, its estimate from the node."""

    topic: str  # ground truth
    type: str
    estimate_topic: str  # the estimator's
    fields: list[str]  # the first three channels, plotted and printed
    estimate: _Series = dc_field(default_factory=_Series)
    truth: _Series = dc_field(default_factory=_Series)

    def read(self, msg) -> list[float]:
        return [float(attrgetter(f)(msg)) for f in self.fields]


def _outputs(model: Path) -> tuple[list[_Output], float, list[str]]:
    """The model's outputs that the demo can compare with a ground truth in the bag, its estimate rate, and
    its input topics."""
    from hiss_ros.nodes.messages import estimate_type, output_names
    from hiss_ros.serving import load_model

    spec = load_model(model).spec
    names = output_names([estimate_type(s, covariance=False) for s in spec.outputs], list(spec.outputs))
    outs = [_Output(s.topic, s.type, f"/hiss_estimator/{name.removeprefix('~/')}", list(s.fields[:3]))
            for s, name in zip(spec.outputs, names, strict=True)
            if not s.derive and s.type in PUBLISHED_AS_IS and len(s.fields) >= 3]
    return outs, spec.pipeline.output_rate_hz, [s.topic for s in spec.inputs]


def _bag_seconds(bag: Path) -> float:
    from rosbags.highlevel import AnyReader

    with AnyReader([bag]) as reader:
        return reader.duration / 1e9


def _stamp(m) -> int:
    return m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec


def _watch(model: Path, bag: Path, rate: float, device: str, outs: list[_Output], expected: int,
           inputs: list[str]) -> dict:
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor

    from hiss_ros.nodes.common import message_class

    env = {**os.environ, "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST"}
    params = {"model_path": model, "use_sim_time": "true", "num_threads": THREADS, "device": device}
    est = subprocess.Popen([sys.executable, "-m", "hiss_ros.nodes.estimator", "--ros-args",
                            *(a for k, v in params.items() for a in ("-p", f"{k}:={v}"))], env=env)
    rclpy.init()
    node = rclpy.create_node("hiss_demo_monitor")
    diag: dict[str, str] = {}
    subs = []
    for o in outs:
        cls = message_class(o.type)
        on_estimate = lambda m, o=o: o.estimate.add(_stamp(m), o.read(m))  # noqa: E731
        subs.append(node.create_subscription(cls, o.estimate_topic, on_estimate, 1000))
        node.create_subscription(cls, o.topic, lambda m, o=o: o.truth.add(_stamp(m), o.read(m)), 1000)
    node.create_subscription(DiagnosticArray, "/diagnostics", lambda m: diag.update(
        {kv.key: kv.value for s in m.status if s.name == "hiss_estimator: estimator" for kv in s.values}), 10)
    ex = SingleThreadedExecutor()
    ex.add_node(node)
    # The estimator is up once its estimate topics are discovered (its diagnostics timer runs on
    # sim time: it only ticks once the replay publishes /clock).
    deadline = time.monotonic() + 60
    while not all(s.get_publisher_count() > 0 for s in subs) and time.monotonic() < deadline:
        ex.spin_once(timeout_sec=0.1)
    # Only what the estimator reads and the monitor compares: the replay waits for a subscriber on every
    # topic it publishes, so one nobody reads (the sample's /pose_gt) would hold its start for the whole wait.
    topics = [*inputs, *(o.topic for o in outs)]
    replay = subprocess.Popen([sys.executable, "-m", "hiss_ros.nodes.replay", str(bag), "--clock", "--rate", str(rate),
                               "--wait-for-subscribers", "30", "--topics", *topics], env=env)
    first = outs[0].estimate
    next_line, quiet_since = time.monotonic() + 1.0, None
    try:
        while True:
            ex.spin_once(timeout_sec=0.05)
            if replay.poll() is not None:  # replay done: wait for the estimates in flight
                count = len(first.t)
                if count >= expected:
                    break
                if quiet_since is None or count != quiet_since[1]:
                    quiet_since = (time.monotonic(), count)
                elif time.monotonic() - quiet_since[0] > 3.0:
                    break
            if time.monotonic() >= next_line:
                next_line += 1.0
                if first.t and all(o.truth.t for o in outs):
                    t = first.t[-1]
                    parts = [f"{o.topic} est {_vec(o.estimate.v[-1])} truth {_vec(o.truth.at(t))}" for o in outs]
                    print(f"t={(t - first.t[0]) / 1e9:5.1f} s  " + "  ".join(parts)
                          + f"  inference p50 {diag.get('inference_ms_p50', '?')} ms  estimates {len(first.t)}",
                          flush=True)
    finally:
        replay.terminate()
        est.terminate()
        replay.wait(30)
        est.wait(30)
        ex.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return diag


def _vec(v) -> str:
    return "[" + " ".join(f"{x:+.3f}" for x in v) + "]"


def _report(outs: list[_Output], diag: dict, out: Path, expected: int) -> dict:
    summary: dict = {"estimates": len(outs[0].estimate.t), "expected": expected}
    for o in outs:
        t, v = o.estimate.arrays()
        gt_t, gt_v = o.truth.arrays()
        gt = np.stack([np.interp(t, gt_t, gt_v[:, i]) for i in range(3)], 1)
        summary[f"rmse {o.topic} {o.fields}"] = np.sqrt(((v - gt) ** 2).mean(0)).round(4).tolist()
        summary[f"rmse of predicting zero {o.topic}"] = np.sqrt((gt ** 2).mean(0)).round(4).tolist()
    summary.update({
        "inference_ms_p50": diag.get("inference_ms_p50"),
        "inference_ms_p99": diag.get("inference_ms_p99"),
        "dropped_or_rejected": {k: v for k, v in diag.items()
                                if k.startswith(("pipeline", "unreadable")) and k != "pipeline accepted"},
        "resets": diag.get("resets"),
        **{k: diag.get(k) for k in ("device", "step_backend", "compile")},
    })
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3 * len(outs), 1, figsize=(11, 2 + 1.6 * 3 * len(outs)), sharex=True, squeeze=False)
    t0 = outs[0].estimate.t[0]
    for row, o in enumerate(outs):
        t, v = o.estimate.arrays()
        gt_t, gt_v = o.truth.arrays()
        for i in range(3):
            ax = axes[3 * row + i, 0]
            ax.plot((gt_t - t0) / 1e9, gt_v[:, i], "k", lw=1.0, label=f"ground truth {o.topic} (replayed)")
            ax.plot((t - t0) / 1e9, v[:, i], "C1", lw=1.0, label=f"live estimate {o.estimate_topic}")
            ax.set_ylabel(o.fields[i].split(".", 1)[-1], fontsize=8)
            if i == 0:
                ax.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("time [s]")
    axes[-1, 0].set_xlim(0, (outs[0].estimate.t[-1] - t0) / 1e9)
    fig.suptitle("hiss_ros demo: the estimator node on a replayed recording the model never saw")
    fig.tight_layout()
    fig.savefig(out / "demo.png", dpi=100)
    plt.close(fig)
    return summary


def _compile_step(model: Path, device: str) -> None:
    """Compile the model's step into the cache now (once: later runs find it there), so that the
    estimator (step_backend auto, num_threads:=THREADS) loads it at start instead of compiling while the
    replay runs."""
    import torch

    from hiss_ros.serving import StreamingEstimator, resolve_device

    torch.set_num_threads(THREADS)  # as the estimator's: the compiled step is made for a thread count and a device
    est = StreamingEstimator.from_checkpoint(model, resolve_device(device))  # the device the node picks
    status = est.compile(lambda said: print(f"demo: {said} (once)", flush=True))
    print(f"demo: compiled step {status}", flush=True)


def main(argv: list[str] | None = None) -> int:
    from hiss_ros.errors import HissError
    from hiss_ros.serving import resolve_device
    from hiss_ros.shipped import SAMPLE_BAG, default_model_path, shipped_model, shipped_path

    p = argparse.ArgumentParser(prog="hiss-demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("out/demo"))
    p.add_argument("--model", default=str(default_model_path()), help="checkpoint or shipped model name (contact)")
    p.add_argument("--bag", type=Path, default=shipped_path(SAMPLE_BAG), help="bag to replay (default: the sample)")
    p.add_argument("--rate", type=float, default=1.0, help="replay speed factor")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="the estimator's device (auto: CUDA when torch sees one)")
    args = p.parse_args(argv)
    model = shipped_model(args.model)
    for path in (model, args.bag):
        if not path.exists():
            print(f"hiss-demo: error: {path} not found (run from the repository, or give --model / --bag)")
            return 2
    outs, output_rate_hz, inputs = _outputs(model)
    if not outs:
        print(f"hiss-demo: error: {model} has no wrench or twist output to compare with a ground truth")
        return 2
    try:
        resolve_device(args.device)
    except HissError as exc:  # cuda where torch sees none
        print(f"hiss-demo: error: {exc}")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    _compile_step(model, args.device)
    seconds = _bag_seconds(args.bag)
    expected = int(seconds * output_rate_hz) - 1
    print(f"demo: replaying {args.bag} ({seconds:.0f} s) through the estimator node with {model} (real DDS) ...",
          flush=True)
    diag = _watch(model, args.bag, args.rate, args.device, outs, expected, inputs)
    if not outs[0].estimate.t or not all(o.truth.t for o in outs):
        print("demo FAILED: no estimates (or no ground truth) arrived; see the estimator's log above")
        return 1
    summary = _report(outs, diag, args.out, expected)
    print(json.dumps(summary, indent=2))
    print(f"plot: {args.out / 'demo.png'}")
    # Every output beats predicting zero by a margin (velocity from an IMU and a skin is the
    # harder half: it is only observable while the tool accelerates or touches).
    tracked = all(sum(np.square(summary[f"rmse {o.topic} {o.fields}"]))
                  < 0.8 * sum(np.square(summary[f"rmse of predicting zero {o.topic}"])) for o in outs)
    ok = summary["estimates"] >= 0.9 * expected and tracked
    print("demo OK" if ok else "demo FAILED: too few estimates or they do not track the ground truth")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
