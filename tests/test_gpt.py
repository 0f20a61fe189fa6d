"""The GPT: causal attention, shapes, parameter count, tying, sampling, quantized training."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from qtrain.methods import create, quantized_parameter_names, split_parameters
from qtrain.methods.scales import broadcastable, measured_scale, on_scaled_grid
from qtrain.models.gpt import GPT, GPTConfig, build_gpt
from qtrain.quant import parse_grid

PROJECTIONS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")


def tiny(seed: int = 0, **options) -> GPT:
    torch.manual_seed(seed)
    sizes = {"block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 16} | options
    return build_gpt(11, **sizes)


def tokens(batch: int, length: int, vocab: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def expected_parameters(c: GPTConfig) -> int:
    """V·C·(1 + untied) + T·C + L·(12C² + 2C + 11·b·C) + C + b·C (the module docstring)."""
    C, b = c.n_embd, int(c.bias)
    embeddings = c.vocab_size * C * (1 if c.tie_weights else 2) + c.block_size * C
    return embeddings + c.n_layer * (12 * C * C + 2 * C + 11 * b * C) + C + b * C


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tie", [False, True])
def test_logits_are_batch_by_time_by_vocabulary(bias, tie):
    model = tiny(bias=bias, tie_weights=tie)
    for length in (1, 7, 16):
        assert model(tokens(3, length)).shape == (3, length, 11)


def test_attention_is_causal():
    """Changing token t changes the logits at t and later, never one before t (exactly)."""
    model = tiny(n_layer=3).eval()
    idx = tokens(2, 16)
    base = model(idx)
    for t in (0, 5, 15):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 11
        out = model(changed)
        assert torch.equal(out[:, :t], base[:, :t]), t
        assert not torch.equal(out[:, t], base[:, t]), t


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"bias": True},
        {"tie_weights": False},
        {"bias": True, "tie_weights": False, "n_layer": 3, "n_embd": 24, "n_head": 3},
    ],
)
def test_parameter_count_follows_the_formula(options):
    model = tiny(**options)
    assert sum(p.numel() for p in model.parameters()) == expected_parameters(model.config)


def test_nanogpts_cpu_baby_gpt_has_its_0_80m_parameters():
    model = build_gpt(65)
    assert model.config == GPTConfig(65, 64, 4, 4, 128, 0.0, False, True)
    assert sum(p.numel() for p in model.parameters()) == expected_parameters(model.config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 0.80


def test_tied_weights_are_one_tensor_and_untied_are_two():
    tied, untied = tiny(), tiny(tie_weights=False)
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.lm_head.weight is not untied.tok_emb.weight
    idx = tokens(2, 8)
    F.cross_entropy(tied(idx).flatten(0, 1), idx.flatten()).backward()
    # the shared gradient sums the embedding's and the head's contributions
    assert tied.tok_emb.weight.grad is tied.lm_head.weight.grad


def test_initialisation_is_gpt2s_with_scaled_residual_projections():
    model = tiny(n_layer=4, n_embd=64, n_head=4)
    residual = 0.02 / (2 * 4) ** 0.5
    for block in model.blocks:
        assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert block.mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert block.attn.proj.weight.std().item() == pytest.approx(residual, rel=0.1)
        assert block.mlp.proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_linear_policy_quantizes_exactly_the_four_projections_of_each_block():
    for tie in (True, False):
        model = tiny(n_layer=3, tie_weights=tie)
        expected = [f"blocks.{i}.{name}.weight" for i in range(3) for name in PROJECTIONS]
        assert quantized_parameter_names(model, "linear") == expected
        quantized, full = split_parameters(model, "linear")
        assert [id(p) for p in quantized] == [id(model.get_parameter(name)) for name in expected]
        assert id(model.lm_head.weight) in {id(p) for p in full}
        assert len(quantized) + len(full) == len(list(model.parameters()))
    # `all` quantizes the tied embedding/head once
    assert len(quantized_parameter_names(model, "all")) == len(list(model.parameters()))


def train_on_random_tokens(model, opt, steps: int, check) -> int:
    """`steps` optimizer steps on random tokens, `check()` after each; how many quantized
    weights changed in all."""
    quantized = [model.get_parameter(n) for n in quantized_parameter_names(model, "linear")]
    changed = 0
    for step in range(steps):
        before = [p.detach().clone() for p in quantized]
        idx = tokens(4, 16, seed=100 + step)
        opt.zero_grad()
        F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()).backward()
        opt.step()
        check(quantized)
        changed += sum(int((p != b).sum()) for p, b in zip(quantized, before, strict=True))
    return changed


def test_bc_adamw_keeps_every_projection_on_its_absmean_ternary_grid():
    """BitNet b1.58: w_b = s·RoundClip(w_r/s, −1, 1), s = mean|w_r| of the matrix, every step."""
    model = tiny()
    opt = create(
        "bc-adamw", model, lr=0.01, grid="ternary", scale="absmean-tensor", policy="linear"
    )
    grid = parse_grid("ternary")

    def check(quantized):
        for w, s, w_r in zip(quantized, opt.scales(), opt.latent_weights(), strict=True):
            assert torch.equal(s, measured_scale("absmean-tensor", w_r))
            assert on_scaled_grid(w.detach(), s, grid)
            assert set(w.detach().abs().unique().tolist()) <= {0.0, s.item()}

    check([model.get_parameter(n) for n in quantized_parameter_names(model, "linear")])
    assert train_on_random_tokens(model, opt, 4, check) > 0
    # embeddings and the head stayed in full precision
    assert model.tok_emb.weight.unique().numel() > 3


@pytest.mark.parametrize(
    "method, settings",
    [
        ("sr-adamw", {"lr": 0.3}),
        ("r-adamw", {"lr": 1.2}),
        ("bop-adam", {"lr": 0.01, "bop_gamma": 0.3, "bop_tau": 1e-4}),
    ],
)
def test_latent_free_methods_keep_every_projection_on_the_binary_grid(method, settings):
    model = tiny()
    opt = create(method, model, grid="binary", scale="he", policy="linear", seed=1, **settings)
    grid = parse_grid("binary")

    def check(quantized):
        for w, s in zip(quantized, opt.scales(), strict=True):
            assert on_scaled_grid(w.detach(), broadcastable(s, w), grid)

    assert train_on_random_tokens(model, opt, 3, check) > 0


def test_a_tiny_gpt_learns_a_sequence_that_needs_attention():
    """After 0 comes 1, 2 or 3 in turn (0 1 0 2 0 3 ...): the token two back decides, so only
    attention can bring the loss below a bigram model's ln(3)/2 ≈ 0.55 nats."""
    torch.manual_seed(0)
    model = build_gpt(4, block_size=16, n_layer=2, n_head=2, n_embd=32)
    text = torch.tensor([0, 1, 0, 2, 0, 3] * 40)
    opt = create("fp-adamw", model, lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        starts = torch.randint(0, len(text) - 17, (8,), generator=g)
        window = torch.stack([text[s : s + 17] for s in starts.tolist()])  # [8, 17]
        opt.zero_grad()
        loss = F.cross_entropy(model(window[:, :-1]).flatten(0, 1), window[:, 1:].flatten())
        loss.backward()
        opt.step()
    # late positions have seen the whole cycle; only the first few are ambiguous
    with torch.no_grad():
        window = text[6:22].unsqueeze(0)
        late = F.cross_entropy(model(window[:, :-1])[0, 4:], window[0, 5:])
    assert late.item() < 0.05


def test_generate_is_reproducible_and_only_draws_from_its_generator():
    model = tiny(dropout=0.1).train()
    prompt = tokens(2, 3)

    def sample(seed: int) -> torch.Tensor:
        torch.manual_seed(seed + 1000)  # the global generator must not matter
        return model.generate(prompt, 20, generator=torch.Generator().manual_seed(seed))

    first = sample(0)
    assert first.shape == (2, 23)
    assert torch.equal(first[:, :3], prompt)
    assert torch.equal(sample(0), first)
    assert not torch.equal(sample(1), first)
    assert model.training  # the mode is restored after sampling in eval mode


def test_generate_crops_the_context_to_the_block_size():
    model = tiny(block_size=8)
    seen = []
    model.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[1]))
    out = model.generate(tokens(1, 8), 12, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 20)
    assert seen == [8] * 12


