"""Time rank1fast.write_adapters against building the same adapters with PEFT.

Usage: python benches/bench_write_adapters.py [--adapters 1000] [--dim 4096] [--repeat 1]

One synthetic d x d site (a Llama o_proj) and --adapters steering vectors, each its own
rank-1 adapter (float32, r = 1), timed in one run on the same disk:

  write_adapters   write_adapters(report, {name: {site: v}}, out): the per-site work (module,
                   direction, sizes, the server check) once, then the Rust writer on 16
                   threads.
  ..., cold        the same on a report whose sink-pinned direction is not cached yet: adds
                   the one d x d solve of the pinning (seconds at d = 4096), once per report.
  ..., 1 thread    the same on one writer thread.
  write_adapter    a loop of write_adapter calls, one per adapter.
  peft save        the fastest PEFT way: one PeftModel around a module with a d x d Linear,
                   then per adapter copy A, B into lora_A/lora_B and save_pretrained.
  peft build       per adapter get_peft_model on that module, copy A, B, save_pretrained,
                   unload (the usual "build an adapter with PEFT" code).

PEFT gets b for free (not timed) and the same balanced A, B rank1fast writes; a sample of its
files is compared with rank1fast's. Runs are interleaved (best of --repeat), each after an
os.sync() so none pays for the previous one's unwritten pages. The site's least-squares
direction is solved once before timing by numpy at one ridge (the Rust solver's
cross-validated ridge grid takes ~2 minutes at d = 4096 on 2 cores and is shared by every
writer alike).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rank1fast
from rank1fast import _core
from rank1fast.report import Direction, Report, SiteReport

SITE = "resid_mid.20"
MODULE = "model.layers.20.self_attn.o_proj"


def synthetic_report(d: int, tokens: int = 200_000, folds: int = 2, seed: int = 0) -> Report:
    """A site whose statistics are those of ``x = mu + L z + 0.5 eps`` (exact moments)."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=d)
    mu[7], mu[42] = 300.0, -80.0  # massive dimensions, as in trained LLMs
    lo = rng.normal(size=(d, 16)) * 0.5
    cov = lo @ lo.T
    cov[np.diag_indices(d)] += 0.25
    raw = cov + np.outer(mu, mu)
    n = np.full(folds, tokens // folds, dtype=np.uint64)
    moment = np.empty((folds, d, d))
    for k in range(folds):
        np.multiply(raw, float(n[k]), out=moment[k])
    sd = np.sqrt(np.diag(cov))
    skipped = 1_000
    stats = _core.SiteStats(
        SITE,
        "bfloat16",
        d,
        folds,
        int(n.sum()),
        0,
        skipped,
        mu,
        np.diag(cov) * float(n.sum()),
        mu - 5 * sd,
        mu + 5 * sd,
        n,
        np.outer(n.astype(np.float64), mu),
        np.outer(n.astype(np.float64), mu**2 + np.diag(cov)),
        moment.reshape(-1),
        3.0 * mu * skipped,  # the sink: position 0 sits elsewhere
    )
    del moment
    site = SiteReport(stats)
    ridge = 1e-4
    g = raw + ridge * np.trace(raw) / d * np.eye(d)
    b = np.linalg.solve(g, mu)
    err = float(np.sqrt(max(b @ raw @ b - 2 * b @ mu + 1, 0.0)))
    # The cached property the Rust solver would fill (see the module docs).
    site.__dict__["direction"] = Direction(
        vector=b, ridge=ridge, error=err, ridges=np.array([ridge]), cv_errors=np.array([err])
    )
    return Report([site], skip_positions=1, modules={SITE: MODULE})


def balanced(b: np.ndarray, v: np.ndarray, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """lora_A row and lora_B column as the Rust writer makes them (equal norms)."""
    c = np.sqrt(np.linalg.norm(v) * abs(scale) / np.linalg.norm(b))
    return (c * b).astype(np.float32), (scale * v / c).astype(np.float32)


def time_rank1fast(report: Report, adapters: dict, root: Path, threads: int | None) -> float:
    t = time.perf_counter()
    rank1fast.write_adapters(report, adapters, root, threads=threads)
    return time.perf_counter() - t


def peft_model(d: int):
    import torch
    from peft import LoraConfig

    class Attn(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.o_proj = torch.nn.Linear(d, d, bias=False)

    class Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_attn = Attn()

    class Inner(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Identity()] * 20 + [Layer()])

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = Inner()

    config = LoraConfig(r=1, lora_alpha=1, target_modules=[MODULE], lora_dropout=0.0, bias="none")
    return Model(), config


def _set(peft, a: np.ndarray, b: np.ndarray) -> None:
    import torch

    lin = peft.base_model.model.model.layers[20].self_attn.o_proj
    with torch.no_grad():
        lin.lora_A["default"].weight.copy_(torch.from_numpy(a[None, :]))
        lin.lora_B["default"].weight.copy_(torch.from_numpy(b[:, None]))


def time_peft_save(d: int, factors: list, root: Path) -> float:
    from peft import get_peft_model

    base, config = peft_model(d)
    peft = get_peft_model(base, config)
    t = time.perf_counter()
    for i, (a, b) in enumerate(factors):
        _set(peft, a, b)
        peft.save_pretrained(root / f"a{i:05d}")
    return time.perf_counter() - t


def time_peft_build(d: int, factors: list, root: Path) -> float:
    from peft import get_peft_model

    base, config = peft_model(d)
    t = time.perf_counter()
    for i, (a, b) in enumerate(factors):
        peft = get_peft_model(base, config)
        _set(peft, a, b)
        peft.save_pretrained(root / f"a{i:05d}")
        base = peft.unload()
    return time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--adapters", type=int, default=1000)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=1, help="interleaved runs; best of (default 1)")
    p.add_argument("--no-loop", action="store_true", help="skip the write_adapter loop")
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    p.add_argument("--no-peft-build", action="store_true", help="skip the get_peft_model baseline")
    args = p.parse_args()
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        print("needs torch and peft for the baseline", file=sys.stderr)
        return 2

    d, n = args.dim, args.adapters
    t = time.perf_counter()
    report = synthetic_report(d)
    print(f"synthetic d={d} site built and solved in {time.perf_counter() - t:.1f} s (not timed)")
    rng = np.random.default_rng(1)
    vectors = [rng.normal(size=d) for _ in range(n)]
    adapters = {f"a{i:05d}": {SITE: v} for i, v in enumerate(vectors)}

    # PEFT gets what rank1fast writes: the site's sink-pinned b, balanced with each v.
    from rank1fast.adapter import _pin

    site = report[SITE]
    b_pinned, sink = _pin(site, site.direction.vector, site.sink_mean)
    factors = [balanced(b_pinned, v) for v in vectors]

    def cold(out: Path) -> float:
        rank1fast.adapter._PINNED.clear()  # forget the report's pinned direction
        return time_rank1fast(report, adapters, out, None)

    def loop(out: Path) -> float:
        t = time.perf_counter()
        for name, vecs in adapters.items():
            rank1fast.write_adapter(report, vecs, out / name)
        return time.perf_counter() - t

    runs = {
        "rank1fast write_adapters": lambda out: time_rank1fast(report, adapters, out, None),
        "rank1fast write_adapters, cold": cold,
        "rank1fast write_adapters, 1 thread": lambda out: time_rank1fast(report, adapters, out, 1),
        "rank1fast write_adapter loop": loop,
        "peft set weights + save_pretrained": lambda out: time_peft_save(d, factors, out),
    }
    if not args.no_peft_build:
        runs["peft get_peft_model + save_pretrained"] = lambda out: time_peft_build(d, factors, out)
    if args.no_loop:
        del runs["rank1fast write_adapter loop"]
    where = {name: f"run{i}" for i, name in enumerate(runs)}
    results: dict[str, float] = {}
    work = Path(tempfile.mkdtemp(prefix="bench-write-", dir=args.dir))
    try:
        for _ in range(args.repeat):  # interleaved, best of --repeat
            for name, run in runs.items():
                out = work / where[name]
                shutil.rmtree(out, ignore_errors=True)
                os.sync()  # no dirty pages left by the previous run (not timed)
                results[name] = min(run(out), results.get(name, float("inf")))

        from safetensors.numpy import load_file

        def tensors(path: Path) -> dict[str, np.ndarray]:
            return load_file(path / "adapter_model.safetensors")

        match = True
        for i in (0, n // 2, n - 1):
            ours = tensors(work / where["rank1fast write_adapters"] / f"a{i:05d}")
            theirs = tensors(work / where["peft set weights + save_pretrained"] / f"a{i:05d}")
            match &= set(ours) == set(theirs) and all(
                np.allclose(ours[k], theirs[k], rtol=1e-5, atol=1e-8) for k in ours
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    fast = results["rank1fast write_adapters"]
    print(f"\n{n} rank-1 adapters, one d={d} site, float32, sink pinned: {sink['pinned']}")
    print(f"{'writer':<42} {'total s':>9} {'ms/adapter':>11} {'vs write_adapters':>18}")
    for name, secs in results.items():
        print(f"{name:<42} {secs:>9.2f} {secs / n * 1e3:>11.3f} {secs / fast:>17.1f}x")
    peft = results["peft set weights + save_pretrained"]
    print(
        f"\nrank1fast.write_adapters is {peft / fast:.1f}x faster than PEFT's fastest path "
        f"({peft / results['rank1fast write_adapters, cold']:.1f}x counting the one-time "
        "sink-pinning solve of a cold report)"
    )
    print(f"PEFT files hold the same tensors: {match}")
    print(
        "rank1fast fsyncs every file and directory it writes (an adapter appears whole or not at "
        "all); PEFT's save_pretrained does not fsync"
    )
    print(f"command: python {' '.join([os.path.relpath(sys.argv[0]), *sys.argv[1:]])}")
    print(f"cores: {os.cpu_count()}, disk: {args.dir or tempfile.gettempdir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
