"""qtrain's training step against a plain PyTorch loop: the same model, optimizer and batches.

    python benchmarks/bench_step_overhead.py [--rounds 7] [--data-dir ../shared/data]

Two cases, one intra-op thread, float32:

- tiny_cnn on the embedded digits, batch 32, BC-ADAM (one round: an epoch, 46 steps);
- the GPT of the preset gpt-shakespeare (4 layers, width 128, context 64, batch 12), BC-ADAMW
  on its block projections (one round: 25 steps), on tiny Shakespeare when --data-dir holds
  it, else on a generated text of the same alphabet.

"qtrain" is one round of `Trainer._train_epoch`: its loader, the quantized optimizer, the
divergence check, the running sums, the schedule and the time-budget and signal checks.
"plain" is a bare loop over the same batches, taken from the same loader once before timing:
forward, cross-entropy, zero_grad, backward, and the same `QuantizedOptimizer.step` (a
second Trainer's model and optimizer, built from the same config, so both start equal).
"loop" is the bare loop again with the base optimizer stepping tensor by tensor in a Python
loop (`foreach = False`, PyTorch's default on a CPU) instead of in one foreach call, as qtrain
does. Rounds alternate (`speed_common.interleave`); the ratio of median round times to
"plain" is what the trainer (or the loop) adds to a step. Run it with nothing else on the
machine.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from speed_common import DEFAULT_DATA_DIR, interleave, machine_line, median, train_round

from qtrain.train.config import RunConfig, load_toml
from qtrain.train.trainer import Trainer

ALPHABET = "abcdefghijklmnopqrstuvwxyz ,.;:!?'\nABCDEFGHIJKLMNOPQRSTUVWXYZ-"


def quiet(*_args, **_kwargs):
    pass


def digits_config() -> RunConfig:
    return RunConfig(model="tiny_cnn", dataset="digits", method="bc-adam", batch_size=32,
                     epochs=1000, schedule="constant", device="cpu", amp="off",
                     threads=1)  # fmt: skip


def gpt_config(data_dir: Path, scratch: Path) -> RunConfig:
    values = {**load_toml("gpt-shakespeare"), "method": "bc-adamw", "grid": "ternary",
              "scale": "absmean-tensor", "eval_every": 25, "eval_batches": 1, "amp": "off",
              "device": "cpu", "threads": 1}  # fmt: skip
    if (data_dir / "tinyshakespeare" / "input.txt").is_file():
        values["data_dir"] = str(data_dir / "tinyshakespeare")
    else:
        generator = torch.Generator().manual_seed(0)
        picks = torch.randint(len(ALPHABET), (400_000,), generator=generator).tolist()
        text = scratch / "text.txt"
        text.write_text("".join(ALPHABET[i] for i in picks))
        values["text_file"] = str(text)
    return RunConfig(**values)


def plain_round(trainer: Trainer, batches: list) -> None:
    """The bare loop: forward, loss, zero_grad, backward, step, over ready-made batches."""
    model, optimizer = trainer.model, trainer.optimizer
    model.train()
    for x, y in batches:
        loss = F.cross_entropy(model(x).flatten(0, -2), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def measure(name: str, config: RunConfig, scratch: Path, rounds: int) -> float:
    qtrain = Trainer(config, scratch / f"{name}-qtrain", log=quiet, progress=False)
    twin = Trainer(config, scratch / f"{name}-plain", log=quiet, progress=False)
    looped = Trainer(config, scratch / f"{name}-looped", log=quiet, progress=False)
    for group in looped.optimizer.base.param_groups:  # PyTorch's own CPU default
        group["foreach"] = False
    batches = list(twin.train_loader.epoch(0))
    times = interleave(
        {
            "qtrain": lambda r: train_round(qtrain, r),
            "plain": lambda r: plain_round(twin, batches),
            "looped": lambda r: plain_round(looped, batches),
        },
        rounds,
    )
    steps = len(batches)
    q, p, lp = (median(times[k]) for k in ("qtrain", "plain", "looped"))
    print(f"{name:32s} {steps:5d} {1e3 * p / steps:12.2f} {1e3 * q / steps:12.2f} {q / p:8.3f} "
          f"{lp / p:12.3f}")  # fmt: skip
    return q / p


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(machine_line())
    print(f"{'case':32s} {'steps':>5s} {'plain ms/step':>12s} {'qtrain ms/st':>12s} {'ratio':>8s} "
          f"{'loop ÷ plain':>12s}")  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        measure("tiny_cnn digits, batch 32, BC", digits_config(), scratch, args.rounds)
        measure("gpt-shakespeare, BC-ADAMW tern.", gpt_config(args.data_dir, scratch), scratch,
                args.rounds)  # fmt: skip


if __name__ == "__main__":
    main()
