"""Synthetic activation files for tests and benchmarks, written without torch.

Writes safetensors (float32/float16/bfloat16), .npy and dump directories by hand, so the tests
check the Rust readers against an independent writer, and returns the exact values stored
(as float64) for numpy references.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

DTYPES = ("float32", "float16", "bfloat16")
_TAGS = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int32": "I32",
    "int64": "I64",
    "float64": "F64",
}


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest even), as uint16."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + (np.uint32(0x7FFF) + ((u >> 16) & 1))
    return (rounded >> 16).astype(np.uint16)


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def encode(x: np.ndarray, dtype: str) -> tuple[bytes, np.ndarray]:
    """Bytes of ``x`` stored as ``dtype`` and the float64 values those bytes hold."""
    if dtype == "bfloat16":
        bits = to_bf16_bits(x)
        return bits.tobytes(), from_bf16_bits(bits).astype(np.float64)
    arr = np.ascontiguousarray(x, dtype=np.dtype(dtype))
    return arr.tobytes(), arr.astype(np.float64)


def write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...], bytes]]) -> None:
    """Write ``{name: (dtype, shape, bytes)}`` as a safetensors file."""
    header: dict[str, object] = {}
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {
            "dtype": _TAGS[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for _, _, data in tensors.values():
            f.write(data)


def activations(n: int, d: int, seed: int = 0, massive_cv: float = 1e-6) -> np.ndarray:
    """Rows like a transformer's: a massive column near 1e4, planted outliers, a low-rank part.

    Column 1 is ``1e4 * (1 + massive_cv * (z + 0.05 noise))`` where ``z`` also drives column 5,
    so a least-squares direction can cancel most of its variation and a one-hot cannot. The
    default ``massive_cv`` gives the "1e4 + 1e-2 noise" column of the accuracy requirement.
    """
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 4))
    x = rng.normal(size=(n, d)) + z @ rng.normal(size=(4, d))
    x[:, 1] = 1e4 * (1.0 + massive_cv * (z[:, 0] + 0.05 * rng.normal(size=n)))
    if d > 5:
        x[:, 5] = 40.0 + 2.0 * z[:, 0] + 0.1 * rng.normal(size=n)  # outlier, carries z
    if d > 9:
        x[:, 9] = -25.0 + 4.0 * rng.normal(size=n)  # outlier
    return x.astype(np.float32)


def write_dump(
    root: Path,
    sites: dict[str, int],
    docs: list[int],
    dtype: str = "bfloat16",
    shard_docs: int = 3,
    seed: int = 0,
    massive_cv: float = 0.1,
) -> dict[str, dict[str, np.ndarray]]:
    """A dump directory of documents with lengths ``docs``, ``shard_docs`` documents a shard.

    Returns per site the stored values (float64), positions and documents, concatenated.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    truth: dict[str, dict[str, list[np.ndarray]]] = {
        s: {"x": [], "position": [], "document": []} for s in sites
    }
    shards = []
    total = 0
    for si, start in enumerate(range(0, len(docs), shard_docs)):
        ids = list(range(start, min(start + shard_docs, len(docs))))
        pos = np.concatenate([np.arange(docs[i], dtype=np.int32) for i in ids])
        doc = np.concatenate([np.full(docs[i], i, dtype=np.int64) for i in ids])
        n = len(pos)
        tensors: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
        for s, d in sites.items():
            x = activations(n, d, seed=int(rng.integers(1 << 31)), massive_cv=massive_cv)
            x[pos == 0] *= 3.0  # BOS rows are different, as in real models
            data, stored = encode(x, dtype)
            tensors[s] = (dtype, (n, d), data)
            truth[s]["x"].append(stored)
            truth[s]["position"].append(pos)
            truth[s]["document"].append(doc)
        tensors["position"] = ("int32", (n,), pos.tobytes())
        tensors["document"] = ("int64", (n,), doc.tobytes())
        name = f"shard-{si:05d}.safetensors"
        write_safetensors(root / name, tensors)
        shards.append({"file": name, "tokens": n})
        total += n
    manifest = {
        "format": "rank1fast.dump",
        "version": 1,
        "model": {"name": "synthetic"},
        "sites": {
            s: {"module": f"layers.{i}.proj", "dim": d, "dtype": dtype}
            for i, (s, d) in enumerate(sites.items())
        },
        "shards": shards,
        "tokens": total,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return {s: {k: np.concatenate(v) for k, v in t.items()} for s, t in truth.items()}
