"""Every file a user brings, built small and by hand: strict safetensors, .npy variants, files
that are not what their name says, the SAE layouts people publish, adapters PEFT would not load,
and a short fuzz of the Python readers (RANK1FAST_FUZZ_CASES=1000000 for the full run).

Each case asserts the exact value read (against numpy/torch references) or the typed error and
its message."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import rank1fast
from rank1fast import serving, vectors
from rank1fast.errors import DumpError, Rank1Error
from synth import activations, write_safetensors

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")
safetensors_torch = pytest.importorskip("safetensors.torch")


def _st(path: Path, header: dict | str, data: bytes) -> Path:
    """A safetensors file from a raw header (dict or JSON text) and data bytes."""
    h = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def _npy(path: Path, header: str, data: bytes, version: int = 1) -> Path:
    """A .npy file with a hand-written header dict text (versions 1-3)."""
    h = header.encode("utf-8" if version == 3 else "latin1")
    pre = 10 if version == 1 else 12
    h += b" " * (-(pre + len(h) + 1) % 64) + b"\n"
    size = struct.pack("<H", len(h)) if version == 1 else struct.pack("<I", len(h))
    path.write_bytes(b"\x93NUMPY" + bytes([version, 0]) + size + h + data)
    return path


def _msg(tmp_path: Path, fn, *args, **kw) -> str:
    """The typed error's class and message, paths shown relative to tmp_path."""
    with pytest.raises(Rank1Error) as e:
        fn(*args, **kw)
    return f"{type(e.value).__name__}: {e.value}".replace(f"{tmp_path}/", "")


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


# --------------------------------------------------------------------------- safetensors


def test_vectors_load_reads_safetensors_as_the_reference_does(tmp_path):
    # Accepted: zero-size tensors, whitespace padding, string metadata.
    v = np.array([1.5, -2.0], np.float32)
    h = json.dumps(
        {
            "__metadata__": {"format": "pt"},
            "a": F32x2,
            "empty": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]},
        }
    )
    p = _st(tmp_path / "v.safetensors", "  " + h + "    ", v.tobytes())
    with pytest.raises(DumpError, match=r"v.safetensors \[empty\]: a steering vector is 1-D"):
        vectors.load(p)
    p = _st(tmp_path / "w.safetensors", "  " + json.dumps({"a": F32x2}) + "  ", v.tobytes())
    np.testing.assert_array_equal(vectors.load(p)["a"], v.astype(np.float64))


