"""Hugging Face model folders: a run of the `hf` model as a folder that transformers loads.

`export_hf(source, out)` writes the run (a checkpoint, run folder or packed file of model `hf`)
as a folder that ``transformers.AutoModelForCausalLM.from_pretrained(out)`` loads, with the
weights the run reported (`qtrain.export.load`'s): config.json, model.safetensors and a
tokenizer. The model is written in one of two layouts:

    bitnet  transformers' own BitNet format ("quant_method": "bitnet", "linear_class":
            "bitlinear", offline): each quantized projection is a BitLinear holding its
            ternary values t ∈ {−1, 0, 1} packed four to a byte and one ``weight_scale``
    float   plain float32 weights in transformers' layout (as save_pretrained writes them),
            each quantized weight exactly its value on the grid

**bitnet** (`bitnet_layers`) is chosen when it computes what qtrain computes. transformers'
BitLinear (`transformers/integrations/bitnet.py`) computes, for an input x [..., K],

    y = (Q₈(N(x)) · tᵀ) / (s_x · weight_scale) + bias       N: its RMSNorm (use_rms_norm)
    Q₈(x) = clamp(round(s_x·x), −128, 127),  s_x = 127 / max(max_j |x_j|, 1e−5) per token

and qtrain's ActQuantLinear with act_bits 8 computes y = (Q₈(N(x)) / s_x) · (s·t)ᵀ + bias for
a weight w = s·t (`qtrain.models.act_quant`, the same constants): so weight_scale = 1/s, and
the two agree up to float32 rounding. That needs, for every layer whose input qtrain
quantizes: 8 activation bits; a weight whose values are {−s, 0, s} with one s for the whole
tensor (grids binary and ternary with scale none, he or absmean-tensor; per-row ``absmean``
gives each row its own s, which one weight_scale cannot hold); out_features divisible by 4
(BitLinear stores out_features/4 rows of bytes); and an nn.Linear in transformers' own model
(GPT-2's projections are Conv1D, which transformers does not convert). Every other nn.Linear,
the head among them, is listed in ``modules_to_not_convert`` and stays float. The norm is
transformers' ``use_rms_norm`` (eps 1e−6, the weight ``….rms_norm.weight``) for act_norm
"rms". Otherwise the folder is float, with one note per reason; a run with activation
quantization then loses it (a plain transformers model has no such layer), so its logits
differ from qtrain's by the activation rounding (and the act_norm RMSNorms, which are left
out). A weights-only run (no act_bits) is float and exact; ``bitnet=True`` writes its weights
in the bitnet format anyway, which then quantizes its activations to 8 bits as qtrain did not.

**Packing** (`pack_bitnet`, transformers' ``pack_weights`` layout): for t [R, K] with R = 4Q,
byte [q, k] holds t[q + iQ, k] + 1 in bits 2i..2i+1, i = 0..3 (rows q, q+Q, q+2Q, q+3Q share
a byte); uint8 [Q, K]. ``weight_scale`` is float32 [1].

**Tokenizer** (`tokenizer_files`): a run that read the folder's tokenizer stores it
(tokenizer.json in its record): the tokenizer files of hf_path are copied when that folder
still holds the same tokenizer (same class and vocabulary), else tokenizer.json is written
from the record as a `PreTrainedTokenizerFast`. A character-level run gets a
`PreTrainedTokenizerFast` built offline: a BPE without merges whose vocabulary is the run's
characters (id i = the i-th character), so encoding a text gives qtrain's ids (a character
outside the vocabulary is dropped) and decoding joins the characters.

The folder is written into a temporary folder beside `out` and renamed into place when
complete: a failure leaves no `out`. An `out` that exists and is not an empty folder is
refused.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qtrain.base.errors import UserError
from qtrain.base.io import current_umask, fsync_path, write_error
from qtrain.base.optional import require
from qtrain.data.tokens import TokenizerSpec
from qtrain.export.loading import load_any_model
from qtrain.export.scales import scaled_codes
from qtrain.models.act_quant import RMS_EPS, ActQuantLinear
from qtrain.models.hf import (
    TOKENIZER_FILES,
    hf_config_object,
    hf_state_dict,
    read_hf_folder,
    transformers_module,
)
from qtrain.quant import Grid, ternary

HF_MODEL = "hf"
BITNET_ACT_BITS = 8  # BitLinear quantizes every input to 8 bits
VALUES_PER_BYTE = 4
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                        "merges.txt", "chat_template.jinja", "chat_template.json")  # fmt: skip


@dataclass(frozen=True)
class HFExport:
    """What `export_hf` wrote: the folder, its layout ("bitnet" or "float"), one line per note
    (why float, what differs from qtrain, warnings) and where the tokenizer came from."""

    path: Path
    layout: str
    notes: tuple[str, ...]
    tokenizer: str


@dataclass(frozen=True)
class BitLayer:
    """A quantized projection written as a BitLinear: its ternary values t and s (w = s·t)."""

    ternary: torch.Tensor  # int8 [out, in]
    scale: float
    dtype: torch.dtype  # of the weight, and so of weight_scale


# -- deciding the layout --------------------------------------------------------------------
def bitnet_layers(model: nn.Module, record: dict, *, force: bool = False):
    """({transformers module name: BitLayer} or None, notes) for the hf wrapper `model`.

    The layers are those whose input qtrain quantizes (module doc); None, with a note saying
    why, when the bitnet format would compute other numbers than qtrain. With `force`, a run
    whose activations are not quantized to 8 bits (a weights-only run: its quantized nn.Linear
    layers) is written as BitLinears anyway, with a warning among the notes; a weight that
    the format cannot hold is then a UserError.
    """
    act_quant = record["model"].get("act_quant")
    quantized = set(record["quantized"])
    grid = Grid.from_dict(record["method"]["grid"])
    modules = dict(model.named_modules())
    if act_quant is not None:
        names = list(act_quant["modules"])
    else:
        names = [n for n, m in modules.items() if isinstance(m, nn.Linear)
                 and f"{n}.weight" in quantized]  # fmt: skip
    layers, problems = {}, [] if names else ["this run quantizes no linear layer"]
    for name in names:
        layer, problem = _bit_layer(name, modules[name], model, quantized, grid, record)
        if problem:
            problems.append(problem)
        else:
            layers[name.removeprefix("model.")] = layer
    if problems and force:
        raise UserError(
            f"{{bitnet}} cannot write this run: {problems[0]}; leave {{bitnet}} out to write "
            "float weights",
            bitnet="bitnet=True",
        )
    if problems:
        return None, [f"float weights: {problems[0]}"]
    if act_quant is not None and act_quant["bits"] == BITNET_ACT_BITS:
        return layers, []
    kept = ("this run keeps its activations in float" if act_quant is None else
            f"this run quantizes activations to {act_quant['bits']} bits")  # fmt: skip
    if not force:
        return None, [f"float weights: {kept}, and transformers' BitLinear quantizes every "
                      f"input to {BITNET_ACT_BITS} bits"]  # fmt: skip
    return layers, [f"warning: {kept}, but transformers' BitLinear quantizes every input to "
                    f"{BITNET_ACT_BITS} bits per token, so the folder's logits differ from "
                    "qtrain's"]  # fmt: skip


def _bit_layer(name, module, model, quantized, grid, record) -> tuple[BitLayer | None, str]:
    """(BitLayer, "") of one projection, or (None, why the bitnet format cannot hold it)."""
    inner = name.removeprefix("model.")
    if inner in model.conv1d:
        return None, (f"{inner} is a Conv1D layer in transformers' model, which its bitnet "
                      "format does not convert")  # fmt: skip
    if f"{name}.weight" not in quantized:
        return None, f"{inner} quantizes its input but keeps its weight in float"
    if grid.max_multiple != 1:
        return None, (f"the weights are on grid {grid.describe()}, and transformers' bitnet "
                      "format holds the levels {-s, 0, s} only")  # fmt: skip
    if module.out_features % VALUES_PER_BYTE:
        return None, (f"{inner} has {module.out_features} outputs, and BitLinear stores them "
                      f"{VALUES_PER_BYTE} to a byte row")  # fmt: skip
    # on ternary() (Δ_g = 1) levels and multiples are the same numbers, so what the scale
    # multiplies does not matter here
    scaled = scaled_codes(module.weight.detach(), ternary())
    if scaled is None or scaled.scale.numel() != 1:
        scale = record["method"].get("scale", "none")
        return None, (f"scale {scale!r} gives each output row of {inner} its own scale, and "
                      "transformers' bitnet format holds one weight_scale per tensor")  # fmt: skip
    values = (scaled.codes - 1).to(torch.int8).reshape(module.weight.shape)
    return BitLayer(values, float(scaled.scale[0]), module.weight.dtype), ""


# -- packing --------------------------------------------------------------------------------
def pack_bitnet(values: torch.Tensor) -> torch.Tensor:
    """uint8 [R/4, K] of ternary values [R, K] (R divisible by 4): byte [q, k] holds
    values[q + i·R/4, k] + 1 in bits 2i..2i+1 (transformers' ``pack_weights`` layout)."""
    rows = values.shape[0] // VALUES_PER_BYTE
    if values.shape[0] != rows * VALUES_PER_BYTE or values.dim() != 2:
        raise UserError(f"BitLinear packs [4Q, K] weights, got shape {list(values.shape)}")
    codes = (values.to(torch.int16) + 1).to(torch.uint8).reshape(VALUES_PER_BYTE, rows, -1)
    packed = torch.zeros(rows, values.shape[1], dtype=torch.uint8)
    for i in range(VALUES_PER_BYTE):
        packed |= codes[i] << (2 * i)
    return packed


def unpack_bitnet(packed: torch.Tensor) -> torch.Tensor:
    """The int8 ternary values [4Q, K] of `pack_bitnet`'s bytes [Q, K]."""
    parts = [((packed >> (2 * i)) & 3).to(torch.int8) - 1 for i in range(VALUES_PER_BYTE)]
    return torch.cat(parts)


# -- the folder's contents ------------------------------------------------------------------
def hf_tensors(model: nn.Module, layers: dict[str, BitLayer] | None) -> dict[str, torch.Tensor]:
    """The tensors of model.safetensors in transformers' layout: float32 weights (a tied one
    once, under its first name), the BitLinears' packed weights and weight_scales; the
    act_norm RMSNorms' weights only where a BitLinear holds its norm."""
    state = hf_state_dict(model)
    norms = {f"{n.removeprefix('model.')}.rms_norm.weight" for n, m in model.named_modules()
             if isinstance(m, ActQuantLinear) and m.rms_norm is not None}  # fmt: skip
    tensors, seen = {}, set()
    for key, tensor in state.items():
        where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
        if where in seen or (key in norms and layers is None):
            continue
        seen.add(where)
        tensors[key] = tensor.detach().cpu().contiguous().clone()
    for name, layer in (layers or {}).items():
        tensors[f"{name}.weight"] = pack_bitnet(layer.ternary)
        scale = layer.scale if layer.scale > 0 else 1.0  # all zero: any scale gives 0
        reciprocal = torch.tensor([1.0 / scale], dtype=torch.float64)  # rounded once
        tensors[f"{name}.weight_scale"] = reciprocal.to(layer.dtype)
    return tensors


def bitnet_config(model: nn.Module, layers: dict[str, BitLayer], record: dict) -> dict:
    """config.json's ``quantization_config`` for the BitLinears `layers`: every other
    nn.Linear of transformers' model (the head included) in ``modules_to_not_convert``."""
    act_quant = record["model"].get("act_quant")
    linear = [n.removeprefix("model.") for n, m in model.model.named_modules(prefix="model")
              if isinstance(m, nn.Linear)]  # fmt: skip
    return {
        "quant_method": "bitnet",
        "linear_class": "bitlinear",
        "quantization_mode": "offline",
        "use_rms_norm": bool(act_quant and act_quant["norm"] == "rms"),
        "rms_norm_eps": RMS_EPS,
        "modules_to_not_convert": [n for n in linear if n not in layers],
    }


def config_json(model: nn.Module, record: dict, quantization: dict | None) -> bytes:
    """config.json: the run's config dict as transformers writes it, float32, with the
    architecture's class and the bitnet ``quantization_config`` when given."""
    config = hf_config_object(record["model"]["options"]["hf_config"])
    config.architectures = [type(model.model).__name__]
    config.dtype = torch.float32
    if quantization is not None:
        config.quantization_config = quantization
    return config.to_json_string(use_diff=True).encode("utf-8")


def tokenizer_files(record: dict) -> tuple[dict[str, bytes], str]:
    """({file name: bytes} of the run's tokenizer, where it came from) (module doc)."""
    spec_record = record["model"].get("tokenizer")
    if spec_record is not None:
        spec = TokenizerSpec.from_record(spec_record)
        copied = _folder_tokenizer(record, spec)
        if copied:
            return copied, f"copied from {record['config']['hf_path']} ({spec.describe()})"
        backend = spec.backend
        where = f"{spec.describe()}, from the run's record"
    else:
        backend = _character_tokenizer(record["model"].get("vocab") or "")
        where = f"character-level, {backend.get_vocab_size()} characters"
    return _fast_tokenizer_files(backend, record), where


def _folder_tokenizer(record: dict, spec: TokenizerSpec) -> dict[str, bytes]:
    """The tokenizer files of the run's hf_path when it still holds `spec`'s tokenizer."""
    path = (record.get("config") or {}).get("hf_path")
    try:
        folder = read_hf_folder(path) if path else None
        same = (
            folder is not None
            and folder.tokenizer is not None
            and spec.same_as(TokenizerSpec.from_transformers(folder.tokenizer))
        )
    except (UserError, OSError):  # moved, changed or unreadable: the record's copy serves
        return {}
    if not same:
        return {}
    names = [n for n in TOKENIZER_FILES + TOKENIZER_SIDE_FILES if (folder.path / n).is_file()]
    return {name: (folder.path / name).read_bytes() for name in names}


def _character_tokenizer(vocab: str):
    """A `tokenizers.Tokenizer` mapping the i-th character of `vocab` to id i and back."""
    tokenizers = require("tokenizers", "hf", "a tokenizer for the Hugging Face folder")
    backend = tokenizers.Tokenizer(
        tokenizers.models.BPE(vocab={c: i for i, c in enumerate(vocab)}, merges=[])
    )
    backend.decoder = tokenizers.decoders.Fuse()
    return backend


def _fast_tokenizer_files(backend, record: dict) -> dict[str, bytes]:
    """The files `PreTrainedTokenizerFast.save_pretrained` writes for `backend`."""
    transformers = transformers_module()
    window = int(record["model"]["options"].get("block_size") or 0) or None
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend,
                                                     model_max_length=window)  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        return {p.name: p.read_bytes() for p in sorted(Path(scratch).iterdir()) if p.is_file()}


