"""What ``clubsnap run`` has done, in the Prometheus text format, for node_exporter's
textfile collector.

node_exporter reads every ``*.prom`` file of one directory at each scrape; ``run``
replaces its file whole after every job, so a scrape never sees half of one. An alert
then needs no log parsing: ``time() - clubsnap_job_last_success_timestamp_seconds
{job="snapshot"} > 3600``. A value not known yet (a job that never ran) is left out
rather than written as 0, which would read as "1970".

Every sample carries a ``repository`` label (its location), so two ``run``s on one host
(two registries, or a local and an off-site repository) write two files whose series
node_exporter can tell apart.
"""

from __future__ import annotations

from dataclasses import dataclass

# name, type, JobMetrics attribute, help text
_PER_JOB = (
    ("clubsnap_job_last_run_timestamp_seconds", "gauge", "last_run",
     "When the job's last run started (Unix time)."),
    ("clubsnap_job_last_success_timestamp_seconds", "gauge", "last_success",
     "When the job's last successful run ended (Unix time)."),
    ("clubsnap_job_last_duration_seconds", "gauge", "last_duration",
     "How long the job's last run took."),
    ("clubsnap_job_failures_total", "counter", "failures",
     "Runs of the job that failed since clubsnap run started."),
)


@dataclass
class JobMetrics:
    last_run: float | None = None       # Unix time
    last_success: float | None = None   # Unix time
    last_duration: float | None = None  # seconds
    failures: int = 0                   # since this process started: a counter resets on restart

    def ran(self, started: float, duration: float, ok: bool) -> None:
        self.last_run, self.last_duration = started, duration
        if ok:
            self.last_success = started + duration
        else:
            self.failures += 1


@dataclass
class RunMetrics:
    repository: str  # the value of every sample's ``repository`` label
    jobs: dict[str, JobMetrics]
    snapshot_bytes_added: int | None = None  # by the last snapshot
    snapshot_files: int | None = None
    snapshot_partial: bool | None = None     # the last snapshot skipped unreadable files
    verify_consistent: bool | None = None    # what the last verify that checked anything found
    repository_snapshots: int | None = None
    repository_stored_bytes: int | None = None

    @classmethod
    def for_jobs(cls, repository: str, names: tuple[str, ...]) -> "RunMetrics":
        return cls(repository, {name: JobMetrics() for name in names})

    def render(self) -> str:
        """The text exposition format: ``# HELP`` and ``# TYPE`` before each family."""
        lines: list[str] = []
        for name, kind, attribute, text in _PER_JOB:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            for job, values in self.jobs.items():
                value = getattr(values, attribute)
                if value is not None:
                    lines.append(f"{name}{self._labels(job=job)} {_number(value)}")
        for name, value, text in (
                ("clubsnap_snapshot_last_bytes_added", self.snapshot_bytes_added,
                 "Bytes the last snapshot added to the repository."),
                ("clubsnap_snapshot_last_files", self.snapshot_files, "Files in the last snapshot."),
                ("clubsnap_snapshot_last_partial", self.snapshot_partial,
                 "1 if the last snapshot skipped unreadable files, 0 if it has them all."),
                ("clubsnap_verify_last_consistent", self.verify_consistent,
                 "1 if the last verify found the snapshot consistent, 0 if not."),
                ("clubsnap_repository_snapshots", self.repository_snapshots, "Snapshots in the repository."),
                ("clubsnap_repository_stored_bytes", self.repository_stored_bytes,
                 "Bytes in the repository's live packs, as the local catalog knew them after the last job.")):
            if value is not None:
                lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge", f"{name}{self._labels()} {_number(value)}"]
        return "\n".join(lines) + "\n"

    def _labels(self, **more: str) -> str:
        pairs = {**more, "repository": self.repository}
        return "{" + ",".join(f'{key}="{_escaped(value)}"' for key, value in pairs.items()) + "}"


def _escaped(value: str) -> str:
    """A label value as the text format wants it: backslash, quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float | int | bool) -> str:
    """Integers exactly, floats with every digit (a timestamp's milliseconds count)."""
    return str(int(value)) if isinstance(value, (bool, int)) else repr(float(value))
