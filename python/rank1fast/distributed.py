"""Analysis and collection beyond one machine: Ray tasks, or plain processes given a rank.

Analysis (:func:`analyze`, what ``rank1fast.analyze(path, cluster="ray")`` runs):

- the dump's shards (or the files of a directory) are cut into units of ``shards_per_task``
  files; each unit is one Ray task that runs the Rust core on its files and returns the
  partial sufficient statistics (:class:`~rank1fast._core.SiteStats`: sums, no activations);
- partials are merged in a tree as they arrive (``fanin`` at a time, on the workers), and the
  driver receives one set of statistics per site and solves the constant direction once;
- every file is analysed exactly as in one process: a unit's files are symlinked into a
  private directory with a manifest of their own, so the Rust core sees the same files, the
  same manifest checks and the same rows. Folds are by document id where the dump has them;
  otherwise by blocks of ``FOLD_BLOCK_ROWS`` rows counted within each file (not across the
  dump), so a file's rows fall into the same folds whichever task reads it;
- a task whose worker dies is retried by Ray (``max_retries``); errors in the data
  (:class:`~rank1fast.DumpError` ...) are raised on the driver as they are.

Every task accumulates its float32 Gram matrices about the shift one process would use (the
mean of each site's first rows, read once by the driver: ``_core.second_moment_shifts``), on
the same chunks, so every statistic, second moments included, equals the one-process one up
to the order of float64 additions (1e-12 relative in the tests).

Collection (:func:`collect` on Ray, or :func:`collect_part` in each of ``world`` plain
processes followed by :func:`join_parts`):

- document ``i`` of the corpus goes to worker ``i % world``; worker ``r`` collects its
  documents with :func:`rank1fast.collect` into ``OUT/rank-RRRRR/`` (a normal dump, resumed
  the normal way when rerun), numbering them with their corpus index ``r + world * i``
  (``document_offset=r, document_stride=world``), so that folds by document are those of a
  one-worker collection;
- :func:`join_parts` checks that every part is complete, of the same model, sites and
  settings, and writes ``OUT/manifest.json`` listing every shard (paths relative to ``OUT``):
  ``OUT`` is then a dump like any other for :func:`rank1fast.analyze` and
  :class:`rank1fast.Dump`, with the shards grouped by worker.

Shards must be readable from every worker (a shared filesystem). Ray is optional:
``pip install 'rank1fast[ray]'``.
"""

from __future__ import annotations

import argparse
import copyreg
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from . import _core
from ._progress import ProgressArg, bytes_callback, iter_progress
from .analysis import _manifest_modules
from .collect import Dump, _describe_corpus, _positive_int, _summary, _write_json_atomic
from .corpus import TextsArg, read_texts
from .errors import DumpError, InvalidArgumentError, PathNotFoundError, Rank1Error
from .report import Report, SiteReport

if TYPE_CHECKING:
    import torch

__all__ = ["analyze", "collect", "collect_part", "join_parts", "PART_DIR"]

#: Subdirectory of worker ``rank`` in a collection over several workers.
PART_DIR = "rank-{:05d}"
_PART_RE = re.compile(r"rank-(\d{5})")
#: Written into a worker's part once its document ids are global (see :func:`collect_part`).
_PART_FILE = "part.json"
_PART_FORMAT = "rank1fast.dump-part"
_MANIFEST = "manifest.json"


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


# Registered on import (``import rank1fast`` imports this module): SiteStats, SiteReport and
# Report then pickle with pickle, cloudpickle, multiprocessing and Ray.
copyreg.pickle(_core.SiteStats, _reduce_site_stats)


# --------------------------------------------------------------------------- Ray


def _ray(address: str | None) -> Any:
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


