"""End-to-end latency of the estimator node over real DDS, against a node that recomputes a window.

What is measured, and why:
- Three processes, as on a robot: a sensor publisher (stream 0 of the checkpoint, e.g. the IMU,
  at ``--clock-rate`` Hz, 1 kHz by default; every other input, e.g. the tactile skin, at
  ``--other-rate`` Hz, 100 Hz by default), the estimator node, and a receiver of the estimates.
  The node runs with ``num_threads:=1`` (it shares the robot's CPU).
- Latency of an estimate: the wall time it is received minus the wall time the publisher
  stamped, just before ``publish()``, the sample that completed its chunk (the first stream-0
  sample stamped at or after the chunk's last tick: the node emits a chunk on that sample).
  p50 / p99 over the run.
- Node CPU: user + system time of the node process over the publishing period, as % of one core.
- The harness keeps out of the node's way on a small machine: the publisher sleeps until each
  sample is due instead of spinning for it (its jitter does not enter the latency: the stamp is
  taken at publish), and the publisher and the receiver freeze their start-up heaps as the node
  does (``hiss_ros.nodes.common.freeze_heap``), so that a full garbage collection in either
  (~0.1 s with torch loaded) does not count as the node's latency.
- Publishing starts once the node has warmed up (it reports diagnostics, and its step is compiled or
  loaded from the cache: step_backend auto, the default, does it in the background; a node not
  running the step it was asked for, the compiled one by default, is an error) and both sides of every
  input topic have matched (DDS discovery is per side; best-effort samples sent before are lost).
- Dropped: published inputs the node never received (its ``/diagnostics`` counters), and
  estimates that never arrived (expected = one per chunk of the published stream-0 stamps).
- The node with its other choices: ``step_backend:=eager`` (no compiled step), rclpy's default executor,
  ``intake:=callbacks`` (a callback per input message instead of the paced intake), and
  ``realtime_priority:=0`` (normal scheduling; by default the node's threads run SCHED_FIFO where
  permitted, ``hiss_ros.nodes.realtime``).
- The same run with ``bench/naive_estimator.py``: the same node, except that every estimate
  reruns ``model(window)`` over the last 10 s of chunks instead of one carried-state step.
Targets (streaming node, issue #10): p99 <= 3 ms, zero dropped, CPU <= 15 % of one core, its own CPU
time per estimate beyond the model step <= 0.3 ms p50.
- A peer (``--peer-rev``): the estimator node of another git revision, run the same way in the same
  run; with ``--pairs N``, N more runs of the streaming node and the peer one after the other, each
  pair and the median ratios reported (on a noisy machine one run each does not decide).
- The rclpy floor: the node's subscriptions (raw, as the node's) with callbacks that only count,
  under the same publisher; and the model step timed back to back offline, against the same step
  in the node, where it runs on a core that has been idle (cold caches).

Usage (from the repository root):
    .venv/bin/python bench/bench_latency.py                  # 60 s each, writes docs/BENCHMARKS.md
    .venv/bin/python bench/bench_latency.py --quick          # 10 s, streaming node only, writes nothing
    .venv/bin/python bench/bench_latency.py --quick --seconds 60   # the streaming node's full run only
    .venv/bin/python bench/bench_latency.py --peer-rev REV --pairs 3   # against git REV's node, 4 pairs in all
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from benchutil import (
    DEFAULT_DOC,
    REPO,
    environment,
    load_average,
    markdown_table,
    percentile,
    text_table,
    write_section,
)

SECTION = "bench_latency"
DEFAULT_MODEL = REPO / "models" / "contact.safetensors"
TARGET_P99_MS, TARGET_CPU_PCT, TARGET_GLUE_MS = 3.0, 15.0, 0.3  # issue #10
NS = "/bench"  # every topic of a run, and the namespace of the node
ENV = {"ROS_DOMAIN_ID": str(1 + os.getpid() % 101), "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST"}
STREAMING = "streaming (step_chunk, state carried)"
NODES = {  # name -> (command, extra node parameters)
    STREAMING: ([sys.executable, "-m", "hiss_ros.nodes.estimator"], []),
    "streaming, step_backend:=eager": ([sys.executable, "-m", "hiss_ros.nodes.estimator"],
                                       ["-p", "step_backend:=eager"]),
    "streaming, rclpy's default executor": ([sys.executable, "-m", "hiss_ros.nodes.estimator"],
                                            ["-p", "executor:=single_threaded"]),
    "streaming, intake:=callbacks": ([sys.executable, "-m", "hiss_ros.nodes.estimator"], ["-p", "intake:=callbacks"]),
    "streaming, realtime_priority:=0": ([sys.executable, "-m", "hiss_ros.nodes.estimator"],
                                        ["-p", "realtime_priority:=0"]),
    # normal scheduling: it cannot keep up, so under SCHED_FIFO it would hold a core until the node's CPU check
    # gives the priority back, after a second or more (by chance, its CPU being near the limit)
    "naive (model over the last 10 s per estimate)": ([sys.executable, str(REPO / "bench" / "naive_estimator.py")],
                                                      ["-p", "realtime_priority:=0", "-p", "step_backend:=eager"]),
}


def checkpoint_streams(model: Path) -> tuple[Any, tuple[int, ...]]:
    """The model's serving spec and its channels per input stream."""
    from hiss_ros.serving import load_model

    spec = load_model(model).spec
    return spec, spec.pipeline.input_dims


