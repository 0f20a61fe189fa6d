"""The fused rounding step (`fused_quant`, qtrain.methods.fused) against the eager one.

The fused step is the eager step's formulas compiled into one loop, so every float must come
out the same: w_b, w_r, the scales, the flip counts and SR's random stream, for every routed
method, grid and scale, after a model move, and across a resume. Each case compiles its own
kernels (about a second each with inductor's C++ backend on the CPU); the tests skip where
inductor cannot compile.
"""

from __future__ import annotations

import signal
import warnings

import pytest
import torch
from test_fast_paths import assert_identical, awkward_values
from torch import nn

from qtrain import methods
from qtrain.base.errors import UserError
from qtrain.base.signals import stop_requested, stop_requests
from qtrain.methods import fused, optimizer
from qtrain.quant import parse_grid

CUDA = torch.cuda.is_available()
CASES = [  # every method, every grid, per-tensor and per-row, fixed and measured scales
    ("bc-adam", "ternary", "absmean"),
    ("bc-adam", "binary", "absmean-tensor"),
    ("bc-adam", "ternary", "he"),
    ("bc-adam", "binary", "none"),
    ("sr-adam", "ternary", "he"),
    ("sr-adam", "binary", "none"),
    ("r-adam", "binary", "he"),  # (R without a scale rounds as BC's "none" case does)
    # the other grids: k bits (Δ = 1/7 and 1/3, a division that is not by a power of 2), ℤ
    ("bc-adam", "3bit", "absmean"),
    ("sr-adam", "2bit", "none"),
    ("r-adam", "lattice", "he"),
]


@pytest.fixture(scope="module")
def inductor() -> None:
    """Skips when inductor cannot build a kernel here (no C++ compiler, platform)."""
    try:
        torch.compile(lambda x: x * 2 + 1, fullgraph=True)(torch.ones(3))
    except Exception as error:  # inductor reports a missing toolchain in several ways
        pytest.skip(f"torch.compile does not work here: {type(error).__name__}: {error}")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each case compiles its own steps: dynamo's per-function cache would otherwise fill up
    across cases and fall back to running the traced function uncompiled."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_net() -> nn.Module:
    """Two linear layers and a conv in channels-last (rows of dim 0 outermost), latent
    weights spread over several levels."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 5, 3), nn.Flatten(), nn.Linear(20, 9), nn.Tanh(),
                        nn.Linear(9, 3))  # fmt: skip
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3)
    return net.to(memory_format=torch.channels_last)


def train(method, grid, scale, fused_quant, steps=4, net=None, opt=None, seed=7, device="cpu",
          uniforms="torch", flip_every=1):  # fmt: skip
    """`steps` Adam steps on a seeded regression; returns (net, optimizer, losses)."""
    net = net or tiny_net().to(device)
    # R moves a weight only when one step crosses half a spacing: a larger step makes it flip
    lr = 0.5 if method.startswith("r-") else 0.05
    opt = opt or methods.create(method, net, lr, grid=grid, scale=scale, policy="all", seed=1,
                                fused_quant=fused_quant, sr_uniforms=uniforms,
                                flip_every=flip_every)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 2, 4, 4, generator=g)
        x = x.to(next(net.parameters()).device, next(net.parameters()).dtype)
        loss = (net(x) - 1).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach().cpu())
    return net, opt, losses


def assert_same_run(a, b) -> None:
    """Weights, latent weights, scales, flip counters, generator and losses bit for bit."""
    (net_a, opt_a, loss_a), (net_b, opt_b, loss_b) = a, b
    for x, y in zip(net_a.parameters(), net_b.parameters(), strict=True):
        assert_identical(y.detach(), x.detach())
    for x, y in zip(opt_a.latent_weights(), opt_b.latent_weights(), strict=True):
        assert_identical(y, x)
    for x, y in zip(opt_a.scales(), opt_b.scales(), strict=True):
        assert_identical(y, x)
    assert opt_a.flips.state() == opt_b.flips.state()
    assert opt_a.flips.steps > 0 and float(opt_a.flips.sum) > 0  # flips were counted
    if opt_a.generator is not None:
        assert torch.equal(opt_a.generator.get_state(), opt_b.generator.get_state())
    assert torch.equal(torch.stack(loss_a), torch.stack(loss_b))


@pytest.mark.slow
@pytest.mark.parametrize(("method", "grid", "scale"), CASES)
def test_fused_steps_equal_the_eager_steps_bit_for_bit(inductor, method, grid, scale):
    eager = train(method, grid, scale, "off")
    fused_run = train(method, grid, scale, "on")
    assert fused_run[1]._fused is not None and not fused_run[1]._fused.failed  # it compiled
    assert eager[1]._fused is None
    assert_same_run(eager, fused_run)


@pytest.mark.parametrize(("grid", "scale"), [("ternary", "he"), ("2bit", "none")])
def test_fused_steps_with_counter_uniforms_equal_the_eager_steps(inductor, grid, scale):
    """The kernel hashes the uniforms the eager step makes with ATen's int32 arithmetic."""
    eager = train("sr-adam", grid, scale, "off", uniforms="counter")
    fused_run = train("sr-adam", grid, scale, "on", uniforms="counter")
    assert fused_run[1]._fused is not None and not fused_run[1]._fused.failed
    assert_same_run(eager, fused_run)
    torch_uniforms = train("sr-adam", grid, scale, "off")
    assert not torch.equal(torch_uniforms[1]._flat_wb, eager[1]._flat_wb)  # another stream


