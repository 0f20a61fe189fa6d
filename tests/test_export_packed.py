"""Packed files: bit-identical round trips for every model and grid, exact sizes, bad input."""

from __future__ import annotations

import argparse
import json
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F

from qtrain import methods, models
from qtrain.base.errors import MissingDependencyError
from qtrain.export import (
    PackedFormatError,
    is_packed_file,
    load_any_model,
    load_packed,
    packed_nbytes,
    read_packed,
    save_packed,
)
from qtrain.export.cli import add_parsers
from qtrain.export.packed import packed_metadata, tensor_crc32
from qtrain.quant import grids, parse_grid
from qtrain.train.checkpoint import load_checkpoint, save_checkpoint

safe_open = pytest.importorskip("safetensors").safe_open
save_file = pytest.importorskip("safetensors.torch").save_file


GRIDS = {
    "binary": grids.binary(),
    "ternary": grids.ternary(0.5),
    "2bit": grids.kbit(2),
    "3bit": grids.kbit(3, 0.125),
    "4bit": grids.kbit(4, 0.01),
}


def input_side(name: str) -> int:
    """The model's own input side for the VGGs (their classifier needs 32) and speednet (three
    poolings after an unpadded 2×2 whitening conv), else 8 pixels."""
    return 32 if name.startswith(("vgg", "speednet")) else 8


