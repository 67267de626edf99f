"""Real-time scheduling for the estimator (``realtime_priority``). While a node is active, the
threads of its process (the executor's and the middleware's) run under SCHED_FIFO at that
priority, as ros2_control's controller manager runs its update loop (its ``thread_priority``).

Why: a normal (SCHED_OTHER) thread woken by the sample that completes a chunk can wait behind
whatever else has the CPU at that moment (sensor drivers, a planner, the receivers of the estimates).
On the benchmark machine the node shares 2 cores with the sensor publisher and the estimate
receiver; README ("Running the estimator") gives what it changed there (``bench/bench_latency.py``).

Scheduling belongs to threads, and the middleware's threads serve every node of the process, so
the raise is the process's, shared by the nodes in it: the first to activate raises every thread,
the last to deactivate puts each back as it was. Threads started meanwhile inherit it (the
executor's timer thread, made once the node spins); a thread already real-time at the priority or
above is left alone.

Kept from harming the rest of the machine:
- ``normal_thread``: a thread about to work for long runs it normally, and so does what it starts;
  no node raises it meanwhile. The hot reload loads the new model so (then the executor's thread is
  raised again) and compiles it so in a thread of its own (the C++ compiler included). The load and
  compile at configure run before the raise.
- ``Priority.check`` (each diagnostics report) gives the raise back if the raised threads used more
  than ``CPU_LIMIT`` of a core over the last ``CHECK_S`` or more: a node that cannot keep up must not
  starve the machine (Linux leaves normal tasks 5 % of a CPU that real-time work keeps busy).

Needs permission: root, CAP_SYS_NICE, or an rtprio limit for the user. Examples:
- ``/etc/security/limits.conf``: ``@realtime - rtprio 99``, then add the user to the ``realtime`` group;
- docker: ``--cap-add=SYS_NICE --ulimit rtprio=99``.
Without it, the node says so at each activation (log, and /diagnostics ``scheduling``) and runs
normally. No ROS here.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from hiss_ros.errors import HissError

CPU_LIMIT = 0.8  # of one core, the raised threads' together since the last check: more, and the raise is given back
CHECK_S = 1.0  # ... over at least this long (a check right after activating would judge its own start)
MAX_PRIORITY = 99  # SCHED_FIFO's range is 1..99 on Linux
TASKS = "/proc/self/task"
HOW = ("allow it with CAP_SYS_NICE or an rtprio limit (limits.conf: '@realtime - rtprio 99'; "
       "docker: --cap-add=SYS_NICE --ulimit rtprio=99), or set realtime_priority:=0")


def _threads() -> list[int]:
    return [int(tid) for tid in os.listdir(TASKS)]


def _each_thread(skip: set[int]) -> Iterator[int]:
    """Every thread of this process but ``skip``'s, those started meanwhile included (listed again
    until no new one appears)."""
    seen = set(skip)
    while todo := [tid for tid in _threads() if tid not in seen]:
        seen.update(todo)
        yield from todo


def _cpu_ticks(tids: list[int]) -> int:
    """User + system CPU time of these threads of this process, in clock ticks."""
    total = 0
    for tid in tids:
        try:
            with open(f"{TASKS}/{tid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()  # after the name, which may hold anything
        except OSError:  # ended
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (stat fields 14 and 15)
    return total


class _Raise:
    """The process's one raise, shared by its nodes (``Priority``); every method under ``_LOCK``."""

    def __init__(self) -> None:
        self.holders = 0  # nodes active with a priority
        self.priority = 0
        self.before: dict[int, tuple[int, int]] = {}  # thread raised -> (policy, priority) before
        self.kept: set[int] = set()  # threads real-time at the priority or above already: left alone
        self.dropped = ""  # why it was given back while nodes held it ("": it was not)
        self.mark = (0.0, 0)  # (monotonic s, CPU ticks of the raised threads) at the last check
        self.normal: set[int] = set()  # threads in ``normal_thread``: never raised

    def up(self, priority: int) -> str:
        """Raise every thread (until no new one appears); "" when done, else why not (nothing changed)."""
        if not hasattr(os, "SCHED_FIFO") or not os.path.isdir(TASKS):
            return "not supported on this system"
        self.priority, self.before, self.kept, self.dropped = priority, {}, set(), ""
        try:
            for tid in _each_thread(self.normal):
                try:
                    before = os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority
                    if before[0] in (os.SCHED_FIFO, os.SCHED_RR) and before[1] >= priority:
                        self.kept.add(tid)
                    else:
                        os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(priority))
                        self.before[tid] = before
                except ProcessLookupError:  # ended meanwhile
                    pass
        except OSError as exc:  # EPERM: no permission; EINVAL: over this system's range
            self.down()
            return exc.strerror or str(exc)
        self.mark = (time.monotonic(), self.ticks())
        return ""

    def down(self) -> None:
        """Each raised thread back as it was; one started since (it inherited the raise) to normal."""
        before, self.before = self.before, {}
        for tid in _each_thread(self.normal | self.kept):
            try:
                if tid in before:
                    os.sched_setscheduler(tid, before[tid][0], os.sched_param(before[tid][1]))
                elif (os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority) == (
                        os.SCHED_FIFO, self.priority):
                    os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
            except ProcessLookupError:
                pass

    def ticks(self) -> int:
        """CPU time of the threads under the raise (all but ``normal``'s), in clock ticks."""
        return _cpu_ticks([tid for tid in _threads() if tid not in self.normal])

    def cpu_share(self) -> float | None:
        """Cores' worth of CPU the threads under the raise used since the last call, over at least
        ``CHECK_S``; None: too soon."""
        now = time.monotonic()
        if now - self.mark[0] < CHECK_S:
            return None
        ticks = self.ticks()
        share = (ticks - self.mark[1]) / os.sysconf("SC_CLK_TCK") / (now - self.mark[0])
        self.mark = (now, ticks)
        return share


