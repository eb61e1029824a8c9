"""The ``rank1fast`` command line: one subcommand per pipeline step.

Each pipeline module contributes its subcommand through an ``add_cli(subparsers)`` function
that registers a parser whose ``func`` default runs it; this file only assembles them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import Rank1Error

# Modules that contribute subcommands (imported lazily so `rank1fast analyze` never imports torch).
_COMMAND_MODULES: list[str] = [
    "collect",
    "distributed",
    "vectors",
    "adapter",
    "serving",
    "merging",
    "verify",
    "convert",
    "demo",
    "llamacpp",
    "explain",
]


def _analyze_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="statistics, outliers and constant directions of a dump",
        description=(
            "Stream a dump (a directory with manifest.json, a .safetensors or .npy file, or a "
            "directory of them) once and print, per site: token count, top outlier dimensions, "
            "the one-hot baseline error and the least-squares constant direction's held-out "
            "error rms(b.x - 1)."
        ),
    )
    p.add_argument("path", help="dump directory, .safetensors/.npy file, or directory of them")
    p.add_argument(
        "--site",
        action="append",
        dest="sites",
        metavar="S",
        help="analyse only this site (repeatable; default: all)",
    )
    p.add_argument(
        "--skip-positions",
        type=int,
        default=1,
        metavar="K",
        help="drop tokens at position < K (default 1: drop BOS)",
    )
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    p.add_argument(
        "--no-second-moments",
        action="store_true",
        help="statistics and one-hot only (no least-squares direction); much faster",
    )
    p.add_argument(
        "--moment-rows",
        type=int,
        default=None,
        metavar="N",
        help="use about N rows per site (whole chunks spread over the dump) for the second "
        "moments and the direction; all rows still count in the statistics. For large "
        "widths (8192-16384); the direction's held-out error shows the price",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="worker threads (default: all cores; with --ray: threads per task, default 1)",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help=(
            "analyse on a Ray cluster, one task per shard (files must be readable from every "
            "worker); ADDRESS as ray.init takes it (ray://HOST:PORT, HOST:6379, auto); "
            "without one: RAY_ADDRESS, else a local cluster. Put it after PATH or use "
            "--ray=ADDRESS. Needs pip install 'rank1fast[ray]'"
        ),
    )
    p.add_argument(
        "--solver",
        choices=["auto", "exact", "krylov"],
        default="auto",
        help=(
            "how the constant direction is solved: exact (a tridiagonalisation per fold), "
            "krylov (a randomized block Krylov subspace per fold, for large dims), auto "
            "(exact up to dim 2048; default)"
        ),
    )
    p.add_argument("--json", metavar="OUT", help="write a JSON summary to OUT")
    p.add_argument(
        "--save",
        metavar="REPORT.npz",
        help="save the full report (loadable with rank1fast.Report.load)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar, no table")
    p.set_defaults(func=_run_analyze)


def _run_analyze(args: argparse.Namespace) -> int:
    from .analysis import analyze

    report = analyze(
        args.path,
        sites=args.sites,
        skip_positions=args.skip_positions,
        folds=args.folds,
        second_moments=not args.no_second_moments,
        threads=args.threads,
        progress=False if args.quiet else None,
        cluster=None if args.ray is None else f"ray:{args.ray}" if args.ray else "ray",
        moment_rows=args.moment_rows,
        solver=args.solver,
    )
    if args.save:
        report.save(args.save)
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=2))
    if not args.quiet:
        print(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rank1fast",
        description="Steering vectors as rank-1 LoRA adapters: collect, analyze, write, verify.",
    )
    parser.add_argument("--version", action="version", version=f"rank1fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _analyze_cli(sub)
    for name in _COMMAND_MODULES:
        importlib.import_module(f"rank1fast.{name}").add_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except Rank1Error as e:
        print(f"rank1fast {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
