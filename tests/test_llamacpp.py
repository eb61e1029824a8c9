"""llama.cpp interop: PEFT LoRA <-> GGUF LoRA, steering vectors -> control-vector GGUF.

The fast tests check the file layout (names, shapes, metadata, llama.cpp's q/k row permutation
against transformers' own inverse of it), the round trip and the errors, without llama.cpp. The
slow tests load the default model's GGUF in llama.cpp itself (llama-cpp-python) and compare:

- the GGUF LoRA of a rank1fast adapter at resid_post.5 and resid_post.15 against the equivalent
  control vector, KL(cvec || lora) next to the PEFT path's KL(hook || adapter) on the same texts;
- a random LoRA on every projection of one layer (q/k included): llama.cpp with the GGUF against
  transformers + PEFT, which only agree if names, orientation and the q/k permutation are right.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import rank1fast
from rank1fast.cli import main
from rank1fast.errors import AdapterError, PathNotFoundError
from rank1fast.llamacpp import (
    control_vector_layer,
    control_vector_to_gguf,
    gguf_tensor_name,
    gguf_to_lora,
    load_llama,
    lora_to_gguf,
    no_repack,
    set_control_vector,
)

gguf = pytest.importorskip("gguf")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

N_HEAD, N_KV, HIDDEN, FF = 4, 2, 16, 24
PROJ = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),  # (n_out, n_in)
    "self_attn.k_proj": (HIDDEN // N_HEAD * N_KV, HIDDEN),
    "self_attn.v_proj": (HIDDEN // N_HEAD * N_KV, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (FF, HIDDEN),
    "mlp.up_proj": (FF, HIDDEN),
    "mlp.down_proj": (HIDDEN, FF),
}
STEM = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _reader(path):
    return gguf.GGUFReader(path)


def _field(reader, key):
    f = reader.get_field(key)
    return None if f is None else f.contents()


def _tensors(reader):
    """{name: (GGUF shape [ne0, ne1, ...], numpy data)}."""
    return {t.name: ([int(x) for x in t.shape], np.array(t.data)) for t in reader.tensors}


def _peft_dir(path, modules, *, r=2, alpha=4.0, seed=0, **config):
    """A PEFT LoRA directory with random factors on ``modules`` ({path: (n_out, n_in)})."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    tensors = {}
    for module, (n_out, n_in) in modules.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = rng.normal(size=(r, n_in)).astype(
            np.float32
        )
        tensors[f"base_model.model.{module}.lora_B.weight"] = rng.normal(size=(n_out, r)).astype(
            np.float32
        )
    safetensors_numpy.save_file(tensors, str(path / "adapter_model.safetensors"))
    doc = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "tiny/llama",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
        "bias": "none",
        **config,
    }
    (path / "adapter_config.json").write_text(json.dumps(doc))
    return tensors


def _all_modules(layers=(1, 2)):
    return {f"model.layers.{i}.{rel}": shape for i in layers for rel, shape in PROJ.items()}


