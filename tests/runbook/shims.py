"""``systemctl``, ``journalctl`` and ``docker`` for the runbook's sandbox.

Each does what the runbook asks of the real tool, by running what the unit file or the
image says, so a wrong ``ExecStart``, a missing ``Environment=`` or a volume the
container lacks fails the test as it would fail an operator:

- ``systemctl`` starts ``club`` (the stand-in, ``tests.runbook.club``) and any unit
  installed in ``/etc/systemd/system``: a ``Type=simple`` service in the background
  with its log in the journal, a ``oneshot`` one to completion. ``enable --now`` of a
  timer runs its service once, as the timer would when it fires. Services get systemd's
  clean environment plus their ``Environment=`` lines. ``daemon-reload`` checks the
  installed units with ``systemd-analyze verify`` where it exists.
- ``docker build`` reads the Dockerfile (its entrypoint, command, environment and health
  check); the image's clubsnap is the one installed in ``/usr/local/bin``, as the
  Dockerfile's ``pip install`` would make it. ``docker run`` starts the command in its
  own mount and UTS namespace with the ``-v`` mounts at their container paths
  (read-only ones really read-only), the image's and ``-e`` environment and the
  ``--hostname``; ``exec``, ``logs``, ``stop`` and ``inspect`` (health) act on it.

The test's own variables (``PASSTHROUGH``: the sandbox mark, a cheap key derivation,
the S3 endpoint standing in for AWS) reach every process started here.
"""

