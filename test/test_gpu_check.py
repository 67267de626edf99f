"""Device selection, and bench/gpu_check.py's logic on the CPU: its argument checks, time boxes,
report, and a dry run of its parts (the GPU run itself needs a GPU machine; see docs/GPU.md)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROS_ENV

from hiss_ros.errors import HissError
from hiss_ros.serving import resolve_device
from hiss_ros.train import cli as train_cli
from hiss_ros.train.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.py"
sys.path.insert(0, str(REPO / "bench"))  # gpu_check imports benchutil as a script beside it does

import gpu_check  # noqa: E402

# --- device selection ----------------------------------------------------------------------------


@pytest.mark.parametrize("cuda, choice, expected", [
    (True, "auto", "cuda"), (True, "cuda", "cuda"), (True, "cpu", "cpu"),
    (False, "auto", "cpu"), (False, "cpu", "cpu"),
])
def test_resolve_device(monkeypatch, cuda, choice, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert resolve_device(choice) == expected


def test_resolve_device_refuses_cuda_without_one_and_unknown_names(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(HissError, match="torch sees no CUDA device"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(HissError, match="expected auto, cpu or cuda"):
        resolve_device("cuda:0")


@pytest.mark.parametrize("local_rank, expected", [(None, "cuda:0"), ("0", "cuda:0"), ("3", "cuda:3")])
def test_training_takes_its_torchrun_rank_gpu(monkeypatch, local_rank, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert train_cli._device("auto") == expected
    assert train_cli._device("cpu") == "cpu"


# --- gpu_check: arguments --------------------------------------------------------------------------


def usage_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_refuses_to_run_without_cuda_unless_dry_run(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "torch sees no CUDA device" in usage_error(capsys, ["--out", str(tmp_path)])
    assert gpu_check.parse_args(["--out", str(tmp_path), "--dry-run"]).dry_run


def test_argument_errors(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("OUT", raising=False)
    assert "--out is required" in usage_error(capsys, [])
    assert "invalid choice: 'gpu'" in usage_error(capsys, ["--out", str(tmp_path), "--skip", "gpu"])
    every = [a for part in gpu_check.PARTS for a in ("--skip", part)]
    assert "every part skipped" in usage_error(capsys, ["--out", str(tmp_path), *every])
    args = gpu_check.parse_args(["--out", str(tmp_path), "--skip", "train", "--skip", "ddp", "--quick"])
    assert (args.skip, args.quick, args.dry_run) == (["train", "ddp"], True, False)
    # a rerun without the wheels part has no venv: rosbags and rclpy would be missing for train and node
    assert "train and node need the wheels part" in usage_error(capsys, ["--out", str(tmp_path), "--skip", "wheels"])
    skips = [a for name in ("wheels", "train", "node") for a in ("--skip", name)]
    args = gpu_check.parse_args(["--out", str(tmp_path), *skips])
    assert args.skip == ["wheels", "train", "node"]
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.parse_args([]).out == tmp_path  # $OUT, as on a device run


def test_time_boxes_fit_one_device_call():
    assert set(gpu_check.BUDGETS) == set(gpu_check.PART_FUNCTIONS)
    assert sum(gpu_check.BUDGETS.values()) < 8 * 60


# --- gpu_check: running parts ----------------------------------------------------------------------


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (one that ended but was not reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_run_boxed_reports_exit_codes_and_ends_what_runs_too_long(tmp_path):
    with open(tmp_path / "log", "w") as log:
        assert gpu_check.run_boxed([sys.executable, "-c", "print('hi')"], 30, log) == "ok"
        assert gpu_check.run_boxed([sys.executable, "-c", "raise SystemExit(3)"], 30, log) == "exit 3"
        # A child that starts a grandchild (as torchrun does): the time box ends both.
        code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
                "time.sleep(60)']); print(p.pid, flush=True); time.sleep(60)")
        assert gpu_check.run_boxed([sys.executable, "-c", code], 3, log) == "timeout after 3s"
    hi, grandchild = (tmp_path / "log").read_text().splitlines()
    assert hi == "hi"
    deadline = time.monotonic() + 10  # the signal is sent; dying takes a moment
    while running(int(grandchild)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(int(grandchild))


def test_wheel_list_names_cp312_x86_64_wheels_and_never_torch_or_numpy():
    names = gpu_check.wheel_names()
    assert any(n.startswith("rosbags-0.11.") for n in names)  # setup.py pins rosbags>=0.11,<0.12
    for name in names:
        assert re.fullmatch(r"[A-Za-z0-9_.]+-[0-9][^-]*-(py3-none-any|cp312-cp312-[a-z0-9_.]*x86_64)\.whl", name), name
        assert not name.lower().startswith(("torch", "numpy", "typing_extensions")), name


def test_wheel_list_carries_rclpy_and_the_messages_setup_py_pins():
    """The node part's ROS 2 wheels are the versions of setup.py's "ros" extra (the meta wheels name them)."""
    names = set(gpu_check.wheel_names())
    pins = re.findall(r'"ros-jazzy-([a-z-]+)(?:\[\w+\])?==([0-9.]+)"', (REPO / "setup.py").read_text())
    assert len(pins) >= 10
    for name, version in pins:
        assert f"ros_jazzy_{name.replace('-', '_')}-{version}-py3-none-any.whl" in names, name
    assert {"ros_rclpy-7.1.6-cp312-cp312-manylinux_2_28_x86_64.whl", "ros_wheels_bootstrapper-0.1.2-py3-none-any.whl",
            "ros_rmw_fastrtps_cpp-8.4.3-cp312-cp312-manylinux_2_28_x86_64.whl"} <= names


def test_tiny_training_config_is_valid(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(gpu_check.tiny_train_config(3)))
    cfg = TrainConfig.load(path)
    assert cfg.model["high"]["kind"] == "mamba"
    assert (cfg.train.epochs, cfg.train.patience) == (3, 3)


def test_junit_counts(tmp_path):
    (tmp_path / "j.xml").write_text('<testsuites><testsuite tests="5" failures="1" errors="0" skipped="2"/>'
                                    '</testsuites>')
    assert gpu_check.junit_counts(tmp_path / "j.xml") == {"tests": 5, "failures": 1, "errors": 0, "skipped": 2}


def test_dry_run_of_every_fast_part_writes_logs_report_and_section(tmp_path):
    """The orchestration end to end, as a device run calls it, on the CPU. train (a bag loaded and
    trained on), ddp and node (each below) are left out here for time."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--skip", "train",
                           "--skip", "ddp", "--skip", "node", "--wheels", str(tmp_path / "no-wheels")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bench.log", "benchmarks_gpu.md", "gpu_check.json", "setup.log", "tests.log"]
    assert len(set(gpu_check.LOGS.values())) + 2 <= 8  # every file fits in what a device run sends back
    assert "===== part env (15 s) =====" in (out / "setup.log").read_text()
    assert "===== part wheels (" in (out / "setup.log").read_text()
    report = json.loads((out / "gpu_check.json").read_text())
    status = {name: part["status"] for name, part in report["parts"].items()}
    assert status == {"env": "ok", "wheels": "ok", "tests": "ok", "train": "skipped", "ddp": "skipped",
                      "node": "skipped", "bench": "ok"}
    assert report["parts"]["tests"]["figures"]["pytest"] == {"tests": 6, "failures": 0, "errors": 0, "skipped": 0}
    assert report["parts"]["wheels"]["figures"]["missing"] == gpu_check.wheel_names()
    bench = report["parts"]["bench"]["figures"]
    assert {"scan/sequential", "scan/chunked-16", "step/cpu-eager", "step/cpu-compiled", "fwdbwd/hiss/cpu",
            "fwdbwd/flat-mamba/cpu"} <= set(bench)
    assert bench["cpu_threads"] == gpu_check.CPU_THREADS
    assert bench["step/compiled_vs_eager_max_abs"] < 1e-4
    section = (out / "benchmarks_gpu.md").read_text()
    assert section.startswith("<!-- gpu_check:start -->\n## GPU check") and "DRY RUN" in section
    assert "| chunked-16 |" in section and "| cpu-eager |" in section and "| cpu-compiled |" in section
    assert "| yes |" not in section and "| no |" not in section  # a dry run meets or misses no target
    doc = tmp_path / "BENCHMARKS.md"
    gpu_check.write_section(doc, gpu_check.SECTION, gpu_check.section_body(section))
    assert doc.read_text().count("<!-- gpu_check:start -->") == 1


