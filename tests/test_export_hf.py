"""`qtrain export RUN --format hf`: a run of the hf model as a folder transformers loads.

Tiny Llama, Qwen2 and GPT-2 folders (tests/hf_folders.py: hidden 32, 2 layers, every block
projection's out_features a multiple of 4) train two steps through `qtrain train`; each run
is exported, loaded with ``AutoModelForCausalLM.from_pretrained`` and its logits compared with
`qtrain.export.load(RUN)`'s on seeded token ids. transformers' BitLinear runs its unpacking
and activation rounding through ``torch.compile``, which on a CPU compiles C++ kernels for
tens of seconds on first use; the tests run them eagerly (`eager_bitlinear`), the same
operations.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from hf_folders import words_text, write_folder, write_tokenizer  # noqa: E402
from transformers.integrations import bitnet as hf_bitnet  # noqa: E402

from qtrain.cli import main  # noqa: E402
from qtrain.export import load  # noqa: E402
from qtrain.export.hf import WEIGHTS_FILE, pack_bitnet, unpack_bitnet  # noqa: E402
from qtrain.models.act_quant import ActQuantLinear, apply_act_quant  # noqa: E402
from qtrain.models.hf import hf_state_dict  # noqa: E402

ERRORS_DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"


def assert_bitnet_agrees(got: torch.Tensor, expected: torch.Tensor) -> None:
    """BitLinear sums integer products exactly and divides once, qtrain multiplies x̂ = q/s_x
    by s·t: the same numbers up to float32 rounding (measured: a median of 2e-7 of the largest
    |logit| per token), except where an activation lies within an ulp of a rounding boundary
    and the two round it to neighbouring levels (measured: about 1% of the tokens after 20
    training steps, up to 3e-4 of the largest |logit|). A wrong scale or packing is O(1)."""
    per_token = (got - expected).abs().amax(-1) / expected.abs().max()
    assert per_token.median() <= 1e-6, per_token.median()
    assert (per_token <= 1e-5).float().mean() >= 0.95
    assert per_token.max() <= 1e-2, per_token.max()


@pytest.fixture(autouse=True)
def eager_bitlinear():
    with torch._dynamo.config.patch(disable=True):
        yield


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    made = {family: write_folder(root / family, family) for family in ("llama", "qwen2", "gpt2")}
    made["llama-tokenizer"] = write_folder(root / "llama-tokenizer", "llama")
    write_tokenizer(made["llama-tokenizer"])
    return made


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text(words_text(600), encoding="utf-8")
    return path


TERNARY = ("--method", "bc-adamw", "--grid", "ternary", "--set", "scale=absmean-tensor")
RUNS = {
    "llama-a8-rms": ("llama", *TERNARY, "--set", "act_bits=8"),
    "llama-a8-none": ("llama", *TERNARY, "--set", "act_bits=8", "--set", "act_norm=none"),
    "qwen2-a8-rms": ("qwen2", *TERNARY, "--set", "act_bits=8"),
    "llama-binary-a8": ("llama", "--method", "bc-adamw", "--grid", "binary", "--set", "act_bits=8"),
    "llama-weights": ("llama", *TERNARY),
    "llama-fp": ("llama", "--method", "fp-adamw"),
    "llama-rows-a8": ("llama", "--method", "bc-adamw", "--grid", "ternary", "--set",
                      "scale=absmean", "--set", "act_bits=8"),
    "llama-a4": ("llama", *TERNARY, "--set", "act_bits=4"),
    "gpt2-a8": ("gpt2", *TERNARY, "--set", "act_bits=8"),
    "gpt2-weights": ("gpt2", "--method", "bc-adamw", "--grid", "binary"),
    "tokenizer-a8": ("llama-tokenizer", *TERNARY, "--set", "act_bits=8"),
}  # fmt: skip


@pytest.fixture(scope="module")
def runs(folders, text_file, tmp_path_factory) -> dict[str, Path]:
    """Every run of `RUNS`, two steps each, trained on first use."""
    root = tmp_path_factory.mktemp("runs")

    class Runs(dict):
        def __missing__(self, name):
            family, *options = RUNS[name]
            out = root / name
            argv = [
                "train", "--model", "hf", "--dataset", "shakespeare-char",
                "--set", f"hf_path={folders[family]}", "--set", f"text_file={text_file}",
                "--set", "policy=linear", "--set", "block_size=16", "--batch-size", "4",
                "--set", "max_steps=2", "--set", "eval_every=2", "--set", "eval_batches=1",
                "--set", "device=cpu", "--set", "threads=1", "--out", str(out), *options,
            ]  # fmt: skip
            assert main(argv) == 0
            self[name] = out
            return out

    return Runs()


def run_cli(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def export(run: Path, out: Path, capsys, *extra) -> list[str]:
    """`qtrain export run --format hf --out out`: the lines it printed."""
    code, stdout, stderr = run_cli(["export", run, "--format", "hf", "--out", out, *extra], capsys)
    assert code == 0, stderr
    return stdout.strip().splitlines()


def from_pretrained(folder: Path):
    """The folder's model, every stored tensor used and none missing."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), output_loading_info=True
    )
    assert not any(info.values()), info
    return model.eval()


