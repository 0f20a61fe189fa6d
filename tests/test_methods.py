"""The BC / SR / R training methods: exact updates, grid membership, state round trips."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from qtrain import methods, models
from qtrain.base.errors import UserError
from qtrain.methods import (
    METHODS,
    QuantizedOptimizer,
    create,
    list_methods,
    parse_method,
    quantized_parameter_names,
    split_parameters,
)
from qtrain.quant import binary, parse_grid, round_nearest, ternary

QUANTIZED_METHODS = [m for m in METHODS if not m.startswith("fp")]
ROUNDING_METHODS = [m for m in QUANTIZED_METHODS if not m.startswith("bop")]


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),  # a bias before BatchNorm has no gradient
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def batch(seed: int = 0, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def train_steps(model, opt, steps: int, first_batch: int = 0) -> None:
    for i in range(first_batch, first_batch + steps):
        x, y = batch(i)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("method", ROUNDING_METHODS)
@pytest.mark.parametrize("grid", ["binary", "ternary", "2bit"])
def test_quantized_weights_are_on_the_grid_after_every_step(method, grid):
    model = small_net()
    opt = create(method, model, lr=0.05, grid=grid, delta=0.5)
    g = parse_grid(grid, 0.5)
    names = set(quantized_parameter_names(model, "conv"))
    for i in range(4):
        train_steps(model, opt, 1, first_batch=i)
        for name, p in model.named_parameters():
            if name in names:
                assert g.contains(p.detach()), f"{name} left the grid at step {i}"


def test_policy_selects_conv_then_linear_then_everything():
    model = small_net()
    assert quantized_parameter_names(model, "conv") == ["0.weight", "3.weight"]
    assert quantized_parameter_names(model, "conv+linear") == ["0.weight", "3.weight", "8.weight"]
    assert len(quantized_parameter_names(model, "all")) == len(list(model.parameters()))
    opt = create("sr-adam", model, lr=0.01, policy="conv+linear")
    assert binary().contains(model[8].weight.detach())
    assert not binary().contains(model[8].bias.detach())
    assert opt.num_quantized == 8 * 3 * 9 + 8 * 8 * 9 + 4 * 8


def _manual_adam(p, g, m, v, t, lr, b1=0.9, b2=0.999, eps=1e-8):
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(eps)
    p.addcdiv_(m, denom, value=-lr / (1 - b1**t))


def test_bc_adam_step_matches_a_hand_written_reference():
    """w_r follows Adam driven by ∇f̃(w_b); other parameters follow plain Adam."""
    model = small_net()
    reference = small_net()
    reference.load_state_dict(model.state_dict())
    lr = 0.01
    opt = create("bc-adam", model, lr=lr)
    names = quantized_parameter_names(model, "conv")
    params = dict(reference.named_parameters())
    latent = {n: params[n].detach().clone().clamp(-1, 1) for n in names}
    moments = {n: (torch.zeros_like(p), torch.zeros_like(p)) for n, p in params.items()}
    for t in range(1, 6):
        with torch.no_grad():
            for n in names:
                params[n].copy_(round_nearest(latent[n], binary()))
        x, y = batch(t)
        reference.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        with torch.no_grad():
            for n, p in params.items():
                target = latent[n] if n in names else p
                _manual_adam(target, p.grad, *moments[n], t, lr)
            for n in names:
                latent[n].clamp_(-1, 1)
        train_steps(model, opt, 1, first_batch=t)
    got = dict(model.named_parameters())
    latent_got = dict(zip(names, opt.latent_weights(), strict=True))
    for n, p in params.items():
        if n in names:
            torch.testing.assert_close(latent_got[n], latent[n], rtol=1e-5, atol=1e-6)
            assert torch.equal(got[n].detach(), round_nearest(latent_got[n], binary()))
        else:
            torch.testing.assert_close(got[n].detach(), p.detach(), rtol=1e-5, atol=1e-6)


def test_full_precision_parameters_move_exactly_as_under_the_plain_optimizer():
    """At the same w_b, the non-quantized parameters take the very same Adam step."""
    model, plain = small_net(), small_net()
    opt = create("sr-adam", model, lr=0.01)
    plain.load_state_dict(model.state_dict())
    ref_opt = torch.optim.Adam(plain.parameters(), lr=0.01)
    train_steps(model, opt, 1)
    train_steps(plain, ref_opt, 1)
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        if name not in ("0.weight", "3.weight"):
            assert torch.equal(p, q), name


def test_r_adam_stagnates_on_binary_weights():
    """|Adam step| ≈ lr = 0.01 ≪ Δ: Q_d puts every binary weight straight back."""
    model = small_net()
    opt = create("r-adam", model, lr=0.01)
    before = [p.detach().clone() for p in (model[0].weight, model[3].weight)]
    for i in range(10):
        train_steps(model, opt, 1, first_batch=i)
        assert opt.flip_rate() == 0.0
    assert all(torch.equal(b, p) for b, p in zip(before, (model[0].weight, model[3].weight)))
    assert opt.mean_flip_rate() == 0.0


def test_sr_adam_flips_weights_with_the_predicted_probability():
    """Adam's first step is lr·sign(g); a weight ±1 moved inwards by lr flips w.p. lr/2."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 5), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 12, 12))
    lr = 0.04
    opt = create("sr-adam", model, lr=lr, seed=3)
    w0 = model[0].weight.detach().clone()
    x, y = torch.randn(64, 3, 12, 12), torch.randint(0, 2, (64,))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    inwards = (torch.sign(model[0].weight.grad) == torch.sign(w0)).sum().item()
    opt.step()
    flips = (model[0].weight != w0).sum().item()
    expected = inwards * lr / 2
    standard_error = math.sqrt(inwards * (lr / 2) * (1 - lr / 2))
    assert abs(flips - expected) <= 4 * standard_error
    assert opt.flip_rate() == pytest.approx(flips / w0.numel())


