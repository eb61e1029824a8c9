"""``rank1fast.collect``: record the inputs of a model's site modules over a corpus into a dump.

A dump (format v1, see DESIGN.md) is a directory: ``manifest.json`` plus
``shard-NNNNN.safetensors`` files, each holding one ``[tokens, dim]`` tensor per site (the
module INPUT, what ``lora_A`` sees), ``position`` (int32), ``document`` (int64) and ``token``
(int32, the token id; dumps written before it was recorded lack it); with
``outputs=True`` also ``<site>.output`` (the module output, the steering space), listed under
the manifest's ``"outputs"`` key so that ``analyze`` does not take it for a site.

How collection runs:

- documents are taken in order, ``batch_size`` at a time, tokenized (truncated to
  ``max_length``) and padded on the right to the longest of the batch;
- forward pre-hooks (and forward hooks for outputs) keep the rows of real tokens only (the
  attention mask's padding is dropped) and cast them to the storage dtype; on CUDA they are
  copied asynchronously to pinned host memory;
- once every site of a batch has been seen the forward pass is stopped, so layers after the
  last site and the LM head are not computed (not on the first batch, which also checks that
  every site module runs exactly once per forward pass);
- a writer thread writes each full shard under a temporary name, renames it, and rewrites the
  manifest (also atomically), so the forward pass never waits for the disk and an interrupted
  collection (Ctrl-C, kill -9) always leaves a valid dump;
- rerunning the same call resumes: the manifest records how many documents the written shards
  cover and a hash of them, the documents already covered are skipped (their hash checked), and
  shard boundaries fall where an uninterrupted run puts them, so the result is the same dump. A
  directory that holds a dump of another model, other sites or other settings is refused;
- one collection at a time per directory: a lock file (``collect.lock``, an advisory
  ``flock`` the kernel drops when the process dies, even by kill -9) refuses a second
  concurrent collection into the same dump; readers (``analyze``, :class:`Dump`) take no lock
  and see the shards the manifest lists, which are always complete;
- a failed write (full disk, I/O error) removes its temporary file and raises
  :class:`Rank1IOError`; the dump stays valid with the shards written before, and the same
  call resumes once there is space.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import shutil
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

from ._batch import Batch, input_device, make_batch
from ._fs import write_json_atomic
from ._manifest import MANIFEST
from ._progress import ProgressArg, iter_progress
from .corpus import TextsArg, describe_corpus, read_texts
from .errors import DumpError, InvalidArgumentError, PathNotFoundError, Rank1IOError, SiteError

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch and transformers are imported inside the functions that use them, so that
# `import rank1fast` (which exports collect and Dump) stays light and works without torch.

__all__ = ["collect", "Dump"]

_FORMAT = "rank1fast.dump"
_VERSION = 1
_LOCK = "collect.lock"
_SHARD = "shard-{:05d}.safetensors"
#: Default shard size: as many tokens as fit in this many bytes of stored activations.
SHARD_BYTES = 256 * 2**20
_STORAGE_DTYPES = ("float32", "float16", "bfloat16")
#: Stop each forward pass once every site is recorded (layers after the last site and the LM
#: head are not computed). benches/bench_collect.py turns it off to time the full forward.
STOP_EARLY = True


# --------------------------------------------------------------------------- the Dump object


class Dump:
    """A dump directory written by :func:`collect` (manifest.json + safetensors shards).

    Attributes:
        path: the dump directory.
        manifest: the parsed ``manifest.json``.

    Example:
        >>> dump = rank1fast.Dump.open("dump/")                 # doctest: +SKIP
        >>> dump.tokens, list(dump.sites)                        # doctest: +SKIP
        (200000, ['resid_mid.15', 'resid_post.15'])
        >>> report = rank1fast.analyze(dump.path)                # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike[str], manifest: dict[str, Any]):
        self.path = Path(path)
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Dump:
        """Open a dump directory.

        Args:
            path: the directory holding ``manifest.json``.

        Returns:
            The :class:`Dump`.

        Raises:
            PathNotFoundError: there is no ``manifest.json`` in ``path``.
            DumpError: the manifest is not valid JSON or not a rank1fast dump v1.

        Example:
            >>> Dump.open("dump/").tokens                          # doctest: +SKIP
            200000
        """
        return cls(path, _read_manifest(Path(path)))

    @property
    def sites(self) -> dict[str, str]:
        """``{site name: module path}`` in the order they were collected."""
        return {name: s["module"] for name, s in self.manifest["sites"].items()}

    @property
    def outputs(self) -> dict[str, str]:
        """``{site name: tensor name of its module output}`` (empty unless ``outputs=True``)."""
        return {name: o["tensor"] for name, o in self.manifest.get("outputs", {}).items()}

    @property
    def tokens(self) -> int:
        """Tokens recorded (rows of every site tensor, all shards together)."""
        return int(self.manifest["tokens"])

    @property
    def documents(self) -> int:
        """Documents of the corpus that the written shards cover."""
        return int(self.manifest.get("documents", 0))

    @property
    def complete(self) -> bool:
        """True once the collection finished (corpus or ``max_tokens`` exhausted)."""
        return bool(self.manifest.get("complete", False))

    @property
    def shards(self) -> list[Path]:
        """Paths of the shard files, in order."""
        return [self.path / s["file"] for s in self.manifest["shards"]]

    def read(self, name: str) -> torch.Tensor:
        """One tensor of every shard, concatenated: a site, ``<site>.output``, ``position``,
        ``document`` or ``token`` (not in dumps written before token ids were recorded).

        Args:
            name: the tensor name.

        Returns:
            A CPU tensor ``[tokens, dim]`` (sites, outputs) or ``[tokens]``.

        Raises:
            DumpError: a shard lacks the tensor or cannot be read.

        Example:
            >>> x = dump.read("resid_mid.15")                       # doctest: +SKIP
            >>> x.shape                                              # doctest: +SKIP
            torch.Size([200000, 576])
        """
        import torch
        from safetensors import SafetensorError, safe_open

        parts = []
        for shard in self.shards:
            try:
                with safe_open(shard, framework="pt") as f:
                    if name not in f.keys():
                        raise DumpError(f"{shard}: no tensor {name!r}")
                    parts.append(f.get_tensor(name))
            except (SafetensorError, OSError) as e:
                raise DumpError(f"{shard}: cannot read tensor {name!r}: {e}") from e
        if not parts:
            raise DumpError(f"{self.path}: the dump holds no shard yet")
        return torch.cat(parts)

    def analyze(self, **kwargs: Any) -> Any:
        """``rank1fast.analyze(self.path, **kwargs)``; see :func:`rank1fast.analyze`.

        Example:
            >>> print(dump.analyze(skip_positions=1))               # doctest: +SKIP
        """
        from .analysis import analyze

        return analyze(self.path, **kwargs)

    def summary(self, next_step: str | None = None) -> str:
        """A few readable lines: tokens, documents, shards, model, sites and what to run next
        (what ``rank1fast collect`` and ``rank1fast join`` print).

        Args:
            next_step: the command to suggest (default: ``rank1fast analyze PATH``).

        Example:
            >>> print(dump.summary())                               # doctest: +SKIP
        """
        workers = self.manifest.get("collect", {}).get("workers")
        by = f" by {workers} workers" if workers else ""
        lines = [
            f"dump {self.path}: {self.tokens} tokens from {self.documents} documents in "
            f"{len(self.shards)} shard(s){by}",
            f"model: {self.manifest['model'].get('name')}",
        ]
        for name, s in self.manifest["sites"].items():
            lines.append(f"  {name:<20} {s['module']}  dim {s['dim']}  {s['dtype']}")
        if self.outputs:
            lines.append(f"outputs: {', '.join(self.outputs.values())}")
        lines.append(f"next: {next_step or f'rank1fast analyze {self.path}'}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        return (
            f"Dump({str(self.path)!r}, tokens={self.tokens}, documents={self.documents}, "
            f"sites={list(self.sites)}, shards={len(self.manifest['shards'])}, {state})"
        )


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    if not file.is_file():
        raise PathNotFoundError(f"{file} does not exist: {path} is not a dump directory")
    try:
        manifest = json.loads(file.read_text())
    except (ValueError, OSError) as e:
        raise DumpError(f"{file}: not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        raise DumpError(f'{file}: "format" is not "{_FORMAT}"')
    if manifest.get("version") != _VERSION:
        raise DumpError(f"{file}: unsupported dump version {manifest.get('version')!r}")
    for key, kind in (("sites", dict), ("shards", list), ("tokens", int)):
        if not isinstance(manifest.get(key), kind):
            raise DumpError(f'{file}: missing or malformed "{key}"')
    return manifest


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Create ``out`` if needed and hold its lock file while one collection writes there.

    The lock is an advisory ``flock`` on ``out/collect.lock`` (which holds the writer's pid):
    the kernel releases it when the process ends however it ends, so a killed collection never
    blocks its own resume. A directory this call created is removed again when the collection
    fails before the dump's first manifest is written.
    """
    if out.exists() and not out.is_dir():
        raise DumpError(f"{out} exists and is not a directory")
    if (
        out.is_dir()
        and not (out / MANIFEST).exists()
        and any(p.name not in (_LOCK, MANIFEST + ".tmp") for p in out.iterdir())
    ):
        raise DumpError(
            f"{out} is not empty and holds no {MANIFEST}: choose a new or empty directory"
        )
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Rank1IOError(f"cannot create the dump {out}: {e}") from e
    path = out / _LOCK
    try:
        fd = _acquire(path, out)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    try:
        yield
    finally:
        if created and not (out / MANIFEST).exists():
            shutil.rmtree(out, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        os.close(fd)


def _acquire(path: Path, out: Path) -> int:
    """An open descriptor of ``path`` holding its exclusive flock (DumpError when taken)."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise Rank1IOError(f"cannot create the lock file {path}: {e}") from e
        if fcntl is None:  # no flock (Windows): the lock file is informational only
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DumpError(
                f"{out} is being written by another collection (pid {holder}, lock {path}); "
                "wait for it to finish or stop it, then rerun to resume"
            ) from None
        # The previous holder unlinks the file as it releases it: if that happened between
        # our open and flock, we hold a lock on a file nobody else will see; start over.
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    with contextlib.suppress(OSError):  # the pid is for the message above; a full disk is ok
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    return fd


# --------------------------------------------------------------------------- collect


def collect(
    model: Any,
    texts: TextsArg,
    sites: str | Iterable[str],
    out: str | os.PathLike[str] | None = None,
    *,
    statistics: bool = False,
    skip_positions: int = 1,
    folds: int = 5,
    second_moments: bool = True,
    max_tokens: int | None = None,
    max_length: int = 512,
    batch_size: int = 8,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    storage_dtype: str | torch.dtype = "bfloat16",
    outputs: bool = False,
    shard_tokens: int | None = None,
    document_offset: int = 0,
    document_stride: int = 1,
    progress: ProgressArg = None,
) -> Any:
    """Record the input of each site's module, for every real token of a corpus, into a dump.

    With ``statistics=True`` no dump is written: the statistics :func:`rank1fast.analyze`
    would compute from the dump are accumulated with torch on the model's device while the
    model runs, and a :class:`~rank1fast.Report` is returned (see :mod:`rank1fast.online`).

    Args:
        model: None or ``"default"`` (the built-in SmolLM2-135M-Instruct), a Hugging Face model
            id, a local checkpoint directory, a ``.gguf`` file, or an already loaded model
            (``(model, tokenizer)``, or a bare model whose tokenizer loads from its
            ``name_or_path``); see :func:`rank1fast.load_model`.
        texts: an iterable of strings, a ``.txt`` file (documents separated by blank lines),
            a ``.jsonl`` file (``"text"`` field), or None for the built-in default corpus
            (English prose from the Python documentation, about 230k tokens).
        sites: ``resid_mid.L``, ``resid_post.L``, ranges ``resid_mid.4-20``, ``all``, or raw
            module paths (``nn.Linear`` or ``Conv1D``), as a list or a comma-separated string.
        out: the dump directory: created if missing; a dump of the same call there is resumed.
            Required unless ``statistics=True`` (which takes none).
        statistics: accumulate the analysis statistics online instead of writing a dump, and
            return the Report; ``skip_positions``, ``folds`` and ``second_moments`` mean what
            they mean for :func:`rank1fast.analyze`.
        max_tokens: stop after this many tokens (the last batch is cut to match exactly);
            None runs through the whole corpus.
        max_length: documents are truncated to this many tokens.
        batch_size: documents per forward pass.
        device: ``"auto"`` (CUDA, then MPS, then CPU; a loaded model stays where it is) or a
            torch device.
        dtype: the model's compute dtype; None keeps the model's own.
        storage_dtype: dtype of the stored activations: ``"bfloat16"`` (default),
            ``"float16"`` or ``"float32"`` (bit-exact copies of a float32 model's values).
        outputs: also record each site module's output (``<site>.output``), the space
            steering vectors live in.
        shard_tokens: tokens per shard (whole batches; a shard closes at the first batch end
            at or past this count). Default: about 256 MiB of stored activations.
        document_offset, document_stride: the ``i``-th document of ``texts`` is recorded as
            document ``document_offset + document_stride * i`` (folds are by document). A
            worker of a collection over several (:mod:`rank1fast.distributed`) that reads
            documents ``rank, rank + world, ...`` passes ``rank`` and ``world``.
        progress: None shows a tqdm bar of tokens on a terminal, True always, False never; a
            callable is called as ``progress(tokens_done, max_tokens or 0)`` after each batch.

    Returns:
        The :class:`Dump`, complete; with ``statistics=True``, the :class:`~rank1fast.Report`.

    Raises:
        SiteError: a site that does not resolve, or whose module does not see
            ``[batch, seq, dim]`` inputs exactly once per forward pass.
        DumpError: ``out`` holds a dump of another model, other sites or other settings, a
            corpus that differs from the one it was collected on, or files that are no dump.
        InvalidArgumentError: a bad argument (batch_size < 1, unknown storage dtype, ...).
        Rank1IOError: a shard or the manifest cannot be written.

    Example:
        >>> dump = rank1fast.collect(None, None, "resid_mid.15,resid_post.15", "dump/",
        ...                          max_tokens=50_000)               # doctest: +SKIP
        >>> rank1fast.analyze(dump.path)                             # doctest: +SKIP
    """

    from .models import get_module, load_model, module_dims, resolve_dtype, resolve_sites

    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be at least 1, got {batch_size}")
    if max_length < 1:
        raise InvalidArgumentError(f"max_length must be at least 1, got {max_length}")
    if max_tokens is not None and max_tokens < 1:
        raise InvalidArgumentError(f"max_tokens must be at least 1, got {max_tokens}")
    if shard_tokens is not None and shard_tokens < 1:
        raise InvalidArgumentError(f"shard_tokens must be at least 1, got {shard_tokens}")
    if statistics and (out is not None or outputs):
        raise InvalidArgumentError(
            "statistics=True writes no dump: pass out=None and outputs=False "
            "(or collect a dump and run rank1fast.analyze on it)"
        )
    if not statistics and out is None:
        raise InvalidArgumentError("out (the dump directory) is required unless statistics=True")
    if document_offset < 0 or document_stride < 1:
        raise InvalidArgumentError(
            f"need document_offset >= 0 and document_stride >= 1, got {document_offset}, "
            f"{document_stride}"
        )
    if folds < 1 or skip_positions < 0:
        raise InvalidArgumentError(
            f"folds must be at least 1 and skip_positions at least 0, got {folds}, {skip_positions}"
        )
    store = resolve_dtype(storage_dtype)
    dname = str(store).removeprefix("torch.")
    if dname not in _STORAGE_DTYPES:
        raise InvalidArgumentError(f"storage_dtype {storage_dtype!r}: use bfloat16/float16/float32")

    is_default = model is None or (isinstance(model, str) and model == "default")
    net, tokenizer = load_model(model, device=device, dtype=dtype, quiet=progress is False)
    site_map = resolve_sites(net, sites)
    carriers = _carriers(net, site_map)
    modules = {name: get_module(net, path) for name, path in site_map.items()}
    dims = {name: module_dims(m) for name, m in modules.items()}

    if shard_tokens is None:
        per_token = sum(d_in + (d_out if outputs else 0) for d_in, d_out in dims.values())
        shard_tokens = max(1, SHARD_BYTES // (per_token * store.itemsize))
    settings = {
        "max_length": int(max_length),
        "batch_size": int(batch_size),
        "shard_tokens": int(shard_tokens),
        "add_special_tokens": True,
        "tokenizer": {"class": type(tokenizer).__name__, "vocab_size": len(tokenizer)},
    }
    if (document_offset, document_stride) != (0, 1):
        settings["documents"] = {"offset": int(document_offset), "stride": int(document_stride)}
    fresh = {
        "format": _FORMAT,
        "version": _VERSION,
        "model": _model_identity(net, is_default),
        "sites": {
            name: {"module": path, "dim": dims[name][0], "out_dim": dims[name][1], "dtype": dname}
            for name, path in site_map.items()
        },
        "carriers": carriers,
        "shards": [],
        "tokens": 0,
        "documents": 0,
        "corpus_sha256": hashlib.sha256().hexdigest(),
        "complete": False,
        "stopped": None,
        "max_tokens": max_tokens,
        "collect": settings,
        "corpus": describe_corpus(texts),
    }
    if outputs:
        fresh["outputs"] = {
            name: {"tensor": f"{name}.output", "dim": dims[name][1], "dtype": dname}
            for name in site_map
        }

    if statistics:
        return _collect_statistics(
            net,
            tokenizer,
            texts,
            fresh,
            modules,
            site_map,
            store,
            skip_positions=skip_positions,
            folds=folds,
            second_moments=second_moments,
            max_tokens=max_tokens,
            max_length=max_length,
            batch_size=batch_size,
            progress=progress,
        )
    assert out is not None
    out = Path(out)
    with _locked(out):
        manifest = _prepare_out(out, fresh, max_tokens)
        if manifest.get("complete"):
            return Dump(out, manifest)
        recorder = _Recorder(net, modules, site_map, outputs=outputs, store=store)
        total = int(max_tokens or 0)
        callback = progress if callable(progress) else None
        bar = iter_progress(progress, max_tokens, "collect", unit="tok")
        bar.update(manifest["tokens"])
        writer = _ShardWriter(out)
        try:
            _run(
                out,
                net,
                tokenizer,
                read_texts(texts),
                manifest,
                recorder,
                writer,
                max_tokens=max_tokens,
                max_length=max_length,
                batch_size=batch_size,
                shard_tokens=shard_tokens,
                on_batch=lambda done: (
                    bar.update(done - bar.n),
                    callback and callback(done, total),
                ),
            )
        finally:
            recorder.remove()
            bar.close()
            # Shards already handed over are finished (and the manifest updated) even when
            # the loop was interrupted; the half-filled buffer is redone on resume.
            writer.close()
        writer.raise_error()
        return Dump(out, _read_manifest(out))


def _collect_statistics(
    net: nn.Module,
    tokenizer: Any,
    texts: TextsArg,
    manifest: dict[str, Any],
    modules: dict[str, nn.Module],
    site_map: dict[str, str],
    store: torch.dtype,
    *,
    skip_positions: int,
    folds: int,
    second_moments: bool,
    max_tokens: int | None,
    max_length: int,
    batch_size: int,
    progress: ProgressArg,
) -> Any:
    """``collect(..., statistics=True)``: the same forward passes, statistics instead of shards."""
    from .online import OnlineStats
    from .report import Report, SiteReport

    acc = {
        name: OnlineStats(
            name,
            info["dim"],
            info["dtype"],
            folds=folds,
            skip_positions=skip_positions,
            second_moments=second_moments,
        )
        for name, info in manifest["sites"].items()
    }

    def consume(batch: Batch) -> None:
        for name, rows in batch.device_rows.items():
            acc[name].add(rows[: batch.tokens], batch.position, batch.document)
        batch.device_rows.clear()

    recorder = _Recorder(net, modules, site_map, outputs=False, store=store, keep_device=True)
    callback = progress if callable(progress) else None
    bar = iter_progress(progress, max_tokens, "collect", unit="tok")
    try:
        _run(
            None,
            net,
            tokenizer,
            read_texts(texts),
            manifest,
            recorder,
            None,
            max_tokens=max_tokens,
            max_length=max_length,
            batch_size=batch_size,
            shard_tokens=1 << 62,
            on_batch=lambda done: (
                bar.update(done - bar.n),
                callback and callback(done, int(max_tokens or 0)),
            ),
            consume=consume,
        )
    finally:
        recorder.remove()
        bar.close()
    return Report(
        [SiteReport(a.finish()) for a in acc.values()],
        skip_positions=skip_positions,
        source=f"collect(statistics=True) of {manifest['model']['name'] or 'a model'}",
        modules=dict(site_map),
        carriers=manifest.get("carriers"),
        task_type=manifest["model"].get("task_type"),
    )


def _run(
    out: Path | None,
    model: nn.Module,
    tokenizer: Any,
    docs: Iterator[str],
    manifest: dict[str, Any],
    recorder: _Recorder,
    writer: _ShardWriter | None,
    *,
    max_tokens: int | None,
    max_length: int,
    batch_size: int,
    shard_tokens: int,
    on_batch: Any,
    consume: Any = None,
) -> None:
    """The collection loop; ``writer=None`` writes nothing and hands each batch to ``consume``."""
    done_docs = int(manifest["documents"])
    hasher = _skip_documents(docs, done_docs, manifest["corpus_sha256"], out)
    tokens = int(manifest["tokens"])
    device = input_device(model)
    pad_id = tokenizer.pad_token_id
    pending: list[Batch] = []
    pending_tokens = 0
    doc_index = done_docs
    stopped = "corpus_end"

    def submit(final: bool) -> None:
        nonlocal pending, pending_tokens
        if pending:
            shard = {
                "file": _SHARD.format(len(manifest["shards"])),
                "tokens": pending_tokens,
                "documents": doc_index,
                "corpus_sha256": hasher.hexdigest(),
            }
            manifest["shards"].append(shard)
        manifest["tokens"] = tokens
        manifest["documents"] = doc_index
        manifest["corpus_sha256"] = hasher.hexdigest()
        if final:
            manifest["complete"] = True
            manifest["stopped"] = stopped
        if writer is None:
            pending, pending_tokens = [], 0
            return
        writer.submit(
            manifest["shards"][-1]["file"] if pending else None,
            pending,
            json.loads(json.dumps(manifest)),
        )
        pending, pending_tokens = [], 0

    while True:
        texts = _take(docs, batch_size)
        if not texts:
            break
        for text in texts:
            hasher.update(_doc_bytes(text))
        first_doc = doc_index
        doc_index += len(texts)
        ids = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length)[
            "input_ids"
        ]
        ids_of = manifest["collect"].get("documents", {"offset": 0, "stride": 1})
        rows = [
            (ids_of["offset"] + ids_of["stride"] * (first_doc + i), seq)
            for i, seq in enumerate(ids)
            if len(seq) > 0
        ]
        if rows:
            batch = make_batch(rows, pad_id)
            recorder.run(model, batch, device)
            if max_tokens is not None and tokens + batch.tokens >= max_tokens:
                batch.cut(max_tokens - tokens)
                stopped = "max_tokens"
            tokens += batch.tokens
            if consume is not None:
                consume(batch)
            if writer is not None:
                pending.append(batch)
                pending_tokens += batch.tokens
        if writer is not None:
            writer.raise_error()
        if stopped == "max_tokens":
            break
        if pending_tokens >= shard_tokens:
            submit(final=False)
        on_batch(tokens)
    submit(final=True)
    on_batch(tokens)


def _take(docs: Iterator[str], n: int) -> list[str]:
    out = []
    for text in docs:
        out.append(text)
        if len(out) == n:
            break
    return out


def _doc_bytes(text: str) -> bytes:
    data = text.encode("utf-8")
    return len(data).to_bytes(8, "little") + data


def _skip_documents(docs: Iterator[str], n: int, digest: str, out: Path) -> Any:
    """Skip the ``n`` documents the dump already covers, checking they are the same ones."""
    hasher = hashlib.sha256()
    for i in range(n):
        text = next(docs, None)
        if text is None:
            raise DumpError(
                f"the dump at {out} covers {n} documents but the corpus "
                f"has only {i}: it was collected from another corpus"
            )
        hasher.update(_doc_bytes(text))
    if hasher.hexdigest() != digest:
        raise DumpError(
            f"the first {n} documents of the corpus differ from those the dump at "
            f"{out} was collected from; use a new output directory"
        )
    return hasher


class _StopForward(Exception):
    """Raised from a hook once every site of the batch has been recorded."""


class _Recorder:
    """Forward (pre-)hooks that keep the real-token rows of each site module's input/output."""

    def __init__(
        self,
        model: nn.Module,
        modules: dict[str, nn.Module],
        site_map: dict[str, str],
        *,
        outputs: bool,
        store: torch.dtype,
        keep_device: bool = False,
    ):
        from .models import unwrap_model

        self.store = store
        # Online statistics read the rows on the device, before (instead of) the host copy.
        self.keep_device = keep_device
        self.batch: Batch | None = None
        self.index: dict[torch.device, torch.Tensor] = {}
        self.calls: dict[str, int] = {}
        # One hook per module even when several site names share it.
        by_module: dict[int, list[str]] = {}
        for name, module in modules.items():
            by_module.setdefault(id(module), []).append(name)
        self.expected = len(by_module) * (2 if outputs else 1)
        self.seen = 0
        self.paths = site_map
        self.first = True
        # Stopping a forward pass with an exception would leave accelerate's offloaded
        # weights on the device; such models run to the end.
        self.can_stop = STOP_EARLY and not any(
            hasattr(m, "_hf_hook") for m in unwrap_model(model).modules()
        )
        self.handles = []
        for names in by_module.values():
            module = modules[names[0]]
            self.handles.append(
                module.register_forward_pre_hook(self._pre_hook(names), with_kwargs=True)
            )
            if outputs:
                self.handles.append(module.register_forward_hook(self._post_hook(names)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def run(self, model: nn.Module, batch: Batch, device: torch.device) -> None:
        import torch

        self.batch = batch
        self.index = {}
        self.calls = {}
        self.seen = 0
        kwargs: dict[str, Any] = {
            "input_ids": batch.input_ids.to(device, non_blocking=True),
            "attention_mask": batch.attention_mask.to(device, non_blocking=True),
        }
        if getattr(getattr(model, "config", None), "use_cache", None) is not None:
            kwargs["use_cache"] = False
        try:
            with torch.inference_mode():
                model(**kwargs)
        except _StopForward:
            pass
        finally:
            self.batch = None
        if self.seen != self.expected:
            missing = [n for n in self.paths if n not in self.calls]
            raise SiteError(
                f"sites {missing} did not run in the forward pass of {type(model).__name__}"
            )
        self.first = False
        if device.type == "cuda":
            batch.event = torch.cuda.Event()
            batch.event.record()

    def _keep(self, names: list[str], x: Any, suffix: str) -> None:
        import torch

        batch = self.batch
        if batch is None:  # the module ran outside collect's forward pass
            return
        key = names[0] + suffix
        self.calls[key] = self.calls.get(key, 0) + 1
        if self.calls[key] > 1:
            raise SiteError(
                f"site {names[0]!r} ({self.paths[names[0]]}) runs more than once per forward "
                "pass (shared weights?), so its input per token is ambiguous"
            )
        if not isinstance(x, torch.Tensor) or tuple(x.shape[:-1]) != tuple(batch.input_ids.shape):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise SiteError(
                f"site {names[0]!r} ({self.paths[names[0]]}) sees {shape}, not "
                f"[batch, seq, dim] = {tuple(batch.input_ids.shape)} + [dim]"
            )
        index = self.index.get(x.device)
        if index is None:
            index = self.index[x.device] = batch.index.to(x.device, non_blocking=True)
        rows = x.reshape(-1, x.shape[-1]).index_select(0, index).to(self.store)
        if self.keep_device:
            for name in names:
                batch.device_rows[name + suffix] = rows
            rows = rows[:0]  # nothing goes to the host
        elif rows.device.type == "cuda":
            host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
            host.copy_(rows, non_blocking=True)
            rows = host
        elif rows.device.type != "cpu":
            rows = rows.cpu()
        for name in names:
            batch.tensors[name + suffix] = rows
        self.seen += 1
        if self.seen == self.expected and self.can_stop and not self.first:
            raise _StopForward

    def _pre_hook(self, names: list[str]) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()), None)
            self._keep(names, x, "")

        return hook

    def _post_hook(self, names: list[str]) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self._keep(names, output, ".output")

        return hook


class _ShardWriter:
    """A thread that writes shards (temp name, fsync, rename) and then the manifest."""

    def __init__(self, out: Path):
        self.out = out
        self.jobs: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name="rank1fast-writer", daemon=True)
        self.thread.start()

    def submit(self, file: str | None, batches: list[Batch], manifest: dict[str, Any]) -> None:
        self.raise_error()
        self.jobs.put((file, batches, manifest))

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()

    def raise_error(self) -> None:
        if self.error is not None:
            e, self.error = self.error, None
            # safetensors reports I/O failures (a full disk) as its own SafetensorError.
            if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":
                raise Rank1IOError(f"writing the dump {self.out} failed: {e}") from e
            raise e

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if self.error is not None:
                continue  # drain after a failure; the main thread raises it
            try:
                self._write(*job)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self.error = e

    def _write(self, file: str | None, batches: list[Batch], manifest: dict[str, Any]) -> None:
        import torch
        from safetensors.torch import save_file

        if file is not None:
            for b in batches:
                if b.event is not None:
                    b.event.synchronize()
            tensors = {
                name: torch.cat([b.tensors[name] for b in batches]) for name in batches[0].tensors
            }
            tensors["position"] = torch.cat([b.position for b in batches])
            tensors["document"] = torch.cat([b.document for b in batches])
            tensors["token"] = torch.cat([b.token for b in batches])
            path = self.out / file
            tmp = path.with_name(path.name + ".tmp")
            try:
                save_file(tensors, tmp, metadata={"format": "pt"})
                # safetensors creates files private (0600); give shards the manifest's mode.
                os.chmod(tmp, (self.out / MANIFEST).stat().st_mode & 0o777)
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        write_json_atomic(self.out / MANIFEST, manifest)


# --------------------------------------------------------------------------- resume


def _carriers(model: nn.Module, site_map: dict[str, str]) -> dict[str, dict[str, Any]]:
    """How each resid_* site's module joins the residual stream, for the adapter writer
    (:func:`rank1fast.models.site_carrier`): ``{"kind", "gain"}`` plus, for a post-norm
    block, ``"norm"`` and ``"reason"``."""
    from .models import site_carrier

    out = {}
    for name in site_map:
        if not name.startswith(("resid_mid.", "resid_post.")):
            continue
        c = site_carrier(model, name)
        entry: dict[str, Any] = {"kind": c.kind, "hook": c.hook, "gain": c.gain}
        if c.norm is not None:
            entry["norm"] = c.norm
        if c.reason is not None:
            entry["reason"] = c.reason
        out[name] = entry
    return out


def _model_identity(model: nn.Module, default: bool) -> dict:
    import torch

    from .models import DEFAULT_GGUF, num_layers, unwrap_model

    base = unwrap_model(model)
    config = getattr(base, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        layers: int | None = num_layers(base)
    except SiteError:
        layers = None
    # Names, shapes and the first values of every parameter: cheap, and it tells checkpoints
    # (and adapters) apart.
    digest = hashlib.sha256()
    heads = []
    for name, p in base.named_parameters():
        digest.update(f"{name}{tuple(p.shape)}".encode())
        if p.device.type != "meta" and p.is_floating_point():
            heads.append(p.detach().reshape(-1)[:64].float())
    if heads:
        digest.update(torch.cat([h.cpu() for h in heads]).numpy().tobytes())
    dtype = next((p.dtype for p in base.parameters() if p.is_floating_point()), None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    return {
        "name": f"default ({DEFAULT_GGUF})" if default else getattr(base, "name_or_path", ""),
        "type": getattr(config, "model_type", None),
        # PEFT's task type for an adapter on this model: a model without an LM head (an
        # encoder loaded as AutoModel) is wrapped as feature extraction.
        "task_type": "CAUSAL_LM" if head is not None else "FEATURE_EXTRACTION",
        "architecture": type(base).__name__,
        "layers": layers,
        "hidden_size": getattr(text, "hidden_size", None),
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "fingerprint": digest.hexdigest(),
    }


def _prepare_out(out: Path, fresh: dict[str, Any], max_tokens: int | None) -> dict[str, Any]:
    """A new dump's manifest, or the existing one to resume (after checking it matches).

    ``out`` exists and is locked (see :func:`_locked`).
    """
    if not (out / MANIFEST).exists():
        try:
            write_json_atomic(out / MANIFEST, fresh)
        except OSError as e:
            raise Rank1IOError(f"cannot create the dump {out}: {e}") from e
        return dict(fresh)

    old = _read_manifest(out)
    where = f"the dump at {out}"
    fp_keys = ("type", "architecture", "layers", "hidden_size", "dtype", "fingerprint")
    if any(old.get("model", {}).get(k) != fresh["model"].get(k) for k in fp_keys):
        raise DumpError(
            f"{where} was collected from another model ({_short(old.get('model'))}; now "
            f"{_short(fresh['model'])}); refusing to append: use a new output directory"
        )
    for key in ("sites", "outputs", "collect"):
        if old.get(key) != fresh.get(key):
            raise DumpError(
                f"{where} was collected with other {key} ({_diff(old.get(key), fresh.get(key))}); "
                "refusing to append: use a new output directory"
            )
    tokens = int(old["tokens"])
    if max_tokens is not None and tokens > max_tokens:
        raise DumpError(
            f"{where} already holds {tokens} tokens, more than max_tokens={max_tokens}; "
            "use a new output directory"
        )
    # Leftovers of an interrupted write: temp files (ours, and the ``.tmpXXXXXX`` that
    # safetensors writes before renaming) and shards the manifest does not list.
    listed = {s["file"] for s in old["shards"]}
    for p in out.iterdir():
        if (
            p.name.endswith(".tmp")
            or (p.name.startswith(".tmp") and p.is_file())
            or (
                p.name.startswith("shard-")
                and p.name.endswith(".safetensors")
                and p.name not in listed
            )
        ):
            p.unlink()
    if old.get("complete"):
        if old.get("stopped") != "max_tokens" or old.get("max_tokens") == max_tokens:
            return old
        # Asked for more tokens than a run that stopped at max_tokens: its last shard ends
        # inside a batch, so it is dropped and redone.
        last = old["shards"].pop()
        prev = old["shards"][-1] if old["shards"] else None
        old["tokens"] = tokens - int(last["tokens"])
        old["documents"] = prev["documents"] if prev else 0
        old["corpus_sha256"] = prev["corpus_sha256"] if prev else fresh["corpus_sha256"]
        old["complete"], old["stopped"] = False, None
        write_json_atomic(out / MANIFEST, old)
        (out / last["file"]).unlink(missing_ok=True)
    old["max_tokens"] = max_tokens
    return old


def _diff(old: Any, new: Any) -> str:
    """The entries of two manifest sections that differ, as ``key: old -> new``."""
    if isinstance(old, dict) and isinstance(new, dict):
        if list(old) != list(new):
            return f"{list(old)} -> {list(new)}"
        keys = [k for k in old if old[k] != new[k]]
        return "; ".join(f"{k}: {json.dumps(old[k])} -> {json.dumps(new[k])}" for k in keys)
    return f"{json.dumps(old)} -> {json.dumps(new)}"


def _short(model: Any) -> str:
    if not isinstance(model, dict):
        return "unknown"
    fp = str(model.get("fingerprint", ""))[:12]
    return f"{model.get('name')}, {model.get('architecture')}, {model.get('dtype')}, weights {fp}"
