"""The analysis of a dump by Ray tasks (:func:`rank1fast.distributed.analyze`, what
``rank1fast.analyze(path, cluster="ray")`` runs), the Ray plumbing the collection on Ray shares
(connecting, ``ray.get`` that raises rank1fast errors as themselves, cancelling), and pickling
for :class:`~rank1fast._core.SiteStats`.

It lives here, below :mod:`rank1fast.analysis`, so that ``analyze(cluster=...)`` reaches it
without importing the collection over several workers (:mod:`rank1fast.distributed`, which
sits above :mod:`rank1fast.collect`). How the work is cut and merged: see
:mod:`rank1fast.distributed`.
"""

from __future__ import annotations

import copyreg
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from . import _core
from ._args import check_int
from ._manifest import MANIFEST, site_modules
from ._progress import ProgressArg, bytes_callback
from .errors import DumpError, InvalidArgumentError, PathNotFoundError, Rank1Error
from .report import Report, SiteReport, check_rows

# --------------------------------------------------------------------------- pickling


def _reduce_site_stats(st: _core.SiteStats) -> tuple[Any, tuple[Any, ...]]:
    # The native class has no pickle support of its own: rebuild it through its constructor
    # (which validates the arrays), from the same fields Report.save stores.
    return _core.SiteStats, (
        st.name,
        st.dtype,
        st.dim,
        st.folds,
        st.count,
        st.nonfinite,
        st.skipped,
        st.mean(),
        st.m2(),
        st.min(),
        st.max(),
        st.fold_count(),
        st.fold_sum(),
        st.fold_sumsq(),
        st.fold_moment(),
        st.skipped_sum(),
    )


# Registered on import (``import rank1fast`` imports rank1fast.distributed, which imports this
# module): SiteStats, SiteReport and Report then pickle with pickle, cloudpickle,
# multiprocessing and Ray.
copyreg.pickle(_core.SiteStats, _reduce_site_stats)


# --------------------------------------------------------------------------- Ray


def connect(address: str | None) -> Any:
    """The ``ray`` module, connected: the running session, else ``ray.init(address)``."""
    try:
        import ray
    except ImportError as e:
        raise InvalidArgumentError(
            "running on a Ray cluster needs Ray, which is not installed: "
            "pip install 'rank1fast[ray]'"
        ) from e
    if not ray.is_initialized():
        try:
            # address None: RAY_ADDRESS, else the cluster `ray start` left on this machine,
            # else a new local one.
            ray.init(address=address)
        except ConnectionError as e:
            raise InvalidArgumentError(
                f"cannot connect to the Ray cluster at {address!r}: {e}"
            ) from e
    return ray


def ray_address(cluster: str) -> str | None:
    """The Ray address a ``cluster`` argument names.

    ``"ray"``: the running Ray session, else ``RAY_ADDRESS``, else a local cluster started on
    the fly; ``"ray://HOST:PORT"``: a Ray client address; ``"ray:ADDRESS"``: any address
    ``ray.init`` takes (``"ray:auto"``, ``"ray:10.0.0.5:6379"``).
    """
    if cluster == "ray":
        return None
    if cluster.startswith("ray://"):
        return cluster
    if cluster.startswith("ray:") and len(cluster) > 4:
        return cluster[4:]
    raise InvalidArgumentError(
        f"cluster={cluster!r}: use 'ray', 'ray://HOST:PORT' or 'ray:ADDRESS'"
    )


