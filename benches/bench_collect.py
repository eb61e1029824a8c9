"""Time rank1fast.collect against a bare forward pass over the same batches, in one run.

Usage: python benches/bench_collect.py [--docs 48] [--batch-size 8] [--max-length 512]
                                       [--repeat 3] [--device auto] [--threads N]

Loads the default model (SmolLM2-135M-Instruct, float32) once, takes the first --docs
documents of the built-in corpus, and times, interleaved and best of --repeat runs:

  forward         model(input_ids, attention_mask) over collect's own batches (the same
                  tokenization, padding and batch order), inputs already tokenized: the bare
                  cost of the forward pass
  collect full    rank1fast.collect with the forward pass run to the end (STOP_EARLY off):
                  tokenizing, hooks, real-token selection, cast to bfloat16, shard writing;
                  the overhead of collection itself
  collect         rank1fast.collect as shipped: the forward pass stops after the last site,
                  so layers after it and the LM head are skipped

for two site sets: the last layer (resid_mid.29, resid_post.29; only the LM head is skipped)
and the middle layer (resid_mid.15, resid_post.15). Prints tokens/s and the overhead of each
collection against the bare forward. The target: at most 15% on a CPU, 10% on a GPU.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import rank1fast
import torch
from rank1fast._batch import make_batch
from rank1fast.corpus import default_corpus

# The module (rank1fast.collect is the function of the same name).
collect_module = importlib.import_module("rank1fast.collect")


def batches(tokenizer, texts, batch_size, max_length):
    """collect's batches: documents in order, right-padded to the longest of each batch."""
    out = []
    for start in range(0, len(texts), batch_size):
        ids = tokenizer(texts[start : start + batch_size], truncation=True, max_length=max_length)[
            "input_ids"
        ]
        rows = [(start + i, seq) for i, seq in enumerate(ids) if seq]
        out.append(make_batch(rows, tokenizer.pad_token_id))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_forward(model, prepared, device) -> float:
    sync(device)
    t = time.perf_counter()
    with torch.inference_mode():
        for b in prepared:
            model(
                input_ids=b.input_ids.to(device),
                attention_mask=b.attention_mask.to(device),
                use_cache=False,
            )
    sync(device)
    return time.perf_counter() - t


def time_collect(smollm, texts, sites, args, stop_early: bool, workdir: Path) -> float:
    out = workdir / "dump"
    shutil.rmtree(out, ignore_errors=True)
    collect_module.STOP_EARLY = stop_early
    try:
        t = time.perf_counter()
        rank1fast.collect(
            smollm,
            texts,
            sites,
            out,
            batch_size=args.batch_size,
            max_length=args.max_length,
            device=args.device,
            progress=False,
        )
        return time.perf_counter() - t
    finally:
        collect_module.STOP_EARLY = True
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--dir", default=None, help="where to write the dumps (default: a tmp dir)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model, tokenizer = rank1fast.load_model(None, device=args.device, dtype="float32")
    device = next(model.parameters()).device
    texts = default_corpus()[: args.docs]
    prepared = batches(tokenizer, texts, args.batch_size, args.max_length)
    tokens = sum(b.tokens for b in prepared)
    padded = sum(b.input_ids.numel() for b in prepared)
    print(
        f"device {device} ({torch.get_num_threads()} threads), {len(texts)} documents, "
        f"{tokens} tokens ({padded - tokens} padding) in {len(prepared)} batches of "
        f"{args.batch_size}, max_length {args.max_length}; best of {args.repeat}"
    )
    site_sets = {
        "last layer": "resid_mid.29,resid_post.29",
        "layer 15": "resid_mid.15,resid_post.15",
    }
    workdir = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench-collect-"))
    try:
        time_forward(model, prepared[:1], device)  # warm-up
        best: dict[str, float] = {}

        def record(key: str, seconds: float) -> None:
            best[key] = min(best.get(key, float("inf")), seconds)

        for _ in range(args.repeat):
            record("forward", time_forward(model, prepared, device))
            for label, sites in site_sets.items():
                smollm = (model, tokenizer)
                record(f"{label}|full", time_collect(smollm, texts, sites, args, False, workdir))
                record(f"{label}|stop", time_collect(smollm, texts, sites, args, True, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    base = best["forward"]
    rows = [("forward (bare, full model)", "", base)]
    for label, sites in site_sets.items():
        rows.append((f"collect full forward, {label}", sites, best[f"{label}|full"]))
        rows.append((f"collect (stops early), {label}", sites, best[f"{label}|stop"]))
    print(f"{'':36} {'sites':28} {'tokens/s':>9} {'time':>8} {'vs forward':>11}")
    for name, sites, seconds in rows:
        overhead = "" if seconds is base else f"{(seconds / base - 1) * 100:+.1f}%"
        print(f"{name:36} {sites:28} {tokens / seconds:9.0f} {seconds:7.2f}s {overhead:>11}")
    worst = max(best[f"{label}|full"] for label in site_sets) / base - 1
    target = 0.10 if device.type == "cuda" else 0.15
    verdict = "within" if worst <= target else "OVER"
    print(
        f"collection overhead with the full forward: {worst * 100:+.1f}% "
        f"({verdict} the {target:.0%} target on {device.type})"
    )


if __name__ == "__main__":
    sys.exit(main())
