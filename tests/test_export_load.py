"""`qtrain.export.load`: a plain eval-mode nn.Module whose logits equal the training model's."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from qtrain import methods, models
from qtrain.export import load, save_packed
from qtrain.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from qtrain.train.config import RunConfig
from qtrain.train.trainer import Trainer

pytest.importorskip("safetensors")


def train(name: str, **options):
    """A tiny_cnn trained four steps with method `name`; (model in eval mode, its record)."""
    torch.manual_seed(0)
    model = models.create("tiny_cnn", 10, 0.25, 3)
    opt = methods.create(name, model, lr=0.05, seed=2, **options)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    record = {
        "model": {"name": "tiny_cnn", "num_classes": 10, "width": 0.25, "in_channels": 3},
        "method": {"name": name, "grid": opt.grid.to_dict(), "policy": "conv"},
        "quantized": methods.quantized_parameter_names(model),
        "model_state": model.state_dict(),
        "config": {"seed": 2},
    }
    return model.eval(), record


def assert_same_logits(trained: torch.nn.Module, loaded: torch.nn.Module) -> None:
    assert type(loaded) is type(trained)
    assert not loaded.training
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected, actual = trained(x), loaded(x)
    assert torch.equal(actual, expected)
    # ordinary parameters: each owns its memory (not views into an optimizer's flat buffer)
    pointers = [p.untyped_storage().data_ptr() for p in loaded.parameters()]
    assert len(set(pointers)) == len(pointers)


def test_a_bc_checkpoint_from_the_trainer_loads_with_the_training_models_logits(tmp_path):
    config = RunConfig(
        model="tiny_cnn", dataset="synthetic", method="bc-adam", epochs=1, batch_size=64,
        width=0.25, lr=0.01, device="cpu", channels_last=False, augment=False,
    )  # fmt: skip
    trainer = Trainer(config, tmp_path, log=lambda *a, **k: None)
    trainer.run()
    loaded = load(tmp_path)  # the run folder
    assert_same_logits(trainer.model.eval(), loaded)
    assert_same_logits(trainer.model, load(tmp_path / "checkpoint.pt"))


def test_an_sr_packed_file_loads_with_the_training_models_logits(tmp_path):
    trained, record = train("sr-adam")
    save_packed(tmp_path / "sr.safetensors", record)
    assert_same_logits(trained, load(tmp_path / "sr.safetensors"))


@pytest.mark.parametrize("scale", ["absmean", "absmean-tensor"])
def test_a_scaled_grid_checkpoint_and_its_packed_file_load_exactly(tmp_path, scale):
    trained, record = train("bc-adam", scale=scale)
    conv = trained.features[0][0].weight
    assert not torch.equal(conv.abs(), torch.ones_like(conv))  # levels ±s, s ≠ 1
    save_checkpoint(tmp_path / "checkpoint.pt", record)
    save_packed(tmp_path / "scaled.safetensors", load_checkpoint(tmp_path / "checkpoint.pt"))
    assert_same_logits(trained, load(tmp_path / "checkpoint.pt"))
    assert_same_logits(trained, load(tmp_path / "scaled.safetensors"))


def test_a_file_that_is_no_model_is_refused_in_one_sentence(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a model")
    with pytest.raises(CheckpointError, match="neither a qtrain checkpoint nor a packed model"):
        load(path)


def test_a_run_with_its_first_convolution_in_float_loads_with_its_logits(tmp_path):
    config = RunConfig(
        model="tiny_cnn", dataset="synthetic", method="bc-adam", epochs=1, batch_size=64,
        width=0.25, lr=0.01, device="cpu", channels_last=False, augment=False,
        policy="conv-except-first",
    )  # fmt: skip
    trainer = Trainer(config, tmp_path / "run", log=lambda *a, **k: None)
    trainer.run()
    record = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    every = methods.quantized_parameter_names(trainer.model, "conv")
    assert record["quantized"] == every[1:]
    save_packed(tmp_path / "packed.safetensors", record)
    for source in (tmp_path / "run", tmp_path / "packed.safetensors"):
        loaded = load(source)
        assert_same_logits(trainer.model.eval(), loaded)
        weights = dict(loaded.named_parameters())
        assert not torch.equal(weights[every[0]].abs(), torch.ones_like(weights[every[0]]))
        assert all(torch.equal(weights[n].abs(), torch.ones_like(weights[n])) for n in every[1:])
