"""``rank1fast.verify``: how faithfully an adapter reproduces hook-based steering.

For each evaluation token, three next-token distributions are compared:

- ``p_hook``: the base model with ``scale·v`` added to the site module's output by a forward
  hook (the steering the adapter is meant to reproduce);
- ``p_adapter``: the base model with the adapter loaded through PEFT
  (``PeftModel.from_pretrained``), exactly as a user would load it;
- ``p_base``: the base model unsteered.

Per site (each site steered alone) and for all sites together, :class:`Fidelity` reports the
mean and 99th percentile of ``KL(p_hook || p_adapter)``, of ``KL(p_hook || p_base)`` (how much
steering there is), their ratio (the fraction of the steering effect the adapter gets wrong),
and the relative error of what the adapter adds at the site: ``‖out_adapter − out_hook‖ /
‖scale·v‖`` per token (for a single site this is ``|b·x − 1|`` on the evaluation texts).
A one-hot adapter (the naive construction) can be evaluated side by side.

torch, transformers and peft are imported by this module; ``import rank1fast`` does not.
"""

from __future__ import annotations

import contextlib
import functools
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

from .adapter import CONFIG_FILE, WEIGHTS_FILE, read_adapter_info, write_adapter
from .corpus import EVAL_OFFSET, EVAL_STRIDE
from .errors import AdapterError, DumpError, InvalidArgumentError
from .report import Report

__all__ = [
    "verify",
    "Fidelity",
    "SiteFidelity",
    "AdapterFidelity",
    "steering_kl",
    "calibrate_scale",
    "default_eval_texts",
    "unload_adapters",
    "add_cli",
]

#: Name of the row that steers every site at once.
ALL_SITES = "all"


@dataclass(frozen=True)
class AdapterFidelity:
    """How close one adapter comes to hook steering at one site (or all sites).

    Attributes:
        kl_mean: mean over tokens of KL(p_hook || p_adapter), nats.
        kl_p99: its 99th percentile.
        ratio: ``kl_mean / KL(p_hook || p_base)``: the share of the steering effect the
            adapter gets wrong (0 is perfect).
        output_error: rms over tokens of ``‖out_adapter − out_hook‖ / ‖scale·v‖`` at the
            site module(s).
        top1_agreement: the share of the tokens of greedy hook-steered continuations that
            the adapter, teacher-forced on them, also ranks first (NaN when not measured;
            see ``generate`` of :func:`verify`).
        kl_by_position: mean KL(p_hook || p_adapter) per bin of token positions (nats; the
            bins are :attr:`SiteFidelity.position_bins`): where in a text the adapter errs
            (the attention sink at 0, the first tokens, the rest).
    """

    kl_mean: float
    kl_p99: float
    ratio: float
    output_error: float
    top1_agreement: float = math.nan
    kl_by_position: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class SiteFidelity:
    """Fidelity at one site (or ``"all"``: every site steered at once).

    Attributes:
        site: the site name, or ``"all"``.
        modules: the module path(s) steered.
        steering_kl_mean: mean KL(p_hook || p_base), nats: how much the steering changes the
            model.
        steering_kl_p99: its 99th percentile.
        adapters: per adapter label (e.g. ``"least-squares"``, ``"one-hot"``) its
            :class:`AdapterFidelity`.
        base_top1_agreement: the same agreement for the unsteered model (how much the
            steering changes the continuations; NaN when not measured).
        generated_tokens: the hook-steered tokens the agreements count.
        position_bins: ``[first, last]`` token positions (0-based, inclusive) of each bin of
            the ``*_by_position`` lists: 0, 1, 2-3, 4-7, ... (powers of two).
        steering_kl_by_position: mean KL(p_hook || p_base) per bin, nats.
        tokens_by_position: tokens counted in each bin.
    """

    site: str
    modules: list[str]
    steering_kl_mean: float
    steering_kl_p99: float
    adapters: dict[str, AdapterFidelity]
    base_top1_agreement: float = math.nan
    generated_tokens: int = 0
    position_bins: list[list[int]] = field(default_factory=list)
    steering_kl_by_position: list[float] = field(default_factory=list)
    tokens_by_position: list[int] = field(default_factory=list)

    def ratio_by_position(self, label: str) -> list[float]:
        """KL(hook||adapter) / KL(hook||base) per position bin for adapter ``label`` (NaN
        where the steering moves nothing)."""
        a = self.adapters[label].kl_by_position
        return [x / b if b > 0 else math.nan for x, b in zip(a, self.steering_kl_by_position)]


