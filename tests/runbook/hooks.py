"""The runbook's events and checks, run inside the sandbox where the runbook says
``<!-- runbook: hook NAME -->``.

Events make the situation a section answers: a history with a bad April 10th, a
package whose files are lost, an upgrade that migrated the database and failed. Checks
prove the section's commands did what it promises, from the outside (the files, the
database, the journal), not from clubsnap's own word. A hook prints one JSON object:
``substitute`` maps placeholders of the runbook (``my_package``) to real names.

    python -m tests.runbook.hooks NAME
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from benchmarks.clubgen import one_day
from benchmarks.clubstate import blob_digests, club_state
from engine import configfile
from engine.backend import open_backend
from engine.backends.s3 import S3Settings
from engine.repository import Repository
from engine.restore import select_files
from engine.snapshot import SnapshotOptions, create_snapshot

from . import club, shims

DATA = Path(shims.CLUB_DATA)
SAVED = Path("/root/.runbook")  # what an event recorded, for the check after it
APRIL = [datetime(2026, 4, 8, 22, 0, tzinfo=timezone.utc), datetime(2026, 4, 9, 18, 0, tzinfo=timezone.utc),
         datetime(2026, 4, 10, 9, 0, tzinfo=timezone.utc)]
WAIT_S = 90.0


class HookFailed(Exception):
    pass


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise HookFailed(message)


def _save(name: str, value: Any) -> None:
    SAVED.mkdir(exist_ok=True)
    (SAVED / f"{name}.json").write_text(json.dumps(value, sort_keys=True))


def _saved(name: str) -> Any:
    return json.loads((SAVED / f"{name}.json").read_text())


def _repository() -> Repository:
    """The repository of /etc/clubsnap/config.toml, opened as clubsnap would open it."""
    config = configfile.load(None, os.environ)
    password = Path(str(config.get("password_file"))).read_bytes().rstrip(b"\r\n")
    backend = open_backend(str(config.get("repository")), S3Settings.from_environ(os.environ))
    return Repository.open(backend, Path("/root/.cache/runbook-hooks"), lambda: password)


def _log_events(path: Path) -> list[dict[str, Any]]:
    events = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def _wait_for_snapshot(log: Path) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        done = [e for e in _log_events(log) if e.get("event") == "snapshot"]
        if done:
            _require(all(e.get("ok") for e in done), f"a scheduled snapshot failed: {done}")
            return {"snapshot": done[0]["id"]}
        time.sleep(0.5)
    raise HookFailed(f"no snapshot in {log} within {WAIT_S:.0f} s: {log.read_text()[-2000:] if log.exists() else ''}")


# ---- section 3 and 5: the schedulers -----------------------------------------------------------

def service_took_a_snapshot() -> dict[str, Any]:
    return _wait_for_snapshot(shims.STATE / "clubsnap.service.log")


def offsite_took_a_snapshot() -> dict[str, Any]:
    return _wait_for_snapshot(shims.STATE / "clubsnap@offsite.service.log")


def container_took_a_snapshot() -> dict[str, Any]:
    found = _wait_for_snapshot(shims.STATE / "docker-clubsnap.log")
    snap = _repository().find_snapshot(found["snapshot"])
    _require(snap.record.get("source") == "/data" and snap.record.get("host") == "registry",
             f"the container's snapshot has source {snap.record.get('source')}, host {snap.record.get('host')}")
    return found


def cron_lines_run_clean() -> dict[str, Any]:
    """Each job of /etc/cron.d/clubsnap, as cron runs it: ``sh -c`` with the file's
    variables and cron's own, nothing else; a job that prints anything would mail."""
    env = {"SHELL": "/bin/sh", "HOME": "/root", "LOGNAME": "root", **shims.passthrough()}
    jobs = []
    for line in Path("/etc/cron.d/clubsnap").read_text().splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if re.match(r"[A-Za-z_][A-Za-z0-9_]*\s*=", text):
            key, _, value = text.partition("=")
            env[key.strip()] = value.strip()
            continue
        fields = text.split(None, 6)
        _require(len(fields) == 7 and fields[5] == "root", f"not a cron.d job line (minute hour dom month dow user "
                                                           f"command): {text}")
        done = subprocess.run(["/bin/sh", "-c", fields[6]], env=env, capture_output=True, text=True, cwd="/root",
                              timeout=600)
        _require(done.returncode == 0 and not done.stdout and not done.stderr,
                 f"cron job {fields[6]!r} exited {done.returncode}, and would mail: {done.stdout}{done.stderr}")
        jobs.append(fields[6])
    _require(len(jobs) >= 4, f"expected the snapshot, daily, maintenance and status jobs, found {jobs}")
    return {"jobs": len(jobs)}


