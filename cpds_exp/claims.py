"""Exclusive claims on edits, so that sweeps sharing an output folder share the work.

A claim is an exclusive ``flock`` on ``<edit folder>/.claim``: the kernel gives it to one process
at a time and takes it back the moment that process ends (``kill -9`` included), so a claim of a
dead process is free at once. The file also says who holds it (host, pid, start) for people and
for the age limit: a claim held longer than ``timeout_h`` hours is presumed hung and taken over
(both processes may then compute the edit; every write is atomic, so records stay whole).
Network file systems: NFS maps flock to its byte-range locks across hosts; where locking is not
supported, claims are skipped with a warning and concurrent sweeps may repeat work.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, TypeVar

log = logging.getLogger(__name__)

CLAIM_FILE = ".claim"
_unsupported_said: list[Path] = []  # warn once per process, not once per edit
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class Claim:
    """A held claim (``fd`` None: not locked, because locking is unsupported or the claim was taken over)."""

    def __init__(self, fd: int | None):
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None


def _open(folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    return os.open(folder / CLAIM_FILE, os.O_RDWR | os.O_CREAT, 0o666)


def _stamp(fd: int) -> None:
    """Say who holds the claim (read by other processes for their messages and the age limit)."""
    text = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, text, 0)


def holder(folder: Path) -> dict[str, Any]:
    """Who holds the claim of ``folder`` ({} when unknown)."""
    try:
        info = json.loads((folder / CLAIM_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _lock(folder: Path, blocking: bool) -> Claim | None:
    fd = _open(folder)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as err:
        os.close(fd)
        if err.errno not in _UNSUPPORTED:
            raise
        if not _unsupported_said:
            log.warning("file locking is not supported under %s: concurrent sweeps may repeat edits", folder)
            _unsupported_said.append(folder)
        return Claim(None)
    _stamp(fd)
    return Claim(fd)


def try_claim(folder: Path, timeout_h: float | None = None) -> Claim | None:
    """Claim an edit folder now, or None while another live process holds it (and not for too long)."""
    claim = _lock(folder, blocking=False)
    if claim is not None:
        return claim
    started = holder(folder).get("started")
    if timeout_h is not None and isinstance(started, (int, float)) and time.time() - started > timeout_h * 3600:
        log.warning("taking over %s: claimed by %s for more than claim_timeout_h=%s hours", folder,
                    describe(folder), timeout_h)
        return Claim(None)
    return None


def wait_for_claim(folder: Path) -> Claim:
    """Block until the process holding ``folder`` releases it (finishes or dies), then hold it."""
    log.info("waiting for %s, which %s is editing", folder, describe(folder))
    claim = _lock(folder, blocking=True)
    assert claim is not None
    return claim


def describe(folder: Path) -> str:
    info = holder(folder)
    return f"process {info.get('pid', '?')} on {info.get('host', '?')}"


class HasFolder(Protocol):
    out: Path


Entry = TypeVar("Entry", bound=HasFolder)


def claimed_batches(todo: Iterable[Entry], size: int, timeout_h: float | None,
                    done_elsewhere: Callable[[Entry], Any], on_done_elsewhere: Callable[[Any], None]
                    ) -> Iterator[list[Entry]]:
    """Batches of up to ``size`` edits that this process holds claims on, for as long as it edits them.

    Edits claimed by another process are put off; when nothing else is left, this waits for them
    (an event: the other process's lock is released). After each claim ``done_elsewhere(entry)``
    says whether another process finished the edit meanwhile: its result goes to
    ``on_done_elsewhere`` instead of being computed again.
    """
    queue: deque[Entry] = deque(todo)
    waiting: deque[Entry] = deque()
    while queue or waiting:
        claimed: list[tuple[Entry, Claim]] = []
        while queue and len(claimed) < size:
            entry = queue.popleft()
            claim = try_claim(entry.out, timeout_h)
            if claim is None:
                waiting.append(entry)
            else:
                claimed.append((entry, claim))
        if not claimed and waiting:
            entry = waiting.popleft()
            claimed.append((entry, wait_for_claim(entry.out)))
        ready = []
        for entry, claim in claimed:
            result = done_elsewhere(entry)
            if result is None:
                ready.append((entry, claim))
                continue
            claim.release()
            on_done_elsewhere(result)
        if not ready:
            continue
        try:
            yield [entry for entry, _ in ready]
        finally:
            for _, claim in ready:
                claim.release()