@dataclass
class Fidelity:
    """The result of :func:`verify`: one :class:`SiteFidelity` per site, plus ``"all"``.

    ``str(fidelity)`` is a readable table; :meth:`to_json` a JSON-ready dict.

    Example:
        >>> fid = rank1fast.verify(None, "happy-lora", vecs, texts)      # doctest: +SKIP
        >>> fid["resid_mid.15"].adapters["least-squares"].ratio         # doctest: +SKIP
        0.0003
    """

    model: str
    adapters: dict[str, str]
    scale: float
    texts: int
    tokens: int
    sites: list[SiteFidelity] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        return list(self.adapters)

    def __getitem__(self, site: str) -> SiteFidelity:
        for s in self.sites:
            if s.site == site:
                return s
        raise InvalidArgumentError(
            f"no site {site!r} in this result; it has {', '.join(s.site for s in self.sites)}"
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (what ``rank1fast verify --json`` writes)."""

        def num(x: float) -> float | None:
            return None if not math.isfinite(x) else float(x)

        return {
            "model": self.model,
            "adapters": self.adapters,
            "scale": self.scale,
            "texts": self.texts,
            "tokens": self.tokens,
            "sites": [
                {
                    "site": s.site,
                    "modules": s.modules,
                    "steering_kl_mean": num(s.steering_kl_mean),
                    "steering_kl_p99": num(s.steering_kl_p99),
                    "base_top1_agreement": num(s.base_top1_agreement),
                    "generated_tokens": s.generated_tokens,
                    "position_bins": s.position_bins,
                    "steering_kl_by_position": [num(x) for x in s.steering_kl_by_position],
                    "tokens_by_position": s.tokens_by_position,
                    "adapters": {
                        k: {
                            "kl_mean": num(a.kl_mean),
                            "kl_p99": num(a.kl_p99),
                            "ratio": num(a.ratio),
                            "output_error": num(a.output_error),
                            "top1_agreement": num(a.top1_agreement),
                            "kl_by_position": [num(x) for x in a.kl_by_position],
                        }
                        for k, a in s.adapters.items()
                    },
                }
                for s in self.sites
            ],
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Fidelity:
        """The inverse of :meth:`to_json` (e.g. the ``"fidelity"`` :func:`rank1fast.convert`
        stores in an adapter's ``rank1fast.json``)."""

        def num(x: Any) -> float:
            return math.nan if x is None else float(x)

        sites = [
            SiteFidelity(
                site=s["site"],
                modules=list(s["modules"]),
                steering_kl_mean=num(s["steering_kl_mean"]),
                steering_kl_p99=num(s["steering_kl_p99"]),
                adapters={
                    k: AdapterFidelity(
                        kl_mean=num(a["kl_mean"]),
                        kl_p99=num(a["kl_p99"]),
                        ratio=num(a["ratio"]),
                        output_error=num(a["output_error"]),
                        top1_agreement=num(a.get("top1_agreement")),
                        kl_by_position=[num(x) for x in a.get("kl_by_position") or []],
                    )
                    for k, a in s["adapters"].items()
                },
                base_top1_agreement=num(s.get("base_top1_agreement")),
                generated_tokens=int(s.get("generated_tokens") or 0),
                position_bins=[list(map(int, b)) for b in s.get("position_bins") or []],
                steering_kl_by_position=[num(x) for x in s.get("steering_kl_by_position") or []],
                tokens_by_position=[int(x) for x in s.get("tokens_by_position") or []],
            )
            for s in doc["sites"]
        ]
        return cls(
            model=doc["model"],
            adapters=dict(doc["adapters"]),
            scale=float(doc["scale"]),
            texts=int(doc["texts"]),
            tokens=int(doc["tokens"]),
            sites=sites,
        )

    def __str__(self) -> str:
        gen = any(s.generated_tokens for s in self.sites)
        head = ["site", "KL(hook||base)", "p99"] + (["top1 base"] if gen else [])
        for label in self.labels:
            head += [f"{label}: KL(hook||adapter)", "p99", "ratio", "out err"]
            head += ["top1"] if gen else []
        rows = [head]
        for s in self.sites:
            row = [s.site, f"{s.steering_kl_mean:.4f}", f"{s.steering_kl_p99:.4f}"]
            row += [_pct(s.base_top1_agreement)] if gen else []
            for label in self.labels:
                a = s.adapters[label]
                row += [
                    f"{a.kl_mean:.2e}",
                    f"{a.kl_p99:.2e}",
                    _pct(a.ratio),
                    f"{a.output_error:.4f}",
                ]
                row += [_pct(a.top1_agreement)] if gen else []
            rows.append(row)
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = [
            "  ".join(
                c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))
            ).rstrip()
            for r in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        title = (
            f"fidelity on {self.tokens:,} tokens of {self.texts} texts, scale {self.scale:g}"
            f" (KL in nats; ratio = KL(hook||adapter) / KL(hook||base)"
            + ("; top1 = agreement with greedy hook-steered continuations" if gen else "")
            + ")"
        )
        return "\n".join([title, *lines])

    def __repr__(self) -> str:
        return (
            f"Fidelity(sites={[s.site for s in self.sites]!r}, adapters={self.labels!r}, "
            f"tokens={self.tokens})"
        )


def _pct(x: float) -> str:
    if not math.isfinite(x):
        return "-"
    return f"{100 * x:.3f}%" if x < 0.1 else f"{100 * x:.1f}%"


# --------------------------------------------------------------------------- verify


def default_eval_texts() -> list[str]:
    """16 documents spread over the default corpus (every 64th, from the 5th).

    ``rank1fast demo`` collects on the other documents, so these are held out.

    Example:
        >>> len(default_eval_texts())                    # doctest: +SKIP
        16
    """
    from .corpus import default_corpus

    return default_corpus()[EVAL_OFFSET::EVAL_STRIDE]


def require_lm_head(model: Any) -> None:
    """Raise :class:`InvalidArgumentError` unless ``model`` has an LM head: verification
    compares next-token distributions, which a model without one (an encoder loaded as
    ``AutoModel``) does not give."""
    from .models import unwrap_model

    base = unwrap_model(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None:
        raise InvalidArgumentError(
            f"{type(base).__name__} has no LM head, so there is no next-token distribution to "
            "verify an adapter against; write it without verification (convert(..., "
            "verify=False) / rank1fast convert --no-verify, or collect + analyze + write_adapter)"
        )


def verify(
    model: Any,
    adapter: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]],
    vectors: Mapping[str, Any] | str | os.PathLike[str],
    texts: Sequence[str] | str | os.PathLike[str] | None,
    *,
    scale: float | None = None,
    onehot: Report | str | os.PathLike[str] | None = None,
    max_length: int = 128,
    skip_positions: int = 0,
    batch_size: int = 4,
    device: str | None = "auto",
    combined: bool = True,
    each_site: bool = True,
    generate: int = 0,
    prompts: Sequence[str] | None = None,
    progress: bool | None = None,
) -> Fidelity:
    """Compare adapter steering (through PEFT) with hook steering on ``texts``.

    Args:
        model: the base model: None for the built-in default, a model id/path/GGUF, or a
            loaded ``(model, tokenizer)`` (left as it was: the adapters are unloaded after).
        adapter: an adapter directory, or ``{label: directory}`` to compare several.
        vectors: ``{site: vector}`` (or a vector file for :func:`rank1fast.vectors.load`): the
            steering the adapter was written from; only these sites are evaluated.
        texts: evaluation texts (a list, or a corpus file for
            :func:`rank1fast.corpus.read_texts`); None takes :func:`default_eval_texts`. Use
            texts the report was not computed on.
        scale: hook steering adds ``scale·v``. Default: the scale the adapters were written
            with (``rank1fast.json``), else 1. An explicit scale must match the adapters'.
        onehot: the naive one-hot adapter to show side by side: its directory, or the
            :class:`~rank1fast.Report` the adapter was written from (verify then writes the
            one-hot adapter itself, in a temporary directory).
        max_length: tokens per text (longer texts are truncated).
        skip_positions: leave the predictions at positions < k out of the statistics (they
            are still steered). 0 counts every token.
        batch_size: texts per forward pass.
        device: where to run a model loaded here.
        combined: also evaluate all sites steered together (the row ``"all"``).
        each_site: evaluate each site steered alone (False: only the ``"all"`` row, for an
            adapter fitted for all its sites at once). A row applies each adapter's LoRA on
            its sites' modules only, plus its downstream corrections
            (:mod:`rank1fast.corrections`, recorded in ``rank1fast.json``) when the row steers
            every site of ``vectors``.
        generate: with ``n > 0``, also a generation check per row: greedy continuations of
            ``n`` tokens of each prompt under hook steering, then teacher-forced through each
            adapter and through the unsteered model: the share of those tokens each ranks
            first (``top1_agreement``, ``base_top1_agreement``). Counted up to the first end
            of sequence.
        prompts: the prompts of the generation check (texts the tokenizer encodes as they
            are). Default: the user turns of the held-out built-in chat conversations with
            the model's chat template and its assistant header
            (:func:`rank1fast.corpus.chat_conversations`), or the first 24 tokens of each
            evaluation text for a model without a chat template.
        progress: a progress bar (None: on a terminal).

    Returns:
        A :class:`Fidelity`.

    Raises:
        AdapterError: an adapter that does not cover a site, loads with missing or unexpected
            keys, or was written with another scale.
        InvalidArgumentError: no texts, or no vectors, or nothing to evaluate
            (``each_site`` and ``combined`` both False for several sites), or a model without
            an LM head (an encoder loaded as ``AutoModel``: no next-token distribution).

    Example:
        >>> fid = rank1fast.verify(None, "happy-lora", "happy.gguf", texts,
        ...                        onehot=report)                        # doctest: +SKIP
        >>> print(fid)                                                   # doctest: +SKIP
    """
    import torch

    from ._progress import iter_progress
    from .corpus import read_texts
    from .models import get_module, load_model, resolve_sites, unwrap_model
    from .steering import steered_vectors, steering

    adapters = _labelled(adapter)
    vecs = steered_vectors(vectors)
    if generate < 0:
        raise InvalidArgumentError(f"generate must be at least 0, got {generate}")

    infos = {label: read_adapter_info(path) for label, path in adapters.items()}
    scale = _agreed_scale(scale, infos)

    if onehot is not None and "one-hot" in adapters:
        raise InvalidArgumentError("onehot= given, but an adapter is already labelled 'one-hot'")
    with contextlib.ExitStack() as stack:
        if isinstance(onehot, Report):
            primary = next(iter(infos.values()))
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rank1fast-")))
            adapters["one-hot"] = write_adapter(
                onehot,
                vecs,
                tmp / "one-hot",
                scale=scale,
                method="one-hot",
                rank=int(primary["rank"]) if primary else 1,
                base_model=primary.get("base_model") if primary else None,
            )
            infos["one-hot"] = read_adapter_info(adapters["one-hot"])
        elif onehot is not None:
            adapters["one-hot"] = Path(onehot)
            infos["one-hot"] = read_adapter_info(onehot)
            _agreed_scale(scale, {"one-hot": infos["one-hot"]})

        base, tokenizer = load_model(model, device=device)
        require_lm_head(base)
        was_loaded = isinstance(model, tuple) or isinstance(model, torch.nn.Module)
        text_list = default_eval_texts() if texts is None else list(read_texts(texts, tokenizer))
        text_list = [t for t in text_list if t.strip()]
        if not text_list:
            raise InvalidArgumentError("no evaluation texts")
        name = str(getattr(unwrap_model(base), "name_or_path", "") or model or "default")

        # Which module each site steers: the adapter's own record, else the model's naming.
        modules: dict[str, str] = {}
        unknown = []
        for site in vecs:
            recorded = {
                i["sites"][site]["module"]
                for i in infos.values()
                if i and site in i.get("sites", {})
            }
            if len(recorded) > 1:
                raise AdapterError(f"site {site}: the adapters steer different modules {recorded}")
            if recorded:
                modules[site] = recorded.pop()
            else:
                unknown.append(site)
        if unknown:
            modules.update(resolve_sites(base, unknown))
        # Granite scales the module's output by residual_multiplier before the residual add;
        # the adapter holds v / gain (rank1fast.json), so the module is steered by that too.
        for site in vecs:
            gains = {
                float(i["sites"][site].get("gain", 1.0))
                for i in infos.values()
                if i and site in i.get("sites", {})
            }
            if len(gains) == 1 and (gain := gains.pop()) != 1.0:
                vecs[site] = vecs[site] / gain
        for label, path in adapters.items():
            targets = _target_modules(Path(path))
            missing = [s for s, m in modules.items() if m not in targets]
            if missing:
                raise AdapterError(
                    f"{path}: adapter {label!r} has no LoRA on "
                    + ", ".join(f"{s} ({modules[s]})" for s in missing)
                )

        labels = list(adapters)
        peft_model = _load_peft(base, adapters, stack, was_loaded)
        device_ = next(base.parameters()).device
        dtype_ = next(base.parameters()).dtype
        steer = {
            s: torch.as_tensor(scale * v, dtype=dtype_, device=device_) for s, v in vecs.items()
        }
        for s, v in steer.items():
            out_dim = _out_dim(get_module(peft_model, modules[s]))
            if out_dim is not None and v.numel() != out_dim:
                raise AdapterError(
                    f"site {s} ({modules[s]}): the vector has {v.numel()} values, the module "
                    f"outputs {out_dim}"
                )
        lora_layers = _lora_layers(peft_model, labels)
        # Downstream corrections (rank1fast.corrections) serve all the sites together: they
        # are on when a unit steers every site, off when it steers some of them.
        corrections = {
            label: set((infos.get(label) or {}).get("corrections") or {}) for label in labels
        }

        def keep(sites: list[str]) -> dict[str, set[str]]:
            on = {modules[s] for s in sites}
            every = set(sites) == set(vecs)
            return {label: on | (corrections[label] if every else set()) for label in labels}

        units: list[tuple[str, list[str]]] = []
        if each_site or len(vecs) == 1:
            units = [(s, [s]) for s in vecs]
        if combined and len(vecs) > 1:
            units.append((ALL_SITES, list(vecs)))
        if not units:
            raise InvalidArgumentError("each_site=False and combined=False: nothing to evaluate")
        acc = {u: _Acc(labels) for u, _ in units}
        total_tokens = 0
        batches = [text_list[i : i + batch_size] for i in range(0, len(text_list), batch_size)]
        passes = (len(batches) + (1 if generate else 0)) * len(units)
        bar = iter_progress(progress, passes, "verify", unit="pass")
        try:
            for chunk in batches:
                enc = tokenizer(
                    chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length
                )
                enc = {k: v.to(device_) for k, v in enc.items()}
                mask = enc["attention_mask"].bool()
                mask[:, : max(0, skip_positions)] = False
                total_tokens += int(mask.sum())
                # Each token's position in its own text (padding on either side).
                positions = (enc["attention_mask"].cumsum(-1) - 1)[mask].cpu().numpy()
                with peft_model.disable_adapter(), torch.no_grad():
                    logp_base = _logprobs(peft_model, enc)
                for unit, sites in units:
                    unit_modules = {s: modules[s] for s in sites}
                    with (
                        peft_model.disable_adapter(),
                        torch.no_grad(),
                        steering(peft_model, {modules[s]: vecs[s] for s in sites}, scale),
                        _capture(peft_model, unit_modules) as hook_out,
                    ):
                        logp_hook = _logprobs(peft_model, enc)
                    a = acc[unit]
                    a.steer.append(_kl(logp_hook, logp_base, mask))
                    a.pos.append(positions)
                    unit_keep = keep(sites)
                    for label in labels:
                        with (
                            torch.no_grad(),
                            _only(peft_model, lora_layers, label, unit_keep[label]),
                            _capture(peft_model, unit_modules) as lora_out,
                        ):
                            logp = _logprobs(peft_model, enc)
                        a.kl[label].append(_kl(logp_hook, logp, mask))
                        for s in sites:
                            a.err[label].append(_rel_err(lora_out[s], hook_out[s], steer[s], mask))
                        del logp
                    del logp_hook
                    bar.update(1)
                del logp_base
            gen_prompts = None
            if generate:
                gen_prompts = _generation_prompts(tokenizer, prompts, text_list)
            for unit, sites in units if generate else []:
                acc[unit].agree = _agreement(
                    peft_model,
                    tokenizer,
                    gen_prompts,
                    generate,
                    {modules[s]: vecs[s] for s in sites},
                    scale,
                    labels,
                    lora_layers,
                    keep(sites),
                    batch_size,
                )
                bar.update(1)
        finally:
            bar.close()

    results = []
    for unit, sites in units:
        a = acc[unit]
        steer_kl = np.concatenate(a.steer)
        bin_of = _position_bin(np.concatenate(a.pos))
        nbins = int(bin_of.max()) + 1 if bin_of.size else 0
        counts = np.bincount(bin_of, minlength=nbins)
        by_position = functools.partial(_mean_by_bin, bin_of=bin_of, counts=counts)
        per_label = {}
        agree = a.agree or {}
        count = agree.get("tokens", 0)
        for label in labels:
            kl = np.concatenate(a.kl[label])
            err = np.concatenate(a.err[label])
            per_label[label] = AdapterFidelity(
                kl_mean=float(kl.mean()),
                kl_p99=float(np.percentile(kl, 99)),
                ratio=float(kl.mean() / steer_kl.mean()) if steer_kl.mean() > 0 else math.nan,
                output_error=float(np.sqrt(np.mean(err**2))),
                top1_agreement=agree[label] / count if count else math.nan,
                kl_by_position=by_position(kl),
            )
        results.append(
            SiteFidelity(
                site=unit,
                modules=[modules[s] for s in sites],
                steering_kl_mean=float(steer_kl.mean()),
                steering_kl_p99=float(np.percentile(steer_kl, 99)),
                adapters=per_label,
                base_top1_agreement=agree["base"] / count if count else math.nan,
                generated_tokens=int(count),
                position_bins=[[0, 0]] + [[2 ** (k - 1), 2**k - 1] for k in range(1, nbins)],
                steering_kl_by_position=by_position(steer_kl),
                tokens_by_position=[int(c) for c in counts],
            )
        )
    return Fidelity(
        model=name,
        adapters={k: str(v) for k, v in adapters.items()},
        scale=scale,
        texts=len(text_list),
        tokens=total_tokens,
        sites=results,
    )


