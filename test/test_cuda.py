"""Every model kind on CUDA against the same model on the CPU, and streaming against offline on CUDA.

Skipped without CUDA. The device under test is ``HISS_TEST_DEVICE`` (default ``cuda``);
``bench/gpu_check.py --dry-run`` sets it to ``cpu`` so that these comparisons run (trivially
equal, but through the same code) on a machine without a GPU.

float32 throughout, with TF32 off: TF32 matmuls and convolutions round to 10 mantissa bits (~1e-3),
which would hide real differences at the 1e-4 tolerance.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator

import pytest
import torch
from conftest import CHUNK

from hiss_ros.models import ChunkedModel, StepRunner, build_model

DEVICE = os.environ.get("HISS_TEST_DEVICE", "cuda")
TOLERANCE = 1e-4
K = 7  # chunks per test sequence

pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(autouse=True)
def _no_tf32() -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def on_both(config: dict) -> tuple[ChunkedModel, ChunkedModel, torch.Tensor]:
    """The model in eval mode on the CPU, an exact copy on DEVICE, and an input (2, K*chunk, I)."""
    cpu = build_model(config).eval()
    x = torch.randn(2, K * CHUNK, config["input_dim"])
    return cpu, copy.deepcopy(cpu).to(DEVICE), x


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Within TOLERANCE, absolute and relative to the tensor's largest entry."""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.cpu(), expected, atol=TOLERANCE * scale, rtol=TOLERANCE, msg=what)


def test_forward_on_device_matches_cpu(model_config):
    cpu, dev, x = on_both(model_config)
    with torch.no_grad():
        assert_close(dev(x.to(DEVICE)), cpu(x), "forward")


def without_dropout(config: dict) -> dict:
    return {k: {**v, "dropout": 0.0} if k in ("low", "high", "layers") else v for k, v in config.items()}


def test_gradients_on_device_match_cpu(model_config):
    # Training mode (cuDNN's LSTM has no backward in eval mode), without dropout (whose random
    # masks differ between devices).
    cpu, dev, x = on_both(without_dropout(model_config))
    cpu.train()
    dev.train()
    for model, inp in ((cpu, x), (dev, x.to(DEVICE))):
        model(inp).square().mean().backward()
    for (name, p_cpu), p_dev in zip(cpu.named_parameters(), dev.parameters(), strict=True):
        assert_close(p_dev.grad, p_cpu.grad, f"gradient of {name}")


def test_streaming_matches_offline_on_device(model_config):
    _, dev, x = on_both(model_config)
    x = x.to(DEVICE)
    with torch.inference_mode():
        offline = dev(x)
        for step in (dev.step_chunk, StepRunner(dev).step):  # the module path, the served (fast) step
            state = dev.init_state(x.shape[0])
            for k in range(K):
                y, state = step(x[:, k * CHUNK:(k + 1) * CHUNK], state)
                assert y.device == x.device
                assert_close(y, offline[:, k].cpu(), f"chunk {k}")


@pytest.mark.parametrize("backend", ["compile", "graph"], ids=["compiled", "graph"])
def test_fast_step_on_device_matches_the_cpu(backend):
    """The shipped contact model's step on DEVICE, compiled ahead (AOTInductor, the node's default) or
    replayed from a CUDA graph (``graph``), against the CPU's eager step: 30 chunks with the state carried,
    a reset to a fresh state halfway (copied into a graph), then new weights (read with no new compile;
    a graph captured again). Each output stays its own tensor."""
    if backend == "graph" and torch.device(DEVICE).type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device (this run's device is the CPU)")
    from hiss_ros.serving import load_model

    cpu = load_model("contact").model.eval()
    dev = copy.deepcopy(cpu).to(DEVICE)
    eager, fast = StepRunner(cpu), StepRunner(dev, backend)
    chunk, width = cpu.config.chunk, cpu.config.input_dim
    x = torch.randn(1, 30 * chunk, width, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        s_cpu, s_dev = cpu.init_state(1), dev.init_state(1)
        outputs = []
        for k in range(30):
            if k == 15:  # a reset: a state not a graph's own
                s_cpu, s_dev = cpu.init_state(1), dev.init_state(1)
            if k == 20:  # new weights, on both
                for model in (cpu, dev):
                    next(model.parameters()).add_(0.01)
            y_cpu, s_cpu = eager.step(x[:, k * chunk:(k + 1) * chunk], s_cpu)
            y_dev, s_dev = fast.step(x[:, k * chunk:(k + 1) * chunk].to(DEVICE), s_dev)
            assert y_dev.device.type == torch.device(DEVICE).type
            assert_close(y_dev, y_cpu, f"chunk {k}")
            outputs.append((y_dev, y_cpu))
        for k, (y_dev, y_cpu) in enumerate(outputs):  # not overwritten by the steps since
            assert_close(y_dev, y_cpu, f"chunk {k}, kept")