# ---- section 6: restore the state of April 9th ------------------------------------------------

def april_history() -> dict[str, Any]:
    """Three snapshots dated April 8th, 9th and 10th, a day of club activity between each:
    the state of the 9th is recorded for the check after the restore."""
    shims.systemctl(["stop", "club"])
    repo = _repository()
    try:
        for day, when in enumerate(APRIL):
            if day:
                one_day(DATA, seed=7, day=100 + day)
            if when == APRIL[1]:
                _save("april-9", club_state(DATA, live=True))
            create_snapshot(repo, SnapshotOptions(source=DATA, host=socket.gethostname(), now=lambda w=when: w))
    finally:
        repo.close()
    _require(club_state(DATA, live=True) != _saved("april-9"), "April 10th changed nothing")
    shims.systemctl(["start", "club"])
    return {"snapshots": [w.isoformat() for w in APRIL]}


def restored_april_9() -> dict[str, Any]:
    _require(club_state(DATA, live=False) == _saved("april-9"), "the data dir is not the state of April 9th")
    return {"state": "april-9"}


# ---- section 7: one package -------------------------------------------------------------------

def lose_a_package() -> dict[str, Any]:
    """Delete the files of a package that existed on April 9th (club keeps running)."""
    april = _saved("april-9")["blobs"]
    names = sorted({key.split("/")[1] for key in april if key.endswith("/artifacts/package.tar.gz")})
    name = next(n for n in names if (DATA / "blobs" / n).is_dir())
    _save("package", {"name": name, "files": blob_digests(DATA)})
    shutil.rmtree(DATA / "blobs" / name)
    return {"substitute": {"my_package": name}}


def package_is_back() -> dict[str, Any]:
    """Every file of the package that the newest snapshot holds is back, byte for byte as
    before the loss (club may have published a version since the snapshot)."""
    saved = _saved("package")
    repo = _repository()
    try:
        repo.sync_index()
        held = {os.fsdecode(f.rel) for f in select_files(repo, repo.find_snapshot("latest"), [f"blobs/{saved['name']}"])}
    finally:
        repo.close()
    now = blob_digests(DATA)
    expected = {k: v for k, v in saved["files"].items() if k in held}
    _require(bool(expected), f"the newest snapshot holds nothing of blobs/{saved['name']}")
    _require(all(now.get(k) == v for k, v in expected.items()),
             f"blobs/{saved['name']} differs from before the loss: {sorted(k for k in expected if now.get(k) != expected[k])}")
    return {"files": len(expected)}


# ---- section 8: a failed upgrade --------------------------------------------------------------

def failed_upgrade() -> dict[str, Any]:
    """The new club boots once (migrating the database to schema 4), then the operator
    goes back to the old club, which supports schema 3."""
    _require(shims.running("club.service") is None, "club runs: the runbook stops it before the upgrade")
    _save("pre-upgrade", club_state(DATA, live=False))
    _require(club.boot(DATA / "db" / "club.db", supports=4) == 4, "the new club did not migrate")
    shims.STATE.mkdir(parents=True, exist_ok=True)
    (shims.STATE / "club-supports").write_text("3")
    return {"schema": 4}


def restored_pre_upgrade() -> dict[str, Any]:
    _require(club_state(DATA, live=False) == _saved("pre-upgrade"), "the data dir is not as before the upgrade")
    return {"state": "pre-upgrade"}


def rolled_back() -> dict[str, Any]:
    """club runs again, on the old schema."""
    conn = sqlite3.connect(f"file:{DATA / 'db' / 'club.db'}?mode=ro", uri=True)
    try:
        version = club.schema_version(conn)
    finally:
        conn.close()
    _require(version == 3, f"schema {version} after the rollback")
    _require(shims.running("club.service") is not None, "club is not running after the rollback")
    return {"schema": version}


HOOKS: dict[str, Callable[[], dict[str, Any]]] = {
    "service-took-a-snapshot": service_took_a_snapshot,
    "container-took-a-snapshot": container_took_a_snapshot,
    "cron-lines-run-clean": cron_lines_run_clean,
    "april-history": april_history,
    "restored-april-9": restored_april_9,
    "lose-a-package": lose_a_package,
    "package-is-back": package_is_back,
    "failed-upgrade": failed_upgrade,
    "restored-pre-upgrade": restored_pre_upgrade,
    "offsite-took-a-snapshot": offsite_took_a_snapshot,
    "rolled-back": rolled_back,
}


def main() -> int:
    try:
        print(json.dumps(HOOKS[sys.argv[1]]()))
    except (HookFailed, shims.Failed) as exc:
        print(f"hook {sys.argv[1]}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