def test_a_failing_part_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_check.BUDGETS, "env", 0.01)  # no Python starts that fast: a timeout
    args = Namespace(out=tmp_path, skip=["tests", "train", "ddp", "node", "bench"], dry_run=True, quick=False,
                     wheels=tmp_path)
    (tmp_path / "scratch").mkdir()
    report = {"date": "today", "dry_run": True, "command": "test", "environment": gpu_check.environment(True)}
    results = gpu_check.run_parts(args, tmp_path / "scratch", report)
    # The child reads BUDGETS afresh, but the parent's box is what ends it.
    assert results["env"]["status"] == "timeout after 0s"
    assert results["wheels"]["status"] == "ok"
    assert results["bench"]["status"] == "skipped"
    # the report is written after every part: here as it stood after the last one
    written = json.loads((tmp_path / gpu_check.REPORT).read_text())
    assert {name: part["status"] for name, part in written["parts"].items()} == \
        {name: part["status"] for name, part in results.items()}
    assert "| env | timeout after 0s |" in (tmp_path / gpu_check.MARKDOWN).read_text()


def test_time_a_part_leaves_unused_goes_to_the_next(tmp_path, monkeypatch):
    """env's unused budget carries over: wheels, given 0.5 s of its own (too short for a Python to start),
    gets env's leftover and passes; the whole stays within the sum of the budgets."""
    monkeypatch.setitem(gpu_check.BUDGETS, "env", 60.0)
    monkeypatch.setitem(gpu_check.BUDGETS, "wheels", 0.5)
    args = Namespace(out=tmp_path, skip=["tests", "train", "ddp", "node", "bench"], dry_run=True, quick=False,
                     wheels=tmp_path)
    (tmp_path / "scratch").mkdir()
    began = time.monotonic()
    results = gpu_check.run_parts(args, tmp_path / "scratch")
    assert results["env"]["status"] == "ok" and results["env"]["box_s"] == 60
    assert results["wheels"]["status"] == "ok"
    assert 60.5 - (time.monotonic() - began) < results["wheels"]["box_s"] <= 60.5 - results["env"]["seconds"] + 1


