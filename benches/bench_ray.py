"""Scaling of rank1fast.analyze(cluster="ray") from 1 to N local Ray workers.

Usage: python benches/bench_ray.py [--gib 2] [--dim 1024] [--shards 16] [--workers 1,2]
                                   [--repeat 2] [--no-second-moments] [--dir DIR]

Writes a synthetic dump (bfloat16 shards with position and document tensors, manifest.json)
of the requested size with numpy, then times on a warm page cache, best of --repeat:
  one process   rank1fast.analyze(threads=1) and (threads=N): the single-machine reference
  ray, w        a local Ray cluster of w CPUs (ray.init(num_cpus=w)), one task per shard,
                one Rust thread per task, partials merged in a tree
and prints seconds, GB/s and the speed-up over the first worker count. Runs are interleaved
(one round of every configuration per repeat). The dump is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import rank1fast  # noqa: E402
from synth import to_bf16_bits  # noqa: E402

BLOCK_ROWS = 4096
DOC_TOKENS = 512


def write_shard(path: Path, x: bytes, rows: int, dim: int, first_doc: int) -> None:
    """One shard: site "h" [rows, dim] bf16 (a block repeated), position, document."""
    pos = (np.arange(rows) % DOC_TOKENS).astype(np.int32)
    doc = (first_doc + np.arange(rows) // DOC_TOKENS).astype(np.int64)
    sizes = {"h": rows * dim * 2, "position": rows * 4, "document": rows * 8}
    header, offset = {}, 0
    for name, dtype, shape in (("h", "BF16", [rows, dim]), ("position", "I32", [rows])):
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [offset, offset + sizes[name]],
        }
        offset += sizes[name]
    header["document"] = {
        "dtype": "I64",
        "shape": [rows],
        "data_offsets": [offset, offset + sizes["document"]],
    }
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for _ in range(rows // BLOCK_ROWS):
            f.write(x)
        f.write(pos.tobytes())
        f.write(doc.tobytes())


def make_dump(root: Path, gib: float, dim: int, shards: int) -> int:
    rows = int(gib * (1 << 30)) // (dim * 2) // shards // BLOCK_ROWS * BLOCK_ROWS
    rng = np.random.default_rng(0)
    block = rng.normal(size=(BLOCK_ROWS, dim)).astype(np.float32)
    block[:, 3] += 300.0
    x = to_bf16_bits(block).tobytes()
    root.mkdir(parents=True)
    entries = []
    for s in range(shards):
        name = f"shard-{s:05d}.safetensors"
        write_shard(root / name, x, rows, dim, s * rows // DOC_TOKENS)
        entries.append({"file": name, "tokens": rows})
    manifest = {
        "format": "rank1fast.dump",
        "version": 1,
        "model": {"name": "synthetic"},
        "sites": {"h": {"module": "layers.0.proj", "dim": dim, "dtype": "bfloat16"}},
        "shards": entries,
        "tokens": rows * shards,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return rows * shards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-second-moments", action="store_true")
    ap.add_argument("--dir", default=None, help="where to write the dump (default: a temp dir)")
    args = ap.parse_args()

    import ray

    workers = [int(w) for w in args.workers.split(",")]
    moments = not args.no_second_moments
    tmp = Path(tempfile.mkdtemp(prefix="rank1fast-bench-ray-", dir=args.dir))
    try:
        dump = tmp / "dump"
        t = time.perf_counter()
        n = make_dump(dump, args.gib, args.dim, args.shards)
        size = sum(p.stat().st_size for p in dump.iterdir())
        print(
            f"dump: {args.shards} shards, {n:,} x {args.dim} bf16, {size / 2**30:.2f} GiB "
            f"(written in {time.perf_counter() - t:.1f} s); second moments: {moments}; "
            f"cores: {os.cpu_count()}; load average: {os.getloadavg()[0]:.1f}"
        )
        kw = {"second_moments": moments, "progress": False}
        ref = rank1fast.analyze(dump, **kw)
        times: dict[str, list[float]] = {}

        def timed(name: str, fn) -> None:
            t = time.perf_counter()
            rep = fn()
            times.setdefault(name, []).append(time.perf_counter() - t)
            np.testing.assert_allclose(rep["h"].mean, ref["h"].mean, rtol=1e-12, atol=1e-12)

        # Interleaved rounds, so that other load on the machine hits every run alike.
        for _ in range(args.repeat):
            for threads in sorted({1, max(workers)}):
                timed(
                    f"one process, threads={threads}",
                    lambda th=threads: rank1fast.analyze(dump, threads=th, **kw),
                )
            for w in workers:
                ray.init(num_cpus=w, include_dashboard=False, logging_level="ERROR")
                rank1fast.analyze(dump, cluster="ray", sites=["h"], second_moments=False)  # warm
                timed(f"ray, {w} worker(s)", lambda: rank1fast.analyze(dump, cluster="ray", **kw))
                ray.shutdown()
        rows = [(name, min(t)) for name, t in times.items()]
        base = dict(rows)[f"ray, {workers[0]} worker(s)"]
        print(f"\n| run | seconds | GB/s | vs ray, {workers[0]} worker(s) |")
        print("| --- | --- | --- | --- |")
        for name, sec in rows:
            print(f"| {name} | {sec:.2f} | {size / sec / 1e9:.2f} | {base / sec:.2f}x |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