from __future__ import annotations

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
PASSTHROUGH = ("RUNBOOK_SANDBOX", "RUNBOOK_ROOT", "RUNBOOK_VOLUMES", "RUNBOOK_CLUB_PORT", "CLUBSNAP_KDF_COST", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
               "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "TZ")
CLUB_DATA = "/var/lib/club"
STOP_WAIT_S = 120.0


class Failed(Exception):
    """A command failed as the real tool would: message to stderr, exit 1."""


def passthrough() -> dict[str, str]:
    return {k: os.environ[k] for k in PASSTHROUGH if k in os.environ}


# ---- processes ------------------------------------------------------------------------------

def _pid(name: str) -> int | None:
    path = STATE / f"{name}.pid"
    try:
        pid = int(path.read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def _spawn(name: str, command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    STATE.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True, cwd="/")
    (STATE / f"{name}.pid").write_text(str(process.pid))
    return process


def _terminate(name: str, sig: int = signal.SIGTERM, wait_s: float = STOP_WAIT_S) -> int | None:
    """Stop a background process; its exit status is recorded in ``<name>.exit``."""
    pid = _pid(name)
    if pid is None:
        return None
    os.kill(pid, sig)
    deadline = time.monotonic() + wait_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
        status = -9
    else:
        status = _reaped_status(name)
    (STATE / f"{name}.exit").write_text(str(status))
    (STATE / f"{name}.pid").unlink(missing_ok=True)
    return status


def _reaped_status(name: str) -> int:
    """A detached process is not our child: its own wrapper records how it ended."""
    path = STATE / f"{name}.status"
    for _ in range(50):
        if path.exists() and path.read_text().strip():
            return int(path.read_text())
        time.sleep(0.1)
    return -1


def _wrapped(name: str, command: list[str]) -> list[str]:
    """Run ``command`` under a shell that writes its exit status where ``_terminate``
    finds it, and passes SIGTERM on (``exec`` would lose the status)."""
    status = STATE / f"{name}.status"
    status.unlink(missing_ok=True)
    # A trap interrupts `wait` (status 143); the second `wait` collects the child's own.
    script = (f'"$@" & child=$!; got=; trap \'got=1; kill -TERM $child\' TERM; wait $child; code=$?; '
              f'if [ -n "$got" ]; then wait $child; code=$?; fi; echo $code > {shlex.quote(str(status))}')
    return ["/bin/sh", "-c", script, name, *command]


# ---- systemctl --------------------------------------------------------------------------------

def _unit_file(unit: str) -> tuple[Path, str]:
    """The installed file of ``unit`` and its template instance (``%i``)."""
    path = UNITS / unit
    if path.exists():
        return path, ""
    stem, dot, kind = unit.rpartition(".")
    if "@" in stem:
        prefix, _, instance = stem.partition("@")
        template = UNITS / f"{prefix}@.{kind}"
        if template.exists():
            return template, instance
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


def _service_env(unit: dict[str, list[str]]) -> dict[str, str]:
    env = {"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8", **passthrough()}
    for line in unit.get("Service.Environment", []):
        for assignment in shlex.split(line):
            key, _, value = assignment.partition("=")
            env[key] = value
    for line in unit.get("Service.EnvironmentFile", []):
        optional, path = line.startswith("-"), line.lstrip("-")
        if not os.path.exists(path) and optional:
            continue
        for entry in Path(path).read_text().splitlines():
            if entry.strip() and not entry.lstrip().startswith("#"):
                key, _, value = entry.partition("=")
                env[key.strip()] = value.strip().strip('"')
    for directory in unit.get("Service.CacheDirectory", []):
        os.makedirs(f"/var/cache/{directory}", exist_ok=True)
    return env


def _name(unit: str) -> str:
    return unit if "." in unit else f"{unit}.service"


def _start(unit: str) -> None:
    unit = _name(unit)
    if unit == "club.service":
        return _start_club()
    if unit.endswith(".timer"):
        return _start(unit[:-len(".timer")] + ".service")  # the timer fires once
    spec = _unit(unit)
    env = _service_env(spec)
    log = STATE / f"{unit}.log"
    commands = [shlex.split(c.lstrip("-@+!")) for c in spec.get("Service.ExecStart", [])]
    if not commands:
        raise Failed(f"{unit} has no ExecStart=")
    if spec.get("Service.Type", ["simple"])[-1] == "oneshot":
        for command in commands:
            with open(log, "ab") as out:
                code = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                      cwd="/").returncode
            if code != 0:
                raise Failed(f"Job for {unit} failed because the control process exited with error code "
                             f"(status={code}). See \"journalctl -u {unit}\" for details.")
        return None
    if _pid(unit) is None:
        _spawn(unit, _wrapped(unit, commands[0]), env, log)
    return None


def _start_club() -> None:
    if _pid("club.service") is not None:
        return
    STATE.mkdir(parents=True, exist_ok=True)
    ready = STATE / "club.ready"
    ready.unlink(missing_ok=True)
    supports = (STATE / "club-supports").read_text().strip() if (STATE / "club-supports").exists() else "3"
    env = {"PATH": SYSTEMD_PATH, "PYTHONPATH": os.environ["RUNBOOK_ROOT"], **passthrough()}
    command = [sys.executable, "-m", "tests.runbook.club", CLUB_DATA, "--port", os.environ.get("RUNBOOK_CLUB_PORT", "8080"),
               "--supports", supports, "--ready", str(ready)]
    log = STATE / "club.service.log"
    process = _spawn("club.service", _wrapped("club.service", command), env, log)
    deadline = time.monotonic() + 60
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            _terminate("club.service", signal.SIGKILL, 5)
            reason = log.read_text().strip().splitlines()[-1:] if log.exists() else []
            raise Failed("Job for club.service failed because the control process exited with error code. "
                         + (f"club: {reason[0]}" if reason else ""))
        time.sleep(0.1)


def _stop(unit: str) -> None:
    unit = _name(unit)
    if unit.endswith(".timer"):
        return
    spec = _unit(unit) if unit != "club.service" else {}
    signame = spec.get("Service.KillSignal", ["SIGTERM"])[-1]
    status = _terminate(unit, getattr(signal, signame))
    if status not in (None, 0, 128 + signal.SIGTERM):  # systemd counts death by its SIGTERM as clean
        print(f"warning: {unit} exited with status {status} on stop", file=sys.stderr)


def _daemon_reload() -> None:
    if shutil.which("systemd-analyze") is None or not UNITS.exists():
        return
    units = sorted(str(p) for p in UNITS.iterdir() if p.name.startswith("clubsnap") and "@." not in p.name)
    if units:
        check = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True)
        problems = [line for line in (check.stdout + check.stderr).splitlines()
                    if "clubsnap" in line and "club.service" not in line]
        if check.returncode != 0 or problems:
            raise Failed("systemd-analyze verify: " + "; ".join(problems or [check.stderr.strip()]))


