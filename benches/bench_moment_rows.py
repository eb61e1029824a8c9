"""The price of capping the rows of the second moments at large widths (analyze moment_rows=).

Usage: python benches/bench_moment_rows.py [--dim 2048] [--rows 32768] [--caps 2048,4096,8192]

Writes a synthetic bf16 site (tests/synth.activations: a massive column, outliers, a low-rank
part) of --rows rows and a held-out file of 8,192 rows, then analyses it with each cap and
without one, and prints per run: the analysis time, the rows used for the second moments, the
held-out error the report gives (cross-validated on the capped rows) and the error of the
fitted direction on the held-out file, rms(b·x - 1) (numpy float64).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import rank1fast  # noqa: E402
from synth import activations, encode, write_safetensors  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=32768)
    ap.add_argument("--caps", default="2048,4096,8192")
    ap.add_argument("--dir", default=None, help="where to write the files (default: a temp dir)")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory(dir=args.dir)
    path = Path(tmp.name) / "acts.safetensors"
    x = activations(args.rows + 8192, args.dim, seed=3, massive_cv=0.1)
    data, _ = encode(x[: args.rows], "bfloat16")
    write_safetensors(path, {"h": ("bfloat16", (args.rows, args.dim), data)})
    # The held-out rows as the analysis sees them (rounded to bf16), in float64.
    held, _ = encode(x[args.rows :], "bfloat16")
    held = (np.frombuffer(held, np.uint16).astype(np.uint32) << 16).view(np.float32)
    held = held.reshape(-1, args.dim).astype(np.float64)
    del x, data
    print(
        f"{args.rows:,} x {args.dim} bf16 ({path.stat().st_size / 2**30:.2f} GiB), held-out "
        f"{len(held):,} rows; load average {os.getloadavg()[0]:.1f}"
    )
    print("| moment_rows | rows used | analyze s | error (report, CV) | on the held-out file |")
    print("| --- | --- | --- | --- | --- |")
    for cap in [*(int(c) for c in args.caps.split(",")), None]:
        t = time.perf_counter()
        s = rank1fast.analyze(path, moment_rows=cap, progress=False)["h"]
        seconds = time.perf_counter() - t
        b = s.direction.vector
        err = float(np.sqrt(np.mean((held @ b - 1.0) ** 2)))
        print(
            f"| {cap or 'all'} | {s.moment_count:,} | {seconds:.1f} | {s.direction.error:.3e} "
            f"| {err:.3e} |"
        )


if __name__ == "__main__":
    main()
