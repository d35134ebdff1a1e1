"""The exception tree of clubsnap, one exit code per class.

Every failure an operator can cause or meet (wrong path, damaged repository, full disk)
is raised as one of these, translated at the edge where it happens
(``raise RepositoryNotFound(...) from exc``). The CLI prints ``str(error)`` as one line
and exits with ``error.exit_code``; anything that is not an ``EngineError`` is a bug and
keeps its traceback.

    EngineError (1)
    ├── UsageError (2)                  bad argument value (time spec, include path, ...)
    ├── RepositoryError (10)
    │   ├── RepositoryNotFound (10)     no repository at that location / not initialised
    │   ├── RepositoryExists (10)       init over an existing repository
    │   ├── UnsupportedFormat (11)      magic, version or flags this build cannot read
    │   ├── IntegrityError (12)         corrupted object, hash mismatch, missing chunk
    │   └── BackendError (13)           storage unreachable or refusing an operation
    │       └── ObjectNotFound (13)     a key that should exist does not
    ├── SnapshotNotFound (14)           no snapshot matches an id or a time
    ├── SourceError (15)                data dir missing or unusable as a whole
    ├── TargetInUse (16)                restore target database is open by a process
    ├── StorageFull (17)                ENOSPC / quota while writing
    ├── CheckFailed (18)                check found problems (details in the report)
    ├── TargetError (19)                restore target cannot be written as planned
    ├── WrongPassword (20)              no key slot of an encrypted repository opens
    ├── RepositoryLocked (21)           another prune holds the repository, or this
    │                                   command's lock went stale
    └── Unhealthy (22)                  status: the newest snapshot is too old, or the
                                        last verify failed

A snapshot that completed but skipped unreadable files is not an exception: it is a
result with ``partial=True``, which the CLI reports with exit code 3. Ctrl-C exits 130,
and output cut off by its reader (``clubsnap snapshots | head``) 141, as a shell would.
"""

from __future__ import annotations

import errno

EXIT_PARTIAL = 3
EXIT_INTERRUPTED = 130   # 128 + SIGINT
EXIT_BROKEN_PIPE = 141   # 128 + SIGPIPE


class EngineError(Exception):
    """Base class: a failure with a one-line explanation for the operator."""

    exit_code = 1


class UsageError(EngineError):
    exit_code = 2


class RepositoryError(EngineError):
    exit_code = 10


class RepositoryNotFound(RepositoryError):
    exit_code = 10


class RepositoryExists(RepositoryError):
    exit_code = 10


class UnsupportedFormat(RepositoryError):
    exit_code = 11


class IntegrityError(RepositoryError):
    exit_code = 12


class BackendError(RepositoryError):
    exit_code = 13


class ObjectNotFound(BackendError):
    exit_code = 13


class SnapshotNotFound(EngineError):
    exit_code = 14


class SourceError(EngineError):
    exit_code = 15


class TargetInUse(EngineError):
    exit_code = 16


class StorageFull(EngineError):
    exit_code = 17


class CheckFailed(EngineError):
    exit_code = 18


class TargetError(EngineError):
    exit_code = 19


class WrongPassword(EngineError):
    exit_code = 20


class RepositoryLocked(EngineError):
    exit_code = 21


class Unhealthy(EngineError):
    exit_code = 22


def from_os_error(exc: OSError, what: str) -> EngineError:
    """Map an OSError met while doing ``what`` to the matching engine error.

    Disk-full conditions get their own class because the operator's fix (free space)
    differs from every other I/O failure.
    """
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"{what}: no space left on device")
    reason = exc.strerror or str(exc)
    return BackendError(f"{what}: {reason}")
