"""ONNX export of a ternary GPT: packed weights in the graph, onnxruntime = PyTorch."""

from __future__ import annotations

import pytest
import torch
from test_export_onnx import export_cli
from test_lm_train import ALPHABET, gpt_config, quiet, text_file  # noqa: F401 (a fixture)

from qtrain.export import load
from qtrain.train.trainer import Trainer

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def run_tokens(path, idx: torch.Tensor) -> torch.Tensor:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"tokens": idx.numpy()})
    return torch.from_numpy(logits)


@pytest.mark.parametrize("weights", ["packed", "float"])
def test_ternary_gpt_onnx_matches_pytorch_for_any_batch_and_length(
    text_file,  # noqa: F811
    tmp_path,
    capsys,
    weights,
):
    config = gpt_config(text_file, grid="ternary", scale="absmean-tensor", n_embd=32)
    Trainer(config, tmp_path / "run", log=quiet).run()
    out = tmp_path / "m.onnx"
    assert export_cli(tmp_path / "run", "--format", "onnx", "--out", out,
                      "--onnx-weights", weights) == 0  # fmt: skip
    assert "input tokens [batch, 8]" in capsys.readouterr().out
    model = load(tmp_path / "run")
    generator = torch.Generator().manual_seed(0)
    for batch, length in ((1, 8), (5, 8), (3, 5)):  # other shapes than at export
        idx = torch.randint(len(ALPHABET), (batch, length), generator=generator)
        with torch.no_grad():
            expected = model(idx)
        actual = run_tokens(out, idx)
        assert actual.shape == (batch, length, len(ALPHABET))
        assert float((actual - expected).abs().max()) <= 1e-4
        assert torch.equal(actual.argmax(-1), expected.argmax(-1))
    stored = {t.name for t in onnx.load(out).graph.initializer}
    projections = [n for n in stored if ".attn." in n or ".mlp." in n]
    if weights == "packed":  # ternary codes, 2 bits per weight, and no float copy of them
        assert projections and all("_packed." in n or n.endswith(".bias") for n in projections)
    else:  # float constants (the exporter stores them transposed, under its own names)
        assert not any("_packed." in n for n in stored)


def test_a_sequence_longer_than_the_context_is_refused(text_file, tmp_path):  # noqa: F811
    Trainer(gpt_config(text_file), tmp_path / "run", log=quiet).run()
    with pytest.raises(ValueError, match=r"at most the context, 8\), got 9"):
        export_cli(tmp_path / "run", "--format", "onnx", "--out", tmp_path / "m.onnx",
                   "--input-size", 9)  # fmt: skip
    assert not (tmp_path / "m.onnx").exists()
