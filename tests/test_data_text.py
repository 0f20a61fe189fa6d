"""Character-level text data: tiny Shakespeare and any UTF-8 file (qtrain.data.text)."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest
import torch
from test_data_download import CountingHandler, serve

import qtrain.data as data
from qtrain.data.text import TRAIN_FRACTION, load_text

REPO_ROOT = Path(__file__).resolve().parents[1]
# The real text sits beside the checkout (or beside its parent folder of worktrees).
SHAKESPEARE_DIR = next(
    (
        folder
        for folder in (
            Path(os.environ.get("QTRAIN_SHAKESPEARE_DIR", REPO_ROOT / "absent")),
            REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare",
            REPO_ROOT.parent.parent / "shared" / "data" / "tinyshakespeare",
        )
        if (folder / "input.txt").is_file()
    ),
    REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare",
)


def random_text(n: int, seed: int = 0, alphabet: str = "abcdefgh \n") -> str:
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(alphabet), (n,), generator=generator).tolist()
    return "".join(alphabet[i] for i in picks)


@pytest.fixture
def shakespeare() -> Path:
    """The real tiny Shakespeare folder; skips the test when it is absent."""
    if not (SHAKESPEARE_DIR / "input.txt").is_file():
        pytest.skip(f"tiny Shakespeare not found under {SHAKESPEARE_DIR}")
    return SHAKESPEARE_DIR


def test_real_shakespeare_matches_nanogpts_split_and_vocabulary(shakespeare):
    splits = data.load("shakespeare-char", shakespeare, block_size=64)
    assert len(splits.train) + len(splits.test) == 1_115_394
    assert len(splits.train) == int(1_115_394 * TRAIN_FRACTION) == 1_003_854
    assert splits.num_classes == data.dataset_info("shakespeare-char").num_classes == 65
    assert splits.vocab == "".join(sorted(splits.vocab)) and splits.vocab[0] == "\n"
    text = (shakespeare / "input.txt").read_text(encoding="utf-8")
    decoded = "".join(splits.vocab[i] for i in splits.test[:200].tolist())
    assert decoded == text[1_003_854 : 1_003_854 + 200]


def test_windows_are_next_token_pairs_drawn_by_step(tmp_path):
    text = random_text(3000)
    splits = load_text(text, block_size=16, source="t")
    loader = splits.loader("train", 5, seed=3, steps=4)
    batches = list(loader.epoch(0))
    assert len(batches) == len(loader) == 4
    for x, y in batches:
        assert x.shape == y.shape == (5, 16) and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one token
        for row_x, row_y in zip(x, y, strict=True):  # every window is a run of the text
            window = "".join(splits.vocab[i] for i in [*row_x.tolist(), row_y[-1].item()])
            assert window in text[: len(splits.train)]
    # batch b of epoch e is step e·len + b: a pure function of (seed, step)
    again = list(loader.epoch(1, start_batch=2))
    fresh = list(splits.loader("train", 5, seed=3, steps=2).epoch(3))
    assert torch.equal(again[0][0], fresh[0][0]) and torch.equal(again[1][0], fresh[1][0])
    other = next(iter(splits.loader("train", 5, seed=4, steps=4).epoch(0)))
    assert not torch.equal(other[0], batches[0][0])


def test_validation_windows_are_the_same_for_every_seed_and_epoch():
    splits = load_text(random_text(3000, seed=1), block_size=8, source="t")
    a = [x for x, _ in splits.loader("test", 4, seed=0, batches=3).epoch(0)]
    b = [x for x, _ in splits.loader("test", 4, seed=9, batches=3).epoch(5)]
    assert len(a) == 3 and all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not torch.equal(a[0], a[1])


def test_a_text_file_replaces_the_data_sets_text(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("¡Hola, señor! " * 50, encoding="utf-8")
    splits = data.load("shakespeare-char", tmp_path / "absent", block_size=8, text_file=str(path))
    assert set(splits.vocab) == set("¡Hola, señor! ") and splits.source == str(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        (b"", "is empty"),
        (b"abc\0def" * 20, "NUL bytes, so it is binary"),
        (b"\xff\xfe abc" * 20, "is not UTF-8"),
        (b"0123456789" * 5, "shorter than one window of block_size \\+ 1 = 65"),
    ],
)
def test_an_unusable_text_file_is_one_sentence(tmp_path, content, message):
    path = tmp_path / "t.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError if content is not None else FileNotFoundError, match=message):
        data.load("shakespeare-char", tmp_path, block_size=64, text_file=str(path))


def test_a_data_folder_with_tinyshakespeare_in_it_serves_as_the_folder_itself(tmp_path):
    """One --data-dir for every data set: input.txt in its tinyshakespeare folder is found (no
    download is tried), with the same splits as the folder itself gives; input.txt directly
    in the folder comes first."""
    nested = tmp_path / "data" / "tinyshakespeare"
    nested.mkdir(parents=True)
    (nested / "input.txt").write_text(random_text(2000, seed=7))
    from_parent = data.load("shakespeare-char", tmp_path / "data", block_size=8)
    from_folder = data.load("shakespeare-char", nested, block_size=8)
    assert torch.equal(from_parent.train, from_folder.train) and len(from_parent.train) == 1800
    assert from_parent.sha256 == from_folder.sha256
    (tmp_path / "data" / "input.txt").write_text(random_text(1000, seed=8))
    assert len(data.load("shakespeare-char", tmp_path / "data", block_size=8).train) == 900


def test_download_checks_the_sha256_and_keeps_nothing_bad(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    body = random_text(2000, seed=5).encode()
    (site / "input.txt").write_bytes(body)
    server, base = serve(site)
    try:
        root = tmp_path / "cache"
        with pytest.raises(data.ChecksumError, match="SHA-256"):
            data.load("shakespeare-char", root, download=True, url=f"{base}/input.txt",
                      sha256="0" * 64, block_size=8)  # fmt: skip
        assert not root.exists()  # the folder made for the download went with it
        with pytest.raises(data.DatasetNotFoundError, match="fetch it with download=True"):
            data.load("shakespeare-char", root, block_size=8)
        sha = hashlib.sha256(body).hexdigest()
        splits = data.load("shakespeare-char", root, download=True, url=f"{base}/input.txt",
                           sha256=sha, block_size=8)  # fmt: skip
        assert (root / "input.txt").read_bytes() == body and len(splits.train) == 1800
    finally:
        server.shutdown()
        server.server_close()


def test_processes_that_find_shakespeare_missing_at_once_download_it_once(tmp_path):
    """Three callers started together: one download (they would otherwise write one
    temporary file at once), the same text for all, nothing but the file left."""
    site = tmp_path / "site"
    site.mkdir()
    body = random_text(2000, seed=6).encode()
    (site / "input.txt").write_bytes(body)
    CountingHandler.gets, CountingHandler.truncate = 0, 0
    server, base = serve(site, CountingHandler)
    root, start, texts = tmp_path / "cache", threading.Barrier(3), []

    def call() -> None:
        start.wait()
        texts.append(data.load("shakespeare-char", root, download=True, url=f"{base}/input.txt",
                               sha256=hashlib.sha256(body).hexdigest(), block_size=8))  # fmt: skip

    try:
        threads = [threading.Thread(target=call) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        server.shutdown()
        server.server_close()
    assert CountingHandler.gets == 1 and len(texts) == 3
    assert all(t.sha256 == hashlib.sha256(body).hexdigest() for t in texts)
    assert [p.name for p in root.iterdir()] == ["input.txt"]
