"""The streaming contract, causality, gradients, shapes and config validation, for every model."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import CHUNK, MODEL_CONFIGS, flat_config, hiss_config

from hiss_ros.errors import ConfigError
from hiss_ros.models import FlatConfig, HiSSConfig, StackConfig, StepRunner, build_model, model_config_from_dict
from hiss_ros.models.aot import CACHE_ENV

N_CHUNKS = 50


def stream(model, x: torch.Tensor, step=None) -> torch.Tensor:
    """Outputs of ``step`` (model.step_chunk unless given) unrolled chunk by chunk: (B, K, O)."""
    step = step or model.step_chunk
    state = model.init_state(batch_size=x.shape[0])
    out = []
    for k in range(x.shape[1] // CHUNK):
        y, state = step(x[:, k * CHUNK : (k + 1) * CHUNK], state)
        out.append(y)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_streaming_equals_offline(model_config, dtype, tol):
    model = build_model(model_config).to(dtype).eval()
    x = torch.randn(2, N_CHUNKS * CHUNK, 6, dtype=dtype)
    with torch.no_grad():
        offline = model(x)
        online = stream(model, x)
        served = stream(model, x, StepRunner(model).step)  # the fast step where it covers the model
    assert offline.shape == (2, N_CHUNKS, 3 * (2 if model.config.variance else 1))
    assert (online - offline).abs().max().item() < tol
    assert (served - offline).abs().max().item() < tol


def test_causal(model_config):
    """Perturbing inputs after chunk k leaves outputs 0..k unchanged (and does change later ones)."""
    model = build_model(model_config).double().eval()
    x = torch.randn(1, 20 * CHUNK, 6, dtype=torch.float64)
    k = 11
    x2 = x.clone()
    x2[:, (k + 1) * CHUNK :] += 10 * torch.randn_like(x2[:, (k + 1) * CHUNK :])
    with torch.no_grad():
        y, y2 = model(x), model(x2)
    assert (y[:, : k + 1] - y2[:, : k + 1]).abs().max().item() < 1e-12
    assert (y[:, k + 1 :] - y2[:, k + 1 :]).abs().max().item() > 1e-6


def test_output_reads_last_sample_of_chunk(model_config):
    """Output k changes when the last sample of chunk k changes (it is read there, not earlier)."""
    model = build_model(model_config).double().eval()
    x = torch.randn(1, 4 * CHUNK, 6, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 2 * CHUNK - 1] += 5.0
    with torch.no_grad():
        y, y2 = model(x), model(x2)
    assert (y[:, 0] - y2[:, 0]).abs().max().item() < 1e-12
    assert (y[:, 1] - y2[:, 1]).abs().max().item() > 1e-6


def test_gradients_reach_every_parameter(model_config):
    model = build_model(model_config).train()
    x = torch.randn(3, 8 * CHUNK, 6)
    model(x).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reached {missing}"


def test_init_state_batches_are_independent(model_config):
    """Streaming a batch equals streaming each sequence alone."""
    model = build_model(model_config).double().eval()
    x = torch.randn(3, 6 * CHUNK, 6, dtype=torch.float64)
    with torch.no_grad():
        together = stream(model, x)
        alone = torch.cat([stream(model, x[i : i + 1]) for i in range(3)])
    assert (together - alone).abs().max().item() < 1e-10


def test_public_api_exactly_as_documented():
    model = build_model({"kind": "hiss", "input_dim": 6, "output_dim": 3, "chunk": 10,
                         "low": {"kind": "s4d", "d_model": 64, "n_layers": 2},
                         "high": {"kind": "mamba", "d_model": 32, "n_layers": 2}})
    flat = build_model({"kind": "flat", "input_dim": 6, "output_dim": 3, "chunk": 10,
                        "layers": {"kind": "mamba", "d_model": 64, "n_layers": 2}})
    B = 2
    x = torch.randn(B, 120, 6)
    for m in (model.eval(), flat.eval()):
        with torch.no_grad():
            y = m(x)
            assert y.shape == (B, 12, 3)
            state = m.init_state(batch_size=B)
            for k in range(12):
                y_k, state = m.step_chunk(x[:, 10 * k : 10 * (k + 1)], state)
                assert y_k.shape == (B, 3)
                torch.testing.assert_close(y_k, y[:, k], atol=1e-4, rtol=0)


def test_build_model_takes_the_config_dataclass():
    cfg = HiSSConfig(input_dim=6, output_dim=3, chunk=10,
                     low=StackConfig(kind="s4d", d_model=16, n_layers=1),
                     high=StackConfig(kind="lstm", d_model=8, n_layers=1))
    assert cfg == model_config_from_dict(dataclasses.asdict(cfg))
    torch.manual_seed(1)
    a = build_model(cfg)
    torch.manual_seed(1)
    b = build_model(dataclasses.asdict(cfg))
    x = torch.randn(1, 20, 6)
    torch.testing.assert_close(a.eval()(x), b.eval()(x))
    assert isinstance(build_model(flat_config("mamba")).config, FlatConfig)


def test_deltas_off_changes_input_width():
    with_deltas = build_model(hiss_config("s4d", "s4d", deltas=True))
    without = build_model(hiss_config("s4d", "s4d", deltas=False))
    assert with_deltas.low.encoder.in_features == 12
    assert without.low.encoder.in_features == 6


@pytest.mark.parametrize("shape, expected", [
    ((2, 30, 5), "expected shape (batch, length, 6)"),
    ((30, 6), "expected shape (batch, length, 6)"),
    ((2, 35, 6), "length 35 is not a multiple of chunk=10"),
])
def test_bad_input_shape_is_a_clear_value_error(shape, expected):
    model = build_model(MODEL_CONFIGS["hiss-s4d-mamba"])
    with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        model(torch.randn(*shape))


@pytest.mark.parametrize("name", ["flat-mamba", "hiss-s4d-mamba"])
def test_bad_chunk_shape_in_step_chunk(name):
    model = build_model(MODEL_CONFIGS[name]).eval()
    state = model.init_state(batch_size=1)
    with pytest.raises(ValueError, match=r"expected shape \(1, 10, 6\), got \(1, 9, 6\)"):
        model.step_chunk(torch.randn(1, 9, 6), state)
    with torch.no_grad(), pytest.raises(ValueError, match=r"step_chunk: expected shape \(1, 10, 6\), got \(2, 10, 6\)"):
        StepRunner(model).step(torch.randn(2, 10, 6), state)  # the runner's fast step checks as step_chunk does
    with torch.no_grad(), pytest.raises(ValueError, match=r"expected shape \(batch, length, 6\)"):
        StepRunner(model).step(torch.randn(1, 10, 5), state)


@pytest.mark.parametrize("patch, message", [
    ({"chunk": 0}, "hiss.chunk = 0: expected a positive int"),
    ({"input_dim": "6"}, "hiss.input_dim = '6': expected a positive int"),
    ({"low": {"kind": "gru", "d_model": 8, "n_layers": 1}}, "hiss.low.kind = 'gru': expected one of"),
    ({"high": {"kind": "mamba", "d_model": -1, "n_layers": 1}}, "hiss.high.d_model = -1: expected a positive int"),
    ({"high": {"kind": "mamba", "d_model": 8, "n_layers": 1, "dropout": 1.5}},
     r"hiss.high.dropout = 1.5: expected a float in \[0, 1\)"),
    ({"high": {"kind": "transformer", "d_model": 10, "n_layers": 1, "n_heads": 4}},
     "d_model = 10: expected a multiple of n_heads=4"),
    ({"high": {"kind": "mamba", "d_model": 8, "n_layers": 1, "width": 3}},
     r"hiss.high: unknown field\(s\) \['width'\]"),
    ({"chunck": 10}, r"unknown field\(s\) \['chunck'\]"),
    ({"kind": "lstm"}, "model.kind = 'lstm': expected one of"),
    ({"variance": "yes"}, "hiss.variance = 'yes': expected true or false"),
])
def test_config_errors_name_field_and_value(patch, message):
    cfg = {**hiss_config("s4d", "mamba"), **patch}
    with pytest.raises(ConfigError, match=message):
        build_model(cfg)


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        build_model({**flat_config("s4d"), "chunk": -3})


def test_paper_presets_build_and_stream():
    """Every published configuration in config/paper_models.yaml builds and streams like offline."""
    import yaml

    presets = yaml.safe_load((Path(__file__).parents[1] / "config" / "paper_models.yaml").read_text())
    assert len(presets) == 6
    for name, preset in presets.items():
        model = build_model({**preset, "input_dim": 6, "output_dim": 2}).eval()
        x = torch.randn(1, 3 * preset["chunk"], 6)
        with torch.no_grad():
            torch.testing.assert_close(stream(model, x), model(x), atol=1e-4, rtol=0, msg=name)


def test_fast_step_equals_module_path_and_follows_weight_changes():
    """A StepRunner over HiSS (S4D low, Mamba high) takes the fast step in eval without autograd; it
    agrees with the module path (model.step_chunk) and re-gathers its weights after any parameter
    change, one runner (one cache) throughout. The runner is no part of the model."""
    model = build_model(hiss_config("s4d", "mamba")).double().eval()
    keys = list(model.state_dict())
    runner = StepRunner(model)
    x = torch.randn(2, 8 * CHUNK, 6, dtype=torch.float64)

    def module_path():
        with torch.no_grad():
            plain = stream(model, x)
        with torch.enable_grad():
            assert not runner.applies()
            graded = stream(model, x, runner.step)
        assert graded.requires_grad  # the module path, differentiable
        assert (graded.detach() - plain).abs().max().item() < 1e-12
        return plain

    def fast_path():
        with torch.no_grad():
            assert runner.applies()
            return stream(model, x, runner.step), model(x)

    online, offline = fast_path()
    assert (online - module_path()).abs().max().item() < 1e-12
    assert (online - offline).abs().max().item() < 1e-9
    with torch.inference_mode():  # weights gathered in inference mode, then used under no_grad
        stream(model, x, runner.step)
    changes = [  # in place as an optimizer step does, then parameters replaced
        lambda: model.low.blocks[0].mixer.log_dt.add_(0.3),  # the S4D chunk operator
        lambda: model.high.blocks[1].mixer.A_log.add_(1.0),  # Mamba's -exp(A_log)
        lambda: model.high.blocks[0].mixer.in_proj.weight.mul_(1.5),
        lambda: model.load_state_dict(build_model(hiss_config("s4d", "mamba")).double().state_dict()),
        lambda: model.load_state_dict(build_model(hiss_config("s4d", "mamba")).double().state_dict(), assign=True),
    ]
    for change in changes:
        before = online
        with torch.no_grad():
            change()
        online, offline = fast_path()
        assert (online - before).abs().max().item() > 1e-6
        assert (online - offline).abs().max().item() < 1e-9
        assert (online - module_path()).abs().max().item() < 1e-12
    model.float()  # converted: storage moved
    x = x.float()
    online, offline = fast_path()
    assert online.dtype == torch.float32
    assert (online - offline).abs().max().item() < 1e-4
    assert (online - module_path()).abs().max().item() < 1e-4
    # nothing of the runner on the model: same state dict, no attribute holding it
    assert list(model.state_dict()) == keys
    assert not [(name, k) for name, m in model.named_modules() for k, v in vars(m).items()
                if isinstance(v, StepRunner) or (isinstance(v, dict) and any(isinstance(u, StepRunner)
                                                                             for u in v.values()))]
    assert not hasattr(model, "_fast_step") and not hasattr(model, "set_step_backend")


def test_param_cache_recomputes_only_when_a_parameter_changed():
    """The one cache of derived values (runner weights, S4D operator, Mamba's A): kept while the
    parameters are unchanged, recomputed after an in-place update, a replacement, a conversion or
    other arguments, never used while autograd records."""
    from hiss_ros.models.cache import ParamCache

    lin = torch.nn.Linear(3, 2)
    calls = []
    cache = ParamCache(lambda scale=1: calls.append(scale) or lin.weight.sum() * scale)

    def get(*args):
        return cache.get(list(lin.parameters()), *args)

    with torch.no_grad():
        first = get()
        assert get() is first and len(calls) == 1
        lin.bias.add_(1.0)  # in place, even of a parameter the value does not read
        assert get() is not first and len(calls) == 2
        assert get(2) is not get() and len(calls) == 4  # other arguments
        lin.weight = torch.nn.Parameter(lin.weight * 2)  # replaced
        torch.testing.assert_close(get(), lin.weight.sum())
        lin.double()  # converted
        value = get()
        assert value.dtype == torch.float64 and len(calls) == 6 and get() is value
    with torch.enable_grad():
        assert get().requires_grad and len(calls) == 7  # computed, not cached, under autograd


def test_compiled_step_equals_offline_and_is_cached(tmp_path, monkeypatch):
    """Runner backend "compile" (AOTInductor, ``hiss_ros.models.aot``): compiled ahead by compile
    into the on-disk cache, the same outputs as the offline forward (in inference mode and under
    no_grad); new weights and a new delta scale (a buffer) are seen with no new compile; a chunk of
    another dtype is refused; another
    runner of the same architecture loads the cached package instead of compiling; a batch of 2
    is another package; a corrupt package in the cache is compiled again."""
    if shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("c++") is None:
        pytest.skip("the compiled step needs a C++ compiler (g++), none on PATH")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    config = {**hiss_config("s4d", "mamba"), "scale_deltas": True}
    model = build_model(config).eval()
    runner, told = StepRunner(model), []
    runner.compile(progress=told.append)  # compiled ahead, not yet used
    packages = sorted((tmp_path / "steps").glob("*.pt2"))
    assert len(told) == 1 and str(packages[0]) in told[0] and len(packages) == 1
    assert runner.backend == "eager"
    runner.set_backend("compile")
    assert runner.backend == "compile"
    x = torch.randn(1, 12 * CHUNK, 6)
    with torch.inference_mode():
        torch.testing.assert_close(stream(model, x, runner.step), model(x), atol=1e-4, rtol=0)
        first, _ = runner.step(x[:, :CHUNK], model.init_state(1))
    with torch.no_grad():  # weights and buffers are inputs of the compiled step
        model.high.blocks[0].mixer.D.add_(1.0)
        model.set_delta_std(torch.full((6,), 2.0))
        changed, _ = runner.step(x[:, :CHUNK], model.init_state(1))
        torch.testing.assert_close(changed, model(x[:, :CHUNK])[:, 0], atol=1e-4, rtol=0)
        assert (changed - first).abs().max().item() > 1e-4
        torch.testing.assert_close(stream(model, x, runner.step), model(x), atol=1e-4, rtol=0)  # not inference mode
    with torch.inference_mode(), pytest.raises(ValueError, match=r"compiled step for torch\.float32 on cpu: the chunk"):
        runner.step(x[:, :CHUNK].double(), model.init_state(1))  # read as float32 it would be wrong, not an error
    month_ago = time.time() - 31 * 86400
    os.utime(packages[0], (month_ago, month_ago))
    other, told = build_model(config).eval(), []
    StepRunner(other).compile(progress=told.append)
    assert told == []  # the same architecture: loaded from the cache
    assert packages[0].stat().st_mtime > month_ago + 86400  # loaded: marked as in use, which _prune keeps
    with torch.inference_mode():
        torch.testing.assert_close(stream(other, x, StepRunner(other, "compile").step), other(x), atol=1e-4, rtol=0)
        x2 = torch.randn(2, 3 * CHUNK, 6)  # another batch size: compiled at its first step
        torch.testing.assert_close(stream(model, x2, runner.step), model(x2), atol=1e-4, rtol=0)
    assert len(list((tmp_path / "steps").glob("*.pt2"))) == 2
    packages[0].write_bytes(b"not a package")
    fresh, told = StepRunner(build_model(config).eval(), "compile"), []
    fresh.compile(progress=told.append)
    assert len(told) == 1  # unreadable: compiled again
    with torch.inference_mode():
        torch.testing.assert_close(stream(fresh.model, x, fresh.step), fresh.model(x), atol=1e-4, rtol=0)
    runner.set_backend("eager")
    assert runner.backend == "eager"


def test_the_compile_cache_forgets_packages_unused_for_a_month_and_dead_temporaries(tmp_path):
    from hiss_ros.models.aot import UNUSED_FOR_S, _prune

    now = 1_900_000_000.0
    ages = {"old.pt2": UNUSED_FOR_S + 60, "old.json": 0, "used.pt2": UNUSED_FOR_S - 60, "used.json": UNUSED_FOR_S + 60,
            ".compiling-dead.pt2": 3700, ".compiling-busy.pt2": 60, "notes.txt": UNUSED_FOR_S + 60}
    for name, age in ages.items():
        (tmp_path / name).write_text(name)
        os.utime(tmp_path / name, (now - age, now - age))
    _prune(tmp_path, now)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".compiling-busy.pt2", "notes.txt", "used.json", "used.pt2"]


def test_compiled_step_carries_the_state_of_the_shipped_model():
    """The shipped contact model (trained weights, the node's default), stepped compiled and eagerly
    over 30 chunks with the state carried: the same outputs and the same state at every step (a state
    misread by the compiled step shows from the second chunk on)."""
    if shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("c++") is None:
        pytest.skip("the compiled step needs a C++ compiler (g++), none on PATH")
    from hiss_ros.serving import load_model

    model = load_model("contact").model.eval()
    eager, compiled = StepRunner(model), StepRunner(model, "compile")
    chunk, width = model.config.chunk, model.config.input_dim
    x = torch.randn(1, 30 * chunk, width, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        s_eager, s_compiled = model.init_state(1), model.init_state(1)
        for k in range(30):
            y_eager, s_eager = eager.step(x[:, k * chunk:(k + 1) * chunk], s_eager)
            y_compiled, s_compiled = compiled.step(x[:, k * chunk:(k + 1) * chunk], s_compiled)
            torch.testing.assert_close(y_compiled, y_eager, atol=1e-4, rtol=0, msg=f"chunk {k}")
            for a, b in zip(torch.utils._pytree.tree_leaves(s_compiled), torch.utils._pytree.tree_leaves(s_eager),
                            strict=True):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=f"state after chunk {k}")


def test_graph_backend_needs_cuda_and_a_covered_model():
    from hiss_ros.models.graphs import GraphedStep

    model = build_model(hiss_config("s4d", "mamba"))
    with pytest.raises(ValueError, match="step backend 'graph' needs the model on a CUDA device; this one is on cpu"):
        StepRunner(model, "graph")
    with pytest.raises(ValueError, match=r"step backend 'graph' does not apply to this model: .* low 'lstm'"):
        StepRunner(build_model(hiss_config("lstm", "mamba")), "graph")
    with pytest.raises(ValueError, match="a CUDA graph needs a CUDA device; this step runs on cpu"):
        GraphedStep(model.step_chunk, torch.zeros(1, CHUNK, model.config.input_dim), model.init_state(1))
    runner = StepRunner(model)
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        runner.set_backend("graph")
    assert runner.backend == "eager"  # refused: unchanged


def fake_capture(run, commit, device):
    """``graphs.capture`` without CUDA, as a graph behaves: capturing computes nothing in the static
    state; each replay writes the step's output into the same y and its new state into the static state."""
    expected, _ = run()
    y, _ = run()

    def replay():
        y_now, new = run()
        y.copy_(y_now)
        commit(new)

    return y, replay, expected


def test_graph_step_keeps_its_state_and_checks_its_capture(monkeypatch):
    """GraphedStep's bookkeeping, with the CUDA capture replaced by ``fake_capture`` (the real one runs in
    test_cuda.py on a GPU): the same outputs as the eager step over 30 chunks with its own state passed
    back (the same object each time), a fresh state copied in, outputs not overwritten by later steps, a
    chunk or state of another dtype refused, and a capture that replays something else refused."""
    from hiss_ros.models import graphs

    monkeypatch.setattr(graphs, "capture", fake_capture)
    model = build_model(hiss_config("s4d", "mamba")).eval()
    runner = StepRunner(model)
    x = torch.randn(1, 30 * CHUNK, 6)
    with torch.inference_mode():
        graphed = graphs.GraphedStep(runner.step, x[:, :CHUNK], model.init_state(1))
        s_eager, s_graph, kept = model.init_state(1), model.init_state(1), []
        for k in range(30):
            if k == 15:  # a reset
                s_eager, s_graph = model.init_state(1), model.init_state(1)
            y_eager, s_eager = runner.step(x[:, k * CHUNK:(k + 1) * CHUNK], s_eager)
            y_graph, returned = graphed(x[:, k * CHUNK:(k + 1) * CHUNK], s_graph)
            assert k == 0 or k == 15 or returned is s_graph  # its own buffer, passed back
            s_graph = returned
            torch.testing.assert_close(y_graph, y_eager, atol=1e-6, rtol=0, msg=f"chunk {k}")
            kept.append((y_graph, y_eager))
        for k, (y_graph, y_eager) in enumerate(kept):
            torch.testing.assert_close(y_graph, y_eager, atol=1e-6, rtol=0, msg=f"chunk {k}, kept")
        with pytest.raises(ValueError, match=r"the chunk is torch\.float64"):
            graphed(x[:, :CHUNK].double(), s_graph)
        with pytest.raises(ValueError, match="the state is"):
            graphed(x[:, :CHUNK], torch.utils._pytree.tree_map(lambda t: t.double(), model.init_state(1)))

        def off_by_one(run, commit, device):
            y, replay, expected = fake_capture(run, commit, device)
            return y, lambda: (replay(), y.add_(1.0)), expected

        monkeypatch.setattr(graphs, "capture", off_by_one)
        with pytest.raises(RuntimeError, match="replays 1 away from the eager step: not used"):
            graphs.GraphedStep(runner.step, x[:, :CHUNK], model.init_state(1))


@pytest.mark.parametrize("config, backend, message", [
    (hiss_config("s4d", "mamba"), "jit", "expected one of eager, compile"),
    (hiss_config("lstm", "mamba"), "compile", "this model has low 'lstm', high 'mamba'"),
    (flat_config("mamba"), "compile", "this is a Flat model"),
])
def test_step_backend_errors_say_why(config, backend, message):
    with pytest.raises(ValueError, match=message):
        StepRunner(build_model(config)).set_backend(backend)
    with pytest.raises(ValueError, match=message):
        StepRunner(build_model(config), backend)
    if backend == "compile":
        with pytest.raises(ValueError, match=message):
            StepRunner(build_model(config)).compile()
        assert message in StepRunner.uncovered(build_model(config).config)
