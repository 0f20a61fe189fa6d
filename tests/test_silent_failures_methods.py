"""Settings that used to fail silently: a weight average over tied weights, 1-D tensors under a
per-channel absmean scale, Rademacher starts with a measured scale, frozen parameters, and the
learning rate a Bop run reports."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from qtrain import methods
from qtrain.base.streams import stream_generator
from qtrain.methods import quantized_parameter_names
from qtrain.methods.scales import broadcastable, on_scaled_grid
from qtrain.models.gpt import build_gpt
from qtrain.quant import binary, round_nearest
from qtrain.train import rundir
from qtrain.train.checkpoint import load_checkpoint
from qtrain.train.config import RunConfig
from qtrain.train.ema import WeightEMA
from qtrain.train.rebuild import build_model
from qtrain.train.records import format_record
from qtrain.train.trainer import Trainer

ALPHABET = "abcdefgh ,.\n"


def quiet(*_args, **_kwargs):
    pass


def small_net(seed: int = 0) -> nn.Module:
    """Conv with bias, BatchNorm, linear: 4-D, 2-D and 1-D parameters."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    )


def train_steps(model, opt, steps: int, ema: WeightEMA | None = None) -> None:
    g = torch.Generator().manual_seed(11)
    for _ in range(steps):
        x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if ema is not None:
            ema.update()


def one_magnitude_per_channel(w: torch.Tensor) -> bool:
    """Every output channel of a ≥ 2-D tensor, or the whole of a 1-D one, holds ±s for one s:
    binary weights with one scale each, not one per element."""
    rows = w.reshape(1, -1) if w.dim() < 2 else w.reshape(w.shape[0], -1)
    return all(row.abs().unique().numel() == 1 for row in rows)


# -- 1. a weight average over tied weights ---------------------------------------------------
def tiny_gpt() -> nn.Module:
    torch.manual_seed(0)
    return build_gpt(11, block_size=8, n_layer=1, n_head=2, n_embd=16)


