"""``systemctl``, ``journalctl`` and ``docker`` for the runbook's sandbox.

Each does what the runbook asks of the real tool, by running what the unit file or the
image says, so a wrong ``ExecStart``, a path the hardening leaves read-only or a volume
the container lacks fails the test as it would fail an operator:

- ``systemctl`` starts ``club`` (the stand-in, ``tests.runbook.club``; it returns once
  club serves or has failed, and a failed club shows in ``is-active``) and any unit
  installed in ``/etc/systemd/system``: a ``Type=simple`` service in the background with
  its log in the journal, a ``oneshot`` one to completion. Starting a timer runs its
  service once, as the timer would when it fires. A service gets systemd's clean
  environment plus its ``Environment=`` lines, and its sandboxing: ``ProtectSystem=strict``
  makes ``/`` and ``/run`` read-only except ``ReadWritePaths=`` and ``CacheDirectory=``;
  ``PrivateTmp=`` gives it an empty ``/tmp`` and ``/var/tmp``. ``daemon-reload`` checks the
  installed units with ``systemd-analyze verify`` where it exists.
- ``docker build`` reads the Dockerfile (its entrypoint, command, environment, volumes and
  health check); the image's clubsnap is the one installed in ``/usr/local/bin``, as the
  Dockerfile's ``pip install`` would make it. ``docker run`` starts the command in its
  own mount and UTS namespace with the ``-v`` mounts at their container paths
  (read-only ones really read-only), the image's environment and the ``--hostname``;
  ``exec``, ``logs``, ``stop``, ``start``, ``restart`` and ``inspect`` (health) act on it.

The test's own variables (``PASSTHROUGH``: where the checkout is, a cheap key derivation,
the S3 endpoint standing in for AWS, the machine's time zone) reach every process.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

STATE = Path("/run/runbook-shims")
UNITS = Path("/etc/systemd/system")
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PASSTHROUGH = ("RUNBOOK_ROOT", "RUNBOOK_VOLUMES", "RUNBOOK_CLUB_PORT", "CLUBSNAP_KDF_COST", "AWS_ENDPOINT_URL", "TZ")
CLUB_DATA = "/var/lib/club"
STOP_WAIT_S = 120.0
DOCKER_STOP_S = 10.0  # docker's default grace before SIGKILL


class Failed(Exception):
    """A command failed as the real tool would: message to stderr, exit 1."""


def passthrough() -> dict[str, str]:
    return {k: os.environ[k] for k in PASSTHROUGH if k in os.environ}


# ---- processes ------------------------------------------------------------------------------

def running(name: str) -> int | None:
    """The pid of the background process ``name``, if it runs."""
    try:
        pid = int((STATE / f"{name}.pid").read_text())
        return pid if Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z" else None
    except (OSError, ValueError, IndexError):
        return None


def _spawn(name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start ``command`` in the background under a shell that records its exit status
    (``<name>.status``) and passes SIGTERM on; output goes to ``<name>.log``."""
    STATE.mkdir(parents=True, exist_ok=True)
    status = STATE / f"{name}.status"
    status.unlink(missing_ok=True)
    # A trap interrupts `wait` (status 143); the second `wait` collects the child's own.
    script = (f'"$@" & child=$!; got=; trap \'got=1; kill -TERM $child\' TERM; wait $child; code=$?; '
              f'if [ -n "$got" ]; then wait $child; code=$?; fi; echo $code > {shlex.quote(str(status))}')
    with open(STATE / f"{name}.log", "ab") as out:
        process = subprocess.Popen(["/bin/sh", "-c", script, name, *command], env=env, stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd="/")
    (STATE / f"{name}.pid").write_text(str(process.pid))
    return process


def _terminate(name: str, wait_s: float) -> int | None:
    """SIGTERM, then SIGKILL after ``wait_s``; the exit status is kept in ``<name>.exit``."""
    pid = running(name)
    if pid is None:
        return None
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while running(name) and time.monotonic() < deadline:
        time.sleep(0.1)
    status = -9
    if running(name):
        os.killpg(pid, signal.SIGKILL)
    else:
        path = STATE / f"{name}.status"
        for _ in range(50):
            if path.exists() and path.read_text().strip():
                status = int(path.read_text())
                break
            time.sleep(0.1)
    (STATE / f"{name}.exit").write_text(str(status))
    return status