@torch.no_grad()
def calibrate_bn(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Set every BatchNorm's running statistics to those of batch `x`, as after training."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one batch gives its own statistics
    model.train()(x)
    model.eval()


def save_record(path, model, name, grid, *, width, method="bc-adam", quantized=None, seed=0):
    """Save `model` as a checkpoint the way the trainer does."""
    if quantized is None:
        quantized = [] if method.startswith("fp") else methods.quantized_parameter_names(model)
    save_checkpoint(
        path,
        {
            "model": {"name": name, "num_classes": 10, "width": width, "in_channels": 3},
            "method": {"name": method, "grid": grid.to_dict(), "policy": "conv"},
            "quantized": quantized,
            "model_state": model.state_dict(),
            "config": {"seed": seed},
        },
    )


def make_checkpoint(path, name="tiny_cnn", grid="binary", *, width=0.2, method="bc-adam",
                    steps=2, seed=0):  # fmt: skip
    """A trained checkpoint: `steps` optimizer steps on random data, BN statistics of that data.

    Returns the model in eval mode and its input batch.
    """
    model = models.create(name, 10, width, 3)
    optimizer = methods.create(method, model, lr=0.01, grid=grid, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    side = input_side(name)
    x = torch.randn(4, 3, side, side, generator=generator)
    y = torch.randint(0, 10, (4,), generator=generator)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    calibrate_bn(model, x)
    save_record(path, model, name, parse_grid(grid), width=width, method=method, seed=seed)
    return model, x


def make_random_checkpoint(path, name, grid, *, width, seed=0):
    """A checkpoint whose quantized weights are uniform random levels of `grid` (every code).

    Returns the model in eval mode and its input batch.
    """
    model = models.create(name, 10, width, 3)
    generator = torch.Generator().manual_seed(seed)
    names = set(methods.quantized_parameter_names(model))
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key in names:
                codes = torch.randint(0, grid.num_levels, p.shape, generator=generator)
                p.copy_(grid.from_codes(codes))
    side = input_side(name)
    x = torch.randn(3, 3, side, side, generator=generator)
    calibrate_bn(model, x)
    save_record(path, model, name, grid, width=width, seed=seed)
    return model, x


def export_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="qtrain")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", *map(str, argv)])
    return args.func(args)


def assert_same_model(reference: torch.nn.Module, loaded: torch.nn.Module, x: torch.Tensor):
    expected, actual = reference.state_dict(), loaded.state_dict()
    assert list(actual) == list(expected)
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        assert torch.equal(actual[name], expected[name]), name
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("name", models.list_models("image"))
def test_round_trip_is_bit_identical_with_exact_sizes(tmp_path, name, grid):
    width = 0.2 if name.startswith("tiny") else 0.125  # odd channel counts: padding bits
    grid = GRIDS[grid]
    model, x = make_random_checkpoint(tmp_path / "c.pt", name, grid, width=width)
    save_packed(tmp_path / "m.safetensors", load_checkpoint(tmp_path / "c.pt"))
    assert_same_model(model, load_packed(tmp_path / "m.safetensors"), x)

    quantized = set(methods.quantized_parameter_names(model))
    assert quantized
    with safe_open(tmp_path / "m.safetensors", framework="pt") as f:
        for key, tensor in model.state_dict().items():
            stored = f.get_tensor(key)
            if key in quantized:
                assert stored.dtype == torch.uint8
                assert stored.numel() == packed_nbytes(tensor.numel(), grid.code_bits)
            else:
                assert torch.equal(stored, tensor)


@pytest.mark.parametrize("method", ["bc-adam", "sr-adam", "r-sgd", "fp-adam"])
def test_trained_checkpoint_round_trip_is_bit_identical(tmp_path, method):
    model, x = make_checkpoint(tmp_path / "c.pt", grid="2bit", method=method)
    save_packed(tmp_path / "m.safetensors", load_checkpoint(tmp_path / "c.pt"))
    loaded, record = read_packed(tmp_path / "m.safetensors")
    assert_same_model(model, loaded, x)
    assert record["quantized"] == load_checkpoint(tmp_path / "c.pt")["quantized"]
    assert bool(record["quantized"]) == (method != "fp-adam")


def test_binary_vgg9_conv_weights_take_one_thirty_second(tmp_path):
    """Full-size VGG-9: 1,734,336 binary conv weights in 216,792 bytes, 1/32 of float32."""
    model, x = make_random_checkpoint(tmp_path / "c.pt", "vgg9", grids.binary(), width=1.0)
    record = load_checkpoint(tmp_path / "c.pt")
    save_packed(tmp_path / "vgg9.safetensors", record)
    state = model.state_dict()
    conv_float, conv_packed, tensor_bytes = 0, 0, 0
    with safe_open(tmp_path / "vgg9.safetensors", framework="pt") as f:
        for key in f.keys():  # noqa: SIM118
            stored = f.get_tensor(key)
            tensor_bytes += stored.numel() * stored.element_size()
            if key in record["quantized"]:
                conv_float += state[key].numel() * 4
                conv_packed += stored.numel()
    assert conv_packed == 1_734_336 // 8 == 216_792
    assert conv_float == 32 * conv_packed
    assert tensor_bytes == 4_444_992  # float linear/BN tensors as they are
    header = (tmp_path / "vgg9.safetensors").stat().st_size - tensor_bytes
    assert 0 < header < 16_384
    assert_same_model(model, load_packed(tmp_path / "vgg9.safetensors"), x)


def test_metadata_states_the_format(tmp_path):
    make_checkpoint(tmp_path / "c.pt", grid="ternary")
    save_packed(tmp_path / "m.safetensors", load_checkpoint(tmp_path / "c.pt"))
    with safe_open(tmp_path / "m.safetensors", framework="pt") as f:
        metadata = f.metadata()
    assert sorted(metadata) == ["qtrain", "qtrain_crc32"]
    assert metadata["qtrain_crc32"] == str(zlib.crc32(metadata["qtrain"].encode()))
    header = json.loads(metadata["qtrain"])
    assert header["format"] == "qtrain-packed" and header["format_version"] == 3
    assert header["bit_order"] == "little"
    assert header["method"]["grid"] == {"kind": "ternary", "delta": 1.0, "bits": None}
    assert header["model"]["name"] == "tiny_cnn"
    assert header["config"] == {"seed": 0}
    with safe_open(tmp_path / "m.safetensors", framework="pt") as f:
        assert header["crc32"] == {key: tensor_crc32(f.get_tensor(key)) for key in f.keys()}  # noqa: SIM118
    first = header["quantized"]["features.0.0.weight"]
    assert first == {"shape": [6, 3, 3, 3], "dtype": "float32", "code_bits": 2}


def test_exports_of_one_checkpoint_are_byte_identical(tmp_path):
    # safetensors orders the metadata by a Rust HashMap seeded anew for each save: unsorted,
    # two keys came out in either order about half of the time (safetensors issue #584).
    make_checkpoint(tmp_path / "c.pt")
    record = load_checkpoint(tmp_path / "c.pt")
    files = []
    for k in range(8):
        save_packed(tmp_path / f"m{k}.safetensors", record)
        files.append((tmp_path / f"m{k}.safetensors").read_bytes())
    assert all(data == files[0] for data in files)
    size = int.from_bytes(files[0][:8], "little")
    header = json.loads(files[0][8 : 8 + size], object_pairs_hook=lambda pairs: pairs)
    assert [key for key, _ in dict(header)["__metadata__"]] == ["qtrain", "qtrain_crc32"]


def test_cli_export_and_load_any_model(tmp_path, capsys):
    model, x = make_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert (
        export_cli(tmp_path / "run", "--format", "packed", "--out", tmp_path / "m.safetensors") == 0
    )
    assert "wrote" in capsys.readouterr().out
    for source in (
        tmp_path / "run",
        tmp_path / "run" / "checkpoint.pt",
        tmp_path / "m.safetensors",
    ):
        loaded, record = load_any_model(source)
        assert record["model"]["name"] == "tiny_cnn"
        assert record["quantized"] == methods.quantized_parameter_names(model)
        assert_same_model(model, loaded, x)
    assert is_packed_file(tmp_path / "m.safetensors")
    assert not is_packed_file(tmp_path / "run" / "checkpoint.pt")
    assert not is_packed_file(tmp_path / "run")


# -- bad input: a clear error and nothing written ----------------------------------------------


@pytest.fixture
def packed(tmp_path):
    """A valid ternary packed file; its first weight has 6·3·3·3 = 162 codes in 41 bytes.

    Ternary leaves code 3 unused and 162·2 = 324 bits leave 4 padding bits to corrupt.
    """
    make_checkpoint(tmp_path / "c.pt", grid="ternary")
    save_packed(tmp_path / "m.safetensors", load_checkpoint(tmp_path / "c.pt"))
    return tmp_path / "m.safetensors"


def rewrite(path, *, tensors=None, header=None, metadata=None):
    """Rewrite a packed file with edited tensors (dict → dict) and/or header (dict → dict).

    Checksums (of the tensors, then of the header) are recomputed: the file is consistently
    written but wrong, as a buggy or hostile producer would write it, so the validation
    behind the checksums is tested. `metadata` replaces the whole metadata as given.
    """
    with safe_open(path, framework="pt") as f:
        stored = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        edited = json.loads(f.metadata()["qtrain"])
    if tensors:
        stored = tensors(stored)
    edited["crc32"] = {key: tensor_crc32(t) for key, t in stored.items()}
    if header:
        edited = header(edited)
    save_file(stored, path, metadata=packed_metadata(edited) if metadata is None else metadata)


def assert_export_refused(source, out, match):
    """Export to `out` (which holds b"old") fails with `match` and leaves the folder as it was."""
    out.write_bytes(b"old")
    before = sorted(p.name for p in out.parent.iterdir())
    for fmt in ("packed", "onnx"):
        with pytest.raises(ValueError, match=match):
            export_cli(source, "--format", fmt, "--out", out)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in out.parent.iterdir()) == before


