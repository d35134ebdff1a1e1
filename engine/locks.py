"""Repository locks: who is using the repository, so that prune deletes nothing they need.

A lock never blocks a snapshot or a restore. It is a note, ``locks/<kind>-<random>``,
that a process writes when it starts and deletes when it ends, rewriting it every
``REFRESH_EVERY`` meanwhile. Snapshots and readers write ``snapshot`` and ``read`` locks
and ignore everybody else's. Prune reads them: packs it condemned are deleted only after
every process that might have seen them as live has finished (docs/format.md §10). Two
prunes at once are refused (``prune`` locks), since their plans would overlap.

A lock is stale, and ignored (then removed by prune), when its process is known dead (same
host, no such pid) or it was not refreshed for ``STALE_AFTER``. A process that could not
refresh its own lock for half that time stops before writing anything that depends on it:
prune may have judged it dead.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from .backend import Backend
from .crypto import PLAIN, Cipher
from .errors import EngineError, IntegrityError, ObjectNotFound, RepositoryLocked, UnsupportedFormat
from .format import LOCKS_PREFIX, Kind, open_object, seal_object

REFRESH_EVERY = timedelta(minutes=2)
STALE_AFTER = timedelta(minutes=30)
KINDS = ("snapshot", "read", "prune")


@dataclass(frozen=True)
class LockInfo:
    key: str
    kind: str
    host: str
    pid: int
    created: datetime
    refreshed: datetime
    process_space: str = ""  # boot id and pid namespace: where ``pid`` means this process

    def stale(self, now: datetime, this_host: str) -> bool:
        if now - self.refreshed > STALE_AFTER:
            return True
        # A pid is checked only in the pid space it was taken in: containers may share a
        # host name, and a pid of theirs means nothing here.
        same_space = self.host == this_host and self.process_space and self.process_space == process_space()
        return bool(same_space) and not _process_alive(self.pid)

    def describe(self) -> str:
        return f"{self.kind} lock of pid {self.pid} on {self.host}, since {self.created.isoformat(timespec='seconds')}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def this_host() -> str:
    return socket.gethostname()


def process_space() -> str:
    """This boot of this machine and this pid namespace, or "" where unknown (then no
    lock is judged by its pid)."""
    try:
        boot = open("/proc/sys/kernel/random/boot_id").read().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def list_locks(backend: Backend, cipher: Cipher = PLAIN) -> tuple[list[LockInfo], list[str]]:
    """The readable locks, and the keys of locks that could not be read (damaged, or
    deleted while listed: the caller decides how careful to be about those)."""
    found, unreadable = [], []
    for key, _ in backend.list(LOCKS_PREFIX):
        try:
            record = open_object(Kind.LOCK, backend.get(key), key, cipher)
            found.append(LockInfo(key, str(record["kind"]), str(record["host"]), int(record["pid"]),
                                  datetime.fromisoformat(record["created"]),
                                  datetime.fromisoformat(record["refreshed"]), str(record.get("space", ""))))
        except ObjectNotFound:
            continue  # released meanwhile
        except (IntegrityError, UnsupportedFormat, KeyError, TypeError, ValueError):
            unreadable.append(key)
    return found, unreadable


def live_locks(backend: Backend, cipher: Cipher, kinds: tuple[str, ...]) -> tuple[list[LockInfo], list[str]]:
    """Locks of ``kinds`` that are not stale, and unreadable lock keys (treated as live)."""
    now, host = datetime.now(timezone.utc), this_host()
    found, unreadable = list_locks(backend, cipher)
    return [lock for lock in found if lock.kind in kinds and not lock.stale(now, host)], unreadable


def remove_stale(backend: Backend, cipher: Cipher) -> list[LockInfo]:
    now, host = datetime.now(timezone.utc), this_host()
    removed = [lock for lock in list_locks(backend, cipher)[0] if lock.stale(now, host)]
    for lock in removed:
        backend.delete(lock.key)
    return removed


class Lock:
    """A lock this process holds; refreshed by a background thread until released."""

    def __init__(self, backend: Backend, cipher: Cipher, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(kind)
        self.backend, self.cipher, self.kind = backend, cipher, kind
        self.key = f"{LOCKS_PREFIX}{kind}-{secrets.token_hex(8)}"
        self.created = datetime.now(timezone.utc)
        self._last_written = 0.0  # time.time() of the last successful write (wall clock:
        # a suspended machine's monotonic clock stands still, the others' do not)
        self._lapsed = False  # a gap between writes long enough for a prune to call us dead
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        started = time.time()
        if self._last_written and started - self._last_written > STALE_AFTER.total_seconds() / 2:
            self._lapsed = True  # sticky: a later successful write does not undo the gap
        record = {"kind": self.kind, "host": this_host(), "pid": os.getpid(), "space": process_space(),
                  "created": self.created.isoformat(), "refreshed": datetime.now(timezone.utc).isoformat()}
        self.backend.put(self.key, seal_object(Kind.LOCK, record, self.cipher))
        self._last_written = started

    def acquire(self) -> "Lock":
        self._write()
        self._thread = threading.Thread(target=self._refresh, name=f"{self.kind}-lock", daemon=True)
        self._thread.start()
        return self

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_EVERY.total_seconds()):
            try:
                self._write()
            except EngineError:
                pass  # tried again next time; ensure_held() stops the owner if it lasts

    def ensure_held(self) -> None:
        """Raise unless the lock is fresh: called before a write that is safe only while
        prune knows this process is alive. (No request: a lock refreshed within half the
        stale time is live to every prune whose clock is within a quarter hour of ours.)"""
        gap = time.time() - self._last_written
        if self._lapsed or gap > STALE_AFTER.total_seconds() / 2:
            raise RepositoryLocked(f"{self.key} went {'unrefreshed for a while' if self._lapsed else f'{int(gap)} s unrefreshed'}"
                                   f" (suspended, or storage unreachable); stopping before anything that a prune "
                                   f"could have taken this {self.kind} for dead over (run it again)")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.backend.delete(self.key)

    def __enter__(self) -> "Lock":
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.release()
        except EngineError:
            if exc[0] is None:
                raise
            # Already failing: the lock goes stale on its own (dead pid, or 30 minutes).

