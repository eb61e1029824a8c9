"""Typed results of :func:`rank1fast.analyze`: a :class:`Report` of :class:`SiteReport` s."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from . import _core
from ._fs import write_atomic
from .errors import (
    DumpError,
    InvalidArgumentError,
    PathNotFoundError,
    RankDeficientWarning,
)

__all__ = ["Report", "SiteReport", "Direction", "OneHot", "Outlier", "OUTLIER_RATIO", "merge"]

#: A dimension is an outlier when its |mean| is at least this many times the median |mean|.
OUTLIER_RATIO = 6.0
#: How a site's direction can be solved (see :meth:`SiteReport.solve_direction`).
SOLVERS = ("auto", "exact", "krylov")
#: At most this many outliers are listed per site.
MAX_OUTLIERS = 16

_FORMAT = "rank1fast.report"
_VERSION = 1


class Outlier(NamedTuple):
    """One outlier dimension: index, mean, standard deviation, coefficient of variation."""

    dim: int
    mean: float
    std: float
    cv: float


@dataclass(frozen=True)
class Direction:
    """The least-squares constant direction ``b`` of a site: ``b·x ≈ 1`` for every token.

    Attributes:
        vector: ``b``, float64 ``[dim]``; ``lora_A = bᵀ``.
        ridge: the chosen ridge λ (relative to ``tr(G)/dim``).
        error: held-out rms(b·x − 1) at that ridge (in-sample if not cross-validated).
        ridges: the ridge grid that was searched.
        cv_errors: held-out rms error at each ridge of the grid.
        cross_validated: False when fewer than two folds held tokens.
        method: ``"exact"`` (every fold's ridge problem solved in the whole space) or
            ``"krylov"`` (solved exactly in a randomized block Krylov subspace of each fold's
            training moments; the held-out errors are those of that procedure).
        subspace: dimensions of the subspace the final fit was solved in (``dim`` when exact).
        steps: Krylov steps of the final fit (0 when exact).
    """

    vector: np.ndarray = field(repr=False)
    ridge: float
    error: float
    ridges: np.ndarray = field(repr=False)
    cv_errors: np.ndarray = field(repr=False)
    cross_validated: bool = True
    method: str = "exact"
    subspace: int = 0
    steps: int = 0


@dataclass(frozen=True)
class OneHot:
    """The naive construction: one outlier dimension, ``b = e_j / mean(x_j)``.

    Attributes:
        vector: ``b``, float64 ``[dim]``.
        dims: ``[j]``, the dimension used.
        error: held-out rms(b·x − 1) (in-sample if not cross-validated).
        cross_validated: False when fewer than two folds held tokens.
    """

    vector: np.ndarray = field(repr=False)
    dims: list[int]
    error: float
    cross_validated: bool = True


class SiteReport:
    """Statistics of one site. Arrays are float64 numpy arrays of shape ``[dim]``.

    The constant direction and the one-hot baseline are solved on first access; ``solver``
    says how the direction is solved (see :meth:`solve_direction`).
    """

    def __init__(self, stats: _core.SiteStats, *, solver: str = "auto") -> None:
        self._stats = stats
        self.solver = _check_solver(solver)

    # -- raw facts ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._stats.name

    @property
    def stats(self) -> _core.SiteStats:
        """The underlying sufficient statistics (what merges and saves)."""
        return self._stats

    @property
    def count(self) -> int:
        """Tokens used: finite rows at position >= skip_positions."""
        return self._stats.count

    @property
    def moment_count(self) -> int:
        """Tokens in the second moments and the direction's fit: :attr:`count` unless the
        analysis capped them (``analyze(..., moment_rows=N)``)."""
        return int(self._stats.fold_count().sum())

    @property
    def dim(self) -> int:
        return self._stats.dim

    @property
    def dtype(self) -> str:
        return self._stats.dtype

    @property
    def nonfinite(self) -> int:
        """Rows dropped because they held a NaN or an infinity."""
        return self._stats.nonfinite

    @property
    def skipped(self) -> int:
        """Rows dropped by the position filter."""
        return self._stats.skipped

    @property
    def folds(self) -> int:
        return self._stats.folds

    @cached_property
    def sink_mean(self) -> np.ndarray | None:
        """Mean input at the skipped positions (the attention sink), or None if none were."""
        n = self.skipped
        return self._stats.skipped_sum() / n if n else None

    @cached_property
    def mean(self) -> np.ndarray:
        return self._stats.mean()

    @cached_property
    def var(self) -> np.ndarray:
        """Population variance (ddof=0)."""
        n = self.count
        return self._stats.m2() / n if n else np.full(self.dim, np.nan)

    @cached_property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var)

    @cached_property
    def min(self) -> np.ndarray:
        return self._stats.min()

    @cached_property
    def max(self) -> np.ndarray:
        return self._stats.max()

    @cached_property
    def absmax(self) -> np.ndarray:
        return np.maximum(np.abs(self.min), np.abs(self.max))

    @cached_property
    def second_moment(self) -> np.ndarray | None:
        """``E[x xᵀ]`` as float64 ``[dim, dim]``, or None without second moments."""
        if not self._stats.has_moments or self.moment_count == 0:
            return None
        return self._stats.total_moment() / self.moment_count

    @cached_property
    def moment_mean(self) -> np.ndarray | None:
        """``E[x]`` over the rows of :attr:`second_moment` (float64 ``[dim]``; :attr:`mean`
        unless ``moment_rows`` capped them), or None without second moments."""
        if not self._stats.has_moments or self.moment_count == 0:
            return None
        return self._stats.fold_sum().sum(axis=0) / self.moment_count

    # -- derived -----------------------------------------------------------------------------
    @cached_property
    def outliers(self) -> list[Outlier]:
        """Dimensions whose |mean| is at least OUTLIER_RATIO x the median |mean|, largest first."""
        if self.count == 0:
            return []
        absmean = np.abs(self.mean)
        floor = OUTLIER_RATIO * float(np.median(absmean))
        order = np.argsort(-absmean, kind="stable")
        out = []
        for j in order[:MAX_OUTLIERS]:
            if absmean[j] <= floor or absmean[j] == 0:
                break
            mean, std = float(self.mean[j]), float(self.std[j])
            out.append(Outlier(int(j), mean, std, std / abs(mean)))
        return out

    @cached_property
    def direction(self) -> Direction | None:
        """The cross-validated least-squares constant direction (None without second moments)."""
        if not self._stats.has_moments:
            return None
        for problem in self.conditioning():
            warnings.warn(
                f"site {self.name}: {problem}; the ridge keeps the direction defined",
                RankDeficientWarning,
                stacklevel=3,  # past cached_property's __get__, at the caller
            )
        return self.solve_direction(solver=self.solver)

    def conditioning(self) -> list[str]:
        """Why this site's second moments are singular, if they are (empty when they are not).

        Checks for fewer tokens than dimensions, constant dimensions and duplicated (perfectly
        correlated) dimensions.
        """
        problems = []
        if self.count < self.dim:
            problems.append(f"fewer tokens ({self.count}) than dimensions ({self.dim})")
        var = self.var
        constant = np.flatnonzero(var <= 1e-12 * max(float(var.max()), 1e-300))
        if len(constant):
            problems.append(f"{len(constant)} constant dimension(s), e.g. {constant[:5].tolist()}")
        if self._stats.has_moments and self.moment_count >= 2:
            # In Rust, on the fold matrices in place: no dim x dim copy at large widths.
            count, pairs = self._stats.duplicated_dims(1e-6, 3)
            if count:
                pairs = [(int(a), int(b)) for a, b in pairs]
                problems.append(f"{count} duplicated dimension pair(s), e.g. {pairs}")
        return problems

    def solve_direction(
        self,
        ridges: Iterable[float] | None = None,
        *,
        solver: str = "auto",
        device: str | None = None,
    ) -> Direction:
        """Solve the constant direction over a ridge grid of your choice.

        Args:
            ridges: candidate λ values (relative to tr(G)/dim); the default grid spans
                1e-10 .. 1 in quarter decades.
            solver: ``"exact"``: every fold's training matrix tridiagonalised, every ridge
                solved exactly (``(folds + 1) x O(dim³)``: seconds at dim 2048, 700 s at
                8192 on two cores). ``"krylov"``: each fold's ridge problem solved exactly in
                a randomized block Krylov subspace of its own training moments (Jacobi
                preconditioned, started from its mean, its outlier dimensions and Gaussian
                columns) grown until the fold's best held-out error changes by less than 0.1 %
                in two consecutive steps (at most 768 dimensions): ``O(folds x dim² x k)``;
                the held-out errors are those of that procedure, so they stay honest (within
                0.4 % of exact on the default model's layer-15 inputs). ``"auto"``: exact up
                to dim 2048, krylov above. ``Direction.method`` and ``Direction.subspace``
                say which ran.
            device: None solves in the Rust core on the CPU. A torch device (``"cuda"``,
                ``"cpu"``) runs the same Krylov solve with torch in float64 on that device
                (:func:`rank1fast.solve_torch.constant_direction`); it needs torch and copies
                the fold matrices to the device.

        Returns:
            The :class:`Direction` with the lowest held-out error.

        Raises:
            InvalidArgumentError: an unknown solver, a bad ridge grid, or no second moments.
        """
        solver = _check_solver(solver)
        if device is not None:
            from .solve_torch import constant_direction

            fit = constant_direction(
                self._stats, None if ridges is None else list(ridges), device=device
            )
        else:
            fit = self._stats.constant_direction(
                None if ridges is None else list(ridges), solver=solver
            )
        return Direction(
            vector=fit["vector"],
            ridge=float(fit["ridge"]),
            error=float(fit["error"]),
            ridges=fit["ridges"],
            cv_errors=fit["cv_errors"],
            cross_validated=bool(fit["cross_validated"]),
            method=str(fit["method"]),
            subspace=int(fit["subspace"]),
            steps=int(fit["steps"]),
        )

    @cached_property
    def onehot(self) -> OneHot:
        """The best single dimension by held-out error (the naive construction)."""
        fit = self._stats.onehot()
        return OneHot(
            vector=fit["vector"],
            dims=[int(fit["dim"])],
            error=float(fit["error"]),
            cross_validated=bool(fit["cross_validated"]),
        )

    def merge(self, other: SiteReport) -> SiteReport:
        """Statistics of both parts together, exactly as if analysed at once."""
        return SiteReport(self._stats.merge(other._stats), solver=self.solver)

    def summary(self) -> dict[str, Any]:
        """A JSON-ready summary (no [dim, dim] arrays)."""
        d: dict[str, Any] = {
            "site": self.name,
            "count": self.count,
            **({"moment_count": self.moment_count} if self.moment_count != self.count else {}),
            "dim": self.dim,
            "dtype": self.dtype,
            "nonfinite": self.nonfinite,
            "skipped": self.skipped,
            "outliers": [o._asdict() for o in self.outliers],
        }
        if self.count:
            oh = self.onehot
            d["onehot"] = {
                "dims": oh.dims,
                "error": oh.error,
                "cross_validated": oh.cross_validated,
            }
            if self.direction is not None:
                dr = self.direction
                d["direction"] = {
                    "ridge": dr.ridge,
                    "error": dr.error,
                    "cross_validated": dr.cross_validated,
                    "method": dr.method,
                    "subspace": dr.subspace,
                    "vector": dr.vector.tolist(),
                }
        return d

    def __repr__(self) -> str:
        return f"SiteReport({self.name!r}, count={self.count}, dim={self.dim}, dtype={self.dtype})"


class Report:
    """Per-site statistics of a dump, as returned by :func:`rank1fast.analyze`.

    Example:
        >>> report = rank1fast.analyze("dump/")          # doctest: +SKIP
        >>> s = report["resid_mid.15"]                   # doctest: +SKIP
        >>> s.direction.error, s.onehot.error            # doctest: +SKIP
    """

    def __init__(
        self,
        sites: Iterable[SiteReport],
        *,
        skip_positions: int,
        source: str | None = None,
        modules: dict[str, str] | None = None,
        carriers: dict[str, dict[str, Any]] | None = None,
        task_type: str | None = None,
    ) -> None:
        self._sites = {s.name: s for s in sites}
        self.skip_positions = skip_positions
        self.source = source
        #: site name -> module path, when the dump's manifest says so.
        self.modules = dict(modules or {})
        #: resid_* site -> how its module joins the residual stream (``kind``, ``gain``,
        #: ``norm``: see :func:`rank1fast.models.site_carrier`), when the collection recorded
        #: it here; a dump's manifest holds it too (``carriers``).
        self.carriers = dict(carriers or {})
        #: PEFT task type of the collected model (``CAUSAL_LM``, or ``FEATURE_EXTRACTION`` for
        #: a model without an LM head), when the collection recorded it here; a dump's
        #: manifest holds it too (``model.task_type``).
        self.task_type = task_type

    @property
    def sites(self) -> list[str]:
        return list(self._sites)

    @property
    def folds(self) -> int:
        return next(iter(self._sites.values())).folds if self._sites else 0

    def __getitem__(self, site: str) -> SiteReport:
        try:
            return self._sites[site]
        except KeyError:
            raise InvalidArgumentError(
                f"site {site!r} is not in this report; it has: {', '.join(self._sites)}"
            ) from None

    def __contains__(self, site: object) -> bool:
        return site in self._sites

    def __iter__(self) -> Iterator[SiteReport]:
        return iter(self._sites.values())

    def __len__(self) -> int:
        return len(self._sites)

    def merge(self, other: Report) -> Report:
        """Merge two reports of disjoint data (sites present in both are combined)."""
        return merge([self, other])

    # -- persistence -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the report's sufficient statistics to an ``.npz`` file (lossless).

        The file is written under a temporary name and renamed, so a crash leaves no partial
        report.

        Raises:
            Rank1IOError: the file cannot be written (a directory, no space, no permission);
                nothing is left behind.
        """
        path = Path(path)
        arrays: dict[str, np.ndarray] = {}
        meta: dict[str, Any] = {
            "format": _FORMAT,
            "version": _VERSION,
            "skip_positions": self.skip_positions,
            "source": self.source,
            "modules": self.modules,
            "carriers": self.carriers,
            "task_type": self.task_type,
            "sites": [],
        }
        for i, s in enumerate(self):
            st = s.stats
            meta["sites"].append(
                {
                    "name": st.name,
                    "dtype": st.dtype,
                    "dim": st.dim,
                    "folds": st.folds,
                    "count": st.count,
                    "nonfinite": st.nonfinite,
                    "skipped": st.skipped,
                }
            )
            for key in (
                "mean",
                "m2",
                "min",
                "max",
                "fold_count",
                "fold_sum",
                "fold_sumsq",
                "skipped_sum",
            ):
                arrays[f"{i}.{key}"] = getattr(st, key)()
            moment = st.fold_moment()
            if moment is not None:
                arrays[f"{i}.fold_moment"] = moment
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        write_atomic(path, write, "report")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Report:
        """Read a report written by :meth:`save`."""
        path = Path(path)
        if not path.exists():
            raise PathNotFoundError(f"{path}: no such file")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
                    raise DumpError(f"{path}: not a rank1fast report (version {_VERSION})")
                sites = []
                for i, m in enumerate(meta["sites"]):
                    moment = z[f"{i}.fold_moment"] if f"{i}.fold_moment" in z.files else None
                    st = _core.SiteStats(
                        m["name"],
                        m["dtype"],
                        m["dim"],
                        m["folds"],
                        m["count"],
                        m["nonfinite"],
                        m["skipped"],
                        z[f"{i}.mean"],
                        z[f"{i}.m2"],
                        z[f"{i}.min"],
                        z[f"{i}.max"],
                        z[f"{i}.fold_count"].astype(np.uint64),
                        z[f"{i}.fold_sum"],
                        z[f"{i}.fold_sumsq"],
                        moment,
                        z[f"{i}.skipped_sum"],
                    )
                    sites.append(SiteReport(st))
        except (KeyError, ValueError, OSError) as e:
            if isinstance(e, DumpError):
                raise
            raise DumpError(f"{path}: not a readable rank1fast report ({e})") from e
        return cls(
            sites,
            skip_positions=meta["skip_positions"],
            source=meta.get("source"),
            modules=meta.get("modules"),
            carriers=meta.get("carriers"),
            task_type=meta.get("task_type"),
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary of every site (what ``rank1fast analyze --json`` writes)."""
        return {
            "source": self.source,
            "skip_positions": self.skip_positions,
            "folds": self.folds,
            "sites": [s.summary() for s in self],
        }

    def __str__(self) -> str:
        head = [
            "site",
            "tokens",
            "dim",
            "dtype",
            "top outliers (dim: mean, cv)",
            "one-hot err",
            "least-sq err",
            "ridge",
        ]
        rows = [head]
        for s in self:
            outl = ", ".join(f"{o.dim}: {o.mean:.3g}, {o.cv:.2f}" for o in s.outliers[:3]) or "-"
            if s.count:
                # Errors without held-out folds are marked: they are not comparable.
                mark = "" if s.onehot.cross_validated else " in-sample"
                oh = f"{s.onehot.error:.4f} (dim {s.onehot.dims[0]}){mark}"
                dr = s.direction
                ls = f"{dr.error:.4f}{'' if dr.cross_validated else ' in-sample'}" if dr else "-"
                ridge = f"{dr.ridge:.1e}" if dr else "-"
            else:
                oh = ls = ridge = "-"
            rows.append([s.name, f"{s.count:,}", str(s.dim), s.dtype, outl, oh, ls, ridge])
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Report(sites={self.sites!r}, skip_positions={self.skip_positions})"


def check_rows(stats: Iterable[_core.SiteStats], path: str | os.PathLike[str], skip: int) -> None:
    """Refuse a site that no row reached: all held a NaN or an infinity, or lay at positions
    below ``skip`` (``skip_positions``). Run on whole-dump statistics (after a Ray analysis
    merges its tasks: one task may hold such a shard while the site has rows elsewhere).

    Raises:
        DumpError: naming ``path``, the site and why its rows were dropped.
    """
    for st in stats:
        if st.count > 0:
            continue
        if st.nonfinite:
            why = f"all {st.nonfinite} rows of the site hold NaN or infinity"
            if st.skipped:
                why += f" (and {st.skipped} more lie at positions < {skip})"
        elif st.skipped:
            why = (
                f"all {st.skipped} rows of the site lie at positions < skip_positions = {skip}; "
                "pass a smaller skip_positions (--skip-positions)"
            )
        else:
            why = "the site holds no rows"
        raise DumpError(f"{os.fspath(path)} [{st.name}]: {why}")


def _check_solver(solver: str) -> str:
    if solver not in SOLVERS:
        raise InvalidArgumentError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    return solver


def merge(reports: Iterable[Report]) -> Report:
    """Merge reports of disjoint parts of the data into one, exactly.

    Every statistic is a sum over tokens, so analysing shards on many machines and merging the
    reports gives the same numbers as analysing everything at once.

    Args:
        reports: reports made with the same ``skip_positions`` and ``folds``.

    Returns:
        A :class:`Report` with the union of the sites; shared sites are combined.

    Example:
        >>> total = rank1fast.merge([rank1fast.analyze(p) for p in shard_paths])  # doctest: +SKIP
    """
    reports = list(reports)
    if not reports:
        raise InvalidArgumentError("merge needs at least one report")
    first = reports[0]
    sites: dict[str, SiteReport] = {}
    modules: dict[str, str] = {}
    carriers: dict[str, dict[str, Any]] = {}
    for r in reports:
        if r.skip_positions != first.skip_positions:
            raise InvalidArgumentError(
                f"cannot merge reports made with skip_positions {first.skip_positions} "
                f"and {r.skip_positions}"
            )
        modules.update(r.modules)
        carriers.update(r.carriers)
        for s in r:
            sites[s.name] = sites[s.name].merge(s) if s.name in sites else s
    return Report(
        sites.values(),
        skip_positions=first.skip_positions,
        source=None,
        modules=modules,
        carriers=carriers,
        task_type=next((r.task_type for r in reports if r.task_type), None),
    )
