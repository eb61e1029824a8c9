"""Fidelity on the workloads users serve: prose / chat x one site / many layers x strength.

Usage: python benches/bench_fidelity.py [--tokens 40000] [--workloads single,many]
           [--corpora chat,prose] [--strengths 1,3] [--json OUT]

On the default model (SmolLM2-135M-Instruct, CPU, float32), per workload, side by side:

- ``prose fit``: the least-squares adapter fitted on unsteered prose (the default corpus), what
  ``collect`` + ``analyze`` + ``write_adapter`` give;
- ``served fit``: the same fitted on the served corpus (chat in the model's template, with
  prose) but unsteered;
- ``served+steered``: the served corpus with the steering applied, no corrections
  (``rank1fast.convert(..., corrections=0)``);
- ``convert``: :func:`rank1fast.convert`'s adapter: the same plus the downstream corrections
  (:mod:`rank1fast.corrections`: rank-4 LoRA terms on the ``--corrections`` (2) residual
  writers after each site, fitted on ``--correction-tokens`` tokens);
- ``one-hot``: the naive one-dimension adapter (from the prose fit).

Each adapter is verified through PEFT against hook steering (:func:`rank1fast.verify`) on
held-out texts of the workload's corpus: the chat split of the built-in conversations (with
prose interleaved) or held-out prose documents, and the generation check (greedy hook-steered
continuations of held-out chat prompts, teacher-forced through each adapter). Reported:
KL(hook||base) and each adapter's KL(hook||adapter)/KL(hook||base), top-1 agreement.

Vectors: contrastive (the built-in cheerful/gloomy pairs, mean over tokens). Single-site rows
scale each site's vector to about 0.5 nats; many-layer rows use unit directions at resid_post
4, 6, ..., 24 times one coefficient (as repeng applies a control vector), calibrated so that
all of them together reach 1 and 3 nats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import rank1fast
import torch
from rank1fast.convert import fit_report
from rank1fast.corpus import prose_texts, served_corpus
from rank1fast.corrections import write_corrected
from rank1fast.demo import steering_pairs
from rank1fast.verify import calibrate_scale

SINGLE = ["resid_mid.5", "resid_mid.15", "resid_post.5", "resid_post.15", "resid_post.25"]
MANY = [f"resid_post.{i}" for i in range(4, 25, 2)]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def corpus(tok, name: str, split: str) -> list[str]:
    return served_corpus(tok, split) if name == "chat" else prose_texts(split)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tokens", type=int, default=40_000, help="fit tokens per adapter")
    ap.add_argument("--workloads", default="single,many")
    ap.add_argument("--corpora", default="chat,prose")
    ap.add_argument("--strengths", default="1,3", help="many-layer KL(hook||base) targets, nats")
    ap.add_argument("--single-kl", type=float, default=0.5)
    ap.add_argument("--sites", default=",".join(SINGLE))
    ap.add_argument("--eval-texts", type=int, default=24)
    ap.add_argument("--generate", type=int, default=24, help="tokens per generation prompt")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--correction-tokens", type=int, default=40_000)
    ap.add_argument(
        "--corrections", type=int, default=2, help="writers corrected after each site (convert's)"
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    t_start = time.perf_counter()
    model, tok = rank1fast.load_model(None, device="cpu", dtype="float32", quiet=True)
    pos, neg = steering_pairs()
    single_sites = [s for s in args.sites.split(",") if s]
    raw = rank1fast.vectors.contrastive((model, tok), pos, neg, sorted(set(single_sites + MANY)))
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench-fidelity-"))
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads")

    for name in args.corpora.split(","):
        fit_texts = corpus(tok, name, "fit")
        eval_texts = corpus(tok, name, "eval")[: args.eval_texts]
        calib = eval_texts[:8]
        # Fits that do not depend on the vector: shared by every row of this corpus.
        t0 = time.perf_counter()
        all_sites = {s: raw[s] for s in sorted(set(single_sites + MANY))}
        prose_fit = fit_report(
            (model, tok),
            all_sites,
            corpus(tok, "prose", "fit"),
            under_steering=False,
            tokens=args.tokens,
            max_length=args.max_length,
            progress=False,
        )
        served_fit = (
            prose_fit
            if name == "prose"
            else fit_report(
                (model, tok),
                all_sites,
                fit_texts,
                under_steering=False,
                tokens=args.tokens,
                max_length=args.max_length,
                progress=False,
            )
        )
        print(f"[{name}] unsteered fits: {time.perf_counter() - t0:.0f} s")

        workloads = []
        if "single" in args.workloads:
            scales = calibrate_scale(
                (model, tok),
                {s: raw[s] for s in single_sites},
                calib,
                target_kl=args.single_kl,
                tolerance=0.05,
                max_length=args.max_length,
            )
            for s in single_sites:
                workloads.append((s, {s: scales[s] * raw[s]}))
        if "many" in args.workloads:
            unit = {s: raw[s] / np.linalg.norm(raw[s]) for s in MANY}
            for target in [float(x) for x in args.strengths.split(",") if x]:
                coef = calibrate_scale(
                    (model, tok),
                    unit,
                    calib,
                    target_kl=target,
                    tolerance=0.05,
                    max_length=args.max_length,
                    together=True,
                )[MANY[0]]
                workloads.append(
                    (
                        f"{len(MANY)} x resid_post @{target:g}",
                        {s: coef * v for s, v in unit.items()},
                    )
                )

        for label, vecs in workloads:
            t0 = time.perf_counter()
            steered = fit_report(
                (model, tok),
                vecs,
                fit_texts,
                under_steering=True,
                tokens=args.tokens,
                max_length=args.max_length,
                progress=False,
            )
            fit_s = time.perf_counter() - t0
            slug = label.replace(" ", "_").replace("@", "at")
            adapters = {}
            for method, report in (
                ("prose fit", prose_fit),
                ("served fit", served_fit),
                ("served+steered", steered),
            ):
                if method == "served fit" and name == "prose":
                    continue
                out = work / f"{name}-{slug}-{method.replace(' ', '_').replace('+', '_')}"
                adapters[method] = rank1fast.write_adapter(report, vecs, out, overwrite=True)
            t1 = time.perf_counter()
            out = work / f"{name}-{slug}-convert"
            kept = write_corrected(
                (model, tok),
                steered,
                vecs,
                adapters["served+steered"],
                out,
                fit_texts,
                tokens=args.correction_tokens,
                after=args.corrections,
                max_length=args.max_length,
                progress=False,
                overwrite=True,
            )
            adapters["convert"] = out if kept else adapters["served+steered"]
            fit_s += time.perf_counter() - t1
            out = work / f"{name}-{slug}-onehot"
            adapters["one-hot"] = rank1fast.write_adapter(
                prose_fit, vecs, out, method="one-hot", overwrite=True
            )
            fid = rank1fast.verify(
                (model, tok),
                adapters,
                vecs,
                eval_texts,
                max_length=args.max_length,
                combined=True,
                each_site=len(vecs) == 1,
                generate=args.generate,
                prompts=None,
                progress=False,
            )
            unit_row = fid["all"] if len(vecs) > 1 else fid[next(iter(vecs))]
            row = {
                "corpus": name,
                "workload": label,
                "kl_hook_base": unit_row.steering_kl_mean,
                "top1_base": unit_row.base_top1_agreement,
                "fit_seconds": fit_s,
                "verify_seconds": time.perf_counter() - t0 - fit_s,
                "methods": {
                    k: {"ratio": a.ratio, "top1": a.top1_agreement}
                    for k, a in unit_row.adapters.items()
                },
            }
            rows.append(row)
            cells = "  ".join(
                f"{k} {100 * v['ratio']:.2f}% (top1 {100 * v['top1']:.1f}%)"
                for k, v in row["methods"].items()
            )
            print(
                f"[{name}] {label}: KL(hook||base) {row['kl_hook_base']:.3f}, base top1 "
                f"{100 * row['top1_base']:.1f}% | {cells}",
                flush=True,
            )

    methods = ["prose fit", "served fit", "served+steered", "convert", "one-hot"]
    print()
    print(
        f"CPU: {cpu_model()}; {args.tokens:,} fit tokens, {args.correction_tokens:,} per "
        f"correction, {args.corrections} writers after each site; "
        f"{time.perf_counter() - t_start:.0f} s"
    )
    print(
        "| corpus | workload | KL(hook‖base) | "
        + " | ".join(methods)
        + " | one-hot / convert | top-1: base / convert |"
    )
    print("| --- | --- | --- |" + " --- |" * len(methods) + " --- | --- |")
    for r in rows:
        m = r["methods"]
        cells = [f"{100 * m[k]['ratio']:.2f} %" if k in m else "–" for k in methods]
        gain = m["one-hot"]["ratio"] / m["convert"]["ratio"] if m["convert"]["ratio"] else np.nan
        print(
            f"| {r['corpus']} | {r['workload']} | {r['kl_hook_base']:.2f} | "
            + " | ".join(cells)
            + f" | {gain:.0f}x | {100 * r['top1_base']:.1f} % / "
            f"{100 * m['convert']['top1']:.1f} % |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_model(), "rows": rows}, indent=2))
    os.environ.get("KEEP") or __import__("shutil").rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
