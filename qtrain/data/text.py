"""Character-level text data: tiny Shakespeare (nanoGPT's `shakespeare_char`) or any UTF-8 file.

The text t (n characters) becomes token ids through its vocabulary V = sorted(set(t)) (one id
per distinct character, in code-point order, as nanoGPT's prepare.py does); the first ⌊0.9 n⌋
ids are the "train" split, the rest the "test" (validation) split.

Batches are windows of T + 1 consecutive ids (T = the model's context, block_size):
x = ids[o : o+T], y = ids[o+1 : o+T+1], so y holds the next token of every position of x.

- train: step s draws B offsets o ~ U{0 … n_train − T − 1} from its own generator, seeded by
  a hash of (the run's "data-order" stream seed, s), so batch s is a pure function of
  (seed, s) and a resumed run sees the same batches. The loader's "epoch" is `steps` long:
  batch b of epoch e is step e·steps + b.
- test: `batches` × B offsets drawn once from a generator seeded by a constant, the same for
  every run and seed, so validation losses of different methods and seeds are measured on
  the same windows (nanoGPT's estimate_loss draws new ones at every evaluation).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qtrain.base.errors import UserError
from qtrain.base.folder_lock import FolderLock
from qtrain.base.streams import stream_seed

from .download import fetch
from .errors import ChecksumError, DataError, DatasetNotFoundError

if TYPE_CHECKING:
    from .tokens import TokenizerSpec

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_FILE = "input.txt"
# the subfolder of a data folder that holds input.txt (as the default data folder does)
SHAKESPEARE_FOLDER = "tinyshakespeare"
TRAIN_FRACTION = 0.9
# Fixed seed of the validation windows: the same windows for every run (see the module doc).
EVAL_SEED = int.from_bytes(hashlib.blake2b(b"qtrain/text-eval", digest_size=8).digest(), "little")


def _step_seed(seed: int, step: int) -> int:
    """The 63-bit seed of training step `step`: BLAKE2b of (data-order stream seed, step)."""
    text = f"{stream_seed(seed, 'data-order')}/{int(step)}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & (2**63 - 1)


def read_text(path: str | Path) -> str:
    """The UTF-8 text of `path`; a missing, empty or binary file is one clear sentence."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetNotFoundError(
            f"text file {path} does not exist; check the path given as text_file or data_dir"
        )
    raw = path.read_bytes()
    if not raw:
        raise DataError(f"text file {path} is empty; name a file that holds text")
    if b"\0" in raw:
        raise DataError(
            f"text file {path} holds NUL bytes, so it is binary, not text; name a UTF-8 text file"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"text file {path} is not UTF-8 (byte {e.start} cannot be decoded); convert it to "
            "UTF-8 or name another file"
        ) from None


def shakespeare_path(root: Path, download: bool, url: str = SHAKESPEARE_URL,
                     sha256: str = SHAKESPEARE_SHA256) -> Path:  # fmt: skip
    """input.txt of tiny Shakespeare: `root` itself (a file), `root`/input.txt,
    `root`/tinyshakespeare/input.txt (one data folder for every data set, as CIFAR's
    cifar-10-batches-py lies in it), else downloaded into `root`.

    A download goes to a temporary file beside the target, is checked against `sha256`, and
    is renamed into place only when it matches (else deleted).
    """
    if root.is_file():
        return root
    target = root / SHAKESPEARE_FILE
    for found in (target, root / SHAKESPEARE_FOLDER / SHAKESPEARE_FILE):
        if found.is_file():
            return found
    if not download:
        raise DatasetNotFoundError(
            f"tiny Shakespeare not found: {target} does not exist; put input.txt there (or in "
            f"its {SHAKESPEARE_FOLDER} folder), pass its folder as {{data_dir}}, or fetch it "
            "with {download}",
            data_dir="data_dir",
            download="download=True",
        )
    # Processes that find the file missing at once (the workers of `--jobs N`) take turns:
    # the first downloads it, the others then find it in place. The lock also makes the
    # folder for the download and removes it again when the download fails.
    with FolderLock(root, wait=True):
        if target.is_file():
            return target
        part = root / f".{SHAKESPEARE_FILE}.part"
        try:
            fetch(url, part)
            got = hashlib.sha256(part.read_bytes()).hexdigest()
            if got != sha256:
                raise ChecksumError(
                    f"the file downloaded from {url} has SHA-256 {got}, not the expected "
                    f"{sha256}, so it was deleted; retry, or fetch the file by hand"
                )
            part.replace(target)
        finally:
            part.unlink(missing_ok=True)
    return target


