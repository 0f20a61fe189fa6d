"""Text read through a tokenizer (a Hugging Face model's), and the model's vocabulary limit.

A `TokenizerSpec` is a tokenizer as the `tokenizers` library serialises it (tokenizer.json),
with what identifies it: the class of the tokenizer it was taken from and the SHA-256 of its
vocabulary (every (token, id) pair, added tokens included, in id order). The text t becomes
ids = Tokenizer.encode(t, add_special_tokens=False): the tokens of the text itself, no BOS or
EOS, with truncation and padding off whatever the tokenizer file sets; ids decode with
Tokenizer.decode(ids, skip_special_tokens=False). Both need only the `tokenizers` package
(installed with transformers), so a checkpoint that stores the spec encodes and decodes
without the folder it came from.

`load_tokens` splits the n ids 90/10 (the first ⌊0.9 n⌋ train, the rest validation) into a
`qtrain.data.text.TextSplits` whose ``tokenizer`` is the spec, so batching, the exact-resume
rule (batch s a pure function of the seed and s) and the fixed validation windows are
`qtrain.data.text`'s. `check_vocab_limit` refuses a text whose ids reach a model's
vocab_size (a character-level text with more characters than the model has token ids).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property

import torch

from qtrain.base.errors import UserError
from qtrain.base.optional import require

from .errors import DataError
from .text import TRAIN_FRACTION, TextSplits


def _tokenizers():
    return require("tokenizers", "hf", "a Hugging Face tokenizer")


@dataclass(frozen=True)
class TokenizerSpec:
    """A tokenizer that encodes and decodes without its folder (module doc)."""

    name: str  # the class of the tokenizer it was taken from
    json: str = field(repr=False)  # the tokenizers library's serialisation (tokenizer.json)
    vocab_size: int  # token ids, added tokens included
    vocab_sha256: str  # of the (token, id) pairs in id order

    @classmethod
    def from_json(cls, name: str, text: str) -> TokenizerSpec:
        """The spec of a tokenizer.json text, its vocabulary measured."""
        backend = _tokenizers().Tokenizer.from_str(text)
        vocab = sorted(backend.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
        digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
        return cls(name, text, backend.get_vocab_size(with_added_tokens=True),
                   digest.hexdigest())  # fmt: skip

    @classmethod
    def from_transformers(cls, tokenizer) -> TokenizerSpec:
        """The spec of a transformers tokenizer (one with a `tokenizers` backend)."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise UserError(
                f"tokenizer {type(tokenizer).__name__} has no tokenizers backend, which qtrain "
                "stores with a run; save the folder's tokenizer with a tokenizer.json (a fast "
                "tokenizer)"
            )
        return cls.from_json(type(tokenizer).__name__, backend.to_str())

    @classmethod
    def from_record(cls, record: dict) -> TokenizerSpec:
        """The spec a checkpoint's model record stored (`to_record`); a record that is not
        one (a damaged or edited file) is one sentence."""
        try:
            return cls(str(record["class"]), str(record["json"]), int(record["vocab_size"]),
                       str(record["vocab_sha256"]))  # fmt: skip
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(
                f"the tokenizer the file records is damaged or was edited ({type(e).__name__}: "
                f"{e}); use another copy"
            ) from None

    def to_record(self) -> dict:
        return {"class": self.name, "vocab_size": self.vocab_size,
                "vocab_sha256": self.vocab_sha256, "json": self.json}  # fmt: skip

    def describe(self) -> str:
        """'tokenizer X (N tokens, vocabulary SHA-256 0123456789ab…)'."""
        return (f"tokenizer {self.name} ({self.vocab_size} tokens, vocabulary SHA-256 "
                f"{self.vocab_sha256[:12]}…)")  # fmt: skip

    def same_as(self, other: TokenizerSpec | None) -> bool:
        """True when `other` has the same class and vocabulary (what identifies a run's)."""
        return other is not None and (self.name, self.vocab_sha256) == (
            other.name,
            other.vocab_sha256,
        )

    @cached_property
    def backend(self):
        """The `tokenizers.Tokenizer`, truncation and padding off."""
        try:
            backend = _tokenizers().Tokenizer.from_str(self.json)
        except Exception as e:  # the tokenizers library raises plain Exceptions
            reason = " ".join(str(e).split())[:160]
            raise UserError(
                f"the tokenizer.json of {self.name} cannot be read ({reason}); save the "
                "tokenizer again, or use another copy of the file that recorded it"
            ) from None
        backend.no_truncation()
        backend.no_padding()
        return backend

    def encode(self, text: str) -> torch.Tensor:
        """int64 ids of `text` (no special tokens added)."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return torch.tensor(ids, dtype=torch.int64)

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)


def load_tokens(text: str, tokenizer: TokenizerSpec, *, block_size: int, source: str,
                name: str = "text") -> TextSplits:  # fmt: skip
    """`text` encoded by `tokenizer` and split 90/10 into `TextSplits` (windows of
    `block_size` + 1 tokens; each split must hold one)."""
    ids = tokenizer.encode(text)
    cut = int(len(ids) * TRAIN_FRACTION)
    for label, part in (("training", ids[:cut]), ("validation", ids[cut:])):
        if len(part) < block_size + 1:
            raise DataError(
                f"the {label} part of {source} ({len(part):,} tokens of {len(ids):,} by "
                f"{tokenizer.name}) is shorter than one window of block_size + 1 = "
                f"{block_size + 1} tokens; use a longer text or a smaller block_size"
            )
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return TextSplits(ids[:cut], ids[cut:], "", block_size, source, digest, name,
                      tokenizer=tokenizer)  # fmt: skip


def check_vocab_limit(splits: TextSplits, limit: int) -> None:
    """Refuse splits holding a token id ≥ `limit` (a model's vocab_size)."""
    if splits.num_classes <= limit:
        return
    if splits.tokenizer is None:
        raise DataError(
            f"{splits.source} has {splits.num_classes} distinct characters, but the model has "
            f"only {limit} token ids (vocab_size in its config.json); give the model's folder "
            f"its tokenizer, or use a text of at most {limit} distinct characters"
        )
    largest = int(max(splits.train.max(), splits.test.max()))
    if largest >= limit:
        raise DataError(
            f"{splits.tokenizer.describe()} gives {splits.source} token id {largest}, but the "
            f"model has only {limit} token ids (vocab_size in its config.json); use the "
            "tokenizer the model was made with"
        )