def test_top_k_of_one_is_greedy_decoding():
    model = tiny().eval()
    out = model.generate(tokens(2, 2), 6, generator=torch.Generator().manual_seed(0), top_k=1)
    for t in range(2, 8):
        assert torch.equal(out[:, t], model(out[:, :t])[:, -1].argmax(-1))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"n_embd": 30, "n_head": 4}, r"n_embd \(30\) must be divisible by n_head \(4\)"),
        ({"n_layer": 0}, "n_layer must be a positive integer"),
        ({"block_size": 2.5}, "block_size must be a positive integer"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"bias": "no"}, "bias must be true or false"),
        ({"n_heads": 4}, "unknown GPT option 'n_heads' \\(did you mean 'n_head'\\?\\)"),
    ],
)
def test_bad_sizes_get_one_sentence(options, message):
    with pytest.raises(ValueError, match=message):
        build_gpt(11, **options)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: m(tokens(1, 17)), r"17 tokens but the model's context \(block_size\) is 16"),
        (lambda m: m(tokens(1, 4).float()), "int64 tensor of token ids"),
        (lambda m: m(tokens(1, 0)), "no tokens"),
        (lambda m: m.generate(tokens(1, 4), 2, generator=None), "needs a torch.Generator"),
        (
            lambda m: m.generate(tokens(1, 4), 2, generator=torch.Generator(), temperature=0),
            "temperature must be a finite number > 0",
        ),
        (
            lambda m: m.generate(tokens(1, 4), 2, generator=torch.Generator(), top_k=0),
            "top_k must be a positive integer",
        ),
    ],
)
def test_bad_inputs_get_one_sentence(call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny())
