"""Downstream corrections: LoRA terms that cancel what a steering adapter gets wrong.

A site's adapter adds ``scale·v·(b·x_t)`` where hook steering adds ``scale·v``; the per-token
error ``(b·x_t − 1)·scale·v`` then travels down the residual stream and through every later
layer. A steered residual stream and an adapter-steered one can be compared token by token,
so the difference can be fitted away, layer by layer, by LoRAs on the modules that write
into the residual stream after the site (``o_proj``, ``down_proj``, ... of the following
layers: :func:`residual_writers`).

For each such writer ``w``, in model order, on the fit texts:

1. Run the model with hook steering (:func:`rank1fast.steering`) and with the adapter's
   arithmetic (the LoRA terms written so far, corrections of earlier writers included), both
   stopped right after ``w``. ``D_t`` is the difference of the two residual streams after
   ``w`` at token ``t`` (adapter minus hook), ``x_t`` the input of ``w`` in the adapter run.
2. Least squares with a ridge: ``W = argmin Σ_t |D_t + W x_t|² + λ·tr(XᵀX)/d_in·|W|²``,
   reduced to rank ``r`` (reduced-rank regression: ``W_r = P Pᵀ W`` with ``P`` the top ``r``
   eigenvectors of the fitted values' second moment ``W XᵀX Wᵀ``; Izenman 1975, Reinsel &
   Velu 1998). ``λ`` is picked by k-fold cross-validation over texts; the writer
   keeps the terms only if the cross-validated residual error drops by at least 1 %.
3. The LoRA on ``w`` gains ``r`` rank-1 terms ``(a_k, u_k)``: ``A = Pᵀ W`` (``[r, d_in]``),
   ``U = P / gain`` (``[d_out, r]``; Granite's ``residual_multiplier`` divided out).

The corrected adapter is a LoRA of rank ``r`` (``1 + r`` where a correction lands on a site's
own module; padded for the serving target) on the sites' modules and on the writers after
them; servers apply it as any LoRA. What it measured on the default model: BENCHMARKS.md
("Downstream corrections", ``python benches/bench_fidelity.py``).

Memory: ``folds x (d_in² + d_in·d_model)`` float64 per writer (130 MB at the default model's
``down_proj``; about 10 GB at Llama-3-8B's, so use ``corrections=0`` there without the RAM),
the hook-steered residual sums of every corrected writer (``tokens x d_model`` float32
each) while they fit in 2 GiB, and per batch the adapter run's hidden state where it resumes
(``tokens x d_model``, padding included, in the model's dtype).
Time: one hook-steered forward pass over the correction tokens, stopped after the last
corrected writer; then per writer the adapter's arithmetic through the layers since the previous
writer only (each batch resumes from its hidden state there, the decoder layers called with the
arguments the model's own forward passed them), and a ridge solve (about 1 s at
``d_in = 576``, 4 s at 1,536 on 2 cores).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._args import check_int
from .errors import InvalidArgumentError, SiteError

__all__ = [
    "Correction",
    "residual_writers",
    "correctable",
    "fit_corrections",
    "write_corrected",
    "DEFAULT_AFTER",
    "DEFAULT_RANK",
]

#: Writers corrected after each steered site's own module (its layer's next writer and the
#: one after: for ``resid_post.L``, ``o_proj`` and ``down_proj`` of layer ``L+1``).
DEFAULT_AFTER = 2
#: Rank-1 terms per corrected writer.
DEFAULT_RANK = 4
#: Ridges tried (times ``tr(XᵀX)/d_in``), by cross-validation.
RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
#: Where the cross-validated walk along RIDGES starts (the ridges picked on the default model's
#: writers were 0.1 and 1).
RIDGE_START = 0.1
#: A writer keeps its correction when it lowers the cross-validated error by this fraction.
MIN_GAIN = 0.01


@dataclass
class Correction:
    """The correction terms of one module.

    Attributes:
        module: the module path (``model.layers.6.self_attn.o_proj``).
        a: ``[r, d_in]`` float64, the terms' input directions (``lora_A`` rows).
        u: ``[d_out, r]`` float64, their output vectors in the module's output units
            (``lora_B`` columns).
        ridge: the ridge picked (times ``tr(XᵀX)/d_in``).
        tokens: tokens fitted on.
        rms_before: rms of ``|D_t|`` (residual-stream units) before the correction at this
            writer, over the fit tokens.
        rms_after: cross-validated rms of ``|D_t + gain·U A x_t|``.
    """

    module: str
    a: np.ndarray
    u: np.ndarray
    ridge: float
    tokens: int
    rms_before: float
    rms_after: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def to_json(self) -> dict[str, Any]:
        """The fit's record (no tensors), as stored in the adapter's ``rank1fast.json``."""
        return {
            "rank": self.rank,
            "d_in": int(self.a.shape[1]),
            "d_out": int(self.u.shape[0]),
            "ridge": self.ridge,
            "tokens": self.tokens,
            "rms_before": round(self.rms_before, 6),
            "rms_after": round(self.rms_after, 6),
        }


def residual_writers(model: Any) -> list[tuple[str, float]]:
    """The linear modules whose outputs join the residual stream, in model order, with gains.

    ``[(o_proj.0, g), (down_proj.0, g), (o_proj.1, g), ...]``: the adapter modules of
    ``resid_mid.L`` and ``resid_post.L`` (:func:`rank1fast.models.site_carrier`), for every
    layer.

    Raises:
        SiteError: a layer whose residual writers are not exact carriers (post-norm blocks,
            MoE MLPs, parallel-residual blocks): corrections need every writer's output to join
            the residual stream unchanged.
    """
    from .models import num_layers, site_carrier

    out = []
    for layer in range(num_layers(model)):
        for kind in ("resid_mid", "resid_post"):
            c = site_carrier(model, f"{kind}.{layer}")
            if c.kind != "exact" or c.module is None or c.module != c.hook:
                raise SiteError(
                    f"{kind}.{layer}: {c.module or c.hook} does not write into the residual "
                    "stream unchanged; downstream corrections need every writer to"
                )
            out.append((c.module, float(c.gain)))
    return out


def correctable(model: Any, vectors: Mapping[str, Any]) -> str | None:
    """Why the sites of ``vectors`` on ``model`` take no corrections, or None when they do."""
    if not all(str(s).startswith("resid_") for s in vectors):
        return "they are for resid_mid/resid_post sites only"
    try:
        residual_writers(model)
    except SiteError as e:
        return str(e)
    return None


def write_corrected(
    model: Any,
    report: Any,
    vectors: Mapping[str, Any],
    adapter: str | os.PathLike[str],
    out: str | os.PathLike[str],
    texts: Sequence[str],
    *,
    scale: float | None = None,
    after: int = DEFAULT_AFTER,
    correction_rank: int = DEFAULT_RANK,
    tokens: int | None = 40_000,
    max_length: int = 256,
    batch_size: int = 8,
    progress: Any = None,
    **write_options: Any,
) -> list[Correction]:
    """Fit corrections for an adapter written by :func:`rank1fast.write_adapter` and write
    the corrected adapter at ``out``.

    Args:
        model: a loaded ``(model, tokenizer)``.
        report: the report ``adapter`` was written from.
        vectors: the ``{site: v}`` it was written for (canonical ``resid_*`` names).
        adapter: the adapter directory (read: its LoRA is what the fit starts from).
        out: the corrected adapter's directory (written when a correction was kept).
        texts: the fit texts.
        scale: the scale ``adapter`` was written with (None: read from its
            ``rank1fast.json``); also goes to ``write_adapter``.
        after, tokens, max_length, batch_size, progress: as for :func:`fit_corrections`.
        correction_rank: :func:`fit_corrections`'s ``rank`` (terms per corrected module).
        **write_options: more :func:`rank1fast.write_adapter` options (``rank``, ``dtype``,
            ``target``, ``base_model``, ``overwrite``).

    Returns:
        The corrections kept (none: nothing is written).

    Raises:
        As :func:`fit_corrections`; InvalidArgumentError for a bad ``correction_rank`` or a
        ``scale`` other than the adapter's; AdapterError for an unreadable ``adapter`` or an
        existing ``out`` (without ``overwrite=True``), both before the fit.
    """
    from pathlib import Path

    from ._peft import lora_pairs, peft_scaling, read_peft
    from .adapter import check_destination, read_adapter_info, write_adapter

    check_int("correction_rank", correction_rank, 1)
    adapter = Path(adapter)
    check_destination(Path(out), bool(write_options.get("overwrite", False)))
    config, tensors = read_peft(adapter)
    written = (read_adapter_info(adapter) or {}).get("scale")
    if scale is None:
        if written is None:
            raise InvalidArgumentError(
                f"{adapter}: no rank1fast.json records its scale; pass scale="
            )
        scale = float(written)
    elif written is not None and not math.isclose(float(written), float(scale), rel_tol=1e-9):
        raise InvalidArgumentError(
            f"{adapter} was written with scale {written}, not {scale}: the corrections must "
            "start from the adapter as written"
        )
    lora = {
        m: (a, b * peft_scaling(config, m))
        for m, (a, b) in lora_pairs(tensors, adapter, "written by write_adapter").items()
    }
    fitted = fit_corrections(
        model,
        {s: np.asarray(v, dtype=np.float64) for s, v in vectors.items()},
        scale,
        lora,
        texts,
        after=after,
        rank=correction_rank,
        tokens=tokens,
        max_length=max_length,
        batch_size=batch_size,
        progress=progress,
    )
    if fitted:
        write_adapter(report, vectors, out, scale=scale, corrections=fitted, **write_options)
    return fitted


class _Stop(Exception):
    """Raised from a hook once the writer being fitted has run."""


def fit_corrections(
    model: Any,
    vectors: Mapping[str, np.ndarray],
    scale: float,
    lora: Mapping[str, tuple[np.ndarray, np.ndarray]],
    texts: Sequence[str],
    *,
    after: int = DEFAULT_AFTER,
    rank: int = DEFAULT_RANK,
    tokens: int | None = 40_000,
    max_length: int = 256,
    batch_size: int = 8,
    folds: int = 5,
    progress: Any = None,
) -> list[Correction]:
    """Fit correction terms for the writers after each steered site (see the module docs).

    Args:
        model: a loaded ``(model, tokenizer)``.
        vectors: ``{site: v}``, ``resid_mid.L``/``resid_post.L`` sites by canonical name, each
            ``v`` of the residual width (residual-stream units).
        scale: the steering scale (hook steering adds ``scale·v``).
        lora: ``{module: (A [R, d_in], B [d_out, R])}``, the adapter as written (PEFT scaling
            folded into ``B``): what the adapter run applies before any correction.
        texts: the fit texts (rendered).
        after: writers corrected after each site's module.
        rank: terms per corrected writer.
        tokens: tokens per writer's fit (None: all texts); whole batches are taken, so a few
            more may be used (each correction records its count).
        max_length: tokens per text.
        batch_size: texts per forward pass.
        folds: cross-validation folds (text ``i`` is in fold ``i % folds``).
        progress: a :mod:`rank1fast._progress` setting (None: on a terminal; False: none).

    Returns:
        The corrections kept, in model order (writers whose fit did not lower the
        cross-validated error by :data:`MIN_GAIN` are left out).

    Raises:
        InvalidArgumentError: bad ``after``/``rank``/``folds``/``tokens``, a site that is not
            a ``resid_*`` site, or fewer fit texts than folds.
        SiteError: the model has writers that are not exact carriers
            (:func:`residual_writers`).
    """
    from ._progress import iter_progress
    from .models import site_carrier

    net, tok = model
    for name, val, low in (("after", after, 1), ("rank", rank, 1), ("folds", folds, 2)):
        check_int(name, val, low)
    check_int("tokens", tokens, 1, optional=True)
    if len(texts) < folds:
        raise InvalidArgumentError(
            f"the correction fit needs at least {folds} fit texts (one per fold), got {len(texts)}"
        )
    writers = residual_writers(net)
    index = {m: i for i, (m, _) in enumerate(writers)}
    site_at: dict[int, np.ndarray] = {}
    for site, v in vectors.items():
        if not site.startswith("resid_"):
            raise InvalidArgumentError(
                f"site {site}: downstream corrections are for resid_mid/resid_post sites"
            )
        site_at[index[site_carrier(net, site).module]] = np.asarray(v, np.float64) * scale
    first = min(site_at)
    targets = sorted({j for i in site_at for j in range(i + 1, i + 1 + after) if j < len(writers)})
    if not targets:  # the sites are on the last writers: nothing after them to correct
        return []
    terms: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for module, (a, b) in lora.items():
        terms[module] = [
            (a[k], b[:, k]) for k in range(a.shape[0]) if np.any(a[k]) and np.any(b[:, k])
        ]
    out: list[Correction] = []
    batches = _Batches(net, tok, texts, tokens, max_length, batch_size)
    # The hook-steered runs do not change as corrections are added: one pass records the
    # residual sums at every corrected writer (kept on the CPU when they fit in CACHE_BYTES),
    # and each batch's entry into the first site's layer, from which the adapter runs resume.
    width = int(next(iter(site_at.values())).size)
    cache = batches.tokens() * width * 4 * len(targets) <= CACHE_BYTES
    hook_sums: list[dict[int, Any]] | None = [] if cache else None
    resume: list[_Resume] = []
    for inputs, keep, _ in batches:
        sums, _x, entry = _run(
            net,
            inputs,
            keep,
            writers,
            first,
            set(targets) if cache else set(),
            None,
            site_at,
            until=max(targets),
        )
        if hook_sums is not None:
            hook_sums.append(sums)
        resume.append(entry)
    with iter_progress(progress, len(targets), "corrections", unit="writer") as pb:
        for w in targets:
            stats = _accumulate(
                net, batches, writers, first, w, site_at, terms, hook_sums, resume, folds
            )
            corr = _solve(stats, writers[w], rank)
            if corr is not None:
                out.append(corr)
                terms.setdefault(corr.module, []).extend(
                    (corr.a[k], corr.u[:, k]) for k in range(corr.rank)
                )
            pb.update(1)
    return out


class _Batches:
    """The fit texts as padded batches, up to ``tokens`` real tokens, the same every pass."""

    def __init__(
        self,
        net: Any,
        tok: Any,
        texts: Sequence[str],
        tokens: int | None,
        max_length: int,
        batch_size: int,
    ) -> None:
        from ._batch import input_device, make_batch

        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.device = input_device(net)
        self.batches = []
        done = 0
        for start in range(0, len(texts), batch_size):
            ids = tok(
                list(texts[start : start + batch_size]),
                add_special_tokens=True,
                truncation=True,
                max_length=max_length,
            )["input_ids"]
            rows = [(start + i, seq) for i, seq in enumerate(ids) if seq]
            if rows:
                self.batches.append(make_batch(rows, pad))
                done += self.batches[-1].tokens
            if tokens is not None and done >= tokens:
                break

    def tokens(self) -> int:
        return sum(b.tokens for b in self.batches)

    def __iter__(self) -> Any:
        for batch in self.batches:
            inputs = {
                "input_ids": batch.input_ids.to(self.device),
                "attention_mask": batch.attention_mask.to(self.device),
            }
            yield inputs, batch.index.to(self.device), batch.document.numpy()


#: The hook-steered runs' residual sums are cached in memory up to this size.
CACHE_BYTES = 2 << 30


@dataclass
class _Stats:
    g: np.ndarray  # [folds, d_in, d_in]  Σ x xᵀ
    c: np.ndarray  # [folds, d_in, d]     Σ x Dᵀ
    e: np.ndarray  # [folds]              Σ |D|²
    n: np.ndarray  # [folds]              tokens


@dataclass
class _Resume:
    """One batch's adapter run as it enters decoder layer ``layer``: the hidden state, the
    residual sum of the writers from ``first`` on so far, and every layer's call arguments
    (captured once from the model's own forward: masks, position embeddings)."""

    layer: int
    hidden: Any
    sum: Any
    calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]]


