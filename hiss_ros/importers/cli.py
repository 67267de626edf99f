"""hiss-import FORMAT ... --out BAG: public datasets -> ROS 2 bags (see docs/DATASETS.md).

    hiss-import broad /data/broad --trials 01,06 --out bags/broad        # bags/broad/01_..., 06_...
    hiss-import broad trial.mat --start 60 --duration 20 --out excerpt   # one trial: OUT is the bag
    hiss-import broad /data/broad/*.mat --check                          # frame conventions, no bag
    hiss-import euroc MH_01_easy --out bags/mh01                         # folder holding mav0/
    hiss-import euroc --imu imu.csv --groundtruth gt.csv --out bags/seq

Exit status: 0 done, 2 bad input (message names the file and, for CSVs, the line) or an output
that cannot be written; each bag appears whole or not at all.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from hiss_ros.cli_common import fail
from hiss_ros.data.write import replace_bag
from hiss_ros.errors import HissError
from hiss_ros.importers import broad, euroc
from hiss_ros.importers.common import DatasetError

log = logging.getLogger("hiss_ros.importers")


def _common(p: argparse.ArgumentParser, out_help: str = "output bag folder") -> None:
    p.add_argument("--out", help=out_help)
    p.add_argument("--start", type=float, metavar="S", help="excerpt: start S seconds after the first sample")
    p.add_argument("--duration", type=float, metavar="S", help="excerpt: keep S seconds")
    p.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap", help="bag storage (default mcap)")
    p.add_argument("--zstd", action="store_true", help="zstd compression (mcap: per chunk, sqlite3: per message)")
    p.add_argument("--force", action="store_true", help="replace an existing output bag")
    p.add_argument("--min-run", type=float, default=0.1, metavar="S",
                   help="no twist for ground-truth runs between gaps shorter than S seconds (default 0.1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="log diagnostics")


def _vector(text: str) -> tuple[float, float, float]:
    try:
        x, y, z = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}") from None
    return x, y, z


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hiss-import", description="Import a public dataset into ROS 2 bags.")
    sub = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    b = sub.add_parser("broad", help="BROAD trials (.mat): IMU, magnetometer, mocap pose, body twist",
                       description="BROAD trials -> bags. One trial: OUT is the bag; several: OUT/<trial>.")
    b.add_argument("inputs", nargs="*", metavar="INPUT", help="trial .mat files, or folders of them")
    b.add_argument("--trials", help="comma list of trial numbers (01,06), names or .mat paths")
    b.add_argument("--t0", type=float, default=broad.T0_NS / 1e9, metavar="S",
                   help="stamp of a trial's first sample in seconds (default %(default)g)")
    b.add_argument("--no-mag", action="store_true", help="leave out /imu/mag")
    b.add_argument("--lever-arm", metavar="X,Y,Z", type=_vector,
                   help="IMU position (m, IMU frame) relative to the mocap point: pose and twist of the IMU")
    b.add_argument("--check", action="store_true", help="measure the frame conventions (check_frames); no bag")
    b.add_argument("--json", action="store_true", help="with --check: one JSON object per trial")
    _common(b, "output bag folder; several trials: a folder of bags OUT/<trial>")
    e = sub.add_parser("euroc", help="EuRoC MAV / ASL sequence: IMU, ground-truth pose and body twist",
                       description="EuRoC/ASL sequence -> bag.")
    e.add_argument("path", nargs="?", metavar="PATH", help="sequence folder holding mav0/, or mav0/ itself")
    e.add_argument("--imu", metavar="FILE", help="IMU CSV (default PATH/mav0/imu0/data.csv)")
    e.add_argument("--groundtruth", metavar="FILE",
                   help="ground-truth CSV (default PATH/mav0/state_groundtruth_estimate0/data.csv)")
    e.add_argument("--angular", choices=euroc.ANGULAR, default="quat",
                   help="twist angular rate: derivative of the ground-truth quaternion (quat, default) or "
                        "the IMU gyro minus the estimated bias (gyro)")
    _common(e)
    return parser


def _run_broad(args: argparse.Namespace) -> int:
    files = broad.resolve_trials(args.inputs, args.trials)
    if args.check:
        for f in files:
            res = broad.check_frames(f)
            print(json.dumps(res) if args.json else broad.format_check(res), flush=True)
        return 0
    if not args.out:
        raise DatasetError("--out is required (or --check)")
    out = Path(args.out)
    targets = [(f, out) for f in files] if len(files) == 1 else [(f, out / f.stem) for f in files]
    for _, target in targets:  # refuse before writing anything
        replace_bag(target, args.force, delete=False)
    if len(files) > 1:
        if out.exists() and not out.is_dir():
            raise DatasetError(f"{out}: exists and is not a folder; several trials need a folder of bags")
        out.mkdir(parents=True, exist_ok=True)
    for f, target in targets:
        summary = broad.import_trial(f, target, t0_ns=round(args.t0 * 1e9), start_s=args.start,
                                     duration_s=args.duration, mag=not args.no_mag, storage=args.storage,
                                     zstd=args.zstd, force=args.force, progress=not args.no_progress,
                                     min_run_s=args.min_run, lever_arm_m=args.lever_arm)
        print(summary.line(), flush=True)
    return 0


def _run_euroc(args: argparse.Namespace) -> int:
    if not args.out:
        raise DatasetError("--out is required")
    imu_csv, gt_csv = euroc.resolve_paths(args.path, args.imu, args.groundtruth)
    summary = euroc.import_sequence(imu_csv, gt_csv, args.out, angular=args.angular, start_s=args.start,
                                    duration_s=args.duration, storage=args.storage, zstd=args.zstd,
                                    force=args.force, progress=not args.no_progress, min_run_s=args.min_run)
    print(summary.line(), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2): argparse has printed why
        return exc.code if isinstance(exc.code, int) else 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                            format="hiss-import: %(levelname)s: %(message)s")
    elif args.verbose:
        log.setLevel(logging.INFO)
    try:
        return _run_broad(args) if args.format == "broad" else _run_euroc(args)
    except (HissError, OSError) as exc:
        return fail("hiss-import", exc, Path(args.out) if args.out else None)


if __name__ == "__main__":
    sys.exit(main())