def _tail(path: Path, count: int) -> list[str]:
    return path.read_text(errors="replace").splitlines(keepends=True)[-count:] if path.exists() else []


# ---- systemctl --------------------------------------------------------------------------------

def _unit_file(unit: str) -> tuple[Path, str]:
    """The installed file of ``unit`` and its template instance (``%i``)."""
    path = UNITS / unit
    if path.exists():
        return path, ""
    stem, _, kind = unit.rpartition(".")
    prefix, at, instance = stem.partition("@")
    if at and (UNITS / f"{prefix}@.{kind}").exists():
        return UNITS / f"{prefix}@.{kind}", instance
    raise Failed(f"Unit {unit} not found.")


def _unit(unit: str) -> dict[str, list[str]]:
    """Section.Key -> values, in order (ExecStart may repeat); %i expanded."""
    path, instance = _unit_file(unit)
    parsed: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        parsed.setdefault(f"{section}.{key.strip()}", []).append(value.strip().replace("%i", instance))
    return parsed


def _name(unit: str) -> str:
    return unit if "." in unit else f"{unit}.service"


def _service_env(spec: dict[str, list[str]]) -> dict[str, str]:
    env = {"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8", **passthrough()}
    for line in spec.get("Service.Environment", []):
        for assignment in shlex.split(line):
            key, _, value = assignment.partition("=")
            env[key] = value
    return env


def _sandboxed(spec: dict[str, list[str]], command: list[str]) -> list[str]:
    """``command`` under the unit's ProtectSystem=strict, ReadWritePaths=,
    CacheDirectory= and PrivateTmp=, in a mount namespace of its own."""
    writable = [f"/var/cache/{d}" for line in spec.get("Service.CacheDirectory", []) for d in line.split()]
    for directory in writable:
        os.makedirs(directory, exist_ok=True)
    for line in spec.get("Service.ReadWritePaths", []):
        for path in line.split():
            if os.path.exists(path.lstrip("-")) or not path.startswith("-"):
                writable.append(path.lstrip("-"))
    script = ["set -e"]
    if spec.get("Service.ProtectSystem", ["no"])[-1] == "strict":
        script += [f"mount --bind {shlex.quote(p)} {shlex.quote(p)}" for p in writable]
        script += ["mount -o remount,bind,ro /", "mount -o remount,bind,ro /run"]
    if spec.get("Service.PrivateTmp", ["false"])[-1] in ("true", "yes"):
        script += ["mount -t tmpfs tmpfs /tmp", "mount -t tmpfs tmpfs /var/tmp"]
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join([*script, 'exec "$@"']), "unit",
            *command]


def _start(unit: str) -> None:
    unit = _name(unit)
    if unit == "club.service":
        return _start_club()
    if unit.endswith(".timer"):
        _unit_file(unit)
        (STATE / "timers").mkdir(parents=True, exist_ok=True)
        (STATE / "timers" / unit).touch()
        return _start(unit[:-len(".timer")] + ".service")  # the timer fires once
    spec = _unit(unit)
    env = _service_env(spec)
    commands = [_sandboxed(spec, shlex.split(c.lstrip("-@+!"))) for c in spec.get("Service.ExecStart", [])]
    if not commands:
        raise Failed(f"{unit} has no ExecStart=")
    if spec.get("Service.Type", ["simple"])[-1] != "oneshot":
        if running(unit) is None:
            _spawn(unit, commands[0], env)
        return None
    for command in commands:
        with open(STATE / f"{unit}.log", "ab") as out:
            code = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                  cwd="/").returncode
        if code != 0:
            raise Failed(f"Job for {unit} failed because the control process exited with error code "
                         f"(status={code}). See \"journalctl -u {unit}\" for details.")
    return None


def _start_club() -> None:
    """Start the stand-in; return once it serves, or has exited (then ``failed``)."""
    if running("club.service") is not None:
        return
    STATE.mkdir(parents=True, exist_ok=True)
    ready, failed = STATE / "club.ready", STATE / "club.failed"
    ready.unlink(missing_ok=True)
    failed.unlink(missing_ok=True)
    supports = (STATE / "club-supports").read_text().strip() if (STATE / "club-supports").exists() else "3"
    env = {"PATH": SYSTEMD_PATH, "PYTHONPATH": os.environ["RUNBOOK_ROOT"], **passthrough()}
    command = [sys.executable, "-m", "tests.runbook.club", CLUB_DATA, "--port", os.environ.get("RUNBOOK_CLUB_PORT", "8080"),
               "--supports", supports, "--ready", str(ready)]
    process = _spawn("club.service", command, env)
    deadline = time.monotonic() + 60
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            _terminate("club.service", 5)
            failed.touch()
            return
        time.sleep(0.1)