@pytest.mark.parametrize(("method", "grid", "scale"), [CASES[0], CASES[2], CASES[4]])
def test_counting_every_other_step_equals_the_eager_run(inductor, method, grid, scale):
    """The steps that count and those that do not are two kernels, each the eager step."""
    eager = train(method, grid, scale, "off", steps=5, flip_every=2)
    fused_run = train(method, grid, scale, "on", steps=5, flip_every=2)
    assert fused_run[1].flips.steps == 3  # steps 1, 3 and 5
    assert_same_run(eager, fused_run)


def test_auto_compiles_counter_uniforms_at_the_first_step(inductor):
    """Counter uniforms' eager form is slower than torch.rand: `auto` does not wait."""
    _, opt, _ = train("sr-adam", "ternary", "he", "auto", steps=1, uniforms="counter")
    assert opt._fused is not None and opt._fused.ready("round-True-True")
    _, opt, _ = train("sr-adam", "ternary", "he", "auto", steps=1)
    assert opt._fused is None  # torch's uniforms wait until the compile pays


CUDA_CASES = [(*CASES[i], "torch") for i in (0, 1, 4, 6)] + [(*CASES[4], "counter")]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize(("method", "grid", "scale", "uniforms"), CUDA_CASES)
def test_fused_steps_on_cuda_equal_the_eager_steps_bit_for_bit(method, grid, scale, uniforms):
    """Triton's kernels against ATen's on the GPU (benchmarks/gpu_check.sh runs this), counter
    uniforms' int32 arithmetic included."""
    eager = train(method, grid, scale, "off", device="cuda", uniforms=uniforms)
    fused_run = train(method, grid, scale, "on", device="cuda", uniforms=uniforms)
    assert fused_run[1]._fused is not None and not fused_run[1]._fused.failed
    assert_same_run(eager, fused_run)


@pytest.mark.parametrize(("method", "grid", "scale"), [CASES[i] for i in (0, 4, 7, 8)])
def test_fused_rounding_of_awkward_values_is_the_eager_rounding(inductor, method, grid, scale):
    """NaN, ±∞, ±0, ties and their neighbours, subnormals: the same bits as the eager step."""
    opts = [train(method, grid, scale, mode, steps=1)[1] for mode in ("off", "on")]
    n, grid_ = opts[0].num_quantized, parse_grid(grid)
    specials = awkward_values(grid_, torch.float32, seed=3, n=0).numel()
    values = awkward_values(grid_, torch.float32, seed=3, n=n - specials)  # all of them
    for opt in opts:  # the same buffers in both, with every awkward value in them
        buffer = opt._buffers["latent"] if method.startswith("bc") else opt._flat_wb
        buffer.copy_(values)
    eager, fused_opt = opts
    if method.startswith("bc"):
        eager._update_latent_scales_and_weights()
        assert fused_opt._fused_bc()
    else:
        old = eager._flat_wb.clone()
        eager._round(eager._flat_wb, stochastic=True, out=eager._flat_wb)
        eager._count_flips(old, eager._flat_wb)
        assert fused_opt._fused_rounding(stochastic=True, old=old)
    assert_identical(fused_opt._flat_wb, eager._flat_wb)
    for name, buffer in eager._buffers.items():
        assert_identical(fused_opt._buffers[name], buffer)
    assert_identical(fused_opt.flips.last, eager.flips.last)