def token_ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(vocab, (16, 16), generator=torch.Generator().manual_seed(seed))


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    """[B, T, V] logits of a transformers model or of a qtrain model."""
    with torch.no_grad():
        if isinstance(model, transformers.PreTrainedModel):
            return model(input_ids=ids).logits
        return model(ids)


def without_act_quant(model: nn.Module) -> nn.Module:
    """`model` with each ActQuantLinear back to a plain nn.Linear of the same weight and bias."""
    for name, module in list(model.named_modules()):
        if isinstance(module, ActQuantLinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=False)
            linear.weight, linear.bias = module.weight, module.bias
            model.set_submodule(name, linear)
    return model


def stored(folder: Path) -> dict[str, torch.Tensor]:
    return safetensors_torch.load_file(str(folder / WEIGHTS_FILE))


# -- the bitnet layout ------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(4, 3), (32, 16), (64, 7)])
def test_packing_is_transformers_pack_weights_layout(shape):
    values = torch.randint(-1, 2, shape, generator=torch.Generator().manual_seed(shape[0]))
    packed = pack_bitnet(values)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0] // 4, shape[1])
    assert torch.equal(packed, hf_bitnet.pack_weights(values.clone()))
    assert torch.equal(hf_bitnet.unpack_weights(packed, dtype=torch.float32), values.float())
    assert torch.equal(unpack_bitnet(packed), values.to(torch.int8))
    # rows q, q + R/4, q + R/2, q + 3R/4 share a byte, value + 1 in bits 2i..2i+1
    q = shape[0] // 4
    expected = sum((int(values[q * i, 0]) + 1) << (2 * i) for i in range(4))
    assert int(packed[0, 0]) == expected


@pytest.mark.parametrize(
    "name", ["llama-a8-rms", "llama-a8-none", "qwen2-a8-rms", "llama-binary-a8"]
)
def test_an_a8_ternary_run_is_bitnet_with_qtrains_logits(name, runs, tmp_path, capsys):
    run, out = runs[name], tmp_path / "hf"
    lines = export(run, out, capsys)
    assert len(lines) == 1 and "bitnet weights" in lines[0], lines
    rms = not name.endswith("none")
    quantization = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quantization == {
        "quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline",
        "use_rms_norm": rms, "rms_norm_eps": 1e-6, "modules_to_not_convert": ["lm_head"],
    }  # fmt: skip
    qtrain_model = load(run)
    act_quant = {n.removeprefix("model.") for n, m in qtrain_model.named_modules()
                 if isinstance(m, ActQuantLinear)}  # fmt: skip
    model = from_pretrained(out)
    bit = {n for n, m in model.named_modules() if isinstance(m, hf_bitnet.BitLinear)}
    assert bit == act_quant and len(bit) == 14
    assert type(model.lm_head) is nn.Linear
    assert all((m.rms_norm is not None) == rms for n, m in model.named_modules() if n in bit)

    tensors, own = stored(out), dict(qtrain_model.named_modules())
    for layer in bit:
        weight = own[f"model.{layer}"].weight.detach()
        s = weight.abs().max()
        assert tensors[f"{layer}.weight"].dtype == torch.uint8
        assert torch.equal(unpack_bitnet(tensors[f"{layer}.weight"]).float() * s, weight)
        assert tensors[f"{layer}.weight_scale"].item() == pytest.approx(1 / s.item(), rel=1e-7)

    ids = token_ids(20)
    assert_bitnet_agrees(logits_of(model, ids), logits_of(qtrain_model, ids))


