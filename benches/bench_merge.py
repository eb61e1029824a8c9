"""Time rank1fast.merge_adapter against `cp -r` of the same checkpoint, and its peak memory.

Usage: python benches/bench_merge.py [--gib 1.5] [--hidden 2048] [--repeat 3] [--dir DIR]

Writes a synthetic Llama-shaped bfloat16 checkpoint of about --gib GiB (sharded safetensors
with an index, config and tokenizer files; numpy only, nothing downloaded) and two PEFT LoRA
adapters:
  rank-1      rank 1 on o_proj and down_proj of 3 layers (what rank1fast writes: few bytes
              to recompute, almost everything copied)
  all-linear  rank 16 on every q/k/v/o/gate/up/down projection (most bytes recomputed)
then times, interleaved and best of --repeat, on a warm page cache, with dirty pages synced
before each run:
  cp -r       the same checkpoint copied by coreutils (the bar: merging must reach 0.5x)
  merge       rank1fast.merge_adapter in a fresh process, which reports its peak RSS
              (getrusage ru_maxrss; target: at most 2 x the largest tensor + 256 MiB)
and prints seconds, GB/s, the ratio to cp, CPU seconds (steadier than wall time on a shared
machine) and the peak RSS against its limit.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from synth import to_bf16_bits, write_safetensors  # noqa: E402

BLOCK = 8 << 20  # bytes of random bf16 data, tiled into every tensor

CHILD = r"""
import json, resource, sys, time
import rank1fast
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t, c = time.perf_counter(), cpu()
rank1fast.merge_adapter(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)
seconds, cpu_seconds = time.perf_counter() - t, cpu() - c
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "cpu": cpu_seconds, "peak_kib": peak, "before_kib": before}))
"""


def llama_tensors(hidden: int, layers: int, vocab: int) -> list[tuple[str, tuple[int, int]]]:
    inter = hidden * 11 // 4
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.self_attn.q_proj.weight", (hidden, hidden)),
            (f"{p}.self_attn.k_proj.weight", (hidden, hidden)),
            (f"{p}.self_attn.v_proj.weight", (hidden, hidden)),
            (f"{p}.self_attn.o_proj.weight", (hidden, hidden)),
            (f"{p}.mlp.gate_proj.weight", (inter, hidden)),
            (f"{p}.mlp.up_proj.weight", (inter, hidden)),
            (f"{p}.mlp.down_proj.weight", (hidden, inter)),
            (f"{p}.input_layernorm.weight", (1, hidden)),
        ]
    return out + [("model.norm.weight", (1, hidden)), ("lm_head.weight", (vocab, hidden))]


def write_shard(path: Path, tensors: list[tuple[str, tuple[int, int]]], block: bytes) -> None:
    header, offset = {}, 0
    for name, shape in tensors:
        n = shape[0] * shape[1] * 2
        shape_out = [shape[1]] if shape[0] == 1 else list(shape)
        header[name] = {"dtype": "BF16", "shape": shape_out, "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h)
        for _, shape in tensors:
            left = shape[0] * shape[1] * 2
            while left:
                piece = block[: min(left, len(block))]
                f.write(piece)
                left -= len(piece)


def make_checkpoint(root: Path, gib: float, hidden: int, shard_gib: float) -> tuple[int, int]:
    """A sharded bf16 checkpoint of about ``gib`` GiB; returns (layers, largest tensor bytes)."""
    vocab = 32000
    per_layer = sum(s[0] * s[1] * 2 for _, s in llama_tensors(hidden, 1, vocab)[1:-2])
    layers = max(1, int((gib * 2**30 - 2 * vocab * hidden * 2) // per_layer))
    tensors = llama_tensors(hidden, layers, vocab)
    rng = np.random.default_rng(0)
    block = to_bf16_bits(rng.normal(scale=0.02, size=BLOCK // 2).astype(np.float32)).tobytes()
    root.mkdir(parents=True)
    shards: list[list[tuple[str, tuple[int, int]]]] = [[]]
    size = 0
    for t in tensors:
        n = t[1][0] * t[1][1] * 2
        if shards[-1] and size + n > shard_gib * 2**30:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    weight_map = {}
    for i, group in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(root / name, group, block)
        weight_map.update({t: name for t, _ in group})
    total = sum(s[0] * s[1] * 2 for _, s in tensors)
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": hidden * 11 // 4,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "torch_dtype": "bfloat16",
    }
    (root / "config.json").write_text(json.dumps(config, indent=2))
    (root / "generation_config.json").write_text("{}")
    (root / "tokenizer.json").write_bytes(b"{" + b" " * (2 << 20) + b"}")
    return layers, max(s[0] * s[1] * 2 for _, s in tensors)


def make_adapter(path: Path, modules: list[tuple[str, int, int]], rank: int, alpha: float) -> None:
    """A PEFT LoRA adapter: ``(module, d_in, d_out)`` each with random float32 A and B."""
    rng = np.random.default_rng(1)
    path.mkdir(parents=True)
    tensors = {}
    for m, d_in, d_out in modules:
        a = rng.normal(scale=0.01, size=(rank, d_in)).astype(np.float32)
        b = rng.normal(scale=0.01, size=(d_out, rank)).astype(np.float32)
        tensors[f"base_model.model.{m}.lora_A.weight"] = ("float32", a.shape, a.tobytes())
        tensors[f"base_model.model.{m}.lora_B.weight"] = ("float32", b.shape, b.tobytes())
    write_safetensors(path / "adapter_model.safetensors", tensors)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted({m.rsplit(".", 1)[1] for m, _, _ in modules}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed_cp(src: Path, dst: Path) -> tuple[float, float]:
    """Wall and CPU seconds of ``cp -r``."""
    t, c = time.perf_counter(), children_cpu()
    subprocess.run(["cp", "-r", os.fspath(src), os.fspath(dst)], check=True)
    return time.perf_counter() - t, children_cpu() - c


def timed_merge(src: Path, adapter: Path, dst: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, os.fspath(src), os.fspath(adapter), os.fspath(dst)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.5, help="checkpoint size (default 1.5)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--shard-gib", type=float, default=0.5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory(dir=args.dir)
    root = Path(tmp.name)
    src = root / "model"
    layers, largest = make_checkpoint(src, args.gib, args.hidden, args.shard_gib)
    h, inter = args.hidden, args.hidden * 11 // 4
    shapes = {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (h, h),
        "self_attn.v_proj": (h, h),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (h, inter),
        "mlp.up_proj": (h, inter),
        "mlp.down_proj": (inter, h),
    }
    few = sorted({0, layers // 2, layers - 1})
    adapters = {
        "rank-1": [
            (f"model.layers.{i}.{m}", *shapes[m])
            for i in few
            for m in ("self_attn.o_proj", "mlp.down_proj")
        ],
        "all-linear r16": [
            (f"model.layers.{i}.{m}", *s) for i in range(layers) for m, s in shapes.items()
        ],
    }
    for (name, modules), rank in zip(adapters.items(), (1, 16)):
        make_adapter(root / name.replace(" ", "-"), modules, rank, 2.0 * rank)
    size = dir_bytes(src)
    limit = 2 * largest + (256 << 20)
    print(
        f"checkpoint: {layers} layers, hidden {h}, bf16, {len(list(src.glob('*.safetensors')))} "
        f"shards, {size / 2**30:.2f} GiB; largest tensor {largest / 2**20:.0f} MiB; "
        f"{os.cpu_count()} cores; best of {args.repeat}"
    )
    subprocess.run(["cat", *map(os.fspath, src.iterdir())], stdout=subprocess.DEVNULL, check=True)

    times: dict[str, list[float]] = {"cp -r": [], **{k: [] for k in adapters}}
    cpus: dict[str, list[float]] = {k: [] for k in times}
    peaks: dict[str, list[int]] = {k: [] for k in adapters}
    before: list[int] = []
    for _ in range(args.repeat):  # interleaved, so drift hits every method alike
        for method in times:
            dst = root / "out"
            shutil.rmtree(dst, ignore_errors=True)
            os.sync()  # the previous run's dirty pages must not be written back during this one
            if method == "cp -r":
                wall, cpu = timed_cp(src, dst)
                times[method].append(wall)
                cpus[method].append(cpu)
            else:
                r = timed_merge(src, root / method.replace(" ", "-"), dst)
                times[method].append(r["seconds"])
                cpus[method].append(r["cpu"])
                peaks[method].append(r["peak_kib"] << 10)
                before.append(r["before_kib"] << 10)
            assert dir_bytes(dst) == size, "the output differs in size"
    shutil.rmtree(root / "out", ignore_errors=True)

    cp = min(times["cp -r"])
    print(
        f"{'method':<16}{'touched':>9}{'seconds':>9}{'GB/s':>7}{'vs cp':>7}{'cpu s':>7}"
        f"{'peak RSS':>10}"
    )
    for method, ts in times.items():
        t = min(ts)
        touched = (
            "-"
            if method == "cp -r"
            else f"{sum(a * b * 2 for _, a, b in adapters[method]) / size:.0%}"
        )
        rss = f"{max(peaks[method]) / 2**20:.0f} MiB" if method in peaks else "-"
        print(
            f"{method:<16}{touched:>9}{t:>9.3f}{size / t / 1e9:>7.2f}{cp / t:>6.2f}x"
            f"{min(cpus[method]):>7.2f}{rss:>10}"
        )
    print(
        f"peak RSS limit (2 x largest tensor + 256 MiB): {limit / 2**20:.0f} MiB; "
        f"the child process holds {max(before) / 2**20:.0f} MiB after importing rank1fast"
    )
    print("cpu s: user + system CPU seconds (the merge uses every core; cp one)")


if __name__ == "__main__":
    main()
