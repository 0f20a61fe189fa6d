"""A small seeded text and a one-block GPT run config on it, for tests that train text runs
in seconds (the smoke budget of qtrain/experiments/lm.py)."""

from __future__ import annotations

import torch

from qtrain.train.config import RunConfig

ALPHABET = "abcdefgh ,.\n"
SMOKE = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, max_steps=4,
             eval_every=2, eval_batches=2)  # fmt: skip


def write_text(path, seed: int = 0, alphabet: str = ALPHABET):
    """3,000 characters of `alphabet` drawn by a generator seeded with `seed`, into `path`."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(alphabet), (3000,), generator=generator).tolist()
    path.write_text("".join(alphabet[i] for i in picks), encoding="utf-8")
    return path


def gpt(text_file, **changes) -> RunConfig:
    """A float one-block GPT on `text_file` (policy linear, float32, one thread), changed by
    `changes`."""
    values = dict(model="gpt", dataset="shakespeare-char", text_file=str(text_file),
                  policy="linear", lr=0.01, schedule="warmup-cosine", warmup_steps=1,
                  method="fp-adamw", device="cpu", threads=1, amp="off", **SMOKE)  # fmt: skip
    return RunConfig(**{**values, **changes}).validate()