def _writer_hooks(
    net: Any,
    writers: list[tuple[str, float]],
    span: range,
    first: int,
    record: set[int],
    last: int,
    lora_t: Mapping[str, tuple[Any, Any]] | None,
    keep: Any,
    state: dict[str, Any],
) -> list[Any]:
    """Forward hooks on the writers in ``span``: add the adapter's terms (``lora_t``), add
    ``gain·output`` of the writers from ``first`` on to ``state["sum"]``, record it at the
    writers in ``record`` (``state["sums"]``, on the CPU), and stop after writer ``last``
    (its input in ``state["x"]`` for adapter runs). Registered before any other hook, so the
    steering's hooks come after the writers' own outputs."""
    from .models import get_module

    def hook(j: int, path: str, gain: float, _m: Any, inp: Any, outp: Any) -> Any:
        x = inp[0]
        y = outp
        if lora_t is not None and path in lora_t:
            a, u = lora_t[path]
            if a.device != x.device or a.dtype != x.dtype:  # a model spread over devices
                a, u = a.to(x), u.to(x)
            y = outp + (x @ a.T) @ u.T
        if j >= first:
            flat = (y.float() * gain).reshape(-1, y.shape[-1])[keep]
            state["sum"] = flat if state["sum"] is None else state["sum"] + flat
        if j in record:
            state["sums"][j] = state["sum"].cpu()
        if j == last:
            if lora_t is not None:
                state["x"] = x.float().reshape(-1, x.shape[-1])[keep].cpu()
            raise _Stop
        return y if lora_t is not None else None

    return [
        get_module(net, writers[j][0]).register_forward_hook(
            functools.partial(hook, j, *writers[j]), prepend=True
        )
        for j in span
    ]


