"""qtrain's methods under PyTorch Lightning and Hugging Face Accelerate (the `frameworks` extra).

Each quantized method trains a tiny model through the framework's own loop, keeps every
quantized weight on its grid, and resumes from the framework's own checkpoint to weights
bit-identical to an uninterrupted run. Skipped when the framework is not installed.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from qtrain import methods, models
from qtrain.quant import parse_grid, round_nearest

METHODS = ("bc-adam", "sr-adam", "r-adam", "bop-adam")
GRID = parse_grid("binary")


def tiny_model() -> torch.nn.Module:
    """tiny_cnn: three quantized convolutions, so the optimizer's flat buffer backs several."""
    torch.manual_seed(0)
    return models.create("tiny_cnn", num_classes=4, width=0.25, in_channels=3)


def loader() -> DataLoader:
    """64 seeded 8×8 images in 4 batches, always in the same order."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def create_method(name: str, model: torch.nn.Module, init: str = "auto"):
    # In a few steps Bop's defaults flip almost nothing and R moves a weight only when
    # α·u(g) crosses half a spacing: a large γ and α make the test see flips
    extra = {"bop_gamma": 0.5} if name.startswith("bop") else {}
    lr = 1.5 if name.startswith("r-") else 0.01
    return methods.create(name, model, lr=lr, seed=7, init=init, **extra)


def assert_on_grid(model: torch.nn.Module) -> None:
    state = model.state_dict()
    names = methods.quantized_parameter_names(model, "conv")
    assert len(names) == 3
    for name in names:
        assert torch.equal(round_nearest(state[name], GRID), state[name]), name


def assert_quantized_weights_moved(start: dict, model: torch.nn.Module) -> None:
    state = model.state_dict()
    names = methods.quantized_parameter_names(model, "conv")
    assert any(not torch.equal(start[name], state[name]) for name in names)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


# -- PyTorch Lightning ------------------------------------------------------------------------
def lightning_module(name: str):
    L = pytest.importorskip("lightning")

    class Classifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny_model()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            # Lightning restores the weights before it calls this on resume; the default init
            # keeps weights that are already on the grid
            return create_method(name, self.net)

    return Classifier()


def lightning_fit(module, epochs: int, ckpt_path=None):
    L = pytest.importorskip("lightning")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("name", METHODS)
def test_lightning_trains_on_the_grid_and_resumes_bit_identically(name, tmp_path):
    before = lightning_module(name)
    start = {k: v.clone() for k, v in before.net.state_dict().items()}
    trainer = lightning_fit(before, epochs=1)
    assert_on_grid(before.net)
    assert trainer.optimizers[0].mode == name.split("-")[0]
    assert_quantized_weights_moved(start, before.net)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")

    resumed = lightning_module(name)
    lightning_fit(resumed, epochs=2, ckpt_path=tmp_path / "epoch1.ckpt")
    straight = lightning_module(name)
    lightning_fit(straight, epochs=2)
    assert_on_grid(resumed.net)
    assert_same_weights(resumed.net, straight.net)


# -- Hugging Face Accelerate ------------------------------------------------------------------
def accelerate_run(name: str, epochs: int, save_to=None, load_from=None, safe=False):
    """(model, optimizer) after `epochs` epochs, optionally from / to an Accelerate state."""
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    model = tiny_model()
    model, opt, data = accelerator.prepare(model, create_method(name, model), loader())
    if load_from is not None:
        accelerator.load_state(load_from)
    for _ in range(epochs):
        for x, y in data:
            opt.zero_grad()
            accelerator.backward(F.cross_entropy(model(x), y))
            opt.step()
    if save_to is not None:
        # the quantized parameters are views into one flat buffer, which safetensors refuses
        # to save or load: Accelerate's pickle format stores each view's values
        accelerator.save_state(save_to, safe_serialization=safe)
    return accelerator.unwrap_model(model), opt


@pytest.mark.parametrize("name", METHODS)
def test_accelerate_trains_on_the_grid_and_resumes_bit_identically(name, tmp_path):
    start = tiny_model().state_dict()
    first, _ = accelerate_run(name, epochs=1, save_to=tmp_path / "state")
    assert_on_grid(first)
    assert_quantized_weights_moved(start, first)

    resumed, opt = accelerate_run(name, epochs=1, load_from=tmp_path / "state")
    straight, _ = accelerate_run(name, epochs=2)
    assert opt.optimizer.mode == name.split("-")[0]
    assert_on_grid(resumed)
    assert_same_weights(resumed, straight)


def test_accelerates_default_safetensors_state_is_refused_not_loaded_wrong(tmp_path):
    """safetensors keeps one tensor per block of memory: the state it writes lacks all but one
    quantized weight, and loading it must fail loudly (docs/frameworks.md gives the flag)."""
    accelerate_run("sr-adam", epochs=1, save_to=tmp_path / "state", safe=True)
    with pytest.raises(RuntimeError, match="shared|storage"):
        accelerate_run("sr-adam", epochs=0, load_from=tmp_path / "state")
