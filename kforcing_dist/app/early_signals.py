"""Remember stop signals that arrive before the trainer is ready to handle them.

Slurm's advance warning (SIGUSR1) or a preemption (SIGTERM) can reach a task while it is still
importing torch, megatron-core and DeepSpeed (~10 s). SIGUSR1's default action kills the process,
which would lose the "save, requeue, resume" path. Training commands install this catcher as
their very first step (this module imports nothing heavy); ``app.runtime.install_stop_signals``
takes over and replays what arrived, so the run stops at its first step boundary instead.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_pending: list[str] = []  # process-level state of the app, filled by a signal handler


def _remember(signum, _frame) -> None:
    _pending.append(signal.Signals(signum).name)


def catch() -> None:
    """Start remembering SIGUSR1/SIGTERM (training commands only: others keep the default action)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _remember)


def take() -> list[str]:
    """The names of the signals received so far, oldest first; clears the list."""
    names = list(_pending)
    _pending.clear()
    return names
