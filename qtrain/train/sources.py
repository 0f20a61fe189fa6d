"""Trained models named by a path, as `init_from` and `distill_from` name them.

`read_source(path, key)` reads one and returns a `Source`: the model (CPU, eval mode, holding
the weights its run reported), a description of its architecture and the SHA-256 of its
weights. A path may name

    a run folder or checkpoint.pt   `qtrain.train.checkpoint.load_checkpoint`, rebuilt by
                                    `qtrain.train.rebuild.build_model` with the weights the
                                    run reported (its weight average when it kept one)
    a packed file                   `qtrain export --format packed`; read by the reader that
                                    `qtrain.export` registers here (`register_file_reader`:
                                    training sits below export and does not import it)
    a Hugging Face folder           config.json with its weights (`qtrain.models.hf`)

The description (`Source.spec`) is a checkpoint's model record: name, num_classes (the
vocabulary size of a text model; absent for a Hugging Face folder), width, in_channels,
options (a text model's sizes; the hf model's config.json as "hf_config") and, for a
character model, vocab.

Fingerprint: `weights_sha256(state)` hashes, for every entry of a state dict in sorted name
order, the name, dtype, shape and the tensor's bytes. A run records the fingerprints of what
it started from and of its teacher, so that a moved file is recognised by what it holds and
another file under the same name is not taken for it.
"""

from __future__ import annotations

import copy
import hashlib
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qtrain.base.errors import UserError
from qtrain.data.tokens import TokenizerSpec
from qtrain.train.checkpoint import load_checkpoint
from qtrain.train.rebuild import build_model

RUN_FOLDER, CHECKPOINT, PACKED, HF = (
    "run folder", "checkpoint", "packed file", "Hugging Face folder",
)  # fmt: skip
_FILE_READERS: list[tuple[str, Callable[[Path], bool], Callable[[Path], tuple]]] = []


@dataclass
class Source:
    """A trained model read from `path` (module docstring)."""

    path: str  # resolved: where it was read
    given: str  # as the setting named it (messages say this)
    kind: str  # one of RUN_FOLDER, CHECKPOINT, PACKED, HF
    model: nn.Module
    spec: dict
    sha256: str

    def record(self) -> dict:
        """What a run keeps of it: where it was, what kind, which model and its fingerprint."""
        return {"path": self.path, "kind": self.kind, "model": self.spec.get("name"),
                "sha256": self.sha256}  # fmt: skip


def register_file_reader(kind: str, accepts: Callable[[Path], bool], read: Callable) -> None:
    """Let `read_source` read files that `accepts(path)` recognises: `read(path)` returns
    (model in eval mode, record with a "model" description), as `read_packed` does."""
    if kind not in [k for k, _, _ in _FILE_READERS]:
        _FILE_READERS.append((kind, accepts, read))


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the entries of `state` in sorted name order: name, dtype, shape, bytes."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_source(path: str | Path, key: str) -> Source:
    """The model `path` names (module docstring); `key` (init_from, distill_from) is the
    setting that names it, for the one-line refusals of a missing or unknown path."""
    given = Path(path).expanduser()
    if not given.exists():
        raise UserError(f"{key} {path} does not exist; check the path")
    kind, model, spec = _read(given, key)
    model = model.eval()
    sha256 = weights_sha256(model.state_dict())
    return Source(str(given.resolve()), str(path), kind, model, spec, sha256)


def _read(path: Path, key: str) -> tuple[str, nn.Module, dict]:
    if path.is_dir():
        if (path / "checkpoint.pt").is_file():
            return RUN_FOLDER, *_from_checkpoint(path)
        if (path / "config.json").is_file():
            return HF, *_from_hf_folder(path)
    else:
        for kind, accepts, read in _FILE_READERS:
            if accepts(path):
                model, record = read(path)
                return kind, model, dict(record["model"])
        if _is_zip(path):
            return CHECKPOINT, *_from_checkpoint(path)
        if _is_safetensors(path):
            raise UserError(
                f"{key} {path} is a safetensors file, which this process cannot read without "
                "qtrain.export; import qtrain.export first, or name the run folder it was "
                "exported from"
            )
    raise UserError(
        f"{key} {path} is not a qtrain run folder, checkpoint, packed file or Hugging Face "
        "folder (config.json with its weights); name one of those"
    )


