"""Peak resident memory of analyze from a 1 GiB to an 8 GiB dump (issue 5, target 4).

Usage: python benches/bench_memory.py [--gib 1 8] [--dim 1024] [--dtype bfloat16] [--threads 2]

For each size, writes a synthetic [n, dim] safetensors file (bench_analyze.make_file), runs
`rank1fast.analyze` with second moments in a fresh child process and reads the child's peak
RSS (its own `getrusage(RUSAGE_SELF).ru_maxrss`; mapped file pages count while resident, which is
why the analyzer releases the pages it has processed). The budget the issue sets is
folds x dim² x 8 bytes + 256 MiB; the analyzer holds one float64 moment accumulator per worker
thread, so the bound it should meet is threads x folds x dim² x 8 + the interpreter.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_analyze import make_file  # noqa: E402

CHILD = """
import resource, sys, time, rank1fast
t = time.perf_counter()
r = rank1fast.analyze(sys.argv[1], threads=int(sys.argv[2]), folds=5, progress=False)
s = r["h"].stats
print(s.count, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss(path: Path, threads: int) -> tuple[int, float, int]:
    """(peak RSS in bytes, seconds, rows) of one analyze in a child process."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(threads)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return int(out[2]) * 1024, float(out[1]), int(out[0])  # ru_maxrss is in KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, nargs="+", default=[1.0, 8.0])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where to write the files (default: a temp dir)")
    args = ap.parse_args()

    folds, d = 5, args.dim
    acc = folds * d * d * 8
    budget = acc + 256 * 2**20
    print(f"dim {d}, {args.dtype}, {args.threads} threads, folds {folds}")
    mib = 2**20
    print(f"folds x d^2 x 8 = {acc / mib:.0f} MiB; budget (+256 MiB) {budget / mib:.0f} MiB")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for gib in sorted(args.gib):
            path = Path(tmp) / f"x{gib:g}.safetensors"
            t = time.perf_counter()
            make_file(path, gib, d, args.dtype)
            made = time.perf_counter() - t
            rss, secs, n = peak_rss(path, args.threads)
            rows.append((gib, rss, secs, n))
            print(
                f"{gib:5.1f} GiB ({n:,} rows, written in {made:.0f} s): peak RSS "
                f"{rss / 2**20:7.0f} MiB, analyze {secs:.1f} s, "
                f"{'within' if rss <= budget else 'OVER'} budget",
                flush=True,
            )
            path.unlink()
    if len(rows) > 1:
        growth = rows[-1][1] - rows[0][1]
        print(f"growth from {rows[0][0]:g} to {rows[-1][0]:g} GiB: {growth / 2**20:+.0f} MiB")


if __name__ == "__main__":
    main()
