"""The GPU check of issue #15: one prepared command for a GPU machine that is lent rarely and briefly.

Parts, each in a child process of its own with a time box (one that fails or runs out of time is
logged, and the others still run; what a part leaves of its budget goes to the next), in this order:
  env     device, driver, torch / CUDA / cuDNN / Triton versions, whether mamba-ssm is there
  wheels  a venv in the scratch folder that sees the machine's packages (torch, numpy, pytest) and
          holds the carried wheels (bench/gpu_wheels.txt: rosbags, and ROS 2 Jazzy's rclpy and
          messages for Python 3.12), installed with --no-index --no-deps: the machine's own
          packages are never touched. The later parts run in that venv
  tests   test/test_cuda.py (every model kind on CUDA == on the CPU to 1e-4 in float32, gradients
          too, streaming == offline on CUDA, the compiled and graph steps on CUDA == the CPU's) and test/test_scan.py
  train   a short ``hiss-train --device cuda`` on data/sample/contact_sim (tiny model, 3 epochs)
  ddp     torchrun, DDP over NCCL, one process per GPU (one on these machines: NCCL takes one GPU
          per rank); DDP gradients must equal the single-process full-batch gradients
  node    the estimator node with ``device:=cuda`` on the sample bag over DDS (``make demo``'s
          program at 3x, its step compiled ahead on CUDA): every estimate arrives, nothing dropped
  bench   forward+backward of the paper-size HiSS (S4D 256x6 low, Mamba 128x6 high) and a flat
          Mamba 128x6 on batch 16 x 2000 samples, GPU against the CPU at 2 threads; the batch-1
          step as served (``StepRunner.step``) on the CPU, on CUDA eagerly, replayed from a CUDA
          graph (backend ``graph``) and compiled ahead (AOTInductor), and the compiled step inside
          a CUDA graph (an experiment); the selective scan alone (chunked parallel vs sequential)
Everything lands in --out (8 files at most, what a device run sends back): NAME.log per part (env
and wheels share setup.log), gpu_check.json (every figure and each part's status) and
benchmarks_gpu.md (a docs/BENCHMARKS.md section with the device, the date and the issue's targets;
``--merge FILE`` puts it into docs/BENCHMARKS.md).

Usage (from the repository root):
    python3 bench/gpu_check.py --out "$OUT" --wheels .whl     # on the GPU machine (docs/GPU.md)
    python3 bench/gpu_check.py --dry-run --out /tmp/gpu-dry   # every part on the CPU, tiny sizes
    python3 bench/gpu_check.py --download-wheels .whl         # here, before: the wheels to carry
Exit status: 0 every part passed, 1 a part failed or ran out of time, 2 a usage error (no CUDA
without --dry-run included).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from benchutil import DEFAULT_DOC, REPO, cpu_model, markdown_table, time_calls, write_section

from hiss_ros.models import ChunkedModel, StepRunner, build_model
from hiss_ros.models.graphs import GraphedStep

SECTION = "gpu_check"
# Seconds per part. Their sum stays under 8 minutes, so one device call (10 at most) holds them all.
BUDGETS = {"env": 15, "wheels": 40, "tests": 110, "train": 45, "ddp": 40, "node": 80, "bench": 145}
MARGIN = 20  # seconds a part keeps for ending what it started (SIGTERM, then SIGKILL after 10 s) within its box
PARTS = tuple(BUDGETS)
# Each part's log; env and wheels share one, so that every file fits in the 8 a device run sends back.
LOGS = {name: "setup.log" if name in ("env", "wheels") else f"{name}.log" for name in PARTS}
WHEEL_LIST = REPO / "bench" / "gpu_wheels.txt"
SAMPLE_BAG = REPO / "data" / "sample" / "contact_sim"
REPORT, MARKDOWN = "gpu_check.json", "benchmarks_gpu.md"
IO = {"input_dim": 6, "output_dim": 3}
CPU_THREADS = 2  # the CPU side of the training benchmark


# --- running parts and commands, time-boxed ----------------------------------------------------


def run_part(name: str, python: str, args: argparse.Namespace, scratch: Path, env: dict[str, str],
             box: float) -> dict[str, Any]:
    """One part as ``gpu_check.py --part NAME`` by ``python``, in a time box of ``box`` seconds (which
    the part is told): status, seconds, box, figures."""
    cmd = [python, str(Path(__file__).resolve()), "--part", name, "--scratch", str(scratch), "--box", f"{box:.1f}",
           "--wheels", str(args.wheels), *(["--dry-run"] if args.dry_run else []), *(["--quick"] if args.quick else [])]
    began = time.monotonic()
    with open(args.out / LOGS[name], "a") as log:
        log.write(f"===== part {name} ({box:.0f} s) =====\n")
        log.flush()
        status = run_boxed(cmd, box, log, env)
    figures_file = scratch / f"{name}.json"
    figures = json.loads(figures_file.read_text()) if figures_file.exists() else {}
    return {"status": status, "seconds": round(time.monotonic() - began, 1), "box_s": round(box), "figures": figures}


def box_of(args: argparse.Namespace, name: str) -> float:
    """The seconds a part was given: its budget and what the parts before it left unused."""
    return args.box if getattr(args, "box", None) else BUDGETS[name]


def run_boxed(cmd: list[str], timeout_s: float, log: Any, env: dict[str, str] | None = None) -> str:
    """Run ``cmd`` with its output into ``log``; "ok", "exit N" or "timeout after Ns". It runs in a
    session of its own, so a timeout ends it with everything it started (torchrun's workers too:
    SIGTERM first, which torchrun forwards to them, then SIGKILL)."""
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=grace)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        return f"timeout after {timeout_s:.0f}s"
    return "ok" if rc == 0 else f"exit {rc}"


def child_env(scratch: Path, dry_run: bool) -> dict[str, str]:
    """The repository first on the path; unbuffered, so a part killed at its time box still leaves its log;
    one cache of compiled steps for every part (unless one is set), kept by the tests too (conftest), so
    the node part loads the contact model's CUDA step that the tests part compiled."""
    paths = [str(REPO), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "PYTHONUNBUFFERED": "1"}
    env.setdefault("HISS_ROS_CACHE", str(scratch / "compiled_steps"))
    env["HISS_TEST_AOT_CACHE"] = env["HISS_ROS_CACHE"]
    if dry_run:
        env["HISS_TEST_DEVICE"] = "cpu"
    return env


