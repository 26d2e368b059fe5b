"""The one exception the data pipeline raises for problems the user can fix."""

from __future__ import annotations

from ..errors import DataError

__all__ = ["DataError"]