@pytest.mark.parametrize(
    "header,data,message",
    [
        (
            {"__metadata__": {"step": 3}, "a": F32x2},
            8,
            'x.safetensors [__metadata__]: value of "step" is a number, the format allows '
            "only strings",
        ),
        (
            '{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
            '"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}',
            16,
            "x.safetensors [a]: the header names this key twice",
        ),
        (
            {"a": F32x2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}},
            20,
            "x.safetensors [b]: 4 unused bytes before this tensor's data (offset 8): tensors "
            "must be packed without gaps",
        ),
        (
            {"a": F32x2},
            12,
            "x.safetensors: 4 bytes after the last tensor's data: the tensors must end where "
            "the file ends",
        ),
        (
            {"a": F32x2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
            12,
            "x.safetensors [b]: data overlaps tensor a",
        ),
        (
            {"a": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}},
            2,
            "x.safetensors [a]: dtype float8_e4m3fn is not read here (float64, float32, "
            "float16 or bfloat16 tensors are)",
        ),
        (
            {"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}},
            2,
            "x.safetensors [a]: shape [3] of float4_e2m1fn fills 12 bits, not whole bytes",
        ),
        (
            {"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}},
            1,
            'x.safetensors [a]: unknown dtype tag "Q4" (the format knows BOOL, F4, F6_E2M3, '
            "F6_E3M2, U8, I8, F8_E5M2, F8_E4M3, F8_E8M0, F8_E4M3FNUZ, F8_E5M2FNUZ, I16, U16, "
            "F16, BF16, I32, U32, F32, C64, F64, I64, U64)",
        ),
    ],
    ids=["metadata-number", "duplicate", "gap", "trailing", "overlap", "f8", "f4", "tag"],
)
def test_safetensors_rules(tmp_path, header, data, message):
    p = _st(tmp_path / "x.safetensors", header, bytes(data))
    assert _msg(tmp_path, vectors.load, p) == f"DumpError: {message}"


def test_lying_lengths_and_misnamed_files(tmp_path):
    p = tmp_path / "big.safetensors"
    p.write_bytes((10**15).to_bytes(8, "little") + b"{}")
    assert _msg(tmp_path, vectors.load, p) == (
        "DumpError: big.safetensors: header length 1000000000000000 is beyond the file "
        "(10 bytes) or the 100 MB limit"
    )
    torch.save({"a": torch.ones(3)}, tmp_path / "t.safetensors")
    assert _msg(tmp_path, vectors.load, tmp_path / "t.safetensors") == (
        "DumpError: t.safetensors: is a zip archive (torch.save writes these), not a "
        "safetensors file as its name says"
    )
    np.save(tmp_path / "n.npy", np.ones(3))
    os.replace(tmp_path / "n.npy", tmp_path / "n.pt")
    assert _msg(tmp_path, vectors.load, tmp_path / "n.pt") == (
        "DumpError: n.pt: is a .npy file, not a zip archive (torch.save writes these) as its "
        "name says"
    )
    _st(tmp_path / "s.gguf", {"a": F32x2}, bytes(8))
    assert _msg(tmp_path, vectors.load, tmp_path / "s.gguf") == (
        "DumpError: s.gguf: is a safetensors file, not a GGUF file as its name says"
    )
    _st(tmp_path / "s.txt", {"a": F32x2}, bytes(8))
    assert _msg(tmp_path, vectors.load, tmp_path / "s.txt") == (
        "DumpError: s.txt: unsupported vector file (expected .npy, .safetensors, .pt or "
        ".gguf); it is a safetensors file"
    )


# --------------------------------------------------------------------------- analyze (Rust)


def test_analyze_zero_rows_and_strictness(tmp_path):
    p = _st(
        tmp_path / "e.safetensors",
        {"h": {"dtype": "F32", "shape": [0, 4], "data_offsets": [0, 0]}},
        b"",
    )
    assert _msg(tmp_path, rank1fast.analyze, p, progress=False) == (
        "DumpError: e.safetensors [h]: the site has no rows (shape [0, 4]): nothing to analyze"
    )
    x = activations(40, 4)
    _st(
        tmp_path / "d.safetensors",
        {"h": {"dtype": "F32", "shape": [40, 4], "data_offsets": [0, 640]}},
        x.tobytes() + bytes(8),
    )
    assert _msg(tmp_path, rank1fast.analyze, tmp_path / "d.safetensors", progress=False) == (
        "DumpError: d.safetensors: 8 bytes after the last tensor's data: the tensors must end "
        "where the file ends"
    )
    _st(
        tmp_path / "q.safetensors",
        {"h": {"dtype": "F8_E4M3", "shape": [4, 4], "data_offsets": [0, 16]}},
        bytes(16),
    )
    assert _msg(tmp_path, rank1fast.analyze, tmp_path / "q.safetensors", progress=False) == (
        "DumpError: q.safetensors [h]: unsupported dtype float8_e4m3fn: sites must be "
        "float32, float16 or bfloat16"
    )
    torch.save(torch.ones(3, 3), tmp_path / "z.safetensors")
    assert _msg(tmp_path, rank1fast.analyze, tmp_path / "z.safetensors", progress=False) == (
        "DumpError: z.safetensors: is a zip archive (torch.save writes these), not a "
        "safetensors file as its name says"
    )


def test_analyze_npy_variants_are_named(tmp_path):
    be = _npy(
        tmp_path / "be.npy",
        "{'descr': '>f4', 'fortran_order': False, 'shape': (4, 2), }",
        bytes(32),
    )
    assert _msg(tmp_path, rank1fast.analyze, be, progress=False) == (
        "DumpError: be.npy: big-endian dtype '>f4': .npy sites must be little-endian (save "
        "x.astype(x.dtype.newbyteorder('<')))"
    )
    st = _npy(
        tmp_path / "st.npy",
        "{'descr': [('a', '<f4'), ('b', '<f4')], 'fortran_order': False, 'shape': (4,), }",
        bytes(32),
    )
    assert _msg(tmp_path, rank1fast.analyze, st, progress=False) == (
        "DumpError: st.npy: structured dtype (a record array): .npy sites must be plain "
        "float32 or float16 arrays"
    )


# --------------------------------------------------------------------------- .npy (Python)


@pytest.mark.parametrize("version", [1, 2, 3])
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("endian", ["<", ">"])
def test_npy_variants_read_exactly(tmp_path, version, order, endian):
    x = np.arange(12, dtype=np.float64).reshape(3, 4) * 0.25 - 1.0
    arr = np.asarray(x, dtype=f"{endian}f4", order=order)
    descr = np.lib.format.dtype_to_descr(arr.dtype)
    data = arr.tobytes(order="F" if order == "F" else "C")
    fortran = "True" if order == "F" else "False"
    p = _npy(
        tmp_path / "v.npy",
        f"{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': (3, 4), }}",
        data,
        version,
    )
    np.testing.assert_array_equal(np.load(p), x)  # numpy agrees the file is valid
    got = vectors.load(p)
    assert list(got) == [f"resid_post.{i}" for i in range(3)]
    for i in range(3):
        np.testing.assert_array_equal(got[f"resid_post.{i}"], x[i])


def test_npy_bfloat16_through_ml_dtypes_layout(tmp_path):
    v = np.array([1.0, -2.5, 3.140625, 0.0078125], np.float32)
    bits = (v.view(np.uint32) >> 16).astype("<u2")  # exact in bfloat16
    p = _npy(
        tmp_path / "b.npy",
        "{'descr': '<V2', 'fortran_order': False, 'shape': (4,), }",
        bits.tobytes(),
    )
    assert _msg(tmp_path, vectors.load, p) == (
        "DumpError: b.npy: 2-byte raw dtype '<V2' (how numpy stores ml_dtypes.bfloat16): "
        "pass dtype='bfloat16' to read it as bfloat16"
    )
    np.testing.assert_array_equal(vectors.load(p, dtype="bfloat16")["b"], v.astype(np.float64))
    np.save(tmp_path / "f.npy", v)
    assert _msg(tmp_path, vectors.load, tmp_path / "f.npy", dtype="bfloat16") == (
        "DumpError: f.npy: dtype='bfloat16' applies only to raw 2-byte ('<V2') arrays"
    )


def test_npy_refusals(tmp_path):
    np.save(tmp_path / "s.npy", np.zeros(3, dtype=[("a", "<f4"), ("b", "<i4")]))
    assert _msg(tmp_path, vectors.load, tmp_path / "s.npy") == (
        "DumpError: s.npy: structured dtype [('a', '<f4'), ('b', '<i4')] (a record array): "
        "expected a plain float array"
    )
    np.save(tmp_path / "z.npy", np.float32(3.0))
    assert _msg(tmp_path, vectors.load, tmp_path / "z.npy") == (
        "DumpError: z.npy [z]: a 0-d array (one number), not a steering vector"
    )
    np.save(tmp_path / "o.npy", np.array([1, "a"], dtype=object), allow_pickle=True)
    assert _msg(tmp_path, vectors.load, tmp_path / "o.npy") == (
        "DumpError: o.npy: holds Python objects (pickled data is never loaded)"
    )
    _npy(
        tmp_path / "t.npy",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000,), }",
        bytes(8),
    )
    assert _msg(tmp_path, vectors.load, tmp_path / "t.npy") == (
        "DumpError: t.npy: truncated: shape [1000000000] of <f4 needs 4000000000 data bytes, "
        "the file holds 8"
    )
    p = tmp_path / "h.npy"
    p.write_bytes(b"\x93NUMPY\x02\x00" + (2**31).to_bytes(4, "little") + b"{}")
    assert _msg(tmp_path, vectors.load, p) == (
        "DumpError: h.npy: header length 2147483648 is beyond the file (14 bytes) or the "
        "1048576 byte limit"
    )


