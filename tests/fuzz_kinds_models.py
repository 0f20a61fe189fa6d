"""Fuzzed packed files and checkpoints: damaged bytes, and edits made valid again
(the kinds are described in fuzz_kinds.py)."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from functools import cached_property
from pathlib import Path

import fuzz_mutations as fm
import torch
from fuzz_harness import Verdict, cli_verdict, run_cli, same_value
from fuzz_originals import TRAIN, Originals, read_jsonl, without_timings
from hypothesis import strategies as st

# -- packed files ------------------------------------------------------------------------------


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    """(the JSON header with __metadata__["qtrain"] parsed, the tensor bytes) of a file."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"]["qtrain"] = json.loads(header["__metadata__"]["qtrain"])
    return header, data[8 + length :]


def join_safetensors(header: dict, body: bytes, resign: bool = False) -> bytes:
    """The file of `header` (qtrain header re-serialised; its CRC-32 recomputed if `resign`)."""
    header = json.loads(json.dumps(header))
    metadata = header.get("__metadata__")
    if isinstance(metadata, dict) and not isinstance(metadata.get("qtrain"), str):
        metadata["qtrain"] = json.dumps(metadata.get("qtrain"))
        if resign:
            metadata["qtrain_crc32"] = str(zlib_crc32(metadata["qtrain"].encode()))
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def zlib_crc32(data: bytes) -> int:

    return zlib.crc32(data)


class PackedKind:
    name = "packed"

    def __init__(self, originals: Originals) -> None:
        self.originals = originals

    def cases(self):
        data = self.originals.packed.read_bytes()
        header, _ = split_safetensors(data)
        (length,) = struct.unpack("<Q", data[:8])
        hot = (0, 8, 8 + length // 2, 8 + length)
        return st.one_of(
            st.tuples(st.just("bytes"), fm.byte_mutations(data, hot)),
            st.tuples(st.just("header"), fm.json_mutations(header)),
        )

    def mutate(self, case) -> bytes:
        data = self.originals.packed.read_bytes()
        how, mutation = case
        if how == "bytes":
            return mutation.apply(data)
        header, body = split_safetensors(data)
        return join_safetensors(mutation.apply(header), body)

    def check(self, case, folder: Path) -> Verdict:
        path = folder / "model.safetensors"
        path.write_bytes(self.mutate(case))
        expected = self.originals.packed_eval
        return cli_verdict(run_cli("eval", path, "--json"), lambda r: same_json(r, expected))


def same_json(result, expected: dict) -> Verdict:
    got = json.loads(result.out)
    if same_value(got, expected):
        return Verdict("same")
    return Verdict("silent", f"accepted with {got}, the original gives {expected}")


# -- checkpoints -------------------------------------------------------------------------------


class CheckpointKind:
    name = "checkpoint"

    def __init__(self, originals: Originals) -> None:
        self.originals = originals

    def cases(self):
        data = (self.originals.run / "checkpoint.pt").read_bytes()
        hot = fm.hot_offsets(data, fm.ZIP_MARKERS)
        return st.tuples(st.sampled_from(["eval", "resume"]), fm.byte_mutations(data, hot))

    def check(self, case, folder: Path) -> Verdict:
        via, mutation = case
        run = folder / "run"
        shutil.copytree(self.originals.run, run)
        checkpoint = run / "checkpoint.pt"
        checkpoint.write_bytes(mutation.apply(checkpoint.read_bytes()))
        if via == "eval":
            expected = self.originals.checkpoint_eval
            return cli_verdict(run_cli("eval", checkpoint, "--json"),
                               lambda r: same_json(r, expected))  # fmt: skip
        expected_metrics = self.originals.resumed_metrics
        result = run_cli("train", *TRAIN, "--epochs", "3", "--out", run, "--resume")

        def accepted(_result) -> Verdict:
            got = without_timings(read_jsonl(run / "metrics.jsonl"))
            if same_value(got, expected_metrics):
                return Verdict("same")
            return Verdict(
                "silent", f"resumed to {got}, the original resumes to {expected_metrics}"
            )

        return cli_verdict(result, accepted)


# -- files edited with their checksums made valid again --------------------------------------


def accepted_edit(result, expected: dict) -> Verdict:
    """An edit whose checksums are valid is another file, not a damaged one: accepted, its
    result may differ from the original's (what must not happen is a traceback or a hang)."""
    return Verdict("same" if same_value(json.loads(result.out), expected) else "read")


class PackedEditKind:
    name = "packed-resigned"

    def __init__(self, originals: Originals) -> None:
        self.originals = originals

    def cases(self):
        header, _ = split_safetensors(self.originals.packed.read_bytes())
        return fm.json_mutations(header["__metadata__"]["qtrain"])

    def check(self, case, folder: Path) -> Verdict:
        header, body = split_safetensors(self.originals.packed.read_bytes())
        header["__metadata__"]["qtrain"] = case.apply(header["__metadata__"]["qtrain"])
        path = folder / "model.safetensors"
        path.write_bytes(join_safetensors(header, body, resign=True))
        expected = self.originals.packed_eval
        return cli_verdict(run_cli("eval", path, "--json"), lambda r: accepted_edit(r, expected))


def tensor_variants(old) -> st.SearchStrategy:
    """Tensors to put where `old` was: another dtype or shape, empty, NaN."""
    if not isinstance(old, torch.Tensor):
        return st.sampled_from([torch.zeros(2), torch.tensor(7)])
    flat = old.reshape(-1)
    variants = [old.double(), flat, flat[:0], flat[:1], old.long(), torch.zeros(3)]
    if old.is_floating_point():
        variants.append(torch.full_like(old, float("nan")))
    return st.sampled_from(variants)


class CheckpointEditKind:
    """Entries of a checkpoint edited and the file saved again (valid CRC-32s), evaluated.
    (Resuming from an edited training state is not covered: the optimizer's and schedule's
    state is restored by torch, whose errors name no file.)"""

    name = "checkpoint-resaved"

    def __init__(self, originals: Originals) -> None:
        self.originals = originals

    @cached_property
    def record(self) -> dict:
        return torch.load(self.originals.run / "checkpoint.pt", weights_only=True)

    def cases(self):
        return fm.json_mutations(self.record, like=tensor_variants)

    def check(self, case, folder: Path) -> Verdict:
        checkpoint = folder / "checkpoint.pt"
        torch.save(case.apply(self.record), checkpoint)
        expected = self.originals.checkpoint_eval
        return cli_verdict(run_cli("eval", checkpoint, "--json"),
                           lambda r: accepted_edit(r, expected))  # fmt: skip
