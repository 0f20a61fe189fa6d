"""Invariants the quantized optimizer guards: models moved after it was built, random streams,
and state that must match the optimizer it is loaded into."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from qtrain.base.streams import stream_generator
from qtrain.methods import create
from qtrain.methods.flat import generator_on
from qtrain.methods.scales import broadcastable, on_scaled_grid
from qtrain.quant import binary, parse_grid

METHODS = ["bc-adam", "sr-adam", "r-sgd", "bop-adam"]
SETTINGS = {  # method → (grid, scale): every kind of flat state a move must carry
    "bc-adam": ("2bit", "none"),
    "sr-adam": ("2bit", "he"),
    "r-sgd": ("2bit", "none"),
    "bop2-adam": ("binary", "he"),
    "bc-sgd": ("binary", "absmean"),
}


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def train_steps(model, opt, steps: int, first: int = 0) -> None:
    dtype = next(model.parameters()).dtype
    for i in range(first, first + steps):
        g = torch.Generator().manual_seed(i)
        x, y = (
            torch.randn(16, 3, 8, 8, generator=g).to(dtype),
            torch.randint(0, 4, (16,), generator=g),
        )
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def conv_weights(model) -> list[torch.Tensor]:
    return [model[0].weight, model[3].weight]


def assert_backed_and_on_grid(model, opt) -> None:
    """Every quantized parameter is on the grid and lives inside the optimizer's flat buffer."""
    start = opt._flat_wb.data_ptr()
    end = start + opt._flat_wb.numel() * opt._flat_wb.element_size()
    for p, s in zip(conv_weights(model), opt.scales(), strict=True):
        assert on_scaled_grid(p.detach(), broadcastable(s, p), opt.grid)
        assert start <= p.data_ptr() < end and p.dtype == opt._flat_wb.dtype
    for flat in opt._buffers.values():
        assert flat.dtype == opt._flat_wb.dtype and flat.device == opt._flat_wb.device


def new_storage(model: nn.Module) -> nn.Module:
    """What `.to("cuda")` does to the parameters, on the CPU: every tensor gets new memory."""
    return model._apply(lambda t: t.clone())


@pytest.mark.parametrize("method", SETTINGS)
@pytest.mark.parametrize(
    "move",
    [
        lambda m: m.double(),
        lambda m: m.to(memory_format=torch.channels_last),
        new_storage,
    ],
    ids=["double", "channels_last", "new-storage"],
)
def test_a_model_moved_after_building_stays_on_the_grid_and_backed(method, move):
    model = small_net()
    grid, scale = SETTINGS[method]
    settings = {"bop_gamma": 0.3, "bop_tau": 1e-4} if method.startswith("bop") else {}
    opt = create(method, model, lr=0.05, grid=grid, scale=scale, seed=1, **settings)
    train_steps(model, opt, 2)
    latent = [w.detach().clone() for w in opt.latent_weights()]
    move(model)
    layout = [p.stride() for p in conv_weights(model)]
    train_steps(model, opt, 3, first=2)
    assert_backed_and_on_grid(model, opt)
    assert [p.stride() for p in conv_weights(model)] == layout
    dtype = model[0].weight.dtype
    for state in opt.base.state.values():
        for key, value in state.items():
            if key != "step" and torch.is_tensor(value) and value.is_floating_point():
                assert value.dtype == dtype
    if method.startswith(("bc", "bop")):
        assert all(flat.dtype == dtype for flat in opt._buffers.values())
    if method == "bc-adam":
        assert opt.latent_weights()[0].dtype == dtype
        assert not torch.equal(opt.latent_weights()[0].double(), latent[0].double())


@pytest.mark.parametrize("method", METHODS)
def test_following_a_move_continues_exactly_as_if_nothing_moved(method):
    """New memory with the same values: the next steps are bit-identical to an unmoved twin."""
    model, twin = small_net(), small_net()
    opt = create(method, model, lr=0.05, seed=3)
    twin_opt = create(method, twin, lr=0.05, seed=3)
    train_steps(model, opt, 2)
    train_steps(twin, twin_opt, 2)
    new_storage(model)
    train_steps(model, opt, 3, first=2)
    train_steps(twin, twin_opt, 3, first=2)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
    assert_backed_and_on_grid(model, opt)