def test_ddp_worker_over_gloo_matches_one_process(tmp_path):
    """torchrun with 2 CPU processes (the dry run's gloo stand-in for NCCL): DDP gradients equal the
    whole-batch gradient in one process."""
    fig = gpu_check.Figures(tmp_path / "ddp.json")
    gpu_check.part_ddp(Namespace(dry_run=True, scratch=tmp_path), fig)
    result = fig.data["result"]
    assert (result["backend"], result["world_size"], result["ok"]) == ("gloo", 2, True)
    assert result["grad_rel_err"] < 1e-4


def test_node_part_runs_the_estimator_node_on_the_sample_bag(tmp_path, monkeypatch):
    """The node part in a dry run: ``make demo``'s program with ``--device cpu`` (``cuda`` on a GPU),
    its step compiled ahead, judged by what arrived and what was dropped."""
    for name, value in ROS_ENV.items():
        monkeypatch.setenv(name, value)
    fig = gpu_check.Figures(tmp_path / "node.json")
    try:
        gpu_check.part_node(Namespace(dry_run=True, scratch=tmp_path), fig)
    except SystemExit as exc:  # a 2-core machine under load can lose a DDS sample: the part says so and fails
        assert fig.data["problems"] and str(exc) == "; ".join(fig.data["problems"])
    summary = fig.data["summary"]
    assert fig.data["problems"] == gpu_check.node_verdict(summary)
    assert (summary["device"], summary["step_backend"]) == ("cpu", "compile")
    assert summary["compile"].startswith("in use")
    assert summary["estimates"] >= 0.9 * summary["expected"]


