"""``rank1fast demo``: the whole pipeline on the built-in model and corpus, on a CPU.

1. load the default model (SmolLM2-135M-Instruct, float32, CPU);
2. collect the inputs of ``resid_mid.L`` and ``resid_post.L`` (layers 5, 15, 25) over the
   served corpus (the built-in chat conversations in the model's template, with prose) into a
   dump, and analyze it with the Rust core: outlier dimensions and constant directions;
3. a contrastive steering vector per site from built-in prompt pairs (cheerful vs gloomy),
   each scaled so that hook steering moves the next-token distribution by about
   ``target_kl`` nats on held-out conversations;
4. :func:`rank1fast.convert`: one adapter for all six sites, fitted on the served corpus with
   the steering applied, downstream corrections, written, verified against hook steering on
   held-out texts (all six together, the one-hot adapter side by side, greedy continuations
   teacher-forced), the fidelity table printed and stored in its ``rank1fast.json``;
5. a greedy continuation of a chat prompt: unsteered, hook-steered at all six sites, and with
   the adapter through PEFT; then the hook's continuation teacher-forced through the adapter
   (how many of its tokens the adapter ranks first; the first miss with both probabilities).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .errors import InvalidArgumentError

__all__ = ["run_demo", "steering_pairs", "add_cli"]

PAIRS_FILE = Path(__file__).parent / "data" / "steering_pairs.json"
DEFAULT_LAYERS = (5, 15, 25)


def steering_pairs() -> tuple[list[str], list[str]]:
    """The built-in contrastive prompts: ``(positive, negative)`` (cheerful vs gloomy).

    Example:
        >>> pos, neg = steering_pairs()
        >>> len(pos) == len(neg)
        True
    """
    doc = json.loads(PAIRS_FILE.read_text(encoding="utf-8"))
    return list(doc["positive"]), list(doc["negative"])


def run_demo(
    out: str | os.PathLike[str] | None = None,
    *,
    tokens: int = 20_000,
    layers: tuple[int, ...] = DEFAULT_LAYERS,
    target_kl: float = 0.35,
    eval_texts: int = 16,
    max_length: int = 256,
    prompt: str = "Tell me about your weekend.",
    new_tokens: int = 24,
    log: Any = print,
) -> dict[str, Any]:
    """Run the demo pipeline and print each step.

    Args:
        out: working directory for the dump and the adapter (default: a temporary
            directory, removed at the end).
        tokens: tokens to collect for the dump, to fit the adapter on, and per corrected
            writer for the downstream corrections.
        layers: the layers whose resid_mid and resid_post sites are steered.
        target_kl: per site, hook steering is scaled to about this mean KL(hook||base).
        eval_texts: held-out texts to verify on.
        max_length: tokens per text, for collection and evaluation alike.
        prompt: the user prompt of the generation example.
        new_tokens: tokens generated per continuation.
        log: where progress lines go.

    Returns:
        ``{"fidelity": Fidelity, "scales": {site: scale}, "adapter": path, "seconds":
        {step: s}, "generations": {"base", "hook", "adapter": text, "teacher-forced":
        line}}``.

    Example:
        >>> result = run_demo(tokens=10_000)          # doctest: +SKIP
    """
    from .adapter import read_adapter_info
    from .analysis import analyze
    from .collect import collect
    from .convert import convert
    from .corpus import served_corpus

    try:  # the GGUF loader's progress bars would drown the demo's output
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    from .models import load_model, num_layers
    from .vectors import contrastive
    from .verify import Fidelity, calibrate_scale

    timings: dict[str, float] = {}
    tmp = None
    if out is None:
        tmp = tempfile.mkdtemp(prefix="rank1fast-demo-")
        out = tmp
    work = Path(out)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def step(name: str, t0: float) -> None:
        timings[name] = time.perf_counter() - t0
        log(f"   ({timings[name]:.0f} s)")

    try:
        t0 = time.perf_counter()
        log("1. loading the default model (SmolLM2-135M-Instruct, CPU)")
        model, tokenizer = load_model(None, device="cpu", dtype="float32", quiet=True)
        n = num_layers(model)
        bad = [layer for layer in layers if not 0 <= layer < n]
        if bad:
            raise InvalidArgumentError(f"layers {bad} out of range: the model has {n}")
        sites = [f"{kind}.{layer}" for kind in ("resid_mid", "resid_post") for layer in layers]
        step("load", t0)

        t0 = time.perf_counter()
        train = served_corpus(tokenizer, "fit")
        held = served_corpus(tokenizer, "eval")[:eval_texts]
        log(
            f"2. collecting {tokens:,} tokens of chat conversations and prose at "
            f"{', '.join(sites)}, then analyzing the dump (Rust core)"
        )
        dump = collect(
            (model, tokenizer),
            train,
            sites,
            work / "dump",
            max_tokens=tokens,
            max_length=max_length,
            progress=False,
        )
        report = analyze(dump.path, skip_positions=1, progress=False)
        log(_indent(str(report)))
        step("collect+analyze", t0)

        t0 = time.perf_counter()
        positive, negative = steering_pairs()
        log(f"3. contrastive steering vectors from {len(positive)} built-in prompt pairs")
        raw = contrastive((model, tokenizer), positive, negative, sites)
        scales = calibrate_scale(
            (model, tokenizer),
            raw,
            held[:8],
            target_kl=target_kl,
            tolerance=0.05,
            max_length=max_length,
        )
        vectors = {s: scales[s] * v for s, v in raw.items()}
        per_site = ", ".join(f"{s} {scales[s]:.1f}" for s in sites)
        log(f"   scale per site (to reach ~{target_kl:.2f} nats): {per_site}")
        step("vectors", t0)

        t0 = time.perf_counter()
        adapter_dir = work / "adapter"
        log(f"4. rank1fast.convert: one adapter for all {len(sites)} sites -> {adapter_dir}")
        convert(
            (model, tokenizer),
            vectors,
            adapter_dir,
            tokens=tokens,
            correction_tokens=tokens,
            eval_texts=held,
            max_length=max_length,
            overwrite=True,
            progress=False,
            log=lambda line: log(_indent(line)),
        )
        fidelity = Fidelity.from_json(read_adapter_info(adapter_dir)["convert"]["fidelity"])
        step("convert", t0)

        t0 = time.perf_counter()
        log(f"5. generation, steering all {len(sites)} sites")
        generations = _generate(model, tokenizer, vectors, adapter_dir, prompt, new_tokens)
        for k, v in generations.items():
            log(f"   {k:>14}: {v if k == 'teacher-forced' else repr(v)}")
        step("generate", t0)
        timings["total"] = time.perf_counter() - t_start
        log(f"done in {timings['total']:.0f} s")
        return {
            "fidelity": fidelity,
            "scales": scales,
            "adapter": adapter_dir,
            "seconds": timings,
            "generations": generations,
        }
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _generate(
    model: Any,
    tokenizer: Any,
    vectors: dict[str, Any],
    adapter: Path,
    prompt: str,
    new_tokens: int,
) -> dict[str, str]:
    """Greedy continuations: unsteered, with the steering hooks, with the adapter (PEFT); and
    the hook's continuation teacher-forced through the adapter (``"teacher-forced"``: how many
    of its tokens the adapter ranks first, and the first miss with both models' probabilities).
    """
    import torch
    from peft import PeftModel

    from .corpus import render_chat
    from .steering import steering
    from .verify import unload_adapters

    text = render_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
    enc = tokenizer(text, return_tensors="pt")

    def gen(m: Any) -> Any:
        with torch.no_grad():
            return m.generate(
                **enc,
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )[0]

    start = enc["input_ids"].shape[1]

    def text(ids: Any) -> str:
        return tokenizer.decode(ids[start:], skip_special_tokens=True)

    def next_token_probs(m: Any, ids: Any) -> Any:
        """p(next token) at every position of the hook's continuation, [new, vocab]."""
        with torch.no_grad():
            logits = m(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None]).logits
        return logits[0, start - 1 : len(ids) - 1].float().softmax(-1)

    out = {"base": text(gen(model))}
    with steering(model, vectors):
        hook_ids = gen(model)
        hook_p = next_token_probs(model, hook_ids)
    out["hook"] = text(hook_ids)
    peft_model = PeftModel.from_pretrained(model, os.fspath(adapter))
    try:
        out["adapter"] = text(gen(peft_model))
        adapter_p = next_token_probs(peft_model, hook_ids)
    finally:
        unload_adapters(peft_model, model)
    # The hook's continuation fed to the adapter (teacher forcing, as verify's top-1 check):
    # free-running texts part for good at the first near-tie, this shows where and how close.
    want = hook_ids[start:]
    agree = adapter_p.argmax(-1) == want
    line = f"the adapter's top-1 is the hook's token at {int(agree.sum())} of {len(want)} positions"
    if not bool(agree.all()):
        k = int((~agree).nonzero()[0, 0])
        got = int(adapter_p[k].argmax())
        line += (
            f"; first miss at token {k + 1}: hook {tokenizer.decode([int(want[k])])!r} "
            f"(p {float(hook_p[k, want[k]]):.2f} under the hook, {float(adapter_p[k, want[k]]):.2f}"
            f" under the adapter) vs {tokenizer.decode([got])!r} ({float(hook_p[k, got]):.2f}, "
            f"{float(adapter_p[k, got]):.2f})"
        )
    out["teacher-forced"] = line
    return out


