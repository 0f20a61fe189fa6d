"""Errors a user can cause with data: each message is one sentence naming the problem and fix.

DatasetNotFoundError(FileNotFoundError)  the files are not where they should be
DataError(UserError: a ValueError)       the files are there but unusable
  ├─ CorruptDataError                    truncated, wrong shape, labels out of range
  ├─ UnsafePickleError                   a pickle asks for code outside the allow-list
  └─ DownloadError                       fetching failed (network, HTTP status)
       └─ ChecksumError                  the downloaded archive has the wrong MD5
MissingDependencyError(ImportError)      an optional extra is not installed (it lives in
                                         qtrain.base.errors; the name stays importable here)
"""

from __future__ import annotations

from qtrain.base.errors import MissingDependencyError, NamesSettings, UserError

__all__ = [
    "ChecksumError",
    "CorruptDataError",
    "DataError",
    "DatasetNotFoundError",
    "DownloadError",
    "MissingDependencyError",
    "UnsafePickleError",
]


class DatasetNotFoundError(NamesSettings, FileNotFoundError):
    """The data set's files are missing; the message says where to put them."""


class DataError(UserError):
    """The data set's files exist but cannot be used."""


class CorruptDataError(DataError):
    """A data file is truncated, malformed or holds values outside the format's range."""


class UnsafePickleError(DataError):
    """A pickle refers to a global that the official files never contain."""


class DownloadError(DataError):
    """Downloading a data set failed; nothing was left behind."""


class ChecksumError(DownloadError):
    """A downloaded archive does not have the expected MD5; it was deleted."""
