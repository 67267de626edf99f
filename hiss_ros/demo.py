"""Model-library demo: train a small HiSS on a synthetic IMU -> velocity task, then stream it.

What it shows, in about a minute on a laptop CPU:
  1. HiSS learns to integrate acceleration into velocity (a task that needs memory beyond one
     chunk, so the high-level state matters);
  2. streaming (``step_chunk`` with carried state) gives the same estimates as the offline
     forward pass, at a constant cost per estimate;
  3. a PNG plot of estimate vs ground truth and a summary (RMSE, latency) in ``--out``.

This stands in for ``make demo`` until the ROS replay/estimator demo exists (issue 5).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from hiss_ros.checkpoint import load_checkpoint, save_checkpoint
from hiss_ros.models import build_model

log = logging.getLogger("hiss_ros.demo")

RATE_HZ = 200  # input samples per second
CHUNK = 10  # -> 20 Hz estimates
LEAK_S = 0.5  # velocity decays with this time constant (keeps the synthetic task bounded)


def synthetic_episode(rng: np.random.Generator, seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """IMU-like inputs (L, 6) [gyro xyz, accel xyz] and body velocity (L, 3).

    Acceleration is a random sum of sinusoids; velocity integrates it with a leak
    (v' = a - v / LEAK_S); gyro channels are correlated distractors; both get sensor noise."""
    n = int(seconds * RATE_HZ)
    t = np.arange(n) / RATE_HZ
    freqs = rng.uniform(0.1, 2.0, size=(3, 4))
    phases = rng.uniform(0, 2 * np.pi, size=(3, 4))
    amps = rng.uniform(0.2, 1.5, size=(3, 4))
    accel = (amps[..., None] * np.sin(2 * np.pi * freqs[..., None] * t + phases[..., None])).sum(1).T  # (L, 3)
    vel = np.zeros_like(accel)
    decay = np.exp(-1.0 / (RATE_HZ * LEAK_S))
    for i in range(1, n):
        vel[i] = decay * vel[i - 1] + accel[i] / RATE_HZ
    gyro = 0.5 * np.roll(accel, 7, axis=0) + 0.2 * rng.standard_normal(accel.shape)
    imu = np.concatenate([gyro, accel + 0.05 * rng.standard_normal(accel.shape)], axis=1)
    return imu.astype(np.float32), vel.astype(np.float32)


def windows(x: np.ndarray, y: np.ndarray, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping training windows: inputs (W, length, 6), targets at each chunk's last
    sample (W, length // CHUNK, 3) - the causal target, no look-ahead."""
    w = len(x) // length
    xs = torch.from_numpy(x[: w * length].reshape(w, length, -1))
    ys = torch.from_numpy(y[: w * length].reshape(w, length, -1)[:, CHUNK - 1 :: CHUNK])
    return xs, ys


def run(out: Path, steps: int, seed: int) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train_x, train_y = synthetic_episode(rng, 600.0)
    test_x, test_y = synthetic_episode(rng, 30.0)
    mean, std = train_x.mean(0), train_x.std(0)  # normalisation from training data only
    y_scale = train_y.std(0)
    norm = lambda a: (a - mean) / std  # noqa: E731

    model = build_model({
        "kind": "hiss", "input_dim": 6, "output_dim": 3, "chunk": CHUNK,
        "low": {"kind": "s4d", "d_model": 32, "n_layers": 2, "dropout": 0.0},
        "high": {"kind": "mamba", "d_model": 32, "n_layers": 2, "dropout": 0.0},
    })
    xs, ys = windows(norm(train_x), train_y / y_scale, length=CHUNK * 100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(xs), (16,))
        loss = torch.nn.functional.mse_loss(model(xs[idx]), ys[idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log.info("train step %4d/%d  loss %.4f  (%.0f s)", step + 1, steps, loss.item(), time.perf_counter() - t0)
    train_s = time.perf_counter() - t0

    ckpt = save_checkpoint(out / "demo.safetensors", model,
                           normalization={"input_mean": mean.tolist(), "input_std": std.tolist(),
                                          "output_std": y_scale.tolist()})
    model = load_checkpoint(ckpt).model  # serve from the file, as the estimator node will

    x = torch.from_numpy(norm(test_x[: len(test_x) // CHUNK * CHUNK])).unsqueeze(0)  # (1, L, 6)
    truth = test_y[CHUNK - 1 : x.shape[1] : CHUNK]  # (K, 3)
    with torch.inference_mode():
        offline = model(x)[0].numpy() * y_scale
        state = model.init_state(1)
        stream, lat = [], []
        for k in range(x.shape[1] // CHUNK):
            t = time.perf_counter()
            y, state = model.step_chunk(x[:, k * CHUNK : (k + 1) * CHUNK], state)
            lat.append(time.perf_counter() - t)
            stream.append(y[0].numpy() * y_scale)
    stream = np.stack(stream)
    summary = {
        "train_steps": steps,
        "train_seconds": round(train_s, 1),
        "rmse_per_axis": np.sqrt(((stream - truth) ** 2).mean(0)).round(4).tolist(),
        "rmse_predict_zero": np.sqrt((truth**2).mean(0)).round(4).tolist(),
        "rmse": round(float(np.sqrt(((stream - truth) ** 2).mean())), 4),
        "rmse_predict_zero_all_axes": round(float(np.sqrt((truth**2).mean())), 4),
        "max_abs_stream_minus_offline": float(np.abs(stream - offline).max()),
        "latency_ms_p50": round(1e3 * float(np.median(lat)), 3),
        "latency_ms_p99": round(1e3 * float(np.percentile(lat, 99)), 3),
        "estimates": len(stream),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(out / "demo.png", truth, stream)
    return summary


def plot(path: Path, truth: np.ndarray, est: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = (np.arange(len(truth)) + 1) * CHUNK / RATE_HZ
    fig, axes = plt.subplots(3, 1, figsize=(10, 7), sharex=True)
    for i, ax in enumerate(axes):
        ax.plot(t, truth[:, i], "k", lw=1.2, label="ground truth")
        ax.plot(t, est[:, i], "C1", lw=1.0, label="HiSS streaming estimate")
        ax.set_ylabel(f"v_{'xyz'[i]} [m/s]")
    axes[0].legend(loc="upper right")
    axes[-1].set_xlabel("time [s]")
    fig.suptitle("hiss_ros demo: velocity from a synthetic IMU, estimated chunk by chunk")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (plot, summary, checkpoint)")
    parser.add_argument("--steps", type=int, default=400, help="training steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    s = run(args.out, args.steps, args.seed)
    print(json.dumps(s, indent=2))
    print(f"plot: {args.out / 'demo.png'}")
    ok = s["max_abs_stream_minus_offline"] < 1e-4 and s["rmse"] < 0.5 * s["rmse_predict_zero_all_axes"]
    if not ok:
        print("demo FAILED: streaming differs from offline or the model did not learn")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