@pytest.mark.parametrize("method", [m for m in METHODS if not m.startswith("bop")])
def test_save_and_restore_gives_bit_identical_next_steps(method):
    model = small_net()
    opt = create(method, model, lr=0.02, seed=11, grid=ternary(0.5))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    train_steps(model, opt, 3)
    scheduler.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train_steps(model, opt, 3, first_batch=3)

    restored_model = small_net(seed=99)
    restored = create(method, restored_model, lr=0.02, seed=0, grid=ternary(0.5))
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    restored_model.load_state_dict(saved["model"])
    restored.load_state_dict(saved["opt"])
    assert restored.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    train_steps(restored_model, restored, 3, first_batch=3)
    for a, b in zip(model.state_dict().values(), restored_model.state_dict().values()):
        assert torch.equal(a, b)
    if method.startswith("bc"):
        for a, b in zip(opt.latent_weights(), restored.latent_weights(), strict=True):
            assert torch.equal(a, b)


def test_lr_scheduler_drives_the_base_optimizer():
    model = small_net()
    opt = create("bc-sgd", model, lr=0.1)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1], gamma=0.1)
    train_steps(model, opt, 1)
    scheduler.step()
    assert opt.base.param_groups[0]["lr"] == pytest.approx(0.01)
    assert [g["name"] for g in opt.param_groups] == ["quantized", "full_precision"]


def test_weight_decay_shrinks_the_latent_weights_of_bc():
    """Figure 7's mechanism: with decay, w_r drifts to 0 and the gap (1/d)‖w_b − w_r‖₁ grows."""
    gaps = {}
    for decay in (0.0, 0.5):
        model = small_net()
        opt = create("bc-sgd", model, lr=0.05, weight_decay=decay, momentum=0.0)
        train_steps(model, opt, 30)
        gaps[decay] = opt.latent_gap()
    assert gaps[0.5] > gaps[0.0]
    assert 0.0 <= gaps[0.0] <= 1.0


def test_stochastic_bc_writes_a_stochastic_rounding_of_the_latent_weights():
    model = small_net()
    opt = create("bc-adam", model, lr=0.01, bc_stochastic=True, seed=5)
    train_steps(model, opt, 2)
    assert binary().contains(model[0].weight.detach())
    # Q_s keeps signs unchanged only with probability (1+|w_r|)/2 < 1 for small |w_r|
    assert not torch.equal(model[0].weight, round_nearest(opt.latent_weights()[0], binary()))


