"""ImageNet folders through the trainer: a tiny generated JPEG tree, end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qtrain.data import ImageNetLoader
from qtrain.train import rundir
from qtrain.train.checkpoint import load_checkpoint
from qtrain.train.config import RunConfig, load_toml
from qtrain.train.records import MEASURED_KEYS
from qtrain.train.trainer import Trainer

Image = pytest.importorskip("PIL.Image")

CLASSES = ("n01440764", "n01443537")
TIMING_KEYS = MEASURED_KEYS  # what two runs of one config may differ in


def write_split(folder: Path, per_class: int, seed: int) -> None:
    """JPEGs of varied sizes whose colour depends on the class, so the task is learnable."""
    generator = torch.Generator().manual_seed(seed)
    for label, name in enumerate(CLASSES):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            height, width = 10 + 3 * (i % 3), 12 + 2 * (i % 4)
            base = torch.tensor([200.0, 40.0, 40.0] if label else [40.0, 40.0, 200.0])
            pixels = base + 30 * torch.randn(height, width, 3, generator=generator)
            image = Image.fromarray(pixels.clamp(0, 255).to(torch.uint8).numpy())
            image.save(folder / name / f"img_{i}.JPEG", quality=95)


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    write_split(root / "train", per_class=8, seed=0)
    write_split(root / "val", per_class=3, seed=1)
    return root


def imagenet_config(root: Path, **changes) -> RunConfig:
    base = dict(
        model="tiny_cnn",
        dataset="imagenet",
        data_dir=str(root),
        method="bc-adam",
        epochs=2,
        batch_size=4,
        eval_batch_size=4,
        device="cpu",
        channels_last=False,
    )
    return RunConfig(**{**base, **changes})


def quiet(*_args, **_kwargs):
    pass


def comparable(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in metrics]


def test_imagenet_trains_at_the_models_input_size_and_resumes_exactly(imagenet_root, tmp_path):
    config = imagenet_config(imagenet_root, checkpoint_every_steps=2)
    trainer = Trainer(config, tmp_path / "ref", log=quiet)
    loader = trainer.train_loader
    assert isinstance(loader, ImageNetLoader) and len(loader) == 4  # 16 images, batch 4
    assert loader.images.image_size == 8  # tiny_cnn's input size; resnet18 gets 224
    x, y = next(iter(loader.epoch(0)))
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    reference = trainer.run()
    assert [m["epoch"] for m in reference] == [1, 2]
    assert all(0 <= m["test_error"] <= 100 for m in reference)
    saved = load_checkpoint(tmp_path / "ref" / rundir.CHECKPOINT)
    assert saved["model"]["num_classes"] == 2 and saved["model"]["in_channels"] == 3

    crashing = Trainer(config, tmp_path / "crash", log=quiet)
    real_step, calls = crashing.optimizer.step, {"n": 0}

    def step_then_crash():
        calls["n"] += 1
        if calls["n"] == 7:  # epoch 2, batch 3: after the save at batch 2
            raise RuntimeError("simulated crash")
        return real_step()

    crashing.optimizer.step = step_then_crash
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.run()
    resumed = Trainer(config, tmp_path / "crash", log=quiet).run(resume=True)
    assert comparable(resumed) == comparable(reference)
    final = load_checkpoint(tmp_path / "crash" / rundir.CHECKPOINT)["model_state"]
    for key, value in saved["model_state"].items():
        assert torch.equal(final[key], value), key


def test_imagenet_train_subset_and_refused_options(imagenet_root, tmp_path):
    trainer = Trainer(imagenet_config(imagenet_root, train_subset=8), tmp_path / "a", log=quiet)
    assert len(trainer.train_loader.images) == 8
    with pytest.raises(ValueError, match="ImageNet training always uses random-resized crops"):
        Trainer(imagenet_config(imagenet_root, augment=False), tmp_path / "b", log=quiet)
    with pytest.raises(FileNotFoundError, match="put the ImageNet split there"):
        Trainer(imagenet_config(tmp_path / "missing"), tmp_path / "c", log=quiet)


@pytest.mark.parametrize(
    ("preset", "method", "batch"),
    [("resnet18-imagenet", "bc-adam", 128), ("resnet18-imagenet-sr-bigbatch", "sr-adam", 512)],
)
def test_imagenet_presets_are_table_1s_resnet18_rows(preset, method, batch):
    values = load_toml(preset)
    assert (values["model"], values["dataset"]) == ("resnet18", "imagenet")
    assert (values["method"], values["batch_size"], values["lr"]) == (method, batch, 0.01)
    # the global batch splits evenly over 1, 2, 4 or 8 GPUs
    assert all(values[key] % 8 == 0 for key in ("batch_size", "eval_batch_size"))