@pytest.fixture
def base_gguf(tmp_path):
    """A stand-in for the base model's GGUF: architecture, head counts, weight shapes."""
    path = tmp_path / "base.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 3)
    w.add_uint32("llama.attention.head_count", N_HEAD)
    w.add_uint32("llama.attention.head_count_kv", N_KV)
    for i in range(3):
        for rel, shape in PROJ.items():
            w.add_tensor(f"blk.{i}.{STEM[rel]}.weight", np.zeros(shape, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _reverse_permute(weights, n_head, n_kv):
    """transformers' inverse of llama.cpp's q/k permutation (what its GGUF loader applies)."""
    pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    return LlamaTensorProcessor()._reverse_permute_weights(weights, n_head, n_kv)


# --------------------------------------------------------------------------- names


def test_tensor_names_and_control_vector_layers():
    assert gguf_tensor_name("model.layers.5.self_attn.o_proj") == "blk.5.attn_output.weight"
    assert gguf_tensor_name("model.layers.5.mlp.down_proj") == "blk.5.ffn_down.weight"
    assert gguf_tensor_name("base_model.model.model.layers.12.self_attn.q_proj") == (
        "blk.12.attn_q.weight"
    )
    for bad in ("lm_head", "model.embed_tokens", "model.layers.1.self_attn.qkv_proj"):
        with pytest.raises(AdapterError, match="map to llama.cpp"):
            gguf_tensor_name(bad)

    assert control_vector_layer("resid_post.15") == 15
    assert control_vector_layer("model.layers.7.mlp.down_proj") == 7
    with pytest.raises(AdapterError, match="no control-vector equivalent"):
        control_vector_layer("resid_mid.15")
    with pytest.raises(AdapterError, match="block 0"):
        control_vector_layer("resid_post.0")
    with pytest.raises(AdapterError, match="index from 0"):
        control_vector_layer("resid_post.-1")
    with pytest.raises(AdapterError, match="only resid_post"):
        control_vector_layer("model.layers.3.self_attn.o_proj")


# --------------------------------------------------------------------------- LoRA layout


def test_lora_gguf_layout_matches_the_converter(tmp_path, base_gguf):
    tensors = _peft_dir(tmp_path / "ad", _all_modules(), r=2, alpha=4.0)
    out = lora_to_gguf(tmp_path / "ad", tmp_path / "ad.gguf", base=base_gguf)
    reader = _reader(out)
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "general.type") == "adapter"
    assert _field(reader, "adapter.type") == "lora"
    assert _field(reader, "adapter.lora.alpha") == 4.0
    got = _tensors(reader)
    assert len(got) == 2 * 2 * len(PROJ)
    for module, (n_out, n_in) in _all_modules().items():
        name = gguf_tensor_name(module)
        (shape_a, a), (shape_b, b) = got[f"{name}.lora_a"], got[f"{name}.lora_b"]
        # GGUF order: lora_a [n_in, r], lora_b [r, n_out] (llama.cpp checks a.ne[0] == W.ne[0],
        # b.ne[1] == W.ne[1] and a.ne[1] == b.ne[0]); numpy order is PEFT's.
        assert shape_a == [n_in, 2] and shape_b == [2, n_out]
        assert a.dtype == np.float32 and b.dtype == np.float32
        np.testing.assert_array_equal(a, tensors[f"base_model.model.{module}.lora_A.weight"])
        peft_b = tensors[f"base_model.model.{module}.lora_B.weight"]
        if module.endswith(("q_proj", "k_proj")):
            # Rows permuted as llama.cpp stores q/k: transformers' GGUF loader undoes it.
            assert not np.array_equal(b, peft_b)
            kv = N_KV if module.endswith("k_proj") else N_HEAD
            np.testing.assert_array_equal(_reverse_permute(b, N_HEAD, kv), peft_b)
        else:
            np.testing.assert_array_equal(b, peft_b)


def test_permutation_matches_the_default_models_own_q_and_k():
    """The permutation is the one llama.cpp's converter applied to the default model's weights:
    undoing it with transformers' loader and redoing it with ours is the identity on real data."""
    pytest.importorskip("torch")
    from rank1fast.llamacpp import _permute
    from rank1fast.models import DEFAULT_GGUF, default_model_path

    reader = gguf.GGUFReader(default_model_path() / DEFAULT_GGUF)
    heads = {"attn_q": 9, "attn_k": 3}
    for t in reader.tensors:
        stem = t.name.split(".")[2] if t.name.startswith("blk.3.") else None
        if stem in heads:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
            hf = _reverse_permute(w, 9, heads[stem])
            np.testing.assert_array_equal(_permute(hf, heads[stem]), w)
            np.testing.assert_array_equal(_permute(w, heads[stem], inverse=True), hf)


def test_round_trip_of_a_rank1fast_adapter(tmp_path, base_gguf):
    from synth import activations

    x = activations(400, FF, massive_cv=0.05)
    np.save(tmp_path / "model.layers.2.mlp.down_proj.npy", x)
    report = rank1fast.analyze(tmp_path / "model.layers.2.mlp.down_proj.npy", progress=False)
    v = np.random.default_rng(1).normal(size=HIDDEN)
    ad = rank1fast.write_adapter(
        report, {"model.layers.2.mlp.down_proj": v}, tmp_path / "ad", scale=3.0, rank=8
    )
    out = lora_to_gguf(ad, tmp_path / "ad.gguf")
    back = gguf_to_lora(out, tmp_path / "back")
    for name in ("adapter_config.json", "rank1fast.json"):
        assert (back / name).read_bytes() == (ad / name).read_bytes()
    before = safetensors_numpy.load_file(str(ad / "adapter_model.safetensors"))
    after = safetensors_numpy.load_file(str(back / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    for k in before:
        assert after[k].dtype == before[k].dtype
        np.testing.assert_array_equal(after[k], before[k])
    assert rank1fast.adapter.read_adapter_info(back)["scale"] == 3.0
    with pytest.raises(AdapterError, match="already exists"):
        gguf_to_lora(out, tmp_path / "back")
    gguf_to_lora(out, tmp_path / "back", overwrite=True)


def test_round_trip_with_q_and_k(tmp_path, base_gguf):
    tensors = _peft_dir(tmp_path / "ad", _all_modules(), r=2, alpha=4.0)
    out = lora_to_gguf(tmp_path / "ad", tmp_path / "ad.gguf", base=base_gguf)
    back = gguf_to_lora(out, tmp_path / "back")  # head counts recorded in the GGUF
    after = safetensors_numpy.load_file(str(back / "adapter_model.safetensors"))
    for k, t in tensors.items():
        np.testing.assert_array_equal(after[k], t)
    assert json.loads((back / "adapter_config.json").read_text()) == json.loads(
        (tmp_path / "ad" / "adapter_config.json").read_text()
    )


def test_import_a_gguf_written_by_another_tool(tmp_path, base_gguf):
    """A converter-style GGUF (no rank1fast metadata): the config is built from the tensors,
    and q/k need the base model's head counts."""
    rng = np.random.default_rng(2)
    path = tmp_path / "foreign.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 16.0)
    expect = {}
    for module, rank in (("model.layers.1.self_attn.k_proj", 4), ("model.layers.2.mlp.up_proj", 8)):
        n_out, n_in = PROJ[module.split(".", 3)[3]]
        a = rng.normal(size=(rank, n_in)).astype(np.float32)
        b = rng.normal(size=(n_out, rank)).astype(np.float32)
        stored = b
        if module.endswith("k_proj"):
            from rank1fast.llamacpp import _permute

            stored = _permute(b, N_KV)
        w.add_tensor(f"{gguf_tensor_name(module)}.lora_a", a)
        w.add_tensor(f"{gguf_tensor_name(module)}.lora_b", stored)
        expect[module] = (a, b)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    with pytest.raises(AdapterError, match="head counts"):
        gguf_to_lora(path, tmp_path / "nobase")
    assert not (tmp_path / "nobase").exists()
    back = gguf_to_lora(path, tmp_path / "back", base=base_gguf, base_model="tiny/llama")
    config = json.loads((back / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16.0
    assert config["rank_pattern"] == {"model.layers.1.self_attn.k_proj": 4}
    assert config["base_model_name_or_path"] == "tiny/llama"
    assert sorted(config["target_modules"]) == sorted(expect)
    after = safetensors_numpy.load_file(str(back / "adapter_model.safetensors"))
    for module, (a, b) in expect.items():
        np.testing.assert_array_equal(after[f"base_model.model.{module}.lora_A.weight"], a)
        np.testing.assert_array_equal(after[f"base_model.model.{module}.lora_B.weight"], b)


@pytest.mark.parametrize(
    "config,scales",
    [
        ({"use_rslora": True}, {"o_proj": 4.0 / np.sqrt(2), "down_proj": 4.0 / np.sqrt(2)}),
        ({"alpha_pattern": {"down_proj": 1.0}}, {"o_proj": 2.0, "down_proj": 0.5}),
    ],
)
def test_peft_scaling_is_folded_into_lora_b(tmp_path, config, scales):
    """llama.cpp scales by alpha / r; other PEFT scalings end up in lora_b."""
    modules = {
        "model.layers.1.self_attn.o_proj": PROJ["self_attn.o_proj"],
        "model.layers.1.mlp.down_proj": PROJ["mlp.down_proj"],
    }
    tensors = _peft_dir(tmp_path / "ad", modules, r=2, alpha=4.0, **config)
    got = _tensors(_reader(lora_to_gguf(tmp_path / "ad", tmp_path / "ad.gguf")))
    for module in modules:
        b = got[f"{gguf_tensor_name(module)}.lora_b"][1]
        want = (
            scales[module.rsplit(".", 1)[1]] * tensors[f"base_model.model.{module}.lora_B.weight"]
        )
        np.testing.assert_allclose(b * 4.0 / 2, want, rtol=1e-6)


def test_lora_errors_write_nothing(tmp_path, base_gguf):
    _peft_dir(tmp_path / "qk", {"model.layers.1.self_attn.q_proj": PROJ["self_attn.q_proj"]})
    with pytest.raises(AdapterError, match="head counts"):
        lora_to_gguf(tmp_path / "qk", tmp_path / "qk.gguf")
    _peft_dir(tmp_path / "dora", _all_modules((1,)), use_dora=True)
    with pytest.raises(AdapterError, match="DoRA"):
        lora_to_gguf(tmp_path / "dora", tmp_path / "dora.gguf")
    _peft_dir(tmp_path / "head", {"lm_head": (8, HIDDEN)})
    with pytest.raises(AdapterError, match="lm_head"):
        lora_to_gguf(tmp_path / "head", tmp_path / "head.gguf")
    _peft_dir(tmp_path / "wide", {"model.layers.1.mlp.up_proj": (FF + 1, HIDDEN)})
    with pytest.raises(AdapterError, match="is 16 -> 24"):
        lora_to_gguf(tmp_path / "wide", tmp_path / "wide.gguf", base=base_gguf)
    _peft_dir(tmp_path / "deep", {"model.layers.7.mlp.up_proj": PROJ["mlp.up_proj"]})
    with pytest.raises(AdapterError, match="does not have"):
        lora_to_gguf(tmp_path / "deep", tmp_path / "deep.gguf", base=base_gguf)
    with pytest.raises(AdapterError, match="only llama, qwen2, qwen3"):
        lora_to_gguf(tmp_path / "deep", tmp_path / "deep.gguf", arch="gpt2")
    with pytest.raises(PathNotFoundError):
        lora_to_gguf(tmp_path / "missing", tmp_path / "x.gguf")
    assert [p.name for p in tmp_path.glob("*.gguf*")] == ["base.gguf"]

    # An existing file is kept unless overwrite=True.
    (tmp_path / "keep.gguf").write_bytes(b"precious")
    ok = tmp_path / "deep"
    with pytest.raises(AdapterError, match="already exists"):
        lora_to_gguf(ok, tmp_path / "keep.gguf")
    assert (tmp_path / "keep.gguf").read_bytes() == b"precious"
    lora_to_gguf(ok, tmp_path / "keep.gguf", overwrite=True)
    assert _field(_reader(tmp_path / "keep.gguf"), "adapter.type") == "lora"
    names = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".gguf" or "tmp" in p.name)
    assert names == ["base.gguf", "keep.gguf"]


def test_import_refuses_what_is_not_a_lora(tmp_path, base_gguf):
    with pytest.raises(AdapterError, match="not a llama.cpp LoRA adapter"):
        gguf_to_lora(base_gguf, tmp_path / "x")
    control_vector_to_gguf({"resid_post.1": np.ones(4)}, tmp_path / "cv.gguf")
    with pytest.raises(AdapterError, match="not a llama.cpp LoRA adapter"):
        gguf_to_lora(tmp_path / "cv.gguf", tmp_path / "x")
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- control vectors


def test_control_vector_file_reads_back(tmp_path):
    rng = np.random.default_rng(3)
    vecs = {f"resid_post.{i}": rng.normal(size=32) for i in (15, 1, 29)}
    vecs["model.layers.4.mlp.down_proj"] = rng.normal(size=32)
    out = control_vector_to_gguf(vecs, tmp_path / "cv.gguf", scale=2.0, model_hint="llama")
    reader = _reader(out)
    assert _field(reader, "general.architecture") == "controlvector"
    assert _field(reader, "controlvector.model_hint") == "llama"
    assert _field(reader, "controlvector.layer_count") == 4
    got = _tensors(reader)
    assert list(got) == ["direction.1", "direction.4", "direction.15", "direction.29"]
    assert all(shape == [32] and data.dtype == np.float32 for shape, data in got.values())
    back = rank1fast.vectors.load(out)
    assert set(back) == {"resid_post.1", "resid_post.4", "resid_post.15", "resid_post.29"}
    for site, v in vecs.items():
        layer = control_vector_layer(site)
        np.testing.assert_array_equal(
            back[f"resid_post.{layer}"], (2.0 * v).astype(np.float32).astype(np.float64)
        )
    # And from a vector file, as the CLI reads it.
    rank1fast.vectors.save({"resid_post.3": vecs["resid_post.1"]}, tmp_path / "v.safetensors")
    again = control_vector_to_gguf(tmp_path / "v.safetensors", tmp_path / "again.gguf")
    assert list(rank1fast.vectors.load(again)) == ["resid_post.3"]


def test_control_vector_errors_write_nothing(tmp_path):
    v = np.ones(8)
    for vecs, match in (
        ({"resid_mid.5": v}, "no control-vector equivalent"),
        ({"resid_post.5": v, "resid_mid.5": v}, "no control-vector equivalent"),
        ({"resid_post.0": v}, "block 0"),
        ({"resid_post.5": v, "model.layers.5.mlp.down_proj": v}, "both direction.5"),
        ({"resid_post.5": v, "resid_post.6": np.ones(9)}, "one size"),
        ({"resid_post.5": np.ones((2, 4))}, "1-D"),
        ({"resid_post.5": np.full(8, 1e39)}, "not finite"),
        ({}, "no steering vectors"),
    ):
        with pytest.raises(AdapterError, match=match):
            control_vector_to_gguf(vecs, tmp_path / "cv.gguf")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- CLI


def test_cli(tmp_path, base_gguf, capsys):
    tensors = _peft_dir(tmp_path / "ad", _all_modules((1,)))
    assert main(["gguf", "lora", str(tmp_path / "ad"), str(tmp_path / "ad.gguf")]) == 1
    assert "head counts" in capsys.readouterr().err
    assert not (tmp_path / "ad.gguf").exists()
    args = ["gguf", "lora", str(tmp_path / "ad"), str(tmp_path / "ad.gguf"), "--base"]
    assert main([*args, str(base_gguf)]) == 0
    assert "--lora" in capsys.readouterr().out
    assert main(["gguf", "import", str(tmp_path / "back"), str(tmp_path / "ad.gguf")]) == 0
    after = safetensors_numpy.load_file(str(tmp_path / "back" / "adapter_model.safetensors"))
    for k, t in tensors.items():
        np.testing.assert_array_equal(after[k], t)

    rank1fast.vectors.save(
        {"resid_post.2": np.ones(8), "resid_mid.2": np.ones(8)}, tmp_path / "v.safetensors"
    )
    cv = ["gguf", "control-vector", str(tmp_path / "v.safetensors"), str(tmp_path / "cv.gguf")]
    assert main(cv) == 1
    assert "resid_mid.2" in capsys.readouterr().err
    assert main([*cv, "--site", "resid_post.2", "--scale", "3"]) == 0
    assert "direction.2" in capsys.readouterr().out
    np.testing.assert_array_equal(rank1fast.vectors.load(tmp_path / "cv.gguf")["resid_post.2"], 3.0)
    assert main([*cv, "--site", "resid_post.2"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["ad", "ad.gguf", "back", "base.gguf", "cv.gguf", "v.safetensors"]
    )


# --------------------------------------------------------------------------- llama.cpp itself

#: Held-out texts and tokens per text for the llama.cpp comparisons.
EVAL_TEXTS, MAX_LENGTH = 4, 96
CV_SITES = ("resid_post.5", "resid_post.15")


def _default_gguf():
    from rank1fast.models import DEFAULT_GGUF, default_model_path

    return default_model_path() / DEFAULT_GGUF


def _llama(**kwargs):
    pytest.importorskip("llama_cpp")
    # Without weight repacking (load_llama's default): llama.cpp's AMX buffer crashes on Intel
    # Sapphire Rapids CPUs. One thread: llama-cpp-python's default batch threads (all cores)
    # spin against each other on a small busy machine and run 5x slower.
    return load_llama(
        _default_gguf(),
        n_ctx=128,
        n_batch=128,
        n_threads=1,
        n_threads_batch=1,
        logits_all=True,
        verbose=False,
        **kwargs,
    )


def _log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _llama_logprobs(llm, ids):
    """Next-token log-probabilities at every position of each token list, from llama.cpp."""
    out = []
    for seq in ids:
        llm.reset()
        llm.eval(seq)
        out.append(_log_softmax(np.array(llm.scores[: len(seq)])))
    return out


def _torch_logprobs(model, ids, steer=None):
    """The same from transformers; ``steer=(module, v)`` adds ``v`` to the module's output."""
    import torch

    handle = None
    if steer is not None:
        v = torch.as_tensor(steer[1], dtype=torch.float32)
        handle = steer[0].register_forward_hook(lambda _m, _i, out: out + v)
    out = []
    try:
        with torch.no_grad():
            for seq in ids:
                logits = model(input_ids=torch.tensor([seq])).logits[0]
                out.append(torch.log_softmax(logits.double(), -1).numpy())
    finally:
        if handle is not None:
            handle.remove()
    return out


def _kl(p, q):
    """Mean per-token KL(p || q) over the texts, from log-probabilities."""
    return float(np.concatenate([(np.exp(a) * (a - b)).sum(-1) for a, b in zip(p, q)]).mean())


def test_no_repack_sets_the_model_parameter_and_restores_the_default(tmp_path):
    """Inside ``no_repack`` the parameters ``Llama`` starts from have ``use_extra_bufts`` off;
    outside, llama.cpp's own default (on) is back, also after an error in the block."""
    llama_cpp = pytest.importorskip("llama_cpp")
    native = llama_cpp.llama_cpp
    original = native.llama_model_default_params
    assert original().use_extra_bufts
    with no_repack():
        assert not native.llama_model_default_params().use_extra_bufts
        with no_repack():
            assert not native.llama_model_default_params().use_extra_bufts
        assert not native.llama_model_default_params().use_extra_bufts
    assert native.llama_model_default_params is original
    with pytest.raises(KeyError), no_repack():
        raise KeyError("inside")
    assert native.llama_model_default_params is original
    with pytest.raises(PathNotFoundError, match="no such model file"):
        load_llama(tmp_path / "missing.gguf")


@pytest.fixture(scope="session")
def llama_cpp_lib():
    """llama-cpp-python, or a skip; requested first so nothing slow runs before the skip."""
    return pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def token_ids(tokenizer):
    from rank1fast.verify import default_eval_texts

    texts = default_eval_texts()[:EVAL_TEXTS]
    ids = [tokenizer(t, truncation=True, max_length=MAX_LENGTH)["input_ids"] for t in texts]
    return texts, ids


@pytest.fixture(scope="module")
def bases(llama_cpp_lib, smollm, token_ids):
    """The unsteered model in llama.cpp (context and log-probs) and in transformers, and the
    KL between the two: the floor of every transformers-vs-llama.cpp comparison (Q4_1 weights
    in both, but llama.cpp quantizes activations to 8 bits in its matmuls)."""
    _, ids = token_ids
    llm = _llama()
    assert not llm.model_params.use_extra_bufts
    llama_lp, torch_lp = _llama_logprobs(llm, ids), _torch_logprobs(smollm[0], ids)
    return {"llm": llm, "llama": llama_lp, "torch": torch_lp, "floor": _kl(torch_lp, llama_lp)}


@pytest.fixture(scope="module")
def steering(llama_cpp_lib, smollm, token_ids, tmp_path_factory):
    """Per site a rank1fast adapter built like tests/test_verify.py builds them (fewer tokens),
    its GGUF, the equivalent control vector, and the PEFT path's fidelity from verify."""
    pytest.importorskip("peft")
    from rank1fast.corpus import default_corpus
    from rank1fast.demo import steering_pairs
    from rank1fast.verify import EVAL_OFFSET, EVAL_STRIDE, calibrate_scale

    root = tmp_path_factory.mktemp("llamacpp")
    texts, _ = token_ids
    docs = [d for i, d in enumerate(default_corpus()) if i % EVAL_STRIDE != EVAL_OFFSET]
    dump = rank1fast.collect(
        smollm,
        docs[::4],
        list(CV_SITES),
        root / "dump",
        max_tokens=6000,
        max_length=96,
        progress=False,
    )
    report = rank1fast.analyze(dump.path, skip_positions=1, progress=False)
    positive, negative = steering_pairs()
    raw = rank1fast.vectors.contrastive(smollm, positive, negative, list(CV_SITES))
    scales = calibrate_scale(
        smollm, raw, texts, target_kl=0.3, tolerance=0.1, max_length=MAX_LENGTH
    )
    vecs = {s: scales[s] * raw[s] for s in CV_SITES}
    adapters = rank1fast.write_adapters(report, {s: {s: vecs[s]} for s in CV_SITES}, root / "ad")
    both = rank1fast.write_adapter(report, vecs, root / "both")
    fidelity = rank1fast.verify(
        smollm, both, vecs, texts, max_length=MAX_LENGTH, combined=False, progress=False
    )
    print(fidelity)
    out = {"fidelity": fidelity, "vecs": vecs, "root": root}
    for site in CV_SITES:
        out[site] = {
            "lora": lora_to_gguf(adapters[site], root / f"{site}.lora.gguf", base=_default_gguf()),
            "cvec": control_vector_to_gguf({site: vecs[site]}, root / f"{site}.cvec.gguf"),
        }
    return out


@pytest.mark.slow
def test_set_control_vector_refuses_what_llama_cpp_cannot_add(bases, token_ids):
    """Sites llama.cpp has no direction for, wrong sizes and non-finite values are refused
    before llama.cpp sees them, and leave the context unsteered."""
    llm = bases["llm"]
    n, n_layer = llm.n_embd(), 30
    v = np.ones(n)
    cases = [
        ({"resid_mid.5": v}, "resid_mid"),
        ({"resid_post.0": v}, "block 0"),
        ({f"resid_post.{n_layer}": v}, f"layers 0..{n_layer - 1}"),
        ({"resid_post.3": np.ones(n + 1)}, f"expected a vector of {n}"),
        ({"resid_post.3": np.full(n, np.inf)}, "not finite"),
        ({}, "no steering vectors"),
    ]
    for vectors, match in cases:
        with pytest.raises(AdapterError, match=match):
            set_control_vector(llm, vectors)
    _, ids = token_ids
    assert _kl(bases["llama"][:1], _llama_logprobs(llm, ids[:1])) < 1e-9


@pytest.mark.slow
def test_gguf_lora_matches_the_control_vector_in_llama_cpp(
    llama_cpp_lib, smollm, steering, bases, token_ids
):
    """The control vector made from resid_post.L is hook steering at resid_post.L (llama.cpp
    against transformers, at the floor of their differences, and far from it one layer off);
    in llama.cpp the GGUF LoRA reproduces the control vector about as closely as the PEFT
    adapter reproduces hook steering."""
    from rank1fast.models import get_module

    _, ids = token_ids
    llm, floor = bases["llm"], bases["floor"]
    rows = [f"KL(transformers base || llama.cpp base) {floor:.2e}"]
    for site in CV_SITES:
        layer = int(site.split(".")[1])
        v = steering["vecs"][site]
        hook = _torch_logprobs(
            smollm[0], ids, (get_module(smollm[0], f"model.layers.{layer}.mlp.down_proj"), v)
        )
        set_control_vector(llm, steering[site]["cvec"])
        cvec = _llama_logprobs(llm, ids)
        # The same vector one layer off (after, then before: one of each per site).
        shift = 1 if site == CV_SITES[0] else -1
        moved = {f"resid_post.{layer + shift}": v}
        set_control_vector(
            llm, control_vector_to_gguf(moved, steering["root"] / f"{site}.off.gguf")
        )
        shifted = _kl(hook, _llama_logprobs(llm, ids))
        set_control_vector(llm, None)
        lora = _llama_logprobs(_llama(lora_path=os.fspath(steering[site]["lora"])), ids)

        fid = steering["fidelity"][site]
        peft_steer, peft_err = fid.steering_kl_mean, fid.adapters["least-squares"].kl_mean
        steer, hook_cvec, cvec_lora = _kl(cvec, bases["llama"]), _kl(hook, cvec), _kl(cvec, lora)
        rows.append(
            f"{site}: llama.cpp KL(cvec||base) {steer:.4f}, KL(cvec||lora) {cvec_lora:.2e} | "
            f"PEFT KL(hook||base) {peft_steer:.4f}, KL(hook||adapter) {peft_err:.2e} | "
            f"KL(hook||cvec) {hook_cvec:.2e}, at resid_post.{layer + shift} {shifted:.3f}"
        )
        # direction.L is added where the hook at resid_post.L adds: llama.cpp's control vector
        # agrees with transformers' hook as closely as the two agree unsteered.
        assert hook_cvec < 2 * floor + 1e-3
        assert shifted > 10 * hook_cvec
        assert steer == pytest.approx(peft_steer, rel=0.15)
        # The LoRA reproduces the control vector in llama.cpp about as well as through PEFT.
        # (At resid_post.15 both are near the floor: b was fitted on transformers' activations
        # and llama.cpp's 8-bit matmul inputs move b.x a little.)
        assert cvec_lora <= 5 * peft_err + 2 * floor
        assert cvec_lora < 0.1 * steer
    print("\n".join(rows))


@pytest.mark.slow
def test_random_lora_on_every_projection_matches_peft(
    llama_cpp_lib, smollm, bases, token_ids, tmp_path, monkeypatch
):
    """A random LoRA on q/k/v/o/gate/up/down of two layers: llama.cpp with the GGUF agrees with
    transformers + PEFT as closely as the two agree on the base model, and only with llama.cpp's
    q/k row permutation applied to lora_B."""
    import copy

    import rank1fast.llamacpp as llamacpp_module
    from peft import PeftModel
    from rank1fast.models import get_module, module_dims

    model, _ = smollm
    _, ids = token_ids
    rng = np.random.default_rng(7)
    r, tensors = 4, {}
    for layer in (3, 12):
        for rel in PROJ:
            module = f"model.layers.{layer}.{rel}"
            n_in, n_out = module_dims(get_module(model, module))
            gain = 0.6 if rel.endswith(("q_proj", "k_proj")) else 0.15
            a = rng.normal(size=(r, n_in)) / np.sqrt(n_in)
            b = rng.normal(size=(n_out, r)) * gain
            tensors[f"base_model.model.{module}.lora_A.weight"] = a.astype(np.float32)
            tensors[f"base_model.model.{module}.lora_B.weight"] = b.astype(np.float32)
    ad = tmp_path / "random"
    ad.mkdir()
    safetensors_numpy.save_file(tensors, str(ad / "adapter_model.safetensors"))
    modules = sorted({k.split(".lora_")[0].removeprefix("base_model.model.") for k in tensors})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r}
    config.update(target_modules=modules, bias="none")
    (ad / "adapter_config.json").write_text(json.dumps(config))
    peft_lp = _torch_logprobs(PeftModel.from_pretrained(copy.deepcopy(model), os.fspath(ad)), ids)

    good = lora_to_gguf(ad, tmp_path / "random.gguf", base=_default_gguf())
    monkeypatch.setattr(llamacpp_module, "_permute", lambda w, n, inverse=False: w)
    bad = lora_to_gguf(ad, tmp_path / "unpermuted.gguf", base=_default_gguf())
    monkeypatch.undo()
    lora_lp = _llama_logprobs(_llama(lora_path=os.fspath(good)), ids)
    bad_lp = _llama_logprobs(_llama(lora_path=os.fspath(bad)), ids)

    effect, floor = _kl(peft_lp, bases["torch"]), bases["floor"]
    agree, unpermuted = _kl(peft_lp, lora_lp), _kl(peft_lp, bad_lp)
    print(
        f"KL(peft||base) {effect:.3f}; transformers vs llama.cpp: base {floor:.2e}, "
        f"LoRA {agree:.2e}, LoRA without the q/k permutation {unpermuted:.3f}"
    )
    assert effect > 0.1
    assert agree < 2 * floor + 1e-3
    assert unpermuted > 10 * agree
