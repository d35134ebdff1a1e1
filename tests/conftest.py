"""Shared fixtures: a CLI runner over real subprocesses, fresh repositories, fixed clocks."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterator

import pytest

from engine import Repository, open_backend

ROOT = Path(__file__).resolve().parent.parent


class Clock:
    """A controllable ``now``: tests move time to check "restore as of" to the second."""

    def __init__(self, start: datetime) -> None:
        self.current = start

    def __call__(self) -> datetime:
        return self.current

    def advance(self, **delta: float) -> datetime:
        self.current += timedelta(**delta)
        return self.current


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime(2026, 4, 9, 10, 0, tzinfo=timezone.utc))


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def repo(tmp_path: Path, cache_dir: Path, clock: Clock) -> Iterator[Repository]:
    repository = Repository.init(open_backend(str(tmp_path / "repo")), cache_dir, clock)
    yield repository
    repository.close()


def reopen(repository: Repository, cache_dir: Path) -> Repository:
    """A new Repository object on the same storage, as a second process would see it."""
    return Repository.open(open_backend(repository.backend.location), cache_dir)


@pytest.fixture
def cli(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``python -m engine`` for real, with its own cache dir and the test's repo."""

    def run(*args: str, repo: Path | None = None, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, "CLUBSNAP_CACHE_DIR": str(tmp_path / "cli-cache"),
                    "PYTHONPATH": str(ROOT), **(env or {})}
        if repo is not None:
            full_env["CLUBSNAP_REPO"] = str(repo)
        return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True,
                              env=full_env, timeout=timeout, stdin=subprocess.DEVNULL)

    return run
