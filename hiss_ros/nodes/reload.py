"""The estimator's model swaps: hot reload of ``model_path`` and the compiled step (in the
background with step_backend:=auto, and after a reload). A mixin of
``hiss_ros.nodes.estimator.Estimator``: it uses the node's ``est``, ``messages``, ``diagnostics``,
``p``, ``intake``, ``flush``, ``_load``, ``_messages`` and ``_outputs``."""

from __future__ import annotations

import gc
import threading
from typing import Any

from rcl_interfaces.msg import SetParametersResult
from rclpy.parameter import Parameter

from hiss_ros.errors import HissError
from hiss_ros.nodes.common import freeze_heap
from hiss_ros.nodes.realtime import normal_thread
from hiss_ros.serving import StreamingEstimator


class ModelSwap:
    est: StreamingEstimator | None
    messages: Any
    intake: Any
    diagnostics: Any
    p: dict[str, Any]
    compile_status: str
    reloads: int
    _compile_lock: threading.Lock
    _outputs: dict[tuple[str, str], Any]

    def _on_parameters(self, params: list[Parameter]) -> SetParametersResult:
        """Hot reload: a new model_path is loaded, checked and warmed up, then swapped in; one that
        fails, or expects other streams, is refused and the old model keeps running."""
        for p in (p for p in params if p.name == "model_path"):
            refused = self._reload(p.value) if self.est is not None else None
            if refused is not None:
                return SetParametersResult(successful=False, reason=f"model_path refused: {refused}")
            self.p["model_path"] = p.value  # also what the next configure loads
        return SetParametersResult(successful=True)

    def _reload(self, path: str) -> str | None:
        """Swap in the model at ``path``; why not, when it cannot be (the old one keeps running)."""
        before = set(self._outputs)
        try:
            with normal_thread():  # reading and warming up a model may take seconds: not at SCHED_FIFO
                new = self._load(path)
            if not new.spec.same_streams(self.est.spec):
                raise HissError(f"{path} expects {new.spec.describe()}; the running model has "
                                f"{self.est.spec.describe()} (restart the node to change streams)")
            messages = self._messages(new)
        except Exception as exc:  # any failure of a new model must leave the old one running
            for key in set(self._outputs) - before:  # ... and no publisher of its outputs behind
                self.destroy_lifecycle_publisher(self._outputs.pop(key))
            return str(exc) or type(exc).__name__
        self.flush()  # what the old model's pipeline would have taken (and counted)
        new.counters.update(self.est.counters)
        self.est, self.messages = new, messages
        if self.intake is not None:
            self.intake.retarget(new.pipeline)
        self.diagnostics.retarget(new.spec)
        if getattr(self, "_stamps", None) is not None and new.spec.input_stamps:  # known now, if not before
            self._stamps.trained = new.spec.input_stamps
        gc.unfreeze()  # the old model may sit in reference cycles: let the collector free it
        freeze_heap()
        if self.p["step_backend"] in ("auto", "compile"):
            self._compile_in_background(new)
        self.reloads += 1
        self.get_logger().info(f"model swapped in: {path}")
        return None

    def _compile(self, est: StreamingEstimator) -> str:
        status = est.compile(self.get_logger().info)
        if status.startswith("in use"):
            self.get_logger().info(f"compiled step {status}")
            return "in use"
        say = self.get_logger().error if self.p["step_backend"] == "compile" else self.get_logger().warn
        say(f"step_backend:={self.p['step_backend']}: compiled step {status}; the eager step stays")
        return status

    def _compile_in_background(self, est: StreamingEstimator) -> None:
        """The model estimates eagerly while a thread compiles its step, or loads it from the cache
        (step_backend:=auto; and after a hot reload with auto or compile). Tracing and code generation hold
        the GIL for up to ~0.5 s at a time: estimates are late meanwhile, the first time only."""
        with self._compile_lock:
            self.compile_status = "compiling"

        def work() -> None:
            with normal_thread():  # made by an active node's thread: ~20 s of compiling must not hold SCHED_FIFO
                status = self._compile(est)
                with self._compile_lock:
                    if est is self.est:  # not swapped out by another reload meanwhile
                        self.compile_status = status
                gc.unfreeze()  # what the compiler left, and a model swapped out meanwhile, go now, once
                freeze_heap()

        threading.Thread(target=work, name="hiss_compile", daemon=True).start()
