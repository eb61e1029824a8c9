"""Widths of large models: analyze + the constant direction at d = 4,096 .. 28,672 (issue 20).

Usage: python benches/bench_width.py [--dims 4096,8192,14336,28672] [--rows 8192,16384,4096,4096]
       [--folds 5,5,5,2] [--threads 2] [--solver auto] [--exact-max 14336] [--dir /tmp]

For each (dim, rows): writes a synthetic bfloat16 [rows, dim] safetensors file drawn from a
distribution with the structure of real activations (four massive mean dimensions varying by 1 %,
256 shared
factors with a decaying spectrum, per-dimension noise whose scales span two decades), runs
``rank1fast.analyze`` + ``report["h"].direction`` in a fresh child process and reports wall
time, CPU time (user + sys, from ``getrusage``) and peak RSS of the child, the solver used and
its subspace. The direction is then scored on a fresh sample of the same distribution (4,096
new rows): rms(b·x − 1), against the exact ridge solution at the same ridge (a float64
LU solve of the whole second moment, in numpy, where ``dim <= --exact-max``; its time is
not part of the analysis). ``--solver exact`` times the exact cross-validated path instead.
Files are deleted after each case; check ``df -h`` for room (rows x dim x 2 bytes).
At d = 28,672 five folds of float64 second moments need 33 GB: analyze refuses them and
names ``folds=2`` (13 GB), which the default grid uses there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FACTORS = 256
TEST_ROWS = 4096


def distribution(dim: int, seed: int = 0) -> dict:
    """The parameters of the synthetic activation distribution at width ``dim``."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(scale=0.05, size=dim)
    massive = rng.choice(dim, size=4, replace=False)
    mean[massive] = [300.0, -80.0, 40.0, 25.0]
    loadings = rng.normal(size=(FACTORS, dim)).astype(np.float32) / np.sqrt(dim)
    loadings *= (3.0 / (1.0 + np.arange(FACTORS)) ** 0.7)[:, None].astype(np.float32)
    noise = np.exp(rng.uniform(np.log(0.01), np.log(1.0), size=dim)).astype(np.float32)
    # The massive dimensions vary by 1 % (so no bfloat16 rounding makes one constant, which
    # would make b·x = 1 exact).
    noise[massive] = 0.01 * np.abs(mean[massive])
    return {"mean": mean, "loadings": loadings, "noise": noise}


def sample(dist: dict, rows: int, seed: int, chunk: int = 2048):
    """Yield float32 ``[<=chunk, dim]`` blocks of ``rows`` rows of the distribution."""
    rng = np.random.default_rng(seed)
    dim = dist["mean"].shape[0]
    for r0 in range(0, rows, chunk):
        n = min(chunk, rows - r0)
        z = rng.standard_normal((n, FACTORS), dtype=np.float32)
        x = z @ dist["loadings"]
        x += rng.standard_normal((n, dim), dtype=np.float32) * dist["noise"]
        x += dist["mean"].astype(np.float32)
        yield x


def bf16_bytes(x: np.ndarray) -> bytes:
    """Round-to-nearest-even bfloat16 encoding of float32 values."""
    b = x.astype(np.float32).view(np.uint32)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16).tobytes()


