"""``rank1fast.write_adapter``: steering vectors as rank-1 PEFT LoRA adapters.

For a site whose module reads ``x`` and a steering vector ``v`` added to that module's
output, the adapter is ``lora_A = c·bᵀ`` and ``lora_B = scale·v / c`` with ``b`` the site's
constant direction from the analysis report (``b·x ≈ 1`` for every token) and ``c`` balancing
the two norms, so the LoRA adds ``scale·v·(b·x) ≈ scale·v``. The tensors are built and
written by the Rust core (``rust/rank1fast-core/src/adapter.rs``); this module resolves
sites, checks sizes and writes the directory atomically.

The attention sink. The analysis leaves out the first positions (``skip_positions``): their
massive activations would distort ``b``. But the adapter still acts there, and every later token
attends to the first one, so ``b·x`` far from 1 at position 0 (0.1-0.3 on the MLP sites of the
default model) costs fidelity everywhere. With ``pin_sink=True`` (the default) the
least-squares direction is refitted under the constraint ``b·μ₀ = 1``, with ``μ₀`` the mean input
at the skipped positions (``SiteReport.sink_mean``, summed by the analysis pass itself):
``b' = b + (1 − b·μ₀) G_λ⁻¹μ₀ / (μ₀ᵀG_λ⁻¹μ₀)``, the ridge least-squares solution with that
constraint (``G_λ`` the regularized second moment). Its rms error on ordinary tokens rises, by
an amount the statistics give exactly; the pinned direction is kept only when that rise is at
most 25 % (``SINK_PIN_MAX_COST``). On the default model that pins resid_post.5, where
KL(hook||adapter) fell from 4.3 % to 3.0 % of the steering effect, and leaves layers 15 and 25
alone, where pinning would triple the error (and the KL ratio went from 0.4 % to 2.3 %).

An adapter directory holds:

- ``adapter_config.json``: ``peft_type: LORA``, ``r``, ``lora_alpha = r`` (scaling 1), the
  full module paths in ``target_modules``, ``bias: none``, ``task_type: CAUSAL_LM``
  (``FEATURE_EXTRACTION`` for a model without an LM head, e.g. an encoder loaded as
  ``AutoModel``), ``base_model_name_or_path``;
- ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` ``[r, d_in]``
  and ``...lora_B.weight`` ``[d_out, r]`` (extra ranks zero; norms balanced);
- ``rank1fast.json``: what the adapter steers (site -> module, sizes, scale, method), read by
  :func:`rank1fast.verify`. PEFT and vLLM ignore it.

``target=`` names the server the adapter is for (:mod:`rank1fast.serving`): the rank is padded
to one it takes and the adapter is checked against its rules before anything is written.
:func:`write_adapters` writes many adapters in one call, doing the per-site work once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import _core
from ._fs import fsync_dir, write_json
from ._manifest import MANIFEST
from ._peft import peft_config
from .errors import AdapterError, InvalidArgumentError, Rank1IOError, ResidualSiteError
from .report import Report
from .serving import (
    CONFIG_FILE,
    ERROR,
    PROFILES,
    WEIGHTS_FILE,
    AdapterFiles,
    Profile,
    check_files,
    get_profile,
)

__all__ = [
    "write_adapter",
    "write_adapters",
    "read_adapter_info",
    "update_adapter_info",
    "check_destination",
    "move_adapter",
    "METHODS",
    "DTYPES",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "INFO_FILE",
]

METHODS = ("least-squares", "one-hot")
DTYPES = ("float32", "float16", "bfloat16")
INFO_FILE = "rank1fast.json"
_INFO_FORMAT = "rank1fast.adapter"
#: pin_sink pins b·μ₀ = 1 only if the in-sample rms error grows by at most this factor.
SINK_PIN_MAX_COST = 1.25
#: The checkpoint the built-in default model (a Q4_1 GGUF of it) was quantized from.
DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

_RESID = re.compile(r"^(resid_mid|resid_post)\.(\d+)$")
_MODULE_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)+$")
#: One directory name that is not hidden (temporary directories start with a dot).
_ADAPTER_NAME = re.compile(r"^[^./\\\x00][^/\\\x00]*$")
#: write_adapters' default writer threads: the writes wait on fsync, not on the CPU, and
#: concurrent fsyncs share journal commits.
_WRITE_THREADS = 16


def write_adapter(
    report: Report,
    vectors: Mapping[str, Any],
    out: str | os.PathLike[str],
    *,
    scale: float = 1.0,
    rank: int = 1,
    method: str = "least-squares",
    dtype: str = "float32",
    base_model: str | None = None,
    overwrite: bool = False,
    pin_sink: bool = True,
    target: str = "peft",
    corrections: Sequence[Any] | None = None,
) -> Path:
    """Write a PEFT LoRA adapter that adds ``scale·v`` at each site of ``vectors``.

    Args:
        report: the analysis of the sites (:func:`rank1fast.analyze`); each site's
            ``direction`` (least squares) or ``onehot`` gives ``lora_A``. Its ``modules``
            (from the dump manifest) map sites to module paths; a site named by its module
            path needs no mapping.
        vectors: ``{site: vector}``, each vector in the site's output space (``d_out``
            values); several sites make one adapter.
        out: the adapter directory to create.
        scale: multiplies every vector (``lora_B lora_A = scale·v bᵀ``; the factors are
            balanced, ``c = sqrt(‖scale·v‖ / ‖b‖)`` moved from B to A).
        rank: the LoRA rank; ranks beyond 1 are zero (for servers that accept only some
            ranks). ``lora_alpha = rank`` keeps PEFT's scaling at 1. ``target`` may pad it.
        method: ``"least-squares"`` (the cross-validated constant direction) or
            ``"one-hot"`` (the naive single outlier dimension, for comparison).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``; ``A`` and ``B`` are scaled to
            equal norms before the cast, so tiny directions survive float16.
        base_model: ``base_model_name_or_path`` for the config; default: the model named in
            the dump's manifest.
        overwrite: replace ``out`` if it exists (only an adapter directory or an empty one).
        pin_sink: with ``method="least-squares"``, make ``b·x`` exactly 1 on the mean input at
            the positions the analysis skipped (the attention sink; see the module docs).
            Needs the report's dump (``report.source``); skipped without it.
        target: the server the adapter is for (:data:`rank1fast.serving.PROFILES`):
            ``"peft"`` (default), ``"vllm"``, ``"fireworks"``, ``"cloudflare"`` or
            ``"together"``. The rank is padded with zeros to the smallest one the server takes
            (vllm: 1, 8, 16, ...; fireworks: at least 4), and the adapter is checked against
            the server's rules (:func:`rank1fast.serving.check`) before anything is written.
            ``cloudflare`` adds the ``model_type`` Workers AI wants, from the dump's model or
            ``base_model``.
        corrections: :class:`rank1fast.corrections.Correction` terms (from
            :func:`rank1fast.corrections.fit_corrections`, as :func:`rank1fast.convert` fits
            them): each adds its rank-1 terms to its module's LoRA (a site's module, or a new
            one). The rank becomes ``1 +`` the most terms on one module (at least ``rank``,
            padded for ``target``); ``rank1fast.json`` records each fit under
            ``"corrections"``.

    Returns:
        The adapter directory.

    Residual-stream sites (``resid_mid.L``/``resid_post.L``) are written only where the
    module's output joins the residual stream unchanged (the dump records this per site:
    :func:`rank1fast.models.site_carrier`); on Granite the vector is divided by the
    ``residual_multiplier`` the block applies. Post-norm blocks (Gemma 2/3, OLMo-2) are refused.

    Raises:
        ResidualSiteError: a residual-stream site whose module's output is normalised before
            the residual add (post-norm blocks); the message names the norm and the
            alternatives (hook steering, or the module's raw path).
        AdapterError: a site missing from the report or without a module path, a vector
            whose size does not match the site, a site without a least-squares direction
            (analysed without second moments), ``out`` existing (without ``overwrite``), or
            bad ``rank``/``method``/``dtype``. Nothing is left half-written: the directory is
            assembled under a temporary name next to ``out`` and renamed.
        InvalidArgumentError: ``target``'s server would reject the adapter (a rank it cannot
            take, a module it does not adapt, a file too large, ...); the message lists why.

    Example:
        >>> report = rank1fast.analyze("dump/")                                # doctest: +SKIP
        >>> vecs = rank1fast.vectors.load("happy.gguf")                       # doctest: +SKIP
        >>> rank1fast.write_adapter(report, vecs, "happy-lora", scale=4.0)    # doctest: +SKIP
        PosixPath('happy-lora')
    """
    out = Path(out)
    opts = _options(scale, rank, method, dtype, pin_sink, target)
    if not vectors:
        raise AdapterError("no steering vectors given")
    _check_out(out, overwrite)
    plan = _plan(_Sites(report, opts), vectors, base_model, opts)
    if corrections:
        opts = _add_corrections(plan, opts, corrections)
    _precheck(plan, opts, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _stage(plan, out, opts)
    try:
        _replace_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_adapters(
    report: Report,
    adapters: Mapping[str, Mapping[str, Any]],
    out_root: str | os.PathLike[str],
    *,
    scale: float = 1.0,
    rank: int = 1,
    method: str = "least-squares",
    dtype: str = "float32",
    base_model: str | None = None,
    overwrite: bool = False,
    pin_sink: bool = True,
    target: str = "peft",
    threads: int | None = None,
) -> dict[str, Path]:
    """Write many adapters at once: ``out_root/<name>`` for each ``{name: {site: vector}}``.

    Each directory is exactly what :func:`write_adapter` writes for that name's vectors with
    the same options (byte for byte). What adapters share is done once: resolving sites, the
    direction ``b`` of each site and its sink pinning (a ``d x d`` solve), and the check
    against ``target``'s rules for each set of modules. The files are written by the Rust
    core on ``threads`` threads (the writes wait on the disk, not the CPU).

    All or nothing: every adapter is validated and written under a temporary name before any
    is moved into place, so if one fails (a bad vector, a float16 overflow, Ctrl-C), none
    appears.

    Args:
        report: the analysis of the sites, as for :func:`write_adapter`.
        adapters: ``{name: {site: vector}}``; a name is one directory name (no ``/``, not
            starting with ``.``).
        out_root: the directory to create the adapters in (created if missing).
        scale, rank, method, dtype, base_model, overwrite, pin_sink, target: as for
            :func:`write_adapter`, applied to every adapter (``overwrite`` per adapter
            directory).
        threads: writer threads (default: 16, at most one per adapter).

    Returns:
        ``{name: adapter directory}``, in the order of ``adapters``.

    Raises:
        AdapterError: as :func:`write_adapter`, naming the adapter; also a bad name.
        InvalidArgumentError: ``target``'s server would reject the adapters.

    Example:
        >>> vecs = {f"happy-{s}": {"resid_mid.15": s * v} for s in (1, 2, 4, 8)}  # doctest: +SKIP
        >>> rank1fast.write_adapters(report, vecs, "loras/", target="vllm")      # doctest: +SKIP
        {'happy-1': PosixPath('loras/happy-1'), ...}
    """
    out_root = Path(out_root)
    opts = _options(scale, rank, method, dtype, pin_sink, target)
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise AdapterError(f"threads must be a positive integer; got {threads!r}")
    if not adapters:
        raise AdapterError("no adapters given")
    outs: dict[str, Path] = {}
    for name, vectors in adapters.items():
        if not isinstance(name, str) or not _ADAPTER_NAME.match(name):
            raise AdapterError(
                f"adapter name {name!r} must be one directory name (no '/', not starting with '.')"
            )
        if not vectors:
            raise AdapterError(f"adapter {name!r}: no steering vectors given")
        outs[name] = out_root / name
        _check_out(outs[name], overwrite)

    sites = _Sites(report, opts)
    plans: dict[str, _Plan] = {}
    checked: set[tuple[Any, ...]] = set()
    for name, vectors in adapters.items():
        try:
            plan = _plan(sites, vectors, base_model, opts)
        except AdapterError as e:
            raise AdapterError(f"adapter {name!r}: {e}") from e
        # The rules depend only on the modules and their sizes: check each layout once.
        key = tuple((s["module"], s["d_in"], s["d_out"]) for s in plan.info["sites"].values())
        if key not in checked:
            _precheck(plan, opts, outs[name])
            checked.add(key)
        plans[name] = plan

    out_root.mkdir(parents=True, exist_ok=True)
    staged: dict[str, Path] = {}
    try:
        workers = min(threads or _WRITE_THREADS, len(plans))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [(n, pool.submit(_stage, plans[n], outs[n], opts)) for n in plans]
            try:
                for name, future in futures:
                    staged[name] = future.result()
            except BaseException:
                # Stop what has not started; collect what finished so it is removed below.
                for _, future in futures:
                    future.cancel()
                for name, future in futures:
                    if name not in staged and not future.cancelled():
                        try:
                            staged[name] = future.result()
                        except BaseException:
                            pass
                raise
        for name in plans:
            _replace_dir(staged[name], outs[name], overwrite, sync=False)
            del staged[name]
    except BaseException:
        for tmp in staged.values():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        fsync_dir(out_root)
    return outs


def read_adapter_info(adapter: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``rank1fast.json`` of an adapter directory written by :func:`write_adapter`.

    Args:
        adapter: the adapter directory.

    Returns:
        The parsed document (``sites`` maps site -> ``{"module", "d_in", "d_out", ...}``), or
        None for an adapter rank1fast did not write.

    Raises:
        AdapterError: the directory has no ``adapter_config.json``, or a malformed
            ``rank1fast.json``.

    Example:
        >>> read_adapter_info("happy-lora")["sites"]["resid_mid.15"]["module"]  # doctest: +SKIP
        'model.layers.15.self_attn.o_proj'
    """
    adapter = Path(adapter)
    if not (adapter / CONFIG_FILE).is_file():
        raise AdapterError(f"{adapter}: not a PEFT adapter directory (no {CONFIG_FILE})")
    path = adapter / INFO_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path}: unreadable: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != _INFO_FORMAT:
        raise AdapterError(f"{path}: not a rank1fast adapter description")
    return doc


