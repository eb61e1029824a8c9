"""``rank1fast.merge_adapter``: a PEFT LoRA adapter merged into a copy of a checkpoint.

The streaming work is done by the Rust core (``rust/rank1fast-core/src/merge.rs``): the input
shards are memory-mapped, each target weight becomes ``W + scaling·B·A`` (computed in float32,
rounded once to the weight's dtype), and everything else is copied byte for byte. Servers
that do not load LoRA adapters (or that are faster without one) can then serve the steered
model as an ordinary checkpoint.

(The module is ``rank1fast.merging`` because ``rank1fast.merge`` is the function that merges
analysis reports.) Use ``rank1fast.merge_adapter``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from . import _core
from ._progress import ProgressArg, bytes_callback

__all__ = ["merge_adapter"]


def merge_adapter(
    model_dir: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: ProgressArg = None,
) -> Path:
    """Write a copy of a safetensors checkpoint with a PEFT LoRA adapter merged into it.

    Every LoRA of the adapter adds ``scaling · lora_B @ lora_A`` to its target weight, as
    PEFT's ``merge_and_unload`` does: ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)``
    with ``use_rslora``), per module through ``rank_pattern``/``alpha_pattern``. The adapter's
    key ``base_model.model.<module>.lora_A.weight`` targets the checkpoint tensor
    ``<module>.weight``. The sum is computed in float32 and stored in the weight's dtype
    (float32, float16 or bfloat16; round to nearest even, as torch casts). Linear layers,
    GPT-2-style ``Conv1D`` layers (stored transposed) and embeddings are supported. Whole
    tensors the adapter carries (embeddings saved by PEFT's ``save_embedding_layers``,
    ``modules_to_save`` copies, trained biases) replace the checkpoint's, as PEFT loads them.

    The output has one shard per input shard, with the same names and headers; the bytes of
    every tensor the adapter does not touch are identical to the input's. All other files
    (``config.json``, tokenizer files, ``model.safetensors.index.json``, ...) are copied;
    ``.git`` and ``.cache`` (metadata of the original files) are not. Memory stays at a few
    MiB plus the adapter, whatever the size of the checkpoint.

    Args:
        model_dir: a checkpoint directory: ``model.safetensors``, or shards listed by
            ``model.safetensors.index.json``, plus config and tokenizer files.
        adapter: a PEFT LoRA adapter directory (``adapter_config.json`` +
            ``adapter_model.safetensors``), e.g. one :func:`rank1fast.write_adapter` wrote.
        out_dir: the directory to create. It is assembled under a temporary name next to it
            and renamed when complete: after an error or Ctrl-C nothing is left.
        overwrite: replace ``out_dir`` if it exists (only a checkpoint directory or an empty
            one).
        progress: None shows a bar on a terminal, True always, False never; a callable gets
            ``(bytes_done, bytes_total)``.

    Returns:
        ``out_dir``.

    Raises:
        PathNotFoundError: ``model_dir``, ``adapter`` or one of their files does not exist.
        DumpError: a malformed or unsupported file: a weight that is not float32, float16 or
            bfloat16 (quantized checkpoints), a checkpoint without safetensors weights, an
            adapter that is not LoRA, a DoRA adapter, LoRA biases (``lora_bias``), factors of
            the wrong rank, an adapter tensor that is neither a LoRA factor nor a tensor of the
            checkpoint.
        InvalidArgumentError: the adapter does not fit the checkpoint (a target module missing,
            a shape mismatch, a resized vocabulary), a merged value overflows the weight's
            dtype, ``out_dir`` exists (without ``overwrite``) or contains / is contained in
            ``model_dir``.
        Rank1IOError: the operating system refused a read or write (full disk, permissions).

    Example:
        >>> rank1fast.merge_adapter("smollm2/", "happy-lora", "smollm2-happy")  # doctest: +SKIP
        PosixPath('smollm2-happy')
    """
    summary = _merge(model_dir, adapter, out_dir, overwrite=overwrite, progress=progress)
    return Path(summary["out_dir"])


def _merge(
    model_dir: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool,
    progress: ProgressArg,
) -> dict[str, Any]:
    """:func:`merge_adapter`, returning the core's summary (shards, merged tensors, bytes)."""
    callback, bar = bytes_callback(progress, "merge")
    try:
        return _core.merge(
            os.fspath(model_dir),
            os.fspath(adapter),
            os.fspath(out_dir),
            overwrite=bool(overwrite),
            progress=callback,
        )
    finally:
        if bar is not None:
            bar.close()


# --------------------------------------------------------------------------- CLI


def add_cli(sub: Any) -> None:
    """Register ``rank1fast merge``."""
    p = sub.add_parser(
        "merge",
        help="merge a LoRA adapter into a copy of a safetensors checkpoint",
        description=(
            "Write OUT_DIR: a copy of the safetensors checkpoint MODEL_DIR with the PEFT LoRA "
            "adapter ADAPTER merged into its weights (W + scaling * B @ A, as PEFT's "
            "merge_and_unload), streaming; untouched tensors and other files are copied byte "
            "for byte."
        ),
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="checkpoint directory (safetensors)")
    p.add_argument("adapter", metavar="ADAPTER", help="PEFT LoRA adapter directory")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar, no summary")
    p.set_defaults(func=_run_merge)


def _run_merge(args: argparse.Namespace) -> int:
    summary = _merge(
        args.model_dir,
        args.adapter,
        args.out_dir,
        overwrite=args.overwrite,
        progress=False if args.quiet else None,
    )
    if not args.quiet:
        for t in summary["merged"]:
            how = f"rank {t['rank']}, scaling {t['scaling']:g}" if t["rank"] else "whole tensor"
            if t["rank"] and t["from_adapter"]:
                how += ", onto the adapter's copy of the weight"
            print(f"{t['tensor']}  ({t['dtype']}, {how})  in {t['shard']}")
        n, shards, copied = len(summary["merged"]), len(summary["shards"]), len(summary["copied"])
        print(
            f"wrote {n} merged tensors into {shards} shard(s), copied {copied} other file(s), "
            f"{summary['bytes'] / 2**20:.1f} MiB in all: {summary['out_dir']}"
        )
    return 0
