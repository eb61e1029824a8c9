"""Site semantics per family, measured on tiny random configs (hidden 64, 3 layers).

For every family of tests/test_families.py and s in (0.1, 1, 10): how far the residual stream
moves when ``rank1fast.steering`` adds s·v at ``resid_mid.1`` / ``resid_post.1``, against s·v
(max abs error / max |s·v|), read by plain hooks as the test reads it. For post-norm families
it also shows what steering the projection's output (``mlp.down_proj``, the raw path; what
``resid_post`` meant before the family table) does to the residual: the ratio
|moved| / |s·v|. Random weights: this measures the mapping's exactness, not fidelity on a
trained model.

    cd <repo> && OMP_NUM_THREADS=1 PYTHONPATH=python python benches/bench_families.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import rank1fast  # noqa: E402
from rank1fast.models import site_carrier  # noqa: E402
from test_families import FAMILIES, _capture  # noqa: E402


def main() -> None:
    ids = torch.tensor([[5, 17, 30, 99, 12, 7]])
    v = np.random.default_rng(1).normal(size=64)
    print("| family | site | hooked module | adapter | max rel. error (s = 0.1 / 1 / 10) |")
    print("| --- | --- | --- | --- | --- |")
    raw_rows = []
    for name, (build, reader) in FAMILIES.items():
        torch.manual_seed(0)
        model = build().eval()
        for kind in ("resid_mid", "resid_post"):
            site = f"{kind}.1"
            try:
                c = site_carrier(model, site)
            except rank1fast.SiteError:
                print(f"| {name} | {site} | (none: parallel block) | refused | - |")
                continue
            base_mid, base_post = _capture(model, ids, 1, reader)
            errs = []
            for s in (0.1, 1.0, 10.0):
                mid, post = _capture(model, ids, 1, reader, {site: s * v})
                moved = (mid - base_mid) if kind == "resid_mid" else (post - base_post)
                moved = moved.double().numpy()[0]
                errs.append(np.abs(moved - s * v).max() / np.abs(s * v).max())
            hook = c.hook.split(".1.", 1)[-1]
            print(
                f"| {name} | {site} | {hook} | {c.kind} | "
                + " / ".join(f"{e:.1e}" for e in errs)
                + " |"
            )
            if c.kind == "normed" and kind == "resid_post":
                ratios = []
                for s in (0.1, 1.0, 10.0):
                    _, post = _capture(model, ids, 1, reader, {c.module: s * v})
                    moved = (post - base_post).double().numpy()[0]
                    ratios.append(np.linalg.norm(moved, axis=-1).mean() / np.linalg.norm(s * v))
                raw_rows.append((name, c.module, ratios))
    print()
    print("| family | raw path steered | mean |moved| / |s·v| (s = 0.1 / 1 / 10) |")
    print("| --- | --- | --- |")
    for name, module, ratios in raw_rows:
        print(f"| {name} | {module} | " + " / ".join(f"{r:.3g}" for r in ratios) + " |")


if __name__ == "__main__":
    main()
