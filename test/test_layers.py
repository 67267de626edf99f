"""Layer-level checks: the fast scan against the definition, S4D modes, Mamba's parameter layout."""

from __future__ import annotations

import pytest
import torch

from hiss_ros.models import StackConfig
from hiss_ros.models.linear import linear
from hiss_ros.models.mamba import Mamba
from hiss_ros.models.s4d import S4D
from hiss_ros.models.scan import selective_scan


def scan_by_definition(u, delta, A, Bm, C):
    """h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t ; y_t = <C_t, h_t>, one step at a time."""
    batch, length, inner = u.shape
    out = []
    for b in range(batch):
        h = torch.zeros(inner, A.shape[1], dtype=u.dtype)  # (E, N)
        ys = []
        for t in range(length):
            h = torch.exp(delta[b, t, :, None] * A) * h + delta[b, t, :, None] * Bm[b, t] * u[b, t, :, None]
            ys.append((h * C[b, t]).sum(-1))
        out.append(torch.stack(ys))
    return torch.stack(out)


def scan_inputs(batch=2, length=37, inner=5, state=4, requires_grad=False):
    g = torch.Generator().manual_seed(3)
    kw = {"dtype": torch.float64}
    t = [
        torch.randn(batch, length, inner, generator=g, **kw),
        torch.rand(batch, length, inner, generator=g, **kw) * 0.5 + 0.01,
        -torch.rand(inner, state, generator=g, **kw) * 3 - 0.1,
        torch.randn(batch, length, state, generator=g, **kw),
        torch.randn(batch, length, state, generator=g, **kw),
    ]
    return [x.requires_grad_(requires_grad) for x in t]


@pytest.mark.parametrize("block", [1, 5, 16, 64])
def test_selective_scan_equals_definition(block):
    args = scan_inputs()
    torch.testing.assert_close(selective_scan(*args, block=block), scan_by_definition(*args), atol=1e-12, rtol=0)


@pytest.mark.parametrize("block", [4, 7, 64])
def test_selective_scan_backward_matches_autograd_of_definition(block):
    args = scan_inputs(length=23, requires_grad=True)
    gy = torch.randn(2, 23, 5, dtype=torch.float64)
    ours = torch.autograd.grad(selective_scan(*args, block=block), args, gy)
    ref = torch.autograd.grad(scan_by_definition(*args), args, gy)
    for name, a, b in zip(["u", "delta", "A", "B", "C"], ours, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0, msg=f"gradient of {name} differs")


def test_selective_scan_gradcheck():
    assert torch.autograd.gradcheck(lambda *a: selective_scan(*a, block=3), scan_inputs(1, 8, 3, 2, True))


@pytest.mark.parametrize("length", [10, 64, 65, 300])  # Toeplitz path up to 64 samples, FFT above
def test_s4d_convolution_equals_recurrence(length):
    layer = S4D(StackConfig(kind="s4d", d_model=8, n_layers=1, d_state=6)).double()
    u = torch.randn(2, length, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(u), steps(layer, u), atol=1e-9, rtol=0)


def test_s4d_chunk_operator_paths_agree(monkeypatch):
    """Short sequences use a broadcast product for small batches and einsum for large ones."""
    import hiss_ros.models.s4d as s4d

    layer = S4D(StackConfig(kind="s4d", d_model=8, n_layers=1)).double()
    u = torch.randn(3, 10, 8, dtype=torch.float64)
    small = layer(u)
    monkeypatch.setattr(s4d, "_BROADCAST_MAX", 0)
    torch.testing.assert_close(layer(u), small, atol=1e-12, rtol=0)


