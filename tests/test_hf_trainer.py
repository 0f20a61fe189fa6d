"""qtrain's methods under the Hugging Face `Trainer` (transformers, the `hf` extra).

A bare transformers Llama trains with a qtrain optimizer passed as
``Trainer(optimizers=(optimizer, scheduler))``: after every step each quantized weight is on
its grid (checked by a TrainerCallback), and a run resumed from the Trainer's own checkpoint
(``resume_from_checkpoint``) ends with weights and latent weights bit-identical to an
uninterrupted run, across an epoch boundary.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_folders import VOCAB, bare_model  # noqa: E402

from qtrain import methods  # noqa: E402
from qtrain.quant import parse_grid, round_nearest  # noqa: E402

STEPS, SAVE_AT = 12, 5  # 8 steps an epoch: the resumed run crosses into the second epoch
SETTINGS = {
    "bc-adamw": dict(grid="ternary", scale="absmean-tensor"),
    "sr-adamw": dict(grid="binary", scale="none"),
}


class Tokens(torch.utils.data.Dataset):
    """32 seeded windows of 16 token ids; the labels are the inputs (the model shifts them)."""

    def __init__(self) -> None:
        self.ids = torch.randint(VOCAB, (32, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def on_grid(weight: torch.Tensor, method: str) -> bool:
    if method == "sr-adamw":  # binary, no scale: every weight is ±1
        return torch.equal(round_nearest(weight, parse_grid("binary")), weight)
    magnitudes = weight.abs().unique()  # ternary with one scale: 0 and one magnitude
    return len(magnitudes[magnitudes > 0]) == 1


class GridCheck(transformers.TrainerCallback):
    """Asserts after every optimizer step that the quantized weights are on their grid."""

    def __init__(self, model, method: str) -> None:
        self.method, self.steps = method, 0
        params = dict(model.named_parameters())
        self.weights = [params[n] for n in methods.quantized_parameter_names(model, "linear")]

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1
        for weight in self.weights:
            assert on_grid(weight.detach(), self.method), state.global_step


def train(method: str, out, resume_from=None):
    """(model, optimizer, callback) after `STEPS` Trainer steps, from scratch or resumed."""
    model = bare_model("llama")
    optimizer = methods.create(method, model, lr=0.01, policy="linear", seed=0,
                               **SETTINGS[method])  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + 0.1 * step))
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=STEPS, save_steps=SAVE_AT, save_strategy="steps",
        per_device_train_batch_size=4, use_cpu=True, report_to=[], seed=0,
        logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    check = GridCheck(model, method)
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=Tokens(),
        optimizers=(optimizer, scheduler),
        callbacks=[check],
    )
    trainer.train(resume_from_checkpoint=resume_from)
    return model, optimizer, check


@pytest.mark.parametrize("method", SETTINGS)
def test_the_hf_trainer_keeps_the_grid_and_resumes_bit_identically(method, tmp_path):
    straight, straight_opt, check = train(method, tmp_path / "straight")
    assert check.steps == STEPS and len(check.weights) == 14  # 7 projections × 2 layers
    checkpoint = tmp_path / "straight" / f"checkpoint-{SAVE_AT}"
    assert (checkpoint / "optimizer.pt").is_file()
    resumed, resumed_opt, check = train(method, tmp_path / "resumed", resume_from=checkpoint)
    assert check.steps == STEPS - SAVE_AT
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(),
                            strict=True):  # fmt: skip
        assert torch.equal(a, b), name
    for a, b in zip(straight_opt.latent_weights(), resumed_opt.latent_weights(), strict=True):
        assert torch.equal(a, b)
    start = bare_model("llama").state_dict()
    head = "lm_head.weight"  # full precision: trained, not on a grid
    assert not torch.equal(start[head], straight.state_dict()[head])