def test_a_weights_only_run_is_float_and_exact_and_bitnet_on_request(runs, tmp_path, capsys):
    run = runs["llama-weights"]
    lines = export(run, tmp_path / "float", capsys)
    assert lines[0].startswith("float weights: this run keeps its activations in float")
    assert "float weights" in lines[-1]
    config = json.loads((tmp_path / "float" / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    qtrain_model, ids = load(run), token_ids(20)
    assert torch.equal(logits_of(from_pretrained(tmp_path / "float"), ids),
                       logits_of(qtrain_model, ids))  # fmt: skip

    lines = export(run, tmp_path / "bitnet", capsys, "--bitnet")
    assert lines[0].startswith("warning: this run keeps its activations in float, but")
    model = from_pretrained(tmp_path / "bitnet")
    assert sum(isinstance(m, hf_bitnet.BitLinear) for m in model.modules()) == 14
    # what it computes: the run's weights with 8-bit inputs and no norm
    modules = [n.removesuffix(".weight") for n in load_record(run)["quantized"]]
    description = {"bits": 8, "norm": "none", "modules": modules}
    quantized_inputs = apply_act_quant(load(run), description)
    assert_bitnet_agrees(logits_of(model, ids), logits_of(quantized_inputs, ids))


def load_record(run: Path) -> dict:
    from qtrain.train.checkpoint import load_checkpoint

    return load_checkpoint(run)


def test_a_float_run_is_float_and_exact(runs, tmp_path, capsys):
    lines = export(runs["llama-fp"], tmp_path / "hf", capsys)
    assert lines[0] == "float weights: this run quantizes no linear layer"
    ids = token_ids(20)
    assert torch.equal(logits_of(from_pretrained(tmp_path / "hf"), ids),
                       logits_of(load(runs["llama-fp"]), ids))  # fmt: skip


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("llama-rows-a8", "float weights: scale 'absmean' gives each output row of "
         "model.layers.0.self_attn.q_proj its own scale, and transformers' bitnet format holds "
         "one weight_scale per tensor"),
        ("llama-a4", "float weights: this run quantizes activations to 4 bits, and "
         "transformers' BitLinear quantizes every input to 8 bits"),
        ("gpt2-a8", "float weights: transformer.h.0.attn.c_attn is a Conv1D layer in "
         "transformers' model, which its bitnet format does not convert"),
    ],
)  # fmt: skip
def test_an_a8_run_the_format_cannot_hold_is_float_with_a_note(name, why, runs, tmp_path, capsys):
    run, out = runs[name], tmp_path / "hf"
    lines = export(run, out, capsys)
    assert lines[0] == why
    rounding = "so its logits differ from qtrain's by the activation rounding"
    assert lines[1].startswith("activation quantization (act_bits ")
    assert lines[1].endswith(f"{rounding} and the RMSNorms it leaves out")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    qtrain_model = load(run)
    tensors = stored(out)
    expected = {k: v for k, v in hf_state_dict(qtrain_model).items() if ".rms_norm." not in k}
    assert set(tensors) <= set(expected)
    assert all(torch.equal(tensors[k], expected[k]) for k in tensors)
    # the folder is the run without its activation quantization, exactly
    ids = token_ids(20)
    model = from_pretrained(out)
    assert torch.equal(logits_of(model, ids), logits_of(without_act_quant(qtrain_model), ids))