def bf16_values(x: np.ndarray) -> np.ndarray:
    b = x.astype(np.float32).view(np.uint32)
    return (((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)


def write_dump(path: Path, dist: dict, rows: int) -> None:
    dim = dist["mean"].shape[0]
    meta = {"h": {"dtype": "BF16", "shape": [rows, dim], "data_offsets": [0, rows * dim * 2]}}
    h = json.dumps(meta).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h)
        for x in sample(dist, rows, seed=1):
            f.write(bf16_bytes(x))


CHILD = """
import json, resource, sys, time
import numpy as np, rank1fast
path, threads, solver, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
folds = int(sys.argv[6])
t0, c0 = time.perf_counter(), time.process_time()
r = rank1fast.analyze(path, threads=threads, progress=False, solver=solver, folds=folds)
s = r["h"]
t1, c1 = time.perf_counter(), time.process_time()
d = s.direction
t2, c2 = time.perf_counter(), time.process_time()
ru = resource.getrusage(resource.RUSAGE_SELF)
res = dict(analyze_s=t1 - t0, solve_s=t2 - t1, cpu_s=ru.ru_utime + ru.ru_stime,
           rss=ru.ru_maxrss * 1024, method=d.method, subspace=d.subspace, steps=d.steps,
           ridge=d.ridge, cv_error=d.error, rows=s.moment_count)
np.save(out + ".b.npy", d.vector)
json.dump(res, open(out + ".json", "w"))
if sys.argv[5] == "1":
    g = s.second_moment
    m = s.moment_mean
    t = np.trace(g) / g.shape[0]
    np.fill_diagonal(g, np.diag(g) + d.ridge * t)
    np.save(out + ".exact.npy", np.linalg.solve(g, m))
"""


def fresh_error(dist: dict, b: np.ndarray) -> float:
    """rms(b·x − 1) over TEST_ROWS new rows (bfloat16 values, as in the dump)."""
    sq, n = 0.0, 0
    for x in sample(dist, TEST_ROWS, seed=2):
        e = bf16_values(x).astype(np.float64) @ b - 1.0
        sq += float(e @ e)
        n += len(e)
    return (sq / n) ** 0.5


def run_case(dim: int, rows: int, folds: int, args, tmp: Path) -> dict:
    need = rows * dim * 2
    free = shutil.disk_usage(tmp).free
    if need > free - (2 << 30):
        raise SystemExit(f"{tmp}: {free / 2**30:.1f} GiB free, the dump needs {need / 2**30:.1f}")
    dist = distribution(dim)
    path = tmp / f"w{dim}.safetensors"
    t = time.perf_counter()
    write_dump(path, dist, rows)
    made = time.perf_counter() - t
    out = str(tmp / f"w{dim}")
    exact = "1" if dim <= args.exact_max else "0"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    try:
        subprocess.run(
            [sys.executable, "-c", CHILD, str(path), str(args.threads), args.solver, out, exact]
            + [str(folds)],
            check=True,
            env=env,
        )
    finally:
        path.unlink()
    res = json.load(open(out + ".json"))
    res.update(dim=dim, folds=folds, written_s=made)
    res["fresh_error"] = fresh_error(dist, np.load(out + ".b.npy"))
    if exact == "1":
        res["fresh_exact"] = fresh_error(dist, np.load(out + ".exact.npy"))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="4096,8192,14336,28672")
    ap.add_argument("--rows", default="8192,16384,4096,4096")
    ap.add_argument("--folds", default="5,5,5,2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--solver", default="auto", choices=["auto", "exact", "krylov"])
    ap.add_argument("--exact-max", type=int, default=14336)
    ap.add_argument("--dir", default=None, help="where to write the dumps (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    dims = [int(v) for v in args.dims.split(",")]
    rows = [int(v) for v in args.rows.split(",")]
    folds = [int(v) for v in args.folds.split(",")]
    folds += [folds[-1]] * (len(dims) - len(folds))
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if "model name" in ln),
        platform.processor(),
    )
    print(f"CPU: {cpu}; {os.cpu_count()} cores; threads {args.threads}; solver {args.solver}")
    head = (
        f"{'dim':>6} {'rows':>6} {'folds':>5} {'wall s':>7} {'(solve)':>7} {'cpu s':>7} "
        f"{'peak RSS':>9} "
        f"{'method':>7} {'k':>4} {'cv err':>8} {'fresh err':>9} {'exact':>9} {'price':>7}"
    )
    print(head)
    results = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for dim, n, k in zip(dims, rows, folds):
            r = run_case(dim, n, k, args, Path(tmp))
            r["rows_asked"] = n
            results.append(r)
            ex = r.get("fresh_exact")
            price = f"{100 * (r['fresh_error'] / ex - 1):+.2f}%" if ex else "-"
            print(
                f"{dim:>6} {n:>6} {k:>5} {r['analyze_s'] + r['solve_s']:>7.1f} "
                f"{r['solve_s']:>7.1f} "
                f"{r['cpu_s']:>7.1f} {r['rss'] / 2**30:>7.2f} G {r['method']:>7} "
                f"{r['subspace']:>4} {r['cv_error']:>8.5f} {r['fresh_error']:>9.5f} "
                f"{ex if ex else float('nan'):>9.5f} {price:>7}",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "results": results}, indent=1))


if __name__ == "__main__":
    main()
