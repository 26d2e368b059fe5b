"""Every error a user can fix, in one hierarchy: the CLI catches :class:`UserError` and exits 2.

Each message names the problem and the fix in one line (a :class:`ConfigError` lists every
problem of a config at once). The classes keep the standard bases they had before this module
existed (``ValueError``, ``RuntimeError``), so ``except ValueError`` code keeps working.

This module imports nothing: the CLI imports it before a training command's stop-signal catcher
is installed, and must not pull in torch there. The packages re-export their class
(``kforcing_dist.config.ConfigError``, ``kforcing_dist.decode.DecodeError``, ...).
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad input, missing or damaged files, a bad launch); the
    message names the problem and the fix."""


class ConfigError(UserError, ValueError):
    """One or more problems in a configuration; ``problems`` lists each one."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in {source}:\n{lines}")


class DataError(UserError):
    """A user-fixable data problem (corpus, tokenizer, token shards)."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete, or does not fit the run loading it."""


class DecodeError(UserError, ValueError):
    """A decoder checkpoint or a generation request is invalid."""


class LaunchError(UserError, RuntimeError):
    """The environment describes an inconsistent or incomplete launch."""


class OutputPathError(UserError, OSError):
    """A file or folder a command must write cannot be written there (a file in the way, a
    missing parent folder, a read-only location)."""