def test_gguf_direction_must_be_1d(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "controlvector")
    w.add_tensor("direction.1", np.ones((2, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert _msg(tmp_path, vectors.load, tmp_path / "m.gguf") == (
        "DumpError: m.gguf [direction.1]: shape [4, 2]: a direction tensor is 1-D (llama.cpp "
        "refuses others)"
    )


# --------------------------------------------------------------------------- SAE layouts


def _enc_dec(d_in=12, d_sae=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d_in, d_sae, generator=g), torch.randn(d_sae, d_in, generator=g)


def test_gemma_scope_npz_file_and_folder(tmp_path):
    w_enc, w_dec = _enc_dec()
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_20" / "width_16k" / "average_l0_71"
    folder.mkdir(parents=True)
    np.savez(
        folder / "params.npz",
        W_enc=w_enc.numpy(),
        W_dec=w_dec.numpy(),
        b_dec=np.zeros(12, np.float32),
    )
    for path in (folder, folder / "params.npz"):
        got = vectors.from_sae(path, 7)
        assert list(got) == ["resid_post.20"]
        np.testing.assert_array_equal(got["resid_post.20"], w_dec[7].double().numpy())
    att = tmp_path / "gemma-scope-2b-pt-att" / "layer_3" / "width_16k" / "x"
    att.mkdir(parents=True)
    np.savez(att / "params.npz", W_enc=w_enc.numpy(), W_dec=w_dec.numpy())
    assert _msg(tmp_path, vectors.from_sae, att, 0) == (
        "SiteError: gemma-scope-2b-pt-att/layer_3/width_16k/x/params.npz: attention SAEs read "
        "hook_z (the heads before o_proj), which is no site; pass site="
    )
    assert list(vectors.from_sae(att, 0, site="resid_mid.3")) == ["resid_mid.3"]


def test_gemma_scope_2_safetensors_lowercase(tmp_path):
    w_enc, w_dec = _enc_dec(seed=1)
    folder = tmp_path / "resid_post_all" / "layer_7_width_16k_l0_big"
    folder.mkdir(parents=True)
    safetensors_torch.save_file(
        {"w_enc": w_enc, "w_dec": w_dec.to(torch.bfloat16), "threshold": torch.zeros(20)},
        str(folder / "params.safetensors"),
    )
    got = vectors.from_sae(folder / "params.safetensors", 19)
    assert list(got) == ["resid_post.7"]
    np.testing.assert_array_equal(
        got["resid_post.7"], w_dec[19].to(torch.bfloat16).double().numpy()
    )
    attn = tmp_path / "attn_out" / "layer_2_width_16k_l0_small"
    attn.mkdir(parents=True)
    safetensors_torch.save_file({"w_enc": w_enc, "w_dec": w_dec}, str(attn / "params.safetensors"))
    assert list(vectors.from_sae(attn, 0)) == ["resid_mid.2"]


def test_sparsify_layout(tmp_path):
    d_in, d_sae = 12, 24
    g = torch.Generator().manual_seed(2)
    w_dec = torch.randn(d_sae, d_in, generator=g)
    for name, site in [("layers.5", "resid_post.5"), ("layers.6.self_attn", "resid_mid.6")]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "cfg.json").write_text(json.dumps({"d_in": d_in, "num_latents": d_sae, "k": 8}))
        safetensors_torch.save_file(
            {
                "encoder.weight": torch.randn(d_sae, d_in),
                "encoder.bias": torch.zeros(d_sae),
                "W_dec": w_dec,
                "b_dec": torch.zeros(d_in),
            },
            str(folder / "sae.safetensors"),
        )
        got = vectors.from_sae(folder, 3)
        assert list(got) == [site]
        np.testing.assert_array_equal(got[site], w_dec[3].double().numpy())
    # expansion_factor instead of num_latents, decoder stored transposed: inferred from shapes.
    folder = tmp_path / "layers.1"
    folder.mkdir()
    (folder / "cfg.json").write_text(
        json.dumps({"d_in": d_in, "expansion_factor": 2, "num_latents": 0})
    )
    safetensors_torch.save_file({"W_dec": w_dec.T.contiguous()}, str(folder / "sae.safetensors"))
    np.testing.assert_array_equal(
        vectors.from_sae(folder, 3)["resid_post.1"], w_dec[3].double().numpy()
    )


def test_goodfire_and_openai_state_dicts(tmp_path):
    d_in, d_sae = 12, 30
    g = torch.Generator().manual_seed(3)
    enc, dec = torch.randn(d_sae, d_in, generator=g), torch.randn(d_in, d_sae, generator=g)
    gf = tmp_path / "Llama-3.1-8B-Instruct-SAE-l19.pth"
    torch.save(
        {
            "encoder_linear.weight": enc,
            "encoder_linear.bias": torch.zeros(d_sae),
            "decoder_linear.weight": dec,
            "decoder_linear.bias": torch.zeros(d_in),
        },
        gf,
    )
    got = vectors.from_sae(gf, 11)
    assert list(got) == ["resid_post.19"]
    np.testing.assert_array_equal(got["resid_post.19"], dec[:, 11].double().numpy())

    folder = tmp_path / "resid_post_attn_v5_32k"
    folder.mkdir()
    torch.save(
        {
            "encoder.weight": enc,
            "decoder.weight": dec,
            "pre_bias": torch.zeros(d_in),
            "latent_bias": torch.zeros(d_sae),
            "stats_last_nonzero": torch.zeros(d_sae),
        },
        folder / "4.pt",
    )
    got = vectors.from_sae(folder / "4.pt", 2)
    assert list(got) == ["resid_mid.4"]
    np.testing.assert_array_equal(got["resid_mid.4"], dec[:, 2].double().numpy())


def test_llama_scope_rows_in_model_space(tmp_path):
    d_model, d_sae = 16, 32
    g = torch.Generator().manual_seed(4)
    decoder = torch.randn(d_model, d_sae, generator=g)
    (tmp_path / "hyperparams.json").write_text(
        json.dumps(
            {
                "d_model": d_model,
                "d_sae": d_sae,
                "hook_point_in": "blocks.3.hook_resid_post",
                "hook_point_out": "blocks.3.hook_resid_post",
                "norm_activation": "dataset-wise",
                "dataset_average_activation_norm": {"in": 10.0, "out": 12.0},
            }
        )
    )
    (tmp_path / "checkpoints").mkdir()
    safetensors_torch.save_file(
        {"decoder.weight": decoder}, str(tmp_path / "checkpoints" / "final.safetensors")
    )
    stored = decoder[:, 5].double().numpy()
    np.testing.assert_allclose(
        vectors.from_sae(tmp_path, 5)["resid_post.3"], stored * 12.0 / 4.0, rtol=1e-15
    )
    np.testing.assert_array_equal(
        vectors.from_sae(tmp_path, 5, model_space=False)["resid_post.3"], stored
    )


def test_sae_layout_errors(tmp_path):
    assert _msg(tmp_path, vectors.from_sae, tmp_path / "nope", 0) == (
        "PathNotFoundError: nope: no such file or directory"
    )
    (tmp_path / "notes.txt").write_text("x")
    msg = _msg(tmp_path, vectors.from_sae, tmp_path, 0)
    assert (
        msg.startswith("DumpError: " + str(tmp_path).rstrip("/").replace(f"{tmp_path}", "")) or msg
    )
    assert msg.endswith("; ".join(vectors.SAE_LAYOUTS))
    assert "unsupported SAE layout; rank1fast reads: SAELens" in msg
    (tmp_path / "cfg.json").write_text(json.dumps({"d_in": 4, "d_sae": 8, "hook_name": "x"}))
    safetensors_torch.save_file(
        {"W_dec": torch.zeros(8, 5)}, str(tmp_path / "sae_weights.safetensors")
    )
    assert _msg(tmp_path, vectors.from_sae, tmp_path, 0) == (
        "DumpError: sae_weights.safetensors: decoder shape [8, 5] is neither [d_sae, d_in] = "
        "[8, 4] nor its transpose (SAELens)"
    )
    (tmp_path / "pt").mkdir()
    torch.save({"w": torch.zeros(2)}, tmp_path / "pt" / "other.pt")
    msg = _msg(tmp_path, vectors.from_sae, tmp_path / "pt" / "other.pt", 0)
    assert msg.startswith("DumpError: pt/other.pt: unsupported SAE layout (a state dict with w)")


# --------------------------------------------------------------------------- adapters


CONFIG = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "r": 1,
    "lora_alpha": 1,
    "target_modules": ["o_proj"],
    "bias": "none",
}
O_PROJ = "model.layers.0.self_attn.o_proj"


def _adapter(path: Path, keys: list[str], config=CONFIG) -> Path:
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps(config))
    write_safetensors(
        path / "adapter_model.safetensors",
        {k: ("float32", (1, 8) if "lora_A" in k else (8, 1), bytes(32)) for k in keys},
    )
    return path


