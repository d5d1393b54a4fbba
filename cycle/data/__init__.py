"""Data: the built-in emoji-scenes dataset (`cycle.data.emoji`), ingest of your own pairs, loaders."""

from __future__ import annotations

from ..errors import HQClipError


class DataError(HQClipError, ValueError):
    """A source or a store table that cannot be read as asked (a ValueError for older callers)."""


class DataNotFound(DataError, FileNotFoundError):
    """The source, store or table named does not exist."""
