"""Site semantics per model family: ``resid_mid.L`` / ``resid_post.L`` are the residual stream.

Each family is a tiny random model built from its transformers config class (hidden 64, 3
layers: seconds). The reference is read independently of rank1fast's table: the residual after
block L is block L's output (a forward hook on the decoder layer), and the residual mid-layer is
the input of the module that reads it, named below from the transformers source of each
family (Llama & co.: ``post_attention_layernorm``; Gemma 2/3: ``pre_feedforward_layernorm``;
OLMo-2: ``mlp``; GPT-2: ``ln_2``). These measure exactness of the site mapping on random
weights; they say nothing about adapter fidelity on trained models.
"""

from __future__ import annotations

import numpy as np
import pytest
import rank1fast
from rank1fast.errors import ResidualSiteError, SiteError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V = 128  # vocabulary


def _small(**extra):
    d = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=V,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    d.update(extra)
    return d


def _moe(**extra):
    return _small(num_experts_per_tok=2, **extra)


t = transformers
#: family -> (builder, module reading the residual mid-layer, expected resid_post kind)
FAMILIES = {
    "llama": (lambda: t.LlamaForCausalLM(t.LlamaConfig(**_small())), "post_attention_layernorm"),
    "mistral": (
        lambda: t.MistralForCausalLM(t.MistralConfig(**_small())),
        "post_attention_layernorm",
    ),
    "qwen2": (lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**_small())), "post_attention_layernorm"),
    "qwen3": (
        lambda: t.Qwen3ForCausalLM(t.Qwen3Config(**_small(head_dim=16))),
        "post_attention_layernorm",
    ),
    "qwen2_moe": (
        lambda: t.Qwen2MoeForCausalLM(
            t.Qwen2MoeConfig(
                **_moe(
                    num_experts=4,
                    moe_intermediate_size=32,
                    shared_expert_intermediate_size=64,
                    decoder_sparse_step=2,  # layer 1 sparse, layers 0 and 2 dense
                )
            )
        ),
        "post_attention_layernorm",
    ),
    "qwen3_moe": (
        lambda: t.Qwen3MoeForCausalLM(
            t.Qwen3MoeConfig(**_moe(head_dim=16, num_experts=4, moe_intermediate_size=32))
        ),
        "post_attention_layernorm",
    ),
    "mixtral": (
        lambda: t.MixtralForCausalLM(t.MixtralConfig(**_moe(num_local_experts=4))),
        "post_attention_layernorm",
    ),
    "gemma": (
        lambda: t.GemmaForCausalLM(t.GemmaConfig(**_small(head_dim=16))),
        "post_attention_layernorm",
    ),
    "gemma2": (
        lambda: t.Gemma2ForCausalLM(t.Gemma2Config(**_small(head_dim=16))),
        "pre_feedforward_layernorm",
    ),
    "gemma3": (
        lambda: t.Gemma3ForCausalLM(t.Gemma3TextConfig(**_small(head_dim=16))),
        "pre_feedforward_layernorm",
    ),
    "olmo": (lambda: t.OlmoForCausalLM(t.OlmoConfig(**_small())), "post_attention_layernorm"),
    "olmo2": (lambda: t.Olmo2ForCausalLM(t.Olmo2Config(**_small())), "mlp"),
    "phi3": (lambda: t.Phi3ForCausalLM(t.Phi3Config(**_small())), "post_attention_layernorm"),
    "granite": (
        lambda: t.GraniteForCausalLM(t.GraniteConfig(**_small(residual_multiplier=0.22))),
        "post_attention_layernorm",
    ),
    "gpt2": (
        lambda: t.GPT2LMHeadModel(t.GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=V)),
        "ln_2",
    ),
    "gpt_neox": (
        lambda: t.GPTNeoXForCausalLM(t.GPTNeoXConfig(**_small())),
        None,  # parallel residual: no residual stream between attention and MLP
    ),
    "gpt_neox_sequential": (
        lambda: t.GPTNeoXForCausalLM(t.GPTNeoXConfig(**_small(use_parallel_residual=False))),
        "post_attention_layernorm",
    ),
}
POST_NORM = {"gemma2", "gemma3", "olmo2"}
MOE_SPARSE = {"qwen2_moe", "qwen3_moe", "mixtral"}  # layer 1 is sparse in each


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    torch.manual_seed(0)
    model = FAMILIES[request.param][0]().eval()
    return request.param, model


def _layers(model):
    from rank1fast.models import _layer_list

    return _layer_list(model)[1]


