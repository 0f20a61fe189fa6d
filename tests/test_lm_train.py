"""Training a GPT through the trainer: grids after every step, exact resume, max_steps, the
warm-up + cosine schedule, gradient clipping, packed export and sampling."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from qtrain import methods
from qtrain.evaluate import evaluate_file
from qtrain.export.packed import read_packed, save_packed
from qtrain.sample import sample_file
from qtrain.train import rundir
from qtrain.train.checkpoint import load_checkpoint
from qtrain.train.config import RunConfig
from qtrain.train.rebuild import build_model
from qtrain.train.records import MEASURED_KEYS
from qtrain.train.schedules import warmup_cosine_factor
from qtrain.train.trainer import Trainer

ALPHABET = "abcdefgh ,.\n"
# The tests wrap optimizer.step to look at every step, which LambdaLR notices and warns about.
pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been")


def quiet(*_args, **_kwargs):
    pass


@pytest.fixture
def text_file(tmp_path):
    generator = torch.Generator().manual_seed(0)
    picks = torch.randint(len(ALPHABET), (4000,), generator=generator).tolist()
    path = tmp_path / "text.txt"
    path.write_text("".join(ALPHABET[i] for i in picks), encoding="utf-8")
    return path


def gpt_config(text_file, **changes) -> RunConfig:
    base = dict(
        model="gpt", dataset="shakespeare-char", text_file=str(text_file), policy="linear",
        n_layer=1, n_head=2, n_embd=16, block_size=8, batch_size=4, max_steps=6,
        eval_every=4, eval_batches=2, lr=0.01, schedule="warmup-cosine", warmup_steps=2,
        min_lr=0.001, beta2=0.99, weight_decay=0.1, grad_clip=1.0, method="bc-adamw",
        device="cpu", threads=1,
    )  # fmt: skip
    base.update(changes)
    return RunConfig(**base).validate()


def on_scaled_grid(weight: torch.Tensor, per_row: bool, binary: bool) -> bool:
    """Every row (or the whole tensor) holds ±Δ (and 0 on a ternary grid) for one Δ > 0."""
    rows = weight if per_row else weight.reshape(1, -1)
    for row in rows:
        magnitudes = row.abs().unique()
        nonzero = magnitudes[magnitudes > 0]
        if len(nonzero) != 1 or (binary and len(magnitudes) != 1):
            return False
    return True


@pytest.mark.parametrize(
    ("method", "grid", "scale"),
    [
        ("bc-adamw", "binary", "absmean"),
        ("bc-adamw", "ternary", "absmean-tensor"),
        ("sr-adamw", "binary", "none"),
        ("r-adamw", "ternary", "none"),
        ("bop-adam", "binary", "none"),
    ],
)
def test_every_quantized_linear_weight_is_on_its_grid_after_every_step(
    text_file, tmp_path, method, grid, scale
):
    config = gpt_config(text_file, method=method, grid=grid, scale=scale)
    trainer = Trainer(config, tmp_path / "run", log=quiet)
    names = set(trainer.quantized_names)
    params = dict(trainer.model.named_parameters())
    assert names == set(methods.quantized_parameter_names(trainer.model, "linear"))
    assert len(names) == 4  # qkv, attention and MLP projections of the one block
    real_step, steps = trainer.optimizer.step, []

    def step_and_check():
        result = real_step()
        for name in names:
            weight = params[name].detach()
            assert on_scaled_grid(weight, scale == "absmean", grid == "binary"), (name, steps)
        steps.append(len(steps))
        return result

    trainer.optimizer.step = step_and_check
    metrics = trainer.run()
    assert len(steps) == 6 and [m["step"] for m in metrics] == [4, 6]


def test_resume_after_a_crash_mid_run_is_bit_identical(text_file, tmp_path):
    config = gpt_config(text_file, checkpoint_every_steps=1, dropout=0.1)  # dropout draws RNG
    reference = Trainer(config, tmp_path / "ref", log=quiet).run()
    crashing = Trainer(config, tmp_path / "crash", log=quiet)
    real_step, calls = crashing.optimizer.step, {"n": 0}

    def step_then_crash():
        calls["n"] += 1
        if calls["n"] == 3:  # the third step of the first 4-step "epoch"
            raise RuntimeError("simulated crash")
        return real_step()

    crashing.optimizer.step = step_then_crash
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.run()
    saved = load_checkpoint(tmp_path / "crash" / rundir.CHECKPOINT)["training"]
    assert (saved["epoch"], saved["sums"]["batch"]) == (0, 2)
    resumed = Trainer(config, tmp_path / "crash", log=quiet).run(resume=True)

    def drop_timing(ms):
        return [{k: v for k, v in m.items() if k not in MEASURED_KEYS} for m in ms]

    assert drop_timing(resumed) == drop_timing(reference)
    a = load_checkpoint(tmp_path / "crash" / rundir.CHECKPOINT)
    b = load_checkpoint(tmp_path / "ref" / rundir.CHECKPOINT)
    for key, tensor in b["model_state"].items():
        assert torch.equal(a["model_state"][key], tensor), key
    assert a["training"]["finished"] and a["training"]["scheduler"] == b["training"]["scheduler"]


def test_records_hold_val_loss_and_bits_per_character(text_file, tmp_path):
    metrics = Trainer(gpt_config(text_file), tmp_path / "run", log=quiet).run()
    for record in metrics:
        assert record["val_loss"] == record["test_loss"]
        assert record["val_bpc"] == pytest.approx(record["val_loss"] / math.log(2))
    assert all(0 < m["val_loss"] < 2 * math.log(len(ALPHABET)) for m in metrics)
    summary = json.loads((tmp_path / "run" / rundir.SUMMARY).read_text())
    assert summary["final_val_bpc"] == metrics[-1]["val_bpc"] and summary["steps"] == 6


def test_warmup_cosine_is_nanogpts_schedule():
    lr, min_lr, warmup, total = 1e-3, 1e-4, 100, 2000
    r = min_lr / lr
    assert warmup_cosine_factor(0, total, warmup, r) * lr == pytest.approx(lr / 101)
    assert warmup_cosine_factor(99, total, warmup, r) == pytest.approx(100 / 101)
    assert warmup_cosine_factor(100, total, warmup, r) == pytest.approx(1.0)
    assert warmup_cosine_factor(1050, total, warmup, r) == pytest.approx((1 + r) / 2)
    assert warmup_cosine_factor(2000, total, warmup, r) == pytest.approx(r)
    assert warmup_cosine_factor(5000, total, warmup, r) == pytest.approx(r)


def test_the_learning_rate_follows_the_schedule_step_by_step(text_file, tmp_path):
    config = gpt_config(text_file, method="fp-adamw")
    trainer = Trainer(config, tmp_path / "run", log=quiet)
    real_step, seen = trainer.optimizer.step, []

    def record_lr():
        seen.append(trainer.optimizer.param_groups[0]["lr"])
        return real_step()

    trainer.optimizer.step = record_lr
    trainer.run()
    expected = [0.01 * warmup_cosine_factor(s, 6, 2, 0.1) for s in range(6)]
    assert seen == pytest.approx(expected)


def test_gradient_clipping_bounds_the_global_norm_before_every_step(text_file, tmp_path):
    trainer = Trainer(gpt_config(text_file, grad_clip=0.05), tmp_path / "run", log=quiet)
    real_step, norms = trainer.optimizer.step, []

    def measure():
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        return real_step()

    trainer.optimizer.step = measure
    trainer.run()
    assert len(norms) == 6 and max(norms) <= 0.05 * (1 + 1e-5)
    assert max(norms) > 0.04  # the raw gradients are larger, so clipping acted


def test_max_steps_stops_an_image_run_mid_epoch(tmp_path):
    config = RunConfig(model="tiny_mlp", dataset="synthetic", method="sr-adam", epochs=3,
                       batch_size=64, lr=0.05, device="cpu", max_steps=5)  # fmt: skip
    trainer = Trainer(config, tmp_path / "run", log=quiet)
    per_epoch = len(trainer.train_loader)
    assert per_epoch > 5
    metrics = trainer.run()
    assert [m["step"] for m in metrics] == [5]
    assert load_checkpoint(tmp_path / "run" / rundir.CHECKPOINT)["training"]["finished"]


def test_packed_ternary_gpt_gives_identical_logits_and_samples(text_file, tmp_path):
    config = gpt_config(text_file, grid="ternary", scale="absmean-tensor")
    Trainer(config, tmp_path / "run", log=quiet).run()
    record = load_checkpoint(tmp_path / "run" / rundir.CHECKPOINT)
    model = build_model(record)
    save_packed(tmp_path / "m.safetensors", record)
    loaded, packed_record = read_packed(tmp_path / "m.safetensors")
    assert packed_record["model"]["vocab"] == record["model"]["vocab"]
    assert loaded.lm_head.weight is loaded.tok_emb.weight  # the tie survives the round trip
    with safe_open(tmp_path / "m.safetensors", framework="pt") as f:  # stored once
        assert "tok_emb.weight" in f.keys() and "lm_head.weight" not in f.keys()  # noqa: SIM118
    idx = torch.randint(len(ALPHABET), (3, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    from_checkpoint = sample_file(tmp_path / "run", chars=40, seed=0)
    assert sample_file(tmp_path / "m.safetensors", chars=40, seed=0) == from_checkpoint
    assert len(from_checkpoint) == 41 and set(from_checkpoint) <= set(ALPHABET)
    assert sample_file(tmp_path / "run", chars=40, seed=1) != from_checkpoint
    prompted = sample_file(tmp_path / "run", chars=5, seed=0, prompt="abc", top_k=3)
    assert prompted.startswith("abc") and len(prompted) == 8


def test_eval_of_a_text_run_repeats_its_last_validation_loss(text_file, tmp_path):
    metrics = Trainer(gpt_config(text_file), tmp_path / "run", log=quiet).run()
    result = evaluate_file(tmp_path / "run")
    assert result["val_loss"] == pytest.approx(metrics[-1]["val_loss"], rel=1e-12)
    assert result["val_bpc"] == pytest.approx(metrics[-1]["val_bpc"], rel=1e-12)
    with pytest.raises(ValueError, match="evaluated on its text's validation windows"):
        evaluate_file(tmp_path / "run", split="val")