def test_node_verdict_names_what_went_wrong():
    good = {"estimates": 599, "expected": 599, "compile": "in use (0.9 s ...)",
            "dropped_or_rejected": {"unreadable imu/data": "0", "pipeline ticks_waiting": "7"}}
    assert gpu_check.node_verdict(good) == []
    bad = {**good, "estimates": 590, "compile": "failed (RuntimeError: no nvcc)",
           "dropped_or_rejected": {"unreadable imu/data": "0", "pipeline held_overflow": "3"}}
    problems = gpu_check.node_verdict(bad)
    assert problems[0] == "590 of 599 expected estimates arrived"
    assert "'pipeline held_overflow': '3'" in problems[1] and "no nvcc" in problems[2]


def test_markdown_of_gpu_figures():
    report = {"date": "2026-11-28 02:00 UTC", "dry_run": False, "command": "python3 bench/gpu_check.py",
              "environment": {"device": "NVIDIA H100 x1", "cpu": "x (16 logical cores)", "torch": "2.11",
                              "cuda": "13.0", "python": "3.12.3"},
              "parts": {"bench": {"status": "ok", "seconds": 90.0, "figures": {
                  "sizes": {"batch": 16, "length": 2000}, "cpu_threads": 16,
                  "fwdbwd/hiss/cuda": {"median_ms": 20.0, "peak_mib": 900}, "fwdbwd/hiss/cpu": {"median_ms": 2000.0},
                  "scan/sequential": {"median_ms": 300.0, "shape": [16, 2000, 256, 16]},
                  "scan/chunked-16": {"median_ms": 10.0, "shape": [16, 2000, 256, 16]},
                  "step/cpu-eager": {"median_ms": 1.0, "p99_ms": 2.0},
                  "step/cuda-graph": {"median_ms": 0.2, "p99_ms": 0.3}, "step/graph_vs_eager_max_abs": 0.0,
                  "step/cuda-compiled": {"median_ms": 0.4, "p99_ms": 0.5}, "step/compiled_vs_eager_max_abs": 1e-6,
                  "step/cuda-compiled-seconds_to_compile": 31.5,
                  "step/cuda-compiled-graph": "failed: RuntimeError: not permitted when stream is capturing"}},
                        "ddp": {"status": "timeout after 45s", "seconds": 45.0, "figures": {}},
                        "tests": {"status": "ok", "seconds": 50.0, "figures": {"pytest": {
                            "tests": 80, "failures": 0, "errors": 0, "skipped": 0}}},
                        "node": {"status": "ok", "seconds": 60.0, "figures": {"summary": {
                            "estimates": 2399, "expected": 2398, "device": "cuda", "step_backend": "compile",
                            "compile": "in use (2.0 s ...)", "inference_ms_p50": "0.2", "inference_ms_p99": "0.4",
                            "dropped_or_rejected": {"unreadable imu/data": "0"}}}}}}
    text = gpu_check.markdown(report)
    assert "- Device: NVIDIA H100 x1" in text and "DRY RUN" not in text
    assert "| hiss | 20.00 | 2000.00 | 100.0x | 900 |" in text
    assert "| flat-mamba | – | – | – | – |" in text
    assert "| chunked-16 | 10.00 | 30.0x |" in text
    assert "| cuda-graph | 0.20 | 0.30 |" in text
    assert "| ddp | timeout after 45s | 45 | – |" in text
    assert "cuda-compiled-graph: failed: RuntimeError: not permitted when stream is capturing" in text
    assert "| cuda-compiled | 0.40 | 0.50 |" in text and "max abs difference 1.0e-06; 31.5 s to compile" in text
    assert "device cuda, step compile: in use (2.0 s ...)" in text and "2399 estimates of 2398 expected" in text
    # The targets, each with its figure.
    assert "| CUDA == CPU for every model kind (1e-4, float32), streaming == offline | 80 of 80 tests passed | yes |" \
        in text
    assert "| paper-size HiSS forward+backward >= 20x faster on the GPU than on the CPU (16 threads) | 100.0x | yes |" \
        in text
    assert "| batch-1 step <= 0.3 ms on the GPU | 0.200 ms (cuda-graph) | yes |" in text
    assert "| the node end to end on the GPU, nothing dropped | ok | yes |" in text
