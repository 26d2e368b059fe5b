"""The one exception the data pipeline raises for problems the user can fix."""

from __future__ import annotations


class DataError(Exception):
    """A user-fixable data problem; the message names the problem and the fix."""
