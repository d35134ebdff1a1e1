"""The configuration file: what an operator would otherwise repeat on every command.

TOML, read with the standard library. Found at ``--config``, else ``$CLUBSNAP_CONFIG``,
else ``$XDG_CONFIG_HOME/clubsnap/config.toml`` (``~/.config/…``), else
``/etc/clubsnap/config.toml``; having none is fine. Options on the command line
override environment variables, which override the file::

    data_dir = "/data"                       # club's DATA_DIR, for `snapshot`
    repository = "s3://club-backups/registry"
    password_file = "/etc/clubsnap/password" # never the password itself
    cache_dir = "/var/cache/clubsnap"
    include_logs = false
    metrics_file = "/var/lib/node_exporter/clubsnap.prom"  # `run` writes Prometheus metrics there

    [retention]                              # what `forget` keeps when given no --keep-* rule
    keep_last = 3
    keep_daily = 14
    keep_weekly = 8
    keep_within = "2d"
    keep_within_daily = "90d"
    keep_tags = ["monthly"]
    group_by = ["host", "source"]
    timezone = "Europe/Berlin"               # or "UTC"; default: the machine's local time

    [schedule]                               # for `clubsnap run`; "off" disables a job
    snapshot_every = "10m"
    daily_at = "02:30"                       # local time of a snapshot tagged "daily"
    prune_every = "1d"                       # forget by [retention], then prune
    verify_every = "1d"                      # verify the newest snapshot of this host and data_dir

An unknown key is an error that names it: a misspelt ``keep_daly`` must not silently
keep nothing. A relative path (``data_dir``, ``password_file``, ``cache_dir``,
``metrics_file``, and ``repository`` unless it is a URL) is relative to the file's
directory: the file says the same wherever a command runs from (cron's working
directory is not the operator's).
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import UsageError
from .forget import DEFAULT_GROUP_BY, StoredPolicy, check_group_by, zone_named
from .retention import PERIODS, Duration, Policy

TOP_LEVEL = {"data_dir": str, "repository": str, "password_file": str, "cache_dir": str, "include_logs": bool,
             "metrics_file": str}
PATHS = {"data_dir", "password_file", "cache_dir", "metrics_file", "repository"}  # relative to the file's directory
MAX_SECONDS = 3650 * 86400.0
SCHEDULE = {"snapshot_every", "daily_at", "prune_every", "verify_every"}
RETENTION = {"keep_last", *(f"keep_{p}" for p in PERIODS), "keep_within", *(f"keep_within_{p}" for p in PERIODS),
             "keep_tags", "group_by", "timezone"}


@dataclass(frozen=True)
class ConfigFile:
    path: Path | None  # None: no file was found (all defaults)
    values: dict[str, Any] = field(default_factory=dict)  # the top-level keys given
    retention: StoredPolicy | None = None
    schedule: dict[str, str] = field(default_factory=dict)  # as written; `run` reads it

    def get(self, key: str) -> Any:
        return self.values.get(key)


def default_paths(environ: Mapping[str, str]) -> list[Path]:
    config_home = environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return [Path(config_home) / "clubsnap" / "config.toml", Path("/etc/clubsnap/config.toml")]


def load(explicit: str | None, environ: Mapping[str, str]) -> ConfigFile:
    """The configuration file in effect (see the module docstring for where it is looked for)."""
    named = explicit or environ.get("CLUBSNAP_CONFIG")
    if named:
        return _read(Path(named))
    for candidate in default_paths(environ):
        if candidate.is_file():
            return _read(candidate)
    return ConfigFile(None)


def _read(path: Path) -> ConfigFile:
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except OSError as exc:
        raise UsageError(f"cannot read the configuration file {path}: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not valid TOML ({exc})") from exc
    values = {}
    for key, value in document.items():
        if key in ("retention", "schedule"):
            continue
        expected = TOP_LEVEL.get(key)
        if expected is None:
            raise UsageError(f"{path}: unknown setting {key!r} (known: {', '.join(sorted(TOP_LEVEL))}, [retention], "
                             f"[schedule])")
        if not isinstance(value, expected):
            raise UsageError(f"{path}: {key} must be a {'boolean' if expected is bool else 'string'}")
        values[key] = _resolve(path, value) if key in PATHS and isinstance(value, str) else value
    retention = document.get("retention")
    if retention is not None and not isinstance(retention, dict):
        raise UsageError(f"{path}: retention must be a table ([retention])")
    schedule = document.get("schedule", {})
    if not isinstance(schedule, dict) or set(schedule) - SCHEDULE or not all(isinstance(v, str) for v in schedule.values()):
        raise UsageError(f"{path}: [schedule] takes {', '.join(sorted(SCHEDULE))}, as strings (\"10m\", \"02:30\", \"off\")")
    return ConfigFile(path, values, _retention(path, retention) if retention else None, dict(schedule))


def _resolve(path: Path, value: str) -> str:
    """``value`` (``~`` expanded) made absolute against the directory holding the
    configuration file at ``path``, that directory's symlinks resolved so ``..`` in the
    value means what it says. A bucket URL is left alone; ``file://`` keeps its scheme;
    "" stays unset."""
    if not value or ("://" in value and not value.startswith("file://")):
        return value
    scheme = "file://" if value.startswith("file://") else ""
    local = Path(value.removeprefix(scheme)).expanduser()
    if local.is_absolute():
        return scheme + str(local)
    return scheme + os.path.normpath(Path(os.path.realpath(path.absolute().parent)) / local)


def _retention(path: Path, table: dict[str, Any]) -> StoredPolicy:
    unknown = sorted(set(table) - RETENTION)
    if unknown:
        raise UsageError(f"{path}: unknown retention setting {unknown[0]!r} (known: {', '.join(sorted(RETENTION))})")
    try:
        for key in ("keep_within", "timezone", *(f"keep_within_{p}" for p in PERIODS)):
            if key in table and not isinstance(table[key], str):
                raise UsageError(f"{key} must be a string")
        for key in ("keep_tags", "group_by"):
            if key in table and not (isinstance(table[key], list) and all(isinstance(v, str) for v in table[key])):
                raise UsageError(f"{key} must be a list of strings, like [\"monthly\"]")
        counts = {p: _count(table, f"keep_{p}") for p in ("last", *PERIODS)}
        policy = Policy(
            last=counts["last"], hourly=counts["hourly"], daily=counts["daily"], weekly=counts["weekly"],
            monthly=counts["monthly"], yearly=counts["yearly"],
            within=Duration.parse(table["keep_within"]) if "keep_within" in table else None,
            within_periods={p: Duration.parse(table[f"keep_within_{p}"]) for p in PERIODS
                            if f"keep_within_{p}" in table},
            tags=tuple(str(t) for t in table.get("keep_tags", [])))
        group_by = tuple(table.get("group_by", DEFAULT_GROUP_BY))
        zone = table.get("timezone")
        zone_named(zone)
        stored = StoredPolicy(policy, check_group_by(group_by), zone)
    except UsageError as exc:
        raise UsageError(f"{path}: [retention]: {exc}") from exc
    if policy.empty():
        raise UsageError(f"{path}: [retention] keeps nothing: give at least one keep_* rule")
    return stored


def _count(table: dict[str, Any], key: str) -> int:
    value = table.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool):
        raise UsageError(f"{key} must be a whole number (-1: every period)")
    return value


def seconds(text: str) -> float:
    """A duration in seconds, or with a unit: 90s, 5m (minutes), 1h, 2d."""
    spec = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        value = float(spec[:-1]) * units[spec[-1]] if spec and spec[-1] in units else float(spec)
    except ValueError as exc:
        raise UsageError(f"cannot read duration {text!r}: use e.g. 90s, 5m, 1h or 2d") from exc
    if not math.isfinite(value) or not 0 <= value <= MAX_SECONDS:
        raise UsageError(f"duration {text!r} is out of range (0 to 3650d)")
    return value