def _stop(unit: str) -> None:
    unit = _name(unit)
    if unit.endswith(".timer"):
        (STATE / "timers" / unit).unlink(missing_ok=True)
        return
    status = _terminate(unit, STOP_WAIT_S)
    if status not in (None, 0, 128 + signal.SIGTERM):  # systemd counts death by its SIGTERM as clean
        print(f"warning: {unit} exited with status {status} on stop", file=sys.stderr)


def _enable(unit: str, now: bool) -> None:
    _unit_file(_name(unit))
    (STATE / "enabled").mkdir(parents=True, exist_ok=True)
    (STATE / "enabled" / _name(unit)).touch()
    if now:
        _start(unit)


def _disable(unit: str, now: bool) -> None:
    (STATE / "enabled" / _name(unit)).unlink(missing_ok=True)
    if now:
        _stop(unit)


def _daemon_reload() -> None:
    if shutil.which("systemd-analyze") is None or not UNITS.exists():
        return
    units = sorted(str(p) if "@." not in p.name else p.name.replace("@.", "@check.")
                   for p in UNITS.iterdir() if p.name.startswith("clubsnap"))
    if units:
        check = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True)
        problems = [line for line in (check.stdout + check.stderr).splitlines() if "clubsnap" in line]
        if check.returncode != 0 or problems:
            raise Failed("systemd-analyze verify: " + "; ".join(problems or [check.stderr.strip()]))


def _state(unit: str) -> str:
    if running(_name(unit)) is not None or (STATE / "timers" / _name(unit)).exists():
        return "active"
    return "failed" if unit in ("club", "club.service") and (STATE / "club.failed").exists() else "inactive"


def systemctl(argv: list[str]) -> int:
    quiet, now = "--quiet" in argv, "--now" in argv
    args = [a for a in argv if not a.startswith("--")]
    if not args:
        raise Failed("usage: systemctl COMMAND [UNIT...]")
    verb, units = args[0], args[1:]
    if verb in ("status", "is-active", "is-enabled"):
        return _query(verb, units, quiet)
    if verb == "list-units":
        return _list_units(units, [a.split("=", 1)[1] for a in argv if a.startswith("--state=")])
    actions: dict[str, Callable[[str], object]] = {
        "start": _start, "stop": _stop,
        "try-restart": lambda u: running(_name(u)) is not None and (_stop(u), _start(u)),
        "enable": lambda u: _enable(u, now), "disable": lambda u: _disable(u, now)}
    if verb == "daemon-reload":
        _daemon_reload()
    elif verb in actions:
        for unit in units:
            actions[verb](unit)
    else:
        raise Failed(f"systemctl {verb}: not emulated")
    return 0


def _query(verb: str, units: list[str], quiet: bool) -> int:
    """``status``/``is-active``: 0 when every unit runs, else 3; ``is-enabled``: 0 or 1."""
    if verb == "is-enabled":
        enabled = [(STATE / "enabled" / _name(u)).exists() for u in units]
        if not quiet:
            print("\n".join("enabled" if e else "disabled" for e in enabled))
        return 0 if all(enabled) else 1
    for unit in units:
        if verb == "status":
            print(f"{_name(unit)} - {_state(unit)}")
            print("".join(_tail(STATE / f"{_name(unit)}.log", 5)), end="")
        elif not quiet:
            print(_state(unit))
    return 0 if all(_state(u) == "active" for u in units) else 3


def _list_units(patterns: list[str], states: list[str]) -> int:
    """``list-units --plain --no-legend [--state=S] [PATTERN...]``: units this emulation
    started (services with a process, timers started), one per line."""
    known = {p.name[:-len(".pid")] for p in STATE.glob("*.pid")} | {p.name for p in STATE.glob("timers/*")}
    for unit in sorted(u for u in known if not u.startswith("docker-")):
        state = _state(unit)
        if (not patterns or any(fnmatch.fnmatch(unit, p) for p in patterns)) and (not states or state in states):
            print(f"{unit} loaded {state} {'running' if state == 'active' else 'dead'} {unit}")
    return 0