def test_s4d_kernel_is_the_impulse_response():
    layer = S4D(StackConfig(kind="s4d", d_model=3, n_layers=1, d_state=4)).double()
    impulse = torch.zeros(1, 50, 3, dtype=torch.float64)
    impulse[:, 0] = 1.0
    response = layer._ssm(impulse)[0].T  # (H, L), includes D at lag 0
    expected = layer.kernel(50).detach().clone()
    expected[:, 0] += layer.D.detach()
    torch.testing.assert_close(response, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind, param", [("s4d", "log_dt"), ("s4d", "D"), ("mamba", "A_log")])
def test_streaming_caches_follow_weight_updates(kind, param):
    """Tensors cached for streaming are recomputed after an in-place update or a dtype change."""
    layer = {"s4d": S4D, "mamba": Mamba}[kind](StackConfig(kind=kind, d_model=4, n_layers=1))
    u = torch.randn(1, 10, 4)
    with torch.no_grad():
        before = [layer(u), steps(layer, u)]
        getattr(layer, param).add_(0.5)  # what an optimizer step or a checkpoint load does
        after = [layer(u), steps(layer, u)]
    fresh = [layer(u).detach(), steps(layer, u).detach()]  # grad enabled: nothing cached
    for b, a, f in zip(before, after, fresh, strict=True):
        assert (b - a).abs().max() > 1e-6
        torch.testing.assert_close(a, f, atol=1e-6, rtol=0)
    layer.double()
    with torch.no_grad():
        assert layer(u.double()).dtype == torch.float64
        assert steps(layer, u.double()).dtype == torch.float64


def steps(layer, u):
    """The layer's recurrent step unrolled over u (B, L, H)."""
    state = layer.init_state(u.shape[0], u.device, u.dtype)
    out = []
    for t in range(u.shape[1]):
        y, state = layer.step(u[:, t], state)
        out.append(y)
    return torch.stack(out, 1)


# mamba_ssm.modules.mamba_simple.Mamba(d_model=D, d_state=N, d_conv=W, expand=X): parameter names
# and shapes, with E = X*D and R = ceil(D/16), from that class's constructor.
def mamba_ssm_layout(d, n=16, w=4, x=2):
    e, r = x * d, -(-d // 16)
    return {
        "in_proj.weight": (2 * e, d), "conv1d.weight": (e, 1, w), "conv1d.bias": (e,),
        "x_proj.weight": (r + 2 * n, e), "dt_proj.weight": (e, r), "dt_proj.bias": (e,),
        "A_log": (e, n), "D": (e,), "out_proj.weight": (d, e),
    }


class MambaSsmLayout(torch.nn.Module):
    """A module with exactly mamba_ssm's parameter names and shapes (mamba_ssm needs CUDA)."""

    def __init__(self, layout):
        super().__init__()
        for name, shape in layout.items():
            mod = self
            *path, leaf = name.split(".")
            for p in path:
                if not hasattr(mod, p):
                    mod.add_module(p, torch.nn.Module())
                mod = getattr(mod, p)
            mod.register_parameter(leaf, torch.nn.Parameter(torch.randn(shape)))


@pytest.mark.parametrize("d_model", [16, 40, 128])
def test_mamba_state_dict_moves_to_and_from_mamba_ssm_layout(d_model):
    ours = Mamba(StackConfig(kind="mamba", d_model=d_model, n_layers=1))
    layout = mamba_ssm_layout(d_model)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == layout
    theirs = MambaSsmLayout(layout)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(theirs.state_dict(), strict=True)


def test_mamba_matches_mambapy_with_copied_weights():
    """An independent pure-PyTorch Mamba (PyPI mambapy, same layout) gives the same outputs."""
    mambapy = pytest.importorskip("mambapy.mamba")  # in the "test" extra, so present under `make test`
    ours = Mamba(StackConfig(kind="mamba", d_model=32, n_layers=1)).double()
    peer = mambapy.MambaBlock(mambapy.MambaConfig(d_model=32, n_layers=1)).double()
    peer.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 100, 32, dtype=torch.float64)
    torch.testing.assert_close(ours(x), peer(x), atol=1e-10, rtol=0)


def test_linear_keeps_its_transposed_storage():
    """``linear`` is an nn.Linear (same values, names, shapes) whose weight.t() is contiguous, the
    layout its fast batch-1 product depends on, through conversion, loading and optimizer steps."""
    torch.manual_seed(0)
    ref = torch.nn.Linear(6, 4)
    torch.manual_seed(0)
    layer = linear(6, 4)
    assert {k: v.shape for k, v in layer.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    torch.testing.assert_close(layer.weight, ref.weight, atol=0, rtol=0)
    layer.double()
    layer.load_state_dict(ref.double().state_dict())
    opt = torch.optim.AdamW(layer.parameters())
    layer(torch.randn(3, 6, dtype=torch.float64)).sum().backward()
    opt.step()
    assert layer.weight.t().is_contiguous() and layer.weight.dtype == torch.float64