# The float methods' base optimizers as a plain loop would build them; `kernels` picks
# PyTorch's implementation (foreach=False: the per-tensor loop, fused=True: one kernel).
FP_BASES = [
    ("fp-adam", lambda ps, **kernels: torch.optim.Adam(ps, lr=0.01, weight_decay=1e-3, **kernels)),
    ("fp-adamw", lambda ps, **kernels: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, **kernels)),
    ("fp-sgd", lambda ps, **kernels: torch.optim.SGD(
        ps, lr=0.01, momentum=0.9, weight_decay=1e-3, **kernels)),
]  # fmt: skip


@pytest.mark.parametrize("method, base", FP_BASES)
def test_fp_method_is_the_plain_per_tensor_optimizer(method, base):
    """The base optimizers step all tensors in one foreach call; that is the per-tensor loop
    (PyTorch's CPU default) bit for bit."""
    model, plain = small_net(), small_net()
    decay = base([torch.zeros(1)]).defaults["weight_decay"]
    opt = create(method, model, lr=0.01, weight_decay=decay, momentum=0.9)
    ref = base(list(plain.parameters()), foreach=False)
    train_steps(model, opt, 3)
    train_steps(plain, ref, 3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))
    assert opt.num_quantized == 0 and opt.latent_gap() is None


@pytest.mark.parametrize("method, base", FP_BASES)
def test_optimizer_impl_fused_is_pytorchs_fused_optimizer_and_close_to_the_loop(method, base):
    """optimizer_impl = "fused" steps with PyTorch's one-kernel optimizer bit for bit; its
    results are the loop's to within float32 rounding, not bit for bit."""
    model, plain, loop = small_net(), small_net(), small_net()
    decay = base([torch.zeros(1)]).defaults["weight_decay"]
    opt = create(method, model, lr=0.01, weight_decay=decay, momentum=0.9, optimizer_impl="fused")
    assert all(group["fused"] for group in opt.param_groups)
    train_steps(model, opt, 3)
    train_steps(plain, base(list(plain.parameters()), fused=True), 3)
    train_steps(loop, create(method, loop, lr=0.01, weight_decay=decay, momentum=0.9), 3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))
    for a, b in zip(model.parameters(), loop.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["bc-adam", "sr-adamw", "r-sgd", "bop-adam"])
def test_quantized_methods_step_with_the_fused_base_optimizer(method):
    """BC's latent weights, and the full-precision parameters of every method, step with the
    fused kernel as with the loop, to within rounding; the quantized weights stay on the grid."""
    fused, loop = small_net(), small_net()
    opt = create(method, fused, lr=0.01, optimizer_impl="fused")
    ref = create(method, loop, lr=0.01)
    train_steps(fused, opt, 3)
    train_steps(loop, ref, 3)
    assert binary().contains(fused[0].weight.detach())
    torch.testing.assert_close(fused[-1].weight, loop[-1].weight, rtol=1e-5, atol=1e-6)
    if method == "bc-adam":
        torch.testing.assert_close(opt.latent_weights(), ref.latent_weights(),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip


def test_an_unknown_optimizer_impl_is_refused_with_the_choices():
    with pytest.raises(UserError, match="optimizer_impl.*foreach, fused"):
        create("bc-adam", small_net(), lr=0.01, optimizer_impl="fast")


def test_channels_last_layout_survives():
    model = small_net().to(memory_format=torch.channels_last)
    create("bc-adam", model, lr=0.01)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda m: create("sr-adm", m, lr=0.01), "did you mean 'sr-adam'"),
        (lambda m: create("bc-adam", m, lr=0.0), "learning rate"),
        (lambda m: create("bc-adam", m, lr=-1.0), "learning rate"),
        (lambda m: create("bc-adam", m, lr=0.01, delta=0.0), "delta"),
        (lambda m: create("bc-adam", m, lr=0.01, grid="0bit"), "bits"),
        (lambda m: create("bc-adam", m, lr=0.01, policy="convs"), "did you mean 'conv'"),
        (lambda m: create("bc-adam", m, lr=0.01, weight_decay=-1e-5), "weight decay"),
        (
            lambda m: QuantizedOptimizer(
                torch.optim.Adam(m.parameters()), [m[0].weight], "sr", binary()
            ),
            "must start on the grid",
        ),
    ],
)
def test_bad_input_gets_a_clear_value_error(build, message):
    with pytest.raises(ValueError, match=message):
        build(small_net())


def test_loading_state_of_another_method_is_refused():
    model = small_net()
    saved = create("bc-adam", model, lr=0.01).state_dict()
    with pytest.raises(ValueError, match="resume with the method"):
        create("sr-adam", small_net(), lr=0.01).load_state_dict(saved)