def systemctl(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--") or a == "--now"]
    if not args:
        raise Failed("usage: systemctl COMMAND [UNIT...]")
    verb, now, units = args[0], "--now" in args, [a for a in args[1:] if a != "--now"]
    actions: dict[str, Callable[[], object]] = {
        "daemon-reload": _daemon_reload,
        "start": lambda: [_start(u) for u in units],
        "stop": lambda: [_stop(u) for u in units],
        "restart": lambda: [(_stop(u), _start(u)) for u in units],
        "try-restart": lambda: [(_stop(u), _start(u)) for u in units if _pid(_name(u)) is not None],
        "enable": lambda: [_start(u) for u in units if now and _unit_file(_name(u))],
        "disable": lambda: [_stop(u) for u in units if now],
    }
    if verb in ("status", "is-active"):
        running = all(_pid(_name(u)) is not None for u in units)
        for unit in units:
            state = "active (running)" if _pid(_name(unit)) is not None else "inactive (dead)"
            print(f"{_name(unit)} - {state}" if verb == "status" else state.split()[0])
            if verb == "status":
                print("".join(_tail(STATE / f"{_name(unit)}.log", 5)), end="")
        return 0 if running else 3
    if verb not in actions:
        raise Failed(f"systemctl {verb}: not emulated")
    actions[verb]()
    return 0


def _tail(path: Path, count: int) -> list[str]:
    return path.read_text(errors="replace").splitlines(keepends=True)[-count:] if path.exists() else []


def journalctl(argv: list[str]) -> int:
    unit, count = None, 10
    items = iter(argv)
    for item in items:
        if item in ("-u", "--unit"):
            unit = next(items)
        elif item in ("-n", "--lines"):
            count = int(next(items))
    if unit is None:
        raise Failed("journalctl: give -u UNIT")
    print("".join(_tail(STATE / f"{_name(unit)}.log", count)), end="")
    return 0


# ---- docker -----------------------------------------------------------------------------------

def _instructions(dockerfile: Path) -> Iterator[tuple[str, str]]:
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            yield word.upper(), rest.strip()


def _build(argv: list[str]) -> None:
    tag, dockerfile, context = None, None, None
    items = iter(argv)
    for item in items:
        if item in ("-t", "--tag"):
            tag = next(items)
        elif item in ("-f", "--file"):
            dockerfile = Path(next(items))
        else:
            context = Path(item)
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
        elif word in ("ENTRYPOINT", "CMD"):
            image[word.lower()] = json.loads(rest)
        elif word == "VOLUME":
            image["volumes"] = json.loads(rest)
        elif word == "HEALTHCHECK":
            image["healthcheck"] = json.loads(rest[rest.index("CMD") + 3:].strip())
    if not shutil.which(str(image.get("entrypoint", [""])[0])):  # type: ignore[index]
        raise Failed(f"the image's entrypoint {image.get('entrypoint')} is not installed")
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


def _run(argv: list[str]) -> int:
    detach, name, hostname = False, None, None
    mounts: list[tuple[str, str, bool]] = []
    extra_env: dict[str, str] = {}
    items = iter(argv)
    rest: list[str] = []
    for item in items:
        if item in ("-d", "--detach", "--rm"):
            detach = detach or item != "--rm"
        elif item == "--name":
            name = next(items)
        elif item in ("-h", "--hostname"):
            hostname = next(items)
        elif item == "--restart":
            next(items)
        elif item in ("-v", "--volume"):
            parts = next(items).split(":")
            mounts.append((_volume_source(parts[0]), parts[1], parts[2:] == ["ro"]))
        elif item in ("-e", "--env"):
            key, _, value = next(items).partition("=")
            extra_env[key] = value
        elif item.startswith("-"):
            raise Failed(f"docker run {item}: not emulated")
        else:
            rest = [item, *items]
    if not rest:
        raise Failed("docker run: give an image")
    image = json.loads((STATE / "images" / f"{rest[0]}.json").read_text())
    for target in image["volumes"]:
        if target not in {m[1] for m in mounts}:
            mounts.append((_volume_source(f"{name or rest[0]}-{target.strip('/')}"), target, False))
    command = image.get("entrypoint", []) + (rest[1:] or image.get("cmd", []))
    env = {"PATH": SYSTEMD_PATH, "HOME": "/root", "HOSTNAME": hostname or "container", **image["env"], **extra_env,
           **passthrough()}
    script = ["set -e"]
    for source, target, read_only in mounts:
        script += [f"mkdir -p {shlex.quote(target)}", f"mount --bind {shlex.quote(source)} {shlex.quote(target)}"]
        if read_only:
            script.append(f"mount -o remount,bind,ro {shlex.quote(target)}")
    script += [f"hostname {shlex.quote(hostname or 'container')}", 'exec "$@"']
    container = ["unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c", "\n".join(script), "container",
                 "env", "-i", *(f"{k}={v}" for k, v in env.items()), *command]
    if not detach:
        return subprocess.run(container, stdin=subprocess.DEVNULL).returncode
    name = name or f"container-{int(time.time())}"
    if _pid(f"docker-{name}") is not None:
        raise Failed(f"Conflict. The container name \"/{name}\" is already in use")
    _spawn(f"docker-{name}", _wrapped(f"docker-{name}", container), env, STATE / f"docker-{name}.log")
    (STATE / f"docker-{name}.json").write_text(json.dumps({"image": rest[0], "env": env}))
    print(name)
    return 0


def _container_pid(name: str) -> int:
    """The container's own process: the one in its mount namespace, under the wrapper."""
    wrapper = _pid(f"docker-{name}")
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


def _exec(name: str, command: list[str], quiet: bool = False) -> int:
    pid = _container_pid(name)
    env = json.loads((STATE / f"docker-{name}.json").read_text())["env"]
    return subprocess.run(["nsenter", "-t", str(pid), "-m", "-u", "-r", "--wd", "env", "-i",
                           *(f"{k}={v}" for k, v in env.items()), *command], stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.DEVNULL if quiet else None
                          ).returncode


def _inspect(argv: list[str]) -> int:
    name = argv[-1]
    if "{{.State.Health.Status}}" not in " ".join(argv):
        raise Failed("docker inspect: only --format '{{.State.Health.Status}}' is emulated")
    image = json.loads((STATE / f"docker-{name}.json").read_text())["image"]
    check = json.loads((STATE / "images" / f"{image}.json").read_text()).get("healthcheck")
    if check is None:
        raise Failed(f"image {image} has no HEALTHCHECK")
    print("healthy" if _exec(name, check, quiet=True) == 0 else "unhealthy")
    return 0


def docker(argv: list[str]) -> int:
    if not argv:
        raise Failed("usage: docker COMMAND")
    verb, rest = argv[0], argv[1:]
    if verb == "build":
        _build(rest)
        return 0
    if verb == "run":
        return _run(rest)
    if verb == "exec":
        return _exec(rest[0], rest[1:])
    if verb == "logs":
        print("".join(_tail(STATE / f"docker-{rest[-1]}.log", 10_000)), end="")
        return 0
    if verb == "stop":
        status = _terminate(f"docker-{rest[-1]}", signal.SIGTERM, 10.0)
        (STATE / f"docker-{rest[-1]}.exit").write_text(str(status))
        print(rest[-1])
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
