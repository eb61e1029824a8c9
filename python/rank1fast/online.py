"""Sufficient statistics accumulated with torch on the model's device, during collection.

``rank1fast.collect(..., statistics=True)`` feeds every batch of recorded rows to an
:class:`OnlineStats` per site instead of (or besides nothing: no dump is written) the shard
writer, so a GPU computes the statistics while it runs the model. The result is the same
:class:`rank1fast._core.SiteStats` that :func:`rank1fast.analyze` computes from a dump of the
same collection, field for field (tests/test_online.py holds them equal to 1e-9 relative):

- rows holding a NaN or an infinity are counted (``nonfinite``) and left out, before the
  position filter; finite rows at ``position < skip_positions`` are counted (``skipped``) and
  summed (``skipped_sum``, the sink input); the rest are the site's rows;
- per dimension: count, mean and centred sum of squares merged batch by batch with Chan's
  formula in float64 (a 1e4 column keeps a 1e-2 variation), min and max;
- per fold (``document % folds``): count, Σx, Σx² and, with ``second_moments``, Σ x xᵀ, as
  a float32 Gram matrix of rows shifted by the first batch's mean, added into float64 each
  batch and un-shifted at the end (as the Rust core does).

Values are taken as stored (cast to the storage dtype first), so a bfloat16 collection gives
the statistics of a bfloat16 dump.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import _core

if TYPE_CHECKING:
    import torch

__all__ = ["OnlineStats"]


class OnlineStats:
    """Streaming statistics of one site on one torch device (see the module docstring)."""

    def __init__(
        self,
        name: str,
        dim: int,
        dtype: str,
        *,
        folds: int,
        skip_positions: int,
        second_moments: bool,
    ) -> None:
        self.name, self.dim, self.dtype = name, int(dim), dtype
        self.folds, self.skip_positions = int(folds), int(skip_positions)
        self.second_moments = second_moments
        self.device: torch.device | None = None  # that of the first rows

    def _allocate(self, device: torch.device) -> None:
        import torch

        f64 = torch.float64
        dim, folds = self.dim, self.folds
        self.device = device
        self.n = 0
        self.nonfinite = 0
        self.skipped = 0
        self.skipped_sum = torch.zeros(dim, dtype=f64, device=device)
        self.mean = torch.zeros(dim, dtype=f64, device=device)
        self.m2 = torch.zeros(dim, dtype=f64, device=device)
        self.min = torch.full((dim,), float("inf"), dtype=torch.float32, device=device)
        self.max = torch.full((dim,), float("-inf"), dtype=torch.float32, device=device)
        self.fold_count = torch.zeros(folds, dtype=torch.int64, device=device)
        self.fold_sum = torch.zeros(folds, dim, dtype=f64, device=device)
        self.fold_sumsq = torch.zeros(folds, dim, dtype=f64, device=device)
        self.gram = (
            torch.zeros(folds, dim, dim, dtype=f64, device=device) if self.second_moments else None
        )
        self.shift: torch.Tensor | None = None

    def add(self, rows: torch.Tensor, position: torch.Tensor, document: torch.Tensor) -> None:
        """Accumulate ``rows`` ``[n, dim]`` (any float dtype) with their positions/documents."""
        import torch

        if self.device is None:
            self._allocate(rows.device)
        x = rows.to(self.device).float()
        position = position.to(self.device)
        document = document.to(self.device)
        finite = torch.isfinite(x).all(dim=1)
        late = position >= self.skip_positions
        sink = finite & ~late
        keep = finite & late
        self.nonfinite += int((~finite).sum())
        self.skipped += int(sink.sum())
        self.skipped_sum += x[sink].double().sum(0)
        x, fold = x[keep], document[keep] % self.folds
        c = int(x.shape[0])
        if c == 0:
            return
        xd = x.double()
        bmean = xd.mean(0)
        bm2 = (xd - bmean).square().sum(0)
        delta = bmean - self.mean
        n = self.n + c
        self.mean += delta * (c / n)
        self.m2 += bm2 + delta.square() * (self.n * c / n)
        self.n = n
        self.min = torch.minimum(self.min, x.min(0).values)
        self.max = torch.maximum(self.max, x.max(0).values)
        self.fold_count.index_add_(0, fold, torch.ones_like(fold))
        self.fold_sum.index_add_(0, fold, xd)
        self.fold_sumsq.index_add_(0, fold, xd.square())
        if self.gram is not None:
            if self.shift is None:
                self.shift = x.mean(0)
            shifted = x - self.shift
            for k in fold.unique().tolist():
                g = shifted[fold == k]
                self.gram[k] += (g.T @ g).double()

    def finish(self) -> _core.SiteStats:
        """The accumulated statistics as a :class:`rank1fast._core.SiteStats`."""
        import torch

        if self.device is None:
            self._allocate(torch.device("cpu"))
        moment = None
        if self.gram is not None:
            moment = self.gram.clone()
            if self.shift is not None:
                c = self.shift.double()
                for k in range(self.folds):
                    s, n = self.fold_sum[k], float(self.fold_count[k])
                    moment[k] += torch.outer(c, s) + torch.outer(s, c) - n * torch.outer(c, c)
            moment = 0.5 * (moment + moment.transpose(1, 2))  # exactly symmetric
            moment = moment.cpu().numpy()

        def host(t: torch.Tensor):  # noqa: ANN202 - numpy array
            return t.detach().cpu().numpy()

        return _core.SiteStats(
            self.name,
            self.dtype,
            self.dim,
            self.folds,
            self.n,
            self.nonfinite,
            self.skipped,
            host(self.mean),
            host(self.m2),
            host(self.min.double()),
            host(self.max.double()),
            host(self.fold_count).astype("uint64"),
            host(self.fold_sum),
            host(self.fold_sumsq),
            moment,
            host(self.skipped_sum),
        )
