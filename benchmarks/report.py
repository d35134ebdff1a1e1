"""docs/benchmarks.md and the frequent-snapshot plots, from the runner's results.

Readable first: one table of targets, then per size and seed three small tables (time,
bytes, memory) with the tools side by side, the floor and the ratios. The JSON next to
the results has everything else.
"""

from __future__ import annotations

import json
import os
import platform
import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.peers import tool_versions
from benchmarks.scenario import STEPS

TOOLS = ("clubsnap", "restic", "borg")
PLOTS = {"repo": "benchmarks-frequent-repo.png", "time": "benchmarks-frequent-time.png"}
SNAPSHOT_STEPS = {"init", "snapshot_1", "snapshot_2", "snapshot_3", "snapshot_4"}
STEP_NAMES = {"init": "init", "snapshot_1": "snapshot 1 (full)", "snapshot_2": "snapshot 2 (unchanged)",
              "snapshot_3": "snapshot 3 (day 1)", "snapshot_4": "snapshot 4 (day 2)",
              "restore_latest": "restore latest, empty dir", "restore_at": "restore snapshot 1 by time, empty dir",
              "rollback": "rollback to snapshot 1 over day 2", "restore_db": "restore only db/club.db"}

METHOD = """\
How it is measured:
- Every step is the tool's real command line in a child process, measured by
  `benchmarks/measure.py`: wall time, CPU time (user + system, children included), peak
  RSS (largest process), and bytes read (`/proc/<pid>/io`). The page cache is warm in
  every step (the data dir was just generated or copied), as on a busy server.
- Each tool has its own repository and its own copy of the generated data dir; the
  days of activity (`clubgen.one_day`) run in place on that copy, so every tool sees the
  same states and the same file changes.
- Repository bytes: the apparent size of the repository directory before and after
  the step; local caches (clubsnap's catalog, restic's and borg's caches) not counted.
- clubsnap's restores run with `--db-check none`: its default post-restore
  `integrity_check` (about 2 s on the medium database) has no counterpart in restic or
  borg, and the runner checks every tool's restored database itself, untimed.
- Bytes read from the repository on restores: clubsnap's own count of every byte the
  restore command read from the repository (`bytes_read_total`: index objects, snapshot
  record, trees, page maps and data); for the
  peers only `rchar` is known (every byte their processes read, their cache included),
  an upper bound, marked `<=`.
- Peers are set up as their docs advise here: before each backup
  `sqlite3 db/club.db ".backup db-dump/club.db"` (its time counts in the peer's step);
  the dump is backed up instead of the live `db/club.db*`; `cache/`, `tmp/`, `logs/`
  (clubsnap leaves logs out by default) and club's `*.tmp.<µs>` files are excluded. A
  peer restore moves the dump to `db/club.db` and removes stale sidecars (counted).
  restic runs with its defaults (repository v2, compression auto; restic always
  encrypts). borg runs with `--compression lz4` and `--encryption=repokey` (AES-CTR +
  HMAC-SHA256; this CPU has AES-NI and SHA extensions). clubsnap's repository (format 2) is not
  encrypted, so the peers pay for encryption that clubsnap does not do.
- Rollback: clubsnap restores with `--delete` and reuses the data already in the
  directory; the peers restore normally into it and cannot delete the files the
  snapshot lacks (counted as leftover files; club sees them as orphan blobs).
- Snapshot 2 and the restores are repeated (`--repeat`) and the medians reported.
- Every restore of every tool is checked: each blob file byte-identical to the source
  at that time, `db/club.db` passes `integrity_check` with that time's rows (a digest of
  every table). A failed check fails the run.
- Floor: bytes that really changed between the states (database pages that differ,
  at its page size, between backup-API images; plus new or changed blob files). Floor
  seconds: those bytes at this machine's single-threaded blake3 rate (snapshots) or
  read rate (restores), both measured on the data dir with a warm page cache.
"""


