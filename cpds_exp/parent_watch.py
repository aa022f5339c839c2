"""End a launcher's worker process when the sweep's process dies.

joblib's and submitit's local workers outlive a sweep killed with ``kill -9`` and would go on
editing unseen. A daemon thread waits on a pidfd of the sweep's process (an event from the
kernel, no polling) and ends the worker the moment that process is gone. Finished edits are
safe: every file is written atomically.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import threading

log = logging.getLogger(__name__)

_watched: set[int] = set()


def _wait_then_exit(pidfd: int, pid: int) -> None:
    select.select([pidfd], [], [])  # readable once the process has exited
    log.error("the sweep's process %d is gone: ending this worker (pid %d)", pid, os.getpid())
    os.kill(os.getpid(), signal.SIGKILL)


def end_with_parent(pid: int) -> None:
    """From now on, this process ends when process ``pid`` ends (Linux; elsewhere a warning)."""
    if pid in _watched:
        return  # a reused worker already watches it
    if not hasattr(os, "pidfd_open"):
        log.warning("cannot watch the sweep's process on this system: if it is killed, end its workers by hand")
        return
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        os.kill(os.getpid(), signal.SIGKILL)  # already gone
        return
    except OSError as err:
        log.warning("cannot watch the sweep's process %d (%s): if it is killed, end its workers by hand", pid, err)
        return
    _watched.add(pid)
    threading.Thread(target=_wait_then_exit, args=(pidfd, pid), daemon=True, name="end-with-sweep").start()
