"""A throwaway machine for the runbook: a private mount and UTS namespace whose root is
an overlay of the host's ``/``. Everything the runbook writes (``/etc/clubsnap``,
``/var/lib/club``, unit files, the installed clubsnap) lands in the overlay's upper
directory and vanishes with it; the host's files, Python and network are visible as they
are. Needs root (mount namespaces, overlayfs)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Mapping

HOSTNAME = "registry"
MARK = "RUNBOOK_SANDBOX"


def available() -> str | None:
    """None when a sandbox can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root (a mount namespace and an overlay of /)"
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"unshare --mount failed: {probe.stderr.strip()}"


class Sandbox:
    def __init__(self, base: Path, visible: list[Path]) -> None:
        self.upper, self.work, self.root = base / "upper", base / "work", base / "root"
        for path in (self.upper, self.work, self.root):
            path.mkdir(parents=True)
        # Directories on other filesystems than / (a checkout, a venv) are not in the
        # overlay of /; they are bound in at the same path.
        root_dev = os.stat("/").st_dev
        self.binds = sorted({str(p) for p in visible if p.exists() and os.stat(p).st_dev != root_dev})
        self.process: subprocess.Popen[bytes] | None = None
        self.mark = f"{MARK}={os.getpid()}-{id(self)}".encode()  # in the environment of all it runs
        self.pid = 0

    def start(self) -> None:
        root = self.root
        script = "\n".join([
            "set -e",
            f"mount -t overlay overlay -o lowerdir=/,upperdir={self.upper},workdir={self.work} {root}",
            *(f"mount --rbind /{d} {root}/{d}" for d in ("proc", "dev", "sys")),
            *(f"mkdir -p {root}{p} && mount --rbind {p} {root}{p}" for p in self.binds),
            f"hostname {HOSTNAME}",
            f"exec chroot {root} sleep infinity",
        ])
        self.process = subprocess.Popen(["unshare", "--mount", "--uts", "--fork", "--propagation", "private",
                                         "sh", "-c", script], stdin=subprocess.DEVNULL)
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
        # nsenter's --wd opens the directory before entering the root: cd inside instead.
        return subprocess.run(["nsenter", "-t", str(self.pid), "-m", "-u", "-r", "--wd",
                               "env", "-i", *(f"{k}={v}" for k, v in env.items()), self.mark.decode(),
                               "sh", "-c", 'cd "$1" && shift && exec "$@"', "sh", cwd, *command],
                              capture_output=True, text=True, timeout=timeout, input=stdin)

    def path(self, inside: str) -> Path:
        """Where a file the sandbox wrote lives on the host (read it only once stopped)."""
        return self.upper / inside.lstrip("/")

    def stop(self) -> None:
        """Kill every process of the sandbox: those in its mount namespace, and those in
        namespaces of their own (emulated containers) that carry its ``MARK``."""
        if not self.pid:
            return
        namespace = os.readlink(f"/proc/{self.pid}/ns/mnt")
        for _ in range(50):
            members = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()
                       and (_namespace(int(p)) == namespace or self.mark in _environ(int(p)))]
            if not members:
                break
            for pid in members:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        if self.process is not None:
            self.process.wait(timeout=30)
        self.pid = 0


def _namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _environ(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""