def train_gpt(model, opt, ema: WeightEMA, steps: int) -> None:
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        idx = torch.randint(0, 11, (4, 8), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
        opt.step()
        ema.update()


@pytest.mark.parametrize("scale", ["none", "absmean"])
@pytest.mark.parametrize("policy", ["conv+linear", "all"])
def test_the_average_of_a_tied_gpt_is_evaluated_on_the_grid(policy, scale):
    model = tiny_gpt()
    opt = methods.create("bc-adam", model, lr=0.05, policy=policy, scale=scale)
    ema = WeightEMA(model, opt, decay=0.9)
    train_gpt(model, opt, ema, 4)
    names = quantized_parameter_names(model, policy)
    assert "tok_emb.weight" in names and "lm_head.weight" not in names  # one tensor, first name
    assert "tok_emb.weight" in ema.averages and "lm_head.weight" not in ema.averages
    params = dict(model.named_parameters())
    with ema.applied():
        assert model.lm_head.weight is model.tok_emb.weight
        assert model.lm_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
        for name in names:
            w = params[name].detach()
            if scale == "none":
                assert torch.equal(w, round_nearest(ema.averages[name], binary())), name
            else:
                assert one_magnitude_per_channel(w), name
    # after the block the live weights are back, each on its grid
    for name, p, s in zip(names, opt.quantized, opt.scales(), strict=True):
        assert params[name] is p and on_scaled_grid(p.detach(), broadcastable(s, p), opt.grid)


@pytest.fixture
def text_file(tmp_path):
    generator = torch.Generator().manual_seed(0)
    picks = torch.randint(len(ALPHABET), (4000,), generator=generator).tolist()
    path = tmp_path / "text.txt"
    path.write_text("".join(ALPHABET[i] for i in picks), encoding="utf-8")
    return path


def test_a_checkpoint_of_a_tied_gpt_with_an_average_rebuilds_on_the_grid(text_file, tmp_path):
    config = RunConfig(
        model="gpt", dataset="shakespeare-char", text_file=str(text_file), policy="conv+linear",
        n_layer=1, n_head=2, n_embd=16, block_size=8, batch_size=4, max_steps=6, eval_every=3,
        eval_batches=1, lr=0.05, method="bc-adam", ema_decay=0.9, device="cpu", threads=1,
    ).validate()  # fmt: skip
    Trainer(config, tmp_path / "run", log=quiet).run()
    record = load_checkpoint(tmp_path / "run" / rundir.CHECKPOINT)
    assert "tok_emb.weight" in record["quantized"]
    assert "lm_head.weight" not in record["training"]["ema"]["averages"]
    # an older checkpoint also averaged the head under its own name, from w_b: never written
    # over the quantized tensor it shares
    old = dict(record, training=dict(record["training"]))
    averages = dict(record["training"]["ema"]["averages"])
    averages["lm_head.weight"] = torch.full_like(averages["tok_emb.weight"], 0.3)
    old["training"]["ema"] = dict(record["training"]["ema"], averages=averages)
    for saved in (record, old):
        model = build_model(saved)
        assert model.lm_head.weight is model.tok_emb.weight
        state = model.state_dict()
        for name in saved["quantized"]:
            assert binary().contains(state[name]), name


def test_an_average_saved_with_the_other_name_of_a_tied_weight_resumes():
    model = tiny_gpt()
    opt = methods.create("bc-adam", model, lr=0.05, policy="all")
    ema = WeightEMA(model, opt, decay=0.9)
    train_gpt(model, opt, ema, 2)
    saved = ema.state_dict()
    saved["averages"]["lm_head.weight"] = saved["averages"]["tok_emb.weight"].clone()
    again = WeightEMA(model, opt, decay=0.9)
    again.load_state_dict(saved)
    assert again.averages.keys() == ema.averages.keys()
    for name, value in ema.averages.items():
        assert torch.equal(again.averages[name], value), name
    saved["averages"]["not.a.tensor"] = saved["averages"]["tok_emb.weight"]
    with pytest.raises(ValueError, match="does not match"):
        again.load_state_dict(saved)


# -- 2. per-channel absmean of a 1-D tensor --------------------------------------------------
def test_policy_all_with_absmean_gives_a_1d_parameter_one_scale():
    model = small_net()
    opt = methods.create("bc-adam", model, lr=0.05, policy="all", scale="absmean")
    train_steps(model, opt, 3)
    one_d = 0
    for p, s, w_r in zip(opt.quantized, opt.scales(), opt.latent_weights(), strict=True):
        assert on_scaled_grid(p.detach(), broadcastable(s, p), opt.grid)
        if p.dim() == 1:
            one_d += 1
            assert s.dim() == 0
            torch.testing.assert_close(s, w_r.abs().mean())
            assert p.abs().unique().numel() == 1  # ±s: quantized, not w_r itself
            assert not torch.equal(p.detach(), w_r)
        else:
            assert s.shape == p.shape[:1]
        assert one_magnitude_per_channel(p.detach())
    assert one_d == 4  # conv bias, BatchNorm weight and bias, linear bias


# -- 3. Rademacher signs with a measured scale -----------------------------------------------
@pytest.mark.parametrize("scale", ["absmean", "absmean-tensor"])
def test_rademacher_init_with_a_measured_scale_draws_signs_times_the_initial_absmean(scale):
    model = small_net()
    quantized, _ = methods.split_parameters(model, "conv+linear")
    before = [p.detach().clone() for p in quantized]
    opt = methods.create(
        "bc-adam", model, lr=0.05, policy="conv+linear", scale=scale, init="rademacher", seed=3
    )
    signs = [torch.empty_like(w) for w in before]
    methods.rademacher_(signs, binary(), stream_generator(3, "grid-init"))
    for w0, sign, w_r, s, p in zip(
        before, signs, opt.latent_weights(), opt.scales(), opt.quantized, strict=True
    ):
        if scale == "absmean":
            s0 = w0.abs().mean(dim=tuple(range(1, w0.dim())))
        else:
            s0 = w0.abs().mean()
        expected = sign * broadcastable(s0, w0)
        torch.testing.assert_close(w_r, expected)
        torch.testing.assert_close(s, s0)  # the drawn weights keep the measured scale
        torch.testing.assert_close(p.detach(), expected)
    train_steps(model, opt, 2)
    for p, s in zip(opt.quantized, opt.scales(), strict=True):
        assert on_scaled_grid(p.detach(), broadcastable(s, p), opt.grid)


# -- 4. frozen parameters --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["bc-adam", "sr-adam", "bop-adam"])
@pytest.mark.parametrize("policy", ["conv", "all"])
def test_a_frozen_conv_is_neither_quantized_nor_listed(name, policy):
    model = small_net()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    opt = methods.create(name, model, lr=0.05, policy=policy)
    train_steps(model, opt, 2)
    names = quantized_parameter_names(model, policy)
    params = dict(model.named_parameters())
    assert "0.weight" not in names
    assert [id(params[n]) for n in names] == [id(p) for p in opt.quantized]
    assert torch.equal(model[0].weight, frozen)  # kept as the user froze it


# -- 5. the learning rate a run reports ------------------------------------------------------
@pytest.mark.parametrize("name", ["bop-adam", "bop2-adam"])
def test_bop_reports_the_learning_rate_of_its_full_precision_group(name):
    model = small_net()
    opt = methods.create(name, model, lr=0.01)
    assert [g["name"] for g in opt.param_groups] == ["quantized", "full_precision"]
    opt.param_groups[0]["lr"] = 7.0  # unused: Bop flips with γ and τ
    assert opt.learning_rate == opt.param_groups[1]["lr"] == 0.01
    everything = methods.create(name, small_net(), lr=0.01, policy="all")
    assert len(everything.param_groups) == 1 and everything.learning_rate is None


def test_other_methods_report_the_learning_rate_of_their_first_group():
    opt = methods.create("bc-adam", small_net(), lr=0.02)
    opt.param_groups[0]["lr"] = 0.5
    assert opt.learning_rate == 0.5
    assert methods.create("fp-sgd", small_net(), lr=0.03).learning_rate == 0.03


def tiny_config(**changes) -> RunConfig:
    base = dict(
        model="tiny_mlp", dataset="synthetic", method="bop-adam", epochs=2, batch_size=64,
        lr=0.05, device="cpu", channels_last=False, eval_batch_size=128,
    )  # fmt: skip
    return RunConfig(**{**base, **changes})


def test_a_bop_run_records_the_full_precision_learning_rate_or_none(tmp_path):
    lines: list[str] = []
    records = Trainer(tiny_config(), tmp_path / "conv", log=quiet).run()
    assert [r["lr"] for r in records] == pytest.approx([0.05, 0.005])
    binary_only = Trainer(tiny_config(policy="all"), tmp_path / "all", log=lines.append).run()
    assert [r["lr"] for r in binary_only] == [None, None]
    assert [r["lr"] for r in rundir.read_metrics(tmp_path / "all")] == [None, None]
    assert lines[-1] == format_record(binary_only[-1], 2)
    assert " lr " not in lines[-1] and "flips" in lines[-1]