def update_adapter_info(adapter: str | os.PathLike[str], fields: Mapping[str, Any]) -> None:
    """Add ``fields`` to an adapter's ``rank1fast.json`` (written anew, then renamed).

    Used by :func:`rank1fast.convert` to store the fit and the fidelity it measured.

    Raises:
        AdapterError: not an adapter rank1fast wrote (no ``rank1fast.json``).
    """
    adapter = Path(adapter)
    doc = read_adapter_info(adapter)
    if doc is None:
        raise AdapterError(f"{adapter}: no {INFO_FILE}; not an adapter rank1fast wrote")
    doc.update(fields)
    tmp = adapter / f".{INFO_FILE}.tmp"
    write_json(tmp, doc)
    os.replace(tmp, adapter / INFO_FILE)


def check_destination(out: str | os.PathLike[str], overwrite: bool) -> None:
    """Raise :class:`AdapterError` unless an adapter may be written to ``out``: it does not
    exist, or ``overwrite`` is set and it is an adapter directory (or an empty one)."""
    _check_out(Path(out), overwrite)


def move_adapter(src: str | os.PathLike[str], out: str | os.PathLike[str], overwrite: bool) -> Path:
    """Move the finished adapter directory ``src`` to ``out`` in one rename (an old adapter at
    ``out`` is replaced only with ``overwrite``; see :func:`check_destination`)."""
    out = Path(out)
    _replace_dir(Path(src), out, overwrite)
    return out


