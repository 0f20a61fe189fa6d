"""Tiny Hugging Face model folders for the tests, built offline from a config (no download).

Each family (Llama, GPT-2, Qwen2) has hidden width 32, 2 layers, 70 token ids and a context of
64 positions; `write_folder` saves one with save_pretrained (config.json and
model.safetensors), `write_tokenizer` adds a word-level tokenizer saved as a
PreTrainedTokenizerFast. Callers skip when transformers is not installed.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 70
CONTEXT = 64
FAMILIES = ("llama", "gpt2", "qwen2")
# the block projections the policy `linear` quantizes, per layer (names inside the model)
PROJECTIONS = {
    "llama": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "gpt2": ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    "qwen2": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
}  # fmt: skip
LAYERS = {"llama": "model.layers", "gpt2": "transformer.h", "qwen2": "model.layers"}
WORDS = ("the", "cat", "sat", "on", "a", "mat", "dog", "ran", "to", "her", "and", "his",
         "red", "hat", "was", "big")  # fmt: skip


def config(family: str, **changes):
    """The tiny transformers config of `family` (Qwen2's head tied to its token embedding)."""
    import transformers

    if family == "gpt2":
        values = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=CONTEXT,
                      bos_token_id=0, eos_token_id=0)  # fmt: skip
        return transformers.GPT2Config(**{**values, **changes})
    values = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                  bos_token_id=1, eos_token_id=2)  # fmt: skip
    if family == "qwen2":
        return transformers.Qwen2Config(**{**values, "tie_word_embeddings": True, **changes})
    return transformers.LlamaConfig(**{**values, **changes})


def bare_model(family: str, seed: int = 0, **changes):
    """A randomly initialised transformers causal LM of `family` (sdpa attention)."""
    import transformers

    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(
        config(family, **changes), attn_implementation="sdpa"
    )


def write_folder(path: Path, family: str, *, weights: bool = True, **changes) -> Path:
    """A model folder of `family` at `path`: config.json, and model.safetensors with
    `weights`."""
    model = bare_model(family, **changes)
    model.save_pretrained(path)
    if not weights:
        (path / "model.safetensors").unlink()
    return path


def words_text(count: int, seed: int = 0) -> str:
    """`count` words of `WORDS` drawn with a seeded generator, a newline every 12."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(WORDS), (count,), generator=generator).tolist()
    return "".join(WORDS[i] + ("\n" if n % 12 == 11 else " ") for n, i in enumerate(picks))


def write_tokenizer(path: Path, words=WORDS) -> None:
    """A word-level tokenizer ([UNK] then `words`, split on whitespace) saved into `path` as
    transformers' PreTrainedTokenizerFast."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{word: i + 1 for i, word in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tokenizer.save_pretrained(path)