def _capture(model, ids, layer, reader, steer=None):
    """(residual mid-layer, residual after the block) at ``layer``, read by plain hooks."""
    seen = {}
    block = _layers(model)[layer]
    handles = [block.register_forward_hook(lambda _m, _i, out: seen.__setitem__("post", out))]
    if reader is not None:
        handles.append(
            block.get_submodule(reader).register_forward_pre_hook(
                lambda _m, args: seen.__setitem__("mid", args[0])
            )
        )
    try:
        with torch.no_grad():
            if steer is None:
                model(input_ids=ids)
            else:
                with rank1fast.steering(model, steer):
                    model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    post = seen["post"][0] if isinstance(seen["post"], tuple) else seen["post"]
    return seen.get("mid"), post


@pytest.mark.parametrize("kind", ["resid_mid", "resid_post"])
def test_steering_moves_the_residual_by_exactly_s_v(family, kind):
    name, model = family
    reader = FAMILIES[name][1]
    ids = torch.tensor([[5, 17, 30, 99, 12, 7]])
    v = np.random.default_rng(1).normal(size=64)
    if kind == "resid_mid" and reader is None:
        with pytest.raises(SiteError, match="in parallel"):
            with rank1fast.steering(model, {"resid_mid.1": v}):
                pass
        return
    base_mid, base_post = _capture(model, ids, 1, reader)
    for s in (0.1, 1.0, 10.0):
        mid, post = _capture(model, ids, 1, reader, {f"{kind}.1": s * v})
        moved = (mid - base_mid) if kind == "resid_mid" else (post - base_post)
        moved = moved.double().numpy()[0]
        want = np.broadcast_to(s * v, moved.shape)
        # float32 residuals of size ~1-10: exact up to rounding
        np.testing.assert_allclose(moved, want, atol=2e-5 * max(1.0, s), rtol=1e-5)


def test_carrier_kinds(family):
    from rank1fast.models import EXACT, NORMED, REFUSED, resolve_sites, site_carrier

    name, model = family
    post = site_carrier(model, "resid_post.1")
    if name in POST_NORM:
        assert post.kind == NORMED and post.norm.endswith("post_feedforward_layernorm")
        assert post.hook == post.norm and post.module.endswith("mlp.down_proj")
        mid = site_carrier(model, "resid_mid.1")
        assert mid.kind == NORMED and mid.norm.endswith("post_attention_layernorm")
    elif name in MOE_SPARSE:
        assert post.kind == REFUSED and post.module is None and post.hook.endswith(".mlp")
        with pytest.raises(ResidualSiteError, match="experts") as e:
            resolve_sites(model, "resid_post.1")
        assert "resid_mid.1" in str(e.value) and "resid_mid.2" in str(e.value)
        assert resolve_sites(model, "resid_mid.1") == {
            "resid_mid.1": "model.layers.1.self_attn.o_proj"
        }
    else:
        # The adapter's module is the hooked one: its output joins the residual stream.
        assert post.kind == EXACT and post.hook == post.module
    if name == "granite":
        assert post.gain == pytest.approx(0.22)


def test_moe_messages_tell_the_gates_apart():
    from rank1fast.models import site_carrier

    torch.manual_seed(0)
    mixtral = FAMILIES["mixtral"][0]()
    qwen = FAMILIES["qwen2_moe"][0]()
    assert "gate weights sum to 1" in site_carrier(mixtral, "resid_post.1").reason
    reason = site_carrier(qwen, "resid_post.1").reason
    assert "norm_topk_prob=False" in reason and "sigmoid" in reason
    # Qwen2-MoE's dense layers keep an exact resid_post.
    assert site_carrier(qwen, "resid_post.0").module == "model.layers.0.mlp.down_proj"


def test_moe_message_on_the_last_layer_names_no_layer_past_the_end():
    from rank1fast.models import site_carrier

    torch.manual_seed(0)
    model = FAMILIES["mixtral"][0]()  # 3 layers
    reason = site_carrier(model, "resid_post.-1").reason
    assert "resid_mid.2" in reason and "resid_mid.3" not in reason
    assert "resid_mid.2" in site_carrier(model, "resid_post.1").reason