def get(ray: Any, refs: Any) -> Any:
    """``ray.get`` that raises a task's rank1fast error (or Ctrl-C) as itself."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, (Rank1Error, KeyboardInterrupt)):
            raise cause from None
        raise


def cancel(ray: Any, refs: Iterable[Any]) -> None:
    for ref in refs:
        try:
            ray.cancel(ref, force=True)
        except Exception:  # noqa: BLE001 - best effort: the task may be finished or gone
            pass


# --------------------------------------------------------------------------- analysis

# A partial result: ((unit, index), stats) per site. The key orders the sites of the merged
# report as one process would (first file that holds them, then their order there).
_Partial = list[tuple[tuple[int, int], _core.SiteStats]]


def analyze(
    path: str | os.PathLike[str],
    *,
    address: str | None = None,
    sites: Sequence[str] | str | None = None,
    skip_positions: int = 1,
    folds: int = 5,
    second_moments: bool = True,
    threads: int | None = None,
    shards_per_task: int = 1,
    fanin: int = 4,
    max_retries: int = 3,
    progress: ProgressArg = None,
) -> Report:
    """:func:`rank1fast.analyze` on a Ray cluster: one task per unit of shards, merged in a tree.

    Args:
        path: as for :func:`rank1fast.analyze`; every file must be readable at the same path
            from every worker (a shared filesystem).
        address: the Ray cluster; None uses the running Ray session, else ``RAY_ADDRESS``,
            else starts a local one (see :func:`ray_address`).
        sites, skip_positions, folds, second_moments: as for :func:`rank1fast.analyze`.
        threads: Rust threads per task; each task reserves as many CPUs (default 1, so a
            node runs one task per core).
        shards_per_task: files per task. More files per task mean fewer partial results
            (each holds ``folds x dim² x 8`` bytes per site) to move and merge.
        fanin: partial results merged per merge task.
        max_retries: how often Ray reruns a task whose worker died.
        progress: None shows a bar of the bytes of finished tasks on a terminal, True always,
            False never; a callable gets ``(bytes_done, bytes_total)``.

    Returns:
        The :class:`~rank1fast.Report`, equal to the one-process report (see the module
        documentation for the precision of the second moments).

    Raises:
        PathNotFoundError, DumpError, InvalidArgumentError: as :func:`rank1fast.analyze`;
            InvalidArgumentError also when Ray is not installed or the cluster unreachable.

    Example:
        >>> report = rank1fast.analyze("/shared/dump", cluster="ray")     # doctest: +SKIP
    """
    if isinstance(sites, str):
        sites = [sites]
    sites = None if sites is None else list(sites)
    check_int("skip_positions", skip_positions, 0)
    check_int("threads", threads, 1, optional=True)
    for name, value, low in (
        ("folds", folds, 1),
        ("shards_per_task", shards_per_task, 1),
        ("fanin", fanin, 2),
    ):
        check_int(name, value, low)
    # Workers run in other directories: hand them an absolute path.
    path = Path(path).absolute()
    root, units, manifest = _work_units(path, shards_per_task)
    if manifest is not None and sites is not None:
        have = list(manifest["sites"])
        for s in sites:
            if s not in have:
                raise InvalidArgumentError(
                    f"site {s!r} is not in {path}; it has: {', '.join(have)}"
                )
    sizes = [sum(_size(root / f) for f in files) for files, _ in units]
    # Every task accumulates second moments about the shifts one process would use (the mean
    # of each site's first rows), so the merged sums equal the one-process sums up to float64
    # rounding. Computing them reads the headers and a few rows.
    shifts = (
        dict(
            _core.second_moment_shifts(
                os.fspath(path), sites=sites, skip_positions=int(skip_positions)
            )
        )
        if second_moments
        else None
    )

    ray = connect(address)
    cpus = int(threads or 1)
    leaf = ray.remote(_analyze_unit).options(
        num_cpus=cpus, max_retries=max_retries, retry_exceptions=False
    )
    merge = ray.remote(_merge_partials).options(num_cpus=1, max_retries=max_retries)
    callback, bar = bytes_callback(progress, "analyze")
    total, done = sum(sizes), 0
    leaves: dict[Any, int] = {}
    in_flight: list[Any] = []
    ready: list[Any] = []
    try:
        for i, (files, unit_manifest) in enumerate(units):
            ref = leaf.remote(
                os.fspath(root),
                files,
                unit_manifest,
                i,
                sites if manifest is not None else None,
                int(skip_positions),
                int(folds),
                bool(second_moments),
                cpus,
                shifts,
            )
            leaves[ref] = sizes[i]
            in_flight.append(ref)
        if callback:
            callback(0, total)
        # Merge partials as they arrive, `fanin` at a time, until one is left. The driver
        # holds references only to unmerged partials, so the object store stays small.
        while in_flight:
            finished, in_flight = ray.wait(in_flight, num_returns=1, fetch_local=False)
            for ref in finished:
                if ref in leaves:
                    done += leaves.pop(ref)
                    if callback:
                        callback(done, total)
                ready.append(ref)
            while len(ready) >= fanin or (not in_flight and len(ready) > 1):
                group, ready = ready[:fanin], ready[fanin:]
                in_flight.append(merge.remote(*group))
        partial: _Partial = get(ray, ready[0])
    except BaseException:
        cancel(ray, in_flight)
        raise
    finally:
        if bar is not None:
            bar.close()

    stats = [st for _, st in sorted(partial, key=lambda p: p[0])]
    if manifest is None and sites is not None:
        by_name = {st.name: st for st in stats}
        for s in sites:
            if s not in by_name:
                raise InvalidArgumentError(
                    f"site {s!r} is not in {path}; it has: {', '.join(by_name)}"
                )
        stats = [by_name[s] for s in sites]
    check_rows(stats, path, int(skip_positions))
    return Report(
        (SiteReport(st) for st in stats),
        skip_positions=int(skip_positions),
        source=os.fspath(path),
        modules=site_modules(Path(path)),
    )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _work_units(
    path: Path, per_task: int
) -> tuple[Path, list[tuple[list[str], dict[str, Any] | None]], dict[str, Any] | None]:
    """The root directory, the units (files relative to it, and a manifest listing just them
    for a dump) and the dump's manifest (None for bare files)."""
    if not path.exists():
        raise PathNotFoundError(f"{path}: no such file or directory")
    if not path.is_dir():
        return path.parent, [([path.name], None)], None
    file = path / MANIFEST
    if file.exists():
        manifest = _read_dump_manifest(file)
        shards = manifest["shards"]
        units: list[tuple[list[str], dict[str, Any] | None]] = []
        for i in range(0, len(shards), per_task):
            group = shards[i : i + per_task]
            units.append(([s["file"] for s in group], {**manifest, "shards": group}))
        return path, units, manifest
    names = sorted(p.name for p in path.iterdir() if p.suffix.lower() in (".safetensors", ".npy"))
    if not names:
        raise DumpError(f"{path}: directory holds no manifest.json, .safetensors or .npy file")
    return path, [(names[i : i + per_task], None) for i in range(0, len(names), per_task)], None


