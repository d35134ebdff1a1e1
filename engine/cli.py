"""The ``clubsnap`` command: parse, build options, call one engine function, format.

This is the only module that reads the environment, prints, or knows about terminals.
Every ``EngineError`` becomes one line on stderr and its exit code (docs/cli.md).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import shlex
import signal
import socket
import sqlite3
import sys
import threading
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from . import errors
from .backend import Backend, open_backend
from .backends.s3 import S3Backend, S3Settings, is_bucket_url
from .clubcheck import ClubReport, check_club
from .diff import diff_trees
from . import keys, locks
from . import configfile, scheduler
from .configfile import ConfigFile
from .health import Status, repository_status, span, verify_snapshot
from .forget import (
    DEFAULT_GROUP_BY, Group, StoredPolicy, check_group_by, load_policy, plan_forget, remove_snapshots, save_policy,
    snapshots_by_ids, zone_named,
)
from .prune import PruneOptions, PruneReport, prune
from . import repair
from .retention import PERIODS, Duration, Policy
from .crypto import SCHEME
from .format import KEYS_PREFIX, display
from .repository import Repository, SnapshotFilter, SnapshotInfo
from .restore import apply_restore, check_databases, plan_restore
from .restore_bucket import apply_bucket_restore, plan_bucket_restore
from .snapshot import Progress, SnapshotOptions, create_snapshot
from .stats import repository_stats
from .timespec import parse_time
from .verify import check


PLAN_LINES = 40  # a dry run's text shows this many actions; --json shows all
M_ARENA_MAX = -8  # mallopt parameter (glibc malloc.h)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _config(args: argparse.Namespace) -> ConfigFile:
    """The configuration file, read once per command."""
    if getattr(args, "config_file", None) is None:
        args.config_file = configfile.load(args.config, os.environ)
    loaded: ConfigFile = args.config_file
    return loaded


def _setting(args: argparse.Namespace, option: str, variable: str, key: str) -> tuple[Any, str]:
    """A setting and where it came from: the command line, the environment, the file."""
    if getattr(args, option, None):
        return getattr(args, option), f"--{option.replace('_', '-')}"
    if os.environ.get(variable):
        return os.environ[variable], f"${variable}"
    config = _config(args)
    if config.get(key) is not None:
        return config.get(key), str(config.path)
    return None, "default"


def _cache_root(args: argparse.Namespace) -> Path:
    given, _ = _setting(args, "cache_dir", "CLUBSNAP_CACHE_DIR", "cache_dir")
    if given:
        return Path(given)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "clubsnap"


def _repo_url(args: argparse.Namespace) -> str:
    url, _ = _setting(args, "repo", "CLUBSNAP_REPO", "repository")
    if not url:
        raise errors.UsageError("no repository given: use --repo, set CLUBSNAP_REPO, or set repository in the "
                                "configuration file")
    return str(url)


def _backend(url: str) -> Backend:
    return open_backend(url, S3Settings.from_environ(os.environ))


def _read_password(args: argparse.Namespace, new: bool = False, confirm: bool = False) -> bytes:
    """A password from a file, the environment or the terminal; never from an argument
    (it would show in ``ps``). ``new``: the one ``key add``/``passwd`` sets (its own
    sources); ``confirm``: asked twice on a terminal (a password being set)."""
    prefix = "CLUBSNAP_NEW_PASSWORD" if new else "CLUBSNAP_PASSWORD"
    given = getattr(args, "new_password_file", None) if new else args.password_file
    path = given or os.environ.get(f"{prefix}_FILE")
    if not path and not new and not os.environb.get(prefix.encode()):
        path = _config(args).get("password_file")
    if path:
        try:
            with open(path, "rb") as handle:
                secret = handle.read().rstrip(b"\r\n")
        except OSError as exc:
            raise errors.UsageError(f"cannot read the password file {path}: {exc.strerror}") from exc
    elif os.environb.get(prefix.encode()):
        secret = os.environb[prefix.encode()]  # bytes: a password need not be UTF-8
    elif sys.stdin.isatty():
        import getpass

        what = "new password" if new else "password"
        secret = getpass.getpass(f"{what} for {_repo_url(args)}: ").encode()
        if (new or confirm) and getpass.getpass("again: ").encode() != secret:
            raise errors.UsageError("the passwords differ")
    else:
        option = "--new-password-file" if new else "--password-file"
        raise errors.UsageError(f"a {'new ' if new else ''}password is needed: use {option}, or set {prefix}_FILE "
                                f"or {prefix}")
    if not secret:
        raise errors.UsageError("the password is empty")
    return secret


def _kdf_cost(args: argparse.Namespace) -> int | None:
    text = args.kdf_cost or os.environ.get("CLUBSNAP_KDF_COST")
    if not text:
        return None  # calibrated to ~0.5 s on this machine
    try:
        return int(text)
    except ValueError as exc:
        raise errors.UsageError(f"--kdf-cost takes log2 of scrypt's N, like 17, not {text!r}") from exc


def _open(args: argparse.Namespace) -> Repository:
    repo = Repository.open(_backend(_repo_url(args)), _cache_root(args), lambda: _read_password(args))
    args.repository = repo  # for the request counts reported after the command
    return repo


class _Reporter:
    """Progress on a terminal (rate, ETA), silence otherwise: cron mails stay short."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.started = time.monotonic()
        self.last = 0.0

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < 0.2:
            return
        self.last = now
        sys.stderr.write("\r\x1b[K" + text)
        sys.stderr.flush()

    def rate(self, done: int, total: int) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        speed = done / elapsed
        eta = (total - done) / speed if speed > 0 and total > done else 0
        return f"{done / 1e6:,.1f}/{total / 1e6:,.1f} MB  {speed / 1e6:,.1f} MB/s  ETA {eta:,.0f}s"

    def snapshot(self, p: Progress) -> None:
        if self.enabled:
            self.line(f"files {p.files_done}/{p.files_total}  {self.rate(p.bytes_done, p.bytes_total)}")

    def bytes(self, done: int, total: int) -> None:
        if self.enabled:  # called per chunk placed: a database restore places one per page
            self.line(self.rate(done, total))

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    repo = getattr(args, "repository", None)
    if isinstance(data, dict) and repo is not None and "requests" not in data:
        data = {**data, "requests": repo.backend.snapshot()}  # request counts are the bill
    try:
        print(json.dumps(data, indent=2, default=str) if args.json else text)
    except OSError as exc:  # the reader left, or the disk is full: the command still ends as it would
        _discard_stdout()
        args.output_error = exc


def _report_passed_over(args: argparse.Namespace) -> None:
    """One warning line for each damaged index object or snapshot record a command passed
    over (``check`` reports them as errors of its own)."""
    repo = getattr(args, "repository", None)
    if repo is None or args.command == "check":
        return
    with contextlib.suppress(OSError):
        for reason in repo.damaged_objects.values():
            print(f"warning: {reason}", file=sys.stderr)


def _report_requests(args: argparse.Namespace) -> None:
    """``--requests``: one line on stderr with what the command cost the backend."""
    repo = getattr(args, "repository", None)
    if not args.requests or repo is None:
        return
    counts = repo.backend.snapshot()
    calls = ", ".join(f"{counts[name]} {name.upper()}" for name in ("put", "get", "head", "list", "delete"))
    retries = f" ({counts['retries']} retried)" if counts.get("retries") else ""
    print(f"requests: {calls}{retries}; {counts['bytes_written'] / 1e6:,.2f} MB up, "
          f"{counts['bytes_read'] / 1e6:,.2f} MB down", file=sys.stderr)


# ---- commands -------------------------------------------------------------------------------

