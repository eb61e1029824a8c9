"""Accuracy of every second-moment kernel this CPU has, on real activations, against float64.

Usage: python benches/bench_kernel_accuracy.py [DUMP] [--tokens 40000]

Without DUMP it first collects a bf16 dump of the default model (resid_mid.5, resid_mid.15,
resid_post.5, resid_post.15; --tokens tokens of the built-in corpus, about 1.5 min on 2
cores). For each
kernel (forced with RANK1FAST_GRAM) it analyses the dump and prints, per site, the error of
the covariance against numpy float64 on the same rows, relative to sd_i sd_j (max and median),
the cross-validated error of the constant direction, and how far that direction's
predictions b·x move from the portable kernel's (rms over the rows).
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("dump", nargs="?", help="a dump directory (default: collect one)")
    ap.add_argument("--tokens", type=int, default=40000)
    args = ap.parse_args()
    import rank1fast
    import torch
    from safetensors import safe_open

    dump = args.dump
    if dump is None:
        dump = os.path.join(tempfile.mkdtemp(), "dump")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "rank1fast",
                "collect",
                "--sites",
                "resid_mid.5,resid_mid.15,resid_post.5,resid_post.15",
                "--tokens",
                str(args.tokens),
                "--storage-dtype",
                "bfloat16",
                "--out",
                dump,
                "--quiet",
            ],
            check=True,
        )
    kernels = rank1fast._core.gram_kernels()[0]
    reports = {}
    for k in kernels:
        os.environ["RANK1FAST_GRAM"] = k
        reports[k] = rank1fast.analyze(dump, progress=False)
    os.environ.pop("RANK1FAST_GRAM")
    shards = sorted(glob.glob(f"{dump}/shard-*.safetensors"))
    for site in reports["portable"].sites:
        xs = []
        for s in shards:
            with safe_open(s, "pt") as f:
                x, pos = f.get_tensor(site).double(), f.get_tensor("position")
                xs.append(x[pos >= 1])  # analyze's default skip_positions=1
        x = torch.cat(xs).numpy()
        cov = np.cov(x, rowvar=False, bias=True)
        sd = np.sqrt(np.diag(cov))
        denom = np.outer(sd, sd) + 1e-30
        ratio = np.max(np.abs(x.mean(0)) / np.maximum(sd, 1e-30))
        print(f"\n{site}: {len(x):,} rows, d = {x.shape[1]}, largest |mean| / sd {ratio:.0f}")
        bp = reports["portable"][site].direction.vector
        for k, r in reports.items():
            s = r[site]
            err = np.abs(s.second_moment - np.outer(s.mean, s.mean) - cov) / denom
            moved = np.sqrt(np.mean((x @ (s.direction.vector - bp)) ** 2))
            print(
                f"  {k:<12} covariance error / (sd_i sd_j): max {err.max():.2e}, median "
                f"{np.median(err):.2e}; held-out error {s.direction.error:.6e}; "
                f"rms (b - b_portable)·x {moved:.1e}"
            )


if __name__ == "__main__":
    main()
