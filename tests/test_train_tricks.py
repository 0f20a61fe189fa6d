"""Fast-training options, each on its own: whitening, speednet, label smoothing, TTA, the
weight average (EMA) and the held-out validation split."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qtrain import methods, models
from qtrain.base.errors import UserError
from qtrain.data.holdout import hold_out, sample_images
from qtrain.data.synthetic import make_synthetic
from qtrain.models.speednet import SpeedNet
from qtrain.models.whitening import (
    PatchWhitening,
    image_patches,
    whiten_,
    whiten_model_,
    whitening_filters,
)
from qtrain.quant import parse_grid, round_nearest
from qtrain.train import rundir
from qtrain.train.checkpoint import load_checkpoint
from qtrain.train.config import RunConfig, inapplicable
from qtrain.train.ema import WeightEMA, check_ema_decay, check_ema_horizon, horizon_decay
from qtrain.train.losses import check_label_smoothing, training_loss
from qtrain.train.rebuild import build_model
from qtrain.train.trainer import Trainer
from qtrain.train.tta import shift, tta_logits


def correlated_images(seed: int, n: int = 64) -> torch.Tensor:
    """Images whose channels and neighbouring pixels are strongly correlated."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, 12, 12, generator=g)
    smooth = F.avg_pool2d(F.pad(base, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.tensor([[1.0], [0.8], [-0.5]])
    return smooth * mix.view(1, 3, 1, 1) + 0.05 * torch.randn(n, 3, 12, 12, generator=g)


# -- whitening ---------------------------------------------------------------------------------
def test_whitening_filters_make_the_patch_covariance_the_identity_up_to_eps():
    patches = image_patches(correlated_images(0), 2).double()  # [n, 12]
    filters = whitening_filters(patches, eps=1e-3)
    d = patches.shape[1]
    assert filters.shape == (2 * d, d)
    assert torch.equal(filters[d:], -filters[:d])
    sigma = patches.T @ patches / patches.shape[0]
    eigenvalues = torch.linalg.eigvalsh(sigma).flip(0)
    whitened = filters[:d] @ sigma @ filters[:d].T  # covariance of z = W p
    expected = torch.diag(eigenvalues / (eigenvalues + 1e-3))
    torch.testing.assert_close(whitened, expected, atol=1e-8, rtol=1e-6)
    # the input is strongly correlated, so the identity is a real change
    assert (sigma - torch.diag(torch.diag(sigma))).abs().max() > 0.1


def test_whitening_layer_applies_its_filters_to_every_patch():
    images = correlated_images(1, n=8)
    layer = PatchWhitening(3, 2)
    whiten_(layer, images)
    with torch.no_grad():
        layer.bias.copy_(torch.linspace(-1, 1, 24))
    out = layer(images)  # [8, 24, 11, 11]
    assert out.shape == (8, 24, 11, 11)
    filters = whitening_filters(image_patches(images, 2)).float()
    by_patch = image_patches(images, 2) @ filters.T + layer.bias  # [8·121, 24]
    torch.testing.assert_close(out.permute(0, 2, 3, 1).reshape(-1, 24), by_patch, atol=1e-4,
                               rtol=1e-4)  # fmt: skip


def test_whitening_is_a_frozen_buffer_and_a_model_without_it_is_refused():
    net = models.create("speednet", width=0.125)
    assert "whiten.weight" in dict(net.named_buffers())
    assert "whiten.weight" not in dict(net.named_parameters())
    before = net.whiten.weight.clone()
    whiten_model_(net, correlated_images(2, n=4))
    assert not torch.equal(net.whiten.weight, before)
    with pytest.raises(ValueError, match="no patch-whitening layer.*whiten_init = false"):
        whiten_model_(models.create("tiny_cnn"), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"images \[N, 3, H, W\]"):
        whiten_(net.whiten, torch.zeros(2, 1, 8, 8))


# -- speednet ----------------------------------------------------------------------------------
def test_speednet_quantizes_every_convolution_and_keeps_whitening_and_head_float():
    net = models.create("speednet", width=0.25)
    quantized = methods.quantized_parameter_names(net, "conv")
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 6 and quantized == [f"{n}.weight" for n in convs]
    assert all(not n.startswith(("whiten", "head")) for n in quantized)
    assert [m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)] == [
        16, 16, 64, 64, 64, 64
    ]  # fmt: skip
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # BatchNorm has no learned scale: the only BN-side parameters are the shifts
    assert all(not m.affine for m in net.modules() if isinstance(m, nn.BatchNorm2d))


def test_speednet_trains_with_binary_weights_on_the_grid():
    torch.manual_seed(0)
    net = SpeedNet(num_classes=4, width=0.125, in_channels=3)
    opt = methods.create("bc-adam", net, lr=0.01)
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 4
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    for name, p in net.named_parameters():
        if name in methods.quantized_parameter_names(net, "conv"):
            assert set(p.unique().tolist()) <= {-1.0, 1.0}, name


def speednets_in_both_orders() -> tuple[nn.Module, nn.Module]:
    """speednet ×0.125 with BatchNorm before and after the pool, the same weights, and
    running statistics drawn at random (positive variances) shared by both."""
    nets = []
    for after in (False, True):
        torch.manual_seed(0)
        nets.append(models.create("speednet", width=0.125, options={"norm_after_pool": after}))
    before, after = nets
    generator = torch.Generator().manual_seed(1)
    for m in before.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(generator=generator)
            m.running_var.uniform_(0.5, 2.0, generator=generator)
    values = list(before.state_dict().values())
    assert [v.shape for v in values] == [v.shape for v in after.state_dict().values()]
    after.load_state_dict(dict(zip(after.state_dict(), values, strict=True)))
    return before, after


def test_norm_after_pool_is_the_same_function_in_eval_mode():
    """BN without a learned scale and its shift are increasing in x, so they commute with the
    max-pool, to the bit (rounding is monotonic too)."""
    before, after = speednets_in_both_orders()
    assert not before.config.norm_after_pool and after.config.norm_after_pool
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(before.eval()(x), after.eval()(x))


def test_norm_after_pool_takes_the_batch_statistics_of_the_pooled_map():
    before, after = speednets_in_both_orders()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    conv, pool = after.blocks[1][0], after.blocks[1][1]
    assert isinstance(pool, nn.MaxPool2d) and isinstance(after.blocks[1][2], nn.BatchNorm2d)
    norm_before, norm_after = before.blocks[1][1], after.blocks[1][2]
    start = norm_after.running_mean.clone()
    with torch.no_grad():
        features = conv(after.blocks[0](after.whiten(x)))
        before.train()(x), after.train()(x)
    momentum = norm_after.momentum
    for norm, seen in ((norm_before, features), (norm_after, pool(features))):
        expected = (1 - momentum) * start + momentum * seen.mean((0, 2, 3))
        torch.testing.assert_close(norm.running_mean, expected)


def test_norm_after_pool_is_speednets_alone_and_its_runs_rebuild_with_it(tmp_path):
    assert inapplicable(RunConfig(model="vgg9", norm_after_pool=True)) == (
        "norm_after_pool applies to image models that take it (speednet), not to model 'vgg9'; "
        "set it to False"
    )
    with pytest.raises(UserError, match="model 'vgg9' has no option norm_after_pool"):
        models.create("vgg9", options={"norm_after_pool": True})
    config = RunConfig(model="speednet", width=0.125, dataset="synthetic", norm_after_pool=True,
                       epochs=1, batch_size=128, device="cpu", threads=1, amp="off",
                       channels_last=False).validate()  # fmt: skip
    trainer = Trainer(config, tmp_path / "run", log=lambda *a, **k: None)
    trainer.run()
    record = load_checkpoint(tmp_path / "run" / rundir.CHECKPOINT)
    assert record["model"]["options"] == {"norm_after_pool": True}
    rebuilt = build_model(record)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert rebuilt.config.norm_after_pool
        assert torch.equal(rebuilt(x), trainer.model.eval()(x))


# -- label smoothing ---------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [0.0, 0.2, 0.5])
def test_label_smoothing_is_the_docstring_mixture(eps):
    g = torch.Generator().manual_seed(3)
    logits, y = torch.randn(16, 5, generator=g), torch.randint(0, 5, (16,), generator=g)
    logp = logits.log_softmax(1)
    expected = ((1 - eps) * -logp.gather(1, y[:, None]).squeeze(1) - eps * logp.mean(1)).mean()
    torch.testing.assert_close(training_loss(logits, y, eps), expected)
    if eps == 0:
        assert torch.equal(training_loss(logits, y), F.cross_entropy(logits, y))


@pytest.mark.parametrize("bad", [-0.1, 1.0, float("nan"), True])
def test_label_smoothing_outside_zero_one_is_refused(bad):
    with pytest.raises(ValueError, match="label_smoothing"):
        check_label_smoothing(bad)


# -- test-time augmentation --------------------------------------------------------------------
class Probe(nn.Module):
    """A fixed, position-dependent linear map: sensitive to flips and shifts."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.randn(3, 3 * 6 * 6, generator=torch.Generator().manual_seed(4))

    def forward(self, x):
        return x.flatten(1) @ self.weight.T


def test_tta_views_are_averaged_as_the_docstring_states():
    model, x = Probe(), torch.randn(5, 3, 6, 6, generator=torch.Generator().manual_seed(5))
    assert torch.equal(tta_logits(model, x, "none"), model(x))
    flip = tta_logits(model, x, "flip")
    torch.testing.assert_close(flip, tta_logits(model, x.flip(-1), "flip"))
    assert not torch.allclose(flip, model(x))
    m = lambda v: 0.5 * (model(v) + model(v.flip(-1)))  # noqa: E731
    expected = 0.5 * m(x) + 0.25 * m(shift(x, -1)) + 0.25 * m(shift(x, 1))
    torch.testing.assert_close(tta_logits(model, x, "flip-translate"), expected)
    with pytest.raises(ValueError, match="did you mean 'flip'"):
        tta_logits(model, x, "flp")


def test_shift_moves_the_image_by_one_pixel_with_reflected_borders():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    down = shift(x, 1)
    assert torch.equal(down[..., 1:, 1:], x[..., :-1, :-1])
    assert torch.equal(down[..., 0, 1:], x[..., 1, :-1])  # row −1 reflects row 1
    assert torch.equal(shift(x, -1)[..., :-1, :-1], x[..., 1:, 1:])


# -- weight average ----------------------------------------------------------------------------
def small_net() -> nn.Module:
    torch.manual_seed(6)
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3))  # fmt: skip


def train_steps(net, opt, ema, steps: int) -> None:
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x, y = torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        ema.update()


def test_ema_of_bc_averages_the_latent_weights_and_evaluates_them_rounded():
    net = small_net()
    opt = methods.create("bc-adam", net, lr=0.05)
    ema = WeightEMA(net, opt, decay=0.9)
    expected = opt.latent_weights()[0].clone()  # w_r of the conv, followed by hand
    linear = net[3].weight.detach().clone()
    for t in range(1, 6):
        train_steps(net, opt, ema, 1)
        d = min(0.9, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * opt.latent_weights()[0]
        linear = d * linear + (1 - d) * net[3].weight.detach()
    torch.testing.assert_close(ema.averages["0.weight"], expected)
    torch.testing.assert_close(ema.averages["3.weight"], linear)
    state = ema.evaluated_state()
    grid = parse_grid("binary")
    assert torch.equal(state["0.weight"], round_nearest(ema.averages["0.weight"], grid))
    # the average of w_r is not the average of w_b: a real difference to get wrong
    assert not torch.equal(state["0.weight"], ema.averages["0.weight"])


def test_ema_applied_evaluates_the_average_and_restores_the_live_weights_exactly():
    net = small_net()
    opt = methods.create("bc-adam", net, lr=0.05)
    ema = WeightEMA(net, opt, decay=0.8)
    train_steps(net, opt, ema, 4)
    live = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 6, 6)
    with ema.applied() as model:
        held = {k: v.clone() for k, v in model.state_dict().items()}
        averaged_out = model.eval()(x)
    net.train()
    for name, value in ema.evaluated_state().items():
        assert torch.equal(held[name], value), name
    assert not torch.equal(held["3.weight"], live["3.weight"])
    for name, value in net.state_dict().items():
        assert torch.equal(value, live[name]), name
    assert torch.isfinite(averaged_out).all()
    train_steps(net, opt, ema, 1)  # the optimizer's views survive the swap
    assert set(net[0].weight.unique().tolist()) <= {-1.0, 1.0}


def test_ema_state_round_trips_and_the_decay_is_checked():
    net = small_net()
    opt = methods.create("fp-adam", net, lr=0.05)
    ema = WeightEMA(net, opt, decay=0.9)
    train_steps(net, opt, ema, 3)
    other = WeightEMA(net, opt, decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 3
    for name, value in ema.averages.items():
        assert torch.equal(other.averages[name], value)
    with pytest.raises(ValueError, match="does not match"):
        WeightEMA(net, opt, decay=0.5).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="ema_decay"):
        check_ema_decay(1.0)


def test_a_horizon_gives_the_decay_whose_average_spans_that_fraction_of_the_run():
    # the weight of a step k steps back is d^k: it falls to 1/e after about 1/(1 − d) = h·S
    for horizon, steps in [(0.05, 2000), (0.05, 700), (0.1, 10_000)]:
        d = horizon_decay(horizon, steps)
        assert 1 / (1 - d) == pytest.approx(horizon * steps)
        assert d ** (horizon * steps) == pytest.approx(math.exp(-1), rel=0.02)
    assert horizon_decay(0.05, 2000) == pytest.approx(0.99)
    assert horizon_decay(0.05, 20) == 0.0 and horizon_decay(0.0, 500) == 0.0  # the live weights
    with pytest.raises(ValueError, match="ema_horizon must be in"):
        check_ema_horizon(1.5)


# -- validation split --------------------------------------------------------------------------
def test_held_out_images_are_disjoint_from_training_and_fixed_by_the_seed():
    splits = make_synthetic(num_train=100, num_test=10, image_size=4)
    train, val = hold_out(splits, 20, seed=3)
    assert len(val) == 20 and len(train.train) == 80
    rows = lambda d: {tuple(img.flatten().tolist()) for img in d.images}  # noqa: E731
    assert rows(val).isdisjoint(rows(train.train))
    assert rows(val) | rows(train.train) == rows(splits.train)
    again = hold_out(splits, 20, seed=3)[1]
    assert torch.equal(again.images, val.images)
    assert not torch.equal(hold_out(splits, 20, seed=4)[1].images, val.images)
    for bad in (0, 100, 2.5):
        with pytest.raises(ValueError, match="val_images"):
            hold_out(splits, bad, seed=3)
    assert len(sample_images(splits, 30, 0, "whitening")) == 30
