"""``rank1fast.analyze``: one streaming pass of the Rust core over a dump."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import _core
from ._args import check_int
from ._manifest import site_modules
from ._progress import ProgressArg, bytes_callback
from .errors import InvalidArgumentError
from .report import SOLVERS, Report, SiteReport, check_rows

__all__ = ["analyze"]


def analyze(
    path: str | os.PathLike[str],
    *,
    sites: Sequence[str] | str | None = None,
    skip_positions: int = 1,
    folds: int = 5,
    second_moments: bool = True,
    threads: int | None = None,
    progress: ProgressArg = None,
    cluster: str | None = None,
    moment_rows: int | None = None,
    memory_limit: int | None = None,
    solver: str = "auto",
) -> Report:
    """Per-dimension statistics, outliers and the constant direction of every site.

    Streams the data once with memory-mapped I/O on all cores; memory stays
    ``folds x dim² x 8`` bytes (one set of fold matrices shared by the threads) plus a
    16 MiB chunk per thread, whatever the number of tokens.

    Args:
        path: a dump directory (manifest.json + shards), a ``.safetensors`` or ``.npy`` file,
            or a directory of such files. Every 2-D ``[tokens, dim]`` or 3-D
            ``[batch, seq, dim]`` float32/float16/bfloat16 tensor is a site (named by the
            tensor, or the file stem for .npy); one name in several files is one site.
        sites: analyse only these sites.
        skip_positions: drop tokens at position < k (BOS and attention sinks carry massive
            activations that are not steering-relevant). Positions come from the dump's
            ``position`` tensor or the seq index of 3-D tensors; rows of bare 2-D tensors
            have no position and are all kept.
        folds: cross-validation folds for the ridge (by document where documents are known,
            else by blocks of 256 rows); 1 fits without cross-validation, and the errors
            are then in-sample (``cross_validated`` is False; the table marks them).
        second_moments: accumulate ``E[x xᵀ]`` per fold (needed for the least-squares
            direction; off gives statistics and the one-hot baseline only, much faster).
        threads: worker threads (default: one per core; on a cluster, threads per task,
            default 1).
        progress: None shows a bar on a terminal, True always, False never; a callable gets
            ``(bytes_done, bytes_total)``.
        cluster: None analyses in this process. ``"ray"`` makes every shard a Ray task (on
            the running Ray session, else ``RAY_ADDRESS``, else a local cluster started on
            the fly) and merges their statistics; ``"ray://HOST:PORT"`` or ``"ray:ADDRESS"``
            names the cluster. The files must be readable from every worker. More options:
            :func:`rank1fast.distributed.analyze`. Needs ``pip install 'rank1fast[ray]'``.
        moment_rows: cap the rows per site that enter the second moments and the direction's
            fit: whole chunks spread evenly over the site, at least one (a chunk is up to
            16 MiB of float32 rows: 8192 rows up to dim 512, 1024 at 4096, 256 from 16384;
            between, whole cycles of ``256 x folds`` rows where they fit: 2560 at dim 1536
            with 5 folds);
            every row still counts in the per-dimension statistics. Second moments cost
            ``rows x dim²`` multiply-adds, so at dim 8192-16384 a cap keeps them affordable;
            the direction's held-out error (``report[site].direction.error``, fitted and
            cross-validated on the capped rows) shows the price.
            ``report[site].moment_count`` is the number used. None: all rows.
        memory_limit: bytes the analysis may hold (default: the memory available now, from
            ``/proc/meminfo`` and the cgroup limit). A site whose fold matrices
            (``folds x dim² x 8`` bytes) and buffers need more is refused before anything is
            allocated, with the options that make it fit.
        solver: how ``report[site].direction`` is solved: ``"exact"``, ``"krylov"`` or
            ``"auto"`` (exact up to dim 2048); see :meth:`SiteReport.solve_direction`.

    Returns:
        A :class:`~rank1fast.Report`.

    Raises:
        PathNotFoundError: ``path`` does not exist.
        DumpError: a file is malformed, truncated or of an unsupported dtype, or a site has
            no row left (every row holds a NaN or an infinity, or lies at a position below
            ``skip_positions``).
        InsufficientMemoryError: the fold matrices would not fit in the memory available
            (or ``memory_limit``); the message names the folds that would.
        InvalidArgumentError: an unknown site, an unknown solver, or an argument that is not
            an integer in range (skip_positions < 0, folds < 1, threads < 1, moment_rows < 1,
            memory_limit < 1); with ``cluster``, Ray missing, the cluster unreachable, or
            moment_rows given.

    Example:
        >>> report = rank1fast.analyze("dump/", sites=["resid_mid.15"])   # doctest: +SKIP
        >>> print(report)                                                # doctest: +SKIP
    """
    check_int("skip_positions", skip_positions, 0)
    check_int("folds", folds, 1)
    for name, value in (
        ("threads", threads),
        ("moment_rows", moment_rows),
        ("memory_limit", memory_limit),
    ):
        check_int(name, value, 1, optional=True)
    if cluster is not None:
        if moment_rows is not None:
            raise InvalidArgumentError(
                "moment_rows is not supported with cluster= yet: the rows would be chosen per "
                "task; analyse in one process, or without the cap"
            )
        from . import _cluster

        return _cluster.analyze(
            path,
            address=_cluster.ray_address(cluster),
            sites=sites,
            skip_positions=skip_positions,
            folds=folds,
            second_moments=second_moments,
            threads=threads,
            progress=progress,
        )
    if solver not in SOLVERS:
        raise InvalidArgumentError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    if isinstance(sites, str):
        sites = [sites]
    callback, bar = bytes_callback(progress, "analyze")
    try:
        stats = _core.analyze(
            os.fspath(path),
            sites=None if sites is None else list(sites),
            skip_positions=min(int(skip_positions), sys.maxsize),
            folds=min(int(folds), sys.maxsize),
            second_moments=bool(second_moments),
            threads=min(int(threads or 0), sys.maxsize),
            progress=callback,
            # Beyond any dump or machine, a cap is no cap.
            moment_rows=None if moment_rows is None else min(int(moment_rows), sys.maxsize),
            memory_limit=None if memory_limit is None else min(int(memory_limit), sys.maxsize),
        )
    finally:
        if bar is not None:
            bar.close()
    check_rows(stats, path, int(skip_positions))
    return Report(
        (SiteReport(s, solver=solver) for s in stats),
        skip_positions=int(skip_positions),
        source=os.fspath(path),
        modules=site_modules(Path(path)),
    )