# --------------------------------------------------------------------------- sites


@dataclass(frozen=True)
class _Options:
    scale: float
    rank: int  # written (padded for the profile)
    requested_rank: int
    method: str
    dtype: str
    pin_sink: bool  # pin_sink and method == "least-squares"
    profile: Profile


def _options(
    scale: Any, rank: Any, method: str, dtype: str, pin_sink: bool, target: str
) -> _Options:
    """Validate the options every adapter shares (the checks write_adapter always made)."""
    if method not in METHODS:
        raise AdapterError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if dtype not in DTYPES:
        raise AdapterError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise AdapterError(f"rank must be a positive integer; got {rank!r}")
    scale = float(scale)
    if not np.isfinite(scale):
        raise AdapterError(f"scale must be finite; got {scale}")
    profile = get_profile(target)
    return _Options(
        scale=scale,
        rank=profile.pad_rank(int(rank)),
        requested_rank=int(rank),
        method=method,
        dtype=dtype,
        pin_sink=bool(pin_sink and method == "least-squares"),
        profile=profile,
    )


class _Sites:
    """Per-site work shared by every adapter: module, sizes, direction (pinned once)."""

    def __init__(self, report: Report, opts: _Options) -> None:
        self.report = report
        self.opts = opts
        self.manifest = _manifest(report)
        carriers = self.manifest.get("carriers")
        self.carriers = {**(carriers if isinstance(carriers, dict) else {}), **report.carriers}
        self._done: dict[str, tuple[dict[str, Any], np.ndarray, int | None]] = {}

    def get(self, site: str) -> tuple[dict[str, Any], np.ndarray, int | None]:
        """``(info, b, expected d_out)`` of a site; info holds everything but the vector's part."""
        if site not in self._done:
            self._done[site] = self._resolve(site)
        return self._done[site]

    def _resolve(self, site: str) -> tuple[dict[str, Any], np.ndarray, int | None]:
        report = self.report
        if site not in report:
            raise AdapterError(
                f"site {site!r} is not in the report (it has: "
                f"{', '.join(report.sites) or 'none'}); analyze a dump that holds it"
            )
        s = report[site]
        module = report.modules.get(site)
        if module is None:
            if _RESID.match(site) or not _MODULE_PATH.match(site):
                raise AdapterError(
                    f"site {site!r}: the report does not say which module it is (analysed from "
                    "a bare file, not a dump with a manifest); name the site by its module path"
                )
            module = site
        gain = self._check_carrier(site)
        if s.count == 0:
            raise AdapterError(f"site {site}: the report holds no tokens for it")
        extra: dict[str, Any]
        if self.opts.method == "least-squares":
            direction = s.direction
            if direction is None:
                raise AdapterError(
                    f"site {site}: no least-squares direction (analysed without second "
                    "moments); re-run analyze with second_moments=True or use method='one-hot'"
                )
            b, err, extra = direction.vector, direction.error, {"ridge": direction.ridge}
        else:
            oh = s.onehot
            b, err, extra = oh.vector, oh.error, {"dims": oh.dims}
        b = np.ascontiguousarray(b, dtype=np.float64)
        if b.shape != (s.dim,):
            raise AdapterError(f"site {site}: direction has shape {b.shape}, expected ({s.dim},)")
        info: dict[str, Any] = {
            "module": module,
            "d_in": int(s.dim),
            "tokens": int(s.count),
            "direction_error": float(err),
            **extra,
        }
        if gain != 1.0:
            info["gain"] = gain
        if self.opts.pin_sink:
            mu0 = s.sink_mean
            if mu0 is not None and np.isfinite(mu0).all() and np.any(mu0):
                b, info["sink"] = _pinned(s, b, mu0)
        return info, b, _expected_out_dim(self.manifest, site)

    def _check_carrier(self, site: str) -> float:
        """The gain of a resid_* site's module (what the residual gets per unit of its output;
        1 but on Granite), after refusing a site no linear module carries faithfully.

        The dump records each site's carrier (``carriers`` in the manifest, from
        :func:`rank1fast.models.site_carrier`); for a dump made before it did, the model type
        in the manifest decides.
        """
        if not _RESID.match(site):
            return 1.0
        c = self.carriers.get(site)
        if not isinstance(c, dict):
            c = _legacy_carrier(self.manifest, site)
        if c.get("kind") in ("normed", "refused"):
            raise ResidualSiteError.refusing(site, c.get("reason"))
        gain = c.get("gain", 1.0)
        if not isinstance(gain, (int, float)) or not np.isfinite(gain) or gain == 0:
            raise AdapterError(f"site {site}: the dump records a bad gain {gain!r}")
        return float(gain)