class Figures:
    """A part's figures, written to scratch/NAME.json at every update: a part killed at its time
    box keeps what it measured before."""

    def __init__(self, path: Path) -> None:
        self.path, self.data = path, {}

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(self.data, indent=1))
        partial.replace(self.path)  # whole or not at all, even when the time box strikes mid-write
        print(f"  {key}: {json.dumps(value)}", flush=True)


def run_parts(args: argparse.Namespace, scratch: Path, report: dict[str, Any] | None = None
              ) -> dict[str, dict[str, Any]]:
    """Every part not skipped, each as ``gpu_check.py --part NAME`` in a child process: by the
    machine's Python, or once the wheels part has made it, by the venv that holds the carried wheels.
    A part's box ends where the budgets so far end: what a part (or a skipped one) leaves unused goes
    to the next, and the whole stays within the sum of the budgets."""
    results: dict[str, dict[str, Any]] = {}
    env = child_env(scratch, args.dry_run)
    python = sys.executable
    ends = time.monotonic()
    for name in PARTS:
        ends += BUDGETS[name]
        if name in args.skip:
            results[name] = {"status": "skipped", "seconds": 0.0, "figures": {}}
        else:
            results[name] = run_part(name, python, args, scratch, env, max(0.01, ends - time.monotonic()))
            print(f"{name:7s} {results[name]['status']} ({results[name]['seconds']} s)", flush=True)
        if (scratch / INSTALLED).exists():  # the wheels went in (even if the part overran its box after)
            python = str(venv_python(scratch))
        if report is not None:  # what is known so far comes back even if the device call is cut short
            write_report(args.out, {**report, "parts": results})
    return results


# --- the parts (each runs in its own child process) --------------------------------------------