@pytest.mark.parametrize(
    "keys,message",
    [
        (
            [
                f"base_model.model.base_model.model.{O_PROJ}.lora_A.weight",
                f"base_model.model.base_model.model.{O_PROJ}.lora_B.weight",
            ],
            f"PEFT would not load base_model.model.base_model.model.{O_PROJ}.lora_A.weight: the "
            "'base_model.model.' prefix is doubled (2 such tensors)",
        ),
        (
            [f"{O_PROJ}.lora_A.weight", f"{O_PROJ}.lora_B.weight"],
            f"PEFT would not load {O_PROJ}.lora_A.weight: PEFT keys start with 'base_model.model.' "
            "(2 such tensors)",
        ),
        (
            [
                f"base_model.model.{O_PROJ}.lora_A.default.weight",
                f"base_model.model.{O_PROJ}.lora_B.weight",
            ],
            f"PEFT would not load base_model.model.{O_PROJ}.lora_A.default.weight: not "
            "<module>.lora_A/lora_B.weight (an adapter name inside the key, as in "
            "lora_A.default.weight, is not what PEFT saves: it would look for "
            "lora_A.default.default.weight)",
        ),
        (
            [
                "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight",
                "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight",
            ],
            "PEFT would not load base_model.model.model.layers.0.mlp.down_proj.lora_A.weight: "
            "module model.layers.0.mlp.down_proj matches no target_modules entry ['o_proj'] "
            "(2 such tensors)",
        ),
    ],
    ids=["doubled-prefix", "no-prefix", "adapter-name", "not-targeted"],
)
def test_check_refuses_keys_peft_would_not_load(tmp_path, keys, message):
    ad = _adapter(tmp_path / "a", keys)
    problems = [p for p in serving.check(ad, "peft") if p.rule == "tensor_keys"]
    assert [p.message for p in problems] == [
        message + "; the adapter would silently do nothing there"
    ]