# -- writing --------------------------------------------------------------------------------
def check_out_folder(out: Path) -> None:
    """Refuse an `out` that is a file or a folder that is not empty (nothing is replaced)."""
    if out.is_dir() and any(out.iterdir()):
        raise UserError(
            f"{{out}} {out} is a folder that is not empty; choose a new folder", out="out"
        )
    if out.exists() and not out.is_dir():
        raise UserError(
            f"{{out}} {out} is a file; choose a folder that does not exist yet", out="out"
        )


def write_folder(out: Path, files: dict[str, bytes], tensors: dict[str, torch.Tensor]) -> None:
    """Write `files` and model.safetensors (`tensors`) into a temporary folder beside `out`,
    then rename it to `out` (an absent or empty folder); on any failure nothing stays."""
    safetensors = require("safetensors.torch", "export", "--format hf")
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    name = WEIGHTS_FILE
    try:
        os.chmod(temporary, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide it from others
        safetensors.save_file(tensors, str(temporary / name), metadata={"format": "pt"})
        for name, data in files.items():
            (temporary / name).write_bytes(data)
        for path in temporary.iterdir():
            path.chmod(0o666 & ~current_umask())  # safetensors writes 0600
            fsync_path(path)
        fsync_path(temporary)
        name = ""
        check_out_folder(out)  # another process may have filled it meanwhile
        os.replace(temporary, out)
    except BaseException as error:
        shutil.rmtree(temporary, ignore_errors=True)
        if isinstance(error, OSError):
            raise write_error(error, out / name) from error
        raise
    fsync_path(out.parent)


# -- the whole export -----------------------------------------------------------------------
def export_hf(source: str | Path, out: str | Path, *, bitnet: bool = False) -> HFExport:
    """Write the `hf` run at `source` as a Hugging Face folder `out` (module doc); `bitnet`
    writes a weights-only run in the bitnet format too. One-line UserError for a source that
    is not a run of model hf and for an `out` that is a file or a folder that is not empty."""
    out = Path(out)
    check_out_folder(out)
    model, record = load_any_model(source)
    name = record["model"]["name"]
    if name != HF_MODEL:
        raise UserError(
            f"--format hf writes runs of the Hugging Face model (--model hf), and {source} "
            f"holds model {name!r}; export it with {{format}} or onnx",
            format="format=packed",
        )
    layers, notes = bitnet_layers(model, record, force=bitnet)
    if not (record.get("training") or {}).get("finished", True):
        notes.insert(
            0, f"note: the run in {source} has not finished; this is its latest checkpoint"
        )
    act_quant = record["model"].get("act_quant")
    if layers is None and act_quant is not None:
        left_out = " and the RMSNorms it leaves out" if act_quant["norm"] == "rms" else ""
        notes.append(
            f"activation quantization (act_bits {act_quant['bits']}, act_norm "
            f"{act_quant['norm']}) cannot be expressed in a plain transformers model: the "
            "folder computes with float inputs, so its logits differ from qtrain's by the "
            f"activation rounding{left_out}"
        )
    quantization = bitnet_config(model, layers, record) if layers is not None else None
    files, tokenizer = tokenizer_files(record)
    files["config.json"] = config_json(model, record, quantization)
    write_folder(out, files, hf_tensors(model, layers))
    return HFExport(out, "bitnet" if layers is not None else "float", tuple(notes), tokenizer)
