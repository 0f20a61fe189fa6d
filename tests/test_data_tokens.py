"""Text read through a tokenizer (qtrain/data/tokens.py): the ids, the split, the batches and
what identifies a tokenizer; a model's vocabulary limit."""

from __future__ import annotations

import pytest
import torch

tokenizers = pytest.importorskip("tokenizers")

from qtrain.data.errors import DataError  # noqa: E402
from qtrain.data.text import TRAIN_FRACTION, load_text  # noqa: E402
from qtrain.data.tokens import TokenizerSpec, check_vocab_limit, load_tokens  # noqa: E402

WORDS = ("the", "cat", "sat", "on", "a", "mat")


def spec(words=WORDS, truncate: int | None = None) -> TokenizerSpec:
    vocab = {"[UNK]": 0, **{word: i + 1 for i, word in enumerate(words)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.decoder = tokenizers.decoders.WordPiece()
    if truncate:
        backend.enable_truncation(truncate)
    return TokenizerSpec.from_json("WordLevel", backend.to_str())


def text(count: int) -> str:
    picks = torch.randint(len(WORDS), (count,), generator=torch.Generator().manual_seed(0))
    return " ".join(WORDS[i] for i in picks.tolist())


def test_the_whole_text_is_encoded_without_special_tokens_or_truncation():
    tokenizer = spec(truncate=8)  # a tokenizer.json may set truncation: it is turned off
    ids = tokenizer.encode(text(100))
    assert ids.dtype == torch.int64 and len(ids) == 100 and int(ids.min()) >= 1
    assert tokenizer.decode(ids[:3].tolist()) == " ".join(text(100).split()[:3])
    assert tokenizer.encode("the dog").tolist() == [1, 0]  # an unknown word is [UNK]


def test_identity_is_the_class_and_the_vocabulary():
    a, b = spec(), spec(truncate=8)
    assert a.same_as(b) and a.vocab_sha256 == b.vocab_sha256 and a.vocab_size == 7
    assert not a.same_as(spec(words=tuple(reversed(WORDS))))  # the same tokens, other ids
    assert TokenizerSpec.from_record(a.to_record()) == a
    assert a.describe().startswith("tokenizer WordLevel (7 tokens, vocabulary SHA-256 ")


def test_token_splits_batch_as_character_splits_do():
    tokenizer = spec()
    splits = load_tokens(text(400), tokenizer, block_size=8, source="t")
    assert len(splits.train) == int(400 * TRAIN_FRACTION) and len(splits.test) == 40
    assert splits.num_classes == 7 and splits.vocab == ""
    assert splits.token_record() == {"tokenizer": tokenizer.to_record()}
    first = list(splits.loader("train", 4, seed=3, steps=2).epoch(1))
    again = list(splits.loader("train", 4, seed=3, steps=2).epoch(1, start_batch=1))
    assert torch.equal(first[1][0], again[0][0])  # batch s is a function of (seed, s)
    x, y = first[0]
    assert x.shape == (4, 8) and torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(DataError, match="shorter than one window"):
        load_tokens(text(40), tokenizer, block_size=8, source="t")


def test_a_text_beyond_the_models_vocabulary_is_one_sentence():
    characters = load_text("abcdefghij" * 20, block_size=4, source="t.txt")
    check_vocab_limit(characters, 10)
    with pytest.raises(DataError, match="t.txt has 10 distinct characters, but the model has "
                       "only 9 token ids"):  # fmt: skip
        check_vocab_limit(characters, 9)
    tokens = load_tokens(text(400), spec(), block_size=8, source="t")
    check_vocab_limit(tokens, 7)
    with pytest.raises(DataError, match="token id 6, but the model has only 6 token ids"):
        check_vocab_limit(tokens, 6)