# --- the sensor publisher (its own process) --------------------------------------------------


def _fill(msg: Any, fields: tuple[str, ...], values: np.ndarray) -> None:
    if fields == ("data",):
        msg.data = values.astype(np.float32).tolist()
        return
    for path, v in zip(fields, values, strict=True):
        *parents, leaf = path.split(".")
        obj = msg
        for p in parents:
            obj = getattr(obj, p)
        setattr(obj, leaf, float(v))


def publish(model: Path, seconds: float, clock_rate: float, other_rate: float, out: Path) -> int:
    """Publish every input stream of ``model`` in real time; save (stream, stamp, publish time)."""
    import rclpy
    from rclpy.qos import qos_profile_sensor_data

    from hiss_ros.nodes.common import freeze_heap, message_class

    cfg, dims = checkpoint_streams(model)
    rclpy.init()
    node = rclpy.create_node("bench_sensors")
    pubs = [node.create_publisher(message_class(s.type), f"{NS}{s.topic}", qos_profile_sensor_data)
            for s in cfg.inputs]
    deadline = time.monotonic() + 60
    while not all(p.get_subscription_count() > 0 for p in pubs):  # discovery: no sample may be lost to it
        if time.monotonic() > deadline:
            print("no subscriber for", [s.topic for s, p in zip(cfg.inputs, pubs, strict=True)
                                        if p.get_subscription_count() == 0], flush=True)
            return 1
        rclpy.spin_once(node, timeout_sec=0.05)
    rates = [clock_rate] + [other_rate] * (len(pubs) - 1)
    # The schedule: (offset ns, stream), all streams merged in time order.
    events = sorted((round(k * 1e9 / rate), i) for i, rate in enumerate(rates) for k in range(int(seconds * rate)))
    rng = np.random.default_rng(0)
    log = np.zeros((len(events), 3), dtype=np.int64)  # stream, stamp (0: no header), time publish() returned
    freeze_heap()
    print("READY", flush=True)  # the parent answers once the node has matched every publisher too
    if sys.stdin.readline().strip() != "GO":
        return 1
    print("START", flush=True)
    t0 = time.time_ns() + 50_000_000
    for n, (offset, i) in enumerate(events):
        if (wait := t0 + offset - time.time_ns()) > 0:
            time.sleep(wait / 1e9)
        spec, msg = cfg.inputs[i], pubs[i].msg_type()
        _fill(msg, spec.fields, rng.standard_normal(dims[i]))
        stamp = time.time_ns()
        stamped = hasattr(msg, "header")
        if stamped:
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp, 1_000_000_000)
        pubs[i].publish(msg)
        log[n] = (i, stamp if stamped else 0, time.time_ns())
    np.save(out, log)
    node.destroy_node()
    rclpy.shutdown()
    return 0


def floor_subscriber(model: Path) -> int:
    """The rclpy floor: the node's input subscriptions (raw, same QoS, events executor) with
    callbacks that only count. Says MATCHED once every input has a publisher, then spins until
    the publisher has been gone for 2 s, and prints what it received."""
    import rclpy
    from rclpy.experimental import EventsExecutor
    from rclpy.qos import QoSProfile, qos_profile_sensor_data

    from hiss_ros.nodes.common import freeze_heap, message_class

    cfg, _ = checkpoint_streams(model)
    rclpy.init()
    node = rclpy.create_node("bench_floor")
    sensor = qos_profile_sensor_data
    qos = QoSProfile(depth=1000, reliability=sensor.reliability, durability=sensor.durability, history=sensor.history)
    counts = [0] * len(cfg.inputs)

    def counter(i: int) -> Any:
        def count(_msg: Any) -> None:
            counts[i] += 1
        return count

    subs = [node.create_subscription(message_class(s.type), f"{NS}{s.topic}", counter(i), qos, raw=True)
            for i, s in enumerate(cfg.inputs)]
    executor = EventsExecutor()
    executor.add_node(node)
    freeze_heap()
    said = False
    while True:
        executor.spin_once(timeout_sec=0.05)
        matched = all(sub.get_publisher_count() > 0 for sub in subs)
        if matched and not said:
            print("MATCHED", flush=True)
            said = True
        if said and not matched:  # the publisher is gone: the run is over
            break
    print("RECEIVED", *counts, flush=True)
    return 0