def cmd_init(args: argparse.Namespace) -> int:
    encrypted = args.encryption != "none"
    password = _read_password(args, confirm=True) if encrypted else None
    repo = Repository.init(_backend(_repo_url(args)), _cache_root(args), _now, password=password,
                           kdf_log2_n=_kdf_cost(args), host=socket.gethostname())
    args.repository = repo
    slot = repo.key_slot
    _emit(args, {"id": repo.config.repo_id, "repository": repo.backend.location, "encryption": repo.config.encryption,
                 "key_slot": slot.slot_id if slot else None},
          f"created clubsnap repository {repo.config.repo_id[:8]} at {repo.backend.location}\n"
          + (f"encryption: {repo.config.encryption}, key slot {slot.slot_id} (scrypt N=2^{slot.log2_n}); "
             f"without a password the repository cannot be read: keep one safe" if slot else
             "encryption: NONE. Anyone who can read this repository reads every database row and package, and "
             "changes go undetected until check. Use it only on storage that is already encrypted and trusted."))
    return 0


def cmd_key(args: argparse.Namespace) -> int:
    repo = _open(args)
    if repo.key_slot is None:
        raise errors.UsageError(f"{repo.backend.location} is not encrypted: it has no keys")
    backend, current = repo.backend, repo.key_slot
    if args.key_command == "list":
        slots = keys.list_slots(backend)
        rows = [{"id": s.slot_id, "current": s.slot_id == current.slot_id, "created": s.created, "host": s.host,
                 "kdf": f"DAMAGED: {s.damaged}" if s.damaged else
                 f"scrypt N=2^{s.log2_n} r={s.record.get('r')} p={s.record.get('p')}"} for s in slots]
        _emit(args, {"slots": rows}, "\n".join(f"{'*' if r['current'] else ' '} {r['id']}  {r['created']}  "
                                                 f"{r['host']}  {r['kdf']}" for r in rows))
        return 0
    if args.key_command == "remove":
        removed = keys.remove_slot(backend, args.slot, current)
        _emit(args, {"removed": removed.slot_id}, f"removed key slot {removed.slot_id}")
        return 0
    assert repo.cipher.master_key is not None
    added = keys.add_slot(backend, repo.cipher.master_key, _read_password(args, new=True),
                          _kdf_cost(args) or keys.calibrate(), socket.gethostname())
    if args.key_command == "passwd":  # a new slot first, then the old one goes: never no slot
        backend.delete(KEYS_PREFIX + current.slot_id)
        _emit(args, {"added": added.slot_id, "removed": current.slot_id},
              f"password changed: key slot {added.slot_id} added, {current.slot_id} removed")
        return 0
    _emit(args, {"added": added.slot_id}, f"added key slot {added.slot_id}")
    return 0


def _data_dir(args: argparse.Namespace) -> Path:
    data_dir = args.data_dir or _config(args).get("data_dir")
    if not data_dir:
        raise errors.UsageError("no data directory given: name it, or set data_dir in the configuration file")
    return Path(data_dir)


def _include_logs(args: argparse.Namespace) -> bool:
    return bool(args.include_logs or _config(args).get("include_logs"))


