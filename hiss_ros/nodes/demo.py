"""``make demo``: the whole product on one machine, no ROS install needed.

1. starts the estimator node with the shipped ``contact`` model (``models/contact.safetensors``)
   and the replay node on the shipped sample bag (``data/sample/contact_sim``: 60 s of the
   simulated sensorized end-effector, a recording the model never saw), as separate processes
   over real DDS, with sim time from the replayed /clock;
2. prints a line per second: estimated vs ground-truth contact force and velocity, latency;
3. writes ``demo.png`` (estimates against ground truth) and ``summary.json`` (RMSE, latency,
   estimates received and expected, dropped samples), and exits 0 when the estimator tracked the
   ground truth.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WRENCH, TWIST = "/wrench_gt", "/twist_gt"  # ground truth in the bag; estimates on /hiss<topic>
OUTPUT_RATE_HZ = 40  # the contact model's estimate rate


def _bag_seconds(bag: Path) -> float:
    from rosbags.highlevel import AnyReader

    with AnyReader([bag]) as reader:
        return reader.duration / 1e9


def _stamp(m) -> int:
    return m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec


def _force(m) -> list[float]:
    return [m.wrench.force.x, m.wrench.force.y, m.wrench.force.z]


def _velocity(m) -> list[float]:
    return [m.twist.linear.x, m.twist.linear.y, m.twist.linear.z]


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


def _watch(model: Path, bag: Path, rate: float) -> dict:
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import TwistStamped, WrenchStamped
    from rclpy.executors import SingleThreadedExecutor

    env = {**os.environ, "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST"}
    est = subprocess.Popen([sys.executable, "-m", "hiss_ros.nodes.estimator", "--ros-args", "-p",
                            f"model_path:={model}", "-p", "use_sim_time:=true", "-p", "num_threads:=1"], env=env)
    rclpy.init()
    node = rclpy.create_node("hiss_demo_monitor")
    series = {k: _Series() for k in ("force", "force_gt", "velocity", "velocity_gt")}
    diag: dict[str, str] = {}
    for topic, cls, key, read in ((f"/hiss{WRENCH}", WrenchStamped, "force", _force), (WRENCH, WrenchStamped,
                                  "force_gt", _force), (f"/hiss{TWIST}", TwistStamped, "velocity", _velocity),
                                  (TWIST, TwistStamped, "velocity_gt", _velocity)):
        node.create_subscription(cls, topic, lambda m, k=key, r=read: series[k].add(_stamp(m), r(m)), 1000)
    node.create_subscription(DiagnosticArray, "/diagnostics", lambda m: diag.update(
        {kv.key: kv.value for s in m.status if s.name == "hiss_ros estimator" for kv in s.values}), 10)
    ex = SingleThreadedExecutor()
    ex.add_node(node)
    deadline = time.monotonic() + 60
    while "estimates" not in diag and time.monotonic() < deadline:  # the estimator is up and reporting
        ex.spin_once(timeout_sec=0.1)
    replay = subprocess.Popen([sys.executable, "-m", "hiss_ros.nodes.replay", str(bag), "--clock", "--rate", str(rate),
                               "--wait-for-subscribers", "30"], env=env)
    next_line, replay_done = time.monotonic() + 1.0, None
    try:
        while replay_done is None or time.monotonic() - replay_done < 2.0:  # then 2 s for the last estimates
            ex.spin_once(timeout_sec=0.05)
            if replay_done is None and replay.poll() is not None:
                replay_done = time.monotonic()
            if time.monotonic() >= next_line:
                next_line += 1.0
                if series["force"].t and series["force_gt"].t and series["velocity_gt"].t:
                    t = series["force"].t[-1]
                    f, fg = series["force"].v[-1], series["force_gt"].at(t)
                    v, vg = series["velocity"].v[-1], series["velocity_gt"].at(t)
                    print(f"t={(t - series['force'].t[0]) / 1e9:5.1f} s  force z {f[2]:+6.2f} N (truth {fg[2]:+6.2f})"
                          f"  |v| {np.linalg.norm(v):.3f} m/s (truth {np.linalg.norm(vg):.3f})  inference p50 "
                          f"{diag.get('inference_ms_p50', '?')} ms  estimates {len(series['force'].t)}", flush=True)
    finally:
        replay.terminate()
        est.terminate()
        replay.wait(30)
        est.wait(30)
        ex.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return {"series": {k: v.arrays() for k, v in series.items()}, "diag": diag}


def _report(run: dict, out: Path, seconds: float) -> dict:
    s = run["series"]
    summary = {"estimates": len(s["force"][0]), "expected": int(seconds * OUTPUT_RATE_HZ) - 1}
    for name in ("force", "velocity"):
        t, v = s[name]
        gt_t, gt_v = s[f"{name}_gt"]
        gt = np.stack([np.interp(t, gt_t, gt_v[:, i]) for i in range(3)], 1)
        summary[f"rmse_{name}_xyz"] = np.sqrt(((v - gt) ** 2).mean(0)).round(4).tolist()
        summary[f"rmse_{name}_predict_zero"] = np.sqrt((gt ** 2).mean(0)).round(4).tolist()
    summary.update({
        "inference_ms_p50": run["diag"].get("inference_ms_p50"),
        "inference_ms_p99": run["diag"].get("inference_ms_p99"),
        "dropped_or_rejected": {k: v for k, v in run["diag"].items()
                                if k.startswith(("pipeline", "unreadable")) and k != "pipeline accepted"},
        "resets": run["diag"].get("resets"),
    })
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(6, 1, figsize=(11, 11), sharex=True)
    t0 = s["force"][0][0]
    for row, (name, unit, sym, topic) in enumerate((("force", "N", "F", WRENCH), ("velocity", "m/s", "v", TWIST))):
        t, v = s[name]
        gt_t, gt_v = s[f"{name}_gt"]
        for i in range(3):
            ax = axes[3 * row + i]
            ax.plot((gt_t - t0) / 1e9, gt_v[:, i], "k", lw=1.0, label="ground truth (replayed)")
            ax.plot((t - t0) / 1e9, v[:, i], "C1", lw=1.0, label=f"live estimate (/hiss{topic})")
            ax.set_ylabel(f"{sym}{'xyz'[i]} [{unit}]")
            if i == 0:
                ax.legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("time [s]")
    axes[-1].set_xlim(0, (s["force"][0][-1] - t0) / 1e9)
    fig.suptitle("hiss_ros demo: the shipped contact model in the estimator node, on a recording it never saw")
    fig.tight_layout()
    fig.savefig(out / "demo.png", dpi=100)
    plt.close(fig)
    return summary


def main(argv: list[str] | None = None) -> int:
    from hiss_ros.nodes.common import SAMPLE_BAG, default_model_path, shipped_path

    p = argparse.ArgumentParser(prog="hiss-demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("out/demo"))
    p.add_argument("--model", type=Path, default=default_model_path(), help="checkpoint (default: shipped contact)")
    p.add_argument("--bag", type=Path, default=shipped_path(SAMPLE_BAG), help="bag to replay (default: the sample)")
    p.add_argument("--rate", type=float, default=1.0, help="replay speed factor")
    args = p.parse_args(argv)
    for path in (args.model, args.bag):
        if not path.exists():
            print(f"hiss-demo: error: {path} not found (run from the repository, or give --model / --bag)")
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    seconds = _bag_seconds(args.bag)
    print(f"demo: replaying {args.bag} ({seconds:.0f} s) through the estimator node with {args.model} "
          "(real DDS) ...", flush=True)
    summary = _report(_watch(args.model, args.bag, args.rate), args.out, seconds)
    print(json.dumps(summary, indent=2))
    print(f"plot: {args.out / 'demo.png'}")
    tracked = all(sum(np.square(summary[f"rmse_{n}_xyz"])) < 0.5 * sum(np.square(summary[f"rmse_{n}_predict_zero"]))
                  for n in ("force", "velocity"))
    ok = summary["estimates"] >= 0.9 * summary["expected"] and tracked
    print("demo OK" if ok else "demo FAILED: too few estimates or they do not track the ground truth")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
