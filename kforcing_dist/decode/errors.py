"""The one exception the decoder raises for user errors (bad checkpoint folders, bad arguments)."""

from __future__ import annotations


class DecodeError(ValueError):
    """A decoder checkpoint or a generation request is invalid; the message names the fix."""