def steering_kl(
    model: Any,
    vectors: Mapping[str, Any],
    texts: Sequence[str],
    *,
    scale: float | Mapping[str, float] = 1.0,
    max_length: int = 128,
    batch_size: int = 4,
) -> dict[str, float]:
    """Mean KL(p_hook || p_base) of each site's hook steering alone: how strong it is.

    Useful to pick a ``scale`` before writing adapters (steering that barely changes the
    model cannot show fidelity).

    Args:
        model: a loaded ``(model, tokenizer)`` or anything :func:`rank1fast.models.load_model`
            takes.
        vectors: ``{site: vector}``.
        texts: evaluation texts.
        scale: hook steering adds ``scale·v``; one scale, or ``{site: scale}``.
        max_length: tokens per text.
        batch_size: texts per forward pass.

    Returns:
        ``{site: mean KL in nats}``.

    Example:
        >>> steering_kl((model, tok), {"resid_mid.15": v}, texts, scale=4.0)  # doctest: +SKIP
        {'resid_mid.15': 0.52}
    """
    return _SteeringProbe(model, texts, max_length, batch_size).kl(vectors, scale)


class _SteeringProbe:
    """Hook-steered KL against the base model on fixed texts (base distributions cached)."""

    def __init__(self, model: Any, texts: Sequence[str], max_length: int, batch_size: int):
        import torch

        from .models import load_model

        self.model, tokenizer = load_model(model)
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        self.batches = []
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(
                list(texts[i : i + batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            )
            enc = {k: v.to(self.device) for k, v in enc.items()}
            with torch.no_grad():
                base = _logprobs(self.model, enc)
            self.batches.append((enc, enc["attention_mask"].bool(), base))
        self.count = sum(int(m.sum()) for _, m, _ in self.batches)

    def kl(
        self,
        vectors: Mapping[str, Any],
        scale: float | Mapping[str, float],
        together: bool = False,
    ) -> dict[str, float]:
        """Mean KL per site steered alone; ``together``: all sites at once (the same value
        for every site)."""
        import torch

        from .steering import steering

        groups = [list(vectors)] if together else [[site] for site in vectors]
        out = {}
        for group in groups:
            total = 0.0
            for enc, mask, base in self.batches:
                with (
                    torch.no_grad(),
                    steering(self.model, {site: vectors[site] for site in group}, scale),
                ):
                    total += float(_kl(_logprobs(self.model, enc), base, mask).sum())
            out.update(dict.fromkeys(group, total / max(self.count, 1)))
        return out


def calibrate_scale(
    model: Any,
    vectors: Mapping[str, Any],
    texts: Sequence[str],
    *,
    target_kl: float = 0.5,
    iterations: int = 4,
    tolerance: float = 0.1,
    max_length: int = 64,
    batch_size: int = 4,
    together: bool = False,
) -> dict[str, float]:
    """Per site, the scale at which hook steering reaches a mean KL(p_hook || p_base) of
    about ``target_kl`` nats on ``texts``; with ``together``, one scale for every site at
    which steering all of them at once reaches it (a control vector's coefficient).

    KL grows like ``scale²`` for weak steering and faster or slower for strong steering; each
    step fits ``KL ∝ scale^p`` through the last two measurements (``p = 2`` at first) and solves
    for the target, so a few forward passes per site suffice (the base model's distributions
    are computed once).

    Args:
        model: a loaded ``(model, tokenizer)`` or anything :func:`rank1fast.models.load_model`
            takes.
        vectors: ``{site: vector}``; the returned scale multiplies the vector as given.
        texts: calibration texts (a few are enough).
        target_kl: the steering strength wanted, in nats.
        iterations: at most this many measurements per site after the first.
        tolerance: stop once ``|log(KL / target_kl)|`` is below this.
        max_length: tokens per text.
        batch_size: texts per forward pass.
        together: calibrate one coefficient for all sites steered together.

    Returns:
        ``{site: scale}`` (with ``together``, the same scale for every site).

    Raises:
        InvalidArgumentError: ``target_kl`` is not positive, or a vector is zero.

    Example:
        >>> calibrate_scale((model, tok), {"resid_mid.15": v}, texts)   # doctest: +SKIP
        {'resid_mid.15': 7.6}
    """
    if not target_kl > 0:
        raise InvalidArgumentError(f"target_kl must be positive, got {target_kl}")
    for site, v in vectors.items():
        if not np.any(np.asarray(v)):
            raise InvalidArgumentError(f"site {site}: the vector is zero")
    probe = _SteeringProbe(model, texts, max_length, batch_size)
    points: dict[str, list[tuple[float, float]]] = {s: [] for s in vectors}
    current = dict.fromkeys(vectors, 1.0)
    todo = list(vectors)
    for _ in range(iterations + 1):
        if not todo:
            break
        measured = probe.kl({s: vectors[s] for s in todo}, current, together)
        still = []
        for site in todo:
            s, kl = current[site], measured[site]
            points[site].append((s, kl))
            if kl > 0 and abs(math.log(kl / target_kl)) < tolerance:
                continue
            still.append(site)
            if kl <= 1e-9:
                current[site] = s * 16.0
                continue
            p = 2.0
            if len(points[site]) >= 2:
                (s0, k0), (s1, k1) = points[site][-2], points[site][-1]
                if k0 > 1e-9 and s0 != s1 and k0 != k1:
                    p = min(max(math.log(k1 / k0) / math.log(s1 / s0), 0.5), 6.0)
            current[site] = s * (target_kl / kl) ** (1.0 / p)
        todo = still
    return {
        site: min(pts, key=lambda q: abs(math.log(max(q[1], 1e-12) / target_kl)))[0]
        for site, pts in points.items()
    }


# --------------------------------------------------------------------------- helpers


class _Acc:
    def __init__(self, labels: list[str]) -> None:
        self.steer: list[np.ndarray] = []
        self.pos: list[np.ndarray] = []
        self.kl: dict[str, list[np.ndarray]] = {k: [] for k in labels}
        self.err: dict[str, list[np.ndarray]] = {k: [] for k in labels}
        self.agree: dict[str, int] | None = None


def _labelled(adapter: Any) -> dict[str, Path]:
    if isinstance(adapter, Mapping):
        out = {str(k): Path(v) for k, v in adapter.items()}
    else:
        path = Path(adapter)
        info = read_adapter_info(path)
        out = {(info or {}).get("method", "adapter"): path}
    if not out:
        raise InvalidArgumentError("no adapter given")
    for path in out.values():
        if not (path / CONFIG_FILE).is_file():
            raise AdapterError(f"{path}: not a PEFT adapter directory (no {CONFIG_FILE})")
    return out


def _agreed_scale(scale: float | None, infos: Mapping[str, dict[str, Any] | None]) -> float:
    recorded = {label: float(i["scale"]) for label, i in infos.items() if i and "scale" in i}
    values = set(recorded.values())
    if scale is None:
        if len(values) > 1:
            raise AdapterError(f"the adapters were written with different scales: {recorded}")
        return values.pop() if values else 1.0
    for label, s in recorded.items():
        if not math.isclose(s, float(scale), rel_tol=1e-9, abs_tol=1e-12):
            raise AdapterError(
                f"adapter {label!r} was written with scale {s:g}; verify with the same scale "
                f"(got {scale:g}) or leave scale=None"
            )
    return float(scale)


def _target_modules(path: Path) -> set[str]:
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path / CONFIG_FILE}: unreadable: {e}") from e
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    # The weights name the modules exactly; target_modules may be suffixes ("o_proj").
    names = set(targets)
    weights = path / WEIGHTS_FILE
    if weights.is_file():
        from ._files import safetensors_header

        try:
            header, _ = safetensors_header(weights)
        except DumpError as e:
            raise AdapterError(str(e)) from e
        for key in header:
            if key.endswith(".lora_A.weight"):
                names.add(key.removeprefix("base_model.model.").removesuffix(".lora_A.weight"))
    return names


def _load_peft(
    base: Any, adapters: Mapping[str, Path], stack: contextlib.ExitStack, restore: bool
) -> Any:
    """Load every adapter through PEFT; check that each loads without missing/unexpected keys.

    With ``restore``, the base model is returned to its original state on exit.
    """
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors import safe_open

    peft_model = None
    try:
        for label, path in adapters.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if peft_model is None:
                    peft_model = PeftModel.from_pretrained(
                        base, os.fspath(path), adapter_name=label
                    )
                else:
                    peft_model.load_adapter(os.fspath(path), adapter_name=label)
            expected = set(get_peft_model_state_dict(peft_model, adapter_name=label))
            with safe_open(os.fspath(path / WEIGHTS_FILE), framework="pt") as f:
                stored = set(f.keys())
            if expected != stored:
                missing, unexpected = sorted(expected - stored), sorted(stored - expected)
                raise AdapterError(
                    f"{path}: PEFT loads adapter {label!r} with missing keys {missing[:4]} and "
                    f"unexpected keys {unexpected[:4]}"
                )
    except BaseException:
        if peft_model is not None and restore:
            unload_adapters(peft_model, base)
        raise
    if restore:
        stack.callback(unload_adapters, peft_model, base)
    peft_model.eval()
    return peft_model


def unload_adapters(peft_model: Any, base: Any) -> None:
    """Remove every LoRA layer PEFT put into ``base`` (returning it to the model it was before
    ``PeftModel.from_pretrained(base, ...)``) and its ``peft_config``."""
    peft_model.unload()
    for obj in (base, getattr(base, "model", None)):
        if obj is not None and "peft_config" in getattr(obj, "__dict__", {}):
            del obj.peft_config


def _lora_layers(peft_model: Any, labels: list[str]) -> dict[str, Any]:
    """module path -> LoRA layer, for every module carrying one of ``labels``."""
    from peft.tuners.lora import LoraLayer

    from .models import unwrap_model

    out = {}
    for name, module in unwrap_model(peft_model).named_modules():
        if isinstance(module, LoraLayer) and any(k in module.scaling for k in labels):
            out[name] = module
    return out


@contextlib.contextmanager
def _only(peft_model: Any, layers: Mapping[str, Any], label: str, keep: set[str]) -> Iterator[None]:
    """Activate adapter ``label`` on the modules in ``keep`` only (others scaled to zero)."""
    peft_model.set_adapter(label)
    saved = {}
    for name, layer in layers.items():
        if label in layer.scaling and name not in keep:
            saved[name] = layer.scaling[label]
            layer.scaling[label] = 0.0
    try:
        yield
    finally:
        for name, value in saved.items():
            layers[name].scaling[label] = value


@contextlib.contextmanager
def _capture(model: Any, modules: Mapping[str, str]) -> Iterator[dict[str, Any]]:
    """Record the output of each site's module (after hooks registered before this one, such
    as :func:`rank1fast.steering`'s)."""
    from .models import get_module

    outputs: dict[str, Any] = {}
    handles = []
    for site, path in modules.items():

        def hook(_m: Any, _i: Any, out: Any, site: str = site) -> None:
            outputs[site] = out.detach()

        handles.append(get_module(model, path).register_forward_hook(hook))
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


#: Prompts of the generation check for a model without a chat template: this many tokens.
_PROMPT_TOKENS = 24


def _generation_prompts(
    tokenizer: Any, prompts: Sequence[str] | None, texts: Sequence[str]
) -> list[list[int]]:
    """Token ids of the generation check's prompts (see ``prompts`` of :func:`verify`)."""
    from .corpus import chat_prompts, has_chat_template

    if prompts is not None:
        ids = [tokenizer(p)["input_ids"] for p in prompts]
    elif has_chat_template(tokenizer):
        ids = [tokenizer(p)["input_ids"] for p in chat_prompts(tokenizer, "eval")]
    else:
        ids = [tokenizer(t)["input_ids"][:_PROMPT_TOKENS] for t in texts]
    ids = [i for i in ids if i]
    if not ids:
        raise InvalidArgumentError("no prompts for the generation check")
    return ids


def _agreement(
    peft_model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    new_tokens: int,
    vectors: Mapping[str, np.ndarray],
    scale: float,
    labels: list[str],
    lora_layers: Mapping[str, Any],
    keep: Mapping[str, set[str]],
    batch_size: int,
) -> dict[str, int]:
    """Greedy hook-steered continuations, and how many of their tokens each adapter (and the
    unsteered model) ranks first when teacher-forced on them."""
    import torch

    from .steering import steering

    device = next(peft_model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = tokenizer.eos_token_id
    counts = dict.fromkeys(["tokens", "base", *labels], 0)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        att = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):  # left padding for generate
            ids[i, width - len(p) :] = torch.tensor(p)
            att[i, width - len(p) :] = 1
        with peft_model.disable_adapter(), torch.no_grad(), steering(peft_model, vectors, scale):
            out = peft_model.generate(
                input_ids=ids.to(device),
                attention_mask=att.to(device),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        gen = out[:, width:].cpu()
        # Teacher forcing on prompt + continuation, right-padded, as the KL passes run.
        seqs, spans = [], []
        for i, p in enumerate(chunk):
            g = gen[i].tolist()
            if eos is not None and eos in g:
                g = g[: g.index(eos) + 1]
            seqs.append(p + g)
            spans.append((len(p), len(g)))
        n = max(len(q) for q in seqs)
        full = torch.full((len(seqs), n), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, q in enumerate(seqs):
            full[i, : len(q)] = torch.tensor(q)
            mask[i, : len(q)] = 1
        enc = {"input_ids": full.to(device), "attention_mask": mask.to(device)}

        def hits(argmax: Any, spans: list = spans, full: Any = full) -> int:
            total = 0
            for i, (p_len, g_len) in enumerate(spans):
                pred = argmax[i, p_len - 1 : p_len - 1 + g_len]
                total += int((pred == full[i, p_len : p_len + g_len]).sum())
            return total

        counts["tokens"] += sum(g for _, g in spans)
        with peft_model.disable_adapter(), torch.no_grad():
            counts["base"] += hits(peft_model(**enc).logits.argmax(-1).cpu())
        for label in labels:
            with torch.no_grad(), _only(peft_model, lora_layers, label, keep[label]):
                counts[label] += hits(peft_model(**enc).logits.argmax(-1).cpu())
    return counts


def _logprobs(model: Any, enc: Mapping[str, Any]) -> Any:
    import torch

    logits = model(**enc).logits
    return torch.log_softmax(logits.to(torch.float64), dim=-1)


def _mean_by_bin(x: np.ndarray, *, bin_of: np.ndarray, counts: np.ndarray) -> list[float]:
    sums = np.bincount(bin_of, weights=x, minlength=len(counts))
    return [float(v / c) if c else math.nan for v, c in zip(sums, counts)]


def _position_bin(pos: np.ndarray) -> np.ndarray:
    """Bin of each token position: 0 -> 0, 1 -> 1, 2-3 -> 2, 4-7 -> 3, ... (bit length)."""
    pos = np.asarray(pos, dtype=np.int64)
    out = np.zeros(pos.shape, dtype=np.int64)
    nz = pos > 0
    out[nz] = np.floor(np.log2(pos[nz])).astype(np.int64) + 1
    return out


def _kl(logp: Any, logq: Any, mask: Any) -> np.ndarray:
    """KL(p || q) per unmasked token, float64 numpy."""
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return kl[mask].clamp(min=0).cpu().numpy()


def _rel_err(out: Any, ref: Any, v: Any, mask: Any) -> np.ndarray:
    import torch

    diff = (out.to(torch.float64) - ref.to(torch.float64)).norm(dim=-1)[mask].cpu().numpy()
    norm = float(v.to(torch.float64).norm())
    return diff / norm if norm > 0 else np.full(diff.shape, np.nan)


def _out_dim(module: Any) -> int | None:
    from .models import module_dims

    try:
        return module_dims(module)[1]
    except Exception:  # noqa: BLE001 - not a linear module: nothing to check
        return None


# --------------------------------------------------------------------------- CLI


def add_cli(sub: Any) -> None:
    """Register ``rank1fast verify``."""
    p = sub.add_parser(
        "verify",
        help="compare an adapter (through PEFT) with hook steering",
        description="Per site: KL(hook||adapter), KL(hook||base), their ratio and the relative "
        "error of the site output, for the adapter and (with --onehot/--report) the one-hot "
        "adapter side by side.",
    )
    p.add_argument("adapter", help="the adapter directory")
    p.add_argument("vectors", help="the vector file the adapter was written from")
    p.add_argument("--model", default=None, help="base model (default: built-in)")
    p.add_argument(
        "--texts",
        default=None,
        help="evaluation corpus (.txt/.jsonl); default: 16 built-in documents",
    )
    p.add_argument(
        "--site",
        action="append",
        dest="sites",
        metavar="S",
        help="verify only these sites (repeatable)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--onehot", default=None, metavar="DIR", help="a one-hot adapter to compare")
    g.add_argument(
        "--report",
        default=None,
        metavar="REPORT",
        help="report .npz or dump: write and compare the one-hot adapter",
    )
    p.add_argument("--scale", type=float, default=None)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, metavar="OUT", help="write the result as JSON")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=_run_verify)


def _run_verify(args: Any) -> int:
    from .adapter import load_report
    from .vectors import load

    vecs = load(args.vectors)
    if args.sites:
        vecs = {s: vecs[s] for s in args.sites if s in vecs}
    onehot: Any = args.onehot
    if args.report:
        onehot = load_report(args.report, sites=list(vecs), progress=False)
    texts = None
    if args.texts:
        from .corpus import read_texts

        texts = list(read_texts(args.texts))
    fid = verify(
        args.model,
        args.adapter,
        vecs,
        texts,
        scale=args.scale,
        onehot=onehot,
        max_length=args.max_length,
        device=args.device,
        progress=False if args.quiet else None,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(fid.to_json(), indent=2))
    if not args.quiet:
        print(fid)
    return 0
