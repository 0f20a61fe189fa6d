"""Hypothesis strategies that damage files, for the fuzz tests and benchmarks/fuzz_inputs.py.

Byte level (any file): `byte_mutations(data)` draws one to three edits of `data`, each a
flip of 1-8 bits, an overwrite with a boundary value (0x00, 0xff, 0x7f, 0x80, little-endian
0, -1, 2**31 - 1, 2**63 - 1), a truncation (keep a prefix, or drop one), an insertion of
random bytes, a deletion of a span, or a splice (a span of the file copied over another place).
Positions are drawn anywhere, or near the `hot` offsets a caller names (a zip archive's
headers, a safetensors file's JSON header), where a few bytes decide how the rest is read.

Structured (JSON documents, flat TOML tables): `json_mutations(obj)` and
`toml_mutations(table)` change one value (to a boundary number, NaN, ±inf, a huge integer,
another type, a string near the old one), delete a key or element, add an unknown key, or
rename a key; the result is written back with `dump_toml` (or `json.dumps`), so it stays
syntactically valid and only its meaning changes.

Every mutation is a small frozen value with a readable repr, so hypothesis prints a failing
case as something a person can replay by hand: `Mutation.apply(data)` gives the new bytes.
"""

from __future__ import annotations

import copy
import math
import struct
from dataclasses import dataclass

from hypothesis import strategies as st

# ---------------------------------------------------------------------------------------------
# byte level

BOUNDARY_BYTES = (
    b"\x00",
    b"\xff",
    b"\x7f",
    b"\x80",
    struct.pack("<I", 0),
    struct.pack("<i", -1),
    struct.pack("<I", 2**31 - 1),
    struct.pack("<Q", 2**63 - 1),
    struct.pack("<Q", 2**64 - 1),
)


@dataclass(frozen=True)
class Flip:
    """XOR `mask` into the byte at `at`."""

    at: int
    mask: int

    def apply(self, data: bytes) -> bytes:
        if not data:
            return data
        at = self.at % len(data)
        return data[:at] + bytes([data[at] ^ self.mask]) + data[at + 1 :]


@dataclass(frozen=True)
class Overwrite:
    """Write `value` over the bytes from `at` (the file keeps its length)."""

    at: int
    value: bytes

    def apply(self, data: bytes) -> bytes:
        if not data:
            return data
        at = self.at % len(data)
        value = self.value[: len(data) - at]
        return data[:at] + value + data[at + len(value) :]


@dataclass(frozen=True)
class Truncate:
    """Keep the first `at` bytes (`head`), or drop them (not `head`)."""

    at: int
    head: bool = True

    def apply(self, data: bytes) -> bytes:
        at = self.at % (len(data) + 1)
        return data[:at] if self.head else data[at:]


@dataclass(frozen=True)
class Insert:
    """Insert `value` before the byte at `at`."""

    at: int
    value: bytes

    def apply(self, data: bytes) -> bytes:
        at = self.at % (len(data) + 1)
        return data[:at] + self.value + data[at:]


@dataclass(frozen=True)
class Delete:
    """Delete `length` bytes from `at`."""

    at: int
    length: int

    def apply(self, data: bytes) -> bytes:
        if not data:
            return data
        at = self.at % len(data)
        return data[:at] + data[at + self.length :]


@dataclass(frozen=True)
class Splice:
    """Copy `length` bytes from `source` over the bytes at `at`."""

    source: int
    at: int
    length: int

    def apply(self, data: bytes) -> bytes:
        if not data:
            return data
        source, at = self.source % len(data), self.at % len(data)
        chunk = data[source : source + self.length][: len(data) - at]
        return data[:at] + chunk + data[at + len(chunk) :]


@dataclass(frozen=True)
class Stack:
    """Several byte mutations applied in order."""

    steps: tuple

    def apply(self, data: bytes) -> bytes:
        for step in self.steps:
            data = step.apply(data)
        return data


def positions(size: int, hot: tuple[int, ...] = ()) -> st.SearchStrategy[int]:
    """Offsets into a file of `size` bytes: anywhere, or within 64 bytes of a `hot` offset."""
    anywhere = st.integers(0, max(size - 1, 0))
    if not hot:
        return anywhere
    near = st.sampled_from(sorted(hot)).flatmap(
        lambda h: st.integers(max(h - 64, 0), max(min(h + 64, size - 1), 0))
    )
    return st.one_of(anywhere, near)


def one_byte_mutation(size: int, hot: tuple[int, ...] = ()) -> st.SearchStrategy:
    """One edit of a file of `size` bytes (see the module docstring)."""
    at = positions(size, hot)
    span = st.integers(1, max(min(size, 256), 1))
    return st.one_of(
        st.builds(Flip, at, st.integers(1, 255)),
        st.builds(Overwrite, at, st.sampled_from(BOUNDARY_BYTES)),
        st.builds(Truncate, at, st.booleans()),
        st.builds(Insert, at, st.binary(min_size=1, max_size=16)),
        st.builds(Delete, at, span),
        st.builds(Splice, positions(size, hot), at, span),
    )


def byte_mutations(data: bytes, hot: tuple[int, ...] = ()) -> st.SearchStrategy:
    """One to three edits of `data` (`Stack`); each keeps its positions inside the file."""
    return st.lists(one_byte_mutation(len(data), hot), min_size=1, max_size=3).map(
        lambda steps: Stack(tuple(steps))
    )


def hot_offsets(data: bytes, markers: tuple[bytes, ...]) -> tuple[int, ...]:
    """Offsets of every occurrence of each marker in `data` (zip signatures, say)."""
    found = []
    for marker in markers:
        start = data.find(marker)
        while start >= 0:
            found.append(start)
            start = data.find(marker, start + 1)
    return tuple(sorted(found))


