"""The packed header: covered by its own CRC-32, and free of the training machine's paths."""

from __future__ import annotations

import json

import pytest
from test_export_packed import assert_same_model, make_checkpoint, rewrite

from qtrain.cli import main
from qtrain.export import PackedFormatError, load_packed, save_packed
from qtrain.train.checkpoint import load_checkpoint, save_checkpoint
from qtrain.train.config import RunConfig, identity_keys, keys

safe_open = pytest.importorskip("safetensors").safe_open
save_file = pytest.importorskip("safetensors.torch").save_file


def packed_run(tmp_path, **config):
    """(packed file, model, inputs) of a tiny_cnn checkpoint whose record holds a full
    RunConfig (synthetic data, `config` applied), as the trainer saves it."""
    model, x = make_checkpoint(tmp_path / "c.pt")
    record = load_checkpoint(tmp_path / "c.pt")
    record["config"] = RunConfig(model="tiny_cnn", dataset="synthetic", **config).to_dict()
    save_checkpoint(tmp_path / "c.pt", record)
    save_packed(tmp_path / "m.safetensors", load_checkpoint(tmp_path / "c.pt"))
    return tmp_path / "m.safetensors", model, x


def header_of(path) -> dict:
    with safe_open(path, framework="pt") as f:
        return json.loads(f.metadata()["qtrain"])


def test_a_header_value_edited_in_place_is_refused(tmp_path, capsys):
    packed, model, x = packed_run(tmp_path)
    assert_same_model(model, load_packed(packed), x)  # the untouched file loads
    data = packed.read_bytes()
    # The header is a JSON string inside safetensors' JSON: its quotes are escaped.
    edited = data.replace(b'\\"delta\\": 1.0', b'\\"delta\\": 7.0')
    assert len(edited) == len(data) and edited != data
    packed.write_bytes(edited)
    with pytest.raises(PackedFormatError, match="header fails its CRC-32 check") as error:
        load_packed(packed)
    assert str(packed) in str(error.value)
    assert main(["eval", str(packed)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith(f"qtrain: error: {packed}: the qtrain header fails its CRC-32 check")


def test_a_header_without_its_checksum_is_refused(tmp_path):
    packed, _, _ = packed_run(tmp_path)
    rewrite(packed, metadata={"qtrain": json.dumps(header_of(packed))})
    with pytest.raises(PackedFormatError, match="lacks the CRC-32 of its qtrain header"):
        load_packed(packed)


def test_a_file_of_format_version_1_is_still_read(tmp_path):
    """qtrain 0.1 wrote no header checksum; such a file loads with its tensors checked."""
    packed, model, x = packed_run(tmp_path)
    header = {**header_of(packed), "format_version": 1, "qtrain_version": "0.1.0"}
    rewrite(packed, metadata={"qtrain": json.dumps(header)})
    assert_same_model(model, load_packed(packed), x)


def test_the_packed_file_carries_no_path_or_setting_of_the_training_machine(tmp_path):
    data_dir, out = tmp_path / "data", tmp_path / "runs"
    packed, _, _ = packed_run(tmp_path, data_dir=str(data_dir), device="cpu", threads=2)
    record = load_checkpoint(tmp_path / "c.pt")
    record["config"]["out"] = str(out)  # any absolute path, whatever its key
    record["config"]["cache"] = "~/cache"
    save_checkpoint(tmp_path / "c.pt", record)
    save_packed(packed, load_checkpoint(tmp_path / "c.pt"))

    assert str(tmp_path).encode() not in packed.read_bytes()
    config = header_of(packed)["config"]
    machine = set(keys(kind="machine"))
    assert not machine & set(config) and {"out", "cache"}.isdisjoint(config)
    full = RunConfig(model="tiny_cnn", dataset="synthetic").to_dict()
    assert config == {k: v for k, v in full.items() if k not in machine}
    assert {"amp", *identity_keys()} <= set(full) and set(identity_keys()) <= set(config)