def test_bitnet_on_request_for_other_activation_bits_warns(runs, tmp_path, capsys):
    lines = export(runs["llama-a4"], tmp_path / "hf", capsys, "--bitnet")
    assert lines[0].startswith("warning: this run quantizes activations to 4 bits, but")
    assert "bitnet weights" in lines[-1]


def test_a_binary_gpt2_is_float_and_exact_with_its_tied_head(runs, tmp_path, capsys):
    run, out = runs["gpt2-weights"], tmp_path / "hf"
    export(run, out, capsys)
    assert "lm_head.weight" not in stored(out)  # tied to the token embedding, stored once
    model, ids = from_pretrained(out), token_ids(20)
    assert torch.equal(logits_of(model, ids), logits_of(load(run), ids))


# -- tokenizers -------------------------------------------------------------------------------
def test_a_character_run_gets_a_tokenizer_of_its_characters(runs, tmp_path, capsys, text_file):
    run, out = runs["llama-a8-rms"], tmp_path / "hf"
    lines = export(run, out, capsys)
    vocab = load_record(run)["model"]["vocab"]
    assert lines[-1].endswith(f"tokenizer character-level, {len(vocab)} characters")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    text = text_file.read_text()[:200]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == [vocab.index(c) for c in text]
    assert tokenizer.decode(ids) == text


def test_the_folders_tokenizer_is_copied_or_rebuilt_from_the_record(
    runs, folders, tmp_path, capsys, text_file
):
    run = runs["tokenizer-a8"]
    lines = export(run, tmp_path / "copied", capsys)
    assert f"tokenizer copied from {folders['llama-tokenizer']}" in lines[-1]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        source = folders["llama-tokenizer"] / name
        assert (tmp_path / "copied" / name).read_bytes() == source.read_bytes()
    moved = tmp_path / "moved"
    shutil.move(folders["llama-tokenizer"], moved)
    try:
        lines = export(run, tmp_path / "rebuilt", capsys)
    finally:
        shutil.move(moved, folders["llama-tokenizer"])
    assert "from the run's record" in lines[-1]
    text = text_file.read_text()[:200]
    encoded = [
        transformers.AutoTokenizer.from_pretrained(str(tmp_path / name))(
            text, add_special_tokens=False
        )["input_ids"]
        for name in ("copied", "rebuilt")
    ]
    assert encoded[0] == encoded[1] and len(encoded[0]) > 20