def _options(argv: list[str], takes_value: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """The values of the options in ``takes_value`` (flag -> name), and the other words."""
    given: dict[str, str] = {}
    others: list[str] = []
    items = iter(argv)
    for item in items:
        if item in takes_value:
            given[takes_value[item]] = next(items)
        else:
            others.append(item)
    return given, others


def journalctl(argv: list[str]) -> int:
    given, _ = _options(argv, {"-u": "unit", "--unit": "unit", "-n": "lines", "--lines": "lines"})
    if "unit" not in given:
        raise Failed("journalctl: give -u UNIT")
    print("".join(_tail(STATE / f"{_name(given['unit'])}.log", int(given.get("lines", 10)))), end="")
    return 0


# ---- docker -----------------------------------------------------------------------------------

def _instructions(dockerfile: Path) -> Iterator[tuple[str, str]]:
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            yield word.upper(), rest.strip()


def _build(argv: list[str]) -> None:
    given, positional = _options(argv, {"-t": "tag", "--tag": "tag", "-f": "file", "--file": "file"})
    tag, context = given.get("tag"), Path(positional[-1]) if positional else None
    dockerfile = Path(given["file"]) if "file" in given else None
    if tag is None or context is None:
        raise Failed("docker build: give -t NAME and a context")
    image: dict[str, object] = {"env": {}, "volumes": []}
    for word, rest in _instructions(dockerfile or context / "Dockerfile"):
        if word == "COPY":
            for source in rest.split()[:-1]:
                if not (context / source).exists():
                    raise Failed(f"COPY failed: {source} not found in the build context")
        elif word == "ENV":
            key, _, value = rest.partition("=")
            image["env"][key] = value  # type: ignore[index]
        elif word in ("ENTRYPOINT", "CMD", "VOLUME"):
            image[word.lower()] = json.loads(rest)
        elif word == "HEALTHCHECK":
            image["healthcheck"] = json.loads(rest[rest.index("CMD") + 3:].strip())
    entrypoint = image.get("entrypoint") or [""]
    if not shutil.which(str(entrypoint[0])):  # type: ignore[index]
        raise Failed(f"the image's entrypoint {entrypoint} is not installed")
    (STATE / "images").mkdir(parents=True, exist_ok=True)
    (STATE / "images" / f"{tag}.json").write_text(json.dumps(image))
    print(f"Successfully tagged {tag}:latest (emulated: clubsnap as installed in /usr/local/bin)")


def _volume_source(source: str) -> str:
    if source.startswith("/"):
        return source
    named = dict(pair.split("=", 1) for pair in os.environ.get("RUNBOOK_VOLUMES", "").split(",") if pair)
    if source in named:
        return named[source]
    path = STATE / "volumes" / source
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _container(argv: list[str]) -> dict[str, object]:
    """What ``docker run`` was asked for: name, hostname, grace, mounts, image, command."""
    spec: dict[str, object] = {"detach": False, "name": None, "hostname": "container", "stop_s": DOCKER_STOP_S,
                               "mounts": []}
    items = iter(argv)
    for item in items:
        options = {"--name": "name", "--hostname": "hostname", "-h": "hostname"}
        if item in ("-d", "--detach"):
            spec["detach"] = True
        elif item in options:
            spec[options[item]] = next(items)
        elif item == "--stop-timeout":
            spec["stop_s"] = float(next(items))
        elif item == "--restart":
            next(items)
        elif item in ("-v", "--volume"):
            parts = next(items).split(":")
            spec["mounts"].append([_volume_source(parts[0]), parts[1], parts[2:] == ["ro"]])  # type: ignore[attr-defined]
        elif item.startswith("-"):
            raise Failed(f"docker run {item}: not emulated")
        else:
            spec["image"], spec["args"] = item, list(items)
    if "image" not in spec:
        raise Failed("docker run: give an image")
    return spec


def _launch(spec: dict[str, object]) -> int:
    image = json.loads((STATE / "images" / f"{spec['image']}.json").read_text())
    mounts: list[list[object]] = list(spec["mounts"])  # type: ignore[call-overload]
    for target in image["volumes"]:  # an anonymous volume for each VOLUME not mounted
        if target not in {m[1] for m in mounts}:
            mounts.append([_volume_source(f"{spec['name']}-{target.strip('/')}"), target, False])
    command = image.get("entrypoint", []) + (spec["args"] or image.get("cmd", []))
    env = {"PATH": SYSTEMD_PATH, "HOME": "/root", "HOSTNAME": spec["hostname"], **image["env"], **passthrough()}
    script = ["set -e"]
    for source, target, read_only in mounts:
        script += [f"mkdir -p {shlex.quote(str(target))}", f"mount --bind {shlex.quote(str(source))} {shlex.quote(str(target))}"]
        if read_only:
            script.append(f"mount -o remount,bind,ro {shlex.quote(str(target))}")
    script += [f"hostname {shlex.quote(str(spec['hostname']))}", 'exec "$@"']
    container = ["unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c", "\n".join(script), "container",
                 "env", "-i", *(f"{k}={v}" for k, v in env.items()), *command]
    if not spec["detach"]:
        return subprocess.run(container, stdin=subprocess.DEVNULL).returncode
    name = f"docker-{spec['name']}"
    if running(name) is not None:
        raise Failed(f"Conflict. The container name \"/{spec['name']}\" is already in use")
    _spawn(name, container, env)
    (STATE / f"{name}.json").write_text(json.dumps({**spec, "env": env}))
    return 0


def _container_pid(name: str) -> int:
    """The container's own process: the one in its mount namespace, under the wrapper."""
    wrapper = running(f"docker-{name}")
    if wrapper is None:
        raise Failed(f"Error response from daemon: container {name} is not running")
    own = os.readlink(f"/proc/{wrapper}/ns/mnt")
    queue = [wrapper]
    while queue:
        pid = queue.pop(0)
        if os.readlink(f"/proc/{pid}/ns/mnt") != own:
            return pid
        children = Path(f"/proc/{pid}/task/{pid}/children")
        queue += [int(c) for c in children.read_text().split()] if children.exists() else []
    raise Failed(f"container {name} has no process in its namespace")


def _saved(name: str) -> dict[str, object]:
    path = STATE / f"docker-{name}.json"
    if not path.exists():
        raise Failed(f"Error response from daemon: No such container: {name}")
    saved: dict[str, object] = json.loads(path.read_text())
    return saved


def _exec(name: str, command: list[str], quiet: bool = False) -> int:
    pid = _container_pid(name)
    env: dict[str, str] = _saved(name)["env"]  # type: ignore[assignment]
    return subprocess.run(["nsenter", "-t", str(pid), "-m", "-u", "-r", "--wd", "env", "-i",
                           *(f"{k}={v}" for k, v in env.items()), *command], stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.DEVNULL if quiet else None
                          ).returncode


def _inspect(argv: list[str]) -> int:
    name = argv[-1]
    if "{{.State.Health.Status}}" not in " ".join(argv):
        raise Failed("docker inspect: only --format '{{.State.Health.Status}}' is emulated")
    image = _saved(name)["image"]
    check = json.loads((STATE / "images" / f"{image}.json").read_text()).get("healthcheck")
    if check is None:
        raise Failed(f"image {image} has no HEALTHCHECK")
    print("healthy" if _exec(name, check, quiet=True) == 0 else "unhealthy")
    return 0


def _docker_stop(name: str) -> None:
    _terminate(f"docker-{name}", float(_saved(name)["stop_s"]))  # type: ignore[arg-type]


def docker(argv: list[str]) -> int:
    if not argv:
        raise Failed("usage: docker COMMAND")
    verb, rest = argv[0], argv[1:]
    if verb == "build":
        _build(rest)
        return 0
    if verb == "run":
        return _launch(_container(rest))
    if verb == "exec":
        return _exec(rest[0], rest[1:])
    if verb == "logs":
        _saved(rest[-1])
        print("".join(_tail(STATE / f"docker-{rest[-1]}.log", 10_000)), end="")
        return 0
    if verb in ("stop", "start", "restart"):
        for name in rest:
            if verb != "start":
                _docker_stop(name)
            if verb != "stop" and running(f"docker-{name}") is None:
                _launch(_saved(name))
            print(name)
        return 0
    if verb == "inspect":
        return _inspect(rest)
    raise Failed(f"docker {verb}: not emulated")


TOOLS: dict[str, Callable[[list[str]], int]] = {"systemctl": systemctl, "journalctl": journalctl, "docker": docker}


def main() -> int:
    tool, argv = sys.argv[1], sys.argv[2:]
    try:
        return TOOLS[tool](argv)
    except Failed as exc:
        print(str(exc), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
