"""docs/operations.md, run: every block of the runbook, in order, on a throwaway machine.

The machine is a sandbox (tests/runbook/sandbox.py): a private mount namespace over an
overlay of ``/``, so the runbook's own paths (``/etc/clubsnap``, ``/var/lib/club``,
``/etc/systemd/system``, ``/opt/clubsnap``) are real and vanish afterwards. club is a
stand-in server that keeps writing to its database; ``systemctl``, ``journalctl`` and
``docker`` are emulations that run what the unit files and ``docker run`` lines say.

What differs from a real machine, and why:
- ``CLUBSNAP_KDF_COST=12``: the key derivation is made cheap (dozens of commands each
  derive the key; 0.5 s each would dominate the test);
- ``AWS_ENDPOINT_URL``: a local moto server stands in for AWS S3 (it takes the runbook's
  example credentials);
- club's data is a generated tiny registry; club's port is 8080 unless that is taken on
  this host, in which case ``localhost:8080`` is rewritten to a free port.

A block runs with ``bash -euo pipefail`` from the checkout's root, as root; it must exit
0 unless ``<!-- runbook: exit N -->`` precedes it. ``file PATH`` blocks are written to
PATH; ``same-as FILE`` blocks must equal that file of the checkout; ``hook NAME``
comments run an event or a check of tests/runbook/hooks.py. A fenced block that is
none of these fails the test: nothing in the runbook goes unrun.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from benchmarks.clubgen import generate
from benchmarks.s3support import MotoServer
from engine import errors

from .conftest import ROOT
from .runbook import sandbox, shims

DOC = ROOT / "docs" / "operations.md"
DIRECTIVE = re.compile(r"<!--\s*runbook:\s*([\w-]+)\s*(.*?)\s*-->")
CHECKOUT = "/root/clubsnap"


@dataclass(frozen=True)
class Step:
    kind: str  # run | file | same-as | hook
    text: str  # the block, or the hook's name
    arg: str   # the expected exit code, or the path
    line: int


def parse(markdown: str) -> Iterator[Step]:
    """The runbook's steps in order: fenced blocks (indented ones in lists too), each
    with the directive before it, and hooks."""
    lines = markdown.splitlines()
    pending: tuple[str, str] | None = None
    index = 0
    while index < len(lines):
        line, stripped = lines[index], lines[index].strip()
        directive = DIRECTIVE.search(stripped)
        if directive:
            kind, arg = directive.groups()
            if kind == "hook":
                yield Step("hook", arg, "", index + 1)
            elif kind in ("file", "same-as", "exit"):
                pending = (kind, arg)
            else:
                raise AssertionError(f"operations.md:{index + 1}: unknown runbook directive {kind!r}")
        elif stripped.startswith("```"):
            indent, language, start = len(line) - len(line.lstrip()), stripped[3:].strip(), index + 1
            index += 1
            body = []
            while not lines[index].strip().startswith("```"):
                body.append(lines[index][indent:])
                index += 1
            text = "\n".join(body) + "\n"
            if pending and pending[0] in ("file", "same-as"):
                yield Step(pending[0], text, pending[1], start)
            else:
                assert language == "sh", f"operations.md:{start}: a {language or 'plain'} block that is neither run " \
                                         f"nor a file (precede it with <!-- runbook: file PATH --> or same-as FILE)"
                yield Step("run", text, pending[1] if pending else "0", start)
            pending = None
        index += 1
    assert pending is None, f"a runbook directive {pending} has no block after it"


def _free_port(preferred: int) -> int:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            probe.bind(("127.0.0.1", 0))
            return int(probe.getsockname()[1])


def _copy_checkout(target: Path) -> None:
    """The files of this checkout (tracked, and new ones not ignored), as a clone has them."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True)
    names = [n for n in listed.stdout.decode().split("\0") if n] if listed.returncode == 0 else []
    if not names:
        shutil.copytree(ROOT, target, ignore=shutil.ignore_patterns(".git", ".venv", "*-work", "__pycache__"))
        return
    for name in names:
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)


def _prepare(box: sandbox.Sandbox) -> None:
    _copy_checkout(box.path(CHECKOUT))
    generate(box.path(shims.CLUB_DATA), "tiny", seed=5)
    bin_dir = box.path("/usr/local/sbin")
    bin_dir.mkdir(parents=True, exist_ok=True)
    for tool in shims.TOOLS:
        script = bin_dir / tool
        script.write_text(f"#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -m tests.runbook.shims {tool} \"$@\"\n")
        script.chmod(0o755)


def test_runbook_runs_as_written(tmp_path: Path, moto_server: MotoServer) -> None:
    reason = sandbox.available()
    if reason:
        pytest.skip(reason)
    steps = list(parse(DOC.read_text()))
    assert sum(s.kind == "run" for s in steps) >= 25 and sum(s.kind == "hook" for s in steps) >= 8
    port = _free_port(8080)
    env = {"PATH": shims.SYSTEMD_PATH, "HOME": "/root", "LANG": "C.UTF-8", "TZ": "UTC", "TERM": "dumb",
           "CLUBSNAP_KDF_COST": "12", "AWS_ENDPOINT_URL": moto_server.endpoint, "RUNBOOK_ROOT": str(ROOT),
           "RUNBOOK_VOLUMES": f"club-data={shims.CLUB_DATA}", "RUNBOOK_CLUB_PORT": str(port)}
    substitute = {"localhost:8080": f"localhost:{port}"}
    box = sandbox.Sandbox(tmp_path / "machine", [ROOT, Path(sys.prefix), Path(sys.base_prefix)])
    _prepare(box)
    try:
        box.start()
        started = box.run(["systemctl", "start", "club"], env)
        assert started.returncode == 0, started.stderr
        for step in steps:
            _perform(box, step, env, substitute)
        _finish(box, env)
    finally:
        box.stop()