_LOCK = threading.Lock()
_RAISE = _Raise()


@contextmanager
def normal_thread() -> Iterator[None]:
    """Run the body with the calling thread under normal scheduling, raised by no node meanwhile
    (long work in a thread of an active node: what it starts runs normally too). Afterwards the
    thread's scheduling is as it was before, if the raise still holds; its CPU time meanwhile does
    not count toward ``Priority.check``."""
    tid, settable = threading.get_native_id(), hasattr(os, "sched_setscheduler")
    with _LOCK:
        _RAISE.normal.add(tid)
    before = (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority) if settable else None  # 0: this thread
    try:
        if settable:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))  # lowering needs no permission
        yield
    finally:
        with _LOCK:
            _RAISE.normal.discard(tid)
            if before is not None and _RAISE.holders and not _RAISE.dropped:
                with suppress(OSError):  # permitted, as it was a moment ago; if not, this thread stays normal
                    os.sched_setscheduler(0, before[0], os.sched_param(before[1]))
                _RAISE.mark = (time.monotonic(), _RAISE.ticks())


class Priority:
    """One node's claim on the process's raise: ``priority`` 0 leaves the scheduling alone; 1-99:
    SCHED_FIFO while active (see the module). The first node's priority is the process's."""

    def __init__(self, priority: int, info: Callable[[str], object], warn: Callable[[str], object]) -> None:
        if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= MAX_PRIORITY:
            raise HissError(f"realtime_priority:={priority!r}: expected 0 (off) or a SCHED_FIFO priority 1-99")
        self.priority, self.info, self.warn = priority, info, warn
        self.held = False  # active with a priority: part of the process's raise
        self.refused = ""  # why the last enter could not raise

    @property
    def raised(self) -> bool:
        return self.held and not _RAISE.dropped

    @property
    def status(self) -> str:
        if self.priority == 0:
            return "normal (realtime_priority:=0)"
        if self.refused:
            return f"normal (SCHED_FIFO refused: {self.refused})"
        if not self.held:
            return "normal (inactive)"
        return f"normal (SCHED_FIFO dropped: {_RAISE.dropped})" if _RAISE.dropped else f"SCHED_FIFO {_RAISE.priority}"

    def enter(self) -> None:
        """Take part in the raise (raising every thread if no other node has). A refusal is logged
        and kept in ``status``, and leaves every thread as it was."""
        if self.priority == 0 or self.held:
            return
        with _LOCK:
            self.refused = _RAISE.up(self.priority) if _RAISE.holders == 0 else ""
            if self.refused:
                self.warn(f"realtime_priority:={self.priority}: SCHED_FIFO refused ({self.refused}); the node "
                          f"runs at normal priority, its latency at the mercy of the machine's load: {HOW}")
                return
            self.held = True
            _RAISE.holders += 1
        self.info(f"realtime scheduling: {self.status} for the process's {len(_RAISE.before)} threads")

    def leave(self) -> None:
        """Leave the raise; the last node to leave puts every thread back."""
        if self.held:
            with _LOCK:
                self.held = False
                _RAISE.holders -= 1
                if _RAISE.holders == 0:
                    _RAISE.down()
                    _RAISE.dropped = ""

    def check(self) -> None:
        """Give the raise back, for every node of the process until they all leave it, when its
        threads used more than ``CPU_LIMIT`` of a core since the last check (see the module)."""
        if not self.raised:
            return
        with _LOCK:
            share = _RAISE.cpu_share()
            if share is None or share <= CPU_LIMIT:
                return
            _RAISE.down()
            _RAISE.dropped = f"{share:.0%} of a core"
        self.warn(f"realtime scheduling dropped: the node's threads used {share:.0%} of a core, which would starve "
                  "the rest of the machine (a model too slow for its input rate?); normal priority until reactivated")
