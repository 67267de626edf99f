"""How the estimator receives its inputs: ``intake:=paced`` (default) or ``intake:=callbacks``.

Both hand each sample to ``process(i, data, steady_ns) -> stamp`` (the node's: input ``i``, its
serialized bytes, its receipt on the steady clock; the stamp it was pushed with, or None), in
arrival order, and both ``flush`` (process what has arrived, before anything reads or resets the
stream) and ``close``.

``PacedIntake`` takes the messages in batches, once per chunk (``hiss_ros.nodes.pacing``): its
subscriptions are rcl subscriptions of the node that no executor sees (rclpy builds them with
``Node.create_subscription`` the same way, then hands them to the executors, which would wake the
node for each message), read with ``take_message`` when a steady timer fires and waited on with a
wait set of their own; the receipt time is the middleware's (``received_timestamp``). Topic names
resolve (namespace, remapping) as for any subscription of the node, and the middleware's
message-lost events are counted as before (polled at each take: handed to the executor as
waitables, they kept rclpy's single-threaded executor busy at 95 % of a core). That uses rclpy's implementation module
(``rclpy.impl.implementation_singleton``, as ``rclpy.wait_for_message`` does): where it does not
have what this needs, ``make_intake`` falls back to callbacks and says so.

``CallbackIntake`` subscribes with a callback per message (raw), holding back samples that cannot
complete a chunk (``hiss_ros.nodes.deferral``).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from typing import Any

from rclpy.clock import Clock, ClockType
from rclpy.event_handler import QoSSubscriptionEventType, SubscriptionEventCallbacks, UnsupportedEventTypeError
from rclpy.qos import QoSProfile

from hiss_ros.nodes.deferral import Deferral
from hiss_ros.nodes.pacing import Pacer
from hiss_ros.pipeline import Pipeline

LOST = QoSSubscriptionEventType.RCL_SUBSCRIPTION_MESSAGE_LOST
Process = Callable[[int, bytes, int], "int | None"]
INTAKES = ("paced", "callbacks")


class Intake:
    """What both intakes share: per input, a subscription (``subs``, emptied by ``close``)."""

    subs: list[Any]

    def publishers(self) -> list[int]:
        """Per input, the publishers its subscription is matched with (diagnostics)."""
        return [sub.get_publisher_count() for sub in self.subs]

    def defer_ns(self, now_ns: int, length_ns: int) -> int:
        """How long other work of ``length_ns`` should wait to keep clear of the estimates
        (``Pacer.defer_ns``); 0: no schedule to keep clear of."""
        return 0


class PacedIntake(Intake):
    mode = "paced"

    def __init__(self, node: Any, topics: list[str], classes: list[type], qos: QoSProfile, lost: list[int],
                 process: Process, pacer: Pacer) -> None:
        from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy
        from rclpy.type_support import check_is_valid_msg_type

        self.node, self.classes, self.process, self.pacer = node, classes, process, pacer
        self.batched = 0  # samples taken with others (diagnostics: samples_batched)
        self.lost = lost
        self.subs: list[Any] = []
        self.events: list[Any] = []  # per input, its message-lost event (None: not supported by this rmw)
        try:
            for topic, cls in zip(topics, classes, strict=True):
                check_is_valid_msg_type(cls)  # loads its type support
                with node.handle:
                    sub = _rclpy.Subscription(node.handle, cls, topic, qos.get_c_qos_profile())
                self.subs.append(sub)
                try:
                    with sub:
                        self.events.append(_rclpy.EventHandle(sub, LOST))
                except UnsupportedEventTypeError:
                    self.events.append(None)
                    lost[len(self.events) - 1] = -1
            self.wait_set = _rclpy.WaitSet(1, 0, 0, 0, 0, 0, node.context.handle)
        except Exception:
            self.close(process_pending=False)
            raise
        steady = Clock(clock_type=ClockType.STEADY_TIME)  # sim time or not: the middleware's messages come in real time
        self.timer = node.create_timer(pacer.period_ns / 1e9, self._on_timer, clock=steady)

    def take(self) -> list[tuple[int, int, bytes]]:
        """Everything that has arrived: (steady receipt ns, input, bytes), in arrival order."""
        now, wall = time.monotonic_ns(), time.time_ns()
        per_input = []
        for i, sub in enumerate(self.subs):
            got, cls = [], self.classes[i]
            while (taken := sub.take_message(cls, True)) is not None:
                received = taken[1].get("received_timestamp") or 0  # 0: an rmw that does not say
                got.append((now - (wall - received) if received else now, i, taken[0]))
            per_input.append(got)
        return list(heapq.merge(*per_input, key=lambda item: item[0]))  # each input's own order kept

    def flush(self) -> None:
        for i, event in enumerate(self.events):  # the middleware's count of messages it lost, polled
            if event is not None and (status := event.take_event()) is not None:
                self.lost[i] += status.total_count_change
        items = self.take()
        if len(items) > 1:
            self.batched += len(items)
        pacer = self.pacer
        for steady, i, data in items:
            stamp = self.process(i, data, steady)
            if i == 0 and stamp is not None:
                pacer.seen(stamp, steady)

    def _wait(self, timeout_ns: int) -> bool:
        """Wait for the clock stream (only its samples complete chunks); whether one came."""
        ws = self.wait_set
        ws.clear_entities()
        ws.add_subscription(self.subs[0])
        ws.wait(max(timeout_ns, 0))
        return bool(ws.get_ready_entities("subscription"))

    def _on_timer(self) -> None:
        if self.timer is None:  # closed: rclpy's EventsExecutor still runs a timer event queued before the destroy
            return
        try:
            self._pace()
        except KeyboardInterrupt:  # Ctrl-C, while waiting for input: the executor would log it and go on
            self.node.context.try_shutdown()  # ... so end as Ctrl-C ends the node elsewhere
        except Exception:
            if self.node.context.ok():
                raise
            # shut down meanwhile (SIGTERM: the context goes first), which failed a wait or a publish

    def _pace(self) -> None:
        """Take what has come; while the next chunk's last sample is imminent, wait for it; then
        set the timer for the next chunk, or, with none to expect (no clock yet, a late or silent
        sensor), wait for the clock stream a while and let the executor run before the next try."""
        pacer, began = self.pacer, time.monotonic_ns()
        due = pacer.pipeline.next_chunk_ns()
        self.flush()
        now = time.monotonic_ns()
        if pacer.pipeline.next_chunk_ns() == due:  # no model step in it: what taking early has to fit in
            pacer.worked(now - began)
        while (until := pacer.wait_until(now)) is not None:
            if not self._wait(until - now):
                now = time.monotonic_ns()
                break
            self.flush()
            now = time.monotonic_ns()
        wake = pacer.next_wake(now)
        if wake is None:  # off schedule: wait for the clock stream a while, then give the executor a turn
            if self._wait(pacer.backoff_ns()):
                self.flush()
            now = time.monotonic_ns()
            wake = pacer.next_wake(now) or now
        self.timer.timer_period_ns = max(wake - now, 100_000)
        self.timer.reset()

    def retarget(self, pipeline: Pipeline) -> None:
        self.pacer.pipeline = pipeline

    def defer_ns(self, now_ns: int, length_ns: int) -> int:
        return self.pacer.defer_ns(now_ns, length_ns)

    def close(self, process_pending: bool = True) -> None:
        if process_pending:
            self.flush()
        if getattr(self, "timer", None) is not None:
            self.node.destroy_timer(self.timer)
            self.timer = None
        for handle in [*self.events, *self.subs]:
            if handle is not None:
                handle.destroy_when_not_in_use()
        self.events, self.subs = [], []


class CallbackIntake(Intake):
    mode = "callbacks"

    def __init__(self, node: Any, topics: list[str], classes: list[type], qos: QoSProfile, lost: list[int],
                 process: Process, deferral: Deferral, stamp_of: Callable[[int, bytes], int | None]) -> None:
        self.node, self.process, self.deferral, self.stamp_of = node, process, deferral, stamp_of
        self.subs = [self._subscribe(i, t, c, qos, lost) for i, (t, c) in enumerate(zip(topics, classes, strict=True))]

    @property
    def batched(self) -> int:
        return self.deferral.batched

    def _subscribe(self, i: int, topic: str, cls: type, qos: QoSProfile, lost: list[int]) -> Any:
        def count(info: Any) -> None:
            lost[i] += info.total_count_change

        args = (cls, topic, lambda data: self._on_sample(i, data), qos)
        try:
            return self.node.create_subscription(*args, raw=True, event_callbacks=SubscriptionEventCallbacks(
                message_lost=count, use_default_callbacks=False))
        except UnsupportedEventTypeError:
            lost[i] = -1
            return self.node.create_subscription(*args, raw=True)

    def _on_sample(self, i: int, data: bytes) -> None:
        """Held (``Deferral``) while no chunk can be due (``stamp_of``: the sample's stamp where it
        may wait, else None); processed in arrival order."""
        if not self.subs:  # closed: rclpy's EventsExecutor still runs a message queued before the destroy
            return
        steady = time.monotonic_ns()
        for item in self.deferral.offer(i, self.stamp_of(i, data), steady, (i, data, steady)):
            self.process(*item)

    def flush(self) -> None:
        for item in self.deferral.flush():
            self.process(*item)

    def retarget(self, pipeline: Pipeline) -> None:
        self.deferral.pipeline = pipeline

    def close(self, process_pending: bool = True) -> None:
        for sub in self.subs:
            self.node.destroy_subscription(sub)
        if process_pending:
            self.flush()
        self.subs = []


def make_intake(mode: str, node: Any, topics: list[str], classes: list[type], qos: QoSProfile, lost: list[int],
                process: Process, pipeline: Pipeline, rate_hz: float,
                stamp_of: Callable[[int, bytes], int | None]) -> PacedIntake | CallbackIntake:
    """The intake ``mode`` asks for; callbacks where this rclpy cannot pace (said once)."""
    period_ns = int(1e9 / rate_hz)
    if mode == "paced":
        try:
            return PacedIntake(node, topics, classes, qos, lost, process, Pacer(pipeline, period_ns))
        except (ImportError, AttributeError, TypeError) as exc:
            node.get_logger().warn(f"intake:=paced is not available with this rclpy ({type(exc).__name__}: {exc}): "
                                   "taking each message as it arrives (intake:=callbacks)")
    return CallbackIntake(node, topics, classes, qos, lost, process, Deferral(pipeline, margin_ns=2 * period_ns),
                          stamp_of)
