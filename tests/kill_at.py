"""Run the clubsnap command and SIGKILL it just before its N-th change to a local
repository (a put or a delete; ``CLUBSNAP_TEST_KILL_AT=N``): fault injection on the real
code path, for the crash tests. With N=0 it runs to the end and reports on stderr how
many changes it made, so a test can kill it before each one in turn."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Callable

from engine import cli
from engine.backends.fs import FsBackend

KILL_AT = int(os.environ.get("CLUBSNAP_TEST_KILL_AT", "0"))
_changes = 0


def _counted(method: Callable[..., Any]) -> Callable[..., Any]:
    def change(self: FsBackend, *args: Any, **kwargs: Any) -> Any:
        global _changes
        _changes += 1
        if _changes == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)
        return method(self, *args, **kwargs)
    return change


FsBackend.put = _counted(FsBackend.put)  # type: ignore[method-assign]
FsBackend.delete = _counted(FsBackend.delete)  # type: ignore[method-assign]

if __name__ == "__main__":
    code = cli.main(sys.argv[1:])
    print(f"changes: {_changes}", file=sys.stderr)
    sys.exit(code)
