"""Bit-packed model files: quantized weights as packed grid codes in a safetensors file.

A packed file is a standard safetensors file (no pickle, so loading never runs code):

    tensors
      <name> of every quantized parameter   uint8 [⌈n·b/8⌉]: its n codes i = (m + M)/step
                                            (see `qtrain.quant.grids`), b = grid.code_bits,
                                            packed as in `qtrain.export.packing`
      <name>:scale of a scaled quantized parameter  float32 (float64 for float64 weights):
                                            [1], the one Δ of the whole tensor, when one
                                            restores it (scale he, absmean-tensor, and absmean
                                            on a 1-D tensor); else [C], Δ_c of each output
                                            channel
      every other entry of model.state_dict()  as it is (BN weights and running statistics,
                                            num_batches_tracked, linear layers, biases)
    __metadata__ = {"qtrain": one JSON string, "qtrain_crc32": CRC-32 of that string} holding
      format "qtrain-packed", format_version 3 (4 with "act_quant", 5 with "scale_of"),
      qtrain_version
      model      {"name", "num_classes", "width", "in_channels", "activations"}: the network
                 (with "options" for a text model's size, "vocab" for its characters, and
                 "act_quant", {"bits", "norm", "modules"}, for a run with act_bits:
                 `qtrain.models.act_quant`; the norms' weights `….rms_norm.weight` are float
                 tensors among the other entries)
      method     {"name", "grid": Grid.to_dict(), "policy", "scale"}
      quantized  {name: {"shape": [...], "dtype": "float32", "code_bits": b}} in model order,
                 plus, for a weight stored with scales, "scale": "tensor" (one, [1]) or
                 "channel" (one per output channel, [C]), and "scale_of": "levels" when
                 the scales multiply the grid's levels L(m) rather than the multiples m
      config     the training run's configuration without its machine keys (data folder,
                 device, threads, ...): nothing of the training machine travels along, and
                 every identity key (amp included) does
      bit_order  "little"
      crc32      {name: CRC-32 (zlib) of the tensor's stored bytes} for every tensor

A weight is restored as grid.from_codes(codes, dtype).reshape(shape), or, when it is stored
with scales (weights trained with a scaled grid: he, absmean, absmean-tensor), as m·Δ, channel
c as m·Δ_c, or with "scale_of": "levels" as L(m)·s_c, L(m) = m·Δ_g the grid's level rounded
to float32 as training rounds it (`qtrain.export.scales`: on a k-bit grid fl(3·fl(Δ_g·s)) may
miss fl(fl(3·Δ_g)·s) by one ulp, so only the levels restore such a weight). That is the exact
value it had, because export refuses weights that are neither exactly on the grid nor exactly
on it with one scale or one scale per output channel; so a model loaded from a packed file
computes bit-identical outputs to the checkpoint's model (activation quantization included:
it is part of the model).
Everything is validated on load, the checksums first (safetensors has none, and a flipped
bit in a float tensor would otherwise pass unnoticed); a problem raises `PackedFormatError`
naming it and the fix. The header's own CRC-32 covers every byte of the JSON string, so an
edited value (a grid's Δ, a model's width) is refused like a damaged tensor. Older files are
still read: format version 2 stored every scale per channel, also C equal ones ("scale" is
never "tensor" there), and version 1 (qtrain 0.1) has no header checksum either; their
tensors are checked as always. A file's version is that of the newest feature it uses, so that
an older reader refuses it instead of computing other numbers: version 5 when any weight has
"scale_of" (a reader of version 3 or 4 would multiply the scale by m), else version 4 for a
model with "act_quant" (a reader of version 3 would build it without its activation
quantizers), else version 3. "scale_of" in a file of version < 5 is refused.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

import torch
from torch import nn

import qtrain
from qtrain.base.errors import UserError
from qtrain.base.io import atomic_write_bytes
from qtrain.base.optional import require
from qtrain.export.packing import pack_codes, packed_nbytes, unpack_codes
from qtrain.export.scales import LEVELS, MULTIPLES, scaled_codes, weight_from_codes
from qtrain.methods import parse_method
from qtrain.models.act_quant import apply_act_quant
from qtrain.quant import Grid
from qtrain.train.checkpoint import config_problem
from qtrain.train.config import portable
from qtrain.train.rebuild import BUILD_ERRORS, build_failure, build_model

FORMAT = "qtrain-packed"
FORMAT_VERSION = 3
ACT_QUANT_VERSION = 4  # a model with activation quantization ("act_quant")
LEVEL_SCALE_VERSION = 5  # a weight whose scale multiplies the grid's levels ("scale_of")
# version 2: scales per channel only; version 1: no header checksum either (qtrain 0.1)
READABLE_VERSIONS = (1, 2, 3, 4, 5)
SCALE_KINDS = ("channel", "tensor")  # one scale per output channel, one for the whole tensor
METADATA_KEY = "qtrain"
HEADER_CRC_KEY = "qtrain_crc32"
SCALE_SUFFIX = ":scale"  # ":" never occurs in a state_dict key
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
          "float64": torch.float64}  # fmt: skip
REEXPORT = "export it again from its checkpoint with {format}"
MAX_HEADER_BYTES = 100_000_000  # the safetensors limit on the JSON header


class PackedFormatError(UserError):
    """A packed model file that is missing, unreadable, corrupt or inconsistent."""

    def __init__(self, message: str, **settings: str) -> None:
        super().__init__(message, **{"format": "format=packed", **settings})


def save_packed(path: str | Path, record: dict) -> None:
    """Write the checkpoint `record` (as from `load_checkpoint`) as a packed file, atomically.

    Raises ValueError (nothing is written) when a quantized weight is not exactly on the
    record's grid, when the grid has no fixed code width, or when the weights do not fit
    the model the record names (`CheckpointError`).
    """
    safetensors = _safetensors()
    model = build_model(record)
    grid = Grid.from_dict(record["method"].get("grid"))
    # A tied parameter (a GPT's head is its token embedding) is stored once, under its first
    # name; the model the reader builds is tied the same way, so it knows the other name.
    tied = tied_names(model.state_dict())
    state = {n: t.detach().cpu() for n, t in model.state_dict().items() if n not in tied}
    tensors, quantized = dict(state), {}
    for name in record["quantized"]:
        if name not in state:
            raise PackedFormatError(
                f"the checkpoint lists quantized parameter {name!r}, which model "
                f"{record['model']['name']!r} does not have; the checkpoint is damaged"
            )
        packed, quantized[name] = _pack_weight(name, state[name], grid, record)
        tensors.update(packed)
    header = {
        "format": FORMAT,
        "format_version": _format_version(record["model"], quantized),
        "qtrain_version": qtrain.__version__,
        "model": record["model"],
        "method": record["method"],
        "quantized": quantized,
        "config": deployable_config(record.get("config") or {}),
        "bit_order": "little",
        "crc32": {name: tensor_crc32(t) for name, t in tensors.items()},
    }
    data = safetensors.torch.save(tensors, metadata=packed_metadata(header))
    atomic_write_bytes(path, sorted_metadata(data))


def _format_version(model: dict, quantized: dict) -> int:
    """The version of the newest feature the file uses, so that an older reader refuses a file
    it would restore to other numbers (a model without its activation quantizers, or weights
    scaled as multiples that were scaled as levels)."""
    if any(entry.get("scale_of") == LEVELS for entry in quantized.values()):
        return LEVEL_SCALE_VERSION
    return ACT_QUANT_VERSION if "act_quant" in model else FORMAT_VERSION


def tied_names(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """{name: the earlier name of the same tensor} for every entry of `state` that repeats one
    (tied weights share their storage)."""
    first: dict[tuple, str] = {}
    tied = {}
    for name, t in state.items():
        where = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride())
        if where in first:
            tied[name] = first[where]
        else:
            first[where] = name
    return tied


def packed_metadata(header: dict) -> dict[str, str]:
    """The safetensors metadata of a packed file: the JSON header and its CRC-32 (zlib)."""
    text = json.dumps(header)
    return {METADATA_KEY: text, HEADER_CRC_KEY: str(zlib.crc32(text.encode()))}


def sorted_metadata(data: bytes) -> bytes:
    """The safetensors file `data` with the keys of its __metadata__ in sorted order.

    safetensors writes them in the order of a Rust HashMap, which changes from one save to the
    next (safetensors issue #584), so two exports of one checkpoint differed in their bytes.
    serde_json escapes a string as Python's json does (without ensure_ascii), so the entries
    are found as written and put back sorted, and the header keeps its length. Bytes of any
    other layout are returned as they are.
    """
    (size,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + size]
    top = json.loads(header, object_pairs_hook=lambda pairs: pairs)
    entries = dict(top).get("__metadata__") if isinstance(top, list) else None
    if not entries:
        return data

    def text(pairs) -> bytes:
        items = (json.dumps(k, ensure_ascii=False) + ":" + json.dumps(v, ensure_ascii=False)
                 for k, v in pairs)  # fmt: skip
        return ('"__metadata__":{' + ",".join(items) + "}").encode()

    written = text(entries)
    if header.count(written) != 1:
        return data
    return data[:8] + header.replace(written, text(sorted(entries))) + data[8 + size :]


def deployable_config(config: dict) -> dict:
    """`config` without its machine keys (`qtrain.train.config.portable`: the data folder,
    device, threads, ...) and without any value that is an absolute path. Identity keys stay,
    ``amp`` among them, so the file is evaluated at its run's precision."""
    return {key: value for key, value in portable(config).items() if not _is_local_path(value)}


def _is_local_path(value: object) -> bool:
    return isinstance(value, str) and (value.startswith("~") or Path(value).is_absolute())


def _pack_weight(
    name: str, weight: torch.Tensor, grid: Grid, record: dict
) -> tuple[dict[str, torch.Tensor], dict]:
    """({name: packed uint8 codes[, name:scale: [1] or [C]]}, metadata entry) of a weight of
    the checkpoint `record`.

    Codes on the record's grid when the weight is exactly on it, else codes and scales
    (`qtrain.export.scales.scaled_codes`: one or one per output channel, multiplying the
    multiples m or, entry "scale_of": "levels", the grid's levels).
    """
    if not grid.bounded:
        raise PackedFormatError(
            f"grid {grid.describe()} has no fixed code width, so its weights cannot be "
            "packed; export with {format} instead",
            format="format=onnx",
        )
    dtype = str(weight.dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise PackedFormatError(
            f"quantized parameter {name!r} has dtype {dtype}, packed files hold float weights "
            f"({', '.join(DTYPES)}); the checkpoint is damaged"
        )
    entry = {"shape": list(weight.shape), "dtype": dtype, "code_bits": grid.code_bits}
    if grid.contains(weight):
        return {name: pack_codes(grid.to_codes(weight), grid.code_bits)}, entry
    found = scaled_codes(weight, grid)
    if found is None:  # restoring from codes (with any scales) would change the weight
        raise _off_grid(name, grid, record)
    packed = {
        name: pack_codes(found.codes, grid.code_bits),
        name + SCALE_SUFFIX: found.scale.contiguous(),
    }
    entry["scale"] = "tensor" if found.scale.numel() == 1 else "channel"
    if found.scale_of == LEVELS:  # absent for multiples, so those entries stay as they were
        entry["scale_of"] = LEVELS
    return packed, entry


def _off_grid(name: str, grid: Grid, record: dict) -> PackedFormatError:
    """The refusal of a weight that no codes restore: a full-precision run never put it on the
    grid; a run stopped inside its float phase (`float_fraction`) has not put it there yet; a
    quantized run that finished did, so its checkpoint was changed after training."""
    method = record["method"]
    where = (
        f"quantized parameter {name!r} is not exactly on the grid {grid.describe()}, nor on it "
        "with one scale per tensor or per output channel"
    )
    try:
        full_precision = parse_method(method.get("name", "")).mode == "fp"
    except ValueError:
        full_precision = False
    if full_precision:
        return PackedFormatError(
            f"{where}: method {method['name']!r} trains in full precision, so its weights "
            "cannot be packed; export a checkpoint written by a quantized method (bc, sr or r)"
        )
    in_float_phase = float_phase_refusal(where, record)
    if in_float_phase is not None:
        return in_float_phase
    return PackedFormatError(
        f"{where}, although method {method.get('name')!r} keeps its weights there, so the "
        "checkpoint was changed after training; export it with {format} and {onnx_weights}, "
        "which stores the weights as they are",
        format="format=onnx",
        onnx_weights="onnx_weights=float",
    )


def float_phase_refusal(where: str, record: dict) -> PackedFormatError | None:
    """The refusal of off-grid weights (`where` says which) of a run that was saved before it
    finished and trains in float first (`float_fraction`) or ramps its weights onto the grid
    (`quant_ramp`): its checkpoint may hold weights that the method puts on the grid only at
    step F + R. None for other runs."""
    config = record.get("config") or {}
    fraction, ramp = config.get("float_fraction") or 0, config.get("quant_ramp") or 0
    if not (fraction or ramp) or (record.get("training") or {}).get("finished", True):
        return None
    phases = [f"its float phase (float_fraction={fraction:g})"] if fraction else []
    phases += [f"its ramp onto the grid (quant_ramp={ramp:g})"] if ramp else []
    return PackedFormatError(
        f"{where}: the run was saved inside {' or '.join(phases)}, before its weights were "
        "put on the grid; finish it (its training command with {resume}) and export again, "
        "or export the float weights with {format} and {onnx_weights}",
        resume="resume=True",
        format="format=onnx",
        onnx_weights="onnx_weights=float",
    )


def is_packed_file(path: str | Path) -> bool:
    """True when `path` is a file that starts like a safetensors file (a cheap sniff)."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as f:
        start = f.read(9)
    if len(start) < 9:
        return False
    header_bytes = struct.unpack("<Q", start[:8])[0]
    return start[8:9] == b"{" and header_bytes <= MAX_HEADER_BYTES


def load_packed(path: str | Path) -> nn.Module:
    """The model stored in a packed file, rebuilt with its exact weights, in eval mode."""
    return read_packed(path)[0]


def read_packed(path: str | Path) -> tuple[nn.Module, dict]:
    """(model in eval mode, checkpoint-like record) of a packed file, validated throughout.

    The record has the keys `load_checkpoint` guarantees: model, method, quantized (a list
    of names), model_state (the unpacked state dict), config, plus format "qtrain-packed".
    """
    safetensors = _safetensors()
    path = Path(path)
    if not path.is_file():
        raise PackedFormatError(f"packed model file {path} does not exist; check the path")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            header = _parse_header(path, f.metadata())
            stored = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except (safetensors.SafetensorError, OSError) as e:
        raise PackedFormatError(
            f"{path} is not a readable safetensors file ({str(e)[:160]}); it may be truncated, "
            f"so {REEXPORT}"
        ) from None
    grid = _grid(path, header)
    model = _create_model(path, header["model"])
    tied = tied_names(model.state_dict())
    expected = {n: t for n, t in model.state_dict().items() if n not in tied}
    scales = {name for name in stored if name.endswith(SCALE_SUFFIX)}
    _check_names(path, set(stored) - scales, set(expected), set(header["quantized"]))
    _check_crc32(path, stored, header["crc32"])
    _check_scale_names(path, scales, header["quantized"])
    state, version = {}, header["format_version"]
    for name, reference in expected.items():
        entry = header["quantized"].get(name)
        tensor = (
            stored[name]
            if entry is None
            else _unpack_weight(path, name, stored[name], entry, grid, stored, version)
        )
        if tensor.shape != reference.shape or tensor.dtype != reference.dtype:
            raise PackedFormatError(
                f"{path}: tensor {name!r} is {tensor.dtype} {list(tensor.shape)} but model "
                f"{header['model']['name']!r} needs {reference.dtype} {list(reference.shape)}; "
                f"{REEXPORT}"
            )
        state[name] = tensor
    state.update({name: state[first] for name, first in tied.items()})
    model.load_state_dict(state)
    record = {
        "format": FORMAT,
        "model": header["model"],
        "method": header["method"],
        "quantized": list(header["quantized"]),
        "model_state": state,
        "config": header["config"],
    }
    return model.eval(), record


def _parse_header(path: Path, metadata: dict | None) -> dict:
    """The qtrain JSON header of a safetensors file, with its structure checked."""
    if not metadata or METADATA_KEY not in metadata:
        raise PackedFormatError(
            f"{path} is a safetensors file without qtrain metadata, so it is not a qtrain "
            f"packed model; {REEXPORT}"
        )
    stored_crc = metadata.get(HEADER_CRC_KEY)
    if stored_crc is not None and stored_crc != str(zlib.crc32(metadata[METADATA_KEY].encode())):
        raise PackedFormatError(
            f"{path}: the qtrain header fails its CRC-32 check, so the file was damaged or "
            f"edited after it was written; {REEXPORT}"
        )
    try:
        header = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise PackedFormatError(
            f"{path} has qtrain metadata that is not valid JSON ({e.msg}); {REEXPORT}"
        ) from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise PackedFormatError(f"{path} has metadata of another format; {REEXPORT}")
    version = header.get("format_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise PackedFormatError(
            f"{path} has packed format version {version!r}, this qtrain reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; load it with the qtrain version that "
            f"wrote it ({header.get('qtrain_version', 'unknown')})"
        )
    if version >= 2 and stored_crc is None:
        raise PackedFormatError(
            f"{path} lacks the CRC-32 of its qtrain header that format version {version} "
            f"carries, so it was edited after it was written; {REEXPORT}"
        )
    kinds = {"model": dict, "method": dict, "quantized": dict, "config": dict, "crc32": dict}
    for key, kind in kinds.items():
        if not isinstance(header.get(key), kind):
            raise PackedFormatError(
                f"{path} has metadata without a valid {key!r} entry; {REEXPORT}"
            )
    for key in ("model", "method"):
        if not isinstance(header[key].get("name"), str):
            raise PackedFormatError(
                f"{path} has metadata whose {key!r} entry has no name; {REEXPORT}"
            )
    if "act_quant" in header["model"] and version < ACT_QUANT_VERSION:
        raise PackedFormatError(
            f"{path} has format version {version} but declares activation quantization, "
            f"which version {ACT_QUANT_VERSION} introduced; {REEXPORT}"
        )
    problem = config_problem(header["config"])
    if problem:
        raise PackedFormatError(f"{path} has a damaged config in its header: {problem}; {REEXPORT}")
    if header.get("bit_order") != "little":
        raise PackedFormatError(
            f"{path} declares bit order {header.get('bit_order')!r}, only 'little' exists; "
            f"{REEXPORT}"
        )
    return header


def _grid(path: Path, header: dict) -> Grid:
    """The grid of the header; it must have a code width when any tensor is packed."""
    try:
        grid = Grid.from_dict(header["method"].get("grid"))
    except ValueError as e:
        raise PackedFormatError(
            f"{path} has an invalid grid in its metadata ({e}); {REEXPORT}"
        ) from None
    if header["quantized"] and not grid.bounded:
        raise PackedFormatError(
            f"{path} declares packed tensors on the unbounded grid {grid.describe()}, which has "
            f"no code width; {REEXPORT}"
        )
    return grid


def _create_model(path: Path, spec: dict) -> nn.Module:
    from qtrain import models

    try:
        model = models.create(
            spec["name"],
            num_classes=spec["num_classes"],
            width=spec["width"],
            in_channels=spec["in_channels"],
            activations=spec.get("activations", "float"),
            options=spec.get("options") or {},
        )
    except BUILD_ERRORS as e:
        reason = build_failure(e)
        raise PackedFormatError(
            f"{path} describes a model that cannot be built ({reason}); {REEXPORT}"
        ) from None
    try:
        return apply_act_quant(model, spec.get("act_quant"))
    except UserError as e:
        raise PackedFormatError(
            f"{path} describes activation quantization that does not fit its model "
            f"({str(e)[:160]}); {REEXPORT}"
        ) from None


def _check_names(path: Path, stored: set[str], expected: set[str], quantized: set[str]) -> None:
    missing, extra = sorted(expected - stored), sorted(stored - expected)
    if quantized - expected:
        raise PackedFormatError(
            f"{path} declares quantized tensor {sorted(quantized - expected)[0]!r}, which the "
            f"model does not have; {REEXPORT}"
        )
    if missing or extra:
        problems = []
        if missing:
            problems.append(f"lacks {len(missing)} tensor(s) such as {missing[0]!r}")
        if extra:
            problems.append(f"has {len(extra)} unexpected tensor(s) such as {extra[0]!r}")
        raise PackedFormatError(f"{path} {' and '.join(problems)}; {REEXPORT}")


def _check_scale_names(path: Path, scales: set[str], quantized: dict) -> None:
    """Every scale tensor belongs to a quantized entry that declares scales, and vice versa."""
    declared = {
        name + SCALE_SUFFIX
        for name, entry in quantized.items()
        if isinstance(entry, dict) and "scale" in entry
    }
    for problem, names in (("lacks", declared - scales), ("has an unexpected", scales - declared)):
        if names:
            raise PackedFormatError(
                f"{path} {problem} scale tensor {sorted(names)[0]!r}; {REEXPORT}"
            )


def tensor_crc32(tensor: torch.Tensor) -> int:
    """CRC-32 (zlib) of a contiguous tensor's bytes as stored."""
    return zlib.crc32(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def _check_crc32(path: Path, stored: dict[str, torch.Tensor], checksums: dict) -> None:
    for name in sorted(stored):
        if checksums.get(name) != tensor_crc32(stored[name]):
            raise PackedFormatError(
                f"{path}: tensor {name!r} fails its CRC-32 check, so the file was damaged or "
                f"edited after it was written; {REEXPORT}"
            )


def _unpack_weight(
    path: Path,
    name: str,
    packed: torch.Tensor,
    entry: object,
    grid: Grid,
    stored: dict,
    version: int,
) -> torch.Tensor:
    """The float weight that one packed tensor (with its scales) and its entry describe."""
    if not (
        isinstance(entry, dict)
        and isinstance(entry.get("shape"), list)
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in entry["shape"])
        and entry.get("dtype") in DTYPES
        and entry.get("code_bits") == grid.code_bits
        and entry.get("scale", "channel") in SCALE_KINDS
        and (entry["shape"] or "scale" not in entry)
    ):
        raise PackedFormatError(
            f"{path}: the metadata of quantized tensor {name!r} is invalid (it needs an integer "
            f"shape, a float dtype, code_bits {grid.code_bits} and no scale other than "
            f"{' or '.join(map(repr, SCALE_KINDS))}); {REEXPORT}"
        )
    _check_scale_of(path, name, entry, version)
    count = math.prod(entry["shape"])
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise PackedFormatError(
            f"{path}: quantized tensor {name!r} is {packed.dtype} {list(packed.shape)}, packed "
            f"codes are 1-D uint8; {REEXPORT}"
        )
    if packed.numel() != packed_nbytes(count, grid.code_bits):
        raise PackedFormatError(
            f"{path}: quantized tensor {name!r} has {packed.numel()} bytes, but {count} codes "
            f"of {grid.code_bits} bits need {packed_nbytes(count, grid.code_bits)}; {REEXPORT}"
        )
    try:
        codes = unpack_codes(packed, grid.code_bits, count)
    except ValueError as e:
        raise PackedFormatError(f"{path}: quantized tensor {name!r}: {e}; {REEXPORT}") from None
    if count and int(codes.max()) >= grid.num_levels:
        raise PackedFormatError(
            f"{path}: quantized tensor {name!r} holds code {int(codes.max())}, grid "
            f"{grid.describe()} has {grid.num_levels} levels; {REEXPORT}"
        )
    dtype = DTYPES[entry["dtype"]]
    if "scale" not in entry:
        return grid.from_codes(codes, dtype).reshape(entry["shape"])
    scale = stored[name + SCALE_SUFFIX]
    if entry["scale"] == "tensor":
        scales, each = 1, "one for the whole tensor"
    else:
        scales, each = entry["shape"][0], "one per output channel"
    if not (
        scale.dtype in (torch.float32, torch.float64)
        and list(scale.shape) == [scales]
        and bool(torch.isfinite(scale).all())
        and bool((scale >= 0).all())
    ):
        raise PackedFormatError(
            f"{path}: the scales of quantized tensor {name!r} are not {scales} finite float "
            f"value(s) >= 0 ({each}); {REEXPORT}"
        )
    scale_of = entry.get("scale_of", MULTIPLES)
    return weight_from_codes(codes, scale, grid, entry["shape"], dtype, scale_of)


def _check_scale_of(path: Path, name: str, entry: dict, version: int) -> None:
    """A "scale_of" key only as written: "levels", on a scaled weight, from version 5 on."""
    if "scale_of" not in entry:
        return
    if version < LEVEL_SCALE_VERSION:
        raise PackedFormatError(
            f"{path} has format version {version} but quantized tensor {name!r} declares "
            f"'scale_of', which version {LEVEL_SCALE_VERSION} introduced; {REEXPORT}"
        )
    if entry["scale_of"] != LEVELS or "scale" not in entry:
        declared = str(entry["scale_of"])[:40]
        raise PackedFormatError(
            f"{path}: quantized tensor {name!r} declares 'scale_of' {declared!r}, which only a "
            f"scaled tensor has, as {LEVELS!r}; {REEXPORT}"
        )


def _safetensors():
    """The safetensors package, or MissingDependencyError naming the extra to install."""
    require("safetensors.torch", "export", "reading or writing packed model files")
    return require("safetensors", "export", "reading or writing packed model files")
