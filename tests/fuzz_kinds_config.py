"""Fuzzed config files, presets and metrics.jsonl (the kinds are described in
fuzz_kinds.py)."""

from __future__ import annotations

import json
import shutil
from dataclasses import fields
from functools import cached_property
from pathlib import Path

import fuzz_mutations as fm
from fuzz_harness import Verdict, call_reader, call_verdict, cli_verdict, run_cli, same_value
from fuzz_originals import Originals, read_jsonl
from hypothesis import strategies as st

# -- config.toml and presets -------------------------------------------------------------------


def config_defaults() -> dict:
    from qtrain.train.config import RunConfig

    return {f.name: f.default for f in fields(RunConfig)}


def toml_cases(text: str):
    import tomllib

    table = tomllib.loads(text)
    data = text.encode()
    return st.one_of(
        st.tuples(st.just("toml"), fm.toml_mutations(table)),
        st.tuples(st.just("bytes"), fm.byte_mutations(data)),
    )


def mutate_toml(text: str, case) -> bytes:
    import tomllib

    how, mutation = case
    if how == "bytes":
        return mutation.apply(text.encode())
    return fm.dump_toml(mutation.apply(tomllib.loads(text))).encode()


def parse_toml(data: bytes) -> dict | None:
    """The table of a TOML file, None when it is not valid UTF-8 TOML or holds a table."""
    import tomllib

    try:
        table = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    return table


def read_back(table: dict, saved: dict, overrides: dict) -> str | None:
    """None when `saved` holds exactly `table`'s values (`overrides` win, defaults fill in),
    else the first difference."""
    defaults = config_defaults()
    unknown = sorted(set(table) - set(defaults))
    if unknown:
        return f"unknown key {unknown[0]!r} was accepted"
    for key, default in defaults.items():
        expected = overrides.get(key, table.get(key, default))
        got = saved.get(key)
        if expected is None and got is None:
            continue
        if key == "amp" and expected == "auto" and got in ("bf16", "off"):
            continue  # "auto" is resolved for the machine when a run is created
        if not same_value(got, expected):
            return f"{key} = {got!r} after reading {expected!r}"
    return None


class ConfigKind:
    name = "config"
    OVERRIDES = ("--no-download", "--no-compile", "--set", "max_steps=2", "--set", "threads=1")

    def __init__(self, originals: Originals) -> None:
        self.originals = originals

    @cached_property
    def text(self) -> str:
        return (self.originals.run / "config.toml").read_text()

    def cases(self):
        return toml_cases(self.text)

    def check(self, case, folder: Path) -> Verdict:
        import tomllib

        path = folder / "config.toml"
        data = mutate_toml(self.text, case)
        path.write_bytes(data)
        empty = folder / "data"
        result = run_cli("train", "--config", path, "--out", folder / "run", "--data-dir", empty,
                         *self.OVERRIDES)  # fmt: skip
        overrides = {"download": False, "compile": False, "max_steps": 2, "threads": 1,
                     "data_dir": str(empty)}  # fmt: skip

        def accepted(_result) -> Verdict:
            table = parse_toml(data)
            if table is None:
                return Verdict("silent", "a file that is not TOML was accepted")
            saved = tomllib.loads((folder / "run" / "config.toml").read_text())
            problem = read_back(table, saved, overrides)
            if problem:
                return Verdict("silent", problem)
            return Verdict("same" if table == tomllib.loads(self.text) else "read")

        return cli_verdict(result, accepted)


class PresetKind:
    name = "presets"

    def __init__(self, originals: Originals) -> None:
        self.originals = originals

    @cached_property
    def texts(self) -> dict[str, str]:
        from qtrain.train.config import PRESET_DIR

        return {p.stem: p.read_text() for p in sorted(PRESET_DIR.glob("*.toml"))}

    def cases(self):
        return st.sampled_from(sorted(self.texts)).flatmap(
            lambda name: st.tuples(st.just(name), toml_cases(self.texts[name]))
        )

    def check(self, case, folder: Path) -> Verdict:
        from qtrain.train.config import from_dict, load_toml

        name, mutation = case
        data = mutate_toml(self.texts[name], mutation)
        path = folder / f"{name}.toml"
        path.write_bytes(data)

        def accepted(config) -> Verdict:
            table = parse_toml(data)
            if table is None:
                return Verdict("silent", "a file that is not TOML was accepted")
            problem = read_back(table, config.to_dict(), {})
            if problem:
                return Verdict("silent", problem)
            return Verdict("same" if table == parse_toml(self.texts[name].encode()) else "read")

        return call_verdict(call_reader(lambda: from_dict(load_toml(path))), accepted)


# -- metrics.jsonl (qtrain report) -------------------------------------------------------------


def _number(value, none: bool = False) -> bool:
    if value is None:
        return none
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


def report_rows(data: bytes) -> dict | None:
    """What `qtrain report` must show for a metrics.jsonl (epochs, errors, seconds), parsed
    independently of qtrain; None when the file is not well formed (see the module doc)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    records = []
    for line in text.split("\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            return None
        if not (
            isinstance(record, dict)
            and isinstance(record.get("epoch"), int)
            and not isinstance(record.get("epoch"), bool)
            and _number(record.get("train_error"))
            and "test_error" in record
            and _number(record["test_error"], none=True)
            and _number(record.get("seconds"))
        ):
            return None
        records.append(record)
    if not records or records[-1]["test_error"] is None:
        return None
    last = records[-1]
    return {
        "epochs": last["epoch"],
        "test_error": last["test_error"],
        "train_error": last["train_error"],
        "seconds": sum(r["seconds"] for r in records),
    }


class MetricsKind:
    name = "metrics"

    def __init__(self, originals: Originals) -> None:
        self.originals = originals

    @cached_property
    def records(self) -> list[dict]:
        return read_jsonl(self.originals.run / "metrics.jsonl")

    def cases(self):
        data = (self.originals.run / "metrics.jsonl").read_bytes()
        record = st.integers(0, len(self.records) - 1).flatmap(
            lambda i: st.tuples(st.just("record"), st.just(i), fm.json_mutations(self.records[i]))
        )
        return st.one_of(record, st.tuples(st.just("bytes"), st.just(0), fm.byte_mutations(data)))

    def mutate(self, case) -> bytes:
        how, index, mutation = case
        if how == "bytes":
            return mutation.apply((self.originals.run / "metrics.jsonl").read_bytes())
        records = list(self.records)
        records[index] = mutation.apply(records[index])
        return "".join(json.dumps(r) + "\n" for r in records).encode()

    def check(self, case, folder: Path) -> Verdict:
        run = folder / "run"
        run.mkdir()
        shutil.copy(self.originals.run / "config.toml", run / "config.toml")
        data = self.mutate(case)
        (run / "metrics.jsonl").write_bytes(data)
        expected = report_rows(data)
        original = report_rows((self.originals.run / "metrics.jsonl").read_bytes())
        result = run_cli("report", run, "--out", folder / "report")

        def accepted(_result) -> Verdict:
            if expected is None:
                return Verdict("silent", "a damaged metrics.jsonl was reported")
            table = json.loads((folder / "report" / "table.json").read_text())
            got = {k: table["runs"][0][k] for k in expected}
            if not same_value(got, expected):
                return Verdict("silent", f"reported {got}, the file says {expected}")
            return Verdict("same" if same_value(expected, original) else "read")

        verdict = cli_verdict(result, accepted)
        if verdict.outcome == "refused" and expected is not None:
            return Verdict("wrongly refused", f"{verdict.detail} (the file says {expected})")
        return verdict