def _perform(box: sandbox.Sandbox, step: Step, env: dict[str, str], substitute: dict[str, str]) -> None:
    where = f"operations.md:{step.line}"
    if step.kind == "same-as":
        assert step.text == (ROOT / step.arg).read_text(), f"{where}: the block differs from {step.arg}"
        return
    text = step.text
    for placeholder, value in substitute.items():
        text = text.replace(placeholder, value)
    if step.kind == "file":
        done = box.run(["sh", "-c", 'cat > "$1"', "file", step.arg], env, stdin=text)
        assert done.returncode == 0, f"{where}: writing {step.arg}: {done.stderr}"
        return
    if step.kind == "hook":
        done = box.run([sys.executable, "-m", "tests.runbook.hooks", step.text], {**env, "PYTHONPATH": str(ROOT)})
        assert done.returncode == 0, f"{where}: hook {step.text}: {done.stderr[-3000:]}"
        substitute.update(json.loads(done.stdout.splitlines()[-1]).get("substitute", {}))
        return
    done = box.run(["bash", "-euo", "pipefail", "-c", text], env, cwd=CHECKOUT)
    assert done.returncode == int(step.arg), (f"{where}: exit {done.returncode}, expected {step.arg}\n{text}\n"
                                              f"stdout: {done.stdout[-3000:]}\nstderr: {done.stderr[-3000:]}")
    if done.returncode:
        assert (done.stderr + done.stdout).strip(), f"{where}: failed without saying why"


def _finish(box: sandbox.Sandbox, env: dict[str, str]) -> None:
    """Every scheduler the runbook started stops cleanly: each start it logged has its
    orderly stop, with no failed job. Then both repositories pass a full check."""
    for stop in (["docker", "stop", "clubsnap"], ["systemctl", "stop", "clubsnap@offsite.service"]):
        stopped = box.run(stop, env)
        assert stopped.returncode == 0, stopped.stderr
    for name in ("clubsnap.service", "docker-clubsnap", "clubsnap@offsite.service"):
        status = box.run(["cat", f"{shims.STATE}/{name}.exit"], env).stdout.strip()
        log = box.run(["cat", f"{shims.STATE}/{name}.log"], env).stdout
        events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        starts = [e for e in events if e["event"] == "start"]
        stops = [e for e in events if e["event"] == "stop"]
        assert status == "0" and starts and len(stops) == len(starts), f"{name} exited {status}: {log[-3000:]}"
        assert all(e["failures"] == 0 for e in stops) and all(e.get("ok", True) for e in events), log[-3000:]
        assert not [e for e in events if e["event"] == "warning"], log[-3000:]  # e.g. an unwritable metrics file
    for config in ("/etc/clubsnap/config.toml", "/etc/clubsnap/offsite.toml"):
        checked = box.run(["clubsnap", "--config", config, "check", "--read-data"], env)
        assert checked.returncode == 0, f"{config}: {checked.stdout}{checked.stderr}"


def test_every_fenced_block_is_accounted_for() -> None:
    """The parser's own rules, on a runbook of one of each (and a stray block)."""
    sample = ("```sh\ntrue\n```\n<!-- runbook: exit 3 -->\n  ```sh\n  false\n  ```\n<!-- runbook: hook x -->\n"
              "<!-- runbook: file /etc/a -->\n```toml\na = 1\n```\n")
    assert [(s.kind, s.text, s.arg) for s in parse(sample)] == [
        ("run", "true\n", "0"), ("run", "false\n", "3"), ("hook", "x", ""), ("file", "a = 1\n", "/etc/a")]
    with pytest.raises(AssertionError, match="neither run nor a file"):
        list(parse("```toml\na = 1\n```\n"))


def test_exit_code_tables_match_the_errors() -> None:
    """The runbook's and the CLI reference's exit codes are those clubsnap returns."""
    codes = {0, errors.EXIT_PARTIAL, errors.EXIT_INTERRUPTED, errors.EXIT_BROKEN_PIPE} | {cls.exit_code for cls in _subclasses(errors.EngineError) | {errors.EngineError}}
    for doc in (DOC, ROOT / "docs" / "cli.md"):
        table = re.split(r"^## (?:\d+\. )?Exit codes$", doc.read_text(), flags=re.MULTILINE)[1]
        listed = {int(m) for m in re.findall(r"^\| (\d+) \|", table, re.MULTILINE)}
        assert listed == codes, f"{doc.name}: {sorted(listed ^ codes)}"


def _subclasses(cls: type) -> set[type]:
    found = set(cls.__subclasses__())
    return found | {sub for child in found for sub in _subclasses(child)}


def test_compose_file_matches_the_docker_run_line() -> None:
    """contrib/docker/compose.yaml mounts what the runbook's ``docker run`` mounts."""
    run = next(s.text for s in parse(DOC.read_text()) if s.kind == "run" and "docker run" in s.text)
    volumes = set(re.findall(r"-v (\S+)", run))
    hostname = re.search(r"--hostname (\S+)", run)
    compose = (ROOT / "contrib" / "docker" / "compose.yaml").read_text()
    service = compose.split("\n  clubsnap:\n", 1)[1].split("\nvolumes:", 1)[0]
    assert set(re.findall(r"^      - (\S+)$", service, re.MULTILINE)) == volumes
    assert hostname and re.search(rf"^    hostname: {re.escape(hostname.group(1))}\b", service, re.MULTILINE)