def test_raw_module_path_steers_the_module_output_before_the_norm():
    # On a post-norm block the raw path means the module's output: the norm then rescales it,
    # so the residual does NOT move by v (this is what resid_post used to do silently).
    torch.manual_seed(0)
    model = FAMILIES["gemma2"][0]().eval()
    ids = torch.tensor([[5, 17, 30, 99]])
    v = np.random.default_rng(2).normal(size=64)
    _, base = _capture(model, ids, 1, None)
    _, raw = _capture(model, ids, 1, None, {"model.layers.1.mlp.down_proj": 10 * v})
    moved = (raw - base).double().numpy()[0]
    assert np.abs(moved - 10 * v).max() > 1.0
    _, site = _capture(model, ids, 1, None, {"resid_post.1": 10 * v})
    np.testing.assert_allclose(
        (site - base).double().numpy()[0], np.broadcast_to(10 * v, moved.shape), atol=2e-4
    )


# --------------------------------------------------------------------------- adapters


def _with_vocab(name, tokenizer):
    """A family's tiny model with the default tokenizer's vocabulary (for collect)."""
    import rank1fast.models  # noqa: F401

    builder = FAMILIES[name][0]
    torch.manual_seed(0)
    model = builder()
    model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def _collect(model, tokenizer, sites, out, **kw):
    texts = ["A short text about steering.", "Another one, a little longer than the first."] * 3
    return rank1fast.collect(
        (model, tokenizer), texts, sites, out, storage_dtype="float32", progress=False, **kw
    )


def test_post_norm_adapter_is_refused_naming_the_norm(tokenizer, tmp_path):
    model = _with_vocab("gemma2", tokenizer)
    dump = _collect(model, tokenizer, "resid_post.1,resid_mid.2", tmp_path / "d")
    assert dump.manifest["carriers"]["resid_post.1"]["kind"] == "normed"
    report = rank1fast.analyze(dump.path)
    v = np.random.default_rng(0).normal(size=64)
    for site, norm in (
        ("resid_post.1", "model.layers.1.post_feedforward_layernorm"),
        ("resid_mid.2", "model.layers.2.post_attention_layernorm"),
    ):
        with pytest.raises(ResidualSiteError, match="post-norm") as e:
            rank1fast.write_adapter(report, {site: v}, tmp_path / "a")
        assert norm in str(e.value) and "raw path" in str(e.value)
    assert not (tmp_path / "a").exists()
    # A dump from before carriers were recorded: the model type decides.
    import json

    manifest = json.loads((dump.path / "manifest.json").read_text())
    del manifest["carriers"]
    (dump.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ResidualSiteError, match="post_feedforward_layernorm"):
        rank1fast.write_adapter(rank1fast.analyze(dump.path), {"resid_post.1": v}, tmp_path / "a")
    # The same refusal from in-memory statistics (no manifest on disk).
    stats = _collect(model, tokenizer, "resid_post.1", None, statistics=True)
    with pytest.raises(ResidualSiteError, match="post_feedforward_layernorm"):
        rank1fast.write_adapter(stats, {"resid_post.1": v}, tmp_path / "a")
    # The raw path stays available: an adapter on the module's output itself.
    raw = "model.layers.1.mlp.down_proj"
    dump = _collect(model, tokenizer, raw, tmp_path / "r")
    out = rank1fast.write_adapter(rank1fast.analyze(dump.path), {raw: v}, tmp_path / "raw")
    assert (out / "adapter_model.safetensors").is_file()


def test_convert_refuses_a_post_norm_site_before_the_fit(tokenizer, tmp_path, monkeypatch):
    model = _with_vocab("gemma2", tokenizer)

    def no_fit(*_a, **_k):
        raise AssertionError("convert collected before refusing the site")

    import sys

    monkeypatch.setattr(sys.modules["rank1fast.convert"], "fit_report", no_fit)
    v = np.random.default_rng(0).normal(size=64)
    with pytest.raises(ResidualSiteError, match="post_feedforward_layernorm"):
        rank1fast.convert(
            (model, tokenizer), {"resid_post.1": v}, tmp_path / "a", texts=["a text"] * 8, log=None
        )
    assert not (tmp_path / "a").exists()


def test_moe_resid_post_is_refused_and_resid_mid_is_written(tokenizer, tmp_path):
    model = _with_vocab("mixtral", tokenizer)
    with pytest.raises(ResidualSiteError, match="mixture of 4 experts"):
        _collect(model, tokenizer, "resid_post.1", tmp_path / "no")
    dump = _collect(model, tokenizer, "resid_mid.1", tmp_path / "d")
    v = np.random.default_rng(0).normal(size=64)
    out = rank1fast.write_adapter(rank1fast.analyze(dump.path), {"resid_mid.1": v}, tmp_path / "a")
    from rank1fast.adapter import read_adapter_info

    info = read_adapter_info(out)
    assert info["sites"]["resid_mid.1"]["module"] == "model.layers.1.self_attn.o_proj"


