"""hiss-sim: simulate a sensorized end-effector doing contact work and write a ROS 2 bag.

    hiss-sim --out sim0 [--seconds 60] [--seed 0] [--storage mcap|sqlite3] [--zstd]
             [--imu-rate 400] [--tactile-rate 100] [--gt-rate 100] [--taxels 5]
             [--noise-scale 1.0] [--magnetic-field] [--config sim.yaml] [--force]

``--out`` is the bag folder (ROS 2 convention: it holds metadata.yaml and sim0.mcap or
sim0.db3). Flags override the values of ``--config`` (a YAML mapping of SimConfig fields).
Exit status 2 on a bad setting, an existing output (unless ``--force``) or an output that cannot be
written (one line on stderr); the bag appears whole or not at all.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from hiss_ros.cli_common import fail
from hiss_ros.errors import HissError
from hiss_ros.sim.config import SimConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hiss-sim", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="output bag folder")
    p.add_argument("--config", type=Path, help="YAML file of SimConfig fields (flags override it)")
    p.add_argument("--seconds", type=float, help="duration (default 60)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--storage", choices=["mcap", "sqlite3"], default="mcap")
    p.add_argument("--zstd", action="store_true", help="compress (mcap: per chunk, ~4x smaller; sqlite3: per message)")
    p.add_argument("--imu-rate", dest="imu_rate_hz", type=float, help="Hz (default 400)")
    p.add_argument("--tactile-rate", dest="tactile_rate_hz", type=float, help="Hz (default 100)")
    p.add_argument("--gt-rate", dest="gt_rate_hz", type=float, help="ground-truth Hz (default 100)")
    p.add_argument("--taxels", type=int, help="magnetometers, 3 channels each (default 5)")
    p.add_argument("--noise-scale", dest="noise_scale", type=float, help="sensor noise/bias/drift factor (default 1)")
    p.add_argument("--magnetic-field", action="store_true",
                   help="also publish sensor_msgs/MagneticField per taxel on /tactile/mag<i>")
    p.add_argument("--force", action="store_true", help="overwrite an existing output bag")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {k: getattr(args, k) for k in ("seconds", "seed", "imu_rate_hz", "tactile_rate_hz", "gt_rate_hz",
                                               "taxels", "noise_scale")}
    try:
        if args.config is not None:
            cfg = SimConfig.load(args.config, **overrides)
        else:
            cfg = SimConfig(**{k: v for k, v in overrides.items() if v is not None})
        from hiss_ros.data.write import replace_bag, staged_bag  # rosbags: only when writing
        from hiss_ros.sim.bag import topic_counts, write_sim_bag

        replace_bag(args.out, args.force, delete=False)  # refused before simulating
        from hiss_ros.sim.endeffector import simulate

        t0 = time.perf_counter()
        res = simulate(cfg)
        with staged_bag(args.out, args.force) as tmp:  # no half-written bag left behind
            write_sim_bag(tmp, res, args.storage, args.zstd, args.magnetic_field,
                          progress=not args.quiet and sys.stderr.isatty())
    except (HissError, OSError) as exc:
        return fail("hiss-sim", exc, args.out)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    counts = ", ".join(f"{t} {n}" for t, n in topic_counts(res, args.magnetic_field).items())
    print(f"hiss-sim: wrote {args.out} ({args.storage}{'+zstd' if args.zstd else ''}, {cfg.seconds:g} s, "
          f"seed {cfg.seed}, {size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s): {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