def _run(
    net: Any,
    inputs: Mapping[str, Any],
    keep: Any,
    writers: list[tuple[str, float]],
    first: int,
    record: set[int],
    lora_t: Mapping[str, tuple[Any, Any]] | None,
    site_at: Mapping[int, np.ndarray],
    *,
    until: int | None = None,
) -> tuple[dict[int, Any], Any, _Resume]:
    """One forward pass from the embeddings, stopped after writer ``until`` (default: the
    last in ``record``).

    ``lora_t=None``: hook steering of the sites; else the adapter's terms
    (``{module: (a [k, d_in], u [d_out, k])}``) added to the writers' outputs. Returns the
    residual-stream sum ``Σ gain·output`` of the writers from ``first`` on at each writer in
    ``record`` (``[tokens, d]`` float32 on the CPU, real tokens only), the input of the last
    writer (``[tokens, d_in]``, adapter runs only), and the :class:`_Resume` point at the first
    site's layer (the hook and adapter runs agree up to there).
    """
    import torch

    from .models import decoder_layers

    last = max(record) if until is None else until
    layers = decoder_layers(net)
    start = first // 2  # residual_writers: (o_proj, down_proj) of each layer in turn
    state: dict[str, Any] = {"sum": None, "x": None, "sums": {}}
    calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    entry: list[Any] = []

    def capture(i: int, _m: Any, args: Any, kwargs: Any) -> None:
        if i == start:
            entry.append(args[0] if args else kwargs["hidden_states"])
        calls[i] = (tuple(args[1:]), dict(kwargs))

    handles = _writer_hooks(
        net, writers, range(first, last + 1), first, record, last, lora_t, keep, state
    )
    try:
        for i in range(start, last // 2 + 1):
            handles.append(
                layers[i].register_forward_pre_hook(functools.partial(capture, i), with_kwargs=True)
            )
        ctx = _steering(net, site_at, writers) if lora_t is None else contextlib.nullcontext()
        with ctx, torch.no_grad():
            try:
                net(**inputs, use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return state["sums"], state["x"], _Resume(start, entry[0], None, calls)


def _resume(
    net: Any,
    point: _Resume,
    keep: Any,
    writers: list[tuple[str, float]],
    first: int,
    w: int,
    lora_t: Mapping[str, tuple[Any, Any]],
) -> tuple[Any, Any, _Resume]:
    """The adapter run of one batch from ``point`` to writer ``w``, calling the decoder layers
    directly (layers before ``point.layer`` are not run again: their writers' terms are final).

    Returns the residual sum at ``w`` and ``w``'s input (as :func:`_run`), and the resume
    point at ``w``'s layer for the writers after ``w``.
    """
    import torch

    from .models import decoder_layers

    layers = decoder_layers(net)
    target = w // 2
    state: dict[str, Any] = {"sum": point.sum, "x": None, "sums": {}}
    handles = _writer_hooks(
        net,
        writers,
        range(max(first, 2 * point.layer), w + 1),
        first,
        {w},
        w,
        lora_t,
        keep,
        state,
    )
    h = point.hidden
    nxt = point
    try:
        with torch.no_grad():
            for i in range(point.layer, target + 1):
                if i == target:
                    nxt = _Resume(i, h, state["sum"], point.calls)
                args, kwargs = point.calls[i]
                try:
                    if args or "hidden_states" not in kwargs:
                        out = layers[i](h, *args, **kwargs)
                    else:
                        out = layers[i](**{**kwargs, "hidden_states": h})
                except _Stop:
                    break
                h = out[0] if isinstance(out, tuple) else out
    finally:
        for hd in handles:
            hd.remove()
    return state["sums"][w], state["x"], nxt


def _accumulate(
    net: Any,
    batches: _Batches,
    writers: list[tuple[str, float]],
    first: int,
    w: int,
    site_at: Mapping[int, np.ndarray],
    terms: Mapping[str, list[tuple[np.ndarray, np.ndarray]]],
    hook_sums: list[dict[int, Any]] | None,
    resume: list[_Resume],
    folds: int,
) -> _Stats:
    """Second moments of writer ``w``'s input and of the residual difference after it
    (``resume[n]`` moves on to ``w``'s layer)."""
    import torch

    param = next(net.parameters())

    def tensor(x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(x, dtype=param.dtype, device=param.device)

    lora_t = {
        m: (torch.stack([tensor(a) for a, _ in ts]), torch.stack([tensor(u) for _, u in ts], 1))
        for m, ts in terms.items()
        if ts
    }
    # The hook steering of the sites upstream of (and at) w, as the residual sees it.
    steer = np.sum([v for i, v in site_at.items() if i <= w], axis=0)
    stats: _Stats | None = None
    for n, (inputs, keep, document) in enumerate(batches):
        summed, x, resume[n] = _resume(net, resume[n], keep, writers, first, w, lora_t)
        if hook_sums is not None:
            hooked = hook_sums[n][w]
        else:
            hooked = _run(net, inputs, keep, writers, first, {w}, None, site_at)[0][w]
        diff = (summed - hooked).double().numpy() - steer
        x = x.double().numpy()
        if stats is None:
            d_in, d = x.shape[1], diff.shape[1]
            stats = _Stats(
                np.zeros((folds, d_in, d_in)),
                np.zeros((folds, d_in, d)),
                np.zeros(folds),
                np.zeros(folds, dtype=np.int64),
            )
        fold = document % folds  # texts, not tokens, are held out
        for k in range(folds):
            sel = fold == k
            xs, ds = x[sel], diff[sel]
            stats.g[k] += xs.T @ xs
            stats.c[k] += xs.T @ ds
            stats.e[k] += float((ds**2).sum())
            stats.n[k] += xs.shape[0]
    if stats is None or (stats.n == 0).any():
        raise InvalidArgumentError(
            f"the correction fit needs at least {folds} texts (one per fold), got "
            f"{0 if stats is None else int((stats.n > 0).sum())} folds with tokens"
        )
    return stats


def _steering(net: Any, site_at: Mapping[int, np.ndarray], writers: list[tuple[str, float]]) -> Any:
    """Hook steering of the sites (their writers' outputs moved by scale·v / gain)."""
    from .steering import steering

    by_module = {writers[i][0]: v / writers[i][1] for i, v in site_at.items()}
    return steering(net, by_module, 1.0)


def _solve(stats: _Stats, writer: tuple[str, float], rank: int) -> Correction | None:
    """Cross-validated reduced-rank ridge regression of −D on x (see the module docs).

    The ridge walks along :data:`RIDGES` from :data:`RIDGE_START` in the direction the
    cross-validated error falls and stops where it rises again. Dense algebra in torch float64
    (its solve of a 1,536 x 1,536 system with 576 right-hand sides took 0.07-0.10 s on 2 cores
    of a Sapphire Rapids, numpy's 0.12-0.17 s).
    """
    import torch

    module, gain = writer
    folds, d_in, d = stats.c.shape
    g_f, c_f = torch.from_numpy(stats.g), torch.from_numpy(stats.c)
    g_all, c_all = g_f.sum(0), c_f.sum(0)
    n = int(stats.n.sum())
    e_all = float(stats.e.sum())
    r = min(rank, d, d_in)
    eye = torch.eye(d_in, dtype=torch.float64)

    def fit(g: torch.Tensor, c: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``P`` [d, r] and ``A = Pᵀ W`` [r, d_in]: W_r minimising Σ|D + W x|² + ridge."""
        reg = lam * float(torch.trace(g)) / d_in
        wt = torch.linalg.solve(g + reg * eye, -c)  # [d_in, d] = Wᵀ
        # The fitted values' second moment W G Wᵀ, with G Wᵀ = −C − reg·Wᵀ (cheaper than G Wᵀ).
        m = -(wt.T @ c) - reg * (wt.T @ wt)
        _, vecs = torch.linalg.eigh((m + m.T) / 2)
        p = vecs.flip(-1)[:, :r]  # [d, r]
        return p, p.T @ wt.T

    def held_out(i: int) -> float:
        """Σ over folds of the held-out Σ|D + P A x|² = e + 2 tr(P A C) + tr(A G Aᵀ)."""
        if i not in errors:
            sse = 0.0
            for k in range(folds):
                p, a = fit(g_all - g_f[k], c_all - c_f[k], RIDGES[i])
                sse += float(stats.e[k] + 2 * torch.trace(a @ c_f[k] @ p))
                sse += float(torch.trace(a @ g_f[k] @ a.T))
            errors[i] = sse
        return errors[i]

    errors: dict[int, float] = {}
    best = RIDGES.index(RIDGE_START)
    for step in (-1, 1):
        while 0 <= best + step < len(RIDGES) and held_out(best + step) < held_out(best):
            best += step
    sse, lam = errors[best], RIDGES[best]
    if not math.isfinite(sse) or sse > (1 - MIN_GAIN) * e_all:
        return None
    p, a = fit(g_all, c_all, lam)
    return Correction(
        module=module,
        a=a.numpy(),
        u=p.numpy() / gain,
        ridge=lam,
        tokens=n,
        rms_before=math.sqrt(e_all / n),
        rms_after=math.sqrt(max(sse, 0.0) / n),
    )
