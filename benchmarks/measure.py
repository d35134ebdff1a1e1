"""Run a command and write its own wall time, CPU time, peak RSS and bytes read as JSON.

Linux keeps a process's peak RSS across fork and exec, so a command started straight
from a large benchmark process would report that process's peak. Started from this
small launcher (a fresh exec), the command's figure is its own.

Bytes read come from ``/proc/<pid>/io``, which vanishes once the child is reaped; so the
launcher first waits with ``WNOWAIT`` (the child stays a zombie), reads the file, then
reaps it with ``wait4`` for the resource usage. A zombie's counters include the children
it reaped itself, so a ``sh -c`` pipeline is counted whole. ``rchar`` counts every byte
returned by read() (page cache included): for a backup tool restoring from a local
repository it is an upper bound on the bytes read from that repository.
``read_bytes`` is what reached the block layer (near 0 with a warm page cache).

Usage: python -m benchmarks.measure OUT.json COMMAND [ARG...]; or, from the runner,
``run_measured`` (one command) and ``combined`` (a step made of several commands).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
FIGURES = ("wall_s", "cpu_s", "peak_rss_mb", "rchar", "read_bytes")


class CommandFailed(Exception):
    """A measured command exited with a code its tool does not accept."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Measured:
    """One step's figures (summed over its commands, peak RSS the largest) and the last stdout."""

    figures: dict[str, float]
    stdout: str


def run_measured(command: list[str], cwd: Path, env: dict[str, str], ok_codes: tuple[int, ...] = (0,)) -> Measured:
    """Run ``command`` under this launcher (so its peak RSS is its own) and collect the figures."""
    with tempfile.TemporaryDirectory(prefix="clubsnap-measure-") as tmp:
        out = Path(tmp) / "figures.json"
        launcher = [sys.executable, "-m", "benchmarks.measure", str(out), *command]
        result = subprocess.run(launcher, cwd=cwd, env={**env, "PYTHONPATH": str(_ROOT)}, capture_output=True)
        figures = json.loads(out.read_text()) if out.exists() else {"exit_code": -1}
    code = figures.pop("exit_code")
    if code not in ok_codes:
        stderr = result.stderr.decode(errors="replace").strip()[-2000:]
        raise CommandFailed(f"{' '.join(command)} exited {code}: {stderr}", code)
    return Measured(figures, result.stdout.decode())


def combined(parts: list[Measured]) -> Measured:
    """A step that takes several commands (a peer's database dump, then its backup)."""
    figures = {k: sum(p.figures[k] for p in parts) for k in FIGURES if k != "peak_rss_mb"}
    figures["peak_rss_mb"] = max(p.figures["peak_rss_mb"] for p in parts)
    return Measured({k: round(v, 3) for k, v in figures.items()}, parts[-1].stdout)


def _io_counters(pid: int) -> dict[str, int]:
    """rchar and read_bytes of a not-yet-reaped child; -1 when the kernel does not say."""
    try:
        with open(f"/proc/{pid}/io") as handle:
            fields = dict(line.split(": ") for line in handle.read().splitlines())
        return {"rchar": int(fields["rchar"]), "read_bytes": int(fields["read_bytes"])}
    except (OSError, KeyError, ValueError):
        return {"rchar": -1, "read_bytes": -1}


def main() -> None:
    out, command = sys.argv[1], sys.argv[2:]
    started = time.monotonic()
    child = subprocess.Popen(command)
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
    wall = time.monotonic() - started
    io = _io_counters(child.pid)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    with open(out, "w") as handle:
        json.dump({"exit_code": child.returncode, "wall_s": round(wall, 3),
                   "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
                   "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), **io}, handle)


if __name__ == "__main__":
    main()
