"""Prototype: weighting tokens in the least-squares fit of b by how much the steering moves
their prediction (issue 18's "weighting tokens by how much their prediction depends on the
steering"). A negative result, kept so that anyone can rerun it.

Usage: OMP_NUM_THREADS=1 python benches/prototypes/token_weights.py [--site resid_post.5]

Default model, CPU, float32. The contrastive vector of ``site`` (built-in cheerful/gloomy
pairs) is calibrated to 0.5 nats on held-out chat; the site's module inputs are collected with
the hook steering on, over 40k tokens of the served fit corpus (rank1fast.corpus.served_corpus);
per token w_t = KL(p_hook || p_base) at that position. b minimises sum_t w_t (b.x_t - 1)^2 +
ridge (5-fold CV over the same weights), for w = 1 (convert's fit, no sink pinning), w_t,
sqrt(w_t) and (1 + w_t/mean)/2. Each b is applied as the LoRA would (a hook adding (x.b) v at
the module output, the adapter's exact arithmetic) and scored by KL(hook||adapter)/KL(hook||base)
on 24 held-out served texts. Takes ~40 min on 2 busy cores.
"""

import argparse

import numpy as np
import rank1fast
import torch
from rank1fast.corpus import served_corpus
from rank1fast.demo import steering_pairs
from rank1fast.verify import calibrate_scale

torch.set_num_threads(1)
model, tok = rank1fast.load_model(None, device="cpu", dtype="float32", quiet=True)
L = model.model.layers


def mod(site):
    kind, layer = site.split(".")
    block = L[int(layer)]
    return block.self_attn.o_proj if kind == "resid_mid" else block.mlp.down_proj


def enc(text, n=256):
    return tok(text, return_tensors="pt", truncation=True, max_length=n)


def vectors(sites):
    pos, neg = steering_pairs()
    return rank1fast.vectors.contrastive((model, tok), pos, neg, sites)


class Hooks:
    """steer: site -> v (added at module output); adapt: site -> (b, v): adds (x.b) v."""

    def __init__(self, steer=None, adapt=None, capture=None):
        self.hs = []
        for s, v in (steer or {}).items():
            vt = torch.as_tensor(v, dtype=torch.float32)
            self.hs.append(mod(s).register_forward_hook(lambda m, i, o, vt=vt: o + vt))
        for s, (b, v) in (adapt or {}).items():
            bt = torch.as_tensor(b, dtype=torch.float32)
            vt = torch.as_tensor(v, dtype=torch.float32)
            self.hs.append(
                mod(s).register_forward_hook(
                    lambda m, i, o, bt=bt, vt=vt: o + (i[0] @ bt)[..., None] * vt
                )
            )
        for s, store in (capture or {}).items():
            self.hs.append(
                mod(s).register_forward_hook(
                    lambda m, i, o, store=store: store.append(i[0][0].detach().clone())
                )
            )

    def __enter__(self):
        return self

    def __exit__(self, *a):
        for h in self.hs:
            h.remove()


@torch.no_grad()
def logp(text, **kw):
    with Hooks(**kw):
        return torch.log_softmax(model(**enc(text)).logits[0].float(), -1)


def kl(p, q):  # per token KL(p||q), p,q log-probs
    return (p.exp() * (p - q)).sum(-1).numpy()


@torch.no_grad()
def collect(texts, sites, steer, tokens=40000):
    stores = {s: [] for s in sites}
    n = 0
    with Hooks(steer=steer, capture=stores):
        for t in texts:
            e = enc(t)
            model(**e)
            n += e["input_ids"].shape[1]
            if n >= tokens:
                break
    return {s: torch.cat(v).numpy().astype(np.float64) for s, v in stores.items()}, n


def ls(X, w=None, ridges=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1), folds=5):
    """b minimizing sum w (b.x-1)^2 + r*tr/d |b|^2, ridge by weighted k-fold CV."""
    n, d = X.shape
    w = np.ones(n) if w is None else w
    f = np.arange(n) % folds
    Gs, ms = [], []
    for k in range(folds):
        Xk = X[f == k]
        wk = w[f == k]
        Gs.append((Xk * wk[:, None]).T @ Xk)
        ms.append(Xk.T @ wk)
    G = sum(Gs)
    m = sum(ms)
    tr = np.trace(G) / d
    best = None
    for r in ridges:
        err = 0
        for k in range(folds):
            Gt = G - Gs[k]
            mt = m - ms[k]
            b = np.linalg.solve(Gt + r * np.trace(Gt) / d * np.eye(d), mt)
            Xk = X[f == k]
            err += (w[f == k] * (Xk @ b - 1) ** 2).sum()
        if best is None or err < best[0]:
            best = (err, r)
    b = np.linalg.solve(G + best[1] * tr * np.eye(d), m)
    return b, best[1]


def evaluate(texts, steer, adapters):
    """adapters: name -> {site: (b, v)}. returns per-token arrays."""
    res = {"base": []}
    res.update({k: [] for k in adapters})
    for t in texts:
        ph = logp(t, steer=steer)
        pb = logp(t)
        res["base"].append(kl(ph, pb))
        for k, ad in adapters.items():
            res[k].append(kl(ph, logp(t, adapt=ad)))
    return res


def ratio(res, k, skip=0):
    a = np.concatenate([x[skip:] for x in res[k]])
    b = np.concatenate([x[skip:] for x in res["base"]])
    return a.sum() / b.sum()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--site", default="resid_post.5")
    ap.add_argument("--tokens", type=int, default=40_000)
    site = ap.parse_args().site
    tokens = ap.parse_args().tokens
    fit = served_corpus(tok, "fit")
    ev = served_corpus(tok, "eval")[:24]
    raw = vectors([site])
    sc = calibrate_scale(
        (model, tok), {site: raw[site]}, ev[:8], target_kl=0.5, tolerance=0.05, max_length=256
    )[site]
    v = sc * raw[site]
    X, _ = collect(fit, [site], {site: v}, tokens)
    X = X[site]
    ws, n = [], 0
    for t in fit:
        ws.append(kl(logp(t, steer={site: v}), logp(t)))
        n += len(ws[-1])
        if n >= len(X):
            break
    w = np.concatenate(ws)[: len(X)].astype(np.float64)
    fits = {
        "unweighted": None,
        "w_t": w / w.mean(),
        "sqrt(w_t)": np.sqrt(w) / np.sqrt(w).mean(),
        "(1 + w_t/mean)/2": 0.5 + 0.5 * w / w.mean(),
    }
    ads = {}
    for name, ww in fits.items():
        b, r = ls(X, ww, ridges=(1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1))
        ads[name] = {site: (b, v)}
        print(f"{name}: ridge {r:g}, rms(b.x - 1) {np.sqrt(((X @ b - 1) ** 2).mean()):.4f}")
    res = evaluate(ev, {site: v}, ads)
    for name in ads:
        print(f"{site} {name}: KL(hook||adapter)/KL(hook||base) {100 * ratio(res, name):.2f} %")


if __name__ == "__main__":
    main()
