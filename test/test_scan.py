"""The chunked parallel selective scan (the CUDA path without mamba-ssm) against the sequential one,
and which scan Mamba dispatches to. All on the CPU: the arithmetic is the same on any device."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hiss_ros.models import Stack, StackConfig
from hiss_ros.models import mamba as mamba_module
from hiss_ros.models.parallel_scan import chunked_selective_scan, linear_scan
from hiss_ros.models.scan import scan_impl, selective_scan

# Relative to the largest entry of the reference. float64 agrees to rounding (~1e-15 seen); float32
# sums in a different order (doubling steps instead of one step at a time): ~2e-6 seen at L = 2000.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5}


def scan_inputs(B: int, L: int, E: int, N: int, dtype: torch.dtype, delta_shift: float = -1.0,
                seed: int = 0) -> list[torch.Tensor]:
    """u, delta (> 0), A (< 0), B, C as Mamba makes them, each requiring grad."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, L, E, generator=g, dtype=dtype)
    delta = F.softplus(torch.randn(B, L, E, generator=g, dtype=dtype) + delta_shift)
    A = -torch.exp(torch.randn(E, N, generator=g, dtype=dtype))
    Bm = torch.randn(B, L, N, generator=g, dtype=dtype)
    C = torch.randn(B, L, N, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (u, delta, A, Bm, C)]


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    scale = expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("B, L, E, N, chunk", [
    (2, 1, 3, 4, 16),  # a single step
    (2, 37, 5, 4, 16),  # L not a multiple of the chunk: a padded last chunk
    (3, 100, 8, 16, 8),  # three levels of chunks
    (2, 64, 6, 5, 64),  # exactly one chunk
    (1, 300, 4, 16, 7),  # a chunk length that is not a power of two
])
def test_chunked_scan_matches_sequential_scan(dtype, B, L, E, N, chunk):
    inputs = scan_inputs(B, L, E, N, dtype)
    gy = torch.randn(B, L, E, dtype=dtype, generator=torch.Generator().manual_seed(1))
    expected = selective_scan(*inputs)
    actual = chunked_selective_scan(*inputs, chunk=chunk)
    assert_close_relative(actual, expected, TOLERANCE[dtype], "y")
    grads_expected = torch.autograd.grad(expected, inputs, gy)
    grads_actual = torch.autograd.grad(actual, inputs, gy)
    for name, a, e in zip(("u", "delta", "A", "B", "C"), grads_actual, grads_expected, strict=True):
        assert_close_relative(a, e, TOLERANCE[dtype], f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_long_sequence_with_strong_decay_stays_finite(dtype):
    """L = 2000 with delta*|A| up to ~100 a step: the log-decay summed over the sequence is ~-1e5,
    whose exp(-S) (a naive log-space cumsum) overflows any float; the chunked scan only takes exp
    of within-chunk differences <= 0."""
    inputs = scan_inputs(1, 2000, 4, 16, dtype, delta_shift=2.0)
    total = (inputs[1].detach().unsqueeze(-1) * inputs[2].detach()).sum(1)  # (B, E, N) log-decay of all L
    assert total.min() < -1e4
    y = chunked_selective_scan(*inputs)
    gy = torch.ones_like(y)
    grads = torch.autograd.grad(y, inputs, gy)
    assert all(torch.isfinite(t).all() for t in (y, *grads))
    assert_close_relative(y, selective_scan(*inputs), TOLERANCE[dtype], "y")
    for name, a, e in zip("u delta A B C".split(), grads, torch.autograd.grad(selective_scan(*inputs), inputs, gy),
                          strict=True):
        assert_close_relative(a, e, TOLERANCE[dtype], f"d{name}")


def test_linear_scan_is_the_recurrence():
    g = torch.Generator().manual_seed(3)
    log_decay = -torch.rand(2, 45, 3, generator=g, dtype=torch.float64)
    x = torch.randn(2, 45, 3, generator=g, dtype=torch.float64)
    h, expected = torch.zeros(2, 3, dtype=torch.float64), []
    for t in range(45):
        h = torch.exp(log_decay[:, t]) * h + x[:, t]
        expected.append(h)
    torch.testing.assert_close(linear_scan(log_decay, x, chunk=4), torch.stack(expected, 1), rtol=1e-12, atol=1e-12)


def test_chunk_of_one_is_refused():
    with pytest.raises(ValueError, match="chunk = 1, expected at least 2"):
        chunked_selective_scan(*scan_inputs(1, 5, 2, 2, torch.float64), chunk=1)


def test_dispatch_picks_the_chunked_scan_on_cuda():
    # torch.device("cuda") exists as a value without a GPU: the choice is testable here.
    assert scan_impl(torch.device("cuda")) is chunked_selective_scan
    assert scan_impl(torch.device("cuda", 0)) is chunked_selective_scan
    assert scan_impl(torch.device("cpu")) is selective_scan


def test_mamba_stack_through_the_cuda_scan_matches_the_cpu_scan(monkeypatch):
    """A Mamba stack made to dispatch as on CUDA (the parallel scan) gives the CPU outputs and
    gradients: the only arithmetic the CUDA path changes, checked without a GPU."""
    torch.manual_seed(0)
    stack = Stack(5, StackConfig(kind="mamba", d_model=16, n_layers=2, dropout=0.0)).double()
    x = torch.randn(3, 53, 5, dtype=torch.float64)

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        stack.zero_grad()
        y = stack(x)
        y.square().mean().backward()
        return y.detach(), [p.grad.clone() for p in stack.parameters()]

    y_cpu, grads_cpu = run()
    used = []
    monkeypatch.setattr(mamba_module, "scan_impl", lambda device: used.append(device) or chunked_selective_scan)
    y_cuda, grads_cuda = run()
    assert len(used) == 2  # one scan per layer, through the dispatch
    torch.testing.assert_close(y_cuda, y_cpu, rtol=1e-10, atol=1e-12)
    for a, e in zip(grads_cuda, grads_cpu, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)
