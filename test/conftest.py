"""Shared fixtures: small configs for every registered layer kind and model kind."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import pytest
import torch

from hiss_ros.models import LAYER_KINDS
from hiss_ros.models.aot import CACHE_ENV

CHUNK = 10

# test_cuda.py compares every model on CUDA with the CPU: collected where torch sees a GPU (or a
# device is named, as bench/gpu_check.py's dry run does), not as 69 skips on every CPU run.
collect_ignore = [] if torch.cuda.is_available() or os.environ.get("HISS_TEST_DEVICE") else ["test_cuda.py"]

# Compiled steps (step_backend compile, hiss_ros.models.aot) go to a cache of this run's own, not the
# user's: the nodes the tests start inherit it. Removed when the run ends, unless it was given in
# HISS_TEST_AOT_CACHE (bench/gpu_check.py does, so that its node part finds what its tests compiled).
_GIVEN = os.environ.get("HISS_TEST_AOT_CACHE")
os.environ[CACHE_ENV] = _CACHE = _GIVEN or tempfile.mkdtemp(prefix="hiss_ros_cache-")


def pytest_sessionfinish(session, exitstatus):
    if not _GIVEN:
        shutil.rmtree(_CACHE, ignore_errors=True)

# DDS tests of this run talk in a domain of their own (valid domains 1..101 here) and discover
# peers on this host only, so parallel test runs do not hear each other.
ROS_ENV = {"ROS_DOMAIN_ID": str(1 + os.getpid() % 101), "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST"}


def stack(kind: str, d_model: int = 16, n_layers: int = 2) -> dict:
    # A short attention window so the tests cover the window actually sliding.
    return {"kind": kind, "d_model": d_model, "n_layers": n_layers, "context": 7}


def hiss_config(low: str, high: str, deltas: bool = True) -> dict:
    return {"kind": "hiss", "input_dim": 6, "output_dim": 3, "chunk": CHUNK, "deltas": deltas,
            "low": stack(low), "high": stack(high)}


def flat_config(kind: str, deltas: bool = True) -> dict:
    return {"kind": "flat", "input_dim": 6, "output_dim": 3, "chunk": CHUNK, "deltas": deltas,
            "layers": stack(kind)}


# Every model the library can build: HiSS over every (low, high) pair, and every flat baseline.
MODEL_CONFIGS = {f"hiss-{lo}-{hi}": hiss_config(lo, hi) for lo in LAYER_KINDS for hi in LAYER_KINDS}
MODEL_CONFIGS.update({f"flat-{k}": flat_config(k) for k in LAYER_KINDS})
# Training-recipe options: chunk features averaged over the chunk, delta channels rescaled.
MODEL_CONFIGS["hiss-s4d-mamba-mean"] = {**hiss_config("s4d", "mamba"), "pool": "mean"}
MODEL_CONFIGS["hiss-s4d-mamba-scaled"] = {**hiss_config("s4d", "mamba"), "scale_deltas": True}
MODEL_CONFIGS["flat-lstm-scaled"] = {**flat_config("lstm"), "scale_deltas": True}
# The variance head (output [mean | log-variance]): on the fast step's HiSS, on a HiSS outside it,
# and on a flat model.
MODEL_CONFIGS["hiss-s4d-mamba-variance"] = {**hiss_config("s4d", "mamba"), "variance": True}
MODEL_CONFIGS["hiss-lstm-s4d-variance"] = {**hiss_config("lstm", "s4d"), "variance": True}
MODEL_CONFIGS["flat-transformer-variance"] = {**flat_config("transformer"), "variance": True}


@pytest.fixture(params=sorted(MODEL_CONFIGS), ids=sorted(MODEL_CONFIGS))
def model_config(request) -> dict:
    return MODEL_CONFIGS[request.param]


# The test tensors are tiny: one thread is faster and immune to oversubscription on CI.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class Listener:
    """A node of the test's own (its own rclpy context) and an executor that spins it."""

    def __init__(self, name: str) -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        self.ctx = rclpy.Context()
        rclpy.init(context=self.ctx)
        self.node = rclpy.create_node(name, context=self.ctx)
        self.executor = SingleThreadedExecutor(context=self.ctx)
        self.executor.add_node(self.node)

    def spin_until(self, condition, timeout_s: float) -> bool:
        """Process callbacks until ``condition()`` holds or ``timeout_s`` passes; returns it."""
        deadline = time.monotonic() + timeout_s
        while not condition() and time.monotonic() < deadline:
            self.executor.spin_once(timeout_sec=0.05)
        return condition()

    def close(self) -> None:
        import rclpy

        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.shutdown(context=self.ctx)