@pytest.mark.parametrize("uniforms", ["torch", "counter"])
def test_a_resumed_fused_run_equals_an_uninterrupted_eager_run(inductor, uniforms):
    """state_dict holds nothing of the fused step: a run saved from it and resumed into an
    eager optimizer (or the other way round) continues exactly."""
    method, grid, scale = CASES[4]  # SR: the generator's stream must carry over
    net, opt, first = train(method, grid, scale, "on", steps=3, uniforms=uniforms)
    saved = opt.state_dict()
    resumed = methods.create(method, net, 0.05, grid=grid, scale=scale, policy="all", seed=1,
                             fused_quant="off", sr_uniforms=uniforms)  # fmt: skip
    resumed.load_state_dict(saved)
    _, _, rest = train(method, grid, scale, "off", steps=2, net=net, opt=resumed, seed=8)
    # the uninterrupted run sees the same batches: 3 from seed 7, then 2 from seed 8
    net_u, opt_u, losses_u = train(method, grid, scale, "off", steps=3, uniforms=uniforms)
    assert saved.keys() == opt_u.state_dict().keys()
    assert saved["quantization"].keys() == opt_u.state_dict()["quantization"].keys()
    _, _, more = train(method, grid, scale, "off", steps=2, net=net_u, opt=opt_u, seed=8)
    assert_same_run((net_u, opt_u, losses_u + more), (net, resumed, first + rest))


def test_the_fused_step_follows_a_model_move(inductor):
    """After model.double() the buffers are re-homed and the steps compiled for float64."""
    runs = []
    for mode in ("off", "on"):
        net, opt, losses = train("bc-adam", "ternary", "he", mode, steps=2)
        net.double()
        _, _, more = train("bc-adam", "ternary", "he", mode, steps=2, net=net, opt=opt)
        runs.append((net, opt, losses + [loss.float() for loss in more]))
    assert runs[1][1]._fused_key[1] == torch.float64
    assert_same_run(*runs)


def test_auto_without_a_compiler_stays_eager_silently_and_on_says_so(monkeypatch):
    from torch._inductor import config

    monkeypatch.setattr(optimizer, "pays", lambda *args: True)  # as on a long run
    eager = train("sr-adam", "ternary", "he", "off", steps=2)
    # inductor's config restores itself through its own patch (monkeypatch would break it)
    with config.patch({"cpp.cxx": ("no-such-compiler-for-qtrain",)}):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            auto = train("sr-adam", "ternary", "he", "auto", steps=2)
        assert not caught
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            on = train("sr-adam", "ternary", "he", "on", steps=2)
        assert len(caught) == 1 and "no compiler" in str(caught[0].message)
        for run in (auto, on):
            assert run[1]._fused_steps() is None
    for run in (auto, on):
        assert_same_run(eager, run)


def test_a_compile_failing_after_ctrl_c_stays_quiet_and_may_compile_later(monkeypatch):
    """Ctrl-C at a terminal kills the compiler's child process too: that failure is the
    user's stop, not the compiler's, so "on" neither warns nor gives up compiling; the same
    failure without a stop request warns once and stays eager."""
    from torch._dynamo.exc import TorchDynamoException

    def compiler_killed(*args):
        raise TorchDynamoException("CppCompileError: C++ compile error (the compiler was killed)")

    monkeypatch.setattr(fused.torch, "compile", lambda function, **options: compiler_killed)
    eager = train("sr-adam", "ternary", "he", "off", steps=2)
    with stop_requests(lambda signum: None), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        signal.raise_signal(signal.SIGINT)
        assert stop_requested()
        stopped = train("sr-adam", "ternary", "he", "on", steps=2)
    assert not caught and not stop_requested()
    assert stopped[1]._fused is not None and not stopped[1]._fused.failed  # tries again later
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        failed = train("sr-adam", "ternary", "he", "on", steps=2)
    assert len(caught) == 1 and "the compiler was killed" in str(caught[0].message)
    assert failed[1]._fused.failed
    for run in (stopped, failed):
        assert_same_run(eager, run)


def test_auto_compiles_once_the_eager_steps_have_lost_the_compile_time():
    gpt = 786_432  # the quantized weights of the 4x128 GPT of docs/speed.md §7
    for mode, grid in fused.SAVED_NS_PER_WEIGHT:
        due = next(s for s in range(1, 10**6) if fused.pays(mode, grid, gpt, s))
        assert due > 1000  # a 30-second demo never compiles
        assert fused.pays(mode, grid, gpt, 2 * due) and not fused.pays(mode, grid, gpt // 2, due)
        saved = due * gpt * fused.SAVED_NS_PER_WEIGHT[mode, grid] * 1e-9
        assert fused.COMPILE_SECONDS <= saved < fused.COMPILE_SECONDS * (1 + 1 / due) + 1e-9
    assert not fused.pays("r", "binary", gpt, 10**9)  # nothing measurable to gain
    assert not fused.pays("bc", "kbit", gpt, 10**9)  # not measured
    assert fused.pays("sr", "binary", gpt, 0, counter=True)  # its eager form is the slower
    assert not fused.pays("bc", "ternary", gpt, 0, counter=True)  # BC draws no uniforms here


def test_a_fused_quant_value_other_than_auto_on_off_is_refused():
    with pytest.raises(UserError, match="fused_quant must be one of auto, on, off"):
        train("bc-adam", "binary", "none", "fast", steps=0)