def test_fp_adamw_is_torch_adamw():
    model, plain = small_net(), small_net()
    opt = create("fp-adamw", model, lr=0.01, weight_decay=0.1)
    ref = torch.optim.AdamW(plain.parameters(), lr=0.01, weight_decay=0.1)
    train_steps(model, opt, 3)
    train_steps(plain, ref, 3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))


def test_bc_adamw_decays_the_latent_weights_decoupled_from_the_gradient():
    """w_r follows torch's AdamW driven by ∇f̃(w_b), then the clip; w_b = Q_d(w_r)."""
    model, reference = small_net(), small_net()
    reference.load_state_dict(model.state_dict())
    opt = create("bc-adamw", model, lr=0.01, weight_decay=0.5)
    names = quantized_parameter_names(model, "conv")
    params = dict(reference.named_parameters())
    latent = {n: nn.Parameter(params[n].detach().clone().clamp(-1, 1)) for n in names}
    trained = [latent[n] if n in names else p for n, p in params.items()]
    ref = torch.optim.AdamW(trained, lr=0.01, weight_decay=0.5)
    for t in range(4):
        with torch.no_grad():
            for n in names:
                params[n].copy_(round_nearest(latent[n], binary()))
        x, y = batch(t)
        reference.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        for n in names:
            latent[n].grad = params[n].grad
        ref.step()
        with torch.no_grad():
            for n in names:
                latent[n].clamp_(-1, 1)
        train_steps(model, opt, 1, first_batch=t)
    for n, w_r in zip(names, opt.latent_weights(), strict=True):
        assert torch.equal(w_r, latent[n].detach())


def test_r_adamw_decay_pulls_weights_inwards_once_it_passes_half_a_spacing():
    """αλ = 0.6 > ½: on the ternary grid every ±1 weight falls to 0 in one step; no decay, none."""
    zeros = {}
    for decay in (0.0, 6.0):
        model = small_net()
        opt = create(
            "r-adamw", model, lr=0.1, grid="ternary", weight_decay=decay, init="rademacher"
        )
        train_steps(model, opt, 1)
        zeros[decay] = int((model[0].weight == 0).sum())
    assert zeros[0.0] == 0 and zeros[6.0] == model[0].weight.numel()


def test_every_base_optimizer_has_every_mode_and_the_flip_methods_are_listed():
    names = list_methods()
    for mode in ("fp", "bc", "sr", "r"):
        for base in ("sgd", "adam", "adamw"):
            assert f"{mode}-{base}" in names
    assert {"bop-adam", "bop2-adam"} <= set(names)
    assert parse_method("bc-adamw").describe == "BinaryConnect with AdamW"
    assert parse_method("bop2-adam").paper_name == "Bop2"


class TiedLanguageModel(nn.Module):
    """Embedding → linear → head, the head's weight tied to the embedding and declared
    full precision, as a GPT does."""

    full_precision_modules = ("head",)

    def __init__(self, vocab: int = 6, width: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.hidden = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.embed(idx))))


def test_linear_policy_quantizes_the_classifier_linears_of_a_cnn_and_no_conv():
    assert quantized_parameter_names(small_net(), "linear") == ["8.weight"]


def test_only_the_linear_policy_keeps_declared_modules_in_full_precision():
    model = small_net()
    model.full_precision_modules = ("8",)
    assert quantized_parameter_names(model, "linear") == []
    assert quantized_parameter_names(model, "conv+linear") == ["0.weight", "3.weight", "8.weight"]
    assert len(quantized_parameter_names(model, "all")) == len(list(model.parameters()))


