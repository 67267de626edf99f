"""Real-time scheduling of the estimator's threads (hiss_ros.nodes.realtime): raised for every
thread while a node is active, shared by the nodes of a process, long work and what it starts kept
normal, a runaway node dropped back, refusals leave everything as it was. No ROS here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from hiss_ros.errors import HissError
from hiss_ros.nodes import realtime
from hiss_ros.nodes.realtime import HOW, Priority


def fifo_permitted() -> bool:
    """Whether this machine lets a process of this user take SCHED_FIFO (root, CAP_SYS_NICE, rtprio)."""
    probe = "import os; os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


# Real threads, in a process of their own: pytest's own threads must not become real-time.
SCRIPT = textwrap.dedent("""
    import json, os, subprocess, sys, threading
    from hiss_ros.nodes.realtime import Priority, normal_thread

    def policies():
        return {int(t): [os.sched_getscheduler(int(t)), os.sched_getparam(int(t)).sched_priority]
                for t in os.listdir("/proc/self/task")}

    ready, go, worked, done = (threading.Event() for _ in range(4))
    seen = {}
    def before():  # a thread that exists at enter (the middleware's)
        seen["tid"] = threading.get_native_id()
        ready.set()
        go.wait()
        with normal_thread():  # long work in a thread of an active node
            seen["in_normal_thread"] = os.sched_getscheduler(0)
            child = subprocess.run([sys.executable, "-c", "import os; print(os.sched_getscheduler(0))"],
                                   capture_output=True, text=True)
            seen["its_child"] = int(child.stdout)
            worked.set()
            done.wait()
    t = threading.Thread(target=before)
    t.start()
    ready.wait()
    said = []
    p = Priority(int(sys.argv[1]), said.append, said.append)
    p.enter()
    out = {"status": p.status, "said": said, "raised": p.raised, "during": policies()}
    later = threading.Thread(target=lambda: seen.setdefault("made_after", os.sched_getscheduler(0)))
    later.start(); later.join()
    go.set()
    worked.wait()
    p.leave()
    p.enter()  # activated again while that thread still works: it stays normal
    out["reentered"] = policies()
    p.leave()
    out.update(seen, after=policies(), status_after=p.status, raised_after=p.raised)
    done.set(); t.join()
    print(json.dumps(out))
