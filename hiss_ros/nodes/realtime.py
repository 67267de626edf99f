"""Real-time scheduling for the estimator (``realtime_priority``). While the node is active, every
thread of its process (the executor's and the middleware's) runs under SCHED_FIFO at that priority,
as ros2_control's controller manager runs its update loop (its ``thread_priority``).

Why: a normal (SCHED_OTHER) thread woken by the sample that completes a chunk can wait behind
whatever else has the CPU at that moment (sensor drivers, a planner, the receivers of the estimates).
On the benchmark machine the node shares 2 cores with the sensor publisher and the estimate receiver.
There, SCHED_FIFO priority 10 lowered the end-to-end latency p99 in 7 of 8 alternating pairs against
the node without it (``bench/bench_latency.py --peer-rev``; README, "Running the estimator").

Threads started while active inherit it (the executor's timer thread, made once the node spins).
Kept from harming the rest of the machine:
- A thread that will work for long (the background compile of a hot reload) calls
  ``normal_thread`` first, so the C++ compiler it starts runs normally too. The compile at
  configure runs before the priority is raised.
- ``Priority.check`` returns to normal scheduling if the node's executor thread used more than
  ``CPU_LIMIT`` of a core since the last check. A node that cannot keep up must not starve the
  robot: Linux leaves normal tasks only 5 % of a CPU that a real-time task keeps busy.
- Deactivating restores each thread's scheduling as it was before activation.

Needs permission: root, CAP_SYS_NICE, or an rtprio limit for the user. Examples:
- ``/etc/security/limits.conf``: ``@realtime - rtprio 99``, then add the user to the ``realtime`` group;
- docker: ``--cap-add=SYS_NICE --ulimit rtprio=99``.
Without it, the node says so once (log and /diagnostics ``scheduling``) and runs normally.
No ROS here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from hiss_ros.errors import HissError

CPU_LIMIT = 0.8  # of one core, the executor thread's since the last check: more, and the priority goes
CHECK_S = 1.0  # ... over at least this long (a check right after activating would judge its own start)
MAX_PRIORITY = 99  # SCHED_FIFO's range is 1..99 on Linux
HOW = ("allow it with CAP_SYS_NICE or an rtprio limit (limits.conf: '@realtime - rtprio 99'; "
       "docker: --cap-add=SYS_NICE --ulimit rtprio=99), or set realtime_priority:=0")


def _threads() -> list[int]:
    return [int(tid) for tid in os.listdir("/proc/self/task")]


def normal_thread() -> None:
    """The calling thread back to normal scheduling (before long work in a thread of an active node)."""
    if hasattr(os, "sched_setscheduler"):
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))  # 0: this thread; lowering needs no permission


class Priority:
    """``priority`` 0: the node's scheduling is left alone; 1-99: SCHED_FIFO while active (see the module)."""

    def __init__(self, priority: int, info: Callable[[str], object], warn: Callable[[str], object]) -> None:
        if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= MAX_PRIORITY:
            raise HissError(f"realtime_priority:={priority!r}: expected 0 (off) or a SCHED_FIFO priority 1-99")
        self.priority, self.info, self.warn = priority, info, warn
        self.status = "normal (realtime_priority:=0)" if priority == 0 else "normal (inactive)"
        self._before: dict[int, tuple[int, int]] = {}  # thread -> (policy, priority) before enter; empty: not raised
        self._mark = (0.0, 0.0)  # (monotonic, this thread's CPU time) at the last check

    @property
    def raised(self) -> bool:
        return bool(self._before)

    def enter(self) -> None:
        """Every thread of this process to SCHED_FIFO (nothing when the priority is 0). A refusal
        is logged and kept in ``status``, and leaves every thread as it was."""
        if self.priority == 0 or self.raised:
            return
        if not hasattr(os, "SCHED_FIFO") or not os.path.isdir("/proc/self/task"):
            return self._refused("not supported on this system")
        policy = os.SCHED_FIFO  # not SCHED_RESET_ON_FORK: threads started later (the executor's) would not get it
        try:
            for tid in _threads():
                try:
                    before = os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority
                    os.sched_setscheduler(tid, policy, os.sched_param(self.priority))
                except ProcessLookupError:  # the thread ended meanwhile
                    continue
                self._before[tid] = before
        except OSError as exc:  # EPERM: no permission; EINVAL: over this system's range
            self._restore()
            return self._refused(exc.strerror or str(exc))
        self.status = f"SCHED_FIFO {self.priority}"
        self._mark = (time.monotonic(), time.thread_time())
        self.info(f"realtime scheduling: SCHED_FIFO priority {self.priority} for its {len(self._before)} threads")

    def leave(self, status: str = "normal (inactive)") -> None:
        """Every thread back to its scheduling before ``enter``; threads made since, to normal."""
        if self.raised:
            self._restore()
            self.status = status

    def check(self) -> None:
        """Call from the executor's thread (the diagnostics timer): back to normal scheduling when
        that thread used more than ``CPU_LIMIT`` of a core over the last ``CHECK_S`` or more."""
        if not self.raised:
            return
        now = time.monotonic(), time.thread_time()
        wall, cpu = now[0] - self._mark[0], now[1] - self._mark[1]
        if wall < CHECK_S:
            return
        self._mark = now
        if cpu / wall > CPU_LIMIT:
            self.leave(f"normal (SCHED_FIFO dropped: {cpu / wall:.0%} of a core)")
            self.warn(f"realtime scheduling dropped: the node used {cpu / wall:.0%} of a core over {wall:.1f} s, "
                      "it would starve the rest of the machine (a model too slow for its input rate?); "
                      "it runs at normal priority until reactivated")

    def _restore(self) -> None:
        before, self._before = self._before, {}
        for tid in _threads():
            policy, priority = before.get(tid, (os.SCHED_OTHER, 0))
            try:
                os.sched_setscheduler(tid, policy, os.sched_param(priority))
            except ProcessLookupError:
                pass

    def _refused(self, why: str) -> None:
        self.status = f"normal (SCHED_FIFO refused: {why})"
        self.warn(f"realtime_priority:={self.priority}: SCHED_FIFO refused ({why}); the node runs at normal "
                  f"priority, its latency at the mercy of the machine's load: {HOW}")
