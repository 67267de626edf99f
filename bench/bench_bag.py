"""Bag extraction overhead: ``read_streams`` against rosbags deserialising the same messages.

Writes a bag of IMU (sensor_msgs/Imu, 6 fields) and tactile (Float32MultiArray, 15 values)
messages into a temp folder, then times (a) rosbags alone reading and deserialising every
message, (b) ``hiss_ros.data.read_streams`` extracting the configured channels from the same bag
(no cache), (c) a second ``read_streams`` call served from the cache. Target: (b) / (a) <= 2.

Usage (from the repository root):
    .venv/bin/python bench/bench_bag.py [--seconds 120] [--quick] [--out docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from benchutil import DEFAULT_DOC, environment, load_average, markdown_table, text_table, write_section
from rosbags.highlevel import AnyReader

from hiss_ros.data import StreamSpec, read_streams
from hiss_ros.data.write import TYPESTORE, float_array, imu, write_bag

IMU = StreamSpec("/imu/data", "sensor_msgs/msg/Imu",
                 ("angular_velocity.x", "angular_velocity.y", "angular_velocity.z",
                  "linear_acceleration.x", "linear_acceleration.y", "linear_acceleration.z"))
TACTILE = StreamSpec("/tactile", "std_msgs/msg/Float32MultiArray", ("data",))


def make_bag(folder: Path, seconds: float) -> tuple[Path, int]:
    """IMU at 1 kHz and tactile at 100 Hz for ``seconds``."""
    rng = np.random.default_rng(0)
    recs = []
    for i in range(int(seconds * 1000)):
        t = 1_000_000_000 + i * 1_000_000
        recs.append(("/imu/data", t, imu(t, rng.standard_normal(3), rng.standard_normal(3))))
        if i % 10 == 0:
            recs.append(("/tactile", t, float_array(rng.standard_normal(15))))
    return write_bag(folder / "bench_bag", recs), len(recs)


def rosbags_only(bag: Path) -> float:
    t0 = time.perf_counter()
    with AnyReader([bag], default_typestore=TYPESTORE) as reader:
        for conn, _, raw in reader.messages():
            reader.deserialize(raw, conn.msgtype)
    return time.perf_counter() - t0


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=None, help="recorded seconds in the bag (default 120)")
    p.add_argument("--quick", action="store_true", help="10 s bag, writes no docs unless --out is given")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    seconds = args.seconds or (10.0 if args.quick else 120.0)
    out = args.out or (None if args.quick else DEFAULT_DOC)
    load = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        bag, n = make_bag(Path(tmp), seconds)
        base = min(rosbags_only(bag) for _ in range(3))
        cache = Path(tmp) / "cache"
        ours = min(timed(lambda: read_streams([bag], [IMU, TACTILE], progress=False)) for _ in range(3))
        read_streams([bag], [IMU, TACTILE], cache_dir=cache, progress=False)
        cached = min(timed(lambda: read_streams([bag], [IMU, TACTILE], cache_dir=cache, progress=False))
                     for _ in range(3))
    rows = [
        ["rosbags read + deserialize", f"{base:.2f}", f"{n / base:,.0f}", "1.00x"],
        ["read_streams (no cache)", f"{ours:.2f}", f"{n / ours:,.0f}", f"{ours / base:.2f}x"],
        ["read_streams (from cache)", f"{cached:.3f}", f"{n / cached:,.0f}", f"{cached / base:.3f}x"],
    ]
    head = ["", "seconds (best of 3)", "messages/s", "vs rosbags"]
    met = "met" if ours <= 2 * base else "NOT met"
    verdict = f"extraction / deserialisation = {ours / base:.2f}x (target <= 2x: {met})"
    print(f"{n:,} messages ({seconds:g} s of IMU 1 kHz + tactile 100 Hz, mcap)")
    print(text_table(head, rows))
    print(verdict)
    if out is not None:
        md = (f"## Bag extraction\n\n{n:,} messages: {seconds:g} s of sensor_msgs/Imu at 1 kHz (6 fields) and "
              f"Float32MultiArray at 100 Hz (15 values), one .mcap bag.\n\n{markdown_table(head, rows)}\n"
              f"\n- {verdict}\n"
              f"{environment('1 (the bag path is single-threaded)', load)}")
        write_section(out, "bench_bag", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
