"""Fuzzed inputs: every kind of file qtrain reads, mutated by hypothesis, ends either with the
result of the unmutated file or with one line and exit 2; never a traceback, a hang, or a
changed number accepted.

The kinds and what "the same result" means for each (a packed file or checkpoint carries
CRC-32s, so only its original result is allowed; a config value, a metrics record, pixels or
text carry none, so an accepted change must read back exactly as the file says) are in
tests/fuzz_kinds.py, the outcomes in tests/fuzz_harness.py, the mutations in
tests/fuzz_mutations.py. These are the CI-sized runs (derandomized, so every run draws the
same cases); benchmarks/fuzz_inputs.py draws hundreds per kind, its figures are in
docs/reliability.md ("Fuzzed inputs").
"""

from __future__ import annotations

import shutil
import warnings
import zipfile

import pytest
import torch
from fuzz_harness import run_cli
from fuzz_kinds import KINDS, Originals, imagenet_images, run_case
from fuzz_mutations import (
    AddKey,
    DeleteEntry,
    Insert,
    Overwrite,
    SetValue,
    Stack,
    StructuredStack,
    Truncate,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qtrain.train import rundir
from qtrain.train.config import ConfigError, load_toml

pytest.importorskip("safetensors")
pytest.importorskip("PIL")

EXAMPLES = {"packed": 20, "checkpoint": 20, "config": 15, "presets": 40, "metrics": 15,
            "cifar": 25, "text": 25, "imagenet": 15, "packed-resigned": 25,
            "checkpoint-resaved": 25}  # fmt: skip


@pytest.fixture(scope="module")
def kinds(tmp_path_factory) -> dict:
    originals = Originals(tmp_path_factory.mktemp("fuzz"))
    return {kind.name: kind(originals) for kind in KINDS}


def judge(kind, data) -> None:
    case = data.draw(kind.cases(), label="case")
    verdict = run_case(kind, case)
    assert verdict.ok, f"{kind.name}: {verdict.outcome}: {verdict.detail}"


def fuzz_test(name: str):
    @settings(max_examples=EXAMPLES[name], deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(data=st.data())
    def test(kinds, data):
        judge(kinds[name], data)

    test.__name__ = f"test_fuzzed_{name.replace('-', '_')}_ends_same_or_refused"
    test.__doc__ = f"Mutated {name} files: the original result or one line and exit 2."
    return test


test_fuzzed_packed_ends_same_or_refused = fuzz_test("packed")
test_fuzzed_checkpoint_ends_same_or_refused = fuzz_test("checkpoint")
test_fuzzed_config_ends_same_or_refused = fuzz_test("config")
test_fuzzed_presets_end_same_or_refused = fuzz_test("presets")
test_fuzzed_metrics_end_same_or_refused = fuzz_test("metrics")
test_fuzzed_cifar_ends_same_or_refused = fuzz_test("cifar")
test_fuzzed_text_ends_same_or_refused = fuzz_test("text")
test_fuzzed_imagenet_ends_same_or_refused = fuzz_test("imagenet")
test_fuzzed_packed_resigned_ends_same_or_refused = fuzz_test("packed-resigned")
test_fuzzed_checkpoint_resaved_ends_same_or_refused = fuzz_test("checkpoint-resaved")


# -- what the fuzzer found: each case below was a failure before its fix ----------------------


def metrics_case(*steps):
    return ("record", 0, StructuredStack(tuple(steps)))


REGRESSIONS = {
    # a record without a key the report reads: KeyError in the figure, or in the table
    "record without epoch": ("metrics", metrics_case(DeleteEntry(("epoch",)))),
    "record without seconds": ("metrics", metrics_case(DeleteEntry(("seconds",)))),
    "record with text for an error": (
        "metrics",
        metrics_case(SetValue(("train_error",), "12.5")),
    ),  # fmt: skip
    "record with a bool for an epoch": ("metrics", metrics_case(SetValue(("epoch",), True))),
    "record that is a number": ("metrics", ("bytes", 0, Stack((Insert(0, b"5\n"),)))),
    # a byte that is not UTF-8: UnicodeDecodeError from read_text
    "metrics not UTF-8": ("metrics", ("bytes", 0, Stack((Overwrite(5, b"\xff"),)))),
    # a label True among the integer labels of a batch: numpy read it as 1
    "CIFAR label that is a bool": (
        "cifar",
        ("library", ("data_batch_1", ("dict", ("label", 12, True)))),
    ),
    # an image Pillow cannot decode, met in a DataLoader worker: the worker's traceback was
    # flattened into the "one line"
    "undecodable image in a worker": (
        "imagenet",
        ("cli", ("bytes", 0, Stack((Truncate(60),)))),
    ),  # fmt: skip
    # a packed header edited and its CRC-32 recomputed: KeyError in evaluate, an allocation
    # of terabytes, AttributeError on options that are not a table
    "packed method without a name": (
        "packed-resigned",
        StructuredStack((DeleteEntry(("method", "name")),)),
    ),  # fmt: skip
    "packed model a billion times wider": (
        "packed-resigned",
        StructuredStack((SetValue(("model", "width"), 1084074174),)),
    ),
    "packed model options that are not a table": (
        "packed-resigned",
        StructuredStack((SetValue(("model", "options"), True),)),
    ),
    # a checkpoint edited and saved again: ValueError from float(tensor), TypeError from
    # load_state_dict
    "checkpoint width that is a tensor": (
        "checkpoint-resaved",
        StructuredStack((SetValue(("model", "width"), torch.zeros(2)),)),
    ),
    "checkpoint model_state that is a number": (
        "checkpoint-resaved",
        StructuredStack((SetValue(("model_state",), 5),)),
    ),  # fmt: skip
    # ... and: AttributeError on a weight average that is not a table, TypeError on a data
    # folder that is a number
    "checkpoint weight average that is a list": (
        "checkpoint-resaved",
        StructuredStack((SetValue(("training", "ema"), [None]),)),
    ),
    "checkpoint data_dir that is a number": (
        "checkpoint-resaved",
        StructuredStack((SetValue(("config", "data_dir"), -2200),)),
    ),
}


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_fuzzer_finding_is_refused_in_one_line(kinds, name):
    kind, case = REGRESSIONS[name]
    verdict = run_case(kinds[kind], case)
    assert verdict.outcome == "refused", f"{verdict.outcome}: {verdict.detail}"
    assert "Traceback" not in verdict.detail


def test_a_record_with_a_line_separator_in_a_string_is_read(kinds):
    """JSON Lines end at "\\n": a U+2028 inside a string (valid JSON) does not cut a record."""
    case = metrics_case(AddKey((), "note", "a\u2028b\x85c"))
    mutated = kinds["metrics"].mutate(case)
    assert "\u2028".encode() not in mutated  # json.dumps escapes it: write it raw
    raw = mutated.replace(b"\\u2028", "\u2028".encode()).replace(b"\\u0085", "\x85".encode())
    assert "\u2028".encode() in raw
    folder = kinds["metrics"].originals.case_folder()
    (folder / "metrics.jsonl").write_bytes(raw)
    records = rundir.read_metrics(folder)
    assert records[0]["note"] == "a\u2028b\x85c" and len(records) == 2


def test_an_image_claiming_a_huge_size_is_refused(kinds):
    """A JPEG whose frame header says 65535 × 65535 pixels: Pillow raises its
    DecompressionBombError (not an OSError), which escaped as a traceback."""
    originals = kinds["imagenet"].originals
    data = imagenet_images(originals.imagenet)[0].read_bytes()
    frame = data.index(b"\xff\xc0")  # marker, length (2), precision (1), height, width
    case = ("library", ("bytes", 0, Stack((Overwrite(frame + 5, b"\xff\xff\xff\xff"),))))
    verdict = run_case(kinds["imagenet"], case)
    assert verdict.outcome == "refused", f"{verdict.outcome}: {verdict.detail}"
    assert "cannot be decoded as an image" in verdict.detail


@pytest.mark.parametrize(
    "content, says",
    [
        (b"{not json", "label.json is not a JSON object with the texts row and method"),
        (b'{"row": "r"}', "label.json is not a JSON object with the texts row and method"),
        (b"\xff\xfe", "label.json is not a JSON object"),
    ],
)
def test_a_damaged_label_json_is_refused(kinds, content, says):
    folder = kinds["metrics"].originals.case_folder()
    run = folder / "run"
    shutil.copytree(kinds["metrics"].originals.run, run)
    (run / "label.json").write_bytes(content)
    result = run_cli("report", run, "--out", folder / "report")
    assert result.code == 2 and says in result.err and len(result.err.splitlines()) == 1


def test_a_run_config_without_its_model_is_refused_by_report(kinds):
    folder = kinds["metrics"].originals.case_folder()
    run = folder / "run"
    shutil.copytree(kinds["metrics"].originals.run, run)
    config = run / "config.toml"
    config.write_text("".join(line + "\n" for line in config.read_text().splitlines()
                              if not line.startswith("model ")))  # fmt: skip
    result = run_cli("report", run, "--out", folder / "report")
    assert result.code == 2 and "lacks the key 'model'" in result.err, result.err


def test_a_config_value_of_the_wrong_type_names_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("grad_clip = false\n")
    with pytest.raises(ConfigError, match=f"config file {path}: config key 'grad_clip' needs"):
        load_toml(path)
    path.write_bytes(b"epochs = 3 # caf\xe9\n")
    with pytest.raises(ConfigError, match="is not valid TOML \\(byte 16 is not UTF-8\\)"):
        load_toml(path)


# Where each edit goes: the first central directory entry, its general-purpose flags (bit 0:
# "encrypted", which zipfile's testzip raised RuntimeError for), the zip64 end locator's count
# of disks (zipfile.is_zipfile raised BadZipFile for more than one).
ZIP_DAMAGE = {
    "central directory": (b"PK\x01\x02", 0, b"\x00"),
    "encrypted flag": (b"PK\x01\x02", 8, b"\x09"),
    "disk count": (b"PK\x06\x07", 16, b"\x02"),
}


@pytest.mark.parametrize(
    "how, says",
    [
        # miniz's message went on about reporting a bug in PyTorch: its first sentence only
        ("central directory", "invalid header or archive is corrupted); it may be truncated"),
        ("encrypted flag", "is corrupt: its part 'archive/data.pkl'"),
        ("disk count", "is neither a qtrain checkpoint nor a packed model file"),
    ],
)
def test_a_damaged_zip_structure_is_refused_in_one_line(kinds, how, says):
    data = (kinds["checkpoint"].originals.run / "checkpoint.pt").read_bytes()
    marker, offset, value = ZIP_DAMAGE[how]
    case = ("eval", Stack((Overwrite(data.index(marker) + offset, value),)))
    verdict = run_case(kinds["checkpoint"], case)
    assert verdict.outcome == "refused", f"{verdict.outcome}: {verdict.detail}"
    assert says in verdict.detail


def test_a_pickle_of_another_protocol_is_refused_without_torch_warning(tmp_path):
    """torch.load warns about an unusual pickle protocol before it fails: the warning made the
    one line three."""
    path = tmp_path / "checkpoint.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\xbf}q\x00.")  # protocol 191, {}
        archive.writestr("archive/version", b"3\n")
    with warnings.catch_warnings(record=True) as warned:  # pytest would keep them off stderr
        warnings.simplefilter("always")
        result = run_cli("eval", path, "--json")
    assert result.code == 2 and len(result.err.splitlines()) == 1, result.err
    assert [str(w.message) for w in warned] == []