def publish(result: dict[str, Any], text: str, doc: Path, json_path: Path) -> None:
    """Write a standalone benchmark's results (JSON and markdown) and show the markdown."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    doc.write_text(text)
    print(text)


def machine() -> dict[str, str]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kib = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal")))
    return {"cpu": model, "cores": str(os.cpu_count()), "memory_gib": f"{mem_kib / 2**20:.0f}",
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version, **tool_versions()}


def markdown(command: str, results: list[dict[str, Any]], frequent: dict[str, Any] | None,
             plots: dict[str, str]) -> str:
    m = machine()
    lines = ["# Benchmarks", "",
             f"Generated by `{command}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC (`make bench` runs it "
             "with the defaults: sizes small and medium, seeds 1 and 2).", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['os']}, Python {m['python']}, "
             f"SQLite {m['sqlite']}; " + "; ".join(m[k] for k in ("restic", "borg") if k in m) + ".", "",
             METHOD]
    lines += _targets_table(results, frequent)
    lines += ["Why each missed target is missed, what the profiles show and what would close it: "
              "[benchmarks-analysis.md](benchmarks-analysis.md) (written by hand from cProfile runs). "
              "S3 request counts per command, with failing requests and a blob store in a bucket: "
              "[benchmarks-s3.md](benchmarks-s3.md) (`make bench-s3`).", ""]
    for result in results:
        lines += _scenario(result)
    if frequent:
        lines += _frequent(frequent, plots)
    return "\n".join(lines) + "\n"


def _targets_table(results: list[dict[str, Any]], frequent: dict[str, Any] | None) -> list[str]:
    lines = ["## Targets (issue 3)", "", "| data set | target | clubsnap | reference | ratio | limit | |",
             "|---|---|---|---|---|---|---|"]
    rows = [(f"{r['size']} seed {r['seed']}", t) for r in results for t in r["targets"]]
    if frequent:
        rows += [(f"frequent ({frequent['size']})", t) for t in frequent["targets"]]
    for label, t in rows:
        verdict = {True: "met", False: "**missed**", None: "n/a"}[t["met"]]
        ratio = f"{t['ratio']:.2f}x" if t["ratio"] is not None else ""
        lines.append(f"| {label} | {t['target']} | {_value(t['value'], t['unit'])} | "
                     f"{_value(t['reference'], t['unit'])} | {ratio} | {t['limit']}x | {verdict} |")
    return lines + [""]


def _value(value: float | None, unit: str) -> str:
    if value is None:
        return ""
    return _bytes(value) if unit == "bytes" else f"{value:.2f} {unit}"


def _bytes(n: float) -> str:
    if abs(n) < 10_000:
        return f"{n:,.0f} B"
    if abs(n) < 1_000_000:
        return f"{n / 1e3:,.1f} KB"
    return f"{n / 1e6:,.{2 if abs(n) < 1e7 else 1}f} MB"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else ""


def _scenario(result: dict[str, Any]) -> list[str]:
    tools = [t for t in TOOLS if t in result["tools"]]
    floor = result["floor"]
    machine_floor = floor["machine"]
    lines = [f"## {result['size']} data set, seed {result['seed']}: {result['data_bytes'] / 1e6:,.0f} MB "
             "in db/ + blobs/", "",
             f"Floor on this machine: reading db/ + blobs/ takes {machine_floor['read_s']:.3f} s, reading and "
             f"blake3-hashing them {machine_floor['hash_s']:.3f} s.", ""]
    lines += _table(result, tools, "Wall seconds (CPU seconds)", "wall_s", floor["seconds"],
                    lambda s, k: f"{s['wall_s']:.2f} ({s['cpu_s']:.2f})")
    lines += _table(result, tools, "Repository bytes added (snapshots), bytes read from the repository (restores)",
                    "bytes", floor["bytes"], _bytes_cell)
    lines += _table(result, tools, "Peak RSS, MB", "peak_rss_mb", None, lambda s, k: f"{s['peak_rss_mb']:.0f}")
    leftovers = {t: result["tools"][t]["steps"]["rollback"].get("leftover_files", 0) for t in tools}
    lines += ["After the rollback, files the snapshot lacks left behind: "
              + ", ".join(f"{t} {n}" for t, n in leftovers.items()) + ". Every restore verified; "
              "repository size at the end: " + ", ".join(f"{t} {_bytes(result['tools'][t]['repo_bytes_total'])}"
                                                            for t in tools) + ".", ""]
    return lines


def _bytes_key(step: str) -> str:
    return "repo_bytes_added" if step in SNAPSHOT_STEPS else "repo_bytes_read"


def _bytes_cell(s: dict[str, Any], step: str) -> str:
    value = s[_bytes_key(step)]
    exact = step in SNAPSHOT_STEPS or s.get("repo_bytes_read_exact")
    return ("" if exact else "<= ") + _bytes(value)


def _table(result: dict[str, Any], tools: list[str], title: str, key: str, floor: dict[str, float] | None,
           cell: Any) -> list[str]:
    peers = [t for t in tools if t != "clubsnap"]
    head = ["step", *tools] + (["floor"] if floor else []) + [f"clubsnap / {p}" for p in peers]
    head += ["clubsnap / floor"] if floor else []
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for step in STEPS:
        steps = {t: result["tools"][t]["steps"][step] for t in tools}
        field = _bytes_key(step) if key == "bytes" else key
        ours = steps["clubsnap"][field]
        row = [STEP_NAMES[step], *(cell(steps[t], step) for t in tools)]
        if floor:
            bound = floor.get(step)
            row.append("" if bound is None else (_bytes(bound) if key == "bytes" else f"{bound:.3f}"))
        row += [_ratio(ours, steps[p][field]) for p in peers]
        if floor:
            row.append(_ratio(ours, floor.get(step)))
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def _frequent(frequent: dict[str, Any], plots: dict[str, str]) -> list[str]:
    s = frequent["summary"]
    w = frequent["writer"]
    r = frequent["restore_middle"]
    listing = frequent["listing"]
    lines = ["## Frequent snapshots (clubsnap)", "",
             f"{frequent['count']} snapshots one after the other of the {frequent['size']} data set while a club-like "
             f"writer commits a transaction every {w['interval_s'] * 1000:.0f} ms and publishes a version every "
             f"{w['publish_every']} commits ({w['commits']:,} commits, {w['publishes']} publishes, {w['busy']} "
             "refused as busy). One full snapshot before the writer starts is not counted.", "",
             "Overhead = repository bytes added minus the stored bytes of the new data chunks (the snapshot's "
             "`data_bytes_stored`): trees, page maps, pack headers and trailers, index objects and the "
             "snapshot record.", "",
             "| figure | value |", "|---|---|",
             f"| snapshot wall, median | {s['wall_s_median']:.3f} s |",
             f"| snapshot wall, first / last quarter median | {s['wall_first_quarter_median']:.3f} s / "
             f"{s['wall_last_quarter_median']:.3f} s |",
             f"| fitted slope | {s['wall_slope_s_per_snapshot'] * 1000:+.3f} ms per snapshot "
             f"({s['wall_growth_raw_over_run_s']:+.3f} s over the run, while the bytes each snapshot read "
             f"grew from {_bytes(s['bytes_read_first'])} to {_bytes(s['bytes_read_last'])}) |",
             f"| growth not explained by data growth | {s['wall_growth_over_run_s']:+.3f} s over the run "
             "(slope against snapshot number of what a fit on bytes read leaves) |",
             f"| repository bytes added per snapshot, median | {_bytes(s['repo_bytes_added_median'])} |",
             f"| overhead per snapshot, median / max | {_bytes(s['overhead_bytes_median'])} / "
             f"{_bytes(s['overhead_bytes_max'])} |",
             f"| list {listing['snapshots_listed']} snapshots (`snapshots --json`) | {listing['wall_s']:.3f} s |",
             f"| restore the middle snapshot by `--at` into an empty dir | {r['wall_s']:.2f} s, fetched "
             f"{_bytes(r['bytes_fetched'])}, verified (`clubsnap verify`, integrity_check) |", ""]
    for name in ("repo", "time"):
        if name in plots:
            lines += [f"![{name}]({plots[name]})", ""]
    return lines


def plot_frequent(frequent: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """Two PNGs (repository size, snapshot time, against snapshot number); names returned."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    rows = frequent["snapshots"]
    numbers = [r["n"] for r in rows]
    series = {"repo": ([r["repo_bytes"] / 1e6 for r in rows], "repository size, MB"),
              "time": ([r["wall_s"] for r in rows], "snapshot wall time, s")}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, (values, label) in series.items():
        fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
        ax.plot(numbers, values, marker=".", linewidth=0.8)
        ax.set_xlabel("snapshot number")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if name == "time":
            ax.set_ylim(bottom=0)
        fig.tight_layout()
        fig.savefig(out_dir / PLOTS[name])
        plt.close(fig)
    return dict(PLOTS)
