"""Downloading CIFAR end to end against a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from test_data_cifar import write_archive, write_fake_cifar

import qtrain.data as data
from qtrain.data.cifar import CIFAR10


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # keep pytest output clean
        pass


class TruncatingHandler(QuietHandler):
    """Announces the full length but sends only half of the body, then hangs up."""

    def do_GET(self):
        body = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.close_connection = True


def serve(directory: Path, handler=QuietHandler):
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def archive_site(tmp_path):
    """A server publishing a fake cifar-10-python.tar.gz; yields (url, md5)."""
    site = tmp_path / "site"
    site.mkdir()
    archive = write_archive(write_fake_cifar(tmp_path / "build"), site / CIFAR10.archive)
    server, base = serve(site)
    yield f"{base}/{CIFAR10.archive}", hashlib.md5(archive.read_bytes()).hexdigest()
    server.shutdown()
    server.server_close()


def test_download_verifies_and_extracts(tmp_path, archive_site):
    url, md5 = archive_site
    root = tmp_path / "cache"
    splits = data.load("cifar10", root=root, download=True, url=url, md5=md5)
    assert len(splits.train) == 100 and len(splits.test) == 20
    # Only the extracted folder remains: no archive, no temporaries.
    assert [p.name for p in root.iterdir()] == [CIFAR10.folder]
    again = data.load("cifar10", root=root)  # now read from disk, no download
    assert torch.equal(again.train.images, splits.train.images)


def test_url_can_come_from_the_environment(tmp_path, archive_site, monkeypatch):
    url, md5 = archive_site
    monkeypatch.setenv("QTRAIN_CIFAR10_URL", url)
    splits = data.load("cifar10", root=tmp_path / "cache", download=True, md5=md5)
    assert len(splits.test) == 20


def test_md5_mismatch_leaves_nothing_behind(tmp_path, archive_site):
    url, _ = archive_site
    root = tmp_path / "cache"
    with pytest.raises(data.ChecksumError) as info:
        data.load("cifar10", root=root, download=True, url=url)  # the official MD5
    message = str(info.value)
    assert CIFAR10.md5 in message and "deleted" in message
    assert not root.exists()  # nor the folder made for it


def test_unreachable_server_is_a_clear_error(tmp_path):
    with socket.socket() as probe:  # a port that nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = tmp_path / "cache"
    url = f"http://127.0.0.1:{port}/{CIFAR10.archive}"
    with pytest.raises(data.DownloadError, match="could not download .*network connection"):
        data.load("cifar10", root=root, download=True, url=url)
    assert not root.exists()  # nor the folder made for it


def test_a_failed_download_removes_only_the_folders_it_made(tmp_path, archive_site):
    url, _ = archive_site
    kept = tmp_path / "data"  # exists before, empty: stays
    kept.mkdir()
    with pytest.raises(data.ChecksumError):
        data.load("cifar10", root=kept / "cifar" / "v1", download=True, url=url)  # wrong MD5
    assert kept.is_dir() and list(kept.iterdir()) == []
    with pytest.raises(data.ChecksumError):
        data.load("cifar10", root=kept, download=True, url=url)
    assert kept.is_dir() and list(kept.iterdir()) == []


def test_missing_file_on_server_reports_the_http_status(tmp_path, archive_site):
    url, md5 = archive_site
    root = tmp_path / "cache"
    with pytest.raises(data.DownloadError, match="HTTP 404"):
        data.load("cifar10", root=root, download=True, url=url + ".missing", md5=md5)
    assert not root.exists()  # nor the folder made for it


def test_truncated_transfer_is_detected(tmp_path, archive_site):
    url, md5 = archive_site
    site = Path(tmp_path / "site")
    server, base = serve(site, TruncatingHandler)
    root = tmp_path / "cache"
    try:
        with pytest.raises(data.DownloadError, match="ended after .* bytes"):
            data.load("cifar10", root=root, download=True, url=f"{base}/{CIFAR10.archive}", md5=md5)
    finally:
        server.shutdown()
        server.server_close()
    assert not root.exists()  # nor the folder made for it


def test_no_download_without_permission(tmp_path, archive_site):
    url, md5 = archive_site
    with pytest.raises(data.DatasetNotFoundError, match="download=True"):
        data.load("cifar10", root=tmp_path / "cache", url=url, md5=md5)
    assert not (tmp_path / "cache").exists()


class CountingHandler(QuietHandler):
    """Counts the GETs it answers, each after a pause long enough for every caller to start;
    the first `truncate` of them (a class attribute) send half of the body."""

    gets = 0
    truncate = 0
    lock = threading.Lock()

    def do_GET(self):
        with CountingHandler.lock:
            CountingHandler.gets += 1
            cut = CountingHandler.gets <= CountingHandler.truncate
        time.sleep(0.3)
        if cut:
            TruncatingHandler.do_GET(self)
        else:
            super().do_GET()


def load_at_once(callers: int, root: Path, url: str, md5: str) -> list:
    """Load CIFAR-10 with `download=True` from `callers` threads started together; each
    thread's splits or the error it raised."""
    start = threading.Barrier(callers)
    outcomes = [None] * callers

    def call(index: int) -> None:
        start.wait()
        try:
            outcomes[index] = data.load("cifar10", root=root, download=True, url=url, md5=md5)
        except Exception as error:  # collected for the test to look at
            outcomes[index] = error

    threads = [threading.Thread(target=call, args=(i,)) for i in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


@pytest.fixture
def counting_site(tmp_path, archive_site):
    """The archive of `archive_site` served by a `CountingHandler`; yields (url, md5)."""
    _, md5 = archive_site
    CountingHandler.gets, CountingHandler.truncate = 0, 0
    server, base = serve(tmp_path / "site", CountingHandler)
    yield f"{base}/{CIFAR10.archive}", md5
    server.shutdown()
    server.server_close()


def test_processes_that_find_cifar_missing_at_once_download_it_once(tmp_path, counting_site):
    """The workers of `--jobs N` take turns: one downloads, the others read its folder (a
    thread's lock is its own open file, so threads contend for it as processes do)."""
    url, md5 = counting_site
    root = tmp_path / "cache"
    first, *others = load_at_once(3, root, url, md5)
    assert CountingHandler.gets == 1
    for splits in others:
        assert torch.equal(splits.train.images, first.train.images)
    assert [p.name for p in root.iterdir()] == [CIFAR10.folder]  # no lock file, no temporaries


def test_the_next_in_line_downloads_when_the_first_download_fails(tmp_path, counting_site):
    url, md5 = counting_site
    CountingHandler.truncate = 1
    root = tmp_path / "cache"
    outcomes = load_at_once(2, root, url, md5)
    failed = [o for o in outcomes if isinstance(o, Exception)]
    assert len(failed) == 1 and isinstance(failed[0], data.DownloadError)
    assert len(outcomes[0 if failed[0] is outcomes[1] else 1].train) == 100
    assert CountingHandler.gets == 2
    assert [p.name for p in root.iterdir()] == [CIFAR10.folder]