def test_check_layers_to_transform(tmp_path):
    config = dict(CONFIG, layers_to_transform=[1])
    ad = _adapter(
        tmp_path / "a",
        [f"base_model.model.{O_PROJ}.lora_A.weight", f"base_model.model.{O_PROJ}.lora_B.weight"],
        config,
    )
    (p,) = [p for p in serving.check(ad, "peft") if p.rule == "tensor_keys"]
    assert "outside layers_to_transform [1]" in p.message


def test_merge_refuses_what_peft_would_not_load(tmp_path, tiny_llama_dir):
    ad = _adapter(
        tmp_path / "a",
        [
            f"base_model.model.base_model.model.{O_PROJ}.lora_A.weight",
            f"base_model.model.base_model.model.{O_PROJ}.lora_B.weight",
        ],
    )
    assert _msg(tmp_path, rank1fast.merge_adapter, tiny_llama_dir, ad, tmp_path / "out") == (
        f"DumpError: a/adapter_model.safetensors [base_model.model.base_model.model.{O_PROJ}.lora_A"
        ".weight]: PEFT would not load this key (it loads "
        "base_model.model.<module>.lora_A.weight, the prefix once and no adapter name): "
        "refusing to merge what the served adapter would not apply"
    )
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- fuzz


def test_fuzz_python_readers_raise_only_typed_errors(tmp_path):
    """Mutated valid files through every Python reader: only Rank1Error (or FileNotFoundError)
    may escape. RANK1FAST_FUZZ_CASES sets the number of cases (default 300 per reader)."""
    from fuzz_readers import fuzz

    n = int(os.environ.get("RANK1FAST_FUZZ_CASES", "300"))
    counts = fuzz(tmp_path, n, seed=0)
    assert set(counts) == {"safetensors", "npy", "pt", "gguf", "sae", "adapter"}
    for reader, (ok, typed) in counts.items():
        assert ok + typed == n, reader
        assert typed > 0, reader  # the mutations do reach the error paths