def test_a_tied_head_stays_full_precision_under_linear_and_is_quantized_once_under_all():
    torch.manual_seed(0)
    model = TiedLanguageModel()
    assert quantized_parameter_names(model, "linear") == ["hidden.weight"]
    # the shared tensor appears once, under its first name, in every policy
    assert quantized_parameter_names(model, "conv+linear") == ["embed.weight", "hidden.weight"]
    everything = ["embed.weight", "hidden.weight", "hidden.bias"]
    assert quantized_parameter_names(model, "all") == everything
    for policy in ("linear", "conv+linear", "all"):
        quantized, full = split_parameters(model, policy)
        ids = [id(p) for p in quantized + full]
        assert len(ids) == len(set(ids)) == 3, policy
    opt = create("bc-adam", model, lr=0.01, policy="all")
    assert opt.num_quantized == 6 * 4 + 4 * 4 + 4
    idx = torch.randint(0, 6, (3, 5), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
        opt.step()
        assert model.head.weight is model.embed.weight
        assert binary().contains(model.embed.weight.detach())


@pytest.mark.parametrize(
    "declared, message",
    [(("lm_head",), "names lm_head, which the model does not have"), ("8", "tuple of submodule")],
)
def test_a_bad_full_precision_declaration_is_named(declared, message):
    model = small_net()
    model.full_precision_modules = declared
    with pytest.raises(ValueError, match=message):
        quantized_parameter_names(model, "linear")


@pytest.mark.parametrize("name", ["sr-adam", "r-adam", "bop-adam", "sr-adamw"])
def test_auto_init_keeps_weights_already_on_the_grid_and_draws_signs_otherwise(name):
    """A framework that restores a checkpoint before building the optimizer keeps its weights;
    a random initialisation (never on the grid) gets Rademacher signs."""
    torch.manual_seed(0)
    model = models.create("tiny_cnn", 10, 0.25, 3)
    fresh = [p.detach().clone() for p in methods.split_parameters(model)[0]]
    methods.create(name, model, lr=0.01, seed=1)
    drawn = [p.detach().clone() for p in methods.split_parameters(model)[0]]
    assert all(not torch.equal(a, b) for a, b in zip(fresh, drawn, strict=True))
    assert all(set(w.unique().tolist()) == {-1.0, 1.0} for w in drawn)
    methods.create(name, model, lr=0.01, seed=2)  # another seed would draw other signs
    kept = [p.detach() for p in methods.split_parameters(model)[0]]
    assert all(torch.equal(a, b) for a, b in zip(drawn, kept, strict=True))
    methods.create(name, model, lr=0.01, seed=2, init="rademacher")
    redrawn = [p.detach() for p in methods.split_parameters(model)[0]]
    assert any(not torch.equal(a, b) for a, b in zip(drawn, redrawn, strict=True))


@pytest.mark.parametrize(("grid", "scale"), [("binary", "absmean"), ("ternary", "absmean-tensor")])
def test_flips_count_changes_of_level_not_the_drift_of_a_measured_scale(grid, scale):
    """With a measured scale every weight's value moves each step; a flip is a level change."""
    torch.manual_seed(0)
    model = models.create("tiny_cnn", 10, 0.25, 3)
    opt = create("bc-adam", model, lr=1e-3, grid=grid, scale=scale, seed=0)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    for _ in range(3):
        weights = [p.detach().clone() for p in split_parameters(model)[0]]
        scales = [s.clone() for s in opt.scales()]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        changed = 0
        for before, s_before, after, s_after in zip(
            weights, scales, split_parameters(model)[0], opt.scales(), strict=True
        ):
            level = lambda w, s: torch.round(w / broadcast(s, w))  # noqa: E731
            changed += int((level(before, s_before) != level(after.detach(), s_after)).sum())
        assert opt.flip_rate() == changed / opt.num_quantized
        assert opt.flip_rate() < 0.5  # a small step moves few levels, though every value moved


def broadcast(s: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return s.reshape(s.shape + (1,) * (w.dim() - s.dim())) if s.dim() else s


def test_conv_except_first_keeps_the_first_convolution_in_full_precision():
    model = small_net()
    assert quantized_parameter_names(model, "conv-except-first") == ["3.weight"]
    opt = create("bc-adam", model, lr=0.05, policy="conv-except-first")
    assert opt.num_quantized == 8 * 8 * 9
    stem = model[0].weight.detach().clone()
    train_steps(model, opt, 3)
    assert binary().contains(model[3].weight.detach())
    assert not binary().contains(model[0].weight.detach())  # float values, never rounded
    assert not torch.equal(model[0].weight, stem)  # trained, by the full-precision group
    speednet = models.create("speednet", 10, 0.5, 3)
    every = quantized_parameter_names(speednet, "conv")
    assert quantized_parameter_names(speednet, "conv-except-first") == every[1:]
    assert every[0] == "blocks.1.0.weight"  # the whitening filters are a buffer, not a conv
