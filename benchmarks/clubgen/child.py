"""A writer in a child process, run as a context manager: shared by LiveWriter and
ChurnWriter, which differ only in what the child does.

The child is spawned (never forked: the parent's SQLite connections must not be shared),
signals ``ready`` once it serves, runs until ``stop`` is set, and sends back one result:
``("ok", payload)`` or ``("error", traceback)``; a child that died sending nothing is
reported with its exit code.
"""

from __future__ import annotations

import multiprocessing
import traceback
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from types import TracebackType
from typing import Any, Callable

START_TIMEOUT = 60.0


class ChildWriter:
    """Start the child on ``__enter__`` (waiting until it is ready), stop it on
    ``__exit__`` and hand its payload to ``finished``. Subclasses give ``name``,
    ``target`` (called in the child as ``target(*args, stop, ready, sender)``) and
    ``args``; shared counters come from ``self._ctx.Value``."""

    name = "child writer"

    def __init__(self) -> None:
        self._ctx = multiprocessing.get_context("spawn")
        self._stop = self._ctx.Event()
        self._ready = self._ctx.Event()
        self._process: Any = None
        self._receiver: Connection | None = None

    def target(self) -> Callable[..., None]:
        raise NotImplementedError

    def args(self) -> tuple[Any, ...]:
        raise NotImplementedError

    def finished(self, payload: Any) -> None:
        """The child's result, after a clean stop."""

    def __enter__(self) -> Any:
        receiver, sender = self._ctx.Pipe(duplex=False)
        self._process = self._ctx.Process(target=self.target(), args=(*self.args(), self._stop, self._ready, sender),
                                          name=f"clubgen-{self.name.replace(' ', '-')}", daemon=True)
        self._process.start()
        sender.close()
        self._receiver = receiver
        if not self._ready.wait(START_TIMEOUT):
            self._stop.set()
            raise RuntimeError(f"{type(self).__name__} did not start: {self._result()}")
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        status, payload = self._result()
        self._process.join(30)
        if status != "ok" and kind is None:
            raise RuntimeError(f"{type(self).__name__} failed:\n{payload}")
        if status == "ok":
            self.finished(payload)

    def _result(self) -> tuple[str, Any]:
        assert self._receiver is not None
        try:
            status, payload = self._receiver.recv()
            return str(status), payload
        except EOFError:
            return "error", f"{self.name} process exited with code {self._process.exitcode}"


def run_child(body: Callable[[], Any], ready: Event, sender: Connection) -> None:
    """The child's side: send ``body()``'s result, or the traceback that stopped it
    (setting ``ready``, so the parent does not wait out its start timeout)."""
    try:
        sender.send(("ok", body()))
    except BaseException:
        ready.set()
        sender.send(("error", traceback.format_exc()))
