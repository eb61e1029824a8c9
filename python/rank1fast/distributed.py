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
import json
import os
import re
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._args import positive_int
from ._cluster import analyze, cancel, connect, get, ray_address
from ._fs import write_json_atomic
from ._manifest import MANIFEST
from ._progress import ProgressArg, iter_progress
from .collect import Dump
from .corpus import TextsArg, describe_corpus, read_texts
from .errors import DumpError, InvalidArgumentError, PathNotFoundError

if TYPE_CHECKING:
    import torch

__all__ = ["analyze", "collect", "collect_part", "join_parts", "ray_address", "PART_DIR"]

#: Subdirectory of worker ``rank`` in a collection over several workers.
PART_DIR = "rank-{:05d}"
_PART_RE = re.compile(r"rank-(\d{5})")
#: Written into a worker's part once its document ids are global (see :func:`collect_part`).
_PART_FILE = "part.json"
_PART_FORMAT = "rank1fast.dump-part"


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
        "corpus": describe_corpus(texts),
    }
    write_json_atomic(part / _PART_FILE, info)
    return dump


def _check_top(out: Path) -> None:
    """Refuse a directory that holds a one-worker dump."""
    file = out / MANIFEST
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
        if not (part / MANIFEST).exists():
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
    write_json_atomic(out / MANIFEST, manifest)
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
    ray = connect(address)
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
            get(ray, finished)
            bar.update(len(finished))
    except BaseException:
        cancel(ray, pending)
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
        type=positive_int,
        default=None,
        metavar="N",
        help="the number of workers (default: the rank-RRRRR directories in DIR)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no summary")
    p.set_defaults(func=_run_join)


def _run_join(args: argparse.Namespace) -> int:
    dump = join_parts(args.out, args.world)
    if not args.quiet:
        print(dump.summary())
    return 0
