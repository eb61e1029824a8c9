"""``rank1fast.explain``: read any LoRA as steering.

A LoRA on a linear module adds ``ΔW x = s·B A x`` to the module's output (``A`` ``[r, d_in]``,
``B`` ``[d_out, r]``, ``s`` PEFT's scaling). Over the inputs ``x`` of a dump, with ``μ = E[x]``
and ``G = E[x xᵀ]`` (the analysis' first and second moments, so no second pass is needed):

- the **vector** ``E[ΔW x] = s·B A μ``: the steering vector the adapter adds on average, in the
  module's output space (the residual stream at the site);
- the **constant fraction** ``‖E[ΔW x]‖² / E[‖ΔW x‖²] = ‖s·B A μ‖² / (s² tr(BᵀB · A G Aᵀ))``:
  1 for a pure steering vector (an adapter from :func:`rank1fast.write_adapter`, whose ``A`` is
  the constant direction ``b`` with ``b·x ≈ 1``), small for an edit that depends on the input;
- per rank-1 component ``k`` (``A`` row ``a_k``, ``B`` column ``β_k``): ``E[a_k·x] = a_k·μ``,
  its standard deviation ``sqrt(a_k G a_kᵀ − (a_k·μ)²)``, the constant share
  ``(a_k·μ)² / E[(a_k·x)²]``, the share of the module's ``E‖ΔW x‖²`` this component carries alone,
  and the cosine of ``a_k`` with the site's constant direction ``b`` and with the top outlier
  dimensions. (Components are the adapter's stored factors: ``B R⁻¹, R A`` is the same LoRA for
  any invertible ``R``; the vector and the constant fraction do not depend on the choice.)

The token-level part reads the dump's rows once more (``A x`` for every row, ``r·d_in``
multiply-adds a row): the tokens where ``a_k·x`` is largest and smallest, shown in context
(dumps record token ids since they were added to :func:`rank1fast.collect`; older dumps give the
document and position only), ``a_k·x`` by position and its histogram (plotted by
:meth:`Explanation.plot`).

Which tokens count: those the report counts, i.e. position ``>= skip_positions`` (default 1:
the first token, the attention sink, is left out, as ``rank1fast analyze`` does). The plots by
position show every position.

:func:`lora_to_vectors` gives the vectors alone (``{site: vector}``, the reverse of
:func:`rank1fast.write_adapter`), and :func:`vector_share` measures with
:func:`rank1fast.verify` how much of the adapter's effect on the next-token distribution hook
steering with those vectors reproduces.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._manifest import MANIFEST
from ._peft import lora_pairs, peft_scaling, read_peft
from .errors import AdapterError, DumpError, InvalidArgumentError, PathNotFoundError, Rank1Error
from .report import Report, SiteReport

__all__ = [
    "explain",
    "lora_to_vectors",
    "vector_share",
    "Explanation",
    "SiteExplanation",
    "Component",
    "TokenStats",
    "TokenInContext",
    "VectorShare",
    "add_cli",
]

#: Rows of a shard turned into ``A x`` at a time (float64: 16k rows x 4096 dims = 512 MiB).
_CHUNK_ROWS = 16384
#: Bins of the ``a·x`` histogram, over the mean ± this many standard deviations (from the
#: moments); values beyond fall in the end bins.
_HIST_BINS, _HIST_SDS = 60, 6.0
#: Outlier dimensions whose cosine with each A row is reported.
_OUTLIERS_SHOWN = 3


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class TokenInContext:
    """One token of the dump and the text around it.

    Attributes:
        value: ``a_k·x`` at this token.
        document: its document index in the dump.
        position: its position in that document.
        token: its token id, or None (a dump written before token ids were recorded).
        text: the context, the token itself marked ``[[...]]`` (None without token ids or a
            tokenizer).
    """

    value: float
    document: int
    position: int
    token: int | None
    text: str | None


@dataclass(frozen=True)
class TokenStats:
    """``a_k·x`` over the dump's rows (the token pass).

    Attributes:
        count: counted rows (position ``>= skip_positions``).
        by_position: float64 ``[P, 3]``: per position ``p`` (every position, skipped ones
            included): number of rows, mean and standard deviation of ``a_k·x``.
        histogram: ``(counts [bins], edges [bins + 1])`` of ``a_k·x`` over the counted rows;
            values beyond the edges are counted in the end bins.
        top: the counted tokens with the largest ``a_k·x``, largest first.
        bottom: those with the smallest, smallest first.
    """

    count: int
    by_position: np.ndarray = field(repr=False)
    histogram: tuple[np.ndarray, np.ndarray] = field(repr=False)
    top: list[TokenInContext]
    bottom: list[TokenInContext]


@dataclass(frozen=True)
class Component:
    """One rank-1 component ``s·β_k (a_k·x)`` of a LoRA.

    Attributes:
        index: ``k``, the row of ``lora_A`` / column of ``lora_B``.
        mean: ``E[a_k·x]``.
        std: standard deviation of ``a_k·x`` over the counted tokens.
        constant_share: ``(a_k·μ)² / E[(a_k·x)²]``: 1 when ``a_k·x`` is the same on every
            token (a steering vector), near 0 when it averages out.
        energy_share: ``E‖s·β_k (a_k·x)‖² / E‖ΔW x‖²``: this component's part of the module's
            output energy on its own (components that are not orthogonal can sum to more or
            less than 1).
        cosine_direction: cosine of ``a_k`` with the site's least-squares constant direction
            ``b`` (signed), None when the report has none.
        cosine_outliers: ``{dim: cosine of a_k with e_dim}`` for the site's top outlier
            dimensions (empty for a zero row).
        tokens: the token pass (None when it was not run).
    """

    index: int
    mean: float
    std: float
    constant_share: float
    energy_share: float
    cosine_direction: float | None
    cosine_outliers: dict[int, float]
    tokens: TokenStats | None = None


@dataclass(frozen=True)
class SiteExplanation:
    """One LoRA module read as steering at its site.

    Attributes:
        site: the dump's site name.
        module: the module path the LoRA adapts.
        rank: ``r``.
        scaling: PEFT's ``s`` (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA).
        count: tokens of the moments (position ``>= skip_positions``).
        vector: ``E[ΔW x] = s·B A μ``, float64 ``[d_out]``.
        constant_fraction: ``‖E[ΔW x]‖² / E[‖ΔW x‖²]``.
        mean_norm: ``‖E[ΔW x]‖``.
        rms_norm: ``sqrt(E[‖ΔW x‖²])``.
        components: one :class:`Component` per rank.
    """

    site: str
    module: str
    rank: int
    scaling: float
    count: int
    vector: np.ndarray = field(repr=False)
    constant_fraction: float
    mean_norm: float
    rms_norm: float
    components: list[Component]

    def summary(self) -> dict[str, Any]:
        """A JSON-ready dict (the vector as a list)."""

        def tokens(t: TokenStats | None) -> Any:
            if t is None:
                return None
            return {
                "count": t.count,
                "top": [_token_json(x) for x in t.top],
                "bottom": [_token_json(x) for x in t.bottom],
            }

        return {
            "site": self.site,
            "module": self.module,
            "rank": self.rank,
            "scaling": self.scaling,
            "count": self.count,
            "constant_fraction": _num(self.constant_fraction),
            "mean_norm": _num(self.mean_norm),
            "rms_norm": _num(self.rms_norm),
            "vector": self.vector.tolist(),
            "components": [
                {
                    "index": c.index,
                    "mean": _num(c.mean),
                    "std": _num(c.std),
                    "constant_share": _num(c.constant_share),
                    "energy_share": _num(c.energy_share),
                    "cosine_direction": None
                    if c.cosine_direction is None
                    else _num(c.cosine_direction),
                    "cosine_outliers": {str(k): _num(v) for k, v in c.cosine_outliers.items()},
                    "tokens": tokens(c.tokens),
                }
                for c in self.components
            ],
        }


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _token_json(t: TokenInContext) -> dict[str, Any]:
    return {
        "value": t.value,
        "document": t.document,
        "position": t.position,
        "token": t.token,
        "text": t.text,
    }


@dataclass
class Explanation:
    """The result of :func:`explain`: one :class:`SiteExplanation` per LoRA module in the dump.

    ``str(explanation)`` is a readable table; :meth:`to_json` a JSON-ready dict; :meth:`plot`
    writes PNG plots; :attr:`vectors` the steering part as ``{site: vector}``.

    Attributes:
        adapter: the adapter read.
        source: the dump (or report) the inputs came from.
        skip_positions: tokens at position < this were left out of every figure.
        sites: the explained modules, in the adapter's order.
        unmatched: adapter modules with no site in the dump (not explained).
        corrections: modules that hold downstream corrections (:mod:`rank1fast.corrections`,
            recorded in the adapter's ``rank1fast.json``): terms fitted to cancel the steering
            adapter's per-token error, not steering of their own.

    Example:
        >>> ex = rank1fast.explain("trained-lora", "dump/")        # doctest: +SKIP
        >>> ex["resid_mid.15"].constant_fraction                    # doctest: +SKIP
        0.31
    """

    adapter: str
    source: str | None
    skip_positions: int
    sites: list[SiteExplanation] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    corrections: list[str] = field(default_factory=list)

    @property
    def vectors(self) -> dict[str, np.ndarray]:
        """``{site: E[ΔW x]}``: the steering vectors the adapter adds on average."""
        return {s.site: s.vector for s in self.sites}

    def __getitem__(self, site: str) -> SiteExplanation:
        for s in self.sites:
            if site in (s.site, s.module):
                return s
        raise InvalidArgumentError(
            f"no site {site!r} in this explanation; it has {', '.join(s.site for s in self.sites)}"
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (what ``rank1fast explain --json`` writes)."""
        return {
            "adapter": self.adapter,
            "source": self.source,
            "skip_positions": self.skip_positions,
            "sites": [s.summary() for s in self.sites],
            "unmatched": self.unmatched,
            "corrections": self.corrections,
        }

    def plot(self, directory: str | os.PathLike[str]) -> list[Path]:
        """Write one PNG per site: per component, ``a_k·x`` by position (mean ± 1 sd) and its
        histogram over the counted tokens.

        Args:
            directory: where to write ``<site>.png`` (created if missing).

        Returns:
            The files written.

        Raises:
            InvalidArgumentError: matplotlib is not installed (``pip install matplotlib``), or
                the explanation was made without the token pass (``tokens=False``, or a
                source that is not a dump directory).

        Example:
            >>> ex.plot("plots/")                                    # doctest: +SKIP
            [PosixPath('plots/resid_mid.15.png')]
        """
        if any(c.tokens is None for s in self.sites for c in s.components):
            raise InvalidArgumentError(
                "no token pass to plot: explain a dump directory with tokens=True"
            )
        try:  # Figure, not pyplot: no global state, no backend switch in the caller's session
            from matplotlib.figure import Figure
        except ImportError as e:
            raise InvalidArgumentError(
                "plots need matplotlib: pip install matplotlib (or 'rank1fast[plot]')"
            ) from e
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for s in self.sites:
            n = len(s.components)
            fig = Figure(figsize=(11, 2.6 * n + 0.6))
            axes = fig.subplots(n, 2, squeeze=False)
            for c, (ax_pos, ax_hist) in zip(s.components, axes):
                t = c.tokens
                assert t is not None
                count, mean, sd = t.by_position.T
                pos = np.flatnonzero(count > 0)
                ax_pos.plot(pos, mean[pos], lw=1, color="C0", label="mean")
                ax_pos.fill_between(
                    pos, mean[pos] - sd[pos], mean[pos] + sd[pos], color="C0", alpha=0.25
                )
                if self.skip_positions > 0:
                    ax_pos.axvspan(-0.5, self.skip_positions - 0.5, color="0.85", label="skipped")
                ax_pos.set_xlabel("position")
                ax_pos.set_ylabel(f"a{c.index}·x")
                ax_pos.set_title(
                    f"component {c.index}: constant share {c.constant_share:.3f}", fontsize=9
                )
                counts, edges = t.histogram
                ax_hist.stairs(counts, edges, fill=True, color="C1")
                ax_hist.axvline(c.mean, color="k", lw=0.8)
                ax_hist.set_xlabel(f"a{c.index}·x (positions >= {self.skip_positions})")
                ax_hist.set_ylabel("tokens")
            fig.suptitle(
                f"{s.site} ({s.module}): constant fraction {s.constant_fraction:.3f}", fontsize=10
            )
            fig.tight_layout()
            path = out / f"{s.site}.png"
            fig.savefig(path, dpi=90)
            written.append(path)
        return written

    def __str__(self) -> str:
        head = ["site", "module", "r", "tokens", "‖E[ΔWx]‖", "rms ‖ΔWx‖", "constant fraction"]
        rows = [head]
        for s in self.sites:
            rows.append(
                [
                    s.site,
                    s.module,
                    str(s.rank),
                    f"{s.count:,}",
                    f"{s.mean_norm:.4g}",
                    f"{s.rms_norm:.4g}",
                    _fmt(s.constant_fraction),
                ]
            )
        lines = [
            f"{self.adapter} read as steering over {self.source} "
            f"(positions >= {self.skip_positions})",
            *_table(rows),
        ]
        for s in self.sites:
            lines.append("")
            lines.append(f"{s.site}: components")
            crow = [
                ["k", "E[a·x]", "sd", "constant share", "energy share", "cos(a, b)", "outliers"]
            ]
            for c in s.components:
                crow.append(
                    [
                        str(c.index),
                        f"{c.mean:.4g}",
                        f"{c.std:.4g}",
                        _fmt(c.constant_share),
                        _fmt(c.energy_share),
                        "-" if c.cosine_direction is None else f"{c.cosine_direction:+.3f}",
                        ", ".join(f"{d}: {v:+.3f}" for d, v in c.cosine_outliers.items()) or "-",
                    ]
                )
            lines += ["  " + x for x in _table(crow)]
            for c in s.components:
                if c.tokens is None or not c.energy_share > 0:
                    continue  # no token pass, or a zero component (rank padding)
                for label, toks in (("largest", c.tokens.top), ("smallest", c.tokens.bottom)):
                    lines.append(f"  component {c.index}, {label} a·x:")
                    for t in toks:
                        where = t.text if t.text is not None else f"token {t.token}"
                        lines.append(
                            f"    {t.value:+10.4g}  doc {t.document} pos {t.position}: {where}"
                        )
        if self.unmatched:
            lines.append("")
            lines.append("not in the dump (not explained): " + ", ".join(self.unmatched))
        if self.corrections:
            lines.append(
                "downstream corrections (fitted by rank1fast.convert to cancel the adapter's "
                "per-token error; components after the first on a site's own module): "
                + ", ".join(self.corrections)
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Explanation(adapter={self.adapter!r}, sites={[s.site for s in self.sites]!r})"


def _fmt(x: float) -> str:
    return f"{x:.4f}" if math.isfinite(x) else "-"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


# --------------------------------------------------------------------------- reading adapters


@dataclass(frozen=True)
class _Lora:
    module: str
    a: np.ndarray  # [r, d_in] float64
    b: np.ndarray  # [d_out, r] float64
    scaling: float


@contextlib.contextmanager
def _peft_dir(
    adapter: str | os.PathLike[str], base: str | os.PathLike[str] | None
) -> Iterator[Path]:
    """The adapter as a PEFT directory: itself, or a llama.cpp LoRA GGUF converted into a
    temporary one by :func:`rank1fast.llamacpp.gguf_to_lora`."""
    path = Path(adapter)
    if not path.exists():
        raise PathNotFoundError(f"{path}: no such adapter")
    if path.is_file() and path.suffix.lower() == ".gguf":
        from .llamacpp import gguf_to_lora

        with tempfile.TemporaryDirectory(prefix="rank1fast-explain-") as tmp:
            yield gguf_to_lora(path, Path(tmp) / "lora", base=base)
        return
    if not path.is_dir():
        raise AdapterError(f"{path}: not a PEFT adapter directory or a llama.cpp LoRA .gguf")
    yield path


def _read_loras(path: Path) -> list[_Lora]:
    """Every LoRA module of a PEFT adapter directory, with PEFT's scaling."""
    config, tensors = read_peft(path)
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterError(f"{path}: peft_type {config.get('peft_type')!r}; only LoRA is read")
    if config.get("use_dora"):
        raise AdapterError(
            f"{path}: a DoRA adapter (use_dora) rescales the weight's columns; it is not B A x"
        )
    pairs = lora_pairs(
        tensors,
        path,
        "explain reads LoRAs of linear modules only: no embeddings, biases or modules_to_save",
    )
    out = []
    for module, (a, b) in pairs.items():
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise AdapterError(f"{path}: module {module}: non-finite LoRA weights")
        out.append(_Lora(module, a, b, float(peft_scaling(config, module))))
    return out


def _same_module(a: str, b: str) -> bool:
    """Module paths that name the same module (one may carry a wrapper prefix)."""
    return a == b or a.endswith("." + b) or b.endswith("." + a)


# --------------------------------------------------------------------------- explain


def explain(
    adapter: str | os.PathLike[str],
    source: Report | str | os.PathLike[str],
    *,
    sites: Sequence[str] | str | None = None,
    dump: str | os.PathLike[str] | None = None,
    skip_positions: int = 1,
    tokens: bool = True,
    top: int = 10,
    context: int = 8,
    tokenizer: Any = None,
    base: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
) -> Explanation:
    """Read every LoRA module of an adapter as steering: its mean vector, how constant it is,
    and which tokens gate it.

    Args:
        adapter: a PEFT LoRA adapter directory (any, not only rank1fast's) or a llama.cpp LoRA
            ``.gguf`` (read through :func:`rank1fast.llamacpp.gguf_to_lora`).
        source: the inputs: a dump directory (analysed here for the adapter's sites), a
            saved report (``.npz``) or a :class:`~rank1fast.Report` with second moments. Its
            sites are matched to the adapter's modules by the dump manifest's module paths
            (a site named by its module path matches itself).
        sites: explain only these sites (default: every adapter module the dump has).
        dump: the dump directory for the token pass when ``source`` is a report (default: the
            report's own source, when that is a dump directory).
        skip_positions: with a dump directory as ``source``: leave out tokens at position < k
            (default 1, the first token, as ``rank1fast analyze``). A report keeps its own.
        tokens: run the token pass (top/bottom tokens, ``a·x`` by position, histograms).
        top: tokens listed per component and side.
        context: tokens of context shown on each side.
        tokenizer: decodes token ids: a tokenizer, a model name or path for
            :func:`rank1fast.models.load_tokenizer`, or None (the model named in the dump's
            manifest; when that cannot be loaded, ids only, with a warning). Loaded only when
            the dump has token ids and ``top > 0``.
        base: for a llama.cpp LoRA on q/k projections: the base model (see
            :func:`rank1fast.llamacpp.gguf_to_lora`).
        progress: a progress bar for the analysis and the token pass (None: on a terminal).

    Returns:
        An :class:`Explanation`.

    Raises:
        PathNotFoundError: ``adapter`` or ``source`` does not exist.
        AdapterError: not a LoRA adapter (DoRA, non-LoRA tensors, a lone lora_A/lora_B), or
            a LoRA whose input width differs from its site's.
        InvalidArgumentError: no adapter module has a site in the source, an unknown site in
            ``sites``, or a report without second moments.
        DumpError: an unreadable dump.

    Example:
        >>> ex = rank1fast.explain("trained-lora", "dump/", top=5)   # doctest: +SKIP
        >>> print(ex)                                                # doctest: +SKIP
    """
    if isinstance(sites, str):
        sites = [sites]
    if top < 0 or context < 0:
        raise InvalidArgumentError(f"top and context must be >= 0, got {top} and {context}")
    with _peft_dir(adapter, base) as path:
        loras = _read_loras(path)
        from .adapter import read_adapter_info

        corrected = sorted((read_adapter_info(path) or {}).get("corrections") or {})
    report, dump_dir = _inputs(source, loras, sites, dump, skip_positions, progress)

    for name in sites or ():
        if name not in report:
            raise InvalidArgumentError(
                f"site {name!r} is not in {report.source or 'the report'}; it has "
                + ", ".join(report.sites)
            )
    matched: list[tuple[SiteReport, _Lora]] = []
    unmatched = []
    for lora in loras:
        site = next(
            (
                s
                for s in report
                if _same_module(report.modules.get(s.name, s.name), lora.module)
                and (sites is None or s.name in sites)
            ),
            None,
        )
        if site is None:
            unmatched.append(lora.module)
        else:
            matched.append((site, lora))
    if not matched:
        have = ", ".join(f"{s.name} ({report.modules.get(s.name, s.name)})" for s in report)
        chosen = f" among sites {list(sites)}" if sites else ""
        raise InvalidArgumentError(
            f"{adapter}: none of its modules ({', '.join(lo.module for lo in loras)}) is a "
            f"site of {report.source or 'the report'}{chosen}; it has {have}"
        )

    explained = [_explain_site(s, lora, report.modules.get(s.name, s.name)) for s, lora in matched]
    if tokens and dump_dir is not None:
        explained = _token_pass(
            dump_dir, matched, explained, report.skip_positions, top, context, tokenizer, progress
        )
    return Explanation(
        adapter=os.fspath(adapter),
        source=report.source if dump_dir is None else os.fspath(dump_dir),
        skip_positions=report.skip_positions,
        sites=explained,
        unmatched=unmatched,
        corrections=corrected,
    )


def _inputs(
    source: Report | str | os.PathLike[str],
    loras: list[_Lora],
    sites: Sequence[str] | None,
    dump: str | os.PathLike[str] | None,
    skip_positions: int,
    progress: bool | None,
) -> tuple[Report, Path | None]:
    """The report to read moments from, and the dump directory for the token pass (or None)."""
    from .analysis import analyze
    from .collect import Dump

    if isinstance(source, Report):
        report = source
    else:
        path = Path(source)
        if not path.exists():
            raise PathNotFoundError(f"{path}: no such dump or report")
        if path.is_file() and path.suffix.lower() == ".npz":
            report = Report.load(path)
        else:
            wanted: list[str] | None = list(sites) if sites else None
            if wanted is None and (path / MANIFEST).is_file():
                manifest = Dump.open(path).sites
                wanted = [
                    s
                    for s, m in manifest.items()
                    if any(_same_module(m, lo.module) for lo in loras)
                ] or None
            report = analyze(
                path,
                sites=wanted,
                skip_positions=skip_positions,
                progress=False if progress is None else progress,
            )
    dump_dir = Path(dump) if dump is not None else Path(report.source) if report.source else None
    if dump_dir is not None and not (dump_dir / MANIFEST).is_file():
        if dump is not None:
            raise DumpError(f"{dump_dir}: not a dump directory (no manifest.json)")
        dump_dir = None
    return report, dump_dir


def _explain_site(s: SiteReport, lora: _Lora, module: str) -> SiteExplanation:
    g, mu = s.second_moment, s.moment_mean
    if g is None or mu is None:
        raise InvalidArgumentError(
            f"site {s.name}: the report has no second moments (analysed with "
            "second_moments=False, or no tokens); explain needs E[x xᵀ]"
        )
    a, b, c = lora.a, lora.b, lora.scaling
    if a.shape[1] != s.dim:
        raise AdapterError(
            f"{lora.module}: lora_A takes {a.shape[1]} inputs but site {s.name} has dim {s.dim}"
        )
    a_mu = a @ mu  # [r]
    aga = a @ g @ a.T  # [r, r]: E[(A x)(A x)ᵀ]
    btb = b.T @ b  # [r, r]
    vector = c * (b @ a_mu)
    mean_energy = float(vector @ vector)
    total_energy = float(c * c * np.sum(btb * aga))
    fraction = mean_energy / total_energy if total_energy > 0 else math.nan
    direction = s.direction  # warns RankDeficientWarning for singular second moments
    outliers = [o.dim for o in s.outliers[:_OUTLIERS_SHOWN]]
    components = []
    for k in range(a.shape[0]):
        row = a[k]
        norm = float(np.linalg.norm(row))
        second = float(aga[k, k])
        mean = float(a_mu[k])
        energy = c * c * float(btb[k, k]) * second
        cos_b = None
        if direction is not None and norm > 0:
            bn = float(np.linalg.norm(direction.vector))
            cos_b = float(row @ direction.vector) / (norm * bn) if bn > 0 else None
        components.append(
            Component(
                index=k,
                mean=mean,
                std=math.sqrt(max(second - mean * mean, 0.0)),
                constant_share=mean * mean / second if second > 0 else math.nan,
                energy_share=energy / total_energy if total_energy > 0 else math.nan,
                cosine_direction=cos_b,
                cosine_outliers={j: float(row[j]) / norm for j in outliers} if norm > 0 else {},
            )
        )
    return SiteExplanation(
        site=s.name,
        module=module,
        rank=int(a.shape[0]),
        scaling=c,
        count=s.moment_count,
        vector=vector,
        constant_fraction=fraction,
        mean_norm=math.sqrt(mean_energy),
        rms_norm=math.sqrt(max(total_energy, 0.0)),
        components=components,
    )


# --------------------------------------------------------------------------- token pass


class _Extremes:
    """The ``top`` largest (or smallest) values seen, with their contexts."""

    def __init__(self, top: int, largest: bool) -> None:
        self.top, self.sign = top, 1.0 if largest else -1.0
        self.items: list[tuple[float, TokenInContext]] = []

    def candidates(self, values: np.ndarray, counted: np.ndarray) -> np.ndarray:
        """Row indices (of ``values``) that may enter the list."""
        idx = np.flatnonzero(counted)
        if self.top == 0 or len(idx) == 0:
            return idx[:0]
        key = self.sign * values[idx]
        if len(idx) > self.top:
            idx = idx[np.argpartition(-key, self.top - 1)[: self.top]]
        return idx

    def add(self, value: float, item: TokenInContext) -> None:
        self.items.append((self.sign * value, item))
        self.items.sort(key=lambda x: -x[0])
        del self.items[self.top :]

    def result(self) -> list[TokenInContext]:
        return [it for _, it in self.items]


def _token_pass(
    dump_dir: Path,
    matched: list[tuple[SiteReport, _Lora]],
    explained: list[SiteExplanation],
    skip: int,
    top: int,
    context: int,
    tokenizer: Any,
    progress: bool | None,
) -> list[SiteExplanation]:
    """``A x`` for every row of the dump: extremes in context, by position, histograms."""
    import torch
    from safetensors import SafetensorError, safe_open

    from ._progress import iter_progress
    from .collect import Dump

    shards = Dump.open(dump_dir).shards
    acc = []
    for (_s, lora), ex in zip(matched, explained):
        r = lora.a.shape[0]
        edges = [
            np.linspace(c.mean - _HIST_SDS * c.std, c.mean + _HIST_SDS * c.std, _HIST_BINS + 1)
            if c.std > 0
            else np.linspace(c.mean - 1, c.mean + 1, _HIST_BINS + 1)
            for c in ex.components
        ]
        acc.append(
            {
                "a": torch.from_numpy(lora.a.T.copy()),  # [d_in, r] float64
                "count": [0] * r,
                "pos": [np.zeros((0, 3)) for _ in range(r)],  # per position: n, sum, sum of sq
                "edges": edges,
                "hist": [np.zeros(_HIST_BINS) for _ in range(r)],
                "top": [_Extremes(top, True) for _ in range(r)],
                "bottom": [_Extremes(top, False) for _ in range(r)],
            }
        )
    bar = iter_progress(progress, len(shards) * len(matched), "explain", unit="shard")
    missing_tokens = False
    decode: Any = None
    loaded = False
    try:
        for shard in shards:
            try:
                with safe_open(shard, framework="pt") as f:
                    keys = set(f.keys())
                    position = f.get_tensor("position").numpy().astype(np.int64)
                    document = f.get_tensor("document").numpy().astype(np.int64)
                    token = f.get_tensor("token").numpy() if "token" in keys else None
                    if token is not None and top > 0 and not loaded:  # only when needed
                        decode, loaded = _decoder(tokenizer, dump_dir), True
                    for (s, _lora), st in zip(matched, acc):
                        x = f.get_tensor(s.name)
                        ax = np.concatenate(
                            [
                                (x[i : i + _CHUNK_ROWS].to(torch.float64) @ st["a"]).numpy()
                                for i in range(0, x.shape[0], _CHUNK_ROWS)
                            ]
                        )  # [n, r]
                        _accumulate(st, ax, position, document, token, skip, context, decode)
                        bar.update(1)
            except (SafetensorError, OSError, KeyError) as e:
                if isinstance(e, Rank1Error):
                    raise
                raise DumpError(f"{shard}: cannot read it for the token pass: {e}") from e
            missing_tokens |= token is None
    finally:
        bar.close()
    if missing_tokens:
        warnings.warn(
            f"{dump_dir}: shards without token ids (collected before they were recorded): "
            "their tokens are listed by document and position only",
            stacklevel=3,
        )
    out = []
    for ex, st in zip(explained, acc):
        comps = []
        for k, c in enumerate(ex.components):
            pos = st["pos"][k]
            n = pos[:, 0]
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = np.where(n > 0, pos[:, 1] / np.maximum(n, 1), np.nan)
                var = np.where(n > 0, pos[:, 2] / np.maximum(n, 1) - mean**2, np.nan)
            by_position = np.stack([n, mean, np.sqrt(np.clip(var, 0, None))], axis=1)
            stats = TokenStats(
                count=st["count"][k],
                by_position=by_position,
                histogram=(st["hist"][k], st["edges"][k]),
                top=st["top"][k].result(),
                bottom=st["bottom"][k].result(),
            )
            comps.append(_replace(c, tokens=stats))
        out.append(_replace(ex, components=comps))
    return out


def _replace(obj: Any, **changes: Any) -> Any:
    from dataclasses import replace

    return replace(obj, **changes)


def _accumulate(
    st: dict[str, Any],
    ax: np.ndarray,
    position: np.ndarray,
    document: np.ndarray,
    token: np.ndarray | None,
    skip: int,
    context: int,
    decode: Any,
) -> None:
    counted = position >= skip
    size = int(position.max()) + 1 if len(position) else 0
    for k in range(ax.shape[1]):
        v = ax[:, k]
        pos = st["pos"][k]
        if pos.shape[0] < size:
            pos = np.vstack([pos, np.zeros((size - pos.shape[0], 3))])
        pos[:size, 0] += np.bincount(position, minlength=size)
        pos[:size, 1] += np.bincount(position, weights=v, minlength=size)
        pos[:size, 2] += np.bincount(position, weights=v * v, minlength=size)
        st["pos"][k] = pos
        st["count"][k] += int(counted.sum())
        edges = st["edges"][k]
        bins = np.clip(np.searchsorted(edges, v[counted], side="right") - 1, 0, len(edges) - 2)
        st["hist"][k] += np.bincount(bins, minlength=len(edges) - 1)
        for side in (st["top"][k], st["bottom"][k]):
            for i in side.candidates(v, counted):
                side.add(float(v[i]), _in_context(i, v, position, document, token, context, decode))


def _in_context(
    i: int,
    v: np.ndarray,
    position: np.ndarray,
    document: np.ndarray,
    token: np.ndarray | None,
    context: int,
    decode: Any,
) -> TokenInContext:
    tok = None if token is None else int(token[i])
    text = None
    if token is not None and decode is not None:
        lo, hi = max(0, i - context), min(len(token), i + context + 1)
        same = np.flatnonzero(document[lo:hi] == document[i]) + lo  # rows of this document
        before = [int(t) for t in token[same[same < i]]]
        after = [int(t) for t in token[same[same > i]]]
        text = (decode(before) + "[[" + decode([tok]) + "]]" + decode(after)).replace("\n", "⏎")
    return TokenInContext(
        value=float(v[i]),
        document=int(document[i]),
        position=int(position[i]),
        token=tok,
        text=text,
    )


def _decoder(tokenizer: Any, dump_dir: Path) -> Any:
    """A ``list[int] -> str`` for token ids, or None (with a warning) when none loads."""
    if tokenizer is not None and hasattr(tokenizer, "decode"):
        return tokenizer.decode
    name = tokenizer
    if name is None:
        try:
            model = json.loads((dump_dir / MANIFEST).read_text()).get("model", {})
            name = model.get("name") or None
        except (OSError, ValueError, AttributeError):
            name = None
        if isinstance(name, str) and name.startswith("default"):
            name = "default"
    if name is None:
        warnings.warn(f"{dump_dir}: no model recorded to decode token ids", stacklevel=4)
        return None
    from .models import load_tokenizer

    try:
        return load_tokenizer(name).decode
    except Exception as e:  # noqa: BLE001 - decoding is optional: ids are still listed
        if tokenizer is not None:
            raise
        warnings.warn(f"cannot load the tokenizer of {name} ({e}); token ids only", stacklevel=4)
        return None


# --------------------------------------------------------------------------- vectors


def lora_to_vectors(
    adapter: str | os.PathLike[str],
    source: Report | str | os.PathLike[str],
    *,
    sites: Sequence[str] | str | None = None,
    skip_positions: int = 1,
    base: str | os.PathLike[str] | None = None,
) -> dict[str, np.ndarray]:
    """The steering part of a LoRA: ``{site: E[ΔW x]}`` over the inputs of ``source``.

    The reverse of :func:`rank1fast.write_adapter`: hook steering with these vectors at their
    sites adds what the adapter adds on average (:func:`vector_share` measures how much of the
    adapter's effect that is). Save them with :func:`rank1fast.vectors.save` or, for
    ``resid_post`` sites, :func:`rank1fast.llamacpp.control_vector_to_gguf`.

    Args:
        adapter: a PEFT LoRA directory or llama.cpp LoRA ``.gguf``.
        source: a dump directory, report ``.npz`` or :class:`~rank1fast.Report` (see
            :func:`explain`).
        sites: only these sites.
        skip_positions: as for :func:`explain`.
        base: as for :func:`explain`.

    Returns:
        ``{site: vector}``, float64 ``[d_out]`` each.

    Raises:
        The errors of :func:`explain`.

    Example:
        >>> vecs = rank1fast.lora_to_vectors("trained-lora", "dump/")   # doctest: +SKIP
        >>> rank1fast.vectors.save(vecs, "trained.safetensors")        # doctest: +SKIP
    """
    ex = explain(
        adapter, source, sites=sites, skip_positions=skip_positions, tokens=False, base=base
    )
    return ex.vectors


@dataclass(frozen=True)
class VectorShare:
    """How much of an adapter's effect hook steering with its vector reproduces, at one site
    (or ``"all"``: every site at once).

    Attributes:
        site: the site, or ``"all"``.
        adapter_kl: mean ``KL(p_base || p_adapter)``, nats: what removing the adapter costs.
        residual_kl: mean ``KL(p_hook || p_adapter)``, nats: what replacing the adapter by hook
            steering with the vector costs.
        steering_kl: mean ``KL(p_hook || p_base)``, nats: how much the vector steers.
        ratio: ``residual_kl / adapter_kl``: the share of the adapter's effect the vector
            misses (0: the vector is the whole adapter; 1: no better than no adapter).
        share: ``1 − ratio``: the share of the adapter's effect the vector carries.
    """

    site: str
    adapter_kl: float
    residual_kl: float
    steering_kl: float
    ratio: float
    share: float


def vector_share(
    model: Any,
    adapter: str | os.PathLike[str],
    vectors: Mapping[str, Any],
    texts: Sequence[str] | str | os.PathLike[str] | None = None,
    *,
    max_length: int = 128,
    batch_size: int = 4,
    device: str | None = "auto",
    progress: bool | None = None,
) -> dict[str, VectorShare]:
    """Compare an adapter with hook steering by its vectors (from :func:`lora_to_vectors`).

    Two :func:`rank1fast.verify` runs on the same texts: with the vectors (``KL(p_hook ||
    p_adapter)``: what is left when the vector replaces the adapter) and with zero vectors
    (``KL(p_base || p_adapter)``: what is left when nothing replaces it). Their ratio is the
    share of the adapter's effect the vector misses. Each site is measured with the adapter
    active at that site only.

    Args:
        model: the base model: None for the default, a name/path, or a loaded
            ``(model, tokenizer)`` (see :func:`rank1fast.verify`).
        adapter: the adapter the vectors were read from (PEFT directory or llama.cpp LoRA
            ``.gguf``).
        vectors: ``{site: vector}``, as :func:`lora_to_vectors` returns them (the adapter's
            own output, so any scale recorded in its ``rank1fast.json`` is undone here).
        texts: evaluation texts (None: :func:`rank1fast.verify.default_eval_texts`).
        max_length: tokens per text.
        batch_size: texts per forward pass.
        device: where to run a model loaded here.
        progress: progress bars (None: on a terminal).

    Returns:
        ``{site: VectorShare}``, plus ``"all"`` with several sites.

    Raises:
        The errors of :func:`rank1fast.verify`.

    Example:
        >>> vecs = rank1fast.lora_to_vectors("trained-lora", "dump/")        # doctest: +SKIP
        >>> shares = rank1fast.vector_share(None, "trained-lora", vecs)      # doctest: +SKIP
        >>> shares["resid_mid.15"].share                                     # doctest: +SKIP
        0.42
    """
    from .adapter import read_adapter_info
    from .verify import verify

    if not vectors:
        raise InvalidArgumentError("no vectors to compare")
    common = {
        "max_length": max_length,
        "batch_size": batch_size,
        "device": device,
        "progress": progress,
    }
    from .models import load_model

    model = load_model(model, device=device)  # once for both runs
    with _peft_dir(adapter, None) as path:
        info = read_adapter_info(path)
        scale = float(info["scale"]) if info and "scale" in info else 1.0
        vecs = {str(s): np.asarray(v, dtype=np.float64) / scale for s, v in vectors.items()}
        zeros = {s: np.zeros_like(v) for s, v in vecs.items()}
        with_vector = verify(model, {"adapter": path}, vecs, texts, **common)
        without = verify(model, {"adapter": path}, zeros, texts, **common)
    out = {}
    for sv, s0 in zip(with_vector.sites, without.sites):
        residual = sv.adapters["adapter"].kl_mean
        effect = s0.adapters["adapter"].kl_mean
        ratio = residual / effect if effect > 0 else math.nan
        out[sv.site] = VectorShare(
            site=sv.site,
            adapter_kl=effect,
            residual_kl=residual,
            steering_kl=sv.steering_kl_mean,
            ratio=ratio,
            share=1.0 - ratio,
        )
    return out


def _share_table(shares: Mapping[str, VectorShare]) -> str:
    rows = [["site", "KL(base||adapter)", "KL(hook||adapter)", "KL(hook||base)", "vector carries"]]
    for s in shares.values():
        rows.append(
            [
                s.site,
                f"{s.adapter_kl:.4g}",
                f"{s.residual_kl:.4g}",
                f"{s.steering_kl:.4g}",
                "-" if not math.isfinite(s.share) else f"{100 * s.share:.1f}%",
            ]
        )
    return "\n".join(_table(rows))


# --------------------------------------------------------------------------- CLI


def add_cli(sub: Any) -> None:
    """Register ``rank1fast explain``."""
    p = sub.add_parser(
        "explain",
        help="read a LoRA as steering: its mean vector, constant fraction, gating tokens",
        description=(
            "For every LoRA module of ADAPTER (a PEFT directory or a llama.cpp LoRA .gguf) with "
            "a site in DUMP: the mean output s·B·A·mu (the steering vector it adds on average), "
            "the constant fraction |E[dWx]|^2 / E[|dWx|^2] (1: a pure steering vector), per "
            "rank-1 component the constant share, the cosine of its A row with the site's "
            "constant direction and top outlier dimensions, and the tokens where A·x is "
            "largest and smallest, in context. Tokens at position < --skip-positions are left "
            "out (default 1, as analyze)."
        ),
    )
    p.add_argument("adapter", help="PEFT LoRA directory or llama.cpp LoRA .gguf")
    p.add_argument(
        "dump",
        help="dump directory, or a report .npz (the dump it names, if any, gives the tokens)",
    )
    p.add_argument("--site", action="append", dest="sites", metavar="S", help="only this site")
    p.add_argument(
        "--skip-positions",
        type=int,
        default=1,
        metavar="K",
        help="leave out tokens at position < K (default 1: the first token, as analyze)",
    )
    p.add_argument("--top", type=int, default=5, metavar="K", help="tokens per side (default 5)")
    p.add_argument(
        "--context", type=int, default=8, metavar="N", help="context tokens per side (default 8)"
    )
    p.add_argument("--no-tokens", action="store_true", help="skip the token pass")
    p.add_argument("--tokenizer", default=None, help="model whose tokenizer decodes the ids")
    p.add_argument("--json", metavar="OUT", help="write the explanation as JSON")
    p.add_argument("--plot", metavar="DIR", help="write PNG plots (needs matplotlib)")
    p.add_argument(
        "--export",
        metavar="FILE",
        help="write the vectors: .safetensors (a vector file), or .gguf (a llama.cpp control "
        "vector; resid_post sites only)",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="load the model and measure how much of the adapter's effect hook steering with "
        "the vectors reproduces (KL, on --texts)",
    )
    p.add_argument("--model", default=None, help="base model for --verify (default: built-in)")
    p.add_argument("--texts", default=None, help="evaluation corpus for --verify")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --export file")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=_run_explain)


def _run_explain(args: Any) -> int:
    ex = explain(
        args.adapter,
        args.dump,
        sites=args.sites,
        skip_positions=args.skip_positions,
        tokens=not args.no_tokens,
        top=args.top,
        context=args.context,
        tokenizer=args.tokenizer,
        progress=False if args.quiet else None,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(ex.to_json(), indent=2))
    if args.plot:
        ex.plot(args.plot)
    if args.export:
        out = Path(args.export)
        if out.suffix.lower() == ".gguf":
            from .llamacpp import control_vector_to_gguf

            control_vector_to_gguf(ex.vectors, out, overwrite=args.overwrite)
        else:
            from .vectors import save

            if out.exists() and not args.overwrite:
                raise InvalidArgumentError(f"{out} exists; pass --overwrite to replace it")
            save(ex.vectors, out)
    if not args.quiet:
        print(ex)
    if args.verify:
        texts = None
        if args.texts:
            from .corpus import read_texts

            texts = list(read_texts(args.texts))
        shares = vector_share(
            args.model, args.adapter, ex.vectors, texts, progress=False if args.quiet else None
        )
        print(_share_table(shares))
    return 0