def _legacy_carrier(manifest: dict[str, Any], site: str) -> dict[str, Any]:
    """A carrier for a dump that does not record one: post-norm families by model type."""
    model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    kind = model.get("type")
    if not isinstance(kind, str):
        return {}
    try:
        from .models import FAMILIES
    except ImportError:  # no torch: nothing to look up
        return {}
    fam = FAMILIES.get(kind)
    norm = None if fam is None else (fam.attn_norm if "mid" in site else fam.mlp_norm)
    if norm is None:
        return {}
    return {
        "kind": "normed",
        "norm": norm,
        "reason": f"site {site!r} is the residual stream, but {kind} blocks normalise the "
        f"sublayer output with {norm} before the residual add (a post-norm block; this dump "
        "predates carrier records). Hook steering (rank1fast.steering) steers the site "
        "exactly; to adapt the module's output itself, collect with its raw module path",
    }


def _vector(site: str, module: str, vector: Any, expect: int | None) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise AdapterError(f"site {site}: the steering vector must be 1-D, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise AdapterError(f"site {site}: the steering vector holds a NaN or an infinity")
    if expect is not None and v.size != expect:
        raise AdapterError(
            f"site {site} ({module}): the steering vector has {v.size} values but the module's "
            f"output has {expect}"
        )
    return np.ascontiguousarray(v)


@dataclass
class _Plan:
    """Everything one adapter directory holds, ready to write."""

    modules: list[str]
    directions: list[np.ndarray]
    vectors: list[np.ndarray]
    config: dict[str, Any]
    info: dict[str, Any]
    #: Per module, further rank-1 terms ``(a, u)`` written unscaled (corrections).
    extra: list[list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=list)


def _plan(
    sites: _Sites, vectors: Mapping[str, Any], base_model: str | None, opts: _Options
) -> _Plan:
    infos: dict[str, dict[str, Any]] = {}
    directions, vecs = [], []
    for key, vector in vectors.items():
        site = str(key)
        shared, b, expect = sites.get(site)
        v = _vector(site, shared["module"], vector, expect)
        # Granite scales the module output by residual_multiplier before the residual add.
        written = v / shared.get("gain", 1.0)
        info = {"module": shared["module"], "d_in": shared["d_in"], "d_out": int(v.size)}
        info["tokens"] = shared["tokens"]
        info["direction_error"] = shared["direction_error"]
        info["vector_norm"] = float(np.linalg.norm(v))
        info.update((k, val) for k, val in shared.items() if k not in info)
        infos[site] = info
        directions.append(b)
        vecs.append(written)
    _check_residual_widths(infos)
    modules = [s["module"] for s in infos.values()]
    if len(set(modules)) != len(modules):
        raise AdapterError(f"two sites map to one module: {modules}")

    from ._version import __version__

    base = base_model if base_model is not None else _manifest_model_name(sites.manifest)
    task = _task_type(sites.manifest, getattr(sites.report, "task_type", None))
    config = peft_config(modules, opts.rank, base, task)
    if opts.profile.model_types is not None:
        config["model_type"] = _model_type(sites.manifest, base)
    info_doc = {
        "format": _INFO_FORMAT,
        "version": 1,
        "rank1fast": __version__,
        "method": opts.method,
        "scale": opts.scale,
        "rank": opts.rank,
        "requested_rank": opts.requested_rank,
        "target": opts.profile.name,
        "dtype": opts.dtype,
        "base_model": base,
        "pin_sink": opts.pin_sink,
        "report_source": sites.report.source,
        "skip_positions": sites.report.skip_positions,
        "sites": infos,
    }
    return _Plan(modules, directions, vecs, config, info_doc)


def _add_corrections(plan: _Plan, opts: _Options, corrections: Sequence[Any]) -> _Options:
    """Put correction terms into ``plan`` (in place); the options with the rank they need."""
    if opts.method != "least-squares":
        raise AdapterError("corrections go with method='least-squares' adapters only")
    if opts.scale == 0:
        raise AdapterError("corrections need a nonzero scale")
    plan.extra = [[] for _ in plan.modules]
    records: dict[str, Any] = {}
    for c in corrections:
        a = np.ascontiguousarray(c.a, dtype=np.float64)
        u = np.ascontiguousarray(c.u, dtype=np.float64)
        if a.ndim != 2 or u.ndim != 2 or a.shape[0] != u.shape[1] or a.shape[0] == 0:
            raise AdapterError(
                f"correction of {c.module}: a {list(a.shape)} and u {list(u.shape)} are not "
                "[r, d_in] and [d_out, r]"
            )
        if not (np.isfinite(a).all() and np.isfinite(u).all()):
            raise AdapterError(f"correction of {c.module}: holds a NaN or an infinity")
        if c.module in records:
            raise AdapterError(f"two corrections of module {c.module}")
        terms = [(a[k], u[:, k]) for k in range(a.shape[0])]
        if c.module in plan.modules:
            i = plan.modules.index(c.module)
            if plan.directions[i].size != a.shape[1] or plan.vectors[i].size != u.shape[0]:
                raise AdapterError(
                    f"correction of {c.module}: sizes {a.shape[1]} x {u.shape[0]} differ from "
                    f"the site's {plan.directions[i].size} x {plan.vectors[i].size}"
                )
            plan.extra[i].extend(terms)
        else:  # a module of its own: its first term goes where a site's b and v would
            plan.modules.append(c.module)
            plan.directions.append(a[0])
            plan.vectors.append(u[:, 0] / opts.scale)
            plan.extra.append(terms[1:])
        records[c.module] = c.to_json()
    need = max(1 + len(e) for e in plan.extra)
    rank = opts.profile.pad_rank(max(opts.requested_rank, need))
    plan.config["r"] = plan.config["lora_alpha"] = rank
    plan.config["target_modules"] = list(plan.modules)
    plan.info["rank"] = rank
    plan.info["corrections"] = records
    return replace(opts, rank=rank)


def _module_dims(plan: _Plan) -> list[tuple[str, int, int]]:
    """``(module, d_in, d_out)`` of every module the adapter holds, in the plan's order."""
    return [(m, d.size, v.size) for m, d, v in zip(plan.modules, plan.directions, plan.vectors)]


def _precheck(plan: _Plan, opts: _Options, out: Path) -> None:
    """Refuse, before writing, an adapter the target server would reject.

    The rules are those of :func:`rank1fast.serving.check`, applied to the files as they will
    be written (sizes predicted from the shapes and dtype).
    """
    tag, item = {"float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2)}[opts.dtype]
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    header: dict[str, Any] = {"__metadata__": _weights_metadata(plan.info)}
    offset = 0
    for module, d_in, d_out in _module_dims(plan):
        for factor, shape in (
            ("lora_A", (opts.rank, d_in)),
            ("lora_B", (d_out, opts.rank)),
        ):
            name = f"base_model.model.{module}.{factor}.weight"
            tensors[name] = (tag, shape)
            size = shape[0] * shape[1] * item
            header[name] = {
                "dtype": tag,
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
    head = len(json.dumps(header, separators=(",", ":")).encode())
    files = AdapterFiles(
        files={
            CONFIG_FILE: len(json.dumps(plan.config, indent=2)) + 1,
            WEIGHTS_FILE: 8 + head + (-head % 8) + offset,
            INFO_FILE: len(json.dumps(plan.info, indent=2)) + 1,
        },
        config=plan.config,
        tensors=tensors,
        weights=WEIGHTS_FILE,
    )
    errors = [p for p in check_files(files, opts.profile) if p.severity == ERROR]
    if errors:
        lines = [f"[{p.rule}] {p.message}" for p in errors]
        if any(p.rule == "model_type" for p in errors):
            lines.append(
                "rank1fast takes model_type from the dump's model or from base_model's name; "
                "pass base_model= naming a checkpoint of a family the server takes"
            )
        raise InvalidArgumentError(
            f"{out}: {opts.profile.server} would reject this adapter:\n  " + "\n  ".join(lines)
        )


def _stage(plan: _Plan, out: Path, opts: _Options) -> Path:
    """Write the adapter's files into a new temporary directory next to ``out``.

    Each file is fsynced; the JSON files are written first, so the directory fsync the Rust
    writer makes after placing the weights also makes their entries durable.
    """
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        # mkdtemp makes it private (0700); a server running as another user must read it.
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
    except OSError as e:
        raise Rank1IOError(f"{out}: cannot write the adapter: {e.strerror or e}") from e
    try:
        write_json(tmp / CONFIG_FILE, plan.config)
        write_json(tmp / INFO_FILE, plan.info)
        try:
            _core.write_lora(
                os.fspath(tmp / WEIGHTS_FILE),
                plan.modules,
                plan.directions,
                plan.vectors,
                scale=opts.scale,
                rank=opts.rank,
                dtype=opts.dtype,
                metadata=_weights_metadata(plan.info),
                extra=plan.extra or None,
            )
        except InvalidArgumentError as e:
            raise AdapterError(f"{out}: {e}") from e
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # The reason without the temporary path (the Rust writer's message ends with it).
        reason = e.strerror or str(e).rsplit(": ", 1)[-1]
        raise Rank1IOError(f"{out}: cannot write the adapter: {reason}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _weights_metadata(info: dict[str, Any]) -> dict[str, str]:
    return {
        "format": "pt",
        "rank1fast": json.dumps(
            {"method": info["method"], "scale": info["scale"], "sites": list(info["sites"])}
        ),
    }


_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "mistral",
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "gemma3_text": "gemma",
}


def _model_type(manifest: dict[str, Any], base_model: str | None) -> str | None:
    """The model family for configs that must name it (Workers AI): from the dump, else
    from the base model's name."""
    model = manifest.get("model")
    kind = model.get("type") if isinstance(model, dict) else None
    if isinstance(kind, str) and kind.lower() in _MODEL_TYPES:
        return _MODEL_TYPES[kind.lower()]
    name = (base_model or "").lower().rsplit("/", 1)[-1]
    return next((t for t in ("mistral", "gemma", "llama") if t in name), None)


#: Each site report's sink-pinned direction, per SINK_PIN_MAX_COST. It depends only on the
#: report's statistics and costs a d x d solve (seconds at d = 4096), so every write_adapter
#: and write_adapters call on the same report shares one.
_PINNED: weakref.WeakKeyDictionary[Any, dict[float, tuple[np.ndarray, dict[str, Any]]]] = (
    weakref.WeakKeyDictionary()
)


def _pinned(s: Any, b: np.ndarray, mu0: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`_pin` of a site's least-squares direction, computed once per report."""
    per_cost = _PINNED.setdefault(s, {})
    if SINK_PIN_MAX_COST not in per_cost:
        per_cost[SINK_PIN_MAX_COST] = _pin(s, b, mu0)
    pinned, info = per_cost[SINK_PIN_MAX_COST]
    return pinned, dict(info)


def _pin(s: Any, b: np.ndarray, mu0: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """The ridge least-squares direction constrained to ``b·mu0 = 1``, when affordable.

    Returns the direction to use and what was decided: the constrained fit is used only when
    its in-sample rms error on ordinary tokens is at most SINK_PIN_MAX_COST times the
    unconstrained one (on the default model: yes at layer 5, where it helps; no at layers 15
    and 25, where the sink is so far from ordinary tokens that pinning triples the error).
    """
    before = float(b @ mu0)
    info: dict[str, Any] = {"pinned": False, "b_dot_sink": before}
    g, direction = s.second_moment, s.direction
    if g is None or direction is None:
        return b, info
    d = g.shape[0]
    g_r = g.copy()  # G + λ·tr(G)/d·I without a second d x d temporary
    g_r.flat[:: d + 1] += direction.ridge * np.trace(g) / d
    try:
        w = np.linalg.solve(g_r, mu0)
    except np.linalg.LinAlgError:
        return b, info
    denom = float(mu0 @ w)
    if not np.isfinite(denom) or denom <= 0:
        return b, info
    pinned = b + (1.0 - before) / denom * w
    mean = s.mean

    def rms(x: np.ndarray) -> float:
        return float(np.sqrt(max(float(x @ g @ x - 2.0 * x @ mean + 1.0), 0.0)))

    info.update(rms_error=rms(b), rms_error_pinned=rms(pinned))
    if info["rms_error_pinned"] <= SINK_PIN_MAX_COST * info["rms_error"]:
        info["pinned"] = True
        return pinned, info
    return b, info


def _check_residual_widths(sites: dict[str, dict[str, Any]]) -> None:
    """resid_mid and resid_post vectors all live in the residual stream: one width."""
    widths = {site: s["d_out"] for site, s in sites.items() if _RESID.match(site)}
    if len(set(widths.values())) > 1:
        detail = ", ".join(f"{k}: {v}" for k, v in widths.items())
        raise AdapterError(
            "residual-stream sites need vectors of one size (the model's hidden size); "
            f"got {detail}"
        )


def _manifest(report: Report) -> dict[str, Any]:
    """The dump manifest the report was analysed from, when it is still there."""
    if not report.source:
        return {}
    path = Path(report.source) / MANIFEST
    try:
        doc = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _expected_out_dim(manifest: dict[str, Any], site: str) -> int | None:
    """The output size of a site's module, when the manifest records it.

    A site entry may carry ``out_dim``/``d_out``; otherwise the model's hidden size (for
    resid_* sites, whose modules write the residual stream).
    """
    entry = (
        manifest.get("sites", {}).get(site, {}) if isinstance(manifest.get("sites"), dict) else {}
    )
    for key in ("out_dim", "d_out", "output_dim"):
        if isinstance(entry.get(key), int):
            return int(entry[key])
    if _RESID.match(site):
        model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
        for key in ("hidden_size", "d_model", "n_embd"):
            for where in (
                model,
                model.get("config") if isinstance(model.get("config"), dict) else {},
            ):
                if isinstance(where.get(key), int):
                    return int(where[key])
    return None


def _manifest_model_name(manifest: dict[str, Any]) -> str | None:
    model = manifest.get("model")
    if isinstance(model, str):
        return model
    if isinstance(model, dict):
        if str(model.get("name", "")).startswith("default"):
            return DEFAULT_BASE_MODEL
        for key in ("name_or_path", "name", "id", "path", "source"):
            if isinstance(model.get(key), str) and model[key]:
                return model[key]
    return None


# --------------------------------------------------------------------------- files


def _task_type(manifest: dict[str, Any], recorded: str | None = None) -> str:
    """PEFT's task type: ``FEATURE_EXTRACTION`` for a model without an LM head (an encoder
    loaded as ``AutoModel``, which ``PeftModelForCausalLM`` would call with ``labels``), from
    the dump's manifest or else the report's ``task_type`` (in-memory statistics, convert)."""
    model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    task = model.get("task_type") or recorded
    return task if task in ("CAUSAL_LM", "FEATURE_EXTRACTION") else "CAUSAL_LM"


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists() and not out.is_symlink():
        return
    # What is never replaced is said first: offering overwrite there would only refuse again.
    if not out.is_dir() or out.is_symlink():
        raise AdapterError(f"{out} exists and is not a directory; refusing to replace it")
    if any(out.iterdir()) and not (out / CONFIG_FILE).is_file():
        raise AdapterError(
            f"{out} is a non-empty directory that is not an adapter; refusing to replace it"
        )
    if not overwrite:
        raise AdapterError(f"{out} already exists; pass overwrite=True to replace it")


def _replace_dir(tmp: Path, out: Path, overwrite: bool, sync: bool = True) -> None:
    """Move the finished ``tmp`` to ``out`` (replacing an old adapter when allowed); ``sync``:
    fsync the parent directory (write_adapters does it once for all)."""
    if out.exists():
        _check_out(out, overwrite)
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / "adapter")
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(old / "adapter", out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        try:
            os.rename(tmp, out)
        except OSError as e:
            raise AdapterError(f"{out}: cannot create the adapter directory: {e}") from e
    if sync:
        fsync_dir(out.parent)


# --------------------------------------------------------------------------- CLI


def load_report(path: str | os.PathLike[str], **analyze_kwargs: Any) -> Report:
    """A report from a ``.npz`` saved by :meth:`Report.save`, or by analysing a dump/file.

    Example:
        >>> report = load_report("report.npz")                      # doctest: +SKIP
    """
    p = Path(path)
    if p.suffix == ".npz" and p.is_file():
        return Report.load(p)
    from .analysis import analyze

    return analyze(p, **analyze_kwargs)


def add_cli(sub: Any) -> None:
    """Register ``rank1fast write``."""
    p = sub.add_parser(
        "write",
        help="write a rank-1 PEFT LoRA adapter from steering vectors",
        description="Write a PEFT LoRA adapter directory (adapter_config.json + "
        "adapter_model.safetensors) that adds scale*v at each site of VECTORS, with lora_A the "
        "site's constant direction from the report.",
    )
    p.add_argument("report", help="a report .npz (rank1fast analyze --save) or a dump to analyze")
    p.add_argument("vectors", help="vector file (.safetensors, .npy, .pt, control-vector .gguf)")
    p.add_argument("-o", "--out", required=True, help="the adapter directory to create")
    p.add_argument(
        "--site",
        action="append",
        dest="sites",
        metavar="S",
        help="use only these sites of the vector file (repeatable)",
    )
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--method", choices=METHODS, default="least-squares")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--base-model", default=None)
    p.add_argument(
        "--for",
        dest="target",
        choices=list(PROFILES),
        default="peft",
        metavar="PROFILE",
        help=f"the server the adapter is for ({', '.join(PROFILES)}; default peft): pads the "
        "rank to one it takes and refuses what it would reject",
    )
    p.add_argument(
        "--no-pin-sink",
        action="store_true",
        help="do not pin b.x = 1 on the skipped first positions",
    )
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_run_write)


def _run_write(args: Any) -> int:
    from .vectors import load_sites

    vecs = load_sites(args.vectors, args.sites)
    report = load_report(args.report, sites=list(vecs), progress=False)
    out = write_adapter(
        report,
        vecs,
        args.out,
        scale=args.scale,
        rank=args.rank,
        method=args.method,
        dtype=args.dtype,
        base_model=args.base_model,
        overwrite=args.overwrite,
        pin_sink=not args.no_pin_sink,
        target=args.target,
    )
    info = read_adapter_info(out) or {}
    for site, s in info.get("sites", {}).items():
        print(
            f"{site}: {s['module']}  [{s['d_out']} x {s['d_in']}]  "
            f"direction error {s['direction_error']:.4f}"
        )
    from .serving import check

    for problem in check(out, args.target):  # only warnings can remain (errors were refused)
        print(f"{problem.severity}: {problem.message}")
    print(f"wrote {out} (r = {info.get('rank')}, for {PROFILES[args.target].server})")
    return 0
