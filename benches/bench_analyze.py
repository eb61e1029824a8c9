"""Time rank1fast.analyze against a tuned numpy loop and the raw read of the same file.

Usage: python benches/bench_analyze.py [--gib 1] [--dim 2048] [--dtype bfloat16] [--repeat 3]

Writes a synthetic [n, dim] activation file (safetensors) of the requested size, then times,
interleaved and best of --repeat runs, on a warm page cache:
  raw read     read every byte (the bandwidth limit)
  numpy        chunked memmap: decode to float32, float64 sum / sum of squares, min, max
  torch        the same loop in torch (native bf16/f16 decode), when torch is installed
  rank1fast    analyze(second_moments=False): the same statistics plus per-fold sums
  rank1fast+G  analyze(second_moments=True) on the first --moment-rows rows (reported as GFLOP/s)
and prints GB/s and ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import rank1fast  # noqa: E402
from synth import encode, write_safetensors  # noqa: E402

CHUNK_ROWS = 8192


def make_file(path: Path, gib: float, dim: int, dtype: str) -> int:
    esize = 4 if dtype == "float32" else 2
    n = int(gib * (1 << 30)) // (dim * esize)
    rng = np.random.default_rng(0)
    block = rng.normal(size=(CHUNK_ROWS, dim)).astype(np.float32)
    block[:, 3] += 300.0
    data, _ = encode(block, dtype)
    reps = n // CHUNK_ROWS
    n = reps * CHUNK_ROWS
    # Header first, then the same block repeated (content does not change the timing).
    write_safetensors(path, {"h": (dtype, (n, dim), b"")})
    header = path.read_bytes()
    import json
    import struct

    hlen = struct.unpack("<Q", header[:8])[0]
    meta = json.loads(header[8 : 8 + hlen])
    meta["h"]["data_offsets"] = [0, n * dim * esize]
    h = json.dumps(meta).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for _ in range(reps):
            f.write(data)
    return n


def data_offset(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def raw_read(path: Path) -> None:
    buf = bytearray(1 << 24)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def numpy_stats(path: Path, n: int, dim: int, dtype: str) -> np.ndarray:
    """The loop a user would write: chunked memmap, float32 decode, float64 accumulation."""
    off = data_offset(path)
    raw = np.memmap(
        path,
        dtype=np.uint16 if dtype == "bfloat16" else dtype,
        mode="r",
        offset=off,
        shape=(n, dim),
    )
    s = np.zeros(dim)
    sq = np.zeros(dim)
    mn = np.full(dim, np.inf, np.float32)
    mx = np.full(dim, -np.inf, np.float32)
    buf = np.empty((CHUNK_ROWS, dim), np.uint32)
    for r in range(0, n, CHUNK_ROWS):
        c = raw[r : r + CHUNK_ROWS]
        if dtype == "bfloat16":
            b = buf[: len(c)]
            np.left_shift(c, 16, out=b, dtype=np.uint32)
            x = b.view(np.float32)
        else:
            x = c.astype(np.float32)
        s += x.sum(0, dtype=np.float64)
        sq += np.einsum("ij,ij->j", x, x, dtype=np.float64)
        np.minimum(mn, x.min(0), out=mn)
        np.maximum(mx, x.max(0), out=mx)
    return s / n


def torch_stats(path: Path, n: int, dim: int, dtype: str) -> np.ndarray | None:
    """The same loop in torch (native bfloat16/float16 decode); None without torch."""
    try:
        import torch
    except ImportError:
        return None
    off = data_offset(path)
    raw = np.memmap(
        path,
        dtype=np.uint8,
        mode="r",
        offset=off,
        shape=(n * dim * (2 if dtype != "float32" else 4),),
    )
    with warnings.catch_warnings():  # read-only mmap: torch warns, we only read
        warnings.simplefilter("ignore")
        t = torch.frombuffer(raw, dtype=getattr(torch, dtype)).view(n, dim)
    s = torch.zeros(dim, dtype=torch.float64)
    sq = torch.zeros(dim, dtype=torch.float64)
    mn = torch.full((dim,), float("inf"))
    mx = torch.full((dim,), float("-inf"))
    for r in range(0, n, CHUNK_ROWS):
        x = t[r : r + CHUNK_ROWS].float()
        s += x.sum(0, dtype=torch.float64)
        sq += (x * x).sum(0, dtype=torch.float64)
        torch.minimum(mn, x.amin(0), out=mn)
        torch.maximum(mx, x.amax(0), out=mx)
    return (s / n).numpy()


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--moment-rows", type=int, default=65536, help="rows used for the second-moment timing"
    )
    ap.add_argument("--dir", default=None, help="where to write the file (default: a temp dir)")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory(dir=args.dir)
    path = Path(tmp.name) / "acts.safetensors"
    n = make_file(path, args.gib, args.dim, args.dtype)
    size = os.path.getsize(path)
    print(
        f"file: {n:,} x {args.dim} {args.dtype}, {size / 2**30:.2f} GiB; "
        f"{os.cpu_count()} cores; best of {args.repeat}"
    )
    raw_read(path)  # warm the page cache

    has_torch = torch_stats(path, min(n, CHUNK_ROWS), args.dim, args.dtype) is not None
    t = {"raw read": [], "numpy": [], **({"torch": []} if has_torch else {}), "rank1fast": []}
    for _ in range(args.repeat):  # interleaved, so drift hits every method alike
        t["raw read"].append(best(lambda: raw_read(path), 1))
        t["numpy"].append(best(lambda: numpy_stats(path, n, args.dim, args.dtype), 1))
        if has_torch:
            t["torch"].append(best(lambda: torch_stats(path, n, args.dim, args.dtype), 1))
        t["rank1fast"].append(
            best(lambda: rank1fast.analyze(path, second_moments=False, progress=False), 1)
        )
    mean_np = numpy_stats(path, n, args.dim, args.dtype)
    mean_r = rank1fast.analyze(path, second_moments=False, progress=False)["h"].mean
    assert np.allclose(mean_np, mean_r, rtol=1e-9, atol=1e-9), "results differ"

    gbps = {k: size / min(v) / 1e9 for k, v in t.items()}
    print(f"{'method':<14}{'seconds':>9}{'GB/s':>8}")
    for k, v in t.items():
        print(f"{k:<14}{min(v):>9.3f}{gbps[k]:>8.2f}")
    print(f"rank1fast / numpy    : {gbps['rank1fast'] / gbps['numpy']:.2f}x")
    if has_torch:
        print(f"rank1fast / torch    : {gbps['rank1fast'] / gbps['torch']:.2f}x")
        better = max(gbps["numpy"], gbps["torch"])
        print(f"rank1fast / better of numpy, torch: {gbps['rank1fast'] / better:.2f}x")
    print(f"rank1fast / raw read : {gbps['rank1fast'] / gbps['raw read']:.2f}x")

    # Second moments: a prefix of the same data, reported as real GFLOP/s of the Gram product.
    rows = min(args.moment_rows, n)
    sub = Path(tmp.name) / "moments.safetensors"
    x = np.random.default_rng(1).normal(size=(rows, args.dim)).astype(np.float32)
    data, _ = encode(x, args.dtype)
    write_safetensors(sub, {"h": (args.dtype, x.shape, data)})
    tg = best(lambda: rank1fast.analyze(sub, progress=False), args.repeat)
    tnp = best(
        lambda: [c.T @ c for c in np.array_split(x, max(1, rows // CHUNK_ROWS))], args.repeat
    )
    flop = 2.0 * rows * args.dim * args.dim
    print(f"second moments on {rows:,} rows (folds=5, statistics included):")
    print(f"  rank1fast   {tg:8.3f} s  {flop / 2 / tg / 1e9:7.1f} GFLOP/s (symmetric half)")
    print(f"  numpy X.T@X {tnp:8.3f} s  {flop / tnp / 1e9:7.1f} GFLOP/s (float32 BLAS, full)")
    print(f"  rank1fast / numpy: {tnp / tg:.2f}x")


if __name__ == "__main__":
    main()
