"""The constant direction's Krylov solve with torch, on any torch device (a GPU when there is one).

The same procedure as the Rust core's ``krylov`` solver (``rust/rank1fast-core/src/krylov.rs``,
whose module docstring gives the method): per fold, a block Krylov subspace of the fold's
training moments started from ``[training mean, outlier dimensions, Gaussian columns]`` (the
Gaussian columns come from the core, so both start from the same subspace), grown by blocks
scaled by the Jacobi preconditioner, the ridge problem solved exactly in it for every ridge,
until the fold's best held-out rms error changes by less than ``tol`` (relative) in two
consecutive steps; the final fit on all rows takes as many steps as the
slowest fold. In float64 the results match the core's to rounding (tests/test_solve.py).

Use it through :meth:`rank1fast.SiteReport.solve_direction` with ``device="cuda"``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from . import _core
from .errors import InvalidArgumentError

if TYPE_CHECKING:
    import torch

__all__ = ["constant_direction"]

FALLBACK_RIDGE = 1e-6  # as the core's solve::FALLBACK_RIDGE


def constant_direction(
    stats: _core.SiteStats,
    ridges: list[float] | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: str = "float64",
) -> dict[str, Any]:
    """Cross-validated Krylov solve of a site's constant direction with torch on ``device``.

    Args:
        stats: a site's statistics with second moments (``report[site].stats``).
        ridges: the ridge grid (λ relative to tr(G)/dim); default ``_core.default_ridges()``.
        device: a torch device; the fold matrices (``folds x dim²``) are copied to it.
        dtype: ``"float64"`` (the core's precision) or ``"float32"`` (faster on most GPUs;
            activations with massive means lose digits in ``bᵀ G b``).

    Returns:
        The dict :meth:`rank1fast._core.SiteStats.constant_direction` returns (``vector``,
        ``ridge``, ``error``, ``ridges``, ``cv_errors``, ``cross_validated``, ``method``
        ``"krylov"``, ``subspace``, ``steps``), arrays as float64 numpy.

    Raises:
        InvalidArgumentError: no second moments, no rows, or a bad ridge grid or dtype.
    """
    import torch

    if not stats.has_moments:
        raise InvalidArgumentError(
            f"site {stats.name}: the report has no second moments (analyze with "
            "second_moments=True)"
        )
    if dtype not in ("float64", "float32"):
        raise InvalidArgumentError(f"dtype must be float64 or float32, got {dtype!r}")
    ridges = list(_core.default_ridges() if ridges is None else ridges)
    if not ridges or any(not (np.isfinite(r) and r >= 0) for r in ridges):
        raise InvalidArgumentError("ridges must be finite and non-negative")
    counts = stats.fold_count().astype(np.float64)
    n = float(counts.sum())
    if stats.count == 0 or n == 0:
        raise InvalidArgumentError(f"site {stats.name}: no rows in the second moments")
    defaults, omega = _core.krylov_sketch(stats.dim)
    tdtype = getattr(torch, dtype)
    dev = torch.device(device)
    g = torch.from_numpy(stats.fold_moment()).to(dev, tdtype)  # [folds, d, d]
    sums = torch.from_numpy(stats.fold_sum()).to(dev, tdtype)  # [folds, d]
    total = g.sum(0)
    total_sum = sums.sum(0)
    traces = torch.diagonal(g, dim1=1, dim2=2).sum(1)
    d = stats.dim
    grid = torch.tensor(ridges, dtype=tdtype, device=dev)
    folds = [k for k in range(stats.folds) if 0 < counts[k] < n]
    if len(folds) < 2:
        folds = []
    opts = dict(defaults)
    opts["omega"] = torch.from_numpy(np.ascontiguousarray(omega.T)).to(dev, tdtype)  # [d, block]

    problems = []
    for k in [*folds, None]:
        nk = float(counts[k]) if k is not None else 0.0
        n_train = n - nk
        train = (total - g[k]) / n_train if k is not None else total / n
        mean_train = (total_sum - (sums[k] if k is not None else 0)) / n_train
        t = float((traces.sum() - (traces[k] if k is not None else 0)) / n_train / d)
        held = g[k] / nk if k is not None else None
        mu = sums[k] / nk if k is not None else None
        sq = stats.fold_sumsq().sum(0) - (stats.fold_sumsq()[k] if k is not None else 0)
        var = torch.clamp(torch.from_numpy(sq).to(dev, tdtype) / n_train - mean_train**2, min=0)
        dinv = 1 / (var + float(opts["precond_floor"]) * t)
        problems.append(_Problem(train, held, mean_train, mu, t, nk, dinv, opts))
    for p in problems[:-1]:
        while not p.done:
            p.step(grid, fold=True)
    final = problems[-1]
    target = max((p.steps for p in problems[:-1]), default=None)
    while not final.done and (target is None or final.steps < target):
        final.step(grid, fold=False)
    if folds:
        mse = sum(p.held_mse(grid) * p.n_held for p in problems[:-1])
        rms = torch.sqrt(mse / sum(p.n_held for p in problems[:-1]))
        best = int(torch.argmin(rms))
        ridge, error = ridges[best], float(rms[best])
        cv_errors = rms.double().cpu().numpy()
    else:
        ridge, error, cv_errors = FALLBACK_RIDGE, float("nan"), np.full(len(ridges), np.nan)
    c = final.coords(torch.tensor([ridge], dtype=tdtype, device=dev))[:, 0]
    vector = final.q[:, : final.s] @ c
    if not folds:
        h = final.h[: final.s, : final.s]
        error = float(torch.sqrt(torch.clamp(c @ h @ c - 2 * c @ final.qm + 1, min=0)))
    return {
        "vector": vector.double().cpu().numpy(),
        "ridge": float(ridge),
        "error": error,
        "ridges": np.asarray(ridges, dtype=np.float64),
        "cv_errors": cv_errors,
        "cross_validated": bool(folds),
        "method": "krylov",
        "subspace": final.s,
        "steps": final.steps,
    }


class _Problem:
    """One ridge problem: a training matrix ``a`` (scaled), a held-out matrix (or None)."""

    def __init__(self, a, held, mean_train, mu, t, n_held, dinv, opts) -> None:  # noqa: ANN001
        import torch

        d = a.shape[0]
        self.a, self.held, self.mean, self.mu, self.t = a, held, mean_train, mu, t
        self.dinv, self.calm = dinv, 0
        self.n_held = n_held
        self.tol, self.min_steps = float(opts["tol"]), int(opts["min_steps"])
        cap = min(int(opts["max_dim"]), d)
        block = int(opts["block"])
        self.q = torch.zeros(d, cap, dtype=a.dtype, device=a.device)
        self.h = torch.zeros(cap, cap, dtype=a.dtype, device=a.device)
        self.m = torch.zeros(cap, cap, dtype=a.dtype, device=a.device)
        self.qm = torch.zeros(0, dtype=a.dtype, device=a.device)
        self.qmu = torch.zeros(0, dtype=a.dtype, device=a.device)
        self.s, self.steps, self.done, self.best = 0, 0, False, float("inf")
        x = opts["omega"].clone()
        x[:, 0] = dinv * mean_train
        x[:, 1] = mean_train
        absm = mean_train.abs()
        median = torch.sort(absm).values[d // 2]
        order = torch.argsort(absm, descending=True, stable=True)[: int(opts["max_outliers"])]
        c = 2
        for j in order.tolist():
            if absm[j] == 0 or absm[j] < float(opts["outlier_ratio"]) * median:
                break
            if c < block - 1:
                x[:, c] = 0
                x[j, c] = 1
                c += 1
        self.last = self._extend(x)
        if self.last == 0:
            raise InvalidArgumentError("the training mean and moments are all zero")

    def _extend(self, x):  # noqa: ANN001, ANN202
        """Orthogonalise ``x``'s columns against the basis and each other; append the rest."""
        import torch

        s, cap = self.s, self.q.shape[1]
        norms0 = torch.linalg.vector_norm(x, dim=0)
        if s:
            q = self.q[:, :s]
            for _ in range(2):
                x = x - q @ (q.T @ x)
        added = 0
        for j in range(x.shape[1]):
            if s + added >= cap or norms0[j] == 0:
                continue
            col = x[:, j].clone()
            for _ in range(2):
                if added:
                    qb = self.q[:, s : s + added]
                    col = col - qb @ (qb.T @ col)
            norm = torch.linalg.vector_norm(col)
            if not bool(norm > 1e-10 * norms0[j]):
                continue
            self.q[:, s + added] = col / norm
            added += 1
        return added

    def step(self, grid, *, fold: bool) -> None:  # noqa: ANN001
        """Multiply the newest block, grow the projections, test the stopping rule, extend."""
        import torch

        s0, new = self.s, self.last
        s = s0 + new
        qn = self.q[:, s0:s]
        w = self.a @ qn
        q = self.q[:, :s]
        hcol = q.T @ w
        hcol[s0:] = 0.5 * (hcol[s0:] + hcol[s0:].T)
        self.h[:s, s0:s] = hcol
        self.h[s0:s, :s] = hcol.T
        if self.held is not None:
            mcol = q.T @ (self.held @ qn)
            mcol[s0:] = 0.5 * (mcol[s0:] + mcol[s0:].T)
            self.m[:s, s0:s] = mcol
            self.m[s0:s, :s] = mcol.T
            self.qmu = torch.cat([self.qmu, qn.T @ self.mu])
        else:
            self.qmu = torch.cat([self.qmu, torch.zeros_like(qn[0])])
        self.qm = torch.cat([self.qm, qn.T @ self.mean])
        self.s, self.steps = s, self.steps + 1
        if fold:
            best = float(torch.sqrt(self.held_mse(grid).min()))
            change = abs(self.best - best) / max(best, np.finfo(float).tiny)
            self.best = best
            self.calm = self.calm + 1 if change < self.tol else 0
            if self.steps >= self.min_steps and self.calm >= 2:
                self.done = True
                return
        self.last = self._extend(w * self.dinv[:, None])
        if self.last == 0:
            self.done = True

    def coords(self, grid):  # noqa: ANN001, ANN202
        """``[s, ridges]``: the subspace solution for every ridge."""
        import torch

        s = self.s
        lam, u = torch.linalg.eigh(self.h[:s, :s])
        lam = torch.clamp(lam, min=0)
        den = lam[:, None] + grid[None, :] * self.t
        utm = u.T @ self.qm
        y = torch.where(den > 0, utm[:, None] / torch.where(den > 0, den, 1), 0)
        return u @ y

    def held_mse(self, grid):  # noqa: ANN001, ANN202
        import torch

        c = self.coords(grid)
        m = self.m[: self.s, : self.s]
        quad = (c * (m @ c)).sum(0)
        lin = (c * self.qmu[:, None]).sum(0)
        return torch.clamp(quad - 2 * lin + 1, min=0)
