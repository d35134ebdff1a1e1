"""`make bench`: clubsnap against restic and borg on generated club data dirs (issue 3).

For each size and seed: generate the data dir, build the reference states and floors
(benchmarks.reference), run the same scenario for every tool (benchmarks.scenario),
evaluate the targets (benchmarks.targets). Then the frequent-snapshot scenario on the
small data set (benchmarks.frequent). Results: docs/benchmarks.md, plots in docs/, JSON
in benchmarks/results/. A restore that does not verify fails the run (exit 1).

--quick (the test suite runs it): tiny size, one seed, peers skipped, 5 frequent
snapshots, and every output (JSON, markdown, plots) in the work dir, docs left alone.
"""

from __future__ import annotations

import argparse
import os
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import reference, report
from benchmarks.checks import CheckFailed
from benchmarks.clubgen import generate
from benchmarks.frequent import run_frequent
from benchmarks.measure import CommandFailed
from benchmarks.peers import ROOT, Clubsnap, Tool, available_peers
from benchmarks.scenario import run_tool
from benchmarks.targets import frequent_targets, scenario_targets

CHEAP_REPEATS = {"medium": 1}  # repeats of the cheap steps when --repeat is not given; else 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="small,medium", help="comma-separated: tiny,small,medium")
    parser.add_argument("--seeds", default="1,2", help="comma-separated generator seeds")
    parser.add_argument("--repeat", type=int, help="runs of the cheap steps (default 3, 1 for medium)")
    parser.add_argument("--frequent-count", type=int, default=200, help="frequent snapshots (0: skip)")
    parser.add_argument("--no-peers", action="store_true", help="clubsnap only")
    parser.add_argument("--quick", action="store_true", help="tiny, peers skipped, outputs in the work dir")
    parser.add_argument("--work", default="bench-work", help="scratch directory (emptied first)")
    args = parser.parse_args(argv)
    if args.quick:
        os.environ.setdefault("CLUBSNAP_KDF_COST", "10")  # a cheap key derivation: the test suite runs this
        args.sizes, args.seeds, args.no_peers = "tiny", args.seeds.split(",")[0], True
        args.frequent_count = min(args.frequent_count, 5)
        args.repeat = args.repeat or 1
    return args


def run_case(size: str, seed: int, tools: list[type[Tool]], repeat: int, work: Path) -> dict[str, Any]:
    started = time.monotonic()
    template = work / "generated"
    generate(template, size, seed=seed)
    result: dict[str, Any] = {"size": size, "seed": seed, "repeat": repeat,
                              "generate_s": round(time.monotonic() - started, 1)}
    ref = reference.build(template, seed, work)
    result["data_bytes"] = ref.machine["bytes"]
    result["floor"] = {"bytes": ref.floor_bytes, "seconds": ref.floor_s, "machine": ref.machine}
    result["tools"] = {}
    for tool in tools:
        print(f"   {tool.name}", flush=True)
        result["tools"][tool.name] = run_tool(tool(work / tool.name), template, ref, seed, repeat)
    result["targets"] = scenario_targets(result)
    shutil.rmtree(template)
    return result


def frequent_case(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    size = "tiny" if args.quick else "small"
    seed = int(args.seeds.split(",")[0])
    template = work / "frequent-generated"
    generate(template, size, seed=seed)
    result = {"size": size, "seed": seed, **run_frequent(template, work, args.frequent_count)}
    result["targets"] = frequent_targets(result)
    shutil.rmtree(template)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.work).absolute()
    shutil.rmtree(work, ignore_errors=True)
    out_json = work / "results" if args.quick else ROOT / "benchmarks" / "results"
    out_doc = work if args.quick else ROOT / "docs"
    out_json.mkdir(parents=True, exist_ok=True)
    tools: list[type[Tool]] = [Clubsnap, *([] if args.no_peers else available_peers())]
    results, frequent = [], None
    try:
        for size in args.sizes.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                print(f"== {size}, seed {seed}", flush=True)
                result = run_case(size, seed, tools, args.repeat or CHEAP_REPEATS.get(size, 3), work / f"{size}-{seed}")
                (out_json / f"{size}-seed{seed}.json").write_text(json.dumps(result, indent=1, default=str))
                results.append(result)
        if args.frequent_count > 0:
            print(f"== frequent snapshots: {args.frequent_count}", flush=True)
            frequent = frequent_case(args, work)
            (out_json / "frequent.json").write_text(json.dumps(frequent, indent=1, default=str))
    except (CheckFailed, CommandFailed, LookupError) as exc:
        print(f"bench: FAILED: {exc}", file=sys.stderr)
        return 1
    plots = report.plot_frequent(frequent, out_doc) if frequent else {}
    command = "python -m benchmarks.run" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    doc = out_doc / "benchmarks.md"
    doc.write_text(report.markdown(command, results, frequent, plots))
    print(f"bench: wrote {doc} and {out_json}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