def run_floor(model: Path, seconds: float, clock_rate: float, other_rate: float, work: Path) -> tuple[float, int, int]:
    """CPU % of one core of ``floor_subscriber`` under the same publisher; (cpu, received, published)."""
    floor = subprocess.Popen([sys.executable, __file__, "--floor", "--model", str(model)], stdout=subprocess.PIPE,
                             text=True)
    pub = subprocess.Popen(
        [sys.executable, __file__, "--publish", "--model", str(model), "--seconds", str(seconds),
         "--clock-rate", str(clock_rate), "--other-rate", str(other_rate), "--log", str(work / "published.npy")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if floor.stdout.readline().strip() != "MATCHED" or pub.stdout.readline().strip() != "READY":
            raise SystemExit("floor subscriber: the publisher and the subscriber did not match")
        pub.stdin.write("GO\n")
        pub.stdin.flush()
        pub.stdout.readline()  # START
        cpu0, t0 = cpu_seconds(floor.pid), time.monotonic()
        if pub.wait() != 0:
            raise SystemExit(f"publisher failed: {pub.stdout.read()}")
        cpu1, t1 = cpu_seconds(floor.pid), time.monotonic()
        received = sum(int(v) for v in floor.stdout.readline().split()[1:])
        floor.wait(timeout=30)
    finally:
        for proc in (pub, floor):
            if proc.poll() is None:
                proc.kill()
    return 100 * (cpu1 - cpu0) / (t1 - t0), received, len(np.load(work / "published.npy"))


# --- one run: node under test + publisher + receiver -----------------------------------------


@dataclass
class Run:
    node: str
    latencies_ms: np.ndarray
    expected: int
    received: int
    published: dict[str, int]
    node_received: dict[str, int]
    cpu_pct: float
    node_ms: tuple[str, str]  # the node's own time per estimate (model + publish), p50 / p99, its last 1000
    step_ms: str  # of which the model step alone, p50 ("-": a node that does not report it)
    glue_cpu_ms: str = "-"  # the node's thread CPU time per estimate beyond the model step, p50
    counters: dict[str, str] = field(default_factory=dict)  # its non-zero drop and reset counters
    lost: dict[str, str] = field(default_factory=dict)  # per input, the middleware's message-lost count
    scheduling: str = "-"  # its threads' scheduling at the end (/diagnostics; "-": a node that does not say)

    @property
    def why_missing(self) -> str:
        """What the node counted, where estimates did not arrive (gaps, resets, drops; empty: nothing)."""
        if self.received >= self.expected:
            return ""
        said = ", ".join(f"{k} {v}" for k, v in self.counters.items())
        return f"{self.node}: {self.expected - self.received} estimates missing; the node counted: {said or 'nothing'}"

    @property
    def dropped_inputs(self) -> int:
        return sum(self.published[t] - self.node_received.get(t, 0) for t in self.published)

    @property
    def why_dropped(self) -> str:
        """Which inputs the node did not receive, and what the middleware said it lost (empty: none)."""
        said = [f"{t}: {n - self.node_received.get(t, 0)} of {n} not received (the middleware reported "
                f"{self.lost.get(t, '?')} lost)" for t, n in self.published.items() if self.node_received.get(t, 0) < n]
        return f"{self.node}: {'; '.join(said)}" if said else ""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def expected_estimates(cfg: Any, dims: tuple[int, ...], log: np.ndarray) -> int:
    """How many chunks the trainer's pipeline makes of the published samples (header-less
    streams stamped at their publish time; the node stamps them on receipt, a little later)."""
    from hiss_ros.pipeline import Pipeline

    streams = []
    for i, d in enumerate(dims):
        rows = log[log[:, 0] == i]
        stamps = np.where(rows[:, 1] > 0, rows[:, 1], rows[:, 2])
        streams.append((stamps, np.zeros((len(rows), d))))
    return sum(len(e.stamps_ns) for e in Pipeline(cfg.pipeline).process(streams))


def run_node(name: str, command: list[str], params: list[str], model: Path, seconds: float, clock_rate: float,
             other_rate: float, work: Path, source: Path | None = None) -> Run:
    """One node's run; ``source``: a checkout whose hiss_ros the node runs (a peer revision)."""
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.experimental import EventsExecutor

    from hiss_ros.nodes.common import freeze_heap, message_class
    from hiss_ros.nodes.messages import TWIST, estimate_type, output_names

    cfg, dims = checkpoint_streams(model)
    if not hasattr(message_class(cfg.inputs[0].type)(), "header"):
        raise SystemExit(f"stream 0 ({cfg.inputs[0].topic}) has no header: its publish times cannot be matched")
    out = cfg.outputs[0]
    before_13 = source is not None and "output_prefix" in (source / "hiss_ros/nodes/estimator.py").read_text()
    if not before_13:  # relative inputs and private outputs, all under the namespace
        names = ["-r", f"__ns:={NS}"]
        status, estimates = f"{NS[1:]}/hiss_estimator: estimator", f"{NS}/hiss_estimator/"
        estimates += output_names([estimate_type(out, covariance=False)], [out])[0].removeprefix("~/")

        def key(topic: str) -> str:  # the diagnostics name inputs as the node subscribes them: relative
            return topic.lstrip("/")
    else:  # a peer from before #13: absolute input topics, estimates under output_prefix
        names = ["-p", f"output_prefix:={NS}", *(a for s in cfg.inputs for a in ("-r", f"{s.topic}:={NS}{s.topic}"))]
        status, estimates = "hiss_ros estimator", f"{NS}{out.topic}"

        def key(topic: str) -> str:
            return topic
    node_log = work / "node.log"  # a file, not a pipe: a pipe nobody reads until the end can fill and block it
    with node_log.open("w") as log_file:
        node_proc = subprocess.Popen(
            [*command, "--ros-args", "-p", f"model_path:={model}", "-p", "num_threads:=1", *names,
             "-p", "diagnostics_period_s:=0.5", "-p", "qos_depth:=1000", *params],
            stdout=log_file, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONPATH": str(source)} if source else None, cwd=source)  # -m: cwd first
    pub = None
    context = rclpy.Context()
    rclpy.init(context=context)
    receiver = rclpy.create_node("bench_receiver", context=context)
    executor = EventsExecutor(context=context)  # the lightest wake-up rclpy has, as the node's
    executor.add_node(receiver)
    got: list[tuple[int, int]] = []
    diag: dict[str, str] = {}
    diag_at = [0.0]  # monotonic time of the last diagnostics report

    def on_estimate(m: Any) -> None:
        got.append((m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec, time.time_ns()))

    def on_diagnostics(m: Any) -> None:
        for st in m.status:
            if st.name == status:
                diag.update({kv.key: kv.value for kv in st.values})
                diag_at[0] = time.monotonic()

    sub = receiver.create_subscription(message_class(TWIST if out.derive else out.type), estimates,
                                       on_estimate, 10_000)
    receiver.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, 10)
    freeze_heap()
    receiving = threading.Event()
    receiving.set()

    def spin() -> None:
        while receiving.is_set():
            executor.spin_once(timeout_sec=0.1)

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    try:
        # Up once it reports (it does once spinning, after its warm-up) and its step is compiled or loaded from
        # the cache (step_backend auto, the default, does it in the background: "compile" reads "compiling").
        wait_for(lambda: sub.get_publisher_count() > 0 and diag_at[0] > 0, 180, f"{name}: the node did not come up")
        wait_for(lambda: diag.get("compile") != "compiling", 300, f"{name}: the step did not compile")
        wanted = next((p.split(":=")[1] for p in params if p.startswith("step_backend:=")),
                      "eager" if diag.get("compile", "off") == "off" else "compile")  # off: a peer with eager default
        if diag.get("step_backend", "eager") != wanted:
            raise SystemExit(f"{name}: the node runs step_backend {diag.get('step_backend')} "
                             f"(compile: {diag.get('compile')}), not {wanted}")
        log_path = work / "published.npy"
        pub = subprocess.Popen(
            [sys.executable, __file__, "--publish", "--model", str(model), "--seconds", str(seconds),
             "--clock-rate", str(clock_rate), "--other-rate", str(other_rate), "--log", str(log_path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        said = []
        for line in pub.stdout:
            if line.startswith("READY"):
                # Discovery is per side: the publisher saw the node's readers; wait until the node's
                # readers saw the publisher too, or its first samples are lost (best effort).
                wait_for(lambda: all(int(diag.get(f"publishers {key(s.topic)}", 0)) > 0 for s in cfg.inputs), 30,
                         f"{name}: the node did not match the sensor publisher")
                pub.stdin.write("GO\n")
                pub.stdin.flush()
            elif line.startswith("START"):
                break
            said.append(line)
        cpu0, t0 = cpu_seconds(node_proc.pid), time.monotonic()
        if pub.wait() != 0:
            raise SystemExit(f"publisher failed: {''.join(said)}{pub.stdout.read()}")
        cpu1, t1 = cpu_seconds(node_proc.pid), time.monotonic()
        log = np.load(log_path)
        clock = log[log[:, 0] == 0]
        expected = expected_estimates(cfg, dims, log)
        # Wait for the estimates in flight (a slow node works through its queue), then settle.
        wait_for(lambda: len(got) >= expected or stalled(got), 120, None)
        # ... and for the node's counters as they stand after the last input (reports every 0.5 s)
        settled = time.monotonic()
        wait_for(lambda: diag_at[0] > settled + 0.6, 10, None)
    finally:
        if pub is not None and pub.poll() is None:
            pub.kill()
        node_proc.terminate()
        try:
            node_proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            node_proc.kill()
        node_out = node_log.read_text()
        receiving.clear()
        spinner.join(timeout=5)
        executor.shutdown()
        receiver.destroy_node()
        rclpy.try_shutdown(context=context)
    if "Traceback" in node_out:
        raise SystemExit(f"{name} failed:\n{node_out[-3000:]}")
    stamps = np.array([g[0] for g in got], dtype=np.int64)
    received_at = np.array([g[1] for g in got], dtype=np.int64)
    trigger = np.searchsorted(clock[:, 1], stamps, side="left")  # the sample that completed the chunk
    ok = trigger < len(clock)
    latencies = (received_at[ok] - clock[trigger[ok], 1]) / 1e6  # from the stamp taken just before publish()
    published = {s.topic: int((log[:, 0] == i).sum()) for i, s in enumerate(cfg.inputs)}
    node_received = {s.topic: int(diag.get(f"received {key(s.topic)}", 0)) for s in cfg.inputs}
    return Run(name, latencies, expected, len(got), published, node_received,
               100 * (cpu1 - cpu0) / (t1 - t0), (diag.get("inference_ms_p50", "?"), diag.get("inference_ms_p99", "?")),
               diag.get("step_ms_p50", "-"), diag.get("glue_cpu_ms_p50", "-"),
               {k: v for k, v in diag.items() if (k.startswith("pipeline ") or k == "resets") and v not in ("0", "")},
               {s.topic: diag.get(f"lost {key(s.topic)}", "?") for s in cfg.inputs}, diag.get("scheduling", "-"))


def wait_for(condition, timeout_s: float, message: str | None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            if message:
                raise SystemExit(message)
            return
        time.sleep(0.05)  # polling the receiver thread's progress, not synchronising with it


def stalled(got: list, quiet_s: float = 3.0) -> bool:
    """True once no estimate has arrived for ``quiet_s`` (a node that dropped some never sends them)."""
    return bool(got) and time.time_ns() - got[-1][1] > quiet_s * 1e9


# --- report ------------------------------------------------------------------------------------

HEADERS = ["node", "estimates received / expected", "latency p50 (ms)", "latency p99 (ms)", "latency max (ms)",
           "in the node p50 / p99 (ms)", "of which model step p50 (ms)", "beyond the step, CPU time p50 (ms)",
           "node CPU (% of one core)", "inputs dropped", "scheduling"]


def rows(runs: list[Run]) -> list[list[str]]:
    return [[r.node, f"{r.received} / {r.expected}", f"{np.percentile(r.latencies_ms, 50):.2f}",
             f"{percentile(list(r.latencies_ms), 99):.2f}", f"{r.latencies_ms.max():.2f}",
             f"{float(r.node_ms[0]):.2f} / {float(r.node_ms[1]):.2f}", r.step_ms, r.glue_cpu_ms, f"{r.cpu_pct:.1f}",
             f"{r.dropped_inputs} of {sum(r.published.values())}", r.scheduling] for r in runs]


def paired_report(paired: list[tuple[Run, Run]]) -> str:
    """The streaming node against the peer, run after run (``--pairs``): each pair, and the median
    ratio of each figure with the number of pairs where the streaming node was lower."""
    def p99(r: Run) -> float:
        return percentile(list(r.latencies_ms), 99)

    def glue(r: Run) -> float:
        return float("nan") if r.glue_cpu_ms == "-" else float(r.glue_cpu_ms)

    lines = ["| pair | CPU % (node / peer) | glue CPU p50 ms (node / peer) | latency p99 ms (node / peer) |",
             "|---|---|---|---|"]
    lines += [f"| {k + 1} | {a.cpu_pct:.1f} / {b.cpu_pct:.1f} | {a.glue_cpu_ms} / {b.glue_cpu_ms} | "
              f"{p99(a):.2f} / {p99(b):.2f} |" for k, (a, b) in enumerate(paired)]
    summary = []
    for what, f in (("CPU", lambda r: r.cpu_pct), ("glue CPU", glue), ("latency p99", p99)):
        ratios = np.array([f(a) / f(b) for a, b in paired])
        if np.isfinite(ratios).all():
            summary.append(f"{what} median ratio {np.median(ratios):.2f}, lower in {int((ratios < 1).sum())} "
                           f"of {len(ratios)}")
    return (f"\nThe streaming node against the peer, run after run ({len(paired)} pairs; the first is their rows "
            "in the table above, `--pairs` ran the others one after the other), node / peer:\n\n"
            + "\n".join(lines) + "\n\n" + "; ".join(summary) + ".\n")


def report(runs: list[Run], model: Path, args: argparse.Namespace, load: str,
           floor: tuple[float, int, int] | None = None, step_ms: float | None = None,
           paired: list[tuple[Run, Run]] | None = None) -> str:
    cfg, dims = checkpoint_streams(model)
    s = runs[0]
    p99 = percentile(list(s.latencies_ms), 99)
    verdicts = [
        f"p99 {p99:.2f} ms (target <= {TARGET_P99_MS:g} ms: {'met' if p99 <= TARGET_P99_MS else 'NOT met'})",
        f"dropped {s.dropped_inputs} inputs, {s.expected - s.received} estimates (target 0: "
        f"{'met' if s.dropped_inputs == 0 and s.received == s.expected else 'NOT met'}"
        + (f"; {s.why_missing}" if s.why_missing else "") + (f"; {s.why_dropped}" if s.why_dropped else "") + ")",
        f"CPU {s.cpu_pct:.1f} % of one core (target <= {TARGET_CPU_PCT:g} %: "
        f"{'met' if s.cpu_pct <= TARGET_CPU_PCT else 'NOT met'})",
    ]
    if s.step_ms != "-":
        glue = float(s.node_ms[0]) - float(s.step_ms)
        verdicts.append(f"its own time per estimate beyond the model step {glue:.2f} ms p50 wall time (preemption "
                        f"included), {float(s.glue_cpu_ms):.3f} ms p50 thread CPU time (target <= "
                        f"{TARGET_GLUE_MS:g} ms: {'met' if float(s.glue_cpu_ms) <= TARGET_GLUE_MS else 'NOT met'})")
    body = (
        "## Estimator node: end-to-end latency over DDS\n\n"
        f"Model `{model.relative_to(REPO) if model.is_relative_to(REPO) else model}`: inputs "
        f"{', '.join(f'`{i.topic}` ({d} ch)' for i, d in zip(cfg.inputs, dims, strict=True))}, "
        f"input clock {cfg.pipeline.input_rate_hz:g} Hz, one estimate per {cfg.pipeline.chunk} samples "
        f"({cfg.pipeline.output_rate_hz:g} Hz). Published: `{cfg.inputs[0].topic}` at {args.clock_rate:g} Hz"
        + (f", the other inputs at {args.other_rate:g} Hz" if len(cfg.inputs) > 1 else "")
        + f", {args.seconds:g} s per node, random values. Publisher, node and receiver are separate processes "
        "(Fast DDS, localhost); the node runs with one torch thread and its defaults (the step compiled ahead of "
        "time, step_backend auto; events executor, paced intake: messages taken once per chunk; SCHED_FIFO "
        "priority 10 where permitted, the `scheduling` column). "
        "Latency = "
        "receipt of an estimate minus the stamp (taken just before publishing) of the sample that completed its "
        "chunk. In the node: its own time per estimate, model step and publishing (`inference_ms` of its "
        "`/diagnostics`, last 1,000 estimates, wall time); the rest is DDS and the three processes waking up. "
        "Beyond the step: the thread CPU time of that work less the model step's (`glue_cpu_ms`: time the "
        "node spent working, not waiting for a core; taking and reading the input messages is not in it, it is in "
        "the node's CPU).\n\n"
        + environment("1 (node)", load) + "\n"
        + markdown_table(HEADERS, rows(runs)) + "\n"
        + "Streaming node: " + "; ".join(verdicts) + ".\n"
    )
    if floor is not None:
        per_s = args.clock_rate + args.other_rate * (len(cfg.inputs) - 1)  # input messages a second
        body += (f"\nThe rclpy floor, the same subscriptions (raw) with callbacks that only count (events executor, "
                 f"one process, same publisher): CPU {floor[0]:.1f} % of one core ({floor[1]} of {floor[2]} messages "
                 f"received). The streaming node's own work beyond it: {s.cpu_pct - floor[0]:.1f} % of one core, "
                 f"{1e4 * (s.cpu_pct - floor[0]) / per_s:.0f} us per input message (its model steps included).\n")
    if step_ms is not None and s.step_ms != "-":
        body += ("\nThe model step back to back (offline, one torch thread, compiled as in the node by default, "
                 f"`compare.step_cost_ms`): {step_ms:.3f} ms "
                 f"p50, against {float(s.step_ms):.3f} ms in the node, where each step follows about a millisecond "
                 "idle: the same work on cold caches (section 'Cold caches', `bench/bench_cold_cache.py`). At "
                 "one estimate per chunk that difference alone is "
                 f"{(float(s.step_ms) - step_ms) * args.clock_rate / cfg.pipeline.chunk / 10:.1f} % of a core.\n")
    by_name = {r.node: r for r in runs}
    c, d, i, o, n = (by_name.get(name) for name in list(NODES)[1:])
    for peer in (r for r in runs if r.node.endswith("(peer)")):
        body += (f"\n{peer.node}: CPU {peer.cpu_pct:.1f} % against {s.cpu_pct:.1f} %, in the node "
                 f"{float(peer.node_ms[0]):.2f} against {float(s.node_ms[0]):.2f} ms p50, latency p99 "
                 f"{percentile(list(peer.latencies_ms), 99):.2f} against {p99:.2f} ms.\n")
    if paired:
        body += paired_report(paired)
    if c is not None:
        body += (f"\nCompiled step (default, step_backend auto) against the eager step (`step_backend:=eager`): "
                 f"in the node {float(s.node_ms[0]):.2f} against {float(c.node_ms[0]):.2f} ms p50, latency p50 "
                 f"{np.percentile(s.latencies_ms, 50):.2f} against {np.percentile(c.latencies_ms, 50):.2f} ms, p99 "
                 f"{p99:.2f} against {percentile(list(c.latencies_ms), 99):.2f} ms, CPU {s.cpu_pct:.1f} % against "
                 f"{c.cpu_pct:.1f} %.\n")
    if d is not None:
        body += (f"\nEvents executor: CPU {s.cpu_pct:.1f} % against {d.cpu_pct:.1f} % with rclpy's default "
                 f"executor, latency p50 {np.percentile(s.latencies_ms, 50):.2f} against "
                 f"{np.percentile(d.latencies_ms, 50):.2f} ms.\n")
    if i is not None:
        body += (f"\nPaced intake: CPU {s.cpu_pct:.1f} % against {i.cpu_pct:.1f} % with `intake:=callbacks` (a "
                 f"callback per message), latency p50 {np.percentile(s.latencies_ms, 50):.2f} against "
                 f"{np.percentile(i.latencies_ms, 50):.2f} ms, p99 {p99:.2f} against "
                 f"{percentile(list(i.latencies_ms), 99):.2f} ms.\n")
    if o is not None:
        body += (f"\nRealtime scheduling ({s.scheduling}) against none (`realtime_priority:=0`): latency p50 "
                 f"{np.percentile(s.latencies_ms, 50):.2f} against {np.percentile(o.latencies_ms, 50):.2f} ms, p99 "
                 f"{p99:.2f} against {percentile(list(o.latencies_ms), 99):.2f} ms, CPU {s.cpu_pct:.1f} % against "
                 f"{o.cpu_pct:.1f} %.\n")
    if n is not None:
        ratio = np.percentile(n.latencies_ms, 50) / np.percentile(s.latencies_ms, 50)
        body += (f"\nNaive / streaming: latency p50 {ratio:.0f}x, "
                 f"CPU {n.cpu_pct / max(s.cpu_pct, 1e-9):.1f}x (the naive node cannot keep up when its CPU "
                 "reaches 100 %: its queue then grows and inputs are dropped).\n")
    return body


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--seconds", type=float, default=None, help="per node (60; --quick: 10)")
    ap.add_argument("--clock-rate", type=float, default=1000.0, help="Hz of input stream 0 (the IMU)")
    ap.add_argument("--other-rate", type=float, default=100.0, help="Hz of the other inputs (tactile)")
    ap.add_argument("--quick", action="store_true", help="streaming node only, 10 s unless --seconds, write nothing")
    ap.add_argument("--only", default="", metavar="TEXT", help="only the nodes whose name contains TEXT")
    ap.add_argument("--peer-rev", metavar="REV",
                    help="also run the estimator node of git revision REV (e.g. the one before a change) as a peer")
    ap.add_argument("--pairs", type=int, default=0, metavar="N",
                    help="with --peer-rev: N more runs of the streaming node and the peer, alternating (a noisy "
                         "machine: the report gives each pair and the median ratios)")
    ap.add_argument("--doc", type=Path, default=DEFAULT_DOC)
    ap.add_argument("--publish", action="store_true", help=argparse.SUPPRESS)  # internal: the sensor process
    ap.add_argument("--log", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)  # internal: the rclpy floor subscriber
    args = ap.parse_args()
    if args.publish:  # in the domain its parent gave it
        return publish(args.model, args.seconds, args.clock_rate, args.other_rate, args.log)
    if args.floor:
        return floor_subscriber(args.model)
    if args.pairs < 0 or (args.pairs and not args.peer_rev) or (args.pairs and args.quick):
        ap.error("--pairs N: N >= 0, with --peer-rev, without --quick")
    os.environ.update(ENV)  # this process's receiver and the child processes share one domain
    if not args.model.is_file():
        raise SystemExit(f"{args.model}: no such checkpoint (train one, or give --model)")
    if args.seconds is None:
        args.seconds = 10.0 if args.quick else 60.0
    load = load_average()
    runs, extra = [], []
    chosen = [(name, node) for name, node in NODES.items() if args.only in name][: 1 if args.quick else None]
    if args.pairs and (not chosen or chosen[0][0] != STREAMING):
        ap.error(f"--pairs: the streaming node is not among the nodes --only {args.only!r} runs")
    with tempfile.TemporaryDirectory() as peer:
        if args.peer_rev:  # a checkout of that revision beside this one, run on the same machine in the same run
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", peer, args.peer_rev], check=True,
                           capture_output=True)
            chosen.append((f"streaming, the node of git {args.peer_rev} (peer)", (NODES[STREAMING][0], [])))
        try:
            pairs = [(STREAMING, NODES[STREAMING]), chosen[-1]] * args.pairs  # the peer is the last chosen
            for k, (name, (command, params)) in enumerate([*chosen, *pairs]):
                with tempfile.TemporaryDirectory() as work:
                    print(f"{name}: {args.seconds:g} s ...", flush=True)
                    (runs if k < len(chosen) else extra).append(
                        run_node(name, command, params, args.model, args.seconds, args.clock_rate, args.other_rate,
                                 Path(work), Path(peer) if "(peer)" in name else None))
        finally:
            if args.peer_rev:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", peer], capture_output=True)
    print(text_table(HEADERS, rows(runs)))
    for run in [*runs, *extra]:
        for why in (run.why_missing, run.why_dropped):
            if why:
                print(why)
    floor = None
    if not args.quick and runs[0].node == STREAMING:
        with tempfile.TemporaryDirectory() as work:
            print(f"rclpy floor: {args.seconds:g} s ...", flush=True)
            floor = run_floor(args.model, args.seconds, args.clock_rate, args.other_rate, Path(work))
        print(f"rclpy floor: CPU {floor[0]:.1f} % ({floor[1]} of {floor[2]} messages received)")
    if not args.quick:
        from hiss_ros.checkpoint import load_checkpoint
        from hiss_ros.train.compare import step_cost_ms

        step_ms = step_cost_ms(load_checkpoint(args.model).model, backend="compile")  # the node's, by default
        print(f"model step back to back: {step_ms:.3f} ms p50")
        paired = [(runs[0], runs[-1]), *zip(extra[::2], extra[1::2], strict=True)] if extra else []
        write_section(args.doc, SECTION, report(runs, args.model, args, load, floor, step_ms, paired))
    return 0


if __name__ == "__main__":
    sys.exit(main())
