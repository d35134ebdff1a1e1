"""Mutation testing of the code where a wrong line loses or hides data: `make mutation`.

mutmut (pinned in the ``mutation`` extra) plants one-line bugs in the functions listed in
``SCOPE``, one at a time, and runs the tests that reach each function. A mutant that no
test notices is a bug the suite would let through. This runner drives mutmut, scores each
concept, and writes ``docs/mutation.md``: the score per concept and every surviving
mutant with its verdict from ``benchmarks/mutation_verdicts/`` (equivalent: no test
can tell it from the code; or a test still to write). A verdict is keyed by mutant name
and the mutated line, so a mutant that moves or changes comes back unexplained.

Not part of CI: the full run takes hours on two cores. Runs are incremental: mutmut
keeps results in ``mutants/``; a run tries again only what survived (or never ran) the
last time, with the tests written since; ``--fresh`` starts over, ``--report`` only
rewrites the document from the stored results.

    python -m benchmarks.mutation                     # what is not yet killed
    python -m benchmarks.mutation --concept restore   # one concept
    python -m benchmarks.mutation --sample 150        # a fixed sample per concept
    python -m benchmarks.mutation --fresh             # everything again
    python -m benchmarks.mutation --report            # the document only
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VERDICTS = ROOT / "benchmarks" / "mutation_verdicts"  # one TOML file per concept
DOC = ROOT / "docs" / "mutation.md"
TARGET = 0.90

_BUILDER = "engine.snapshot.xǁ_SnapshotBuilderǁ"

# Concept -> mutmut name patterns (module.x_function / module.xǁClassǁmethod). Whole
# modules where the module is the concept; in snapshot.py and catalog.py only the
# functions that make the consistent cut, capture a database or keep the files cache.
SCOPE: dict[str, list[str]] = {
    "restore": ["engine.restore.*"],
    "prune": ["engine.prune.*"],
    "retention and forget": ["engine.retention.*", "engine.forget.*"],
    "consistent cut": [
        "engine.consistency.*",
        "engine.snapshot.x__create__*", "engine.snapshot.x__pin_and_look*",
        *(f"{_BUILDER}{m}__*" for m in ("mark", "rewind", "second_look", "_look_again", "_read_again",
                                        "report_lost", "pin_databases", "read_databases",
                                        "check_unsniffed")),
        "engine.snapshot.x__header_problem*", "engine.snapshot.x__quick_check*",
        "engine.snapshot.xǁ_Lookǁ*",
    ],
    "time parsing": ["engine.timespec.*"],
    "repository check": ["engine.verify.*"],
    "SQLite capture": [
        "engine.sources.sqlite.*",
        *(f"{_BUILDER}{m}__*" for m in ("_read_database", "_unchanged_since_parent", "_parent_map",
                                        "_store_pages", "_club_expectations")),
    ],
    "files cache": [
        "engine.catalog.xǁCatalogǁload_files*", "engine.catalog.xǁCatalogǁupdate_files*",
        *(f"{_BUILDER}{m}__*" for m in ("read_files", "_cache_hits", "_read_file", "_remember")),
        "engine.snapshot.xǁ_BucketCacheǁ*",
    ],
}

# mutmut's exit codes (mutmut/stats.py): a test failed (1, 3) or the mutant hung until
# the CPU limit (timeouts) means the suite noticed.
_KILLED = {1, 3, -24, 24, 152, 255, 36}
_SURVIVED = {0}
_NO_TESTS = {5, 33}


@dataclass
class Verdict:
    name: str
    line: str
    verdict: str  # "equivalent" or "to test"
    why: str


@dataclass
class Tally:
    killed: int = 0
    equivalent: int = 0
    survived: list[str] = field(default_factory=list)
    untested: list[str] = field(default_factory=list)
    unchecked: int = 0

    @property
    def counted(self) -> int:
        return self.killed + len(self.survived) + len(self.untested)

    @property
    def score(self) -> float | None:
        return self.killed / self.counted if self.counted else None


def concept_of(name: str) -> str | None:
    for concept, patterns in SCOPE.items():
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            return concept
    return None


def load_results() -> dict[str, int | None]:
    results: dict[str, int | None] = {}
    for meta in sorted((ROOT / "mutants" / "engine").rglob("*.meta")):
        results.update(json.loads(meta.read_text())["exit_code_by_key"])
    return results


def sample(results: dict[str, int | None], concepts: list[str], per_concept: int | None) -> dict[str, int | None]:
    """The mutants of the given concepts; with ``per_concept``, at most that many of each,
    the same ones every run (lowest SHA-256 of the name): a score from a few hundred
    mutants per concept is within a few points of the full one, in a fraction of the
    hours, and the sample does not move when tests change."""
    chosen: dict[str, list[str]] = {c: [] for c in concepts}
    for name in results:
        concept = concept_of(name)
        if concept in chosen:
            chosen[concept].append(name)
    if per_concept:
        for concept, names in chosen.items():
            chosen[concept] = sorted(names, key=lambda n: hashlib.sha256(n.encode()).digest())[:per_concept]
    return {n: results[n] for names in chosen.values() for n in names}


def load_verdicts() -> dict[str, Verdict]:
    verdicts: dict[str, Verdict] = {}
    for path in sorted(VERDICTS.glob("*.toml")):
        for m in tomllib.loads(path.read_text()).get("mutant", []):
            verdicts[m["name"]] = Verdict(m["name"], m["line"], m["verdict"], m["why"])
    return verdicts


def changed_line(name: str) -> str:
    """The mutated line(s) of one mutant, as mutmut shows them (``+`` lines of its diff)."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    diff = get_diff_for_mutant(name)
    plus = [line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    return " / ".join(plus)


# mutants/sitecustomize.py: imported first by every Python process whose path starts at
# mutants/ (the tests' CLI runs); see benchmarks/mutation_child.py.
_SITECUSTOMIZE = "from benchmarks.mutation_child import child_started\nchild_started()\n"


def run_mutmut(names: list[str], children: int) -> None:
    (ROOT / "mutants").mkdir(exist_ok=True)
    (ROOT / "mutants" / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    command = [sys.executable, "-m", "mutmut", "run", "--max-children", str(children), *names]
    # Byte code cached: each CLI run of a test imports modules mutmut has made ten times
    # larger, and compiling them again in every process triples the run.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    process = subprocess.Popen(command, cwd=ROOT, env=env)
    watch_for_hangs(process)
    if process.returncode not in (0, 1):
        sys.exit(f"mutation: mutmut exited with {process.returncode}")


HANG_S = 60  # a mutant's tests using under a second of CPU in this long are waiting forever


def watch_for_hangs(process: subprocess.Popen[bytes]) -> None:
    """mutmut limits a mutant by CPU time, which a mutant that makes prune wait, or a
    loop sleep, never uses up: it would hang the run. A worker whose process tree used
    under a second of CPU in ``HANG_S`` gets the signal of mutmut's own limit (SIGXCPU),
    so it counts as a timeout: the tests noticed."""
    seen: dict[int, list[tuple[float, float]]] = {}
    while process.poll() is None:
        time.sleep(5)
        now, trees = time.monotonic(), _worker_cpu()
        for pid, cpu in trees.items():
            history = seen.setdefault(pid, [])
            history.append((now, cpu))
            old = [(t, c) for t, c in history if now - t >= HANG_S]
            if old and cpu - old[-1][1] < 1.0:
                print(f"mutation: worker {pid} waits without working; stopping it as a timeout", flush=True)
                os.kill(pid, signal.SIGXCPU)
        seen = {pid: h for pid, h in seen.items() if pid in trees}


def _worker_cpu() -> dict[int, float]:
    """CPU seconds of each mutmut worker (its title starts "mutmut: "), children included."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    workers = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            title = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        if title.startswith(b"mutmut: "):
            workers.append(pid)
    totals = {}
    for worker in workers:
        total = 0.0
        for pid in cpu:
            ancestor = pid
            while ancestor > 1 and ancestor != worker:
                ancestor = parents.get(ancestor, 1)
            if ancestor == worker:
                total += cpu[pid]
        totals[worker] = total
    return totals


def report(results: dict[str, int | None], verdicts: dict[str, Verdict], concepts: list[str],
           per_concept: int | None) -> str:
    tallies = {c: Tally() for c in concepts}
    rows: dict[str, list[tuple[str, str, str, str]]] = {c: [] for c in concepts}
    stale: list[str] = []
    os.chdir(ROOT)
    for name, code in sorted(results.items()):
        concept = concept_of(name)
        if concept not in tallies:
            continue
        tally = tallies[concept]
        if code is None:
            tally.unchecked += 1
            continue
        if code in _KILLED:
            tally.killed += 1
            continue
        line = changed_line(name)
        verdict = verdicts.get(name)
        if verdict is not None and verdict.line != line:
            stale.append(name)
            verdict = None
        if verdict is not None and verdict.verdict == "equivalent":
            tally.equivalent += 1
            rows[concept].append((name, line, "equivalent", verdict.why))
            continue
        status = "no test reaches it" if code in _NO_TESTS else ("survived" if code in _SURVIVED else f"exit {code}")
        (tally.untested if code in _NO_TESTS else tally.survived).append(name)
        rows[concept].append((name, line, status, verdict.why if verdict else "unexplained: a test to write"))
    out = ["# Mutation testing", "",
           "What the suite notices of one-line bugs planted in the code that decides what is kept, restored",
           "and carried forward. Written by `make mutation` (`python -m benchmarks.mutation`, mutmut "
           f"{_mutmut_version()}); the concepts and their functions are `SCOPE` in `benchmarks/mutation.py`,",
           "the verdicts on survivors `benchmarks/mutation_verdicts/`. Score: killed (a test failed, or",
           "the mutant hung until its time limit) over all mutants that are not equivalent; a mutant no",
           f"test reaches counts as a survivor. Target: {TARGET:.0%} per concept.", "",
           f"Results as of {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
           + (f", on a fixed sample of at most {per_concept} mutants per concept (`--sample {per_concept}`: the"
              " same mutants every run, the ones with the lowest SHA-256 of their names; without it, all)."
              if per_concept else ", on every mutant in scope."), "",
           "| concept | mutants | killed | equivalent | survived | no test reaches it | not run | score |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for concept, t in tallies.items():
        total = t.counted + t.equivalent + t.unchecked
        score = "n/a" if t.score is None else f"{t.score:.1%}"
        out.append(f"| {concept} | {total} | {t.killed} | {t.equivalent} | {len(t.survived)} | "
                   f"{len(t.untested)} | {t.unchecked} | {score} |")
    out += ["", "## Surviving mutants", "",
            "Each with the mutated line and why it survives: equivalent (no observable difference), or",
            "the test still to write.", ""]
    for concept in concepts:
        if not rows[concept]:
            continue
        out += [f"### {concept}", "", "| mutant | mutated line | status | why |", "|---|---|---|---|"]
        for name, line, status, why in rows[concept]:
            out.append(f"| `{name.removeprefix('engine.')}` | `{_cell(line)}` | {status} | {_cell(why)} |")
        out.append("")
    if stale:
        out += ["Verdicts no longer matching their mutant (the code moved; look again): "
                + ", ".join(f"`{n}`" for n in stale), ""]
    return "\n".join(out)


def print_survivors(results: dict[str, int | None], verdicts: dict[str, Verdict], concepts: list[str]) -> None:
    """Each survivor without a current verdict, as a TOML entry for mutation_verdicts/,
    followed by its diff: what a test must tell apart from the code."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    os.chdir(ROOT)
    for name, code in sorted(results.items()):
        if concept_of(name) not in concepts or code is None or code in _KILLED:
            continue
        line = changed_line(name)
        known = verdicts.get(name)
        if known is not None and known.line == line:
            continue
        status = "no test reaches it" if code in _NO_TESTS else "survived"
        print(f"# {status}\n[[mutant]]\nname = {json.dumps(name, ensure_ascii=False)}\n"
              f"line = {json.dumps(line, ensure_ascii=False)}\nverdict = \"\"\nwhy = \"\"")
        print("\n".join("# " + d for d in get_diff_for_mutant(name).splitlines()[2:]) + "\n")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")


def _mutmut_version() -> str:
    from importlib.metadata import version

    return version("mutmut")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", action="append", choices=sorted(SCOPE), help="only this concept (repeatable)")
    parser.add_argument("--fresh", action="store_true",
                        help="forget stored results and which tests reach what; run every mutant again")
    parser.add_argument("--report", action="store_true", help="only rewrite docs/mutation.md from stored results")
    parser.add_argument("--survivors", action="store_true",
                        help="print the stored survivors (no run), as verdict entries to fill in")
    parser.add_argument("--sample", type=int, metavar="N",
                        help="at most N mutants per concept, the same ones every run (default: all)")
    parser.add_argument("--children", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args(argv)
    concepts = args.concept or list(SCOPE)
    if args.survivors:
        print_survivors(sample(load_results(), concepts, args.sample), load_verdicts(), concepts)
        return 0
    if not args.report:
        if args.fresh:
            for stored in [ROOT / "mutants" / "mutmut-stats.json", *(ROOT / "mutants").rglob("*.meta")]:
                stored.unlink(missing_ok=True)
        results = sample(load_results(), concepts, args.sample)
        # Incremental: a kill stands; what survived (or never ran) runs again, with any
        # tests written since. (Before the first run there is nothing to sample from: all.)
        names = ([n for n, code in results.items() if code not in _KILLED]
                 if results else [p for c in concepts for p in SCOPE[c]])
        if names:
            run_mutmut(names, args.children)
    os.chdir(ROOT)
    DOC.write_text(report(sample(load_results(), list(SCOPE), args.sample), load_verdicts(), list(SCOPE),
                          args.sample) + "\n")
    print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
