"""Hugging Face transformers causal LMs in qtrain: the `hf` model (qtrain/models/hf.py).

The policy `linear` quantizes exactly the block projections of Llama, GPT-2 and Qwen2 (on the
wrapper and, for nn.Linear families, on the bare transformers model) and keeps them on their
grid; the wrapper computes the bare model's logits (GPT-2's Conv1D converted to nn.Linear)
and gives its weights back in transformers' layout; `qtrain train --model hf` trains on a
text by character or through the folder's tokenizer, resumes bit for bit (the folder may
move, its config and tokenizer may not), and every mistake with a folder is one line.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from hf_folders import (  # noqa: E402
    CONTEXT,
    FAMILIES,
    LAYERS,
    PROJECTIONS,
    VOCAB,
    bare_model,
    words_text,
    write_folder,
    write_tokenizer,
)

from qtrain import methods, models  # noqa: E402
from qtrain.base.errors import UserError  # noqa: E402
from qtrain.cli import main  # noqa: E402
from qtrain.export.loading import load  # noqa: E402
from qtrain.models.hf import (  # noqa: E402
    HFCausalLM,
    hf_model_from_folder,
    hf_state_dict,
    load_hf_state_dict,
    read_hf_folder,
)
from qtrain.quant import parse_grid  # noqa: E402
from qtrain.sample import sample_file  # noqa: E402
from qtrain.train import rundir  # noqa: E402
from qtrain.train.checkpoint import load_checkpoint  # noqa: E402
from qtrain.train.config import RunConfig  # noqa: E402
from qtrain.train.trainer import Trainer  # noqa: E402

ERRORS_DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
TERNARY = parse_grid("ternary")
# The crash test wraps optimizer.step, which LambdaLR notices and warns about.
pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been")


def quiet(*_args, **_kwargs):
    pass


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """One saved model folder (config.json + model.safetensors) per family."""
    root = tmp_path_factory.mktemp("hf")
    return {family: write_folder(root / family, family) for family in FAMILIES}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text(words_text(600), encoding="utf-8")
    return path


def expected_projections(family: str, prefix: str = "") -> set[str]:
    return {
        f"{prefix}{LAYERS[family]}.{layer}.{name}.weight"
        for layer in range(2)
        for name in PROJECTIONS[family]
    }


def on_grid_per_tensor(weight: torch.Tensor) -> bool:
    """Ternary with one scale: every nonzero magnitude equal (absmean-tensor)."""
    magnitudes = weight.abs().unique()
    return len(magnitudes[magnitudes > 0]) <= 1


# -- the policy --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_policy_linear_quantizes_exactly_the_block_projections_of_the_wrapper(family, folders):
    wrapper = hf_model_from_folder(folders[family])
    names = methods.quantized_parameter_names(wrapper, "linear")
    assert set(names) == expected_projections(family, "model.")
    for name in names:  # GPT-2's Conv1D too: real nn.Linear modules
        assert type(wrapper.get_submodule(name.removesuffix(".weight"))) is torch.nn.Linear


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_policy_linear_keeps_the_head_of_a_bare_transformers_model_in_float(family):
    model = bare_model(family)
    assert set(methods.quantized_parameter_names(model, "linear")) == expected_projections(family)


def test_a_bare_gpt2_is_refused_with_the_wrapper_as_the_fix():
    with pytest.raises(UserError, match="HFCausalLM") as refusal:
        methods.quantized_parameter_names(bare_model("gpt2"), "linear")
    assert "Conv1D" in str(refusal.value) and "\n" not in str(refusal.value)


def ternary_steps(model, steps: int = 3):
    """(optimizer, names) after `steps` bc-adamw ternary steps on random tokens."""
    optimizer = methods.create("bc-adamw", model, lr=0.05, grid="ternary", seed=0,
                               scale="absmean-tensor", policy="linear")  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(VOCAB, (2, 12), generator=generator)
        logits = model(idx) if isinstance(model, HFCausalLM) else model(input_ids=idx).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return optimizer, methods.quantized_parameter_names(model, "linear")


@pytest.mark.parametrize("family", FAMILIES)
def test_three_bc_adamw_ternary_steps_keep_every_projection_on_its_grid(family, folders):
    wrapper = hf_model_from_folder(folders[family])
    head = wrapper.model.get_output_embeddings().weight.detach().clone()
    optimizer, names = ternary_steps(wrapper)
    params = dict(wrapper.named_parameters())
    assert len(names) == 2 * len(PROJECTIONS[family])
    for name in names:
        assert on_grid_per_tensor(params[name].detach()), name
        assert params[name].abs().max() > 0, name
    head_now = wrapper.model.get_output_embeddings().weight
    assert not torch.equal(head, head_now) and not on_grid_per_tensor(head_now.detach())
    assert optimizer.num_quantized == sum(params[n].numel() for n in names)


def test_a_bare_llama_trains_on_its_grid_too():
    model = bare_model("llama")
    _, names = ternary_steps(model)
    params = dict(model.named_parameters())
    assert all(on_grid_per_tensor(params[name].detach()) for name in names)


# -- the wrapper -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_the_wrappers_logits_are_the_transformers_models(family, folders):
    import transformers

    bare = transformers.AutoModelForCausalLM.from_pretrained(
        folders[family], local_files_only=True, attn_implementation="sdpa"
    ).eval()
    wrapper = hf_model_from_folder(folders[family]).eval()
    idx = torch.randint(VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = bare(input_ids=idx).logits, wrapper(idx)
    assert got.shape == (3, 20, VOCAB)
    if family == "gpt2":  # x·W (Conv1D's addmm) and x·(Wᵀ)ᵀ (Linear) may round differently
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_state_dict_is_transformers_layout_and_loads_back(family, folders):
    wrapper = hf_model_from_folder(folders[family])
    bare = bare_model(family, seed=5)
    state = hf_state_dict(wrapper)
    assert {k: v.shape for k, v in state.items()} == {
        k: v.shape for k, v in bare.state_dict().items()
    }
    bare.load_state_dict(state)  # transformers' own model takes it as it is
    fresh = HFCausalLM(bare_model(family, seed=9))
    load_hf_state_dict(fresh, state)
    for key, value in wrapper.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    with pytest.raises(UserError, match="do not fit"):
        load_hf_state_dict(fresh, {**state, "extra.weight": torch.zeros(1)})


def test_a_folder_without_weights_is_its_config_randomly_initialised(tmp_path):
    folder = read_hf_folder(write_folder(tmp_path / "m", "llama", weights=False))
    assert not folder.weights and folder.tokenizer is None
    assert folder.config["model_type"] == "llama" and "transformers_version" not in folder.config
    torch.manual_seed(0)
    wrapper = hf_model_from_folder(folder.path)
    assert wrapper.config.block_size == CONTEXT  # min(256, the model's 64 positions)
    assert wrapper.config.hf_config == folder.config


def test_the_registered_model_is_rebuilt_from_its_config_dict(folders):
    wrapper = models.create("hf", num_classes=30, options={"hf_path": str(folders["gpt2"])})
    again = models.create("hf", num_classes=30, options={"hf_config": wrapper.config.hf_config,
                                                         "block_size": 16})  # fmt: skip
    assert list(again.state_dict()) == list(wrapper.state_dict())
    assert again.config.block_size == 16 and again.num_tokens == 30
    with pytest.raises(UserError, match="longer than the model's context"):
        models.create("hf", options={"hf_path": str(folders["gpt2"]), "block_size": 65})


# -- training through the CLI ------------------------------------------------------------------
def train_argv(folder, text_file, out, *extra) -> list[str]:
    return [
        "train", "--model", "hf", "--dataset", "shakespeare-char", "--set", f"hf_path={folder}",
        "--set", f"text_file={text_file}", "--method", "bc-adamw", "--grid", "ternary",
        "--set", "scale=absmean-tensor", "--set", "policy=linear", "--set", "block_size=16",
        "--batch-size", "4", "--set", "max_steps=4", "--set", "eval_every=2",
        "--set", "eval_batches=1", "--set", "device=cpu", "--set", "threads=1",
        "--out", str(out), *extra,
    ]  # fmt: skip


def assert_same_logits(a, b) -> None:
    idx = torch.randint(20, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(a.eval()(idx), b.eval()(idx))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_train_by_character_then_evaluate_export_and_sample(family, folders, text_file, tmp_path):
    out = tmp_path / "run"
    assert main(train_argv(folders[family], text_file, out)) == 0
    record = load_checkpoint(out / rundir.CHECKPOINT)
    spec = record["model"]
    assert spec["name"] == "hf" and set(spec["options"]) == {"hf_config", "block_size"}
    assert spec["options"]["hf_config"] == read_hf_folder(folders[family]).config
    assert spec["vocab"] == "".join(sorted(set(text_file.read_text()))) and "tokenizer" not in spec
    assert set(record["quantized"]) == expected_projections(family, "model.")
    packed = tmp_path / "m.safetensors"
    assert main(["export", str(out), "--format", "packed", "--out", str(packed)]) == 0
    moved = tmp_path / "elsewhere"
    shutil.move(folders[family], moved)  # rebuilding never reads the folder
    try:
        assert_same_logits(load(out), load(packed))
        assert sample_file(out, chars=30, seed=1) == sample_file(packed, chars=30, seed=1)
        assert set(sample_file(out, chars=30)) <= set(spec["vocab"])
    finally:
        shutil.move(moved, folders[family])


def test_train_through_the_folders_tokenizer(tmp_path, text_file):
    folder = write_folder(tmp_path / "gpt2", "gpt2")
    write_tokenizer(folder)
    out = tmp_path / "run"
    assert main(train_argv(folder, text_file, out)) == 0
    spec = load_checkpoint(out / rundir.CHECKPOINT)["model"]
    assert "vocab" not in spec and spec["tokenizer"]["vocab_size"] == 17
    assert spec["num_classes"] == 17
    text = sample_file(out, chars=12, seed=0, prompt="the cat")
    assert text.startswith("the cat ") and set(text.split()) <= {
        "[UNK]",
        *text_file.read_text().split(),
    }
    assert main(["eval", str(out)]) == 0


def hf_config(folder, text_file, **changes) -> RunConfig:
    base = dict(
        model="hf", dataset="shakespeare-char", hf_path=str(folder), text_file=str(text_file),
        policy="linear", block_size=16, batch_size=4, max_steps=6, eval_every=2,
        eval_batches=1, lr=0.01, method="bc-adamw", grid="ternary", scale="absmean-tensor",
        device="cpu", threads=1,
    )  # fmt: skip
    return RunConfig(**{**base, **changes}).validate()


def test_a_new_run_starts_from_the_folders_weights(folders, text_file, tmp_path):
    trainer = Trainer(hf_config(folders["llama"], text_file), tmp_path / "run", log=quiet)
    try:
        reference = hf_model_from_folder(folders["llama"])
        want = dict(reference.named_parameters())
        names = trainer.quantized_names
        for name, latent in zip(names, trainer.optimizer.latent_weights(), strict=True):
            assert torch.equal(latent, want[name].detach()), name
        embedding = "model.model.embed_tokens.weight"
        assert torch.equal(dict(trainer.model.named_parameters())[embedding], want[embedding])
    finally:
        trainer.close()


def test_resume_after_a_crash_is_bit_identical_from_a_moved_folder_without_weights(
    tmp_path, text_file
):
    folder = write_folder(tmp_path / "gpt2", "gpt2")  # GPT-2's dropout draws random numbers
    config = hf_config(folder, text_file)
    Trainer(config, tmp_path / "ref", log=quiet).run()
    crashing = Trainer(config, tmp_path / "crash", log=quiet)
    real_step, calls = crashing.optimizer.step, {"n": 0}

    def step_then_crash():
        calls["n"] += 1
        if calls["n"] == 3:  # the first step after the first evaluation ("epoch")
            raise RuntimeError("simulated crash")
        return real_step()

    crashing.optimizer.step = step_then_crash
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.run()
    moved = tmp_path / "moved"
    shutil.move(folder, moved)
    (moved / "model.safetensors").unlink()  # a resume reads its weights from the checkpoint
    Trainer(config.replace(hf_path=str(moved)), tmp_path / "crash", log=quiet).run(resume=True)
    a = load_checkpoint(tmp_path / "crash" / rundir.CHECKPOINT)
    b = load_checkpoint(tmp_path / "ref" / rundir.CHECKPOINT)
    for key, tensor in b["model_state"].items():
        assert torch.equal(a["model_state"][key], tensor), key
    latent_a = a["training"]["optimizer"]["quantization"]["latent"]
    assert torch.equal(latent_a, b["training"]["optimizer"]["quantization"]["latent"])
    assert [m["val_loss"] for m in a["training"]["metrics"]] == [
        m["val_loss"] for m in b["training"]["metrics"]
    ]


# -- one line for every mistake ----------------------------------------------------------------
def run_cli(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()  # what building the folders printed (transformers' progress bars)
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line(argv, capsys, says: str, out: Path) -> str:
    code, stdout, stderr = run_cli(argv, capsys)
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("qtrain: error: "), stderr
    assert says in lines[0] and stdout == ""
    assert not out.exists(), "the failed command left a run folder"
    return lines[0]


def no_folder(tmp_path):
    return tmp_path / "nope"


def a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    return tmp_path / "file"


def no_config(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def bad_json(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    return tmp_path / "bad"


def bert(tmp_path):
    (tmp_path / "bert").mkdir()
    config = {"model_type": "bert", "vocab_size": 70, "hidden_size": 32}
    (tmp_path / "bert" / "config.json").write_text(json.dumps(config))
    return tmp_path / "bert"


# (input as docs/errors.md lists it, how the folder is made, what the line says)
FOLDER_CASES = [
    ("hf_path that does not exist", no_folder, "does not exist; pass the folder of a Hugging"),
    ("hf_path that is a file", a_file, "is a file, not a folder"),
    ("hf folder without config.json", no_config, "has no config.json"),
    ("config.json that is not JSON", bad_json, "config.json is not valid JSON"),
    ("config of a model that is not a causal LM", bert,
     "describes a 'bert' model, which is not a causal language model"),
]  # fmt: skip


@pytest.mark.parametrize(("label", "make", "says"), FOLDER_CASES, ids=[c[0] for c in FOLDER_CASES])
def test_a_bad_hf_folder_is_one_line(label, make, says, tmp_path, text_file, capsys):
    out = tmp_path / "run"
    assert_one_line(train_argv(make(tmp_path), text_file, out), capsys, says, out)


def test_model_hf_without_hf_path_and_hf_path_with_gpt_are_one_line(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    argv = train_argv("x", text_file, out)
    without = argv[:5] + argv[7:]  # no --set hf_path=x
    assert_one_line(without, capsys, "model 'hf' needs --set hf_path=FOLDER", out)
    gpt = ["train", "--model", "gpt", "--dataset", "shakespeare-char", "--set", "hf_path=x",
           "--set", f"text_file={text_file}", "--set", "device=cpu", "--out", str(out)]  # fmt: skip
    assert_one_line(gpt, capsys, "hf_path applies to text models that take it (hf), not to "
                    "model 'gpt'; leave it unset", out)  # fmt: skip


def test_gpt_size_keys_are_refused_for_hf(folders, tmp_path, text_file, capsys):
    out = tmp_path / "run"
    argv = train_argv(folders["llama"], text_file, out, "--set", "n_layer=3")
    assert_one_line(argv, capsys, "n_layer applies to text models that take it (gpt), not to "
                    "model 'hf'", out)  # fmt: skip


def test_more_characters_than_token_ids_is_one_line(tmp_path, capsys):
    folder = write_folder(tmp_path / "m", "llama", vocab_size=20)
    text = tmp_path / "letters.txt"
    text.write_text("".join(chr(97 + (i * 7) % 26) for i in range(600)))
    out = tmp_path / "run"
    says = "has 26 distinct characters, but the model has only 20 token ids"
    assert_one_line(train_argv(folder, text, out), capsys, says, out)


def test_a_missing_transformers_names_the_extra(folders, tmp_path, text_file, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
    out = tmp_path / "run"
    line = assert_one_line(train_argv(folders["llama"], text_file, out), capsys,
                           "needs transformers, which is not installed", out)  # fmt: skip
    assert "pip install 'qtrain[hf]'" in line


def test_resume_with_another_config_or_tokenizer_is_one_line(tmp_path, text_file, capsys):
    folder = write_folder(tmp_path / "llama", "llama")
    write_tokenizer(folder)
    out = tmp_path / "run"
    assert main(train_argv(folder, text_file, out)) == 0
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    code, _, err = run_cli(train_argv(other, text_file, out, "--resume"), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "config.json whose rms_norm_eps is 1e-06, not 1e-05" in err
    shutil.rmtree(other)
    shutil.copytree(folder, other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (other / name).unlink()
    write_tokenizer(other, words=WORDS_REVERSED)  # the same words, other ids
    code, _, err = run_cli(train_argv(other, text_file, out, "--resume"), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.count("vocabulary SHA-256") == 2 and "cannot resume" in err


WORDS_REVERSED = ("big", "was", "hat", "red", "his", "and", "her", "to", "ran", "dog", "mat",
                  "a", "on", "sat", "cat", "the")  # fmt: skip


def test_docs_errors_md_lists_every_hf_case():
    rows = {
        tuple(cell.strip() for cell in line.split(" | ")[:2])
        for line in ERRORS_DOC.read_text().splitlines()
        if line.startswith("| ")
    }
    inputs = [label for label, _, _ in FOLDER_CASES] + [
        "model hf without hf_path", "hf_path with another model", "a GPT size key for hf",
        "text with more characters than the model has token ids", "transformers not installed",
        "resume with another config.json", "resume with another tokenizer",
    ]  # fmt: skip
    assert [i for i in inputs if not any(row[1] == i for row in rows)] == []


def test_the_scope_of_each_text_model_key_names_the_models_that_take_it():
    from qtrain.train.config import key_spec, keys

    for key in keys(section="text model"):
        takers = [n for n in models.list_models("text") if key in models.model_info(n).options]
        assert key_spec(key).applies.phrase == f"text models that take it ({', '.join(takers)})"
