"""Steering vectors: files (.npy, .safetensors, .pt, control-vector GGUF), SAE decoder rows
(SAELens and Llama Scope layouts, built here) and contrastive vectors on a real model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from rank1fast import vectors
from rank1fast.errors import DumpError, InvalidArgumentError, PathNotFoundError, Rank1IOError

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")
safetensors_torch = pytest.importorskip("safetensors.torch")


def _rng(seed=0):
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------- plain files


def test_npy_single_and_stacked(tmp_path):
    v = _rng().normal(size=16)
    np.save(tmp_path / "happy.npy", v)
    assert list(vectors.load(tmp_path / "happy.npy")) == ["happy"]
    got = vectors.load(tmp_path / "happy.npy", site="resid_mid.3")
    np.testing.assert_array_equal(got["resid_mid.3"], v)

    stack = _rng(1).normal(size=(4, 8)).astype(np.float32)
    np.save(tmp_path / "layers.npy", stack)
    got = vectors.load(tmp_path / "layers.npy")
    assert list(got) == [f"resid_post.{i}" for i in range(4)]
    np.testing.assert_array_equal(got["resid_post.2"], stack[2].astype(np.float64))
    got = vectors.load(tmp_path / "layers.npy", layer_site="resid_mid.{layer}")
    assert "resid_mid.3" in got


def test_save_load_roundtrip_safetensors(tmp_path):
    vecs = {"resid_mid.5": _rng(2).normal(size=12), "model.layers.1.mlp.down_proj": np.ones(12)}
    path = vectors.save(vecs, tmp_path / "v.safetensors")
    back = vectors.load(path)
    assert list(back) == sorted(vecs) or set(back) == set(vecs)
    for k, v in vecs.items():
        np.testing.assert_array_equal(back[k], v.astype(np.float32).astype(np.float64))
    with pytest.raises(InvalidArgumentError):
        vectors.save(vecs, tmp_path / "v.npy")
    with pytest.raises(InvalidArgumentError):
        vectors.save({"a": np.ones((2, 2))}, tmp_path / "w.safetensors")


def test_safetensors_bf16_and_direction_names(tmp_path):
    t = torch.randn(10).to(torch.bfloat16)
    safetensors_torch.save_file({"direction.7": t, "3": t.clone()}, str(tmp_path / "d.safetensors"))
    got = vectors.load(tmp_path / "d.safetensors")
    assert set(got) == {"resid_post.7", "resid_post.3"}
    np.testing.assert_array_equal(got["resid_post.7"], t.float().numpy().astype(np.float64))


def test_pt_tensor_and_repeng_style_dict(tmp_path):
    d = {5: torch.randn(8), 6: torch.randn(8)}  # repeng's ControlVector.directions
    torch.save(d, tmp_path / "dirs.pt")
    got = vectors.load(tmp_path / "dirs.pt")
    assert set(got) == {"resid_post.5", "resid_post.6"}
    np.testing.assert_allclose(got["resid_post.6"], d[6].numpy())
    torch.save(torch.randn(8), tmp_path / "one.pt")
    assert list(vectors.load(tmp_path / "one.pt", site="resid_mid.2")) == ["resid_mid.2"]


def test_bad_files(tmp_path):
    with pytest.raises(PathNotFoundError):
        vectors.load(tmp_path / "missing.npy")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DumpError, match="unsupported"):
        vectors.load(tmp_path / "x.txt")
    np.save(tmp_path / "cube.npy", np.zeros((2, 2, 2)))
    with pytest.raises(DumpError, match="1-D"):
        vectors.load(tmp_path / "cube.npy")
    np.save(tmp_path / "nan.npy", np.array([1.0, np.nan]))
    with pytest.raises(DumpError, match="NaN"):
        vectors.load(tmp_path / "nan.npy")
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(DumpError, match="junk.safetensors"):
        vectors.load(tmp_path / "junk.safetensors")
    (tmp_path / "adir.safetensors").mkdir()
    with pytest.raises(InvalidArgumentError, match="adir.safetensors: is a directory"):
        vectors.load(tmp_path / "adir.safetensors")


def test_save_refusals_are_typed_and_leave_nothing(tmp_path):
    with pytest.raises(Rank1IOError, match="nodir/v.safetensors: cannot write the vectors"):
        vectors.save({"resid_post.3": np.ones(4)}, tmp_path / "nodir" / "v.safetensors")
    with pytest.raises(InvalidArgumentError, match="resid_post.3: not numbers"):
        vectors.save({"resid_post.3": "abc"}, tmp_path / "v.safetensors")
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(Rank1IOError, match="d.safetensors: cannot write the vectors"):
        vectors.save({"resid_post.3": np.ones(4)}, tmp_path / "d.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.safetensors"]


# --------------------------------------------------------------------------- GGUF


def _write_control_vector(path, directions, arch="controlvector"):
    """A control vector the way repeng's export_gguf and llama.cpp's cvector-generator write it."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_string(f"{arch}.model_hint", "llama")
    w.add_uint32(f"{arch}.layer_count", len(directions))
    for layer, v in directions.items():
        w.add_tensor(f"direction.{layer}", np.asarray(v, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_control_vector_roundtrip(tmp_path):
    rng = _rng(3)
    dirs = {layer: rng.normal(size=32).astype(np.float32) for layer in (1, 2, 10, 29)}
    _write_control_vector(tmp_path / "happy.gguf", dirs)
    got = vectors.load(tmp_path / "happy.gguf")
    # llama.cpp adds direction.L to the output of block L: the residual after layer L.
    assert list(got) == ["resid_post.1", "resid_post.2", "resid_post.10", "resid_post.29"]
    for layer, v in dirs.items():
        np.testing.assert_array_equal(got[f"resid_post.{layer}"], v.astype(np.float64))
    # ... and a file written from what we read gives the same vectors back.
    _write_control_vector(
        tmp_path / "again.gguf", {int(k.split(".")[1]): v for k, v in got.items()}
    )
    again = vectors.load(tmp_path / "again.gguf")
    for k in got:
        np.testing.assert_array_equal(again[k], got[k])


def test_gguf_rejects_layer_zero_and_model_files(tmp_path):
    _write_control_vector(tmp_path / "zero.gguf", {0: np.ones(4), 1: np.ones(4)})
    with pytest.raises(DumpError, match="layer 0"):
        vectors.load(tmp_path / "zero.gguf")
    _write_control_vector(tmp_path / "model.gguf", {1: np.ones(4)}, arch="llama")
    with pytest.raises(DumpError, match="controlvector"):
        vectors.load(tmp_path / "model.gguf")


# --------------------------------------------------------------------------- SAEs


@pytest.mark.parametrize("layout", ["saelens5", "saelens6", "saelens-bf16"])
def test_saelens_layout(tmp_path, layout):
    d_in, d_sae = 24, 40
    w_dec = torch.randn(d_sae, d_in)
    if layout == "saelens-bf16":
        w_dec = w_dec.to(torch.bfloat16)
    cfg = {"d_in": d_in, "d_sae": d_sae, "architecture": "standard"}
    if layout == "saelens6":
        cfg["metadata"] = {"hook_name": "blocks.7.hook_resid_post", "model_name": "x"}
    else:
        cfg["hook_name"] = "blocks.7.hook_resid_post"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    safetensors_torch.save_file(
        {"W_dec": w_dec, "W_enc": torch.randn(d_in, d_sae), "b_dec": torch.zeros(d_in)},
        str(tmp_path / "sae_weights.safetensors"),
    )
    got = vectors.from_sae(tmp_path, 13)
    assert list(got) == ["resid_post.7"]
    np.testing.assert_array_equal(got["resid_post.7"], w_dec[13].float().numpy())
    unit = vectors.from_sae(tmp_path / "cfg.json", 13, unit=True, site="resid_mid.2")
    assert list(unit) == ["resid_mid.2"]
    assert np.linalg.norm(unit["resid_mid.2"]) == pytest.approx(1.0)
    with pytest.raises(InvalidArgumentError, match="d_sae=40"):
        vectors.from_sae(tmp_path, 40)


def test_llama_scope_layout(tmp_path):
    d_model, d_sae = 16, 48
    decoder = torch.randn(d_model, d_sae)  # nn.Linear weight: [out = d_model, in = d_sae]
    (tmp_path / "hyperparams.json").write_text(
        json.dumps(
            {
                "d_model": d_model,
                "d_sae": d_sae,
                "hook_point_in": "blocks.3.ln2.hook_normalized",
                "hook_point_out": "blocks.3.hook_mlp_out",
                "norm_activation": "dataset-wise",
                "dataset_average_activation_norm": {"in": 4.0, "out": 4.0},
            }
        )
    )
    (tmp_path / "checkpoints").mkdir()
    safetensors_torch.save_file(
        {
            "decoder.weight": decoder,
            "decoder.bias": torch.zeros(d_model),
            "encoder.weight": torch.randn(d_sae, d_model),
            "encoder.bias": torch.zeros(d_sae),
        },
        str(tmp_path / "checkpoints" / "final.safetensors"),
    )
    got = vectors.from_sae(tmp_path, 5)
    # The transcoder writes to the MLP output: the same addition as resid_post.3.
    assert list(got) == ["resid_post.3"]
    np.testing.assert_array_equal(got["resid_post.3"], decoder[:, 5].numpy())


def test_sae_errors(tmp_path):
    with pytest.raises(DumpError, match="unsupported SAE layout; rank1fast reads: SAELens"):
        vectors.from_sae(tmp_path, 0)
    (tmp_path / "cfg.json").write_text(json.dumps({"d_in": 4, "d_sae": 8}))
    with pytest.raises(PathNotFoundError, match="sae_weights"):
        vectors.from_sae(tmp_path, 0)
    # A decoder stored [d_in, d_sae] is read by columns: the orientation comes from the shape.
    w = torch.randn(4, 8)
    safetensors_torch.save_file({"W_dec": w}, str(tmp_path / "sae_weights.safetensors"))
    got = vectors.from_sae(tmp_path, 3, site="resid_mid.0")["resid_mid.0"]
    np.testing.assert_array_equal(got, w[:, 3].double().numpy())
    safetensors_torch.save_file(
        {"W_dec": w[:, :7].contiguous()}, str(tmp_path / "sae_weights.safetensors")
    )
    with pytest.raises(DumpError, match=r"decoder shape \[4, 7\] is neither"):
        vectors.from_sae(tmp_path, 0, site="resid_mid.0")


@pytest.mark.parametrize(
    "hook,site",
    [
        ("blocks.12.hook_resid_post", "resid_post.12"),
        ("blocks.12.hook_mlp_out", "resid_post.12"),
        ("blocks.4.hook_attn_out", "resid_mid.4"),
        ("blocks.4.hook_resid_mid", "resid_mid.4"),
        ("blocks.4.hook_resid_pre", "resid_post.3"),
        ("blocks.0.hook_resid_pre", None),
        ("blocks.4.attn.hook_z", None),
    ],
)
def test_site_from_hook(hook, site):
    assert vectors.site_from_hook(hook) == site


# --------------------------------------------------------------------------- contrastive


def test_contrastive_matches_hidden_state_differences(tiny_llama, tokenizer):
    """resid_mid.L + resid_post.L outputs sum to h[L+1] - h[L] (a Llama block's two writes)."""
    pos = ["A happy sunny day.", "I love it so much!", "Great news everyone"]
    neg = ["A sad rainy day.", "I hate it so much!", "Terrible news everyone"]
    layer = 1
    got = vectors.contrastive(
        (tiny_llama, tokenizer), pos, neg, [f"resid_mid.{layer}", f"resid_post.{layer}"]
    )
    assert set(got) == {f"resid_mid.{layer}", f"resid_post.{layer}"}

    def side(prompts, tokens):
        out = []
        for p in prompts:
            enc = tokenizer(p, return_tensors="pt")
            with torch.no_grad():
                hs = tiny_llama(**enc, output_hidden_states=True).hidden_states
            delta = (hs[layer + 1] - hs[layer])[0].double()
            out.append(delta[1:].mean(0) if tokens == "mean" else delta[-1])
        return torch.stack(out).mean(0).numpy()

    ref = side(pos, "mean") - side(neg, "mean")
    np.testing.assert_allclose(
        got[f"resid_mid.{layer}"] + got[f"resid_post.{layer}"], ref, rtol=1e-4, atol=1e-5
    )
    last = vectors.contrastive(
        (tiny_llama, tokenizer), pos, neg, f"resid_mid.{layer},resid_post.{layer}", tokens="last"
    )
    np.testing.assert_allclose(
        sum(last.values()), side(pos, "last") - side(neg, "last"), rtol=1e-4, atol=1e-5
    )
    single = vectors.contrastive((tiny_llama, tokenizer), pos, neg, f"resid_mid.{layer}")
    assert isinstance(single, np.ndarray) and single.shape == (64,)
    np.testing.assert_allclose(single, got[f"resid_mid.{layer}"])
    with pytest.raises(InvalidArgumentError):
        vectors.contrastive((tiny_llama, tokenizer), [], neg, "resid_mid.0")
    with pytest.raises(InvalidArgumentError):
        vectors.contrastive((tiny_llama, tokenizer), pos, neg, "resid_mid.0", tokens="first")


def test_load_sites_filters_and_names_what_is_missing(tmp_path):
    from rank1fast.errors import AdapterError
    from rank1fast.vectors import load_sites
    from safetensors.numpy import save_file

    path = tmp_path / "v.safetensors"
    ones = np.ones(4, np.float32)
    save_file({"resid_mid.1": ones, "resid_post.2": 0 * ones}, path)
    assert sorted(load_sites(path, None)) == ["resid_mid.1", "resid_post.2"]
    assert list(load_sites(path, ["resid_post.2"])) == ["resid_post.2"]
    with pytest.raises(AdapterError, match="no vector for resid_mid.9"):
        load_sites(path, ["resid_mid.9"])