""")


def run_script(priority: int) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(priority)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_thread_runs_fifo_while_active_and_long_work_does_not():
    got = run_script(7)
    if not fifo_permitted():  # the refusal, said and reported, nothing changed
        assert got["status"].startswith("normal (SCHED_FIFO refused") and not got["raised"], got
        assert any(HOW in s for s in got["said"]), got["said"]
        assert all(p == [os.SCHED_OTHER, 0] for p in got["during"].values()), got["during"]
        return
    assert got["status"] == "SCHED_FIFO 7" and got["raised"], got
    assert len(got["during"]) >= 2 and all(p == [os.SCHED_FIFO, 7] for p in got["during"].values()), got["during"]
    assert got["made_after"] == os.SCHED_FIFO  # a thread made while active inherits it (the executor's)
    assert got["in_normal_thread"] == os.SCHED_OTHER  # a thread working for long gave it back ...
    assert got["its_child"] == os.SCHED_OTHER  # ... so what it starts (the C++ compiler) runs normally
    worker = str(got["tid"])
    assert got["reentered"][worker] == [os.SCHED_OTHER, 0]  # ... and activating again does not raise it
    assert {tuple(p) for t, p in got["reentered"].items() if t != worker} == {(os.SCHED_FIFO, 7)}
    assert not got["raised_after"] and got["status_after"] == "normal (inactive)"
    assert all(p == [os.SCHED_OTHER, 0] for p in got["after"].values()), got["after"]  # as before enter


def test_priority_zero_leaves_the_scheduling_alone():
    got = run_script(0)
    assert got["status"] == "normal (realtime_priority:=0)" and not got["raised"] and got["said"] == []
    assert all(p == [os.SCHED_OTHER, 0] for p in got["during"].values()), got["during"]


class FakeOS:
    """os's scheduling calls on made-up threads, recorded; ``refuse`` makes the n-th set raise
    PermissionError; ``ticks``: their CPU time, as ``/proc`` would say (clock ticks)."""

    def __init__(self, monkeypatch, threads: list[int], refuse: int | None = None) -> None:
        self.policy = {t: (os.SCHED_OTHER, 0) for t in threads}
        self.sets = 0
        self.refuse = refuse
        self.ticks = 0
        monkeypatch.setattr(realtime, "_RAISE", realtime._Raise())  # a process with no node active yet
        monkeypatch.setattr(realtime, "_threads", lambda: list(self.policy))
        monkeypatch.setattr(realtime, "_cpu_ticks", lambda tids: self.ticks)
        monkeypatch.setattr(os, "sched_getscheduler", lambda t: self.get(t)[0])
        monkeypatch.setattr(os, "sched_getparam", lambda t: os.sched_param(self.get(t)[1]))
        monkeypatch.setattr(os, "sched_setscheduler", self.set)

    def get(self, tid: int) -> tuple[int, int]:
        return self.policy.get(tid or threading.get_native_id(), (os.SCHED_OTHER, 0))  # 0: the calling thread

    def set(self, tid: int, policy: int, param) -> None:
        tid = tid or threading.get_native_id()  # 0: the calling thread
        self.sets += 1
        if self.sets == self.refuse:
            raise PermissionError(1, "Operation not permitted")
        self.policy[tid] = (policy, param.sched_priority)


def test_a_refusal_part_way_restores_the_threads_already_raised(monkeypatch):
    fake = FakeOS(monkeypatch, [11, 12, 13], refuse=3)
    fake.policy[12] = (os.SCHED_FIFO, 5)  # started under chrt by the user, below the node: raised, then back
    said = []
    p = Priority(20, said.append, said.append)
    p.enter()
    assert not p.raised and p.status == "normal (SCHED_FIFO refused: Operation not permitted)"
    assert fake.policy == {11: (os.SCHED_OTHER, 0), 12: (os.SCHED_FIFO, 5), 13: (os.SCHED_OTHER, 0)}
    assert len(said) == 1 and "realtime_priority:=20" in said[0] and HOW in said[0]


def test_nodes_of_one_process_share_the_raise_and_higher_threads_are_left_alone(monkeypatch):
    fake = FakeOS(monkeypatch, [1, 2, 3])
    fake.policy[3] = (os.SCHED_FIFO, 50)  # the user's own control loop
    a, b = Priority(10, print, print), Priority(30, print, print)
    a.enter()
    b.enter()  # joins the raise: the first node's priority is the process's
    assert fake.policy == {1: (os.SCHED_FIFO, 10), 2: (os.SCHED_FIFO, 10), 3: (os.SCHED_FIFO, 50)}
    assert a.status == b.status == "SCHED_FIFO 10"
    fake.policy[4] = (os.SCHED_FIFO, 10)  # started meanwhile: inherited the raise
    fake.policy[5] = (os.SCHED_FIFO, 50)  # ... or the user's loop's
    a.leave()  # b still active: nothing changes
    assert fake.policy[1] == (os.SCHED_FIFO, 10) and b.raised and not a.raised
    b.leave()  # the last: every thread as it was, the inherited raise gone
    assert fake.policy == {1: (os.SCHED_OTHER, 0), 2: (os.SCHED_OTHER, 0), 3: (os.SCHED_FIFO, 50),
                           4: (os.SCHED_OTHER, 0), 5: (os.SCHED_FIFO, 50)}
    assert a.status == b.status == "normal (inactive)"


def test_a_node_using_most_of_a_core_gives_the_priority_back(monkeypatch):
    fake = FakeOS(monkeypatch, [21, 22])
    hz = os.sysconf("SC_CLK_TCK")
    wall = [100.0]
    monkeypatch.setattr(realtime.time, "monotonic", lambda: wall[0])
    said = []
    p, other = Priority(10, lambda m: None, said.append), Priority(10, print, print)
    p.enter()
    other.enter()
    assert p.raised and fake.policy == {21: (os.SCHED_FIFO, 10), 22: (os.SCHED_FIFO, 10)}
    wall[0] += 0.01
    fake.ticks += hz // 100  # activating, then a report at once: too short to judge
    p.check()
    assert p.raised and said == []
    wall[0] += 0.99
    fake.ticks += hz // 2 - hz // 100  # half a core over the second: a heavy model, still keeping up
    p.check()
    assert p.raised and said == []
    fake.policy[23] = (os.SCHED_FIFO, 10)  # a thread made while active
    wall[0] += 2.0
    fake.ticks += 2 * hz * 95 // 100
    p.check()
    assert not p.raised and not other.raised
    assert p.status == other.status == "normal (SCHED_FIFO dropped: 95% of a core)"
    assert set(fake.policy.values()) == {(os.SCHED_OTHER, 0)}
    assert len(said) == 1 and "95% of a core" in said[0]
    p.check()  # nothing raised: nothing to do
    p.leave()
    other.leave()
    p.enter()  # activated again: tried again
    assert p.raised and p.status == "SCHED_FIFO 10"


def test_normal_thread_keeps_its_thread_out_of_a_raise(monkeypatch):
    fake = FakeOS(monkeypatch, [31])
    me = threading.get_native_id()
    fake.policy[me] = (os.SCHED_FIFO, 10)  # made by an active node's thread
    with realtime.normal_thread():
        assert fake.policy[me] == (os.SCHED_OTHER, 0) and me in realtime._RAISE.normal
        Priority(10, print, print).enter()
        assert fake.policy == {31: (os.SCHED_FIFO, 10), me: (os.SCHED_OTHER, 0)}
    assert me not in realtime._RAISE.normal


def test_normal_thread_work_is_not_counted_and_the_raise_comes_back_after(monkeypatch):
    me = threading.get_native_id()
    fake = FakeOS(monkeypatch, [51, me])
    hz = os.sysconf("SC_CLK_TCK")
    wall = [100.0]
    monkeypatch.setattr(realtime.time, "monotonic", lambda: wall[0])
    p = Priority(10, print, print)
    p.enter()
    with realtime.normal_thread():  # the executor's thread loading a model on a hot reload
        assert fake.policy[me] == (os.SCHED_OTHER, 0)
        wall[0] += 3.0
        fake.ticks += 3 * hz  # three seconds of it
    assert fake.policy[me] == (os.SCHED_FIFO, 10)  # raised again
    wall[0] += 1.0
    fake.ticks += hz // 10
    p.check()  # the load does not count: a tenth of a core since
    assert p.raised
    with realtime.normal_thread():
        p.leave()  # the raise ends meanwhile (deactivated)
    assert fake.policy[me] == (os.SCHED_OTHER, 0) and not p.raised  # not raised again


@pytest.mark.parametrize("bad", [-1, 100, True, "10", 2.5])
def test_a_priority_outside_sched_fifo_range_is_refused(bad):
    with pytest.raises(HissError, match="realtime_priority"):
        Priority(bad, print, print)
