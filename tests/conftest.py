"""Shared fixtures: a CLI runner over real subprocesses, fresh repositories, fixed clocks."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterator

import itertools

import pytest

from engine import Repository, open_backend

from benchmarks.s3support import MotoServer

ROOT = Path(__file__).resolve().parent.parent
TEST_PASSWORD = "correct horse battery staple"


class Clock:
    """A controllable ``now``: tests move time to check "restore as of" to the second."""

    def __init__(self, start: datetime) -> None:
        self.current = start

    def __call__(self) -> datetime:
        return self.current

    def advance(self, **delta: float) -> datetime:
        self.current += timedelta(**delta)
        return self.current


@pytest.fixture(scope="session", autouse=True)
def test_password() -> Iterator[None]:
    """Every clubsnap process the tests start (through `cli` or their own Popen) gets the
    test password and a cheap KDF: `init` encrypts by default."""
    saved = {name: os.environ.get(name) for name in ("CLUBSNAP_PASSWORD", "CLUBSNAP_KDF_COST")}
    os.environ.update({"CLUBSNAP_PASSWORD": TEST_PASSWORD, "CLUBSNAP_KDF_COST": "10"})
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


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

    def run(*args: str, repo: Path | None = None, timeout: float = 300, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, "CLUBSNAP_CACHE_DIR": str(tmp_path / "cli-cache"), "PYTHONPATH": str(ROOT),
                    **(env or {})}
        if repo is not None:
            full_env["CLUBSNAP_REPO"] = str(repo)
        return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True,
                              env=full_env, timeout=timeout, stdin=subprocess.DEVNULL, cwd=cwd)

    return run


# ---- S3: a real HTTP endpoint (moto's server) -----------------------------------------------

_buckets = itertools.count(1)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """One moto server per session. A missing moto fails the S3 tests, never skips them:
    CI must not pass without them."""
    server = MotoServer()
    yield server
    server.stop()


def s3_environment(endpoint: str) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "",
            "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
            "CLUBSNAP_S3_ENDPOINT": endpoint, "CLUBSNAP_S3_REGION": "us-east-1", "CLUBSNAP_S3_ADDRESSING": "path"}


@pytest.fixture
def s3_env(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Credentials and endpoint for the moto server, set in this process (so subprocesses
    inherit them) and returned."""
    env = s3_environment(moto_server.endpoint)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def s3_url(s3_env: dict[str, str]) -> str:
    """A fresh, empty bucket on the moto server, as a repository URL with a prefix."""
    bucket = f"clubsnap-test-{os.getpid()}-{next(_buckets)}"
    s3_client().create_bucket(Bucket=bucket)
    return f"s3://{bucket}/repo"


def s3_client(endpoint: str | None = None):  # type: ignore[no-untyped-def]
    """A plain boto3 client for the test's own setup and inspection."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint or os.environ["CLUBSNAP_S3_ENDPOINT"], region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")
