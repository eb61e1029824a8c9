"""Mutation fuzzing of the Python readers: steering-vector files (safetensors, .npy, torch zip,
control-vector GGUF), SAE directories and adapter directories.

Each case writes one mutated copy of a valid seed file (bit flips, truncation, random bytes,
interesting numbers and tokens spliced in, a corrupted leading length) and runs the reader on it.
The reader must return, or raise a ``Rank1Error`` (or ``FileNotFoundError``); anything else is
a bug and stops the run with the input saved for replay.

    python tests/fuzz_readers.py                 # 1,000,000 cases per reader
    python tests/fuzz_readers.py --cases 2000 --reader npy
    RANK1FAST_FUZZ_CASES=1000000 pytest tests/test_bad_inputs.py -k fuzz

``tests/test_bad_inputs.py`` runs a few hundred cases per reader in CI.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

INTERESTING = [
    b"0",
    b"-1",
    b"18446744073709551615",
    b"18446744073709551616",
    b"9007199254740993",
    b"4294967296",
    b"1e308",
    b"null",
    b"[]",
    b"{}",
    b'"F32"',
    b'"BF16"',
    b'"F8_E4M3"',
    b'"__metadata__"',
    b"True",
    b"'<V2'",
    b"'>f8'",
    b"(0,)",
]


def mutate(rng: random.Random, seed: bytes) -> bytes:
    v = bytearray(seed)
    for _ in range(1 + rng.randrange(4)):
        op = rng.randrange(7)
        if op == 0 and v:
            i = rng.randrange(len(v))
            v[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            del v[rng.randrange(len(v) + 1) :]
        elif op == 2 and v:
            v[rng.randrange(len(v))] = rng.randrange(256)
        elif op == 3:
            i = rng.randrange(len(v) + 1)
            v[i:i] = rng.choice(INTERESTING)
        elif op == 4:
            digits = [i for i, b in enumerate(v) if 48 <= b <= 57]
            if digits:
                i = j = rng.choice(digits)
                while j < len(v) and 48 <= v[j] <= 57:
                    j += 1
                v[i:j] = rng.choice(INTERESTING)
        elif op == 5 and len(v) >= 8:
            n = rng.randrange(len(v) * 2 + 16) if rng.random() < 0.8 else rng.getrandbits(64)
            at = rng.choice([0, 8]) if len(v) >= 16 else 0
            v[at : at + 8] = struct.pack("<Q", n)
        else:
            i = rng.randrange(len(v) + 1)
            v[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(16)))
    return bytes(v)


def _seeds(root: Path) -> dict[str, tuple[str, bytes, Callable[[Path], object]]]:
    """reader -> (file name, valid seed bytes, call)."""
    import torch
    from rank1fast import serving, vectors
    from rank1fast.errors import AdapterError
    from safetensors.numpy import save_file

    root.mkdir(parents=True, exist_ok=True)
    save_file(
        {"resid_post.3": np.arange(8, dtype=np.float32), "direction.4": np.ones(8, np.float32)},
        str(root / "s.safetensors"),
        metadata={"format": "pt"},
    )
    np.save(root / "n.npy", np.arange(12, dtype=np.float32).reshape(3, 4))
    torch.save({"5": torch.arange(6, dtype=torch.float32)}, root / "t.pt")
    import gguf

    w = gguf.GGUFWriter(str(root / "c.gguf"), "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_uint32("controlvector.layer_count", 2)
    for layer in (1, 2):
        w.add_tensor(f"direction.{layer}", np.full(8, layer, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cfg = json.dumps({"d_in": 4, "d_sae": 6, "hook_name": "blocks.2.hook_resid_post"}).encode()
    save_file({"W_dec": np.arange(24, dtype=np.float32).reshape(6, 4)}, str(root / "w.st"))
    adapter_cfg = json.dumps(
        {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["o_proj"]}
    ).encode()
    o = "base_model.model.model.layers.0.self_attn.o_proj"
    save_file(
        {
            f"{o}.lora_A.weight": np.ones((1, 4), np.float32),
            f"{o}.lora_B.weight": np.ones((4, 1), np.float32),
        },
        str(root / "a.st"),
    )

    def sae(p: Path) -> object:
        d = p.parent / "sae"
        d.mkdir(exist_ok=True)
        data = p.read_bytes()
        # Half the cases mutate the config, half the weights.
        if data.startswith(b"{"):
            (d / "cfg.json").write_bytes(data)
            (d / "sae_weights.safetensors").write_bytes((root / "w.st").read_bytes())
        else:
            (d / "cfg.json").write_bytes(cfg)
            (d / "sae_weights.safetensors").write_bytes(data)
        return vectors.from_sae(d, 1)

    def adapter(p: Path) -> object:
        d = p.parent / "adapter"
        d.mkdir(exist_ok=True)
        data = p.read_bytes()
        if data.startswith(b"{"):
            (d / "adapter_config.json").write_bytes(data)
            (d / "adapter_model.safetensors").write_bytes((root / "a.st").read_bytes())
        else:
            (d / "adapter_config.json").write_bytes(adapter_cfg)
            (d / "adapter_model.safetensors").write_bytes(data)
        problems = serving.check(d, "vllm")
        if problems:  # a rejected adapter: reported, not raised, by check
            raise AdapterError(str(problems[0]))
        return problems

    return {
        "safetensors": ("x.safetensors", (root / "s.safetensors").read_bytes(), vectors.load),
        "npy": ("x.npy", (root / "n.npy").read_bytes(), vectors.load),
        "pt": ("x.pt", (root / "t.pt").read_bytes(), vectors.load),
        "gguf": ("x.gguf", (root / "c.gguf").read_bytes(), vectors.load),
        "sae": ("x.bin", cfg, sae),
        "adapter": ("x.bin", adapter_cfg, adapter),
    }


def fuzz(
    tmp: Path, cases: int, seed: int = 0, readers: list[str] | None = None, log: bool = False
) -> dict[str, tuple[int, int]]:
    """Run ``cases`` mutated inputs through each reader; return reader -> (accepted, typed
    errors). Raises AssertionError, with the input saved under ``tmp``, on any other
    exception."""
    from rank1fast.errors import Rank1Error

    seeds = _seeds(tmp / "seeds")
    sae_weights = (tmp / "seeds" / "w.st").read_bytes()
    adapter_weights = (tmp / "seeds" / "a.st").read_bytes()
    out = {}
    for reader, (name, data, call) in seeds.items():
        if readers and reader not in readers:
            continue
        rng = random.Random(f"{seed}-{reader}")
        ok = typed = 0
        work = tmp / reader
        work.mkdir(exist_ok=True)
        path = work / name
        start = time.monotonic()
        for i in range(cases):
            base = data
            if reader == "sae" and i % 2:
                base = sae_weights
            elif reader == "adapter" and i % 2:
                base = adapter_weights
            path.write_bytes(mutate(rng, base))
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    call(path)
            except (Rank1Error, FileNotFoundError):
                typed += 1
            except Exception as e:  # noqa: BLE001 - the bug this fuzzer looks for
                keep = tmp / f"crash-{reader}-{i}"
                keep.write_bytes(path.read_bytes())
                raise AssertionError(
                    f"{reader} case {i}: {type(e).__name__}: {e} (input saved as {keep})"
                ) from e
            else:
                ok += 1
            if log and (i + 1) % 10000 == 0:
                rate = (i + 1) / (time.monotonic() - start)
                print(f"{reader}: {i + 1} cases, {typed} typed errors, {rate:.0f}/s", flush=True)
        out[reader] = (ok, typed)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=1_000_000, help="cases per reader")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reader", action="append", help="only this reader (repeatable)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        counts = fuzz(Path(d), args.cases, args.seed, args.reader, log=True)
    for reader, (ok, typed) in counts.items():
        print(f"{reader}: {ok} accepted, {typed} typed errors, no other exception")
    return 0


if __name__ == "__main__":
    sys.exit(main())
