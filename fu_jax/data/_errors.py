"""What a data source raises: DataError and DataNotFoundError (both ValueErrors)."""

from __future__ import annotations


class DataError(ValueError):
  """Missing, truncated or malformed data, or an unknown source. Names the path involved."""


class DataNotFoundError(DataError, FileNotFoundError):
  """A file or directory a source needs does not exist (catchable as FileNotFoundError too)."""
