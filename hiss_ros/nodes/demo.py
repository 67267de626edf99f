"""``make demo``: the whole product on one machine, no ROS install needed.

1. writes a synthetic contact recording (IMU 200 Hz, header-less tactile 50 Hz, ground-truth
   wrench) for training and a second one, unseen, for the demo;
2. trains a small HiSS on the first with ``hiss-train``;
3. starts the estimator node and the replay node (separate processes, real DDS, sim time from
   the replayed /clock) on the second recording, and prints a line per second: estimate vs
   ground truth and inference latency;
4. writes ``demo.png`` (estimates against ground truth) and ``summary.json`` (RMSE, latency,
   estimates received and expected, dropped samples), and exits 0 when the estimator tracked the
   ground truth.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO_CONFIG = Path(__file__).resolve().parents[2] / "config" / "train.yaml"
MODEL = {"kind": "hiss", "low": {"kind": "s4d", "d_model": 32, "n_layers": 2, "dropout": 0.0},
         "high": {"kind": "mamba", "d_model": 32, "n_layers": 2, "dropout": 0.0}}


def _train(out: Path) -> Path:
    from hiss_ros.data.synthetic import contact_bag
    from hiss_ros.train.cli import main as train_main

    cfg = yaml.safe_load(REPO_CONFIG.read_text()) if REPO_CONFIG.is_file() else None
    if cfg is None:
        raise SystemExit("demo: config/train.yaml not found (run from the repository)")
    cfg["model"] = MODEL
    cfg["train"] = {"epochs": 15, "batch_size": 8, "lr": 3e-3, "seq_chunks": 32, "val_fraction": 0.2, "seed": 0}
    (out / "train.yaml").write_text(yaml.safe_dump(cfg))
    bag = contact_bag(out / "train_bag", seconds=120.0, seed=1)
    print("demo: training a small HiSS on 120 s of synthetic contact data ...", flush=True)
    code = train_main(["--config", str(out / "train.yaml"), "--bag", str(bag), "--out", str(out / "model"),
                       "--cache-dir", str(out / "cache")])
    if code:
        raise SystemExit(code)
    return out / "model" / "model.safetensors"


def _watch(model: Path, bag: Path, rate: float) -> dict:
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import WrenchStamped
    from rclpy.executors import SingleThreadedExecutor

    env = {**os.environ, "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST"}
    est = subprocess.Popen([sys.executable, "-m", "hiss_ros.nodes.estimator", "--ros-args", "-p",
                            f"model_path:={model}", "-p", "use_sim_time:=true", "-p", "num_threads:=1"], env=env)
    rclpy.init()
    node = rclpy.create_node("hiss_demo_monitor")
    est_t, est_v, gt_t, gt_v, diag = [], [], [], [], {}

    def stamp(m) -> int:
        return m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec

    def force(m) -> list[float]:
        return [m.wrench.force.x, m.wrench.force.y, m.wrench.force.z]

    node.create_subscription(WrenchStamped, "/hiss/wrench_gt",
                             lambda m: (est_t.append(stamp(m)), est_v.append(force(m))), 1000)
    node.create_subscription(WrenchStamped, "/wrench_gt", lambda m: (gt_t.append(stamp(m)), gt_v.append(force(m))),
                             1000)
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
                if est_t and gt_t:
                    g = np.array([np.interp(est_t[-1], gt_t, np.array(gt_v)[:, i]) for i in range(3)])
                    print(f"t={(est_t[-1] - est_t[0]) / 1e9:5.1f} s  force estimate "
                          f"[{est_v[-1][0]:+.2f} {est_v[-1][1]:+.2f} {est_v[-1][2]:+.2f}]  ground truth "
                          f"[{g[0]:+.2f} {g[1]:+.2f} {g[2]:+.2f}]  inference p50 {diag.get('inference_ms_p50', '?')} ms"
                          f"  estimates {len(est_t)}", flush=True)
    finally:
        replay.terminate()
        est.terminate()
        replay.wait(30)
        est.wait(30)
        ex.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return {"est_t": np.array(est_t), "est_v": np.array(est_v), "gt_t": np.array(gt_t), "gt_v": np.array(gt_v),
            "diag": diag}


def _report(run: dict, out: Path, seconds: float) -> dict:
    t, v = run["est_t"], run["est_v"]
    gt = np.stack([np.interp(t, run["gt_t"], run["gt_v"][:, i]) for i in range(3)], 1)
    rmse = np.sqrt(((v - gt) ** 2).mean(0))
    summary = {
        "estimates": len(t), "expected": int(seconds * 20) - 1,
        "rmse_force_xyz": rmse.round(4).tolist(), "rmse_predict_zero": np.sqrt((gt**2).mean(0)).round(4).tolist(),
        "inference_ms_p50": run["diag"].get("inference_ms_p50"),
        "inference_ms_p99": run["diag"].get("inference_ms_p99"),
        "dropped_or_rejected": {k: v for k, v in run["diag"].items()
                                if k.startswith(("pipeline", "unreadable")) and k != "pipeline accepted"},
        "resets": run["diag"].get("resets"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(11, 7), sharex=True)
    ts = (t - t[0]) / 1e9
    for i, ax in enumerate(axes):
        ax.plot((run["gt_t"] - t[0]) / 1e9, run["gt_v"][:, i], "k", lw=1.0, label="ground truth (replayed)")
        ax.plot(ts, v[:, i], "C1", lw=1.0, label="live estimate (/hiss/wrench_gt)")
        ax.set_ylabel(f"force {'xyz'[i]} [N]")
    axes[0].legend(loc="upper right")
    axes[-1].set_xlabel("time [s]")
    axes[-1].set_xlim(0, ts[-1])
    fig.suptitle("hiss_ros demo: estimator node on a replayed recording it has never seen")
    fig.tight_layout()
    fig.savefig(out / "demo.png", dpi=110)
    plt.close(fig)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hiss-demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("out/demo"))
    p.add_argument("--seconds", type=float, default=20.0, help="length of the replayed recording")
    p.add_argument("--rate", type=float, default=1.0, help="replay speed factor")
    args = p.parse_args(argv)
    for old in ("train_bag", "demo_bag", "model", "cache"):  # a re-run starts afresh
        shutil.rmtree(args.out / old, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    from hiss_ros.data.synthetic import contact_bag

    model = _train(args.out)
    bag = contact_bag(args.out / "demo_bag", seconds=args.seconds, seed=7)
    print(f"demo: replaying {args.seconds:g} s through the estimator node (real DDS) ...", flush=True)
    summary = _report(_watch(model, bag, args.rate), args.out, args.seconds)
    print(json.dumps(summary, indent=2))
    print(f"plot: {args.out / 'demo.png'}")
    ok = (summary["estimates"] >= 0.9 * summary["expected"]
          and all(r < 0.7 * z for r, z in zip(summary["rmse_force_xyz"], summary["rmse_predict_zero"], strict=True)))
    print("demo OK" if ok else "demo FAILED: too few estimates or they do not track the ground truth")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
