"""``rank1fast.convert``: a steering vector in, a verified LoRA adapter out.

The adapter of a site adds ``scale·v·(b·x)`` where ``b`` is the site's constant direction,
fitted so that ``b·x ≈ 1`` on the module inputs ``x``. How faithful it is depends on which
inputs ``b`` was fitted on, so convert fits each site on the inputs it will see when served:

1. **The served distribution.** For a model with a chat template the fit texts are chat
   conversations rendered with that template (:func:`rank1fast.corpus.served_corpus`: the
   built-in conversations, answered by the default model, with a prose document after every
   fourth), else the default prose corpus; or the user's ``texts``.
2. **Under the steering.** The statistics are collected with the hook steering of every site
   applied (:func:`rank1fast.steering`), so a site's inputs already carry the steering of the
   sites upstream of it, as they will when the adapter is served. Online statistics
   (:func:`rank1fast.collect` with ``statistics=True``): no dump is written.

3. **Downstream corrections.** The per-token error ``(b·x_t − 1)·v`` the adapter leaves is
   cancelled on the residual writers after each site (the next layer's ``o_proj`` and
   ``down_proj``) by rank-4 LoRA terms fitted so that the adapter-steered residual stream
   follows the hook-steered one (:mod:`rank1fast.corrections`). The adapter's rank becomes 5.

Then the adapter is written (:func:`rank1fast.write_adapter`, least squares with the sink
pinned), verified against hook steering on held-out texts (:func:`rank1fast.verify`: all
sites steered together, the workload the adapter was fitted for; the one-hot adapter side by
side; the generation check on chat prompts), the fidelity
table is stored in the adapter's ``rank1fast.json`` (``"convert"``) and printed. The
directory appears at ``out`` only when all of this has succeeded.

Measured on the default model (``python benches/bench_fidelity.py``; BENCHMARKS.md has the
table and the command).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ._args import check_int, nonnegative_int, positive_int
from .errors import AdapterError, InvalidArgumentError, ResidualSiteError

__all__ = ["convert", "fit_report", "add_cli"]

#: Held-out texts verify uses by default (chat conversations and prose interleaved).
DEFAULT_EVAL_TEXTS = 24
#: Prompts of the generation check, and tokens generated per prompt.
DEFAULT_GENERATE_PROMPTS, DEFAULT_GENERATE_TOKENS = 16, 24


def fit_report(
    model: Any,
    vectors: Mapping[str, Any],
    texts: Sequence[str],
    *,
    scale: float | Mapping[str, float] = 1.0,
    under_steering: bool = True,
    tokens: int | None = 40_000,
    max_length: int = 256,
    batch_size: int = 8,
    progress: Any = None,
) -> Any:
    """The analysis convert fits adapters from: statistics of every site's module input over
    ``texts``, collected with the steering applied (``under_steering``) or without.

    Args:
        model: a loaded ``(model, tokenizer)``.
        vectors: ``{site: vector}``.
        texts: the fit texts (already rendered).
        scale: the steering scale (one, or per site).
        under_steering: collect with :func:`rank1fast.steering` of all sites active.
        tokens: stop after this many tokens (None: all texts).
        max_length: tokens per text.
        batch_size: texts per forward pass.
        progress: as for :func:`rank1fast.collect`.

    Returns:
        A :class:`~rank1fast.Report` (online statistics, second moments included).
    """
    import contextlib

    from .collect import collect
    from .steering import steering

    ctx = steering(model, vectors, scale) if under_steering else contextlib.nullcontext()
    with ctx:
        return collect(
            model,
            list(texts),
            list(vectors),
            statistics=True,
            max_tokens=tokens,
            max_length=max_length,
            batch_size=batch_size,
            progress=progress,
        )


def convert(
    model: Any,
    vectors: Mapping[str, Any] | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    texts: Any = None,
    eval_texts: Any = None,
    scale: float = 1.0,
    tokens: int | None = 40_000,
    target: str = "peft",
    rank: int | None = None,
    dtype: str = "float32",
    under_steering: bool = True,
    corrections: int = 2,
    correction_rank: int = 4,
    correction_tokens: int | None = 40_000,
    verify: bool = True,
    generate: int = DEFAULT_GENERATE_TOKENS,
    max_length: int = 256,
    batch_size: int = 8,
    device: str | None = "auto",
    overwrite: bool = False,
    progress: Any = None,
    log: Callable[[str], Any] | None = print,
) -> Path:
    """Turn steering vectors into a LoRA adapter fitted for the served workload, verified.

    Args:
        model: the base model: None for the built-in default, a Hugging Face id, a local
            checkpoint, a ``.gguf`` file, or a loaded ``(model, tokenizer)``.
        vectors: ``{site: vector}`` (each in the site module's output space: the residual
            stream for ``resid_mid.L``/``resid_post.L``), or any file
            :func:`rank1fast.vectors.load` reads (control-vector GGUF, .safetensors, .npy,
            .pt). Several sites make one adapter, fitted jointly (each under the steering of
            the others).
        out: the adapter directory to create.
        texts: the fit corpus: None for :func:`rank1fast.corpus.served_corpus` (chat
            conversations in the model's template plus prose, or prose for a model without
            a chat template), or anything :func:`rank1fast.corpus.read_texts` takes (chat
            JSONL with ``"messages"`` is rendered with the model's template).
        eval_texts: the held-out texts verify runs on: None for the ``"eval"`` split of the
            served corpus when ``texts`` is None, else every 8th of ``texts`` (left out of
            the fit).
        scale: the hook steering adds ``scale·v``; ``lora_B lora_A = scale·v bᵀ`` (the
            factors' norms balanced: see :func:`rank1fast.write_adapter`).
        tokens: fit tokens (the online statistics stop there); None: every fit text.
        target: the server profile (:data:`rank1fast.serving.PROFILES`: ``peft``, ``vllm``,
            ``fireworks``, ``together``, ``cloudflare``); the rank is padded for it.
        rank: the LoRA rank (None: 1, or the target's smallest).
        dtype: the adapter's tensor dtype (``float32``, ``bfloat16``, ``float16``).
        under_steering: fit on inputs collected with the steering applied (True) or on
            unsteered inputs (False: what ``write_adapter`` on a plain dump gives).
        corrections: residual writers corrected after each site's module
            (:mod:`rank1fast.corrections`: LoRA terms on the next ``o_proj``/``down_proj``
            modules, fitted so that the adapter-steered residual stream follows the
            hook-steered one); 0: none. Only for ``resid_*`` sites on models whose every
            writer is an exact carrier (else skipped, with a message).
        correction_rank: rank-1 terms per corrected module (the adapter's rank becomes
            ``correction_rank``, or ``1 + correction_rank`` where a correction lands on a
            site's own module; padded for ``target``).
        correction_tokens: fit tokens per corrected module, at least (whole batches of texts
            are taken: up to ``batch_size x max_length`` more; one hook-steered pass over them,
            then the adapter's arithmetic layer by layer: :mod:`rank1fast.corrections`).
        verify: measure the fidelity and store it (False: write only).
        generate: tokens per prompt of verify's generation check (0: none).
        max_length: tokens per text, for fitting and verifying.
        batch_size: texts per forward pass.
        device: where a model loaded here runs (``"auto"``: CUDA, then MPS, then CPU).
        overwrite: replace an existing adapter at ``out``.
        progress: progress bars (None: on a terminal; False: none).
        log: where the steps and the fidelity table are printed (None: nowhere).

    Returns:
        The adapter directory. Its ``rank1fast.json`` holds ``"convert"``: the fit (corpus,
        tokens, under_steering, seconds) and, with ``verify``, the fidelity
        (:meth:`rank1fast.Fidelity.to_json`).

    Raises:
        AdapterError: ``out`` exists (without ``overwrite``; or it is not an adapter
            directory), a path component of ``out`` is a file, or the adapter cannot be
            written (see :func:`rank1fast.write_adapter`). Checked before the model loads.
        InvalidArgumentError: no vectors or not a dict/file, an all-zero vector, a zero,
            non-finite or non-numeric ``scale``, a bad ``rank``/``dtype``/``tokens``/
            ``generate``/``corrections``/``correction_rank``/``correction_tokens``, an
            unknown ``target`` (all before the model loads); a vector of the wrong size, no
            held-out texts, or ``verify`` on a model without an LM head (an encoder), before
            the fit.
        SiteError: a site that does not resolve on the model (before the fit).
        ResidualSiteError: a ``resid_*`` site no linear module carries exactly on this model
            (post-norm blocks: Gemma 2/3, OLMo-2; MoE ``resid_post``), before the fit.

    Example:
        >>> rank1fast.convert(None, "happy.gguf", "happy-lora", scale=4.0)      # doctest: +SKIP
        PosixPath('happy-lora')
    """
    from .adapter import (
        DTYPES,
        check_destination,
        move_adapter,
        read_adapter_info,
        update_adapter_info,
        write_adapter,
    )
    from .corpus import chat_prompts, has_chat_template, read_texts, served_corpus
    from .models import (
        default_model_path,
        get_module,
        load_model,
        module_dims,
        resolve_sites,
        site_carrier,
        unwrap_model,
    )
    from .serving import get_profile
    from .steering import steered_vectors
    from .verify import require_lm_head
    from .verify import verify as run_verify

    say = log or (lambda _msg: None)
    out = Path(out)
    # Everything that can be checked without the model is checked before it loads.
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int)):
        raise InvalidArgumentError(f"tokens must be an integer or None, got {tokens!r}")
    if tokens is not None and tokens < 1:
        raise InvalidArgumentError(f"tokens must be at least 1, got {tokens}")
    check_int("generate", generate, 0)
    check_int("corrections", corrections, 0)
    check_int("correction_rank", correction_rank, 1)
    check_int("correction_tokens", correction_tokens, 1, optional=True)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InvalidArgumentError(f"scale must be a finite number, got {scale!r}")
    if scale == 0:
        raise InvalidArgumentError(
            "scale 0 steers nothing: there is no steering to fit or verify (a negative scale "
            "steers the other way)"
        )
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise InvalidArgumentError(f"rank must be a positive integer or None, got {rank!r}")
    if dtype not in DTYPES:
        raise InvalidArgumentError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    get_profile(target)  # an unknown target fails now, not after the fit
    check_destination(out, overwrite)
    for parent in out.parents:  # the first existing ancestor must be a writable directory
        if parent.exists():
            if not parent.is_dir():
                raise AdapterError(f"{out}: {parent} is not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):  # also a read-only file system
                raise AdapterError(f"{out}: cannot write in {parent}")
            break
    vecs = steered_vectors(vectors)
    for site, v in vecs.items():
        if not v.any():
            raise InvalidArgumentError(f"site {site}: the vector is all zeros; it steers nothing")
    t_start = time.perf_counter()

    net, tok = load_model(model, device=device, quiet=progress is False)
    if verify:
        require_lm_head(net)  # an encoder has no next-token distribution: refused before the fit
    name = getattr(unwrap_model(net), "name_or_path", "") or None
    is_default = model is None or model == "default"
    with contextlib.suppress(Exception):  # a loaded default model names its package folder
        is_default = is_default or (name is not None and Path(name) == default_model_path())
    # Sites by their canonical names (resid_post.-1 -> resid_post.29), sizes checked.
    canonical: dict[str, Any] = {}
    for site, v in vecs.items():
        resolved = resolve_sites(net, [site])
        if len(resolved) != 1:
            raise InvalidArgumentError(f"site {site!r} names {len(resolved)} modules; give one")
        key, path = next(iter(resolved.items()))
        d_out = module_dims(get_module(net, path))[1]
        if v.size != d_out:
            raise InvalidArgumentError(
                f"site {site} ({path}): the vector has {v.size} values, the module outputs {d_out}"
            )
        if key in canonical:
            raise InvalidArgumentError(f"sites {site!r} and {key!r} are the same module")
        carrier = site_carrier(net, key)
        if carrier.kind != "exact":  # refused before the fit, not after it (write_adapter's rule)
            raise ResidualSiteError.refusing(key, carrier.reason)
        canonical[key] = v
    vecs = canonical
    if texts is None:
        fit_texts = served_corpus(tok, "fit")
        held = served_corpus(tok, "eval")[:DEFAULT_EVAL_TEXTS]
        corpus = "served (built-in chat in the model's template + prose)"
    else:
        all_texts = [t for t in read_texts(texts, tok) if t.strip()]
        if eval_texts is None:
            held = all_texts[7::8]
            fit_texts = [t for i, t in enumerate(all_texts) if i % 8 != 7]
        else:
            fit_texts = all_texts
            held = []
        corpus = os.fspath(texts) if isinstance(texts, (str, os.PathLike)) else "texts"
    if eval_texts is not None:
        held = [t for t in read_texts(eval_texts, tok) if t.strip()]
    if not fit_texts:
        raise InvalidArgumentError(f"no fit texts in {corpus}")
    if verify and not held:
        raise InvalidArgumentError(
            "eval_texts holds no texts"
            if eval_texts is not None
            else "no held-out texts to verify on (pass eval_texts)"
        )

    say(
        f"convert: fitting {', '.join(vecs)} on "
        + (f"{tokens:,} tokens" if tokens else "all texts")
        + f" of {corpus}"
        + (", under the steering" if under_steering else "")
    )
    t0 = time.perf_counter()
    report = fit_report(
        (net, tok),
        vecs,
        fit_texts,
        scale=scale,
        under_steering=under_steering,
        tokens=tokens,
        max_length=max_length,
        batch_size=batch_size,
        progress=progress,
    )
    fit_seconds = time.perf_counter() - t0
    created = [p for p in reversed(out.parents) if not p.exists()]
    work: Path | None = None
    done = False
    try:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=f".{out.name}.convert-", dir=out.parent))
        except OSError as e:
            raise AdapterError(f"{out}: cannot write the adapter: {e.strerror or e}") from e
        adapter = write_adapter(
            report,
            vecs,
            work / "adapter",
            scale=scale,
            rank=rank if rank is not None else 1,
            dtype=dtype,
            base_model=_base_model_name(is_default, name),
            target=target,
        )
        if corrections:
            adapter, record_corr = _corrected(
                (net, tok),
                report,
                vecs,
                adapter,
                fit_texts,
                scale=scale,
                after=corrections,
                rank=correction_rank,
                tokens=correction_tokens,
                write=dict(
                    rank=rank if rank is not None else 1,
                    dtype=dtype,
                    base_model=_base_model_name(is_default, name),
                    target=target,
                ),
                max_length=max_length,
                batch_size=batch_size,
                progress=progress,
                say=say,
            )
        else:
            record_corr = None
        record: dict[str, Any] = {
            "fit": {
                "corpus": corpus,
                "texts": len(fit_texts),
                "tokens": min(report[s].count + report[s].skipped for s in vecs),
                "under_steering": under_steering,
                "max_length": max_length,
                "seconds": round(fit_seconds, 1),
            }
        }
        if record_corr is not None:
            record["corrections"] = record_corr
        if verify:
            say(f"convert: verifying on {len(held)} held-out texts")
            fid = run_verify(
                (net, tok),
                adapter,
                vecs,
                held,
                onehot=report,
                max_length=max_length,
                batch_size=batch_size,
                each_site=len(vecs) == 1,
                generate=generate,
                prompts=chat_prompts(tok, "eval", DEFAULT_GENERATE_PROMPTS)
                if generate and has_chat_template(tok)
                else None,
                progress=progress,
            )
            # The adapters verify read lie in the work folder (and a temporary one-hot):
            # record where the verified adapter ends up instead.
            fid.adapters = {
                label: os.fspath(out) if Path(path) == Path(adapter) else "(not kept)"
                for label, path in fid.adapters.items()
            }
            record["fidelity"] = fid.to_json()
            say(str(fid))
        update_adapter_info(adapter, {"convert": record})
        assert read_adapter_info(adapter) is not None
        move_adapter(adapter, out, overwrite)
        done = True
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        if not done:  # leave no folders behind that this call made
            for p in reversed(created):
                with contextlib.suppress(OSError):
                    p.rmdir()
    say(f"convert: wrote {out} in {time.perf_counter() - t_start:.0f} s")
    return out


def _corrected(
    model: Any,
    report: Any,
    vecs: Mapping[str, Any],
    adapter: Path,
    texts: Sequence[str],
    *,
    after: int,
    rank: int,
    tokens: int | None,
    write: Mapping[str, Any],
    max_length: int,
    batch_size: int,
    progress: Any,
    say: Callable[[str], Any],
    scale: float,
) -> tuple[Path, dict[str, Any] | None]:
    """The corrected adapter next to ``adapter`` and convert's record of the fit;
    ``(adapter, None)`` when the sites or the model take no corrections."""
    from .corrections import correctable, write_corrected

    why = correctable(model[0], vecs)
    if not why and len(texts) < 5:
        why = f"{len(texts)} fit texts; the cross-validated fit needs at least 5"
    if why:
        say(f"convert: no downstream corrections ({why})")
        return adapter, None
    say(f"convert: fitting downstream corrections ({after} writers after each site, rank {rank})")
    t0 = time.perf_counter()
    out = adapter.with_name(adapter.name + "-corrected")
    fitted = write_corrected(
        model,
        report,
        vecs,
        adapter,
        out,
        texts,
        scale=scale,
        after=after,
        correction_rank=rank,
        tokens=tokens,
        max_length=max_length,
        batch_size=batch_size,
        progress=progress,
        **write,
    )
    record = {
        "after": after,
        "rank": rank,
        "tokens": tokens,
        "modules": {c.module: c.to_json() for c in fitted},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return (out if fitted else adapter), record


def _base_model_name(is_default: bool, name: str | None) -> str | None:
    from .adapter import DEFAULT_BASE_MODEL

    return DEFAULT_BASE_MODEL if is_default else name


# --------------------------------------------------------------------------- CLI


def add_cli(sub: Any) -> None:
    """Register ``rank1fast convert``."""
    p = sub.add_parser(
        "convert",
        help="steering vectors -> a LoRA adapter fitted on the served workload, verified",
        description="Fit each site's constant direction on the inputs it sees when served (chat "
        "in the model's template, with the steering applied), fit LoRA terms on the next "
        "residual writers that cancel the adapter's per-token error (downstream corrections), "
        "write the adapter, verify it against hook steering on held-out texts and store the "
        "fidelity in rank1fast.json.",
    )
    p.add_argument("vectors", help="vector file (control-vector .gguf, .safetensors, .npy, .pt)")
    p.add_argument("-o", "--out", required=True, help="the adapter directory to create")
    p.add_argument(
        "--model", default=None, help="base model (default: built-in SmolLM2-135M-Instruct)"
    )
    p.add_argument(
        "--corpus",
        default=None,
        help="fit corpus (.txt, .jsonl with text or chat messages); default: built-in chat+prose",
    )
    p.add_argument("--eval-texts", default=None, help="held-out corpus to verify on")
    p.add_argument(
        "--site",
        action="append",
        dest="sites",
        metavar="S",
        help="only these sites of the file (comma-separated or repeated; default: all)",
    )
    p.add_argument("--scale", type=float, default=1.0, help="steering scale (default 1)")
    p.add_argument("--tokens", type=int, default=40_000, help="fit tokens (default 40000)")
    p.add_argument("--for", dest="target", default="peft", help="server profile (default peft)")
    p.add_argument(
        "--rank", type=int, default=None, help="LoRA rank (default: 1, or the profile's smallest)"
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--unsteered", action="store_true", help="fit on unsteered inputs")
    p.add_argument(
        "--corrections",
        type=int,
        default=2,
        metavar="N",
        help="residual writers corrected after each site (default 2; 0: none)",
    )
    p.add_argument(
        "--correction-rank",
        type=positive_int,
        default=4,
        help="terms per corrected module (default 4)",
    )
    p.add_argument(
        "--correction-tokens",
        type=positive_int,
        default=40_000,
        help="fit tokens per corrected module, at least (whole batches; default 40000)",
    )
    p.add_argument("--no-verify", action="store_true", help="write without verifying")
    p.add_argument(
        "--generate",
        type=nonnegative_int,
        default=None,
        metavar="N",
        help=f"tokens per prompt of verify's generation check (default "
        f"{DEFAULT_GENERATE_TOKENS}; 0: none)",
    )
    p.add_argument(
        "--max-length",
        type=positive_int,
        default=256,
        help="tokens per text, fitting and verifying (default 256)",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=8, help="texts per forward pass (default 8)"
    )
    p.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (CUDA, MPS, then CPU)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing adapter at -o")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=_run_convert, unwind_on_sigterm=True)  # cli.main: cleanup on SIGTERM


def _run_convert(args: Any) -> int:
    from .adapter import check_destination
    from .vectors import load

    if args.no_verify and args.generate is not None:
        raise InvalidArgumentError(
            "--generate is part of the verification, which --no-verify skips"
        )
    try:
        check_destination(args.out, args.overwrite)
    except AdapterError as e:
        raise AdapterError(str(e).replace("overwrite=True", "--overwrite")) from None
    vecs = load(args.vectors)
    if args.sites:
        args.sites = [s.strip() for arg in args.sites for s in arg.split(",") if s.strip()]
        missing = [s for s in args.sites if s not in vecs]
        if missing:
            raise InvalidArgumentError(
                f"{args.vectors} has no sites {missing}; it has {list(vecs)}"
            )
        vecs = {s: vecs[s] for s in args.sites}
    convert(
        args.model,
        vecs,
        args.out,
        texts=args.corpus,
        eval_texts=args.eval_texts,
        scale=args.scale,
        tokens=args.tokens,
        target=args.target,
        rank=args.rank,
        dtype=args.dtype,
        under_steering=not args.unsteered,
        corrections=args.corrections,
        correction_rank=args.correction_rank,
        correction_tokens=args.correction_tokens,
        verify=not args.no_verify,
        generate=DEFAULT_GENERATE_TOKENS if args.generate is None else args.generate,
        max_length=args.max_length,
        batch_size=args.batch_size,
        device=args.device,
        overwrite=args.overwrite,
        progress=False if args.quiet else None,
        log=None if args.quiet else print,
    )
    return 0