def test_widening_keeps_the_latent_weights_exactly():
    model = small_net()
    opt = create("bc-adam", model, lr=0.05)
    train_steps(model, opt, 2)
    latent = [w.detach().clone() for w in opt.latent_weights()]
    model.double()
    state = opt.state_dict()  # state_dict follows the move too
    assert state["quantization"]["latent"].dtype == torch.float64
    for old, new in zip(latent, opt.latent_weights(), strict=True):
        assert torch.equal(old.double(), new)
    assert_backed_and_on_grid(model, opt)


@pytest.mark.parametrize("cast", [torch.float16, torch.bfloat16])
def test_a_narrowing_cast_is_refused_with_the_fix(cast):
    model = small_net()
    opt = create("sr-adam", model, lr=0.01)
    model.to(cast)
    with pytest.raises(ValueError, match="cast the model before calling methods.create"):
        opt.step()


def test_zero_grad_follows_the_move_before_anything_reads_the_buffers():
    model = small_net()
    opt = create("bc-adam", model, lr=0.05)
    model.double()
    opt.zero_grad()
    assert opt._flat_wb.dtype == torch.float64 and opt.latent_gap() is not None
    assert_backed_and_on_grid(model, opt)


def test_a_generator_stays_itself_on_its_own_device_type():
    cpu = torch.Generator().manual_seed(5)
    before = cpu.get_state()
    assert generator_on(cpu, torch.device("cpu")) is cpu
    assert torch.equal(cpu.get_state(), before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_generator_is_reseeded_from_one_draw_on_another_device_type():
    cpu = torch.Generator().manual_seed(5)
    twin = torch.Generator().manual_seed(5)
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=twin))
    moved = generator_on(cpu, torch.device("cuda", 0))
    assert moved.device.type == "cuda" and moved.initial_seed() == seed
    assert torch.equal(cpu.get_state(), twin.get_state())


def test_rounding_and_init_draw_from_the_named_streams():
    """Old scheme: rounding seeded seed + 1, i.e. another run's initialisation seed."""
    model = small_net()
    opt = create("sr-adam", model, lr=0.01, seed=4)
    assert torch.equal(opt.generator.get_state(), stream_generator(4, "rounding").get_state())
    assert not torch.equal(opt.generator.get_state(), torch.Generator().manual_seed(5).get_state())
    init = stream_generator(4, "grid-init")
    expected = torch.randint(0, 2, model[0].weight.shape, generator=init) * 2.0 - 1.0
    assert torch.equal(model[0].weight.detach(), expected)


def test_state_records_stochastic_bc_and_the_generator_device():
    saved = create("bc-adam", small_net(), lr=0.01, bc_stochastic=True).state_dict()
    q = saved["quantization"]
    assert q["bc_stochastic"] is True and q["generator_device"] == "cpu"
    with pytest.raises(ValueError, match="bc_stochastic=True, not False"):
        create("bc-adam", small_net(), lr=0.01).load_state_dict(saved)


def test_state_records_the_source_of_sr_uniforms():
    saved = create("sr-adam", small_net(), lr=0.01, sr_uniforms="counter").state_dict()
    assert saved["quantization"]["sr_uniforms"] == "counter"
    with pytest.raises(ValueError, match="sr_uniforms='counter', not 'torch'"):
        create("sr-adam", small_net(), lr=0.01).load_state_dict(saved)
    older = create("sr-adam", small_net(), lr=0.01).state_dict()
    del older["quantization"]["sr_uniforms"]  # written before the setting existed: torch's
    create("sr-adam", small_net(), lr=0.01).load_state_dict(older)
    with pytest.raises(ValueError, match="sr_uniforms='torch', not 'counter'"):
        create("sr-adam", small_net(), lr=0.01, sr_uniforms="counter").load_state_dict(older)


def test_a_generator_state_from_another_device_type_is_refused():
    saved = create("sr-adam", small_net(), lr=0.01).state_dict()
    saved["quantization"]["generator_device"] = "cuda"
    with pytest.raises(ValueError, match="resume with the model on a cuda device"):
        create("sr-adam", small_net(), lr=0.01).load_state_dict(saved)


def test_default_delta_makes_an_8bit_grid_span_plus_minus_one():
    model = small_net()
    opt = create("bc-adam", model, lr=0.01, grid="8bit")
    assert opt.grid == parse_grid("8bit") and opt.grid.hi == pytest.approx(1.0)
    assert model[0].weight.abs().max() <= 1.0
    assert binary() == create("sr-adam", small_net(), lr=0.01).grid
