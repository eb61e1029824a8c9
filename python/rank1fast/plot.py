"""``rank1fast plot``: the pictures of an analysis and of a fidelity check, as PNG files.

From a report (``.npz`` of :meth:`rank1fast.Report.save`) or a dump (analysed on the way):

- ``outliers-<family>.png``, one per site family (``resid_mid.*``: the sites that differ only by
  their layer): the "massive activations" picture (Sun et al. 2024, *Massive Activations in
  Large Language Models*, Fig. 1-2), layer on x, ``|mean|`` of the largest dimensions on a log
  scale, one line per dimension (the few that are among the ``top`` largest at some layer),
  and the median ``|mean|`` of all dimensions for scale;
- ``errors.png``: per site the held-out ``rms(b·x − 1)`` of the least-squares direction and of
  the one-hot baseline, as the report holds them (cross-validated by folds);
- ``residuals-<site>.png``, when the dump is at hand (given, or the report's ``source`` is a
  dump directory that still exists): the histogram of ``b·x − 1`` over the dump's tokens
  (positions ``>= skip_positions``) for the least-squares ``b`` and the one-hot ``b``. The
  report holds moments, not per-token values, so the histogram needs the rows: they are read
  from the shards (at most ``max_rows`` per site, in order) and the report's fitted ``b`` is
  applied. These are in-sample values (``b`` was fitted on these tokens, as one fold's
  complement); the held-out rms is in the title.

From a :class:`~rank1fast.Fidelity` (``rank1fast verify --json``, ``rank1fast demo --json``, or
an adapter directory written by :func:`rank1fast.convert`, whose ``rank1fast.json`` stores it):

- ``fidelity.png``: per site (and ``all``) the KL ratio ``KL(hook‖adapter) / KL(hook‖base)``
  of each adapter (least-squares, one-hot), log scale;
- ``fidelity-positions.png`` (when the result holds KL per position, as :func:`rank1fast.verify`
  records since this version): per site and adapter the KL ratio by token position, in bins
  0, 1, 2-3, 4-7, ... (the attention sink, the first tokens, the rest), log scale.

matplotlib is optional (``pip install 'rank1fast[plot]'``); figures are drawn with
``matplotlib.figure.Figure`` (no pyplot: no global state, no backend switch).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import _files
from ._manifest import MANIFEST
from .errors import DumpError, InvalidArgumentError, PathNotFoundError
from .report import Report, SiteReport

__all__ = ["plot", "plot_report", "plot_residuals", "plot_fidelity", "site_family", "add_cli"]

#: Rows per site read from a dump for the residual histograms, unless told otherwise.
MAX_ROWS = 200_000
_DPI = 100


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise InvalidArgumentError(
            "plots need matplotlib: pip install matplotlib (or 'rank1fast[plot]')"
        ) from e
    return Figure(figsize=(width, height))


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    return path


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "site"


def site_family(site: str) -> tuple[str, int | None]:
    """The family and layer of a site name: its first all-digit dot-separated part is the
    layer, replaced by ``*`` in the family (``resid_mid.15`` -> ``("resid_mid.*", 15)``,
    ``model.layers.3.mlp.down_proj`` -> ``("model.layers.*.mlp.down_proj", 3)``); a name
    without one is its own family, layer None.

    Example:
        >>> site_family("resid_post.5")
        ('resid_post.*', 5)
    """
    parts = site.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i] + ["*"] + parts[i + 1 :]), int(p)
    return site, None


# --------------------------------------------------------------------------- report


def plot_report(report: Report, out: str | os.PathLike[str], *, top: int = 3) -> list[Path]:
    """``outliers-<family>.png`` per site family and ``errors.png`` (see the module docs).

    Args:
        report: an analysis (:func:`rank1fast.analyze`).
        out: the directory to write into (created if missing).
        top: the dimensions with the largest ``|mean|`` at each layer that get a line.

    Returns:
        The files written.

    Raises:
        InvalidArgumentError: matplotlib is missing, ``top < 1``, or the report holds no
            site with tokens.

    Example:
        >>> plot_report(rank1fast.Report.load("report.npz"), "plots/")   # doctest: +SKIP
    """
    if top < 1:
        raise InvalidArgumentError(f"top must be at least 1, got {top}")
    sites = [s for s in report if s.count > 0]
    if not sites:
        raise InvalidArgumentError("the report holds no site with tokens: nothing to plot")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    families: dict[str, list[tuple[int | None, SiteReport]]] = {}
    for s in sites:
        family, layer = site_family(s.name)
        families.setdefault(family, []).append((layer, s))
    written = [
        _plot_family(family, members, out, top, report.skip_positions)
        for family, members in families.items()
    ]
    written.append(_plot_errors(sites, out))
    return written


def _plot_family(
    family: str, members: list[tuple[int | None, SiteReport]], out: Path, top: int, skip: int
) -> Path:
    members = sorted(members, key=lambda m: (m[0] is None, m[0] or 0))
    xs = [m[0] if m[0] is not None else i for i, m in enumerate(members)]
    absmean = [np.abs(s.mean) for _, s in members]
    dims: list[int] = []
    for a in absmean:  # the top dimensions of every layer, largest first, each once
        for j in np.argsort(-a, kind="stable")[:top]:
            if int(j) not in dims:
                dims.append(int(j))
    fig = _figure(7.5, 4.2)
    ax = fig.subplots()
    for k, j in enumerate(dims):
        ys = [a[j] for a in absmean]
        ax.plot(xs, ys, marker="o", lw=1.4, ms=4, color=f"C{k % 10}", label=f"dim {j}")
    ax.plot(xs, [float(np.median(a)) for a in absmean], ls="--", color="0.4", label="median |mean|")
    ax.set_yscale("log")
    ax.set_xlabel("layer" if members[0][0] is not None else "site")
    ax.xaxis.get_major_locator().set_params(integer=True)
    if members[0][0] is None:
        ax.set_xticks(xs, [s.name for _, s in members], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("|mean| of the site input")
    ax.set_title(
        f"{family}: largest |mean| dimensions by layer (top {top} per layer; positions >= {skip})",
        fontsize=10,
    )
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, ncol=2 if len(dims) > 6 else 1, loc="best")
    return _save(fig, out / f"outliers-{_file_name(family.replace('.*', ''))}.png")


def _plot_errors(sites: list[SiteReport], out: Path) -> Path:
    names = [s.name for s in sites]
    onehot = [s.onehot.error for s in sites]
    direction = [s.direction.error if s.direction is not None else np.nan for s in sites]
    x = np.arange(len(sites))
    fig = _figure(max(6.0, 0.7 * len(sites) + 2), 4.2)
    ax = fig.subplots()
    w = 0.4
    ax.bar(x - w / 2, direction, w, color="C0", label="least-squares b")
    ax.bar(x + w / 2, onehot, w, color="C1", label="one-hot b")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("held-out rms(b·x − 1)")
    ax.set_title("constant direction error per site (cross-validated)", fontsize=10)
    ax.grid(True, axis="y", which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / "errors.png")


# --------------------------------------------------------------------------- residuals


def _dump_rows(
    dump_dir: Path, site: str, skip_positions: int, max_rows: int
) -> tuple[np.ndarray, int]:
    """Up to ``max_rows`` rows of ``site`` at positions >= ``skip_positions`` (float32
    ``[rows, dim]``, shards in order) and the number of such rows the dump holds."""
    from .collect import Dump

    dump = Dump.open(dump_dir)
    parts: list[np.ndarray] = []
    kept = total = 0
    for shard in dump.shards:
        header, _ = _files.safetensors_header(shard)
        if site not in header:
            raise DumpError(f"{shard}: no tensor {site!r}")
        keep = None
        if "position" in header:
            keep = np.asarray(_files.tensor_array(shard, header["position"])) >= skip_positions
            n = int(keep.sum())
        else:
            n = header[site].shape[0]
        total += n
        if kept < max_rows and n:
            rows = np.asarray(_files.tensor_array(shard, header[site]), dtype=np.float32)
            if keep is not None:
                rows = rows[keep]
            parts.append(rows[: max_rows - kept])
            kept += len(parts[-1])
    if not parts:
        raise DumpError(f"{dump_dir}: no row of {site!r} at position >= {skip_positions}")
    return np.concatenate(parts), total


def plot_residuals(
    report: Report,
    dump: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    sites: Sequence[str] | None = None,
    max_rows: int = MAX_ROWS,
) -> list[Path]:
    """``residuals-<site>.png``: histograms of ``b·x − 1`` over a dump's tokens, for the
    report's least-squares and one-hot ``b`` (see the module docs for what they show).

    Args:
        report: the analysis of ``dump`` (its ``skip_positions`` filters the rows).
        dump: the dump directory the report was made from.
        out: the directory to write into.
        sites: these sites only (default: every site of the report with tokens).
        max_rows: rows read per site (the first ones, in shard order).

    Returns:
        The files written.

    Raises:
        PathNotFoundError: ``dump`` is not a dump directory.
        DumpError: a shard lacks a site, or cannot be read.
        InvalidArgumentError: matplotlib is missing, ``max_rows < 1``, an unknown site.

    Example:
        >>> plot_residuals(report, "dump/", "plots/", sites=["resid_mid.15"])  # doctest: +SKIP
    """
    if max_rows < 1:
        raise InvalidArgumentError(f"max_rows must be at least 1, got {max_rows}")
    chosen = [report[s] for s in sites] if sites else [s for s in report if s.count > 0]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for s in chosen:
        x, total = _dump_rows(Path(dump), s.name, report.skip_positions, max_rows)
        if x.shape[1] != s.dim:
            raise DumpError(
                f"{dump}: site {s.name} has {x.shape[1]} dimensions, the report {s.dim}"
            )
        x64 = x.astype(np.float64)
        curves = []
        if s.direction is not None:
            curves.append(("least-squares", s.direction.vector, s.direction.error, "C0"))
        curves.append((f"one-hot (dim {s.onehot.dims[0]})", s.onehot.vector, s.onehot.error, "C1"))
        residuals = [(label, x64 @ b - 1.0, err, c) for label, b, err, c in curves]
        finite = np.concatenate([r[np.isfinite(r)] for _, r, _, _ in residuals])
        lo, hi = np.percentile(finite, [0.5, 99.5]) if finite.size else (-1.0, 1.0)
        span = max(hi - lo, 1e-6)
        edges = np.linspace(lo - 0.05 * span, hi + 0.05 * span, 81)
        fig = _figure(7.5, 4.2)
        ax = fig.subplots()
        for label, r, err, color in residuals:
            rms = float(np.sqrt(np.mean(r**2)))
            ax.hist(
                np.clip(r, edges[0], edges[-1]),
                bins=edges,
                histtype="stepfilled",
                alpha=0.45,
                color=color,
                label=f"{label}: rms {rms:.3g} here, {err:.3g} held out",
            )
        ax.axvline(0.0, color="k", lw=0.8)
        ax.set_xlabel("b·x − 1 (outside the 0.5-99.5 % range: piled at the edges)")
        ax.set_ylabel("tokens")
        ax.set_title(
            f"{s.name}: b·x − 1 on {len(x):,} of {total:,} tokens "
            f"(positions >= {report.skip_positions})",
            fontsize=10,
        )
        ax.legend(fontsize=8)
        written.append(_save(fig, out / f"residuals-{_file_name(s.name)}.png"))
    return written


# --------------------------------------------------------------------------- fidelity


def load_fidelity(source: Any) -> Any:
    """A :class:`~rank1fast.Fidelity` from itself, a JSON file (``verify --json``, ``demo
    --json``), or an adapter directory whose ``rank1fast.json`` holds one (``convert``).

    Raises:
        PathNotFoundError: no such file or directory.
        InvalidArgumentError: the file or adapter holds no fidelity result.
    """
    from .verify import Fidelity

    if isinstance(source, Fidelity):
        return source
    path = Path(source)
    if not path.exists():
        raise PathNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        from .adapter import read_adapter_info

        info = read_adapter_info(path) or {}
        doc = (info.get("convert") or {}).get("fidelity")
        if doc is None:
            raise InvalidArgumentError(
                f"{path}: its rank1fast.json holds no fidelity (written by rank1fast convert "
                "with verify)"
            )
    else:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise InvalidArgumentError(f"{path}: not a JSON file: {e}") from e
        if isinstance(doc, dict) and "sites" not in doc and isinstance(doc.get("fidelity"), dict):
            doc = doc["fidelity"]
    try:
        return Fidelity.from_json(doc)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise InvalidArgumentError(f"{path}: not a fidelity result ({e!r})") from e


def plot_fidelity(fidelity: Any, out: str | os.PathLike[str]) -> list[Path]:
    """``fidelity.png``: the KL ratio of each adapter per site, and
    ``fidelity-positions.png``: the ratio by token position where the result holds it (see the
    module docs).

    Args:
        fidelity: a :class:`~rank1fast.Fidelity`, or what :func:`load_fidelity` reads.
        out: the directory to write into.

    Returns:
        The files written.

    Example:
        >>> plot_fidelity("adapter/", "plots/")                       # doctest: +SKIP
    """
    fid = load_fidelity(fidelity)
    if not fid.sites:
        raise InvalidArgumentError("the fidelity result holds no site: nothing to plot")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = fid.labels
    x = np.arange(len(fid.sites))
    w = 0.8 / max(len(labels), 1)
    fig = _figure(max(6.0, 0.8 * len(fid.sites) + 2), 4.2)
    ax = fig.subplots()
    for k, label in enumerate(labels):
        ratios = [s.adapters[label].ratio if label in s.adapters else np.nan for s in fid.sites]
        ax.bar(x + (k - (len(labels) - 1) / 2) * w, ratios, w, color=f"C{k}", label=label)
    ax.set_xticks(x, [s.site for s in fid.sites], rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("KL(hook‖adapter) / KL(hook‖base)")
    ax.set_title(
        f"share of the steering effect each adapter gets wrong ({fid.tokens:,} tokens, "
        f"scale {fid.scale:g})",
        fontsize=10,
    )
    ax.grid(True, axis="y", which="major", alpha=0.3)
    ax.legend(fontsize=8)
    written = [_save(fig, out / "fidelity.png")]
    positioned = [s for s in fid.sites if s.position_bins and s.steering_kl_by_position]
    if positioned:
        written.append(_plot_positions(positioned, labels, out / "fidelity-positions.png"))
    return written


def _plot_positions(sites: list[Any], labels: list[str], path: Path) -> Path:
    """KL(hook‖adapter) / KL(hook‖base) per position bin: one line per site and adapter."""
    bins = max((s.position_bins for s in sites), key=len)
    names = [str(a) if a == b else f"{a}-{b}" for a, b in bins]
    fig = _figure(max(6.0, 0.55 * len(bins) + 2), 4.2)
    ax = fig.subplots()
    styles = ["-", "--", ":", "-."]
    for i, site in enumerate(sites):
        for k, label in enumerate(labels):
            if label not in site.adapters or not site.adapters[label].kl_by_position:
                continue
            r = site.ratio_by_position(label)
            ax.plot(
                np.arange(len(r)),
                r,
                styles[k % len(styles)],
                marker="o",
                markersize=3,
                color=f"C{i % 10}",
                label=f"{site.site}: {label}",
            )
    ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_xlabel("token position (bins)")
    ax.set_yscale("log")
    ax.set_ylabel("KL(hook‖adapter) / KL(hook‖base)")
    ax.set_title("where in the text each adapter errs", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


# --------------------------------------------------------------------------- all


def plot(
    source: Report | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    fidelity: Any = None,
    dump: str | os.PathLike[str] | None = None,
    sites: Sequence[str] | None = None,
    top: int = 3,
    max_rows: int = MAX_ROWS,
    skip_positions: int = 1,
) -> list[Path]:
    """Every picture the inputs allow (see the module docs), into ``out``.

    Args:
        source: a :class:`~rank1fast.Report`, a report ``.npz``, or a dump (directory, or a
            ``.safetensors``/``.npy`` file) that is analysed first.
        out: the directory to write into (created if missing).
        fidelity: also plot this fidelity result (:func:`load_fidelity` takes it).
        dump: the dump for the residual histograms (default: ``source`` when it is a dump
            directory, else the report's ``source`` when that is one).
        sites: only these sites.
        top: dimensions per layer in the outlier picture.
        max_rows: rows per site read for the residual histograms.
        skip_positions: when ``source`` is a dump, the analysis leaves out positions below
            this (as ``rank1fast analyze``).

    Returns:
        The files written.

    Raises:
        PathNotFoundError: ``source``, ``dump`` or ``fidelity`` does not exist.
        InvalidArgumentError: matplotlib is missing; an unknown site; bad numbers.
        DumpError: as :func:`rank1fast.analyze` and :func:`plot_residuals`.

    Example:
        >>> rank1fast.plot.plot("demo/dump", "plots/", fidelity="demo/adapter")  # doctest: +SKIP
    """
    _figure(1, 1)  # matplotlib missing: say so before any work
    if isinstance(source, Report):
        report = source
    else:
        path = Path(source)
        if not path.exists():
            raise PathNotFoundError(f"{path}: no such file or directory")
        if path.suffix == ".npz" and path.is_file():
            report = Report.load(path)
        else:
            from .analysis import analyze

            report = analyze(path, sites=sites, skip_positions=skip_positions, progress=False)
    if sites:
        report = Report(
            [report[s] for s in sites],
            skip_positions=report.skip_positions,
            source=report.source,
            modules=report.modules,
        )
    written = plot_report(report, out, top=top)
    if dump is None and report.source and (Path(report.source) / MANIFEST).is_file():
        dump = report.source
    if dump is not None:
        written += plot_residuals(report, dump, out, max_rows=max_rows)
    if fidelity is not None:
        written += plot_fidelity(fidelity, out)
    return written


# --------------------------------------------------------------------------- CLI


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register ``rank1fast plot``."""
    from ._args import positive_int

    p = sub.add_parser(
        "plot",
        help="PNG pictures of a report or dump (outliers by layer, b·x − 1) and of a fidelity",
        description=(
            "Write into DIR: per site family the largest |mean| dimensions by layer "
            "(outliers-FAMILY.png), the held-out error of the constant directions per site "
            "(errors.png), with the dump at hand the histogram of b·x − 1 for the "
            "least-squares and one-hot b per site (residuals-SITE.png), and with --fidelity "
            "the KL ratio per site and adapter (fidelity.png). Needs matplotlib."
        ),
    )
    p.add_argument("source", metavar="REPORT_OR_DUMP", help="report .npz, or a dump to analyze")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="where to write the PNGs")
    p.add_argument(
        "--fidelity",
        metavar="F",
        help="a fidelity JSON (verify --json, demo --json) or an adapter directory written "
        "by convert",
    )
    p.add_argument(
        "--dump",
        metavar="DIR",
        help="the dump for the b·x − 1 histograms (default: REPORT_OR_DUMP, or the report's "
        "source, when a dump directory)",
    )
    p.add_argument("--site", action="append", dest="sites", metavar="S", help="only this site")
    p.add_argument("--top", type=positive_int, default=3, help="dimensions per layer (default 3)")
    p.add_argument(
        "--rows",
        type=positive_int,
        default=MAX_ROWS,
        metavar="N",
        help=f"rows per site for the histograms (default {MAX_ROWS:,})",
    )
    p.add_argument(
        "--skip-positions",
        type=int,
        default=1,
        metavar="K",
        help="analysing a dump: drop tokens at position < K (default 1)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing")
    p.set_defaults(func=_run_plot)


def _run_plot(args: argparse.Namespace) -> int:
    written = plot(
        args.source,
        args.out,
        fidelity=args.fidelity,
        dump=args.dump,
        sites=args.sites,
        top=args.top,
        max_rows=args.rows,
        skip_positions=args.skip_positions,
    )
    if not args.quiet:
        for path in written:
            print(path)
    return 0