_LYING = r"""
import json, struct, sys
from pathlib import Path
import numpy as np, torch
import rank1fast
from rank1fast import serving, vectors
from rank1fast.errors import Rank1Error

t = Path(sys.argv[1])
def st(name, header, data=b""):
    h = json.dumps(header).encode()
    (t / name).write_bytes(struct.pack("<Q", len(h)) + h + data)
    return t / name

def raw(name, data):
    (t / name).write_bytes(data)
    return t / name

files = [raw("len.safetensors", (10**15).to_bytes(8, "little") + b"{}")]
huge = {"dtype": "F32", "shape": [10**6, 10**5], "data_offsets": [0, 4 * 10**11]}
files.append(st("off.safetensors", {"h": huge}, bytes(64)))
h = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 100000), }"
h = h.encode() + b" " * (-(11 + len(h)) % 64) + b"\n"
files.append(raw("shape.npy", b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h + bytes(64)))
files.append(raw("hlen.npy", b"\x93NUMPY\x02\x00" + (2**31).to_bytes(4, "little") + b"{}"))
torch.save({"5": torch.ones(4)}, t / "z.pt")
zb = bytearray((t / "z.pt").read_bytes())
cd = zb.rfind(b"PK\x01\x02")  # the last member's central directory entry
zb[cd + 20 : cd + 28] = struct.pack("<II", 2**31, 2**31)  # compressed and uncompressed sizes
files.append(raw("zip.pt", bytes(zb)))
import gguf
w = gguf.GGUFWriter(str(t / "c.gguf"), "controlvector")
w.add_array("controlvector.layers", [1, 2, 3])
w.add_tensor("direction.1", np.ones(4, np.float32))
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
gb = bytearray((t / "c.gguf").read_bytes())
struct.pack_into("<Q", gb, gb.find(b"controlvector.layers") + 28, 2**60)
files.append(raw("count.gguf", bytes(gb)))

def run():
    for f in files:
        for fn in (vectors.load, lambda x: rank1fast.analyze(x, progress=False)):
            if f.suffix in (".pt", ".gguf") and fn is not vectors.load:
                continue
            try:
                fn(f)
            except Rank1Error:
                pass
    d = t / "ad"; d.mkdir(exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1}))
    (d / "adapter_model.safetensors").write_bytes((t / "len.safetensors").read_bytes())
    serving.check(d, "peft")
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
before = status("VmRSS")
if len(sys.argv) > 2:  # the check of this check: a real allocation of what a header claims
    np.ones(int(sys.argv[2]) // 8).sum()
run()
print((status("VmHWM") - before) // 1024)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_lying_headers_allocate_nothing(tmp_path):
    """Headers that claim terabytes (a safetensors header length and offsets, a .npy shape and
    header length, a torch zip member size, a GGUF array count) are refused before any
    allocation: the peak resident memory of a process reading them all grows by < 20 MiB (and
    by more when it does allocate 64 MiB, so the measure can fail)."""
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run(
        [sys.executable, "-c", _LYING, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert int(out.stdout.strip()) < 20, out.stdout + out.stderr
    out = subprocess.run(
        [sys.executable, "-c", _LYING, str(tmp_path), str(64 << 20)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert int(out.stdout.strip()) >= 60, out.stdout + out.stderr


def test_check_refuses_a_torch_zip_whose_member_lies(tmp_path):
    ad = tmp_path / "a"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps(CONFIG))
    key = f"base_model.model.{O_PROJ}.lora_A.weight"
    torch.save({key: torch.ones(1, 8)}, ad / "adapter_model.bin")
    zb = bytearray((ad / "adapter_model.bin").read_bytes())
    cd = zb.rfind(b"PK\x01\x02")
    zb[cd + 20 : cd + 28] = struct.pack("<II", 2**31, 2**31)
    (ad / "adapter_model.bin").write_bytes(bytes(zb))
    (p,) = [p for p in serving.check(ad, "peft") if p.rule == "weights"]
    # The last member's name and offset depend on the torch version that wrote the file.
    assert re.fullmatch(
        r"\[adapter_model/[^\]]+\]: 2147483648 bytes at offset \d+ lie beyond the file "
        rf"\({len(zb)} bytes\)",
        p.message,
    ), p.message


def test_saelens_old_cfg_hook_point(tmp_path):
    # SAELens before 3.0 named the hook "hook_point"; resid_pre of block 2 is resid_post.1.
    (tmp_path / "cfg.json").write_text(
        json.dumps({"d_in": 4, "d_sae": 6, "hook_point": "blocks.2.hook_resid_pre"})
    )
    w = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    safetensors_torch.save_file({"W_dec": w}, str(tmp_path / "sae_weights.safetensors"))
    got = vectors.from_sae(tmp_path, 5)
    assert list(got) == ["resid_post.1"]
    np.testing.assert_array_equal(got["resid_post.1"], [20.0, 21.0, 22.0, 23.0])


def test_gguf_counts_are_checked_before_gguf_py_reads_them(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "c.gguf"), "controlvector")
    w.add_array("controlvector.layers", [1, 2, 3])
    w.add_tensor("direction.1", np.ones(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = bytearray((tmp_path / "c.gguf").read_bytes())
    np.testing.assert_array_equal(vectors.load(tmp_path / "c.gguf")["resid_post.1"], np.ones(4))
    at = data.find(b"controlvector.layers") + len("controlvector.layers") + 8  # type, item type
    assert struct.unpack_from("<Q", data, at)[0] == 3
    struct.pack_into("<Q", data, at, 2**60)  # gguf-py would loop (and allocate) 2^60 times
    (tmp_path / "c.gguf").write_bytes(bytes(data))
    assert _msg(tmp_path, vectors.load, tmp_path / "c.gguf") == (
        f"DumpError: c.gguf: the {2**60}-item array controlvector.layers needs {2**62} bytes "
        f"at offset {at + 8}, the file has {len(data) - at - 8} left"
    )


def test_merge_refuses_modules_peft_would_not_target(tmp_path, tiny_llama_dir):
    down = "model.layers.0.mlp.down_proj"
    ad = _adapter(
        tmp_path / "a",
        [f"base_model.model.{down}.lora_A.weight", f"base_model.model.{down}.lora_B.weight"],
    )
    assert _msg(tmp_path, rank1fast.merge_adapter, tiny_llama_dir, ad, tmp_path / "out") == (
        f"DumpError: a/adapter_model.safetensors [base_model.model.{down}.lora_A.weight]: module "
        f"{down} is not in target_modules: PEFT would not load this key; refusing to merge what "
        "the served adapter would not apply"
    )
    assert not (tmp_path / "out").exists()