ZIP_MARKERS = (b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07")

# ---------------------------------------------------------------------------------------------
# structured values


def _no_surrogates(text: str) -> bool:
    return all(not 0xD800 <= ord(c) <= 0xDFFF for c in text)


TEXTS = st.text(max_size=12).filter(_no_surrogates)
BOUNDARY_NUMBERS = (0, 1, -1, 2, 0.5, -0.0, 1e-300, 1e300, 2**31, 2**63 - 1, 2**64, 10**30)
SPECIAL_FLOATS = (math.nan, math.inf, -math.inf)


def scalars(toml: bool = False) -> st.SearchStrategy:
    """A value to put where another was: numbers at their edges, text, a boolean (and, outside
    TOML, null)."""
    options = [
        st.sampled_from(BOUNDARY_NUMBERS),
        st.sampled_from(SPECIAL_FLOATS),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False),
        st.booleans(),
        TEXTS,
    ]
    if not toml:
        options.append(st.none())
    return st.one_of(*options)


def _near(value) -> st.SearchStrategy:
    """Values close to `value`: one off, scaled, negated, a string next to it, its text."""
    if isinstance(value, bool):
        return st.sampled_from([not value, int(value), str(value).lower()])
    if isinstance(value, (int, float)):
        return st.sampled_from(
            [value + 1, value - 1, -value, value * 10, value / 10, str(value), float(value)]
        )
    if isinstance(value, str):
        edits = [value + "x", value[:-1], value.upper(), value[::-1], "", value + " "]
        return st.sampled_from(edits)
    return scalars()


def _paths(obj, prefix=()):
    """Every path (tuple of keys/indices) into nested dicts and lists, the root excluded."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield (*prefix, i)
            yield from _paths(value, (*prefix, i))


def _get(obj, path):
    for key in path:
        obj = obj[key]
    return obj


@dataclass(frozen=True)
class SetValue:
    """Set the value at `path` to `value`."""

    path: tuple
    value: object

    def apply(self, obj):
        obj = copy.deepcopy(obj)
        parent = _get(obj, self.path[:-1])
        parent[self.path[-1]] = self.value
        return obj


@dataclass(frozen=True)
class DeleteEntry:
    """Delete the key or list element at `path`."""

    path: tuple

    def apply(self, obj):
        obj = copy.deepcopy(obj)
        del _get(obj, self.path[:-1])[self.path[-1]]
        return obj


@dataclass(frozen=True)
class RenameKey:
    """Rename the dict key at `path` to `new` (its value stays)."""

    path: tuple
    new: str

    def apply(self, obj):
        obj = copy.deepcopy(obj)
        parent = _get(obj, self.path[:-1])
        parent[self.new] = parent.pop(self.path[-1])
        return obj


@dataclass(frozen=True)
class AddKey:
    """Add `key` = `value` to the dict at `path` (() for the root)."""

    path: tuple
    key: str
    value: object

    def apply(self, obj):
        obj = copy.deepcopy(obj)
        _get(obj, self.path)[self.key] = self.value
        return obj


def _value_changes(obj, path, toml: bool, like) -> st.SearchStrategy:
    old = _get(obj, path)
    wrapped = st.sampled_from([[old], {"value": old}]) if not toml else st.just([old])
    values = [scalars(toml), _near(old), wrapped] + ([like(old)] if like else [])
    return st.builds(SetValue, st.just(path), st.one_of(*values))


def structure_mutations(obj, toml: bool = False, like=None) -> st.SearchStrategy:
    """One structural edit of `obj` (nested dicts and lists; see the module doc). `like(old)`,
    when given, draws further values to put in place of `old` (tensors of another shape)."""
    paths = list(_paths(obj))
    dict_paths = [()] + [p for p in paths if isinstance(_get(obj, p), dict)]
    key_paths = [p for p in paths if isinstance(_get(obj, p[:-1]), dict)]
    options = [
        st.sampled_from(paths).flatmap(lambda p: _value_changes(obj, p, toml, like)),
        st.builds(DeleteEntry, st.sampled_from(paths)),
        st.builds(AddKey, st.sampled_from(dict_paths), TEXTS, scalars(toml)),
    ]
    if key_paths:
        options.append(st.builds(RenameKey, st.sampled_from(key_paths), TEXTS))
    return st.one_of(*options)


def json_mutations(obj, like=None) -> st.SearchStrategy:
    """One or two structural edits of a JSON document (`Stack` of them; apply gives the object)."""
    return st.lists(structure_mutations(obj, like=like), min_size=1, max_size=2).map(
        lambda steps: StructuredStack(tuple(steps))
    )


def toml_mutations(table: dict) -> st.SearchStrategy:
    """One or two edits of a flat TOML table whose results stay writable as TOML."""
    return st.lists(structure_mutations(table, toml=True), min_size=1, max_size=2).map(
        lambda steps: StructuredStack(tuple(steps))
    )


@dataclass(frozen=True)
class StructuredStack:
    """Structural edits applied in order; a later edit whose path is gone is skipped."""

    steps: tuple

    def apply(self, obj):
        for step in self.steps:
            try:
                obj = step.apply(obj)
            except (KeyError, IndexError, TypeError, AttributeError):
                continue
        return obj


# ---------------------------------------------------------------------------------------------
# writing TOML


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(value) -> str:
    """`value` as TOML text (bool, int, float with nan/inf, string, array, inline table)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{_toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
        )
    raise TypeError(f"no TOML form for {value!r}")


def dump_toml(table: dict) -> str:
    """A flat table as TOML text, one `"key" = value` line each (keys quoted, so any works)."""
    return "".join(f"{_toml_string(key)} = {toml_value(value)}\n" for key, value in table.items())
