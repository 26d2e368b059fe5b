"""The one exception the decoder raises for user errors (bad checkpoint folders, bad arguments)."""

from __future__ import annotations

from ..errors import DecodeError

__all__ = ["DecodeError"]
