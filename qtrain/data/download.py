"""Fetch an archive over HTTP(S), verify its MD5 and extract it atomically and safely.

Every step writes only temporaries inside ``root`` (``.<archive>.*.part`` and
``.<folder>.extract-*``); the final folder appears by one ``os.rename``, so a reader never
sees a half-extracted data set, and on any failure the temporaries are removed. A write the
machine refuses (a full disk: `qtrain.base.io.MACHINE_ERRNOS`) raises a `WriteError` naming the
file or folder being written, not a download error.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path, PurePosixPath

from qtrain.base.folder_lock import missing_folders, remove_empty_folders
from qtrain.base.io import MACHINE_ERRNOS, WriteError, write_error

from .errors import ChecksumError, CorruptDataError, DownloadError

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20


def fetch(url: str, destination: Path, timeout: float = 60.0) -> str:
    """Stream ``url`` into ``destination``; return the hex MD5 of the bytes received."""
    digest = hashlib.md5()
    fix = f"check the network connection, or download {url} by hand into {destination.parent}"
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "qtrain"})
        with (
            urllib.request.urlopen(request, timeout=timeout) as response,
            open(destination, "wb") as out,
        ):
            expected = response.headers.get("Content-Length")
            received = 0
            while chunk := response.read(CHUNK_BYTES):
                try:
                    out.write(chunk)
                    out.flush()  # so that closing the file has nothing left to fail on
                except OSError as error:
                    raise write_error(error, destination) from error
                digest.update(chunk)
                received += len(chunk)
    except WriteError:
        raise
    except urllib.error.HTTPError as error:
        raise DownloadError(f"{url} answered HTTP {error.code} ({error.reason}); {fix}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
        reason = getattr(error, "reason", error)
        raise DownloadError(f"could not download {url} ({reason}); {fix}") from None
    if expected is not None and received != int(expected):
        raise DownloadError(f"{url} ended after {received} of {expected} bytes; {fix}")
    return digest.hexdigest()


def _safe_members(archive: tarfile.TarFile, folder: str, path: Path) -> list[tarfile.TarInfo]:
    """Members of ``archive``, all regular files or folders strictly inside ``folder``."""
    members = archive.getmembers()
    for member in members:
        parts = PurePosixPath(member.name).parts
        inside = bool(parts) and parts[0] == folder and ".." not in parts
        if (
            member.name.startswith(("/", "\\"))
            or not inside
            or not (member.isfile() or member.isdir())
        ):
            raise CorruptDataError(
                f"{path} contains {member.name!r}, which is not a plain file inside {folder}/; "
                "the archive is not the official one, delete it and download it again"
            )
    return members


def extract_archive(archive: Path, root: Path, folder: str) -> Path:
    """Extract the ``folder`` tree of the .tar.gz ``archive`` into ``root/folder`` atomically.

    Members with absolute paths, ``..``, links or devices are refused before anything is
    written; extraction goes to a temporary folder in ``root`` that is then renamed.
    """
    target = root / folder
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder}.extract-", dir=root))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = _safe_members(tar, folder, archive)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(temporary, members=members, filter="data")
            else:  # Python < 3.10.12 has no filters; members were checked above
                tar.extractall(temporary, members=members)
        if not (temporary / folder).is_dir():
            raise CorruptDataError(
                f"{archive} holds no {folder}/ folder; delete it and download the official "
                "archive again"
            )
        try:
            os.rename(temporary / folder, target)
        except OSError:
            # Another process finished the same extraction first: keep its folder.
            if not target.is_dir():
                raise
    except OSError as error:
        if error.errno in MACHINE_ERRNOS:
            raise write_error(error, target) from error
        raise
    except (tarfile.TarError, EOFError, zlib.error) as error:
        raise CorruptDataError(
            f"{archive} is truncated or corrupt ({error}); delete it and download it again"
        ) from None
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    log.info("extracted %s to %s", archive, target)
    return target


@contextlib.contextmanager
def download_folder(root: Path):
    """Make ``root`` (and its missing parents) for a download; when the block fails, remove
    the folders made here again where they are empty, so a download that cannot reach the
    network leaves no empty data folder behind."""
    made = missing_folders(root)
    root.mkdir(parents=True, exist_ok=True)
    try:
        yield root
    except BaseException:
        remove_empty_folders(made)
        raise


def download_and_extract(
    url: str, md5: str, root: Path, archive_name: str, folder: str, timeout: float = 60.0
) -> Path:
    """Download ``url`` into ``root``, check its ``md5``, extract ``folder`` from it.

    The archive itself is deleted afterwards (only the extracted folder is kept); nothing at
    all is left behind when any step fails, not even the folders made for ``root``.
    """
    with download_folder(root):
        handle, name = tempfile.mkstemp(prefix=f".{archive_name}.", suffix=".part", dir=root)
        os.close(handle)
        part = Path(name)
        try:
            log.info("downloading %s to %s", url, root)
            got = fetch(url, part, timeout)
            if got != md5:
                raise ChecksumError(
                    f"the archive downloaded from {url} has MD5 {got}, not the expected {md5}, "
                    "so it was deleted; retry, or fetch the official archive by hand"
                )
            return extract_archive(part, root, folder)
        finally:
            part.unlink(missing_ok=True)