def device_for(dry_run: bool) -> torch.device:
    return torch.device("cpu") if dry_run else torch.device("cuda", 0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def part_env(args: argparse.Namespace, fig: Figures) -> None:
    from hiss_ros.models import cuda_kernels_available

    fig["python"] = platform.python_version()
    fig["torch"] = torch.__version__
    fig["cuda"] = torch.version.cuda
    fig["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    fig["cpu"] = f"{cpu_model()} ({os.cpu_count()} logical cores)"
    fig["mamba_ssm"] = cuda_kernels_available()
    try:
        import triton

        fig["triton"] = triton.__version__
    except ImportError:
        fig["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        fig["gpus"] = torch.cuda.device_count()
        fig["gpu"] = props.name
        fig["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        fig["capability"] = f"{props.major}.{props.minor}"
    # What the compiled step's CUDA build uses besides Triton: a C++ compiler, CUDA's headers (nvcc's toolkit)
    for tool, line in (("g++", 0), ("nvcc", -1)):  # the line that names the version
        path = shutil.which(tool)
        said = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout if path else ""
        fig[tool] = said.strip().splitlines()[line] if said.strip() else None
    if shutil.which("nvidia-smi"):
        subprocess.run(["nvidia-smi"], check=False, timeout=10)


def wheel_names() -> list[str]:
    """The wheel files bench/gpu_wheels.txt lists (one a line; '#' starts a comment)."""
    lines = (line.split("#", 1)[0].strip() for line in WHEEL_LIST.read_text().splitlines())
    return [line for line in lines if line]


INSTALLED = "wheels_installed"  # in the scratch folder, once the venv holds the wheels


def venv_python(scratch: Path) -> Path:
    return scratch / "venv" / "bin" / "python"


PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def download_wheels(folder: Path) -> int:
    """Here, with network: download exactly the files bench/gpu_wheels.txt names (cp312, x86_64) into
    ``folder``, by name and version, with no dependencies (the list is complete)."""
    names = wheel_names()
    specs = [f"{n.split('-')[0]}=={n.split('-')[1]}" for n in names]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "none",
           *(a for p in PLATFORMS for a in ("--platform", p)), "--dest", str(folder), *specs]
    subprocess.run(cmd, check=True)
    missing = [n for n in names if not (folder / n).is_file()]
    extra = sorted({p.name for p in folder.glob("*.whl")} - set(names))
    if missing or extra:
        print(f"{folder}: not the listed files: missing {missing}, not listed {extra}", file=sys.stderr)
        return 1
    size = sum((folder / n).stat().st_size for n in names)
    print(f"{folder}: the {len(names)} wheels of {WHEEL_LIST.name}, {size / 2**20:.1f} MiB")
    return 0


def part_wheels(args: argparse.Namespace, fig: Figures) -> None:
    """A venv in the scratch folder that sees the machine's own packages (torch, numpy, pytest) and holds
    the carried wheels. A venv, not ``pip --target``: the ROS 2 wheels find their libraries and their
    middleware from the prefix they are installed in (``sys.prefix``)."""
    names = wheel_names()
    missing = [n for n in names if not (args.wheels / n).is_file()]
    fig["wheels"] = len(names)
    fig["missing"] = missing
    venv = args.scratch / "venv"
    python = venv_python(args.scratch)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--disable-pip-version-check", *(str(args.wheels / n) for n in names)]
    if args.dry_run:  # cp312 wheels do not install on another Python: say what would run
        print("would run:", sys.executable, "-m venv --without-pip", venv, "and", " ".join(pip))
        return
    if missing:
        raise SystemExit(f"missing from {args.wheels}: {missing}; download them as docs/GPU.md says and carry "
                         f"the folder with the run call")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    site_dir = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                   check=True, capture_output=True, text=True, timeout=30).stdout.strip())
    # The machine's python3 is itself a venv (/opt/torch/.venv), so --system-site-packages would not
    # see its torch: add its site folders (their .pth files processed) after the venv's own.
    import site

    (site_dir / "_machine_site.pth").write_text(
        "".join(f"import site; site.addsitedir({d!r})\n" for d in site.getsitepackages()))
    began = time.monotonic()
    subprocess.run(pip, check=True, timeout=box_of(args, "wheels") - 15)  # pip: the machine's, through that .pth
    fig["install_seconds"] = round(time.monotonic() - began, 1)
    (args.scratch / INSTALLED).touch()
    # rosbags is a namespace package (no __file__): name its highlevel module's file.
    probe = ("import rosbags.highlevel, torch, numpy; print(rosbags.highlevel.__file__, torch.__file__, "
             "numpy.__file__); "
             "import rclpy, lifecycle_msgs.msg, std_srvs.srv, sensor_msgs.msg; print(rclpy.__file__)")
    fig["imports"] = subprocess.run([str(python), "-c", probe], check=True, capture_output=True, text=True,
                                    env=child_env(args.scratch, False), timeout=30).stdout.split()


def junit_counts(path: Path) -> dict[str, int]:
    """tests / failures / errors / skipped from a pytest junit XML file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}


def part_tests(args: argparse.Namespace, fig: Figures) -> None:
    """Two pytest runs, each with its own junit file, so that a time box striking the second (the
    contact model's step compiled for CUDA, tens of seconds cold) keeps the first's counts."""
    deadline = time.monotonic() + box_of(args, "tests") - MARGIN
    env = child_env(args.scratch, args.dry_run)
    # The dry run keeps to two model kinds: it checks the plumbing, in seconds (the compiled step on the
    # CPU is bench's, and make test's).
    runs = ({"models": ["-k", "flat-mamba or hiss-s4d-mamba-scaled"]} if args.dry_run
            else {"models": ["-k", "not compiled", "test/test_scan.py"], "compiled": ["-k", "compiled"]})
    failed = []
    for name, selection in runs.items():
        junit = args.scratch / f"tests-{name}.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
               "test/test_cuda.py", *selection]
        status = run_boxed(cmd, max(1.0, deadline - time.monotonic()), sys.stdout, env)
        if junit.exists():
            fig[f"pytest-{name}"] = junit_counts(junit)
        if status != "ok":
            failed.append(f"pytest ({name}): {status}")
    counts = [fig.data[k] for k in ("pytest-models", "pytest-compiled") if k in fig.data]
    if counts:
        fig["pytest"] = {k: sum(c[k] for c in counts) for k in counts[0]}
    if failed:
        raise SystemExit("; ".join(failed))
    if fig.data.get("pytest", {}).get("skipped"):
        raise SystemExit("tests were skipped: CUDA not seen by pytest")


def tiny_train_config(epochs: int) -> dict[str, Any]:
    """The shipped contact recipe with a tiny model and a few epochs."""
    cfg = yaml.safe_load((REPO / "config" / "train_contact.yaml").read_text())
    cfg["model"] = {"kind": "hiss", "low": {"kind": "s4d", "d_model": 32, "n_layers": 2},
                    "high": {"kind": "mamba", "d_model": 32, "n_layers": 2}}
    cfg["train"].update(epochs=epochs, patience=epochs)
    return cfg


def part_train(args: argparse.Namespace, fig: Figures) -> None:
    config = args.scratch / "train.yaml"
    config.write_text(yaml.safe_dump(tiny_train_config(1 if args.dry_run else 3)))
    out = args.scratch / "train"
    cmd = [sys.executable, "-m", "hiss_ros.train.cli", "--config", str(config), "--bag", str(SAMPLE_BAG),
           "--out", str(out), "--cache-dir", str(args.scratch / "cache"), "--quiet",
           "--device", "cpu" if args.dry_run else "cuda"]
    began = time.monotonic()
    status = run_boxed(cmd, box_of(args, "train") - MARGIN, sys.stdout, child_env(args.scratch, args.dry_run))
    fig["seconds"] = round(time.monotonic() - began, 1)
    if status != "ok":
        raise SystemExit(f"hiss-train: {status}")
    metrics = json.loads((out / "metrics.json").read_text())
    fig["metrics"] = {k: metrics.get(k) for k in ("val_mse", "best_epoch", "epochs_run", "seconds", "processes")}


def part_ddp(args: argparse.Namespace, fig: Figures) -> None:
    # One process per GPU for NCCL (1 here); the dry run takes 2 CPU processes over gloo.
    nproc = 2 if args.dry_run else torch.cuda.device_count()
    fig["processes"] = nproc
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(Path(__file__).resolve()), "--ddp-worker", "--scratch", str(args.scratch),
           *(["--dry-run"] if args.dry_run else [])]
    env = {**child_env(args.scratch, args.dry_run), "OMP_NUM_THREADS": "1"}
    status = run_boxed(cmd, box_of(args, "ddp") - MARGIN, sys.stdout, env)
    result = args.scratch / "ddp_worker.json"
    if result.exists():
        fig["result"] = json.loads(result.read_text())
    if status != "ok":
        raise SystemExit(f"torchrun: {status}")


def ddp_worker(args: argparse.Namespace) -> int:
    """One torchrun rank: DDP's averaged gradient over the ranks' shards must equal the gradient of
    the whole batch in one process (the loss is a mean, every shard the same size)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    backend = "gloo" if args.dry_run else "nccl"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    stack = {"d_model": 32, "n_layers": 2, "dropout": 0.0}
    model = build_model({"kind": "hiss", **IO, "chunk": 10, "low": {"kind": "s4d", **stack},
                         "high": {"kind": "mamba", **stack}}).to(device)
    x = torch.randn(4 * world, 200, IO["input_dim"]).to(device)  # the same on every rank (seeded)
    whole = copy.deepcopy(model)
    whole(x).square().mean().backward()
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    ddp(x[rank::world]).square().mean().backward()
    err = max(((p.grad - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-30)).item()
              for p, q in zip(model.parameters(), whole.parameters(), strict=True))
    total = torch.tensor([float(rank + 1)], device=device)
    dist.all_reduce(total)
    ok = err <= 1e-4 and total.item() == world * (world + 1) / 2
    if rank == 0:
        (args.scratch / "ddp_worker.json").write_text(json.dumps(
            {"backend": backend, "world_size": world, "device": str(device), "grad_rel_err": err,
             "all_reduce_sum": total.item(), "ok": ok}))
    dist.barrier()  # rank 0's file is written before any rank tears the group down (gloo aborts otherwise)
    dist.destroy_process_group()
    return 0 if ok else 1


NOT_DROPS = ("pipeline ticks_waiting",)  # the demo's "dropped_or_rejected" counters that lose no sample


def node_verdict(summary: dict[str, Any]) -> list[str]:
    """What went wrong in the demo's summary.json, for the node part: nothing when every expected
    estimate arrived, no sample was dropped or rejected, and the compiled step was in use on CUDA."""
    problems = []
    if summary.get("estimates", 0) < summary.get("expected", 1):
        problems.append(f"{summary.get('estimates')} of {summary.get('expected')} expected estimates arrived")
    lost = {k: v for k, v in summary.get("dropped_or_rejected", {}).items() if k not in NOT_DROPS and str(v) != "0"}
    if lost:
        problems.append(f"samples dropped or rejected: {lost}")
    if not str(summary.get("compile", "")).startswith("in use"):
        problems.append(f"the compiled step was not in use: {summary.get('compile')}")
    return problems


def part_node(args: argparse.Namespace, fig: Figures) -> None:
    """The estimator node (``device:=cuda``, the shipped contact model) on the sample bag over DDS, through
    ``make demo``'s program: the step compiled ahead (AOTInductor, on CUDA: the tests part left it in the
    cache, else compiled here), then the replay at 3x (20 s; the 4 kHz of IMU messages that 4x makes
    lost some on 2 cores)."""
    env = {"ROS_DOMAIN_ID": str(1 + os.getpid() % 101), **child_env(args.scratch, args.dry_run),
           "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST"}
    probe = subprocess.run([sys.executable, "-c", "import rclpy, lifecycle_msgs.msg, std_srvs.srv"], env=env,
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        raise SystemExit(f"rclpy is not importable: {probe.stderr.strip()[-500:]} (carry the ROS 2 wheels of "
                         f"{WHEEL_LIST.name}: docs/GPU.md)")
    out = args.scratch / "demo"
    cmd = [sys.executable, "-m", "hiss_ros.nodes.demo", "--out", str(out), "--rate", "3",
           "--device", "cpu" if args.dry_run else "cuda"]
    status = run_boxed(cmd, box_of(args, "node") - MARGIN, sys.stdout, env)
    if (out / "summary.json").exists():
        summary = json.loads((out / "summary.json").read_text())
        fig["summary"] = {k: v for k, v in summary.items() if not k.startswith("rmse")}
        fig["problems"] = node_verdict(summary)
    if status != "ok":
        raise SystemExit(f"hiss-demo: {status}")
    if fig.data["problems"]:
        raise SystemExit("; ".join(fig.data["problems"]))


def bench_configs(dry_run: bool) -> dict[str, dict[str, Any]]:
    """The paper-size HiSS (Marker Writing: S4D 256x6 low, Mamba 128x6 high) and a flat Mamba 128x6;
    a tiny version of each in a dry run."""
    hiss = {**yaml.safe_load((REPO / "config" / "paper_models.yaml").read_text())["marker_writing"], **IO}
    flat = {"kind": "flat", "chunk": 10, "layers": {"kind": "mamba", "d_model": 128, "n_layers": 6}, **IO}
    if dry_run:
        tiny = {"d_model": 16, "n_layers": 2}
        hiss = {**hiss, "low": {**hiss["low"], **tiny}, "high": {**hiss["high"], **tiny}}
        flat = {**flat, "layers": {**flat["layers"], **tiny}}
    return {"hiss": hiss, "flat-mamba": flat}


def train_step_ms(model: ChunkedModel, x: torch.Tensor, repeats: int, warmup: int, budget_s: float) -> list[float]:
    """Forward+backward (mean squared output) times in ms, the device synchronised."""
    def once() -> None:
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        sync(x.device)

    return [1e3 * t for t in time_calls(once, repeats, warmup, budget_s)]


def peak_mib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None


def bench_train(fig: Figures, device: torch.device, configs: dict[str, dict], batch: int, length: int,
                repeats: int, warmup: int) -> None:
    for name, cfg in configs.items():
        torch.manual_seed(0)
        model = build_model(cfg).train().to(device)
        x = torch.randn(batch, length, IO["input_dim"], device=device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = train_step_ms(model, x, repeats, warmup, budget_s=30)
        fig[f"fwdbwd/{name}/{device.type}"] = {"median_ms": statistics.median(times), "calls": len(times),
                                               "peak_mib": peak_mib(device)}


def bench_scan(fig: Figures, device: torch.device, dry_run: bool) -> None:
    """One Mamba layer's scan of the flat model, (B 16, L 2000, E 256, N 16), forward+backward:
    the sequential scan (one step at a time, launch-bound on a GPU) against the chunked one."""
    from hiss_ros.models.parallel_scan import chunked_selective_scan
    from hiss_ros.models.scan import selective_scan

    B, L, E, N = (2, 200, 8, 4) if dry_run else (16, 2000, 256, 16)
    g = torch.Generator(device=device).manual_seed(0)
    u, dt, Bm, C = (torch.randn(B, L, n, device=device, generator=g) for n in (E, E, N, N))
    inputs = [t.requires_grad_() for t in (u, torch.nn.functional.softplus(dt - 2),
                                            -torch.rand(E, N, device=device, generator=g) * 8, Bm, C)]
    scans: dict[str, Callable] = {"sequential": selective_scan}
    scans.update({f"chunked-{T}": (lambda *a, T=T: chunked_selective_scan(*a, chunk=T)) for T in (8, 16, 32, 64)})
    for name, scan in scans.items():
        def once(scan: Callable = scan) -> None:
            torch.autograd.grad(scan(*inputs).square().sum(), inputs)
            sync(device)

        times = time_calls(once, 5 if name != "sequential" else 2, warmup=1, budget_s=20)
        fig[f"scan/{name}"] = {"median_ms": 1e3 * statistics.median(times), "shape": [B, L, E, N]}


def carried(step: Callable, state: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """``step(chunk, state) -> (y, state)`` as chunk -> y, the state carried from call to call."""
    def one(chunk: torch.Tensor) -> torch.Tensor:
        nonlocal state
        y, state = step(chunk, state)
        return y

    return one


def eager_step(model: ChunkedModel, backend: str = "eager") -> Callable[[torch.Tensor], torch.Tensor]:
    """A step (``StepRunner.step``, as served) at batch 1, the state carried from call to call; backend
    ``graph``: the step replayed from a CUDA graph, captured at the first call."""
    return carried(StepRunner(model, backend).step, model.init_state(1))


def step_ms(step: Callable[[torch.Tensor], torch.Tensor], device: torch.device, calls: int) -> dict[str, float]:
    """Latency of one estimate as served: a chunk from host memory in, the estimate back in host memory."""
    chunk = torch.randn(1, 10, IO["input_dim"])
    times = sorted(1e3 * t for t in time_calls(lambda: step(chunk.to(device)).cpu(), calls, warmup=10))
    return {"median_ms": statistics.median(times), "p99_ms": times[min(len(times) - 1, int(0.99 * len(times)))]}


def bench_step(fig: Figures, device: torch.device, hiss_cfg: dict, calls: int) -> None:
    torch.manual_seed(0)
    model = build_model(hiss_cfg).eval()
    with torch.no_grad():  # the fast step applies without autograd; no_grad tensors can be captured
        # One torch thread: at batch 1 more threads only add synchronisation (as bench_streaming found)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        fig["step/cpu-eager"] = step_ms(eager_step(model), torch.device("cpu"), calls)
        torch.set_num_threads(threads)
        if device.type != "cuda":
            print("CUDA eager and CUDA graph steps need CUDA: not measured")
            return
        model.to(device)
        fig["step/cuda-eager"] = step_ms(eager_step(model), device, calls)
        graphed, eager = eager_step(model, "graph"), eager_step(model)
        chunks = torch.randn(5, 1, 10, IO["input_dim"], device=device)
        fig["step/graph_vs_eager_max_abs"] = max((graphed(c) - eager(c)).abs().max().item() for c in chunks)
        fig["step/cuda-graph"] = step_ms(graphed, device, calls)


def bench_compiled_step(fig: Figures, device: torch.device, hiss_cfg: dict, calls: int) -> None:
    """The step compiled ahead of time (AOTInductor, the node's default backend) on ``device``: its
    compile time, its outputs against the eager step's, and its latency as in ``bench_step``."""
    torch.manual_seed(0)
    model = build_model(hiss_cfg).eval().to(device)
    with torch.no_grad():
        runner = StepRunner(model, "compile")
        began = time.monotonic()
        runner.compile(1)  # (or loaded from the cache)
        fig[f"step/{device.type}-compiled-seconds_to_compile"] = round(time.monotonic() - began, 1)
        compiled, eager = carried(runner.step, model.init_state(1)), eager_step(model)
        chunks = torch.randn(5, 1, 10, IO["input_dim"], device=device)
        fig["step/compiled_vs_eager_max_abs"] = max((compiled(c) - eager(c)).abs().max().item() for c in chunks)
        fig[f"step/{device.type}-compiled"] = step_ms(compiled, device, calls)
        if device.type == "cuda":  # an experiment: the compiled step inside a CUDA graph (not a backend yet)
            try:
                state = model.init_state(1)
                both, eager = carried(GraphedStep(runner.step, chunks[0], state), state), eager_step(model)
                fig["step/compiled_graph_vs_eager_max_abs"] = max((both(c) - eager(c)).abs().max().item()
                                                                  for c in chunks)
                fig["step/cuda-compiled-graph"] = step_ms(both, device, calls)
            except Exception as exc:  # a capture the package does not allow, say
                fig["step/cuda-compiled-graph"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"


def part_bench(args: argparse.Namespace, fig: Figures) -> None:
    """In the order of what matters most, should the time box cut it short."""
    device = device_for(args.dry_run)
    configs = bench_configs(args.dry_run)
    batch, length = (2, 200) if args.dry_run else (16, 2000)
    repeats = 1 if args.dry_run else (3 if args.quick else 10)
    calls = 20 if args.dry_run else (100 if args.quick else 300)
    fig["sizes"] = {"batch": batch, "length": length}
    if device.type == "cuda":
        bench_train(fig, device, configs, batch, length, repeats, warmup=2)
    bench_step(fig, device, configs["hiss"], calls)
    # The CPU at CPU_THREADS threads, as the 2-core machines that develop and test hiss_ros (the
    # issue's yardstick for the GPU's speed-up), in this same run.
    threads = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    fig["cpu_threads"] = CPU_THREADS
    # No warm-up call here: a call takes seconds (~7 s HiSS, ~20 s flat Mamba on 2 cores), its first no longer.
    bench_train(fig, torch.device("cpu"), configs, batch, length, 1 if args.dry_run else 2, warmup=0)
    torch.set_num_threads(threads)
    bench_scan(fig, device, args.dry_run)
    bench_compiled_step(fig, device, configs["hiss"], calls)


PART_FUNCTIONS: dict[str, Callable[[argparse.Namespace, Figures], None]] = {
    "env": part_env, "wheels": part_wheels, "tests": part_tests, "train": part_train, "ddp": part_ddp,
    "node": part_node, "bench": part_bench,
}


# --- the report ----------------------------------------------------------------------------------


def fmt_ms(entry: dict[str, Any] | None, key: str = "median_ms") -> str:
    return f"{entry[key]:.2f}" if entry and entry.get(key) is not None else "–"


def ratio(slow: dict | None, fast: dict | None) -> str:
    return f"{slow['median_ms'] / fast['median_ms']:.1f}x" if slow and fast else "–"


def markdown(report: dict[str, Any]) -> str:
    """The docs/BENCHMARKS.md section for a report (gpu_check.json's content)."""
    parts, env = report["parts"], report["environment"]
    bench = parts.get("bench", {}).get("figures", {})
    lines = [
        f"## GPU check (`bench/gpu_check.py`){' — DRY RUN on the CPU, not GPU figures' if report['dry_run'] else ''}",
        "",
        f"- Date: {report['date']}",
        f"- Device: {env['device']}; CPU: {env['cpu']}",
        f"- torch {env['torch']}, CUDA {env['cuda']}, Python {env['python']}",
        f"- Command: `{report['command']}`",
        "",
        markdown_table(["part", "status", "seconds", "of (its box)"],
                       [[n, p["status"], f"{p['seconds']:.0f}", str(p.get("box_s", "–"))] for n, p in parts.items()]),
    ]
    if bench:
        sizes = bench.get("sizes", {})
        rows = []
        for name in ("hiss", "flat-mamba"):
            gpu, cpu = bench.get(f"fwdbwd/{name}/cuda"), bench.get(f"fwdbwd/{name}/cpu")
            rows.append([name, fmt_ms(gpu), fmt_ms(cpu), ratio(cpu, gpu),
                         str(gpu.get("peak_mib")) if gpu else "–"])
        lines += [f"Forward+backward, batch {sizes.get('batch')} x {sizes.get('length')} samples, float32 "
                  f"(CPU: {bench.get('cpu_threads')} threads):", "",
                  markdown_table(["model", "GPU ms", "CPU ms", "GPU speed-up", "GPU peak MiB"], rows)]
        scans = {k.split("/", 1)[1]: v for k, v in bench.items() if k.startswith("scan/")}
        if scans:
            seq = scans.get("sequential")
            lines += [f"Selective scan alone, forward+backward, (B, L, E, N) = "
                      f"{tuple(next(iter(scans.values()))['shape'])}:", "",
                      markdown_table(["scan", "ms", "vs sequential"],
                                     [[k, fmt_ms(v), ratio(seq, v)] for k, v in scans.items()])]
        steps = {k.split("/", 1)[1]: v for k, v in bench.items() if k.startswith("step/") and isinstance(v, dict)}
        if steps:
            lines += ["Batch-1 step (`StepRunner.step`) of the paper-size HiSS, chunk in host memory to estimate in "
                      "host memory (CPU: 1 torch thread):",
                      "", markdown_table(["step", "median ms", "p99 ms"],
                                         [[k, fmt_ms(v), fmt_ms(v, "p99_ms")] for k, v in steps.items()])]
        lines += [f"{k.split('/', 1)[1]}: {v}" for k, v in bench.items() if k.startswith("step/")
                  and isinstance(v, str)]
        graph_err = bench.get("step/graph_vs_eager_max_abs")
        if graph_err is not None:
            lines += [f"CUDA graph against eager, 5 steps: max abs difference {graph_err:.1e}."]
        compiled_err = bench.get("step/compiled_vs_eager_max_abs")
        if compiled_err is not None:
            seconds = next((v for k, v in bench.items() if k.endswith("-compiled-seconds_to_compile")), None)
            lines += [f"Compiled step (AOTInductor) against eager, 5 steps: max abs difference {compiled_err:.1e}; "
                      f"{seconds} s to compile."]
        both_err = bench.get("step/compiled_graph_vs_eager_max_abs")
        if both_err is not None:
            lines += [f"Compiled step inside a CUDA graph (an experiment) against eager: max abs difference "
                      f"{both_err:.1e}."]
    node = parts.get("node", {}).get("figures", {}).get("summary")
    if node:
        lines += ["", f"Estimator node (`make demo`'s program, contact model, device {node.get('device')}, step "
                  f"{node.get('step_backend')}: {node.get('compile')}) on the sample bag at 3x over DDS: "
                  f"{node.get('estimates')} estimates of {node.get('expected')} expected; inference p50 "
                  f"{node.get('inference_ms_p50')} ms, p99 {node.get('inference_ms_p99')} ms; dropped or rejected: "
                  f"{node.get('dropped_or_rejected')}."]
    lines += ["", "Targets (issue #15):", "", markdown_table(["target", "measured", "met"], targets(report))]
    return "\n".join(lines)


def targets(report: dict[str, Any]) -> list[list[str]]:
    """The issue's 'done when', each with what this run measured: [target, measured, yes/no/–]."""
    parts = report["parts"]
    bench = parts.get("bench", {}).get("figures", {})
    dry = report.get("dry_run")  # CPU figures: no target is met or missed by them
    verdict = (lambda ok: "–" if ok is None or dry else ("yes" if ok else "no"))  # noqa: E731
    tests = parts.get("tests", {})
    counts = tests.get("figures", {}).get("pytest")
    cpu, gpu = bench.get("fwdbwd/hiss/cpu"), bench.get("fwdbwd/hiss/cuda")
    speedup = cpu["median_ms"] / gpu["median_ms"] if cpu and gpu else None
    steps = {k: bench[f"step/{k}"]["median_ms"] for k in ("cuda-graph", "cuda-compiled", "cuda-compiled-graph")
             if isinstance(bench.get(f"step/{k}"), dict)}
    best = min(steps.items(), key=lambda kv: kv[1]) if steps else None
    node = parts.get("node", {})
    return [
        ["CUDA == CPU for every model kind (1e-4, float32), streaming == offline",
         f"{counts['tests'] - counts['failures'] - counts['errors'] - counts['skipped']} of {counts['tests']} "
         "tests passed" if counts
         else tests.get("status", "not run"), verdict(tests.get("status") == "ok" if counts else None)],
        [f"paper-size HiSS forward+backward >= 20x faster on the GPU than on the CPU ({bench.get('cpu_threads')} "
         "threads)", f"{speedup:.1f}x" if speedup else "–", verdict(speedup >= 20 if speedup else None)],
        ["batch-1 step <= 0.3 ms on the GPU", f"{best[1]:.3f} ms ({best[0]})" if best else "–",
         verdict(best[1] <= 0.3 if best else None)],
        ["the node end to end on the GPU, nothing dropped", node.get("status", "not run") if node else "not run",
         verdict(node.get("status") == "ok" if node and node.get("status") != "skipped" else None)],
    ]


def section_body(text: str) -> str:
    """A written section without its start and end markers (``write_section`` adds them)."""
    return "\n".join(line for line in text.splitlines() if not line.startswith(f"<!-- {SECTION}:"))


def environment(dry_run: bool) -> dict[str, Any]:
    device = "CPU (dry run)" if dry_run else f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return {"device": device, "cpu": f"{cpu_model()} ({os.cpu_count()} logical cores)", "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=os.environ.get("OUT"),
                   help="folder for the logs and the report (default: $OUT, as on a device run)")
    p.add_argument("--wheels", type=Path, default=REPO / ".whl",
                   help="folder holding the wheels of bench/gpu_wheels.txt (default: .whl)")
    p.add_argument("--skip", action="append", default=[], choices=PARTS, metavar="PART",
                   help=f"leave out a part; repeatable; parts: {', '.join(PARTS)}")
    p.add_argument("--quick", action="store_true", help="fewer timed calls in the benchmarks")
    p.add_argument("--dry-run", action="store_true",
                   help="every part on the CPU with tiny sizes, in seconds: checks the script, measures nothing")
    p.add_argument("--merge", type=Path, metavar="MD",
                   help=f"put a {MARKDOWN} that a run wrote into docs/BENCHMARKS.md, and do nothing else")
    p.add_argument("--download-wheels", type=Path, metavar="DIR",
                   help=f"here, with network: download the wheels {WHEEL_LIST.name} names into DIR, and do nothing "
                        "else (`make gpu-wheels`)")
    p.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # a child process: run this part
    p.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)  # a torchrun rank
    p.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--box", type=float, help=argparse.SUPPRESS)  # a part: the seconds it was given
    args = p.parse_args(argv)
    if args.merge or args.download_wheels or args.ddp_worker or args.part:
        return args
    if args.out is None:
        p.error("--out is required (or set OUT)")
    if not args.dry_run and not torch.cuda.is_available():
        p.error("torch sees no CUDA device: run this on a GPU machine (docs/GPU.md), or with --dry-run to "
                "exercise every part on the CPU")
    if set(args.skip) == set(PARTS):
        p.error("every part skipped: nothing to run")
    if "wheels" in args.skip and not args.dry_run and not {"train", "node"} <= set(args.skip):
        p.error("train and node need the wheels part (its venv is made anew in each run): skip them too, or "
                "not wheels")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        write_section(DEFAULT_DOC, SECTION, section_body(args.merge.read_text()))
        return 0
    if args.download_wheels:
        return download_wheels(args.download_wheels)
    if args.ddp_worker:
        return ddp_worker(args)
    if args.part:
        PART_FUNCTIONS[args.part](args, Figures(args.scratch / f"{args.part}.json"))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python3 bench/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "dry_run": args.dry_run, "command": command.strip(), "environment": environment(args.dry_run),
              "parts": {}}
    with tempfile.TemporaryDirectory(prefix="hiss_gpu_check_") as tmp:
        report["parts"] = run_parts(args, Path(tmp), report)
    print(write_report(args.out, report))
    return 0 if all(p["status"] in ("ok", "skipped") for p in report["parts"].values()) else 1


def write_report(out: Path, report: dict[str, Any]) -> str:
    """gpu_check.json and benchmarks_gpu.md in ``out`` (after every part: a run cut short keeps what it
    measured); the section's text."""
    (out / REPORT).write_text(json.dumps(report, indent=1))
    body = markdown(report)
    (out / MARKDOWN).write_text(f"<!-- {SECTION}:start -->\n{body.rstrip()}\n<!-- {SECTION}:end -->\n")
    return body


if __name__ == "__main__":
    raise SystemExit(main())