def _get(ray: Any, refs: Any) -> Any:
    """``ray.get`` that raises a task's rank1fast error (or Ctrl-C) as itself."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, (Rank1Error, KeyboardInterrupt)):
            raise cause from None
        raise


def _cancel(ray: Any, refs: Iterable[Any]) -> None:
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
    for name, value in (("folds", folds), ("shards_per_task", shards_per_task)):
        if value < 1:
            raise InvalidArgumentError(f"{name} must be at least 1, got {value}")
    if fanin < 2:
        raise InvalidArgumentError(f"fanin must be at least 2, got {fanin}")
    root, units, manifest = _work_units(Path(path), shards_per_task)
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

    ray = _ray(address)
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
        partial: _Partial = _get(ray, ready[0])
    except BaseException:
        _cancel(ray, in_flight)
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
    for st in stats:
        if st.count == 0 and st.nonfinite > 0:
            raise DumpError(
                f"{path}: tensor {st.name!r}: all {st.nonfinite} rows of the site hold NaN "
                "or infinity"
            )
    return Report(
        (SiteReport(st) for st in stats),
        skip_positions=int(skip_positions),
        source=os.fspath(path),
        modules=_manifest_modules(Path(path)),
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
    file = path / _MANIFEST
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
    for s in shards:
        name = s.get("file") if isinstance(s, dict) else None
        if not isinstance(name, str) or not name:
            raise DumpError(f'{file}: a shard has no "file"')
        parts = PurePosixPath(name).parts
        if name.startswith("/") or any(p in ("..", ".") for p in parts) or "\\" in name:
            raise DumpError(f"{file}: shard path {name!r} leaves the dump directory")
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
                Path(tmp, _MANIFEST).write_text(json.dumps(manifest))
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


# --------------------------------------------------------------------------- collection


def collect_part(
    model: Any,
    texts: TextsArg,
    sites: str | Iterable[str],
    out: str | os.PathLike[str],
    *,
    rank: int,
    world: int,
    max_tokens: int | None = None,
    max_length: int = 512,
    batch_size: int = 8,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    storage_dtype: str | torch.dtype = "bfloat16",
    outputs: bool = False,
    shard_tokens: int | None = None,
    progress: ProgressArg = None,
) -> Dump:
    """Worker ``rank``'s share of a collection over ``world`` workers: documents ``i`` with
    ``i % world == rank``, into ``OUT/rank-RRRRR/``.

    Run it in every worker (plain processes, a batch system's array job, Ray tasks) with the
    same arguments but ``rank``; then :func:`join_parts` writes the dump's manifest. A part is
    a normal dump (:func:`rank1fast.collect`), so rerunning a worker resumes it. Its documents
    are recorded with their corpus indices (``rank + world * i`` for the worker's ``i``-th
    document), so that folds by document are those of one collection.

    Args:
        model, texts, sites, max_length, batch_size, device, dtype, storage_dtype, outputs,
            shard_tokens, progress: as for :func:`rank1fast.collect`. Every worker reads the
            whole corpus and keeps its documents (a corpus file must be readable by all).
        out: the dump directory of the whole collection.
        rank: this worker, ``0 <= rank < world``.
        world: the number of workers.
        max_tokens: tokens of the whole collection (not of this part): the collection holds
            what one worker's ``collect(max_tokens=...)`` would. Each worker tokenizes the
            corpus up to that point to find its share.

    Returns:
        The part's :class:`~rank1fast.Dump`.

    Raises:
        as :func:`rank1fast.collect`; DumpError also when ``OUT`` holds something else.

    Example:
        >>> # in each of 4 processes, with RANK set to 0..3:
        >>> rank1fast.distributed.collect_part(None, "corpus.jsonl", "resid_mid.15",
        ...     "/shared/dump", rank=int(os.environ["RANK"]), world=4)       # doctest: +SKIP
        >>> rank1fast.distributed.join_parts("/shared/dump")                # doctest: +SKIP
    """
    from .collect import collect
    from .models import load_model

    if world < 1 or not 0 <= rank < world:
        raise InvalidArgumentError(f"need 0 <= rank < world, got rank {rank}, world {world}")
    if max_tokens is not None and max_tokens < 1:
        raise InvalidArgumentError(f"max_tokens must be at least 1, got {max_tokens}")
    out = Path(out)
    _check_top(out)
    part = out / PART_DIR.format(rank)
    _part_info(part, rank, world)

    last: int | None = None  # the last document of the corpus the collection reaches
    share: int | None = None
    if max_tokens is not None:
        model = load_model(model, device=device, dtype=dtype)  # the tokenizer is needed first
        last, share = _token_share(model[1], texts, rank, world, max_tokens, max_length)
    dump = collect(
        model,
        _documents(texts, rank, world, last),
        sites,
        part,
        max_tokens=share or None,
        max_length=max_length,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        storage_dtype=storage_dtype,
        outputs=outputs,
        shard_tokens=shard_tokens,
        document_offset=rank,
        document_stride=world,
        progress=progress,
    )
    info = {
        "format": _PART_FORMAT,
        "rank": rank,
        "world": world,
        "max_tokens": max_tokens,
        "cut": last is not None,
        "corpus": _describe_corpus(texts),
    }
    _write_json_atomic(part / _PART_FILE, info)
    return dump


def _check_top(out: Path) -> None:
    """Refuse a directory that holds a one-worker dump."""
    file = out / _MANIFEST
    if file.exists():
        try:
            workers = json.loads(file.read_text()).get("collect", {}).get("workers")
        except (OSError, ValueError, AttributeError):
            workers = None
        if workers is None:
            raise DumpError(
                f"{out} holds a dump of one collection, not one over several workers; "
                "use a new output directory"
            )


def _documents(texts: TextsArg, rank: int, world: int, last: int | None) -> Iterator[str]:
    """Documents ``rank, rank + world, ...`` of the corpus, up to index ``last``."""
    docs = read_texts(texts)
    if last is not None:
        docs = islice(docs, last + 1)
    return islice(docs, rank, None, world)


def _token_share(
    tokenizer: Any, texts: TextsArg, rank: int, world: int, max_tokens: int, max_length: int
) -> tuple[int | None, int | None]:
    """Where a one-worker collection of ``max_tokens`` stops, and this worker's tokens of it.

    One worker keeps the first ``max_tokens`` tokens in document order (its last batch is cut
    there), so this worker's share is the tokens of its documents before the document where
    the cut falls, plus the cut part of that document if it is this worker's. Returns
    ``(None, None)`` when the corpus holds fewer tokens (no cut).
    """
    seen = 0
    mine = 0
    docs = read_texts(texts)
    index = 0
    while True:
        batch = list(islice(docs, 64))
        if not batch:
            return None, None
        # Tokenized as collect tokenizes (special tokens, truncation to max_length).
        ids = tokenizer(batch, add_special_tokens=True, truncation=True, max_length=max_length)
        for seq in ids["input_ids"]:
            n = len(seq)
            if seen + n >= max_tokens and n > 0:
                if index % world == rank:
                    mine += max_tokens - seen
                return index, mine
            seen += n
            if index % world == rank:
                mine += n
            index += 1


def _part_info(part: Path, rank: int, world: int) -> dict[str, Any]:
    """A part's ``part.json`` ({} before its first completion), checked to be of this rank."""
    file = part / _PART_FILE
    if not file.exists():
        return {}
    try:
        info = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise DumpError(f"{file}: not valid JSON: {e}") from None
    if not isinstance(info, dict) or info.get("format") != _PART_FORMAT:
        raise DumpError(f'{file}: "format" is not "{_PART_FORMAT}"')
    if (info.get("rank"), info.get("world")) != (rank, world):
        raise DumpError(
            f"{part} is part {info.get('rank')} of {info.get('world')} workers, not part "
            f"{rank} of {world}; use a new output directory"
        )
    return info


def _unnumbered(settings: Any) -> Any:
    """Collect settings without the part's document numbering (which differs by rank)."""
    if isinstance(settings, dict):
        return {k: v for k, v in settings.items() if k != "documents"}
    return settings


def join_parts(out: str | os.PathLike[str], world: int | None = None) -> Dump:
    """Write the manifest of a collection over several workers, once every part is complete.

    Args:
        out: the directory the workers of :func:`collect_part` wrote into.
        world: the number of workers (default: the ``rank-RRRRR`` directories found).

    Returns:
        The whole collection's :class:`~rank1fast.Dump`: its manifest lists every part's
        shards (``rank-RRRRR/shard-NNNNN.safetensors``) with document ids unique across
        parts, so ``rank1fast.analyze(out)`` equals the analysis of one collection.

    Raises:
        DumpError: a part is missing or incomplete, parts disagree (model, sites, settings),
            or a part's document ids were not made global.
        InvalidArgumentError: ``world`` is less than 1.

    Example:
        >>> dump = rank1fast.distributed.join_parts("/shared/dump")     # doctest: +SKIP
    """
    out = Path(out)
    if not out.is_dir():
        raise PathNotFoundError(f"{out}: no such directory")
    _check_top(out)
    if world is not None and world < 1:
        raise InvalidArgumentError(f"world must be at least 1, got {world}")
    if world is None:
        ranks = sorted(
            int(found.group(1)) for p in out.iterdir() if (found := _PART_RE.fullmatch(p.name))
        )
        world = len(ranks)
        if not world:
            raise DumpError(f"{out} holds no part (rank-RRRRR directory) of a collection")
    parts: list[Dump] = []
    infos: list[dict[str, Any]] = []
    for rank in range(world):
        part = out / PART_DIR.format(rank)
        if not (part / _MANIFEST).exists():
            raise DumpError(f"{out}: part {rank} of {world} ({part.name}) is missing")
        dump = Dump.open(part)
        info = _part_info(part, rank, world)
        if not dump.complete or not info:
            raise DumpError(
                f"{part} is not a complete part {rank} of {world}: rerun its collect_part"
            )
        numbering = dump.manifest["collect"].get("documents", {"offset": 0, "stride": 1})
        if numbering != {"offset": rank, "stride": world}:
            raise DumpError(
                f"{part}: its documents are numbered {numbering}, not as part {rank} of "
                f"{world} (offset {rank}, stride {world}): collect it with collect_part"
            )
        parts.append(dump)
        infos.append(info)
    first = parts[0].manifest
    fingerprint = ("type", "architecture", "layers", "hidden_size", "dtype", "fingerprint")
    for rank, dump in enumerate(parts[1:], start=1):
        m = dump.manifest
        if any(m["model"].get(k) != first["model"].get(k) for k in fingerprint):
            raise DumpError(f"{dump.path} was collected from another model than part 0")
        for key in ("sites", "outputs", "collect"):
            if _unnumbered(m.get(key)) != _unnumbered(first.get(key)):
                raise DumpError(f"{dump.path} was collected with other {key} than part 0")
        if infos[rank]["max_tokens"] != infos[0]["max_tokens"]:
            raise DumpError(f"{dump.path} was collected with another max_tokens than part 0")

    covered = [
        rank + world * (int(d.documents) - 1) + 1 for rank, d in enumerate(parts) if d.documents
    ]
    manifest: dict[str, Any] = {
        "format": first["format"],
        "version": first["version"],
        "model": first["model"],
        "sites": first["sites"],
        "shards": [
            {**s, "file": f"{d.path.name}/{s['file']}", "rank": rank}
            for rank, d in enumerate(parts)
            for s in d.manifest["shards"]
        ],
        "tokens": sum(d.tokens for d in parts),
        "documents": max(covered, default=0),
        "complete": True,
        "stopped": "max_tokens" if any(i["cut"] for i in infos) else "corpus_end",
        "max_tokens": infos[0]["max_tokens"],
        # "workers" also keeps rank1fast.collect from appending to this directory.
        "collect": {**_unnumbered(first["collect"]), "workers": world},
        "corpus": infos[0]["corpus"],
        "parts": [d.path.name for d in parts],
    }
    if "outputs" in first:
        manifest["outputs"] = first["outputs"]
    if "carriers" in first:  # how each resid_* site joins the residual (the adapter reads it)
        manifest["carriers"] = first["carriers"]
    _write_json_atomic(out / _MANIFEST, manifest)
    return Dump.open(out)


def collect(
    model: Any,
    texts: TextsArg,
    sites: str | Iterable[str],
    out: str | os.PathLike[str],
    *,
    workers: int,
    address: str | None = None,
    cpus_per_worker: float = 1,
    gpus_per_worker: float = 0,
    max_retries: int = 3,
    max_tokens: int | None = None,
    max_length: int = 512,
    batch_size: int = 8,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    storage_dtype: str | torch.dtype = "bfloat16",
    outputs: bool = False,
    shard_tokens: int | None = None,
    progress: ProgressArg = None,
) -> Dump:
    """:func:`rank1fast.collect` by ``workers`` Ray tasks (:func:`collect_part` each), joined.

    A worker that dies is rerun by Ray (``max_retries``) and resumes its part; rerunning the
    whole call after an interruption resumes every part.

    Args:
        model: as for :func:`rank1fast.collect`; a name or path is loaded by each worker.
        texts: a corpus file (read by every worker: shared filesystem), None for the default
            corpus, or an iterable of strings (sent to the workers).
        workers: the number of workers (document ``i`` goes to worker ``i % workers``).
        address: the Ray cluster, as for :func:`analyze`.
        cpus_per_worker, gpus_per_worker: what each worker reserves on the cluster
            (``device="auto"`` then uses the GPU Ray assigns).
        max_retries: how often Ray reruns a worker that died.
        max_tokens: tokens of the whole collection, as for one :func:`rank1fast.collect`.
        max_length, batch_size, device, dtype, storage_dtype, outputs, shard_tokens: as for
            :func:`rank1fast.collect`, for every worker.
        progress: a bar of finished workers (None: on a terminal).

    Returns:
        The whole collection's :class:`~rank1fast.Dump` (see :func:`join_parts`).

    Example:
        >>> dump = rank1fast.distributed.collect("HuggingFaceTB/SmolLM2-1.7B", "/shared/c.jsonl",
        ...     "resid_mid.15", "/shared/dump", workers=8, gpus_per_worker=1)  # doctest: +SKIP
    """
    if workers < 1:
        raise InvalidArgumentError(f"workers must be at least 1, got {workers}")
    out = Path(out)
    _check_top(out)
    if isinstance(texts, os.PathLike):
        texts = os.fspath(texts)
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if texts is not None and not isinstance(texts, str):
        texts = list(read_texts(texts))
    ray = _ray(address)
    task = ray.remote(collect_part).options(
        num_cpus=cpus_per_worker,
        num_gpus=gpus_per_worker,
        max_retries=max_retries,
        retry_exceptions=False,
    )
    # Top-level object references are resolved on the workers: one copy of each in the store.
    model_ref, texts_ref = ray.put(model), ray.put(texts)
    refs = [
        task.remote(
            model_ref,
            texts_ref,
            sites,
            os.fspath(out),
            rank=rank,
            world=workers,
            max_tokens=max_tokens,
            max_length=max_length,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            storage_dtype=storage_dtype,
            outputs=outputs,
            shard_tokens=shard_tokens,
            progress=False,
        )
        for rank in range(workers)
    ]
    bar = iter_progress(progress, workers, "collect", unit="worker")
    pending = list(refs)
    try:
        while pending:
            finished, pending = ray.wait(pending, num_returns=1)
            _get(ray, finished)
            bar.update(len(finished))
    except BaseException:
        _cancel(ray, pending)
        raise
    finally:
        bar.close()
    return join_parts(out, workers)


# --------------------------------------------------------------------------- CLI


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register ``rank1fast join`` (``rank1fast collect --part/--workers`` is collect's)."""
    p = sub.add_parser(
        "join",
        help="write the manifest of a collection by several workers (collect --part)",
        description=(
            "Check that every part rank-RRRRR/ that `rank1fast collect --part RANK/WORLD "
            "--out DIR` wrote is complete and collected with the same model, sites and "
            "settings, then write DIR/manifest.json listing all their shards: DIR is then a "
            "dump that `rank1fast analyze DIR` reads like a one-worker collection."
        ),
    )
    p.add_argument("out", metavar="DIR", help="the --out directory of the parts")
    p.add_argument(
        "--world",
        type=_positive_int,
        default=None,
        metavar="N",
        help="the number of workers (default: the rank-RRRRR directories in DIR)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no summary")
    p.set_defaults(func=_run_join)


def _run_join(args: argparse.Namespace) -> int:
    dump = join_parts(args.out, args.world)
    if not args.quiet:
        print(_summary(dump))
    return 0