def _read_dump_manifest(file: Path) -> dict[str, Any]:
    """The manifest's JSON, with the shard paths checked (they become symlinks in a task)."""
    try:
        manifest = json.loads(file.read_bytes())
    except (OSError, ValueError) as e:
        raise DumpError(f"{file}: not valid JSON: {e}") from None
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if not isinstance(shards, list) or not isinstance(manifest.get("sites"), dict):
        raise DumpError(f'{file}: missing "sites" object or "shards" array')
    seen: set[str] = set()
    for s in shards:
        name = s.get("file") if isinstance(s, dict) else None
        if not isinstance(name, str) or not name:
            raise DumpError(f'{file}: a shard has no "file"')
        parts = PurePosixPath(name).parts
        if name.startswith("/") or any(p in ("..", ".") for p in parts) or "\\" in name:
            raise DumpError(f"{file}: shard path {name!r} leaves the dump directory")
        if name in seen:  # as the Rust reader (parse_manifest) says
            raise DumpError(
                f'{file}: shard "{name}" is listed twice (its tokens would count twice)'
            )
        seen.add(name)
    if not shards:
        raise DumpError(f"{file}: the dump holds no shard yet")
    return manifest


def _analyze_unit(
    root: str,
    files: list[str],
    manifest: dict[str, Any] | None,
    unit: int,
    sites: list[str] | None,
    skip_positions: int,
    folds: int,
    second_moments: bool,
    threads: int,
    shifts: dict[str, Any] | None = None,
) -> _Partial:
    """A Ray task: the Rust core over some files of a dump (or directory), as one process
    reads them. Runs on a worker."""
    base = Path(root)

    def run(target: Path) -> list[_core.SiteStats]:
        return _core.analyze(
            os.fspath(target),
            sites=sites,
            skip_positions=skip_positions,
            folds=folds,
            second_moments=second_moments,
            threads=threads,
            shifts=shifts,
        )

    if manifest is None and len(files) == 1:
        stats = run(base / files[0])
    else:
        with tempfile.TemporaryDirectory(prefix="rank1fast-unit-") as tmp:
            for f in files:
                link = Path(tmp, f)
                link.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(base / f, link)
            if manifest is not None:
                Path(tmp, MANIFEST).write_text(json.dumps(manifest))
            try:
                stats = run(Path(tmp))
            except Rank1Error as e:  # name the real files, not the links
                raise type(e)(str(e).replace(tmp, root)) from None
    return [((unit, i), st) for i, st in enumerate(stats)]


def _merge_partials(*partials: _Partial) -> _Partial:
    """Merge partial results site by site (a Ray task; also fine locally)."""
    out: dict[str, tuple[tuple[int, int], _core.SiteStats]] = {}
    for part in partials:
        for key, st in part:
            if st.name in out:
                k0, s0 = out[st.name]
                out[st.name] = (min(k0, key), s0.merge(st))
            else:
                out[st.name] = (key, st)
    return list(out.values())