def cmd_snapshot(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    repo = _open(args)
    reporter = _Reporter(sys.stderr.isatty() and not args.json)
    blob_store = None
    if args.blobs:
        if not is_bucket_url(args.blobs):
            raise errors.UsageError(f"--blobs takes a bucket URL (s3://bucket[/prefix] or gs://…), not {args.blobs!r}")
        blob_store = _blob_bucket(args.blobs, repo, "--blobs")
    options = SnapshotOptions(source=data_dir, host=args.host or socket.gethostname(),
                              now=_now, tags=args.tag or [], verify=args.verify, blob_store=blob_store,
                              include_logs=_include_logs(args), progress=reporter.snapshot)
    result = create_snapshot(repo, options)
    reporter.done()
    for problem in result.errors + result.warnings:
        print(f"warning: {problem}", file=sys.stderr)
    record = result.info.record
    lost = set(record.get("lost", []))
    for path in record.get("carried_forward", []):
        if path not in lost:  # a lost blob has had its warning
            print(f"note: {path} was deleted during the scan; carried forward from the parent snapshot",
                  file=sys.stderr)
    verified = record.get("verified")
    s = result.stats
    _emit(args, {"id": result.info.id.hex(), "time": result.info.time.isoformat(),
                 "partial": result.partial, "errors": result.errors, "stats": s,
                 "carried_forward": record.get("carried_forward", []), "dangling": record.get("dangling", []),
                 "lost": record.get("lost", []), "lost_count": record.get("lost_count", 0),
                 "suspect_databases": record.get("suspect_databases", []), "verified": verified},
          f"snapshot {result.info.id.short()} saved at {result.info.time.astimezone():%Y-%m-%d %H:%M:%S %Z}"
          f"{' (PARTIAL: some files were unreadable)' if result.partial else ''}\n"
          f"files: {s['files']} ({s['files_new']} new, {s['files_changed']} changed, "
          f"{s['files_unmodified']} unmodified), read {s['bytes_read'] / 1e6:,.1f} MB, "
          f"added {s['bytes_added'] / 1e6:,.2f} MB to the repository in {s['duration_s']:.1f}s"
          + (f"\nverify: {'consistent' if verified['consistent'] else 'INCONSISTENT'}, {verified['checked']} "
             f"blobs named by club.db checked" + "".join(f"\n  {p}" for p in verified["problems"])
             if verified else ""))
    if verified and not verified["consistent"]:
        raise errors.CheckFailed(f"snapshot {result.info.id.short()} was saved, but {verified['problem_count']} "
                                 f"blob(s) club.db names are missing or wrong in it")
    return errors.EXIT_PARTIAL if result.partial else 0


def _filter(args: argparse.Namespace) -> SnapshotFilter | None:
    """``--host``, ``--path`` and ``--tag`` of the commands that pick a snapshot."""
    if not (args.host or args.path or args.tag):
        return None
    path = display(os.fsencode(Path(args.path).absolute())) if args.path else None
    return SnapshotFilter(args.host, path, tuple(args.tag or ()))


def cmd_snapshots(args: argparse.Namespace) -> int:
    select = _filter(args)
    snaps = _open(args).snapshots(select)
    rows = [{"id": s.id.hex(), "short_id": s.id.short(), "time": s.time.isoformat(),
             "host": s.record.get("host"), "source": s.record.get("source"), "tags": s.tags,
             "parent": s.record["parent"].hex() if s.record.get("parent") else None,
             "partial": s.record.get("partial", False),
             "size": sum(t["bytes"] for t in s.record.get("tiers", {}).values()),
             "bytes_added": s.record.get("stats", {}).get("bytes_added")} for s in snaps]
    lines = [f"{'ID':8}  {'Time (local)':19}  {'Host':12}  {'Size':>10}  {'Added':>10}  Tags"]
    for row, snap in zip(rows, snaps):
        lines.append(f"{row['short_id']}  {snap.time.astimezone():%Y-%m-%d %H:%M:%S}  {str(row['host'])[:12]:12}  "
                     f"{row['size'] / 1e6:>8.1f}MB  {(row['bytes_added'] or 0) / 1e6:>8.2f}MB  "
                     f"{','.join(row['tags'])}{' PARTIAL' if row['partial'] else ''}")
    lines.append(f"{len(rows)} snapshot(s)")
    _emit(args, rows, "\n".join(lines))
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    if bool(args.snapshot) == bool(args.at):
        raise errors.UsageError("give a snapshot id, 'latest', or --at TIME (exactly one)")
    repo = _open(args)
    if args.at:
        snap = repo.snapshot_at(parse_time(args.at, _now()), _filter(args))
    else:
        snap = repo.find_snapshot(args.snapshot, _filter(args))
    with repo.read_lock() or contextlib.nullcontext():  # a prune then keeps what this may read
        return _restore(args, repo, snap)


def _restore(args: argparse.Namespace, repo: Repository, snap: SnapshotInfo) -> int:
    if is_bucket_url(args.target):
        return _restore_into_bucket(args, repo, snap)
    plan = plan_restore(repo, snap, Path(args.target), args.include, args.delete)
    summary = plan.summary()
    if args.dry_run:
        _emit(args, {**summary, "write": [os.fsdecode(f.rel) for f in plan.to_write],
                     "delete": [os.fsdecode(p) for p in plan.deletions]}, _plan_text(plan, summary))
        return 0
    reporter = _Reporter(sys.stderr.isatty() and not args.json)
    result = apply_restore(repo, plan, allow_in_use=args.force, progress=reporter.bytes)
    reporter.done()
    db_checks = {} if args.db_check == "none" else check_databases(plan, thorough=args.db_check == "integrity")
    data = {**summary, "files_written": result.files_written, "bytes_fetched": result.bytes_fetched,
            # everything this command read from the repository: index, record, trees, page maps, data
            "bytes_read_total": repo.backend.bytes_read,
            "bytes_reused": result.bytes_reused, "deleted": result.deleted, "moved_aside": result.moved_aside,
            "db_checks": db_checks}
    _emit(args, data, f"restored snapshot {snap.id.short()} ({snap.time.astimezone():%Y-%m-%d %H:%M:%S %Z}) "
                      f"into {plan.target}\nfiles: {result.files_written} written, "
                      f"{summary['files_unchanged']} already identical, {result.deleted} deleted; "
                      f"fetched {result.bytes_fetched / 1e6:,.2f} MB, reused {result.bytes_reused / 1e6:,.2f} MB"
                      + "".join(f"\nmoved aside: {p}" for p in result.moved_aside)
                      + "".join(f"\n{args.db_check}_check {p}: {r}" for p, r in db_checks.items()))
    bad = [p for p, r in db_checks.items() if r != "ok"]
    if bad:
        raise errors.CheckFailed(f"restored {bad[0]} fails its {args.db_check}_check: see the report above")
    return 0


def _blob_bucket(url: str, repo: Repository, option: str) -> S3Backend:
    """club's blob bucket (``CLUBSNAP_BLOBS_S3_*`` settings first), refused when it holds
    the repository or lies inside it: a snapshot would back the repository up into
    itself, and a restore with --delete would delete it."""
    bucket = S3Backend(url, S3Settings.from_environ(os.environ, "CLUBSNAP_BLOBS_S3_"))
    inner = getattr(repo.backend, "inner", repo.backend)
    if isinstance(inner, S3Backend) and bucket.overlaps(inner):
        raise errors.UsageError(f"{option} {bucket.url} overlaps the repository {inner.url}: use another bucket "
                                f"or a prefix beside the repository's")
    return bucket


def _restore_into_bucket(args: argparse.Namespace, repo: Repository, snap: SnapshotInfo) -> int:
    target = _blob_bucket(args.target, repo, "--target")
    plan = plan_bucket_restore(repo, snap, target, args.include, args.delete)
    summary = plan.summary()
    not_restored = (f"\nnot restored (a bucket holds club's blobs only; restore these with --target DIR "
                    f"--include {plan.skipped[0]}): {', '.join(plan.skipped)}" if plan.skipped else "")
    if args.dry_run:
        _emit(args, {**summary, "write": [key for key, _ in plan.uploads], "delete": plan.deletions},
              f"plan: restore the blobs of snapshot {snap.id.short()} into {plan.target}\n"
              f"{summary['objects_to_write']} object(s) to write ({summary['bytes_to_upload']:,} bytes), "
              f"{plan.unchanged} already there, {len(plan.deletions)} to delete" + not_restored)
        return 0
    reporter = _Reporter(sys.stderr.isatty() and not args.json)
    result = apply_bucket_restore(repo, plan, target, progress=reporter.bytes)
    reporter.done()
    _emit(args, {**summary, "objects_written": result.objects_written, "bytes_uploaded": result.bytes_uploaded,
                 "deleted": result.deleted, "target_requests": target.request_counts()},
          f"restored the blobs of snapshot {snap.id.short()} ({snap.time.astimezone():%Y-%m-%d %H:%M:%S %Z}) "
          f"into {plan.target}\nobjects: {result.objects_written} written ({result.bytes_uploaded / 1e6:,.2f} MB), "
          f"{plan.unchanged} already there, {result.deleted} deleted" + not_restored)
    return 0


def _plan_text(plan: Any, summary: dict[str, Any]) -> str:
    lines = [f"plan: restore snapshot {plan.snapshot.id.short()} ({plan.snapshot.time.astimezone():%Y-%m-%d %H:%M:%S %Z}) "
             f"into {plan.target}"]
    actions = [f"  write   {os.fsdecode(f.rel)} ({f.entry['size']:,} bytes)" for f in plan.to_write]
    actions += [f"  delete  {os.fsdecode(p)}" for p in plan.deletions]
    lines += actions[:PLAN_LINES]
    if len(actions) > PLAN_LINES:
        lines.append(f"  … and {len(actions) - PLAN_LINES} more (--json lists every one)")
    lines.append(f"{summary['files_to_write']} file(s) to write, {summary['files_unchanged']} already identical, "
                 f"{summary['deletions']} to delete; {summary['bytes_to_fetch']:,} bytes to fetch, "
                 f"{summary['bytes_reused']:,} bytes reused from the target")
    return "\n".join(lines)


def cmd_diff(args: argparse.Namespace) -> int:
    repo = _open(args)
    old, new = repo.find_snapshot(args.a), repo.find_snapshot(args.b)
    changes = list(diff_trees(repo, old.tree, new.tree))
    _emit(args, [{"change": c.kind, "path": os.fsdecode(c.path), "size_delta": c.size_delta} for c in changes],
          "\n".join(f"{c.kind}  {os.fsdecode(c.path)}" for c in changes) + f"\n{len(changes)} change(s)")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    repo = _open(args)
    subset = _percent(args.read_data_subset) if args.read_data_subset else None
    reporter = _Reporter(sys.stderr.isatty() and not args.json)
    with repo.read_lock() or contextlib.nullcontext():
        report = check(repo, read_data=args.read_data, subset=subset,
                       progress=lambda done, total: reporter.line(f"packs {done}/{total}"))
    reporter.done()
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    text = "\n".join(f"error: {e}" for e in report.errors) + ("\n" if report.errors else "")
    text += (f"{'no errors' if report.ok else f'{len(report.errors)} error(s)'}: {report.snapshots} snapshots, "
             f"{report.trees} trees, {report.packs} packs, {report.packs_read} packs read back")
    _emit(args, {"ok": report.ok, "errors": report.errors, "warnings": report.warnings,
                 "snapshots": report.snapshots, "packs": report.packs, "packs_read": report.packs_read}, text)
    if not report.ok:
        raise errors.CheckFailed(f"check found {len(report.errors)} error(s) in {repo.backend.location}")
    return 0


def _percent(text: str) -> float:
    try:
        value = float(text.rstrip("%")) / 100
    except ValueError as exc:
        raise errors.UsageError(f"--read-data-subset takes a percentage like 10%, not {text!r}") from exc
    if not 0 < value <= 1:
        raise errors.UsageError("--read-data-subset must be between 0% and 100%")
    return value


def cmd_verify(args: argparse.Namespace) -> int:
    if sum(map(bool, (args.snapshot, args.at, args.data))) != 1:
        raise errors.UsageError("give a snapshot id, 'latest', --at TIME or --data DIR (exactly one)")
    if args.data:
        return _report_club(args, check_club(Path(args.data)), args.data)
    repo = _open(args)
    select = _filter(args)
    snap = repo.snapshot_at(parse_time(args.at, _now()), select) if args.at else repo.find_snapshot(args.snapshot, select)
    return _report_club(args, verify_snapshot(repo, snap, args.temp_dir, _now()), f"snapshot {snap.id.short()}")


def _report_club(args: argparse.Namespace, report: ClubReport, what: str) -> int:
    text = "\n".join([f"missing: {m}" for m in report.missing] + [f"database: {d}" for d in report.database]
                     + [f"orphan: {o}" for o in report.orphans])
    summary = (f"{what}: {'consistent' if report.ok else 'INCONSISTENT'}: {report.checked.get('versions', 0)} "
               f"versions, {report.checked.get('dartdoc', 0)} dartdoc pairs checked; {len(report.missing)} missing "
               f"or wrong, {len(report.database)} database problem(s), {len(report.orphans)} orphan blob(s)")
    _emit(args, {"ok": report.ok, "missing": report.missing, "database": report.database,
                 "orphans": report.orphans, "checked": report.checked}, (text + "\n" if text else "") + summary)
    if not report.ok:
        raise errors.CheckFailed(f"{what} is not consistent: see the report above")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    repo = _open(args)
    max_age, max_verify_age = _bound(args.max_age), _bound(args.max_verify_age)
    select = _filter(args)
    status = repository_status(repo, _now(), max_age, select, max_verify_age)
    newest = status.newest
    size = sum(t["bytes"] for t in newest.record.get("tiers", {}).values()) if newest else 0
    data = {"repository": repo.backend.location, "snapshots": status.snapshots, "healthy": status.healthy,
            "problems": status.problems, "max_age_s": max_age.total_seconds() if max_age else None,
            "max_verify_age_s": max_verify_age.total_seconds() if max_verify_age else None,
            "filter": None if select is None else {"host": select.host, "source": select.source},
            "newest": None if newest is None else {
                "id": newest.id.hex(), "time": newest.time.isoformat(), "age_s": round(status.age.total_seconds())
                if status.age is not None else None, "size": size,
                "partial": bool(newest.record.get("partial")),
                "consistent": newest.record.get("verified", {}).get("consistent")},
            "last_verify": status.verification, "last_check": status.check,
            "last_verify_age_s": round(status.verify_age.total_seconds()) if status.verify_age is not None else None}
    _emit(args, data, _status_text(repo, status, size, select))
    if not status.healthy:
        raise errors.Unhealthy("; ".join(status.problems))
    return 0


def _bound(text: str | None) -> timedelta | None:
    """A ``status`` bound (90s, 30m, 1h, 2d), or None when not given."""
    return timedelta(seconds=configfile.seconds(text)) if text else None


def _status_text(repo: Repository, status: Status, size: int, select: SnapshotFilter | None) -> str:
    newest, verification = status.newest, status.verification
    scope = f" {select.describe()}" if select else ""
    lines = [f"repository: {repo.backend.location} ({status.snapshots} snapshot(s){scope})"]
    if newest is not None and status.age is not None:
        lines.append(f"newest snapshot: {newest.id.short()} at {newest.time.astimezone():%Y-%m-%d %H:%M:%S %Z} "
                     f"({span(status.age)} ago), {size / 1e6:,.1f} MB"
                     f"{', PARTIAL' if newest.record.get('partial') else ''}")
    else:
        lines.append("newest snapshot: none")
    if verification is not None:
        ago = f" ({span(status.verify_age)} ago)" if status.verify_age is not None else ""
        lines.append(f"last verify: {verification.get('time')}{ago} of snapshot "
                     f"{str(verification.get('snapshot'))[:8]}: "
                     f"{'consistent' if verification.get('ok') else 'INCONSISTENT'}")
    else:
        lines.append(f"last verify: never (run 'clubsnap verify latest{_filter_options(select)}')")
    check = status.check
    if check is not None:
        lines.append(f"last check: {check.get('time')}{' with data read back' if check.get('read_data') else ''}: "
                     f"{'no errors' if check.get('ok') else str(check.get('error_count')) + ' error(s)'}")
    lines.append("OK" if status.healthy else "UNHEALTHY: " + "; ".join(status.problems))
    return "\n".join(lines)


def _filter_options(select: SnapshotFilter | None) -> str:
    """The options that select what ``select`` does, for a command to suggest."""
    if select is None:
        return ""
    words = (["--host", select.host] if select.host else []) + (["--path", select.source] if select.source else [])
    for tag in select.tags:
        words += ["--tag", tag]
    return "".join(f" {shlex.quote(word)}" for word in words)


def cmd_stats(args: argparse.Namespace) -> int:
    stats = repository_stats(_open(args))
    _emit(args, stats, "\n".join(f"{k}: {v}" for k, v in stats.items()))
    return 0


def cmd_repair(args: argparse.Namespace) -> int:
    repo = _open(args)
    if args.repair_command == "index":
        report = repair.repair_index(repo, dry_run=args.dry_run)
    elif args.repair_command == "packs":
        report = repair.repair_packs(repo, args.pack_ids, dry_run=args.dry_run)
    else:
        report = repair.repair_snapshots(repo, dry_run=args.dry_run)
    _emit(args, report.to_dict(), _repair_text(args.repair_command, report))
    return 0


def _repair_text(what: str, report: repair.RepairReport) -> str:
    would = "would " if report.dry_run else ""
    lines = [f"warning: {w}" for w in report.warnings]
    if what == "index":
        lines += [f"damaged, passed over: {key}" for key in report.damaged_index_objects]
        lines += [f"dropped (missing from storage): {key}" for key in report.packs_dropped]
        lines += [f"cannot be indexed (no index names it, trailer damaged): {p}" for p in report.packs_unreadable]
        lines.append(f"repair index: {len(report.damaged_index_objects)} damaged index object(s), "
                     f"{report.packs_from_trailers} pack(s) {'would be ' if report.dry_run else ''}indexed from "
                     f"their trailers, {len(report.packs_dropped)} missing pack(s) "
                     f"{'would be ' if report.dry_run else ''}dropped"
                     + ("" if report.dry_run else f"; wrote {report.index_objects_written} index object(s), "
                                                  f"deleted {report.index_objects_deleted}"))
    elif what == "packs":
        if not report.packs_repaired:
            return "\n".join(lines + ["repair packs: no damaged pack is known (run 'clubsnap check --read-data')"])
        lines += [f"damaged: {key}" for key in report.packs_repaired]
        lines += [f"unrecoverable: {name}" for name in report.unrecoverable[:repair.MAX_LISTED]]
        if len(report.unrecoverable) > repair.MAX_LISTED:
            lines.append(f"  … and {len(report.unrecoverable) - repair.MAX_LISTED} more (--json lists every one)")
        lines.append(f"repair packs: {len(report.packs_repaired)} pack(s): {report.blobs_salvaged} blob(s) "
                     f"{'would be ' if report.dry_run else ''}salvaged into new packs, {report.blobs_lost} lost"
                     + ("" if report.dry_run else f"; {report.packs_deleted} damaged pack(s) deleted"
                        + (f", {report.packs_pending} left for the next prune (processes were running)"
                           if report.packs_pending else "")))
        if report.unrecoverable:
            lines.append(f"{len(report.unrecoverable)} file(s) cannot be restored from any copy: "
                         f"'clubsnap repair snapshots' replaces their snapshots with ones that lack them")
    else:
        lines += [f"{would}remove {key}" for key in report.records_removed]
        lines += [f"{would}put back from a summary: {key}" for key in report.records_recovered]
        for entry in report.records_replaced:
            lines.append(f"{would}replace {entry['id'][:8]}{' by ' + entry['new_id'][:8] if 'new_id' in entry else ''} "
                         f"({entry['time']}) without {entry['removed_count']} file(s): "
                         + ", ".join(entry["removed"][:10]) + (" …" if entry["removed_count"] > 10 else ""))
        lines.append(f"repair snapshots: {len(report.records_removed)} record(s) {would}removed, "
                     f"{len(report.records_recovered)} {would}put back, {len(report.records_replaced)} "
                     f"{would}replaced")
    return "\n".join(lines)


def cmd_cache(args: argparse.Namespace) -> int:
    repo = _open(args)
    repo.catalog.clear_index()
    repo.catalog.remove_snapshots(repo.catalog.snapshot_keys())
    repo.sync_index()
    recovered = 0
    if args.from_packs:  # it writes index objects: under a lock, as a snapshot does (format §10)
        with repo.lock("snapshot") as lock:
            repo.held_lock = lock
            recovered = repo.rebuild_index_from_packs()
    count = len(repo.snapshots())
    _emit(args, {"snapshots": count, "packs_reindexed": recovered},
          f"catalog rebuilt from {repo.backend.location}: {count} snapshot(s)"
          + (f", {recovered} unindexed pack(s) indexed from their trailers" if args.from_packs else ""))
    return 0


def _policy_from_args(args: argparse.Namespace) -> StoredPolicy | None:
    """The policy the --keep-* options give, or None if they give none."""
    policy = Policy(last=args.keep_last or 0, hourly=args.keep_hourly or 0, daily=args.keep_daily or 0,
                    weekly=args.keep_weekly or 0, monthly=args.keep_monthly or 0, yearly=args.keep_yearly or 0,
                    within=Duration.parse(args.keep_within) if args.keep_within else None,
                    within_periods={p: Duration.parse(getattr(args, f"keep_within_{p}")) for p in PERIODS
                                    if getattr(args, f"keep_within_{p}")},
                    tags=tuple(args.keep_tag or ()))
    if policy.empty():
        return None
    group_by = DEFAULT_GROUP_BY if args.group_by is None else tuple(f for f in args.group_by.split(",") if f)
    zone = "UTC" if args.utc else args.timezone
    zone_named(zone)  # refuse an unknown zone now
    return StoredPolicy(policy, check_group_by(group_by), zone)


def _decision_lines(group: Group, zone: Any) -> list[str]:
    header = ", ".join(f"{k} {v if k != 'tags' else ','.join(v) or '-'}" for k, v in group.key.items())
    kept = sum(d.keep for d in group.decisions)
    lines = [f"{header or 'all snapshots'}: keep {kept}, remove {len(group.decisions) - kept}"]
    for decision in group.decisions:
        snap = group.snapshots[decision.candidate.key]
        moment = snap.time.astimezone(zone) if zone is not None else snap.time.astimezone()
        lines.append(f"  {'keep  ' if decision.keep else 'remove'}  {snap.id.short()}  "
                     f"{moment:%Y-%m-%d %H:%M:%S %Z}  {'; '.join(decision.reasons)}")
    return lines


def cmd_forget(args: argparse.Namespace) -> int:
    prune_options = _prune_options(args)  # refuse bad prune options before forgetting anything
    repo = _open(args)
    snapshots = repo.snapshots()
    stored = _policy_from_args(args)
    if args.snapshot_ids:
        if stored is not None:
            raise errors.UsageError("give snapshot ids or --keep-* rules, not both")
        doomed = snapshots_by_ids(snapshots + repo.unreadable_snapshots(), args.snapshot_ids)
        lines, groups = [f"remove  {s.id.short()}  {s.time.astimezone():%Y-%m-%d %H:%M:%S %Z}" for s in doomed], []
    else:
        stored = stored or _config(args).retention or load_policy(repo)
        if stored is None:
            raise errors.UsageError("no retention policy: give --keep-* rules, set [retention] in the configuration "
                                    "file, or store one with 'clubsnap policy set'")
        groups = plan_forget(snapshots, stored)
        doomed = [snap for group in groups for snap in group.removed]
        lines = [line for group in groups for line in _decision_lines(group, stored.zone())]
    if not args.dry_run:
        remove_snapshots(repo, doomed)
    verb = "would remove" if args.dry_run else "removed"
    summary = {"dry_run": args.dry_run, "removed": [s.id.hex() for s in doomed],
               "kept": len(snapshots) - len(doomed),
               "groups": [{"group": {k: list(v) if isinstance(v, tuple) else v for k, v in g.key.items()},
                           "decisions": [{"id": g.snapshots[d.candidate.key].id.hex(),
                                          "time": d.candidate.time.isoformat(), "keep": d.keep,
                                          "reasons": d.reasons} for d in g.decisions]} for g in groups]}
    text = "\n".join(lines + [f"{verb} {len(doomed)} of {len(snapshots)} snapshot(s)"
                              + (f" (policy: {stored.policy.describe()})" if stored else "")])
    if args.prune and not args.dry_run:
        report = prune(repo, replace(prune_options, dry_run=False))
        summary["prune"] = report.to_dict()
        text += "\n" + _prune_text(report)
    _emit(args, summary, text)
    return 0


def _prune_options(args: argparse.Namespace) -> PruneOptions:
    reporter = _Reporter(sys.stderr.isatty() and not args.json)
    return PruneOptions(max_unused=_max_unused(args.max_unused), dry_run=getattr(args, "dry_run", False),
                        wait_s=configfile.seconds(args.wait), progress=reporter.line)


def _max_unused(text: str) -> float:
    if text.strip().lower() == "unlimited":
        return float("inf")
    try:
        value = float(text.strip().rstrip("%")) / 100
    except ValueError as exc:
        raise errors.UsageError(f"--max-unused takes a percentage like 5% or 'unlimited', not {text!r}") from exc
    if value < 0:
        raise errors.UsageError("--max-unused cannot be negative")
    return value


def _prune_text(report: PruneReport) -> str:
    mb = 1e6
    lines = [f"{'would free' if report.dry_run else 'prune'}: {report.snapshots} snapshot(s) use "
             f"{report.used_blobs} blobs ({report.used_bytes / mb:,.1f} MB) in {report.packs} pack(s) "
             f"({report.pack_bytes / mb:,.1f} MB)",
             f"  unused packs: {report.unused_packs} ({report.unused_bytes / mb:,.1f} MB)",
             f"  packs to repack: {report.repack_packs} ({report.repack_bytes / mb:,.1f} MB, "
             f"{report.repack_used_bytes / mb:,.1f} MB of it still used; {report.repack_small_packs} small "
             f"packs merged)",
             f"  packs no index names (interrupted runs): {report.unindexed_packs} "
             f"({report.unindexed_bytes / mb:,.1f} MB)",
             f"  condemned by an earlier prune: {report.swept_earlier_packs} deleted now "
             f"({report.swept_earlier_bytes / mb:,.1f} MB), {report.rescued_packs} re-indexed",
             f"  unused data left in kept packs: {report.garbage_left_bytes / mb:,.1f} MB"]
    if report.dry_run:
        lines.append(f"would free {report.predicted_freed_bytes / mb:,.1f} MB")
    else:
        lines.append(f"freed {report.freed_bytes / mb:,.1f} MB ({report.packs_deleted} pack(s) deleted; "
                     f"predicted {report.predicted_freed_bytes / mb:,.1f} MB); index objects "
                     f"{report.index_objects_before} -> {report.index_objects_after}")
    if report.pending_packs:
        lines.append(f"  {report.pending_packs} condemned pack(s) ({report.pending_bytes / mb:,.1f} MB) wait for "
                     f"running snapshots or restores to finish; the next prune deletes them")
    if report.stale_locks_removed:
        lines.append(f"  removed {report.stale_locks_removed} stale lock(s)")
    lines += [f"warning: {w}" for w in report.warnings]
    return "\n".join(lines)


def cmd_prune(args: argparse.Namespace) -> int:
    report = prune(_open(args), _prune_options(args))
    _emit(args, report.to_dict(), _prune_text(report))
    return 0


def cmd_policy(args: argparse.Namespace) -> int:
    repo = _open(args)
    if args.policy_command == "set":
        stored = _policy_from_args(args)
        if stored is None:
            raise errors.UsageError("give at least one --keep-* rule")
        save_policy(repo, stored)
    elif args.policy_command == "clear":
        save_policy(repo, None)
        stored = None
    else:
        stored = load_policy(repo)
    _emit(args, None if stored is None else {**stored.to_record(), "description": stored.policy.describe()},
          "no retention policy stored" if stored is None else
          f"policy: {stored.policy.describe()}; grouped by {','.join(stored.group_by) or 'nothing'}; "
          f"periods in {stored.timezone or 'local time'}")
    return 0


def cmd_unlock(args: argparse.Namespace) -> int:
    repo = _open(args)
    if args.all:
        found, unreadable = locks.list_locks(repo.backend, repo.cipher)
        for key in [lock.key for lock in found] + unreadable:
            repo.backend.delete(key)
        removed = len(found) + len(unreadable)
    else:
        removed = len(locks.remove_stale(repo.backend, repo.cipher))
    _emit(args, {"removed": removed}, f"removed {removed} lock(s)")
    return 0


class _StoppedStarting(BaseException):
    """SIGTERM or SIGINT while ``run`` starts up (a password prompt, opening a slow
    bucket). A BaseException, like KeyboardInterrupt: the HTTP stack must not take it for
    a failed request and retry."""


class _Stopper:
    """The one handler of SIGTERM and SIGINT for ``run``, installed before anything else:
    it always sets ``stop``, and while ``starting`` also interrupts whatever start-up
    waits on (a password prompt would swallow Ctrl-C). Flipping ``starting`` (never
    swapping handlers) leaves no moment in which a signal finds no handler or the wrong
    one; once the scheduler runs, the job running finishes first."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.starting = True

    def __call__(self, signum: int, frame: object) -> None:
        # Not ``stop.set()`` here: the handler runs in the main thread, which may be inside
        # ``stop.wait()`` holding the event's lock, and set() would wait on it forever.
        if sys.is_finalizing():
            return  # exiting anyway
        try:
            threading.Thread(target=self.stop.set, name="stop-request", daemon=True).start()
        except RuntimeError as exc:  # no thread to be had (a task limit): stop the hard way
            raise KeyboardInterrupt from exc
        if self.starting:
            self.starting = False  # once: the handler of this stop must not be interrupted
            raise _StoppedStarting(signal.Signals(signum).name)


def cmd_run(args: argparse.Namespace) -> int:
    """The scheduler (engine/scheduler.py), with its log on stdout, until SIGTERM or SIGINT."""
    stopper = _Stopper()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stopper)
    try:
        try:
            jobs, schedule, lock_dir, log = _prepare_run(args)
        finally:
            stopper.starting = False  # also when start-up failed: its error is reported in peace
    except _StoppedStarting as exc:
        with contextlib.suppress(OSError):
            print(f"clubsnap: stopped by {exc} while starting", file=sys.stderr)
        return 0
    scheduler.run(jobs, schedule, stopper.stop, log, lock_dir)
    return 0


def _prepare_run(args: argparse.Namespace) -> tuple[scheduler.Jobs, scheduler.Schedule, Path, scheduler.Log]:
    data_dir, include_logs = _data_dir(args), _include_logs(args)
    schedule = _schedule(args)
    repo = _open(args)
    host = args.host or socket.gethostname()

    def options(tags: list[str]) -> SnapshotOptions:
        return SnapshotOptions(source=data_dir, host=host, now=_now, tags=(args.tag or []) + tags,
                               include_logs=include_logs)

    jobs = scheduler.Jobs(repo, options, _policy_from_args(args) or _config(args).retention,
                          replace(_prune_options(args), progress=None), args.temp_dir,
                          select=SnapshotFilter(host, display(os.fsencode(data_dir.absolute()))),
                          metrics_file=_metrics_file(args))

    write_line = _StdoutLog()

    def log(event: dict[str, Any]) -> None:
        event = {"time": _now().isoformat(timespec="seconds"), **event}
        if args.log_json:
            line = json.dumps(event, default=str)
        else:
            details = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("time", "event", "ok"))
            state = "" if "ok" not in event else " ok" if event["ok"] else " FAILED"
            line = f"{event['time']} {event['event']}{state} {details}".rstrip()
        write_line(line)

    return jobs, schedule, _cache_root(args) / repo.config.repo_id, log


class _StdoutLog:
    """The scheduler's log on stdout, one line per event, written straight to the
    descriptor: a line that cannot be written is lost rather than left in a buffer that
    every later line, and the flush at exit, would fail on again. The scheduler outlives
    its log."""

    def __init__(self) -> None:
        self.newline_owed = False  # a line went out in part: the next must start afresh

    def __call__(self, line: str) -> None:
        if sys.stdout is None:  # started with stdout closed: nowhere to log
            return
        data = (b"\n" if self.newline_owed else b"") + (line + "\n").encode(
            sys.stdout.encoding or "utf-8", "backslashreplace")
        written = 0
        try:
            while written < len(data):
                written += os.write(sys.stdout.fileno(), data[written:])
        except BrokenPipeError:  # the reader is gone for good: backups go on unlogged
            _discard_stdout()
        except OSError:  # a full disk under a redirected log: this line is lost, the next may fit
            pass
        if written == len(data):
            self.newline_owed = False
        elif written:  # a fragment went out; owed unless it ends with a newline (the one owed)
            self.newline_owed = not data[:written].endswith(b"\n")


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so neither later output nor the flush at exit fails."""
    if sys.stdout is None:
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _metrics_file(args: argparse.Namespace) -> Path | None:
    """``--metrics-file``, else the configuration file's ``metrics_file``; its directory
    must exist now rather than every write failing later."""
    given = args.metrics_file or _config(args).get("metrics_file")
    if not given:
        return None
    path = Path(given).absolute()
    if not path.parent.is_dir():
        raise errors.UsageError(f"the metrics file's directory {path.parent} does not exist")
    return path


def _schedule(args: argparse.Namespace) -> scheduler.Schedule:
    """The schedule: options, else the configuration file's [schedule], else the defaults."""
    written = _config(args).schedule
    defaults = scheduler.Schedule()

    def every(option: str, key: str, default: float | None) -> float | None:
        text = getattr(args, option) or written.get(key)
        if text is None:
            return default
        if text.strip().lower() == "off":
            return None
        value = configfile.seconds(text)
        if value <= 0:
            raise errors.UsageError(f"{key} must be positive (or \"off\")")
        return value

    daily = args.daily_at or written.get("daily_at")
    try:
        daily_at = None if daily in (None, "off") else datetime.strptime(daily, "%H:%M").time()
    except ValueError as exc:
        raise errors.UsageError(f"daily_at takes a local time like 02:30, not {daily!r}") from exc
    return scheduler.Schedule(every("every", "snapshot_every", defaults.snapshot_every), daily_at,
                              every("prune_every", "prune_every", defaults.prune_every),
                              every("verify_every", "verify_every", defaults.verify_every))


def cmd_config(args: argparse.Namespace) -> int:
    """The settings in effect and where each comes from; secrets are never shown."""
    config = _config(args)
    rows = {}
    for name, option, variable, key in (("repository", "repo", "CLUBSNAP_REPO", "repository"),
                                        ("cache_dir", "cache_dir", "CLUBSNAP_CACHE_DIR", "cache_dir"),
                                        ("password_file", "password_file", "CLUBSNAP_PASSWORD_FILE", "password_file")):
        value, origin = _setting(args, option, variable, key)
        rows[name] = {"value": value, "from": origin}
    rows["cache_dir"]["value"] = str(_cache_root(args))
    if os.environ.get("CLUBSNAP_PASSWORD") and rows["password_file"]["from"] not in ("--password-file",
                                                                                      "$CLUBSNAP_PASSWORD_FILE"):
        # the same order as _read_password: the variable wins over the file's password_file
        rows["password_file"] = {"value": None, "from": "-"}
        rows["password"] = {"value": "*** (set)", "from": "$CLUBSNAP_PASSWORD"}
    for key in ("data_dir", "metrics_file"):
        rows[key] = {"value": config.get(key), "from": str(config.path) if config.get(key) else "-"}
    rows["include_logs"] = {"value": bool(config.get("include_logs")),
                            "from": str(config.path) if config.get("include_logs") is not None else "default"}
    rows["retention"] = {"value": config.retention.policy.describe() if config.retention else None,
                         "from": str(config.path) if config.retention else "-"}
    for variable in sorted(os.environ):
        if variable.startswith(("CLUBSNAP_S3_", "CLUBSNAP_BLOBS_S3_")):
            secret = any(word in variable for word in ("SECRET", "ACCESS_KEY", "TOKEN"))
            rows[variable.lower()] = {"value": "***" if secret else os.environ[variable], "from": f"${variable}"}
    _emit(args, {"config_file": str(config.path) if config.path else None, "settings": rows},
          f"configuration file: {config.path or 'none'}\n"
          + "\n".join(f"{name}: {row['value']}  ({row['from']})" for name, row in rows.items()))
    return 0


def _add_policy_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep-last", type=int, metavar="N", help="keep the N newest snapshots")
    for period in PERIODS:
        p.add_argument(f"--keep-{period}", type=int, metavar="N",
                       help=f"keep the newest snapshot of each of the N newest {period} periods (-1: all)")
    p.add_argument("--keep-within", metavar="DURATION",
                   help="keep every snapshot within DURATION of the newest (e.g. 30d, 12h, 2w, 6m, 1y)")
    for period in PERIODS:
        p.add_argument(f"--keep-within-{period}", metavar="DURATION",
                       help=f"keep the newest snapshot of each {period} period within DURATION of the newest")
    p.add_argument("--keep-tag", action="append", metavar="TAG", help="keep snapshots with this tag (repeatable)")
    p.add_argument("--group-by", help="apply the policy per group of host,source,tags (default host,source; "
                                      "'' for one group)")
    p.add_argument("--timezone", help="time zone of the calendar periods (default: this machine's local time)")
    p.add_argument("--utc", action="store_true", help="calendar periods in UTC")


def _add_filter_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="only snapshots of this host")
    p.add_argument("--path", help="only snapshots of this data directory")
    p.add_argument("--tag", action="append", help="only snapshots with this tag (repeatable: all of them)")


