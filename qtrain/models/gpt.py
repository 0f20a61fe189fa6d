"""A decoder-only transformer language model (GPT-2 layout, as in nanoGPT), a plain nn.Module.

With C = n_embd, h = n_head, L = n_layer, V = vocab_size and tokens idx ∈ {0..V−1}^{B×T}:

    x₀ = E_tok[idx] + E_pos[0..T−1]                              (then dropout)
    xₗ' = xₗ₋₁ + Dropout(W_o · Attn(LN₁(xₗ₋₁)))                   (pre-LayerNorm blocks)
    xₗ  = xₗ' + Dropout(W_2 · GELU(W_1 · LN₂(xₗ')))               (MLP width 4C)
    logits = W_head · LN_f(x_L)                                  ([B, T, V])

Attn is causal multi-head self-attention: [q, k, v] = W_qkv·x split into h heads of size C/h,
head = softmax(q kᵀ/√(C/h) + M) v with M_ij = −∞ for j > i, through
`torch.nn.functional.scaled_dot_product_attention(is_causal=True)`; so the logits at
position t depend on tokens 0..t only. With `tie_weights`, W_head is E_tok (one parameter).

Initialisation (GPT-2): every linear and embedding weight ~ N(0, 0.02²), biases 0, LayerNorms
(1, 0); the two projections that write into the residual stream (W_o and W_2) ~ N(0, σ²) with
σ = 0.02/√(2L), so the residual stream's variance does not grow with depth.

Parameter count (b = 1 with biases, else 0):
    V·C·(1 if tie_weights else 2) + T_max·C + L·(12C² + 2C + 11bC) + C + bC
(per block: LayerNorms 2C, W_qkv 3C², W_o C², W_1 4C², W_2 4C²; with biases 2C + 3C + C + 4C
+ C; then LN_f, and the untied head).

Quantization: the model declares its output head full precision (`full_precision_modules`),
so the policy `linear` quantizes exactly the four projections of each block (W_qkv, W_o, W_1,
W_2) and keeps embeddings, LayerNorms and the head in full precision, as BitNet b1.58 does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from qtrain.base.errors import UserError
from qtrain.base.names import unknown_name

from .registry import register_model


@dataclass(frozen=True)
class GPTConfig:
    """Size of a GPT; the defaults are nanoGPT's CPU baby GPT on tiny Shakespeare (bias off and
    tied weights as nanoGPT trains it)."""

    vocab_size: int
    block_size: int = 64  # the context: the most tokens the model reads at once
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False  # biases in the linear layers and LayerNorms
    tie_weights: bool = True  # the output head is the token embedding

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"GPT {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise UserError(
                f"GPT n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                "choose n_embd as a multiple of n_head"
            )
        dropout = self.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise UserError(f"GPT dropout must be a number in [0, 1), got {dropout!r}")
        if not 0 <= dropout < 1:
            raise UserError(f"GPT dropout must be in [0, 1), got {dropout!r}")
        for name in ("bias", "tie_weights"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"GPT {name} must be true or false, got {getattr(self, name)!r}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: W_o · concat_heads(softmax(q kᵀ/√d + M) v)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, C] → [B, T, C]; position t attends to positions 0..t only."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # each [B, T, C]
        # heads become a batch dimension: [B, T, C] → [B, h, T, C/h]
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # [B, h, T, C/h]
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    """W_2 · GELU(W_1 x), hidden width 4C."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, C] → [B, T, C]."""
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + Attn(LN₁ x), then + MLP(LN₂ ·)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, C] → [B, T, C]."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only transformer: token + position embeddings, blocks, final LayerNorm, head."""

    # kept in full precision by the `linear` quantization policy (qtrain.methods.policy)
    full_precision_modules = ("lm_head",)

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.tok_emb.weight  # both [V, C]: one parameter
        self.apply(_init_weights)
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=residual_std)
            nn.init.normal_(block.mlp.proj.weight, std=residual_std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] (int64, T ≤ block_size) → next-token logits [B, T, vocab_size]."""
        check_token_ids(idx)
        length, block_size = idx.shape[1], self.config.block_size
        if length > block_size:
            raise UserError(
                f"the sequence has {length} tokens but the model's context (block_size) is "
                f"{block_size}; pass at most {block_size} tokens (crop to the last {block_size})"
            )
        pos = torch.arange(length, device=idx.device)  # [T]
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # [B, T, C]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # [B, T, V]

    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        *,
        generator: torch.Generator,
        temperature: float = 1.0,
        top_k: int | None = None,
    ) -> torch.Tensor:
        """Extend idx [B, T] by `max_new_tokens` sampled tokens → [B, T + max_new_tokens]
        (`generate_tokens` with the model's block_size as its context)."""
        return generate_tokens(self, idx, max_new_tokens, context=self.config.block_size,
                               generator=generator, temperature=temperature,
                               top_k=top_k)  # fmt: skip


@torch.no_grad()
def generate_tokens(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    context: int | None,
    generator: torch.Generator,
    temperature: float = 1.0,
    top_k: int | None = None,
    num_tokens: int | None = None,
) -> torch.Tensor:
    """Extend idx [B, T] by `max_new_tokens` tokens sampled from `model` (token ids [B, t] →
    logits [B, t, V]) → [B, T + max_new_tokens].

    Each new token is drawn from softmax(logits/temperature) at the last position, the logits
    restricted to the first `num_tokens` ids (all when None: a model whose output is wider
    than its text's vocabulary never draws an id the text does not have) and then to the
    `top_k` largest when given; the model reads only the last `context` tokens (all when
    None). Sampling runs in eval mode (no dropout; the mode is restored) and draws only from
    `generator` (on idx's device), so a seeded generator repeats the text.
    """
    check_token_ids(idx)
    _check_sampling(idx, max_new_tokens, generator, temperature, top_k)
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            window = idx if context is None else idx[:, -context:]  # [B, ≤ context]
            logits = model(window)[:, -1, :num_tokens] / temperature  # [B, V]
            if top_k is not None and top_k < logits.shape[-1]:
                kth = torch.topk(logits, top_k).values[:, -1:]  # [B, 1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)  # [B, 1]
            idx = torch.cat((idx, nxt), dim=1)
    finally:
        model.train(was_training)
    return idx


def check_token_ids(idx, model: str = "GPT") -> None:
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.int64:
        shape = list(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise UserError(
            f"{model} input must be an int64 tensor of token ids shaped [batch, time], got {shape} "
            f"({getattr(idx, 'dtype', None)}); pass idx.long() of shape [B, T]"
        )
    if idx.shape[1] == 0:
        raise UserError("the sequence has no tokens; pass at least one token per row")


def _check_sampling(idx, max_new_tokens, generator, temperature, top_k) -> None:
    n = max_new_tokens
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise UserError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise UserError(f"temperature must be a finite number > 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise UserError(f"top_k must be a positive integer or None, got {top_k!r}")
    if not isinstance(generator, torch.Generator):
        raise UserError(
            f"generate needs a torch.Generator, got {type(generator).__name__}; pass "
            "generator=torch.Generator(device=idx.device).manual_seed(seed)"
        )
    if generator.device.type != idx.device.type:
        raise UserError(
            f"the generator is on {generator.device} but the tokens are on {idx.device}; "
            "create it with torch.Generator(device=idx.device)"
        )


def _init_weights(module: nn.Module) -> None:
    """GPT-2 initialisation: N(0, 0.02²) weights, zero biases (LayerNorms keep (1, 0))."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


GPT_OPTIONS = ("block_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "tie_weights")


@register_model("gpt", input_size=GPTConfig.block_size, dataset="shakespeare-char",
                modality="text", options=GPT_OPTIONS)  # fmt: skip
def build_gpt(vocab_size: int, **options) -> GPT:
    """Decoder-only transformer language model (GPT-2 layout, nanoGPT sizes).

    GPT for `vocab_size` tokens sized by `options` (the `GPTConfig` fields, its defaults).
    """
    for name in options:
        if name not in GPT_OPTIONS:
            raise unknown_name("GPT option", name, GPT_OPTIONS)
    return GPT(GPTConfig(vocab_size=vocab_size, **options))