@dataclass(frozen=True)
class TextSplits:
    """A character-level text as "train" and "test" id tensors plus its vocabulary.

    ``num_classes`` = |V| (the model's output width), ``in_channels`` 1 (a stream of ids);
    ``block_size`` T is the window length the loaders cut; ``sha256`` identifies the text.
    A text read through a tokenizer (`qtrain.data.tokens`) has ``tokenizer`` set, an empty
    ``vocab``, and ``num_classes`` the tokenizer's number of ids.
    """

    train: torch.Tensor  # int64 [n_train]
    test: torch.Tensor  # int64 [n − n_train]
    vocab: str  # the characters, id i ↔ vocab[i]
    block_size: int
    source: str
    sha256: str
    name: str = "text"
    in_channels: int = 1
    image_size: int | None = None
    tokenizer: TokenizerSpec | None = None

    @property
    def num_classes(self) -> int:
        return len(self.vocab) if self.tokenizer is None else self.tokenizer.vocab_size

    def token_record(self) -> dict:
        """What a checkpoint's model record stores to map ids back to text: {"vocab": the
        characters}, or {"tokenizer": the tokenizer's record (`TokenizerSpec.to_record`)}."""
        if self.tokenizer is None:
            return {"vocab": self.vocab}
        return {"tokenizer": self.tokenizer.to_record()}

    def loader(self, split: str, batch_size: int, *, seed: int = 0, device="cpu",
               steps: int = 1, batches: int = 1, **_image_options) -> TextLoader:  # fmt: skip
        """A `TextLoader` of `split`: "train" (`steps` random batches per epoch, drawn by step
        from `seed`) or "test" (`batches` fixed batches). Image options (augment, layout,
        ranks) do not apply to text and are ignored."""
        if split not in ("train", "test"):
            raise UserError(f"unknown split {split!r}; choose train or test")
        ids = self.train if split == "train" else self.test
        return TextLoader(ids, batch_size, self.block_size, torch.device(device),
                          seed=seed, length=steps if split == "train" else batches,
                          fixed=split == "test")  # fmt: skip


class TextLoader:
    """Batches (x, y) of B windows [B, T] int64; see the module doc for how offsets are drawn."""

    def __init__(self, ids: torch.Tensor, batch_size: int, block_size: int, device,
                 *, seed: int, length: int, fixed: bool) -> None:  # fmt: skip
        # the whole split lives on the device, stored once (as the image loaders keep theirs),
        # so a batch is a gather there and no host-to-device copy of windows
        self.ids, self.batch_size, self.block_size = ids.to(device), batch_size, block_size
        self.device, self.seed, self.length, self.fixed = device, seed, length, fixed
        self._fixed_offsets = None
        if fixed:
            generator = torch.Generator().manual_seed(EVAL_SEED)
            self._fixed_offsets = self._offsets(generator, length * batch_size)

    def __len__(self) -> int:
        return self.length

    def _offsets(self, generator: torch.Generator, count: int) -> torch.Tensor:
        return torch.randint(len(self.ids) - self.block_size, (count,), generator=generator)

    def batch(self, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x = ids[o : o+T], y = ids[o+1 : o+T+1] for every offset o → two [B, T] tensors."""
        positions = torch.arange(self.block_size + 1, device=self.device)
        span = offsets.to(self.device)[:, None] + positions  # [B, T+1]
        windows = self.ids[span]
        return windows[:, :-1], windows[:, 1:]

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """Batches start_batch … len−1 of `epoch` (the test loader's are the same every epoch)."""
        for b in range(start_batch, self.length):
            if self.fixed:
                offsets = self._fixed_offsets[b * self.batch_size : (b + 1) * self.batch_size]
            else:
                step = epoch * self.length + b
                generator = torch.Generator().manual_seed(_step_seed(self.seed, step))
                offsets = self._offsets(generator, self.batch_size)
            yield self.batch(offsets)


def encode(vocab: str, text: str, what: str = "the text") -> torch.Tensor:
    """int64 ids of `text` (id i ↔ vocab[i]); a character outside `vocab` is one sentence."""
    index = {ch: i for i, ch in enumerate(vocab)}
    unknown = "".join(sorted({ch for ch in text if ch not in index}))
    if unknown:
        raise UserError(
            f"{what} has characters the model never saw ({unknown!r}); use only characters "
            f"of its vocabulary {vocab!r}"
        )
    return torch.tensor([index[ch] for ch in text], dtype=torch.int64)


def load_text(text: str, *, block_size: int, source: str, name: str = "text") -> TextSplits:
    """Split `text` 90/10 into `TextSplits` with windows of `block_size` + 1 tokens.

    Each split must hold at least block_size + 1 characters, else one sentence says so.
    """
    vocab = "".join(sorted(set(text)))
    ids = encode(vocab, text)
    cut = int(len(ids) * TRAIN_FRACTION)
    for label, part in (("training", ids[:cut]), ("validation", ids[cut:])):
        if len(part) < block_size + 1:
            raise DataError(
                f"the {label} part of {source} ({len(part):,} characters of {len(ids):,}) is "
                f"shorter than one window of block_size + 1 = {block_size + 1} characters; use "
                "a longer text or a smaller block_size"
            )
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return TextSplits(ids[:cut], ids[cut:], vocab, block_size, source, digest, name)


def load_shakespeare(root: Path, download: bool = False, *, block_size: int = 64,
                     text_file: str | None = None, tokenizer: TokenizerSpec | None = None,
                     max_vocab: int | None = None, url: str = SHAKESPEARE_URL,
                     sha256: str = SHAKESPEARE_SHA256) -> TextSplits:  # fmt: skip
    """Tiny Shakespeare from `root` (a folder with input.txt, or the file), else downloaded;
    or, with `text_file`, that UTF-8 file instead. By character, or through `tokenizer`
    (`qtrain.data.tokens`); with `max_vocab` every id must be below it (a model's vocab_size)."""
    from .tokens import check_vocab_limit, load_tokens

    path = (
        Path(text_file).expanduser() if text_file else shakespeare_path(root, download, url, sha256)
    )
    options = dict(block_size=block_size, source=str(path), name="shakespeare-char")
    text = read_text(path)
    if tokenizer is None:
        splits = load_text(text, **options)
    else:
        splits = load_tokens(text, tokenizer, **options)
    if max_vocab is not None:
        check_vocab_limit(splits, max_vocab)
    return splits