FIRST = "features.0.0.weight"


def _set(d, key, value):
    d[key] = value
    return d


def _drop(d, key):
    del d[key]
    return d


CORRUPTIONS = {
    "truncated packed tensor": (
        dict(tensors=lambda t: _set(t, FIRST, t[FIRST][:-1])),
        "has 40 bytes, but 162 codes of 2 bits need 41",
    ),
    "packed tensor of floats": (
        dict(tensors=lambda t: _set(t, FIRST, torch.zeros(41))),
        "packed codes are 1-D uint8",
    ),
    "code without a level": (
        dict(tensors=lambda t: _set(t, FIRST, torch.full((41,), 0x0F, dtype=torch.uint8))),
        "holds code 3, grid ternary",
    ),
    "nonzero padding bits": (
        dict(tensors=lambda t: _set(t, FIRST, torch.cat([t[FIRST][:-1], t[FIRST][-1:] | 0x80]))),
        "padding bits after the last code are not zero",
    ),
    "missing tensor": (
        dict(tensors=lambda t: _drop(t, "fc.bias")),
        "lacks 1 tensor.*'fc.bias'",
    ),
    "extra tensor": (
        dict(tensors=lambda t: _set(t, "fc.extra", torch.zeros(1))),
        "1 unexpected tensor.*'fc.extra'",
    ),
    "float tensor of the wrong shape": (
        dict(tensors=lambda t: _set(t, "fc.bias", torch.zeros(11))),
        r"'fc.bias' is torch.float32 \[11\] but model 'tiny_cnn' needs torch.float32 \[10\]",
    ),
    "no qtrain metadata": (dict(metadata={"other": "1"}), "without qtrain metadata"),
    "metadata not JSON": (dict(metadata={"qtrain": "{not json"}), "not valid JSON"),
    "another format": (dict(header=lambda h: _set(h, "format", "x")), "another format"),
    "newer version": (dict(header=lambda h: _set(h, "format_version", 6)), "version 6"),
    "unknown grid": (
        dict(header=lambda h: _set(h["method"], "grid", {"kind": "quinary"}) and h),
        "invalid grid",
    ),
    "unbounded grid": (
        dict(header=lambda h: _set(h["method"], "grid", {"kind": "lattice", "delta": 1}) and h),
        "unbounded grid",
    ),
    "code bits disagree with the grid": (
        dict(header=lambda h: _set(h["quantized"][FIRST], "code_bits", 1) and h),
        f"metadata of quantized tensor '{FIRST}' is invalid",
    ),
    "bad shape": (
        dict(header=lambda h: _set(h["quantized"][FIRST], "shape", [8, -3, 3, 3]) and h),
        "is invalid",
    ),
    "unknown model": (
        dict(header=lambda h: _set(h["model"], "name", "vgg10") and h),
        "model that cannot be built",
    ),
    "other model": (
        dict(header=lambda h: _set(h["model"], "name", "tiny_mlp") and h),
        "declares quantized tensor '.*', which the model does not have",
    ),
    "quantized entry of no tensor": (
        dict(header=lambda h: _set(h["quantized"], "fc.nothing", {}) and h),
        "declares quantized tensor 'fc.nothing'",
    ),
    "missing model entry": (dict(header=lambda h: _drop(h, "model")), "valid 'model' entry"),
    "wrong checksum": (
        dict(header=lambda h: _set(h["crc32"], "fc.bias", h["crc32"]["fc.bias"] ^ 1) and h),
        "'fc.bias' fails its CRC-32 check",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_packed_file_is_refused(packed, case):
    edits, match = CORRUPTIONS[case]
    rewrite(packed, **edits)
    with pytest.raises(PackedFormatError, match=match) as error:
        load_packed(packed)
    assert "export it again" in str(error.value) or "qtrain version" in str(error.value)
    assert_export_refused(packed, packed.parent / "out.bin", match)


@pytest.mark.parametrize("name", ["fc.weight", FIRST])  # a float tensor, packed codes
def test_flipped_bit_is_refused(packed, name):
    data = bytearray(packed.read_bytes())
    header_bytes = int.from_bytes(data[:8], "little")
    start, _ = json.loads(data[8 : 8 + header_bytes])[name]["data_offsets"]
    data[8 + header_bytes + start] ^= 0x10
    packed.write_bytes(bytes(data))
    with pytest.raises(PackedFormatError, match=f"'{name}' fails its CRC-32 check"):
        load_packed(packed)


def test_truncated_file_is_refused(packed):
    data = packed.read_bytes()
    packed.write_bytes(data[: len(data) // 2])
    with pytest.raises(PackedFormatError, match="not a readable safetensors file"):
        load_packed(packed)
    assert_export_refused(packed, packed.parent / "out.bin", "not a readable")


def test_non_checkpoint_file_is_refused(tmp_path):
    for text in ("not a model\n", "hello"):  # "h" is an unpickler opcode
        (tmp_path / "notes.txt").write_text(text)
        assert_export_refused(tmp_path / "notes.txt", tmp_path / "out.bin", "neither a qtrain")
    make_checkpoint(tmp_path / "c.pt")
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "c.pt").write_bytes(data[: len(data) // 2])
    assert_export_refused(tmp_path / "c.pt", tmp_path / "out.bin", "or is truncated")
    assert_export_refused(tmp_path / "missing.pt", tmp_path / "out.bin", "does not exist")


def test_checkpoint_of_another_model_is_refused(tmp_path):
    torch.save(models.create("vgg9", 10, 0.125, 3).state_dict(), tmp_path / "state.pt")
    assert_export_refused(tmp_path / "state.pt", tmp_path / "out.bin", "not a qtrain checkpoint")

    make_checkpoint(tmp_path / "c.pt")
    record = load_checkpoint(tmp_path / "c.pt")
    record["model"]["name"] = "resnet56"  # weights of tiny_cnn labelled as another model
    save_checkpoint(tmp_path / "c.pt", record)
    assert_export_refused(tmp_path / "c.pt", tmp_path / "out.bin", "do not fit model 'resnet56'")


def test_weights_off_the_grid_are_refused(tmp_path):
    make_checkpoint(tmp_path / "c.pt", method="fp-adam")
    record = load_checkpoint(tmp_path / "c.pt")
    record["quantized"] = methods.quantized_parameter_names(models.create("tiny_cnn", 10, 0.2, 3))
    save_checkpoint(tmp_path / "c.pt", record)
    out = tmp_path / "m.safetensors"
    with pytest.raises(PackedFormatError, match="is not exactly on the grid binary.*'fp-adam' "
                       "trains in full precision"):  # fmt: skip
        export_cli(tmp_path / "c.pt", "--format", "packed", "--out", out)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def test_output_over_its_own_source_is_refused(tmp_path):
    make_checkpoint(tmp_path / "c.pt")
    data = (tmp_path / "c.pt").read_bytes()
    with pytest.raises(ValueError, match="is the source file itself"):
        export_cli(tmp_path / "c.pt", "--format", "packed", "--out", tmp_path / "c.pt")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(data)
    with pytest.raises(ValueError, match="is the source file itself"):
        export_cli(
            tmp_path / "run", "--format", "onnx", "--out", tmp_path / "run" / "checkpoint.pt"
        )
    assert (tmp_path / "c.pt").read_bytes() == data
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == data


def test_missing_safetensors_names_the_extra(tmp_path, monkeypatch):
    make_checkpoint(tmp_path / "c.pt")
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if it were not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'qtrain\[export\]'"):
        export_cli(tmp_path / "c.pt", "--format", "packed", "--out", tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
