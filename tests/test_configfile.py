"""The configuration file: settings an operator would otherwise repeat, overridden by the
environment and the command line, with secrets never shown and typos refused."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from benchmarks.clubgen import generate
from engine import configfile

from .conftest import TEST_PASSWORD

Cli = Callable[..., subprocess.CompletedProcess[str]]


def _without_password() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("CLUBSNAP_PASSWORD", "CLUBSNAP_REPO")}


def test_a_config_file_drives_every_command(cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, repo = tmp_path / "data", tmp_path / "repo"
    generate(data, "tiny", seed=5)
    secret = tmp_path / "password"
    secret.write_text(TEST_PASSWORD + "\n")
    config = tmp_path / "clubsnap.toml"
    config.write_text(f'''
data_dir = "{data}"
repository = "{repo}"
password_file = "{secret}"

[retention]
keep_last = 1
keep_tags = ["monthly"]
timezone = "UTC"
''')
    monkeypatch.delenv("CLUBSNAP_PASSWORD")
    env = {"CLUBSNAP_CONFIG": str(config)}
    assert cli("init", env=env).returncode == 0
    for tag in ("monthly", "a", "b"):
        result = cli("snapshot", "--tag", tag, env=env)  # the data dir, repository, password: all from the file
        assert result.returncode == 0, result.stderr
    dry = cli("forget", "--dry-run", "--json", env=env)
    decisions = json.loads(dry.stdout)["groups"][0]["decisions"]
    assert [d["keep"] for d in decisions] == [True, False, True]  # last 1, and the monthly one
    shown = cli("config", "show", "--json", env={**env, "CLUBSNAP_S3_SECRET_ACCESS_KEY": "hunter2"})
    settings = json.loads(shown.stdout)["settings"]
    assert settings["repository"] == {"value": str(repo), "from": str(config)}
    assert settings["clubsnap_s3_secret_access_key"]["value"] == "***" and "hunter2" not in shown.stdout
    assert TEST_PASSWORD not in shown.stdout and settings["password_file"]["value"] == str(secret)
    assert settings["retention"] == {"value": "last 1, tag monthly", "from": str(config)}
    # The environment and the command line win over the file.
    other = tmp_path / "other-repo"
    assert cli("--config", str(config), "--repo", str(other), "init").returncode == 0
    assert json.loads(cli("snapshots", "--json", env={**env, "CLUBSNAP_REPO": str(other)}).stdout) == []
    assert cli("--repo", str(other), "config", "show", "--json", env=env).stdout.count('"--repo"') == 1


@pytest.mark.parametrize("text, complaint", [
    ('repositry = "/x"', "unknown setting 'repositry'"),
    ('include_logs = "yes"', "include_logs must be a boolean"),
    ('[retention]\nkeep_daly = 7', "unknown retention setting 'keep_daly'"),
    ('[retention]\ntimezone = "UTC"', "keeps nothing"),
    ('[retention]\nkeep_within = "3 days"', "cannot read duration"),
    ('[retention]\nkeep_daily = 7\ngroup_by = ["colour"]', "cannot group by colour"),
    ('repository = ', "not valid TOML"),
    ('[retention]\nkeep_last = 1\nkeep_tags = "monthly"', "keep_tags must be a list of strings"),
    ('[retention]\nkeep_last = 1\ntimezone = 5', "timezone must be a string"),
    ('[retention]\nkeep_last = 1\ngroup_by = 5', "group_by must be a list of strings"),
])
def test_a_bad_config_file_is_a_one_line_error(cli: Cli, tmp_path: Path, text: str, complaint: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text + "\n")
    result = cli("--config", str(config), "snapshots", env={"CLUBSNAP_REPO": str(tmp_path / "repo")})
    assert result.returncode == 2 and complaint in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1


def test_a_named_config_file_must_exist(cli: Cli, tmp_path: Path) -> None:
    result = cli("--config", str(tmp_path / "missing.toml"), "snapshots")
    assert result.returncode == 2 and "cannot read the configuration file" in result.stderr


def test_the_default_location_is_used(cli: Cli, tmp_path: Path) -> None:
    home = tmp_path / "xdg"
    (home / "clubsnap").mkdir(parents=True)
    (home / "clubsnap" / "config.toml").write_text(f'repository = "{tmp_path / "repo"}"\n')
    assert cli("init", env={"XDG_CONFIG_HOME": str(home), "CLUBSNAP_REPO": ""}).returncode == 0
    assert (tmp_path / "repo" / "config").exists()


def test_relative_paths_are_relative_to_the_config_file(cli: Cli, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    setup, elsewhere = tmp_path / "etc" / "clubsnap", tmp_path / "elsewhere"
    setup.mkdir(parents=True)
    elsewhere.mkdir()
    generate(tmp_path / "data", "tiny", seed=6)
    (setup / "password").write_text(TEST_PASSWORD + "\n")
    config = setup / "config.toml"
    config.write_text('data_dir = "../../data"\nrepository = "repo"\npassword_file = "password"\n'
                      'cache_dir = "cache"\nmetrics_file = "metrics/clubsnap.prom"\n')
    monkeypatch.delenv("CLUBSNAP_PASSWORD")
    env = {"CLUBSNAP_CACHE_DIR": "", "CLUBSNAP_REPO": ""}
    # From another working directory, with the file named relatively too.
    shown = cli("--config", "../etc/clubsnap/config.toml", "config", "show", "--json", env=env, cwd=elsewhere)
    settings = json.loads(shown.stdout)["settings"]
    real = Path(os.path.realpath(setup))
    assert settings["data_dir"]["value"] == str(real.parent.parent / "data")
    assert settings["repository"]["value"] == str(real / "repo")
    assert settings["password_file"]["value"] == str(real / "password")
    assert settings["cache_dir"]["value"] == str(real / "cache")
    assert settings["metrics_file"]["value"] == str(real / "metrics" / "clubsnap.prom")
    assert cli("--config", str(config), "init", env=env, cwd=elsewhere).returncode == 0
    made = cli("--config", str(config), "snapshot", env=env, cwd=elsewhere)
    assert made.returncode == 0, made.stderr
    assert (setup / "repo" / "config").is_file() and list((setup / "cache").iterdir())
    assert not list(elsewhere.iterdir())


@pytest.mark.parametrize("written, resolved", [
    ("s3://club-backups/registry", "s3://club-backups/registry"),
    ("gs://club-backups/registry", "gs://club-backups/registry"),
    ("file://repo", "file://{dir}/repo"),
    ("/srv/repo", "/srv/repo"),
    ("~/repo", "{home}/repo"),
    ("repo", "{dir}/repo"),
])
def test_only_local_repository_paths_are_resolved(tmp_path: Path, written: str, resolved: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'repository = "{written}"\n')
    value = configfile.load(str(config), {}).get("repository")
    assert value == resolved.format(dir=os.path.realpath(tmp_path), home=os.path.expanduser("~"))
