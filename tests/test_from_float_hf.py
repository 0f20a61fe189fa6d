"""init_from and distill_from with Hugging Face folders (the model hf): a run starts from
another folder of its config, a teacher folder teaches, and another config, another model or
another tokenizer is refused in one line."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from hf_folders import words_text, write_folder, write_tokenizer  # noqa: E402

from qtrain.base.errors import UserError  # noqa: E402
from qtrain.models.hf import hf_model_from_folder  # noqa: E402
from qtrain.train import rundir  # noqa: E402
from qtrain.train.checkpoint import load_checkpoint  # noqa: E402
from qtrain.train.config import RunConfig  # noqa: E402
from qtrain.train.sources import weights_sha256  # noqa: E402
from qtrain.train.trainer import Trainer  # noqa: E402


def quiet(*_args, **_kwargs):
    pass


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two llama folders of one config with other weights (seeds 0 and 1), and a text."""
    root = tmp_path_factory.mktemp("hf")
    (root / "words.txt").write_text(words_text(600), encoding="utf-8")
    return {
        "run": write_folder(root / "run", "llama"),
        "start": write_folder(root / "start", "llama", seed=1),
        "text": root / "words.txt",
    }


def hf_run(folders, **changes) -> RunConfig:
    values = dict(model="hf", dataset="shakespeare-char", hf_path=str(folders["run"]),
                  text_file=str(folders["text"]), policy="linear", block_size=16, batch_size=4,
                  max_steps=2, eval_every=2, eval_batches=1, lr=0.01, method="bc-adamw",
                  grid="ternary", scale="absmean-tensor", device="cpu", threads=1,
                  amp="off")  # fmt: skip
    return RunConfig(**{**values, **changes}).validate()


def test_an_hf_run_starts_from_another_folder_of_its_config(folders, tmp_path):
    trainer = Trainer(hf_run(folders, init_from=str(folders["start"])), tmp_path / "r", log=quiet)
    try:
        want = dict(hf_model_from_folder(folders["start"]).named_parameters())
        for name, latent in zip(trainer.quantized_names, trainer.optimizer.latent_weights(),
                                strict=True):  # fmt: skip
            assert torch.equal(latent, want[name].detach()), name
        embedding = "model.model.embed_tokens.weight"
        assert torch.equal(dict(trainer.model.named_parameters())[embedding], want[embedding])
        record = trainer.sources["init_from"]
        assert record["kind"] == "Hugging Face folder" and record["model"] == "hf"
        assert record["sha256"] == weights_sha256(hf_model_from_folder(folders["start"])
                                                  .state_dict())  # fmt: skip
    finally:
        trainer.close()


def test_a_folder_of_another_config_or_model_is_refused(folders, tmp_path):
    deeper = write_folder(tmp_path / "deeper", "llama", num_hidden_layers=3)
    with pytest.raises(UserError, match="hf_config has num_hidden_layers=3, not this run's 2"):
        Trainer(hf_run(folders, init_from=str(deeper)), tmp_path / "a", log=quiet)
    gpt = RunConfig(model="gpt", dataset="shakespeare-char", text_file=str(folders["text"]),
                    n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, max_steps=2,
                    eval_every=2, eval_batches=1, device="cpu", policy="linear",
                    init_from=str(folders["start"]))  # fmt: skip
    with pytest.raises(UserError, match="holds model 'hf', not this run's 'gpt'"):
        Trainer(gpt, tmp_path / "b", log=quiet)


def test_a_teacher_folder_teaches_an_hf_student(folders, tmp_path):
    config = hf_run(folders, distill_from=str(folders["start"]), distill_weight=0.5)
    records = Trainer(config, tmp_path / "kd", log=quiet).run()
    assert math.isfinite(records[-1]["train_loss"])
    saved = load_checkpoint(tmp_path / "kd" / rundir.CHECKPOINT)["distill_from"]
    assert saved["kind"] == "Hugging Face folder"


def test_a_teacher_with_a_tokenizer_does_not_teach_a_run_on_characters(folders, tmp_path):
    teacher = write_folder(tmp_path / "teacher", "llama", seed=1)
    write_tokenizer(teacher)
    config = hf_run(folders, distill_from=str(teacher))
    with pytest.raises(UserError, match="has the tokenizer .* but this run's text has the "):
        Trainer(config, tmp_path / "kd", log=quiet)
