"""Command line: ``python -m benchmarks.clubgen {generate,day,live} OUT ...``; prints JSON."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .dataset import generate
from .day import one_day
from .profiles import DARTDOC_MODES, PROFILES
from .writer import LiveWriter


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.clubgen", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="create a club data dir")
    gen.add_argument("out", type=Path)
    gen.add_argument("--size", choices=sorted(PROFILES), default="tiny")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dartdoc-mode", choices=DARTDOC_MODES, default="blob")
    gen.add_argument("--no-scoring", action="store_true", help="no scores, dartdoc rows or docs")
    gen.add_argument("--sidecars", action="store_true", help="S3/GCS-style artifacts/package.json")
    day = sub.add_parser("day", help="apply one day of activity (leaves a non-empty -wal)")
    day.add_argument("out", type=Path)
    day.add_argument("--seed", type=int, default=0)
    day.add_argument("--day", type=int, default=1)
    live = sub.add_parser("live", help="run a club-like writer against the DB for a while")
    live.add_argument("out", type=Path)
    live.add_argument("--seconds", type=float, default=10.0)
    live.add_argument("--interval", type=float, default=0.005)
    live.add_argument("--publish-every", type=int, default=None)
    return parser


def _run(args: argparse.Namespace) -> dict[str, Any]:
    if args.command == "generate":
        return generate(args.out, args.size, args.seed, dartdoc_mode=args.dartdoc_mode,
                        scoring_enabled=not args.no_scoring, sidecars=args.sidecars)
    if args.command == "day":
        return one_day(args.out, args.seed, args.day)
    with LiveWriter(args.out, args.interval, args.publish_every) as writer:
        time.sleep(args.seconds)
    return {"commits": writer.commits, "publishes": writer.publishes, "busy": writer.busy}


def main(argv: list[str] | None = None) -> int:
    """Run one command and print its summary (plus wall time) as JSON on stdout."""
    args = _parser().parse_args(argv)
    started = time.perf_counter()
    result = _run(args)
    result["elapsed_s"] = round(time.perf_counter() - started, 3)
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