def _lora_product(adapter, module):
    from safetensors.numpy import load_file

    w = load_file(str(adapter / "adapter_model.safetensors"))
    a = w[f"base_model.model.{module}.lora_A.weight"].astype(np.float64)
    b = w[f"base_model.model.{module}.lora_B.weight"].astype(np.float64)
    return b @ a


def test_granite_adapter_divides_the_residual_multiplier(tokenizer, prose, tmp_path):
    model = _with_vocab("granite", tokenizer)
    dump = rank1fast.collect(
        (model, tokenizer),
        prose[:40],
        "resid_post.1",
        tmp_path / "d",
        storage_dtype="float32",
        max_tokens=3000,
        progress=False,
    )
    assert dump.manifest["carriers"]["resid_post.1"]["gain"] == pytest.approx(0.22)
    report = rank1fast.analyze(dump.path)
    v = np.random.default_rng(0).normal(size=64)
    out = rank1fast.write_adapter(
        report, {"resid_post.1": v}, tmp_path / "a", pin_sink=False, scale=2.0
    )
    b = report["resid_post.1"].direction.vector
    np.testing.assert_allclose(
        _lora_product(out, "model.layers.1.mlp.down_proj"),
        np.outer(2.0 * v / 0.22, b),
        rtol=1e-5,
        atol=1e-6,
    )
    # verify steers the module by v / gain too: the adapter's output error is that of the
    # rank-1 fit (b·x ≈ 1), not the 1/0.22 - 1 = 3.5 a module steered by v would show.
    fid = rank1fast.verify(
        (model, tokenizer), out, {"resid_post.1": v}, texts=prose[40:44], scale=2.0
    )
    assert fid["resid_post.1"].adapters["least-squares"].output_error < 1.0


# --------------------------------------------------------------------------- encoders


def _bert_config(tokenizer):
    return transformers.BertConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )


