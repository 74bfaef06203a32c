"""Long runs that stop cleanly: Ctrl-C or SIGTERM saves the last finished step, then explains.

:func:`graceful` wraps a resumable loop. Inside it, SIGINT and SIGTERM raise :class:`Interrupted`
at once (a ``KeyboardInterrupt``, so no ``except Exception`` on the way swallows it); the loop's
``guard.checkpoint()`` after each finished step saves the state (throttled so that saving costs
at most about a tenth of the run time); on an interruption the wrapped loop restores the state of
its last finished step, saves it and re-raises with a line saying how to resume. SIGKILL cannot be
caught: the last saved checkpoint is what a rerun resumes from.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from typing import Callable


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM after saving its last finished step (``saved``: the
    signal came while a checkpoint was being written, which then completed)."""

    def __init__(self, message: str, signum: int, saved: bool = False):
        super().__init__(message)
        self.signum, self.saved = signum, saved

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Guard:
    """Handed out by :func:`graceful`; call :meth:`checkpoint` after every finished step."""

    def __init__(self, save: Callable[[], None]):
        self.save = save
        self.last_save, self.cost = time.monotonic(), 0.0
        self.saving, self.pending, self.signalled = False, None, None

    def checkpoint(self, force: bool = False) -> None:
        """Save (throttled: at most ~10% of the time goes to saving); a signal that arrives while
        saving is held until the save is complete. A signal whose :class:`Interrupted` was lost
        (raised inside a finalizer, ``__del__``, where Python only prints it) stops the run here,
        after the step that finished, saved."""
        if self.signalled is not None:
            self.pending, force = self.signalled, True
        now = time.monotonic()
        if force or now - self.last_save >= 10 * self.cost:
            self.saving = True
            try:
                self.save()
            finally:
                self.saving = False
            self.cost = time.monotonic() - now
            self.last_save = time.monotonic()
            if self.pending is not None:  # the step and its checkpoint are complete: nothing to undo
                signum, self.pending = self.pending, None
                raise Interrupted(f"interrupted by {signal.Signals(signum).name}", signum, saved=True)


@contextmanager
def graceful(save: Callable[[], None], *, restore: Callable[[], None] | None = None,
             resume_hint: str = "run it again to resume"):
    """Run a resumable loop with SIGINT/SIGTERM turned into a clean stop (see module docstring).

    ``restore`` puts the state back to the last finished step (undoing a step cut short) before
    the final save. Outside the main thread (where Python cannot install handlers) the signals keep
    their default behaviour and only the checkpoints are taken.
    """
    guard = Guard(save)

    def handler(signum, frame):
        if guard.saving:  # never cut a checkpoint in half
            guard.pending = signum
            return
        guard.signalled = signum  # kept for checkpoint(), should this raise be swallowed
        raise Interrupted(f"interrupted by {signal.Signals(signum).name}", signum)

    installed = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            installed[sig] = signal.signal(sig, handler)
    try:
        yield guard
    except Interrupted as e:
        for sig, old in installed.items():  # a second Ctrl-C while saving aborts for real
            signal.signal(sig, old)
        installed.clear()
        if not e.saved:
            if restore is not None:
                restore()
            save()
        raise Interrupted(f"{e}: the last finished step is saved; {resume_hint}", e.signum, e.saved) from None
    finally:
        for sig, old in installed.items():
            signal.signal(sig, old)
