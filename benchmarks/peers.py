"""The tools under test behind one interface: clubsnap, and restic and borg as peers.

Every step is a real command line, measured by benchmarks.measure. The peers are set up
the way their docs advise for a directory that holds a live SQLite database: dump the
database first with ``sqlite3 db/club.db ".backup ..."`` (its time counts in the peer's
snapshot step), back up the dump instead of the live file, and leave out what clubsnap
leaves out by default (``cache/``, ``tmp/``, ``logs/``, club's ``*.tmp.<µs>`` in-flight
blobs). A peer restore puts the dump back at ``db/club.db`` and removes stale WAL
sidecars, as an operator must, and that counts in its restore step too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from benchmarks.measure import Measured, combined, run_measured

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "clubsnap-bench"  # a fixed secret: the repositories are thrown away
DUMP = "db-dump/club.db"  # where a peer's database dump lives, relative to the data dir
LIVE_DB = "db/club.db"
PEER_EXCLUDES = ("cache", "tmp", "logs")
# Moves the restored dump into place; a stale -wal beside it would be replayed over it.
INSTALL_DUMP = ["sh", "-c", f"mkdir -p db && mv -f {DUMP} {LIVE_DB} && rm -f {LIVE_DB}-wal {LIVE_DB}-shm {LIVE_DB}-journal"]
APT_PACKAGES = {"restic": "restic", "borg": "borgbackup", "sqlite3": "sqlite3"}


@dataclass(frozen=True)
class Snap:
    ref: str
    time: datetime


class Tool(ABC):
    """One backup tool with its own repository (and local cache) under ``work``."""

    name: str = ""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.repo = work / "repo"
        work.mkdir(parents=True, exist_ok=True)

    def repo_bytes(self) -> int:
        """Apparent size of every file in the repository (local caches not counted)."""
        return sum(f.stat().st_size for f in self.repo.rglob("*") if f.is_file())

    @abstractmethod
    def init(self) -> Measured: ...

    @abstractmethod
    def snapshot(self, data: Path) -> tuple[Measured, str]:
        """Take a snapshot; returns the figures and the new snapshot's reference."""

    @abstractmethod
    def restore(self, ref: str, target: Path, only_db: bool = False, rollback: bool = False) -> Measured:
        """Restore ``ref`` ("latest" or a reference from snapshot()) into ``target``."""

    @abstractmethod
    def restore_at(self, when: datetime, target: Path) -> Measured:
        """Restore the newest snapshot taken at or before ``when``."""

    @abstractmethod
    def snapshots(self) -> tuple[Measured, list[Snap]]: ...

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    def _run(self, command: list[str], cwd: Path | None = None, ok: tuple[int, ...] = (0,)) -> Measured:
        return run_measured(command, cwd or self.work, self._env(), ok)


# clubsnap runs integrity_check on a restored database by default (about 2 s on the medium
# one); the peers check nothing, and the runner checks every tool's restore itself, untimed.
NO_DB_CHECK = ("--db-check", "none")


class Clubsnap(Tool):
    name = "clubsnap"

    def _env(self) -> dict[str, str]:
        # Encrypted like restic's and borg's repositories, with the same password; the key
        # derivation is calibrated (~0.5 s per command) unless CLUBSNAP_KDF_COST says otherwise.
        return {**os.environ, "CLUBSNAP_REPO": str(self.repo), "CLUBSNAP_CACHE_DIR": str(self.work / "cache"),
                "CLUBSNAP_PASSWORD": PASSWORD}

    def _cli(self, *args: str) -> Measured:
        return self._run([sys.executable, "-m", "engine", "--json", *args], cwd=ROOT)

    def init(self) -> Measured:
        return self._cli("init")

    def snapshot(self, data: Path) -> tuple[Measured, str]:
        step = self._cli("snapshot", str(data))
        return step, json.loads(step.stdout)["id"]

    def restore(self, ref: str, target: Path, only_db: bool = False, rollback: bool = False) -> Measured:
        extra = (["--include", LIVE_DB] if only_db else []) + (["--delete"] if rollback else [])
        return self._cli("restore", ref, "--target", str(target), *NO_DB_CHECK, *extra)

    def restore_at(self, when: datetime, target: Path) -> Measured:
        return self._cli("restore", "--at", when.isoformat(), "--target", str(target), *NO_DB_CHECK)

    def snapshots(self) -> tuple[Measured, list[Snap]]:
        step = self._cli("snapshots")
        return step, [Snap(s["id"], datetime.fromisoformat(s["time"])) for s in json.loads(step.stdout)]

    def verify_data_dir(self, target: Path) -> None:
        """``clubsnap verify --data``; raises CommandFailed when the dir is inconsistent."""
        self._cli("verify", "--data", str(target))


class Peer(Tool):
    """A file-level backup tool fed a database dump; subclasses give the command lines."""

    def snapshot(self, data: Path) -> tuple[Measured, str]:
        dump = data / DUMP
        dump.parent.mkdir(exist_ok=True)
        dump.unlink(missing_ok=True)
        parts = [self._run(["sqlite3", LIVE_DB, f".backup {DUMP}"], cwd=data)]
        backup, ref = self._backup(data)
        return combined(parts + [backup]), ref

    def restore(self, ref: str, target: Path, only_db: bool = False, rollback: bool = False) -> Measured:
        target.mkdir(parents=True, exist_ok=True)
        # Peers cannot reuse local data or delete what the snapshot lacks: a rollback is a
        # normal restore into the existing directory.
        return combined([self._extract(ref, target, DUMP if only_db else None),
                         self._run(INSTALL_DUMP, cwd=target)])

    def restore_at(self, when: datetime, target: Path) -> Measured:
        listing, snaps = self.snapshots()
        eligible = [s for s in snaps if s.time <= when]
        if not eligible:
            raise LookupError(f"{self.name}: no snapshot at or before {when.isoformat()}")
        return combined([listing, self.restore(eligible[-1].ref, target)])

    @abstractmethod
    def _backup(self, data: Path) -> tuple[Measured, str]: ...

    @abstractmethod
    def _extract(self, ref: str, target: Path, only: str | None) -> Measured: ...