def test_encoder_checkpoint_end_to_end_with_automodel_paths(tokenizer, tmp_path):
    peft = pytest.importorskip("peft")
    from rank1fast.models import load_model, resolve_sites

    # A plain checkpoint directory as sentence-transformers ships them: BertModel weights.
    torch.manual_seed(0)
    ckpt = tmp_path / "bert"
    transformers.BertModel(_bert_config(tokenizer)).save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    model, _ = load_model(str(ckpt), device="cpu")
    assert type(model).__name__ == "BertModel"  # not BertLMHeadModel (no bert. prefix)
    site = "encoder.layer.1.output.dense"
    assert resolve_sites(model, f"bert.{site}") == {f"bert.{site}": site}
    # An encoder head checkpoint loads as its base model too.
    mlm = tmp_path / "mlm"
    transformers.BertForMaskedLM(_bert_config(tokenizer)).save_pretrained(mlm)
    tokenizer.save_pretrained(mlm)
    assert type(load_model(str(mlm), device="cpu")[0]).__name__ == "BertModel"
    head = transformers.BertForMaskedLM(_bert_config(tokenizer))
    assert resolve_sites(head, site) == {site: f"bert.{site}"}
    with rank1fast.steering(head, {site: np.ones(32)}) as st:
        assert st.modules == {site: f"bert.{site}"}

    texts = ["A sentence to embed.", "Another, somewhat longer sentence to embed here."] * 4
    dump = rank1fast.collect(
        str(ckpt),
        texts,
        [site],
        tmp_path / "d",
        device="cpu",
        storage_dtype="float32",
        progress=False,
    )
    assert dump.sites == {site: site}
    report = rank1fast.analyze(dump.path)
    v = np.random.default_rng(0).normal(size=32)
    adapter = rank1fast.write_adapter(report, {site: v}, tmp_path / "a", pin_sink=False)

    user = transformers.AutoModel.from_pretrained(ckpt).eval()  # the user's own model
    wrapped = peft.PeftModel.from_pretrained(user, adapter).eval()
    assert wrapped.peft_config["default"].task_type == "FEATURE_EXTRACTION"
    lora = wrapped.get_submodule(f"base_model.model.{site}")
    seen = {}
    lora.register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0]))
    lora.register_forward_hook(lambda _m, _i, out: seen.__setitem__("y", out))
    batch = tokenizer(texts[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        wrapped(**batch)
        x, y = seen["x"].double(), seen["y"].double()
        with wrapped.disable_adapter():
            wrapped(**batch)
        y0 = seen["y"].double()
    b = torch.as_tensor(report[site].direction.vector)
    want = (x @ b)[..., None] * torch.as_tensor(v)
    torch.testing.assert_close(y - y0, want, atol=1e-4, rtol=1e-4)
    assert want.abs().max() > 0.1  # the adapter acts


# --------------------------------------------------------------------------- vector files


def test_control_vector_and_gemma_scope_sae_steer_the_residual_of_a_post_norm_model(tmp_path):
    gguf = pytest.importorskip("gguf")
    from rank1fast import vectors

    torch.manual_seed(0)
    model = FAMILIES["gemma2"][0]().eval()
    ids = torch.tensor([[5, 17, 30, 99, 12]])
    rng = np.random.default_rng(3)
    # A llama.cpp control vector (cvector-generator's layout): direction.L for block L.
    w = gguf.GGUFWriter(str(tmp_path / "c.gguf"), "controlvector")
    w.add_string("controlvector.model_hint", "gemma2")
    w.add_uint32("controlvector.layer_count", 2)
    directions = {layer: rng.normal(size=64).astype(np.float32) for layer in (1, 2)}
    for layer, d in directions.items():
        w.add_tensor(f"direction.{layer}", d)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cvec = vectors.load(tmp_path / "c.gguf")
    assert sorted(cvec) == ["resid_post.1", "resid_post.2"]
    # A Gemma Scope residual-stream SAE (blocks.1.hook_resid_post), feature 4.
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_1" / "width_16k" / "average_l0_71"
    folder.mkdir(parents=True)
    w_dec = rng.normal(size=(10, 64)).astype(np.float32)
    np.savez(folder / "params.npz", W_enc=w_dec.T.copy(), W_dec=w_dec)
    sae = vectors.from_sae(folder, 4)
    assert list(sae) == ["resid_post.1"]

    for layer, vecs, want in (
        (1, {"resid_post.1": cvec["resid_post.1"]}, directions[1]),
        (2, {"resid_post.2": cvec["resid_post.2"]}, directions[2]),
        (1, sae, w_dec[4]),
    ):
        _, base = _capture(model, ids, layer, None)
        _, steered = _capture(model, ids, layer, None, vecs)
        moved = (steered - base).double().numpy()[0]
        np.testing.assert_allclose(moved, np.broadcast_to(want, moved.shape), atol=2e-5)


def test_encoder_adapter_from_statistics_or_convert_is_feature_extraction(tokenizer, tmp_path):
    # The in-memory statistics (and convert, which fits from them) have no manifest on disk:
    # the adapter must still be written for AutoModel, not as a causal LM PEFT cannot wrap.
    peft = pytest.importorskip("peft")
    from rank1fast.errors import InvalidArgumentError
    from rank1fast.report import Report

    torch.manual_seed(0)
    ckpt = tmp_path / "bert"
    transformers.BertModel(_bert_config(tokenizer)).save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    site = "encoder.layer.1.output.dense"
    texts = ["A sentence to embed.", "Another, somewhat longer sentence to embed here."] * 8
    v = np.random.default_rng(0).normal(size=32)
    stats = rank1fast.collect(
        str(ckpt), texts, [site], None, statistics=True, device="cpu", progress=False
    )
    assert stats.task_type == "FEATURE_EXTRACTION"
    stats.save(tmp_path / "r.npz")
    assert Report.load(tmp_path / "r.npz").task_type == "FEATURE_EXTRACTION"
    assert rank1fast.merge([stats]).task_type == "FEATURE_EXTRACTION"
    written = [rank1fast.write_adapter(stats, {site: v}, tmp_path / "a", pin_sink=False)]
    # convert cannot verify without an LM head: refused before the fit, nothing written.
    with pytest.raises(InvalidArgumentError, match="no LM head"):
        rank1fast.convert(str(ckpt), {site: v}, tmp_path / "c", texts=texts, device="cpu", log=None)
    assert not (tmp_path / "c").exists()
    written.append(
        rank1fast.convert(
            str(ckpt), {site: v}, tmp_path / "c", texts=texts, device="cpu", verify=False, log=None
        )
    )
    batch = tokenizer(texts[:2], return_tensors="pt", padding=True)
    for adapter in written:
        user = transformers.AutoModel.from_pretrained(ckpt).eval()
        wrapped = peft.PeftModel.from_pretrained(user, adapter).eval()
        assert wrapped.peft_config["default"].task_type == "FEATURE_EXTRACTION"
        with torch.no_grad():
            y = wrapped(**batch).last_hidden_state
            with wrapped.disable_adapter():
                y0 = wrapped(**batch).last_hidden_state
        assert (y - y0).abs().max() > 1e-3  # the adapter acts
