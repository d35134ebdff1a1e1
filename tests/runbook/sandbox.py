"""A throwaway machine for the runbook: private mount, UTS and PID namespaces whose root is
an overlay of the host's ``/``. Everything the runbook writes (``/etc/clubsnap``,
``/var/lib/club``, unit files, the installed clubsnap) lands in the overlay's upper
directory and vanishes with it; the host's files, Python and network are visible as they
are. Needs root (mount namespaces, overlayfs)."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Mapping

HOSTNAME = "registry"


def available() -> str | None:
    """None when a sandbox can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root (mount and PID namespaces, an overlay of /)"
    with tempfile.TemporaryDirectory() as probe:
        script = (f"mkdir {probe}/u {probe}/w {probe}/r && "
                  f"mount -t overlay overlay -o lowerdir=/,upperdir={probe}/u,workdir={probe}/w {probe}/r")
        done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                              capture_output=True, text=True)
    return None if done.returncode == 0 else f"no overlay of / in a mount namespace: {done.stderr.strip()}"


class Sandbox:
    """The machine: ``start``, then ``run`` commands in it, then ``stop`` (which kills
    everything it ran: its processes live in a PID namespace whose init is the sandbox's,
    and which dies with ``unshare`` even when the test process is killed)."""

    def __init__(self, base: Path, visible: list[Path]) -> None:
        self.upper, self.work, self.root = base / "upper", base / "work", base / "root"
        for path in (self.upper, self.work, self.root):
            path.mkdir(parents=True)
        # Directories on other filesystems than / (a checkout, a venv) are not in the
        # overlay of /; they are bound in, read-only, at the same path.
        root_dev = os.stat("/").st_dev
        self.binds = sorted({str(p) for p in visible if p.exists() and os.stat(p).st_dev != root_dev})
        self.process: subprocess.Popen[bytes] | None = None
        self.pid = 0

    def start(self) -> None:
        root = self.root
        script = "\n".join([
            "set -e",
            f"mount -t overlay overlay -o lowerdir=/,upperdir={self.upper},workdir={self.work} {root}",
            f"mount -t proc proc {root}/proc",
            *(f"mount --rbind /{d} {root}/{d}" for d in ("dev", "sys")),
            f"mount -t tmpfs tmpfs {root}/run && mkdir -p {root}/run/lock",  # as a booted machine has
            *(f"mkdir -p {root}{p} && mount --rbind {p} {root}{p} && mount -o remount,bind,ro {root}{p}"
              for p in self.binds),
            f"hostname {HOSTNAME}",
            f"exec chroot {root} sleep infinity",
        ])
        self.process = subprocess.Popen(["unshare", "--mount", "--uts", "--pid", "--fork", "--kill-child",
                                         "--propagation", "private", "sh", "-c", script], stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            pids = children.read_text().split() if children.exists() else []
            if pids and _command(int(pids[0])).startswith("sleep"):
                self.pid = int(pids[0])
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"the sandbox did not start (exit {self.process.returncode})")
            time.sleep(0.05)
        raise RuntimeError("the sandbox did not start within 20 s")

    def run(self, command: list[str], env: Mapping[str, str], cwd: str = "/root",
            timeout: float = 600, stdin: str = "") -> subprocess.CompletedProcess[str]:
        """``command`` inside the sandbox, as root, with exactly ``env``."""
        # nsenter's --wd=DIR opens DIR before entering the root: cd inside instead.
        return subprocess.run(["nsenter", "-t", str(self.pid), "-m", "-u", "-p", "-r", "--wd",
                               "env", "-i", *(f"{k}={v}" for k, v in env.items()),
                               "sh", "-c", 'cd "$1" && shift && exec "$@"', "sh", cwd, *command],
                              capture_output=True, text=True, timeout=timeout, input=stdin)

    def path(self, inside: str) -> Path:
        """Where a file of the sandbox lives on the host (write it only before ``start``)."""
        return self.upper / inside.lstrip("/")

    def stop(self) -> None:
        """Kill the sandbox's init: the kernel then kills every process in its PID namespace."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()  # --kill-child passes it on to the init
            if self.pid:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.process.wait(timeout=30)
        self.process = None


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