def _add_prune_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-unused", default="5%",
                   help="unused data tolerated in kept packs, as a percentage of the used data (default 5%%; "
                        "'unlimited' repacks nothing, 0%% repacks every pack with garbage)")
    p.add_argument("--wait", default="5m",
                   help="how long to wait for running snapshots/restores before deleting (default 5m); "
                        "what is left, the next prune deletes")


# ---- parser -----------------------------------------------------------------------------------

def _global_options(default: Any) -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--config", default=default,
                         help="configuration file (default: $CLUBSNAP_CONFIG, ~/.config/clubsnap/config.toml, "
                              "/etc/clubsnap/config.toml)")
    options.add_argument("--repo", "-r", default=default, help="repository location (default: $CLUBSNAP_REPO)")
    options.add_argument("--cache-dir", default=default,
                         help="local catalog directory (default: $XDG_CACHE_HOME/clubsnap)")
    options.add_argument("--json", action="store_true", default=default, help="machine-readable output")
    options.add_argument("--password-file", default=default,
                         help="read the repository password from this file (default: $CLUBSNAP_PASSWORD_FILE, "
                              "$CLUBSNAP_PASSWORD, or a prompt on a terminal)")
    options.add_argument("--requests", action="store_true", default=default,
                         help="print the backend requests the command made (PUT/GET/HEAD/LIST/DELETE) on stderr")
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clubsnap", parents=[_global_options(None)],
                                     description="Incremental, deduplicating snapshots of a club data directory.")
    parser.set_defaults(repo=None, cache_dir=None, json=False, requests=False, password_file=None, config=None)
    # Repeated on every command, so they may come after it too; SUPPRESS keeps a value
    # given before the command from being reset by the command's own default.
    common = _global_options(argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    p = add("init", cmd_init, "create a repository (encrypted unless --encryption none)")
    p.add_argument("--encryption", choices=(SCHEME, "none"), default=SCHEME,
                   help=f"{SCHEME} (default) or none (only on storage that is already encrypted and trusted)")
    p.add_argument("--kdf-cost", help="log2 of scrypt's N for the key slot (default: calibrated to ~0.5 s here; "
                                      "$CLUBSNAP_KDF_COST)")
    p = add("key", cmd_key, "manage the key slots (passwords) of an encrypted repository")
    keys_sub = p.add_subparsers(dest="key_command", required=True)
    keys_sub.add_parser("list", parents=[common], help="list the key slots; * marks the one this password opens")
    for name, text in (("add", "add a password (a new slot wrapping the same master key)"),
                       ("passwd", "change this password: add a new slot, then remove this one")):
        q = keys_sub.add_parser(name, parents=[common], help=text)
        q.add_argument("--new-password-file", help="the new password's file (default: $CLUBSNAP_NEW_PASSWORD_FILE, "
                                                   "$CLUBSNAP_NEW_PASSWORD, or a prompt)")
        q.add_argument("--kdf-cost", help="log2 of scrypt's N (default: calibrated to ~0.5 s)")
    q = keys_sub.add_parser("remove", parents=[common], help="remove a key slot (not the one this password opens)")
    q.add_argument("slot", help="slot id or a unique prefix")
    p = add("snapshot", cmd_snapshot, "take a snapshot of a club data directory")
    p.add_argument("data_dir", nargs="?", help="club's DATA_DIR (default: data_dir of the configuration file)")
    p.add_argument("--tag", action="append", help="tag the snapshot (repeatable)")
    p.add_argument("--include-logs", action="store_true", help="also snapshot logs/")
    p.add_argument("--verify", action="store_true",
                   help="check every blob club.db names against the snapshot (no data read); exit 18 if any is "
                        "missing or has the wrong size")
    p.add_argument("--host", help="host name recorded in the snapshot (default: this machine's)")
    p.add_argument("--blobs", metavar="URL",
                   help="club's blob store is this bucket (s3://bucket[/prefix], gs://…), not DATA_DIR/blobs")
    _add_filter_options(add("snapshots", cmd_snapshots, "list snapshots"))
    p = add("restore", cmd_restore, "restore a snapshot (by id, 'latest', or --at TIME)")
    p.add_argument("snapshot", nargs="?")
    p.add_argument("--at", help="newest snapshot at or before TIME (ISO 8601, or '2h ago')")
    p.add_argument("--target", required=True,
                   help="directory to restore into, or a bucket (s3://bucket[/prefix]) for the blobs tier")
    p.add_argument("--include", action="append", help="restore only this path (repeatable)")
    p.add_argument("--delete", action="store_true", help="remove files of the restored tiers that the snapshot lacks")
    p.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    p.add_argument("--force", action="store_true", help="restore even if a process has the database open")
    p.add_argument("--db-check", choices=("integrity", "quick", "none"), default="integrity",
                   help="SQLite check run on each restored database (default: integrity)")
    _add_filter_options(p)
    p = add("diff", cmd_diff, "show what changed between two snapshots")
    p.add_argument("a")
    p.add_argument("b")
    p = add("check", cmd_check, "check the repository")
    p.add_argument("--read-data", action="store_true", help="read back and re-hash all data")
    p.add_argument("--read-data-subset", help="read back this percentage of packs, e.g. 10%%")
    p = add("verify", cmd_verify, "check that a snapshot (restored into a temporary directory) or a data dir "
                                  "is consistent: every blob club.db names present and intact")
    p.add_argument("snapshot", nargs="?", help="snapshot id or 'latest'")
    p.add_argument("--at", help="the newest snapshot at or before TIME")
    p.add_argument("--data", help="check this data directory instead of a snapshot")
    p.add_argument("--temp-dir", help="where to restore the snapshot for the check (default: system temp)")
    _add_filter_options(p)
    p = add("forget", cmd_forget, "remove snapshots by a retention policy, or by id (their data goes at prune)")
    p.add_argument("snapshot_ids", nargs="*", metavar="ID", help="snapshot ids to remove (instead of a policy)")
    _add_policy_options(p)
    p.add_argument("--dry-run", action="store_true", help="show what would be kept and removed, and why")
    p.add_argument("--prune", action="store_true", help="prune right after")
    _add_prune_options(p)
    p = add("prune", cmd_prune, "delete data no snapshot needs; safe beside running snapshots")
    p.add_argument("--dry-run", action="store_true", help="report what would be freed, change nothing")
    _add_prune_options(p)
    p = add("policy", cmd_policy, "show, set or clear the retention policy stored in the repository")
    policy_sub = p.add_subparsers(dest="policy_command", required=True)
    policy_sub.add_parser("show", parents=[common], help="print the stored policy")
    _add_policy_options(policy_sub.add_parser("set", parents=[common], help="store a policy ('forget' uses it "
                                                                             "when given no --keep-* rule)"))
    policy_sub.add_parser("clear", parents=[common], help="remove the stored policy")
    p = add("unlock", cmd_unlock, "remove stale locks (of processes that died)")
    p.add_argument("--all", action="store_true",
                   help="remove every lock: only when no clubsnap process uses the repository")
    p = add("status", cmd_status, "is the backup healthy: the newest snapshot's age, the last verify's result")
    p.add_argument("--max-age", metavar="DURATION",
                   help="exit 22 when the newest snapshot is older than this (90s, 30m, 1h, 2d)")
    p.add_argument("--max-verify-age", metavar="DURATION",
                   help="exit 22 when the last verify ran longer ago than this, or never")
    p.add_argument("--host", help="judge only the snapshots (and verifies) of this host")
    p.add_argument("--path", help="judge only the snapshots (and verifies) of this data directory")
    p.set_defaults(tag=None)  # the filter of `snapshots`, without --tag
    p = add("run", cmd_run, "take snapshots, forget and prune, and verify on a schedule, until SIGTERM: for a "
                            "container or a systemd service")
    p.add_argument("data_dir", nargs="?", help="club's DATA_DIR (default: data_dir of the configuration file)")
    p.add_argument("--every", help="snapshot interval (default: [schedule] snapshot_every, else 10m; 'off')")
    p.add_argument("--daily-at", help="local time (HH:MM) of a snapshot tagged daily (default: [schedule] daily_at)")
    p.add_argument("--prune-every", help="forget by the retention policy, then prune, this often (default 1d; 'off')")
    p.add_argument("--verify-every", help="verify the newest snapshot of this host and data dir this often "
                                          "(default 1d; 'off')")
    p.add_argument("--tag", action="append", help="tag every snapshot (repeatable)")
    p.add_argument("--host", help="host name recorded in the snapshots (default: this machine's)")
    p.add_argument("--include-logs", action="store_true", help="also snapshot logs/")
    p.add_argument("--temp-dir", help="where verify restores the snapshot (default: system temp)")
    p.add_argument("--log-json", action="store_true", help="one JSON object per line on stdout")
    p.add_argument("--metrics-file", metavar="PATH",
                   help="write Prometheus metrics there after every job, for node_exporter's textfile collector "
                        "(default: metrics_file of the configuration file)")
    _add_policy_options(p)
    _add_prune_options(p)
    p = add("config", cmd_config, "show the settings in effect and where each comes from (secrets masked)")
    p.add_argument("config_command", choices=("show",))
    add("stats", cmd_stats, "repository statistics")
    p = add("repair", cmd_repair, "heal what check found: rebuild the index, salvage damaged packs, replace "
                                  "snapshots that need lost data")
    repair_sub = p.add_subparsers(dest="repair_command", required=True)
    for name, text in (("index", "rebuild the index from the packs, passing over damaged index objects"),
                       ("packs", "copy the intact blobs of damaged packs into new packs, then delete the damaged "
                                 "ones, naming the files that remain unrecoverable"),
                       ("snapshots", "remove unreadable snapshot records; replace those whose files need lost "
                                     "data by ones without those files")):
        q = repair_sub.add_parser(name, parents=[common], help=text, description=text)
        q.add_argument("--dry-run", action="store_true", help="say what would be done, write nothing")
        if name == "packs":
            q.add_argument("pack_ids", nargs="*", metavar="PACK",
                           help="also repair these packs (id or unique prefix), beside those damage records name")
    p = add("cache", cmd_cache, "manage the local catalog")
    p.add_argument("--rebuild", action="store_true", required=True, help="rebuild the catalog from the repository")
    p.add_argument("--from-packs", action="store_true", help="also index packs no index object names")
    return parser


def _limit_malloc_arenas() -> None:
    """glibc gives each reader thread its own malloc arena, and freed chunk buffers stay
    scattered over them: a full snapshot of the medium data set peaked at ~320 MB RSS with
    the default arenas and ~230 MB with one (and ran no slower). Must run before threads
    start; a no-op where there is no glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_ARENA_MAX, 1)
    except (OSError, AttributeError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    _limit_malloc_arenas()
    for stream in (sys.stdout, sys.stderr):
        # File names need not be UTF-8; show odd bytes escaped rather than crash on them.
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    return _settle_stdout(args, _dispatch(args))


def _dispatch(args: argparse.Namespace) -> int:
    """Run the command; every failure an operator can meet becomes one line and a code."""
    try:
        _config(args)  # a bad configuration file fails every command, even one it would not serve
        code: int = args.func(args)
        _report_passed_over(args)
        _report_requests(args)
        return code
    except errors.EngineError as exc:
        _report_passed_over(args)
        _report_requests(args)
        print(f"clubsnap: {exc}", file=sys.stderr)
        return exc.exit_code
    except sqlite3.Error as exc:  # the local catalog failed after it opened (locked, full disk)
        from .catalog import catalog_error  # where the catalog's failures are told apart

        error = catalog_error(exc)
        print(f"clubsnap: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("clubsnap: interrupted", file=sys.stderr)
        return errors.EXIT_INTERRUPTED


def _settle_stdout(args: argparse.Namespace, code: int) -> int:
    """Flush stdout now, not at exit, where a failure turns any exit code into 120. Output
    that could not be written leaves a failed command's code as it is (a probe must still
    see ``status``'s 22, and its error line is the one line); a success cut short by its
    reader (``| head``) is 141, by a full disk an error of its own."""
    error: OSError | None = getattr(args, "output_error", None)
    if error is None and sys.stdout is not None:
        try:
            sys.stdout.flush()
        except OSError as exc:
            _discard_stdout()
            error = exc
    if error is None or code != 0:
        return code
    if isinstance(error, BrokenPipeError):
        return errors.EXIT_BROKEN_PIPE
    with contextlib.suppress(OSError):
        print(f"clubsnap: cannot write the output: {error.strerror or error}", file=sys.stderr)
    return errors.StorageFull.exit_code if error.errno == errno.ENOSPC else 1


if __name__ == "__main__":
    sys.exit(main())