def test_a_packed_file_exports_as_its_run(runs, tmp_path, capsys):
    run = runs["llama-a8-rms"]
    packed = tmp_path / "m.safetensors"
    assert main(["export", str(run), "--format", "packed", "--out", str(packed)]) == 0
    export(run, tmp_path / "a", capsys)
    export(packed, tmp_path / "b", capsys)
    for name in ("config.json", WEIGHTS_FILE, "tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_an_unfinished_run_is_exported_with_a_note(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["llama-a8-rms"], run)
    record = torch.load(run / "checkpoint.pt", weights_only=True)
    record["training"]["finished"] = False
    torch.save(record, run / "checkpoint.pt")
    lines = export(run, tmp_path / "hf", capsys)
    assert lines[0] == f"note: the run in {run} has not finished; this is its latest checkpoint"


# -- one line for every mistake ---------------------------------------------------------------
# each prepares the working folder and returns the source to export
def image_run(tmp_path, runs, monkeypatch):
    argv = ["train", "--model", "tiny_mlp", "--dataset", "synthetic", "--epochs", "1",
            "--batch-size", "64", "--set", "device=cpu", "--out", "run"]  # fmt: skip
    assert main(argv) == 0
    return "run"


def full_folder(tmp_path, runs, monkeypatch):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("x")
    return runs["llama-a8-rms"]


def a_file(tmp_path, runs, monkeypatch):
    (tmp_path / "hf").write_text("x")
    return runs["llama-a8-rms"]


def empty_run_folder(tmp_path, runs, monkeypatch):
    (tmp_path / "run").mkdir()
    return "run"


def no_transformers(tmp_path, runs, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
    return runs["llama-a8-rms"]


def run_named(name):
    return lambda tmp_path, runs, monkeypatch: runs[name]


CASES = [
    ("--format hf of an image run", image_run, "hf",
     "--format hf writes runs of the Hugging Face model (--model hf), and run holds model "
     "'tiny_mlp'; export it with --format packed or onnx"),
    ("--format hf into a folder that is not empty", full_folder, "hf",
     "--out hf is a folder that is not empty; choose a new folder"),
    ("--format hf onto a file", a_file, "hf",
     "--out hf is a file; choose a folder that does not exist yet"),
    ("--format hf of a folder without a checkpoint", empty_run_folder, "hf",
     "run is a folder without checkpoint.pt; pass a run folder or a .pt file"),
    ("--format hf without transformers", no_transformers, "hf",
     "model hf (a Hugging Face causal LM) needs transformers, which is not installed; install "
     "it with: pip install 'qtrain[hf]'"),
    ("--bitnet for a weight it cannot hold", run_named("llama-rows-a8"), "hf --bitnet",
     "--bitnet cannot write this run: scale 'absmean' gives each output row of "
     "model.layers.0.self_attn.q_proj its own scale, and transformers' bitnet format holds "
     "one weight_scale per tensor; leave --bitnet out to write float weights"),
    ("--bitnet with another format", run_named("llama-a8-rms"), "packed --bitnet",
     "--bitnet applies to --format hf only; leave it out"),
]  # fmt: skip


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_wrong_input_is_one_line_and_writes_nothing(case, runs, tmp_path, capsys, monkeypatch):
    _, prepare, options, says = case
    monkeypatch.chdir(tmp_path)
    source = prepare(tmp_path, runs, monkeypatch)
    before = snapshot(tmp_path)
    format_, *extra = options.split()
    argv = ["export", source, "--format", format_, "--out", "hf", *extra]
    code, stdout, stderr = run_cli(argv, capsys)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and stdout == "", stderr
    assert lines[0] == f"qtrain: error: {says}"
    assert snapshot(tmp_path) == before


def test_docs_errors_md_lists_every_case():
    rows = [line.split(" | ") for line in ERRORS_DOC.read_text().splitlines()
            if line.startswith("| export |")]  # fmt: skip
    listed = {row[1].strip(): row[3].strip() for row in rows if len(row) > 3}
    for label, *_, says in CASES:
        assert listed.get(label) == says, label


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("name", [WEIGHTS_FILE, "config.json"])
def test_a_failed_write_leaves_no_folder_and_no_temporary(name, code, runs, tmp_path, capsys,
                                                          monkeypatch):  # fmt: skip
    def fail(*_args, **_kwargs):
        raise OSError(code, os.strerror(code))

    if name == WEIGHTS_FILE:
        monkeypatch.setattr(safetensors_torch, "save_file", fail)
    else:
        write_bytes = Path.write_bytes
        monkeypatch.setattr(
            Path, "write_bytes", lambda p, data: fail() if p.name == name else write_bytes(p, data)
        )
    out = tmp_path / "hf"
    code_, stdout, stderr = run_cli(
        ["export", runs["llama-a8-rms"], "--format", "hf", "--out", out], capsys
    )
    assert code_ == 2 and stdout == "" and len(stderr.strip().splitlines()) == 1
    assert re.search(rf"could not write {re.escape(str(out / name))}: ", stderr)
    assert list(tmp_path.iterdir()) == []
