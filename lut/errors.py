"""What can be wrong with a LUT file; every message says which file, why, and what to do."""

from __future__ import annotations


class LutError(ValueError):
    """A LUT file cannot be used; the message says which file, why, and what to do."""


class CorruptLutError(LutError):
    """The file is not an hwmpq LUT (not SQLite, truncated, or without the LUT tables)."""


class ForeignLutError(LutError):
    """The LUT was measured on another device or target, or written by another schema version."""
