"""How well can a LoRA on the projection before a post-norm reproduce resid_post steering?

On a post-norm block (Gemma 2/3, OLMo-2) the MLP output y = down_proj(x) joins the residual as
N(y) = g ⊙ y / rms(y). To move the residual by v the module output must become some y' with
N(y') = N(y) + v; N's outputs lie on a shell, so the best any y' can do is the point of the ray
through u = (N(y) + v) / g (the "ideal delta" δ = y' − y, y' on that ray closest to y). This
script measures, on a tiny random model of the family (tests/test_families.py, layer 1, the
built-in prose: 60 documents to fit, 10 held out, 64 tokens each):

- the ideal δ's error: mean |N(y + δ) − N(y) − v| / |v| (a reference, not a strict bound:
  with non-uniform g the nearest shell point is not on that ray, and the norm's eps lets small
  outputs sit inside the shell; on OLMo-2 the rank-1 fit beats it at s = 1);
- a reduced-rank regression of δ on x (ridge OLS, then the top-r right singular directions of
  the fitted values), rank 1 and 16, on held-out tokens.

|v| is s times the mean |N(y)|, for s = 0.1, 0.3, 1. Random weights: the numbers show the
geometry of the norm, not what a trained Gemma gives.

    OMP_NUM_THREADS=1 PYTHONPATH=python python benches/bench_post_norm_reach.py [gemma2|olmo2]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from rank1fast.corpus import default_corpus  # noqa: E402
from rank1fast.models import load_model  # noqa: E402
from test_families import _with_vocab  # noqa: E402


def main(name: str) -> None:
    torch.manual_seed(0)
    tok = load_model(None, device="cpu", quiet=True)[1]
    model = _with_vocab(name, tok)
    layer = model.model.layers[1]
    module, norm = layer.mlp.down_proj, layer.post_feedforward_layernorm
    w = norm.weight.detach().double()
    g = (1 + w) if name.startswith("gemma") else w  # Gemma's RMSNorm scales by 1 + weight
    eps = getattr(norm, "eps", None) or norm.variance_epsilon

    def n(y: torch.Tensor) -> torch.Tensor:
        return g * y / torch.sqrt((y**2).mean(-1, keepdim=True) + eps)

    def run(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        h1 = module.register_forward_pre_hook(lambda _m, a: xs.append(a[0].detach()))
        h2 = module.register_forward_hook(lambda _m, _i, o: ys.append(o.detach()))
        try:
            for t in texts:
                with torch.no_grad():
                    model(**tok(t, return_tensors="pt", truncation=True, max_length=64))
        finally:
            h1.remove()
            h2.remove()
        flat = lambda ts: torch.cat([t.reshape(-1, t.shape[-1]) for t in ts]).double()  # noqa: E731
        return flat(xs), flat(ys)

    docs = default_corpus()
    x, y = run(docs[:60])
    xe, ye = run(docs[60:70])
    v0 = torch.as_tensor(np.random.default_rng(0).normal(size=y.shape[1]))
    v0 = v0 / v0.norm() * n(y).norm(dim=-1).mean()
    print(f"| {name}: |v| / mean|N(y)| | ideal δ | rank-1 fit (held out) | rank-16 fit |")
    print("| --- | --- | --- | --- |")
    for s in (0.1, 0.3, 1.0):
        v = s * v0

        def delta(x_: torch.Tensor, y_: torch.Tensor, v: torch.Tensor = v) -> torch.Tensor:
            u = (n(y_) + v) / g
            c = (u * y_).sum(-1, keepdim=True) / (u * u).sum(-1, keepdim=True)
            return c * u - y_

        def err(got: torch.Tensor, v: torch.Tensor = v) -> float:
            return float((got - v).norm(dim=-1).mean() / v.norm())

        d = delta(x, y)
        gram = x.T @ x
        gram += 1e-3 * torch.trace(gram) / gram.shape[0] * torch.eye(gram.shape[0], dtype=x.dtype)
        w_ols = torch.linalg.solve(gram, x.T @ d)
        _, _, vh = torch.linalg.svd(x @ w_ols, full_matrices=False)
        ideal = err(n(ye + delta(xe, ye)) - n(ye))
        fits = [err(n(ye + xe @ (w_ols @ vh[:r].T @ vh[:r])) - n(ye)) for r in (1, 16)]
        print(f"| {s} | {ideal:.3f} | {fits[0]:.3f} | {fits[1]:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gemma2")