def _from_checkpoint(path: Path) -> tuple[nn.Module, dict]:
    record = load_checkpoint(path)
    return build_model(record, "reported"), dict(record["model"])


def _from_hf_folder(path: Path) -> tuple[nn.Module, dict]:
    """The model `hf` of a Hugging Face folder, with its weights; its description has no
    number of classes (which the text it is trained on decides) and, when the folder has a
    tokenizer, that tokenizer's record."""
    from qtrain.models.hf import hf_model_from_folder, read_hf_folder

    folder = read_hf_folder(path)
    model = hf_model_from_folder(path)
    options = {"hf_config": model.config.hf_config, "block_size": model.config.block_size}
    spec = {"name": "hf", "width": 1.0, "in_channels": 1, "options": options}
    if folder.tokenizer is not None:
        spec["tokenizer"] = TokenizerSpec.from_transformers(folder.tokenizer).to_record()
    return model, spec


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except (zipfile.BadZipFile, OSError):
        return False


def _is_safetensors(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            start = f.read(9)
    except OSError:
        return False
    return len(start) == 9 and start[8:9] == b"{"


def tokens_difference(spec: dict, splits) -> tuple[str, str] | None:
    """(what the token ids of the model `spec` describes mean, what the run's text `splits`
    makes them mean), in words, when those differ: other characters, another tokenizer, or
    characters against a tokenizer; None when they agree or the model does not say (a Hugging
    Face folder, an image model)."""
    ours = _tokens_of(getattr(splits, "tokenizer", None), getattr(splits, "vocab", None))
    if "tokenizer" in spec:
        theirs = TokenizerSpec.from_record(spec["tokenizer"])
        if theirs.same_as(getattr(splits, "tokenizer", None)):
            return None
        return theirs.describe(), ours
    if "vocab" not in spec or (splits.tokenizer is None and spec["vocab"] == splits.vocab):
        return None
    return _tokens_of(None, spec["vocab"]), ours


def _tokens_of(tokenizer: TokenizerSpec | None, vocab: str | None) -> str:
    if tokenizer is not None:
        return tokenizer.describe()
    return f"{len(vocab or '')} characters {vocab!r}"


def load_weights(model: nn.Module, source: Source, key: str) -> None:
    """Copy `source`'s weights into `model`, a model of the same architecture (checked by the
    caller); tensors `model` adds to it (the input norms of `act_bits`) keep their values.

    UserError when `source` holds a tensor `model` lacks or one of another shape.
    """
    state = source.model.state_dict()
    try:
        _, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a shape differs: name the first
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), "")
        raise UserError(
            f"the weights of {key} {source.given} do not fit this run's model ({first[:160]}); "
            "name a model of the same architecture"
        ) from None
    if unexpected:
        raise UserError(
            f"{key} {source.given} holds tensors this run's model lacks "
            f"({', '.join(unexpected[:3])}{', …' if len(unexpected) > 3 else ''}); name a model "
            "of the same architecture"
        )


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` on the meta device (shapes and dtypes, no memory; the weights are
    not copied), in eval mode."""
    tensors = {*model.parameters(), *model.buffers()}
    return copy.deepcopy(model, {id(t): _on_meta(t) for t in tensors}).eval()


def _on_meta(t: torch.Tensor) -> torch.Tensor:
    empty = torch.empty_like(t, device="meta")
    return nn.Parameter(empty, requires_grad=False) if isinstance(t, nn.Parameter) else empty


def output_width(model: nn.Module, x: torch.Tensor) -> int:
    """The number of logits `model` gives per example (per token of a text model) for the
    meta input `x`, computed on a `meta_copy` (no arithmetic, no random draw)."""
    with torch.no_grad():
        return int(meta_copy(model)(x).shape[-1])