def _indent(text: str, pad: str = "   ") -> str:
    return "\n".join(pad + line for line in text.splitlines())


def add_cli(sub: Any) -> None:
    """Register ``rank1fast demo``."""
    p = sub.add_parser(
        "demo",
        help="collect, analyze, write and verify adapters on the built-in model (CPU, minutes)",
        description="The whole pipeline on the built-in SmolLM2-135M-Instruct and corpus: "
        "collect, analyze, contrastive vectors, adapters for resid_mid and resid_post at "
        "several layers fitted and verified by rank1fast.convert, and a generation example.",
    )
    p.add_argument("--out", default=None, help="keep the dump and adapters here")
    p.add_argument(
        "--tokens",
        type=int,
        default=20_000,
        help="tokens to collect, fit on and fit each correction on (default 20000)",
    )
    p.add_argument(
        "--layers",
        default=",".join(map(str, DEFAULT_LAYERS)),
        help="comma-separated layers (default %(default)s)",
    )
    p.add_argument(
        "--target-kl",
        type=float,
        default=0.35,
        help="steering strength per site, KL(hook||base) in nats (default %(default)s)",
    )
    p.add_argument("--eval-texts", type=int, default=16)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the fidelity as JSON")
    p.set_defaults(func=_run_demo_cli)


def _run_demo_cli(args: Any) -> int:
    import warnings

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        layers = tuple(int(x) for x in args.layers.split(",") if x.strip())
    except ValueError:
        raise InvalidArgumentError(f"--layers: expected integers, got {args.layers!r}") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_demo(
            args.out,
            tokens=args.tokens,
            layers=layers,
            target_kl=args.target_kl,
            eval_texts=args.eval_texts,
            max_length=args.max_length,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result["fidelity"].to_json(), indent=2))
    return 0