class Restic(Peer):
    """restic with its defaults: repository v2, compression auto, always encrypted."""

    name = "restic"

    def _env(self) -> dict[str, str]:
        return {**os.environ, "RESTIC_REPOSITORY": str(self.repo), "RESTIC_PASSWORD": PASSWORD,
                "RESTIC_CACHE_DIR": str(self.work / "cache")}

    def init(self) -> Measured:
        return self._run(["restic", "init"])

    def _backup(self, data: Path) -> tuple[Measured, str]:
        # Run from inside the data dir with ".", so snapshot paths are relative to it.
        excludes = [f"--exclude={data / d}" for d in PEER_EXCLUDES]
        excludes += [f"--exclude={data / LIVE_DB}*", "--exclude=*.tmp.[0-9]*"]
        step = self._run(["restic", "backup", "--json", *excludes, "."], cwd=data)
        summary = [json.loads(line) for line in step.stdout.splitlines() if '"summary"' in line][-1]
        return step, str(summary["snapshot_id"])

    def _extract(self, ref: str, target: Path, only: str | None) -> Measured:
        include = [f"--include=/{only}"] if only else []
        return self._run(["restic", "restore", ref, "--target", str(target), *include])

    def snapshots(self) -> tuple[Measured, list[Snap]]:
        step = self._run(["restic", "snapshots", "--json"])
        return step, [Snap(s["id"], _parse_time(s["time"])) for s in json.loads(step.stdout)]


class Borg(Peer):
    """borg 1.2 with lz4 and repokey encryption (its docs' usual choice on AES-NI CPUs)."""

    name = "borg"

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.archives: list[str] = []

    def _env(self) -> dict[str, str]:
        return {**os.environ, "BORG_REPO": str(self.repo), "BORG_PASSPHRASE": PASSWORD,
                "BORG_BASE_DIR": str(self.work / "base")}

    def init(self) -> Measured:
        return self._run(["borg", "init", "--encryption=repokey"])

    def _backup(self, data: Path) -> tuple[Measured, str]:
        name = f"snap-{len(self.archives) + 1}"
        excludes = [f"--exclude={d}" for d in PEER_EXCLUDES]
        excludes += [rf"--exclude=re:^{LIVE_DB.replace('.', '[.]')}", "--exclude=sh:**/*.tmp.[0-9]*"]
        step = self._run(["borg", "create", "--compression=lz4", *excludes, f"::{name}", "."], cwd=data, ok=(0, 1))
        self.archives.append(name)
        return step, name

    def _extract(self, ref: str, target: Path, only: str | None) -> Measured:
        name = self.archives[-1] if ref == "latest" else ref
        return self._run(["borg", "extract", f"::{name}", *([only] if only else [])], cwd=target, ok=(0, 1))

    def snapshots(self) -> tuple[Measured, list[Snap]]:
        step = self._run(["borg", "list", "--json"])
        archives = json.loads(step.stdout)["archives"]
        return step, [Snap(a["name"], _parse_time(a["time"])) for a in archives]


def _parse_time(text: str) -> datetime:
    """restic: RFC 3339 with nanoseconds and Z or an offset; borg: local time, no offset."""
    match = re.fullmatch(r"(.*T\d\d:\d\d:\d\d)(\.\d+)?(.*)", text)
    if match is None:
        raise ValueError(f"unexpected snapshot time {text!r}")
    head, fraction, zone = match.groups()
    fraction = (fraction or ".0")[:7].ljust(7, "0")  # microseconds: Python's limit
    moment = datetime.fromisoformat(head + fraction + ("+00:00" if zone == "Z" else zone))
    return moment if moment.tzinfo else moment.astimezone()


def available_peers() -> list[type[Peer]]:
    """restic and borg, installed with apt when missing and possible; otherwise skipped, loudly."""
    missing = [tool for tool in APT_PACKAGES if shutil.which(tool) is None]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        packages = [APT_PACKAGES[t] for t in missing]
        print(f"bench: installing {', '.join(packages)} with apt-get", flush=True)
        if subprocess.run(["apt-get", "install", "-y", *packages], capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update"], capture_output=True)
            subprocess.run(["apt-get", "install", "-y", *packages], capture_output=True)
    peers: list[type[Peer]] = []
    for peer, binary in ((Restic, "restic"), (Borg, "borg")):
        if shutil.which(binary) and shutil.which("sqlite3"):
            peers.append(peer)
        else:
            print(f"bench: NOTICE: {peer.name} skipped ({binary} or sqlite3 not installed and not installable)",
                  flush=True)
    return peers


def tool_versions() -> dict[str, str]:
    out = {}
    for binary, flag in (("restic", "version"), ("borg", "--version"), ("sqlite3", "--version")):
        if shutil.which(binary):
            out[binary] = subprocess.run([binary, flag], capture_output=True, text=True).stdout.strip()
    return out
