"""rank1fast.steering (hook steering by site), chat corpora, and calibrate_scale(together=True).

Fast: a tiny random Llama and the default tokenizer; the default model only where a test says.
"""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import rank1fast
from rank1fast.errors import CorpusError, InvalidArgumentError, SiteError

torch = pytest.importorskip("torch")


def _hidden(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states


def test_resid_post_moves_the_residual_after_the_block_by_exactly_v(tiny_llama):
    # hidden_states[L + 1] is the residual stream after block L (for L < n - 1: the last one
    # is normed). Steering resid_post.1 moves it by exactly scale * v, every token.
    ids = torch.tensor([[5, 17, 300, 4000, 12]])
    base = _hidden(tiny_llama, ids)
    v = np.random.default_rng(0).normal(size=64)
    with rank1fast.steering(tiny_llama, {"resid_post.1": v}, scale=2.5) as s:
        steered = _hidden(tiny_llama, ids)
    assert s.modules == {"resid_post.1": "model.layers.1.mlp.down_proj"}
    np.testing.assert_allclose(s.vectors["resid_post.1"], 2.5 * v)
    delta = (steered[2] - base[2]).double().numpy()[0]
    np.testing.assert_allclose(delta, np.broadcast_to(2.5 * v, delta.shape), atol=1e-5)
    # Upstream of the site nothing moves; after exit the hooks are gone.
    assert torch.equal(steered[1], base[1])
    assert torch.equal(_hidden(tiny_llama, ids)[2], base[2])


def test_resid_mid_moves_the_residual_between_attention_and_mlp_by_exactly_v(tiny_llama):
    # In a Llama block the residual mid-layer is the input of post_attention_layernorm.
    ids = torch.tensor([[7, 8, 9, 10]])
    norm = tiny_llama.model.layers[0].post_attention_layernorm
    seen = []
    h = norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        _hidden(tiny_llama, ids)
        v = torch.randn(64)
        with rank1fast.steering((tiny_llama, None), {"resid_mid.0": v}):
            _hidden(tiny_llama, ids)
    finally:
        h.remove()
    delta = (seen[1] - seen[0])[0]
    torch.testing.assert_close(delta, v.expand_as(delta), atol=1e-5, rtol=0)


def test_steering_blocks_nest_and_hooks_go_away_on_error(tiny_llama):
    ids = torch.tensor([[3, 4, 5, 6]])
    base = _hidden(tiny_llama, ids)[2]
    v = np.ones(64)
    with rank1fast.steering(tiny_llama, {"resid_post.1": v}):
        with rank1fast.steering(tiny_llama, {"resid_post.1": v}, scale=2.0):
            twice = _hidden(tiny_llama, ids)[2]
    np.testing.assert_allclose((twice - base).numpy()[0], 3.0, atol=1e-5)
    with pytest.raises(RuntimeError), rank1fast.steering(tiny_llama, {"resid_post.1": v}):
        raise RuntimeError("boom")
    assert torch.equal(_hidden(tiny_llama, ids)[2], base)


def _hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_steering_errors(tiny_llama):
    before = _hook_count(tiny_llama)
    with pytest.raises(InvalidArgumentError, match="64"):
        with rank1fast.steering(tiny_llama, {"resid_post.1": np.ones(10)}):
            pass
    with pytest.raises(SiteError, match="out of range"):
        with rank1fast.steering(tiny_llama, {"resid_post.7": np.ones(64)}):
            pass
    with pytest.raises(InvalidArgumentError, match="no steering vectors"):
        with rank1fast.steering(tiny_llama, {}):
            pass
    with pytest.raises(InvalidArgumentError, match="not finite"):
        with rank1fast.steering(tiny_llama, {"resid_post.1": np.full(64, np.nan)}):
            pass
    with pytest.raises(SiteError, match="same module"):
        with rank1fast.steering(
            tiny_llama,
            {"resid_post.1": np.ones(64), "model.layers.1.mlp.down_proj": np.ones(64)},
        ):
            pass
    # Nothing stays registered after a refused block.
    assert _hook_count(tiny_llama) == before


def test_chat_jsonl_is_rendered_with_the_template(tmp_path, tokenizer):
    from rank1fast.corpus import read_texts, render_chat

    path = tmp_path / "chat.jsonl.gz"
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Why is the sky blue?"},
        {"role": "assistant", "content": "Rayleigh scattering."},
    ]
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"messages": conv}) + "\n")
        f.write(json.dumps({"text": "plain prose"}) + "\n")
    texts = list(read_texts(path, tokenizer))
    assert texts[1] == "plain prose"
    assert texts[0] == render_chat(tokenizer, conv)
    assert texts[0].startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert "<|im_start|>assistant\nRayleigh scattering.<|im_end|>" in texts[0]
    with pytest.raises(InvalidArgumentError, match="tokenizer"):
        list(read_texts(path))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(CorpusError, match=r"bad.jsonl:1: messages\[0\]"):
        list(read_texts(bad, tokenizer))


def test_builtin_chat_corpus_splits_are_disjoint(tokenizer):
    from rank1fast.corpus import chat_conversations, prose_texts, served_corpus

    fit, held = chat_conversations("fit"), chat_conversations("eval")
    assert len(fit) > 200 and len(held) >= 30
    assert len(fit) + len(held) == len(chat_conversations("all"))
    users = lambda cs: {m["content"] for c in cs for m in c if m["role"] == "user"}  # noqa: E731
    # Only the shared follow-up questions may repeat between the splits.
    assert len(users(fit) & users(held)) <= 4
    for conv in held:
        assert conv[-1]["role"] == "assistant" and conv[-1]["content"].strip()
    served_fit, served_eval = served_corpus(tokenizer, "fit"), served_corpus(tokenizer, "eval")
    assert not set(served_fit) & set(served_eval)
    assert sum(t.startswith("<|im_start|>") for t in served_fit) > 3 * sum(
        not t.startswith("<|im_start|>") for t in served_fit
    )
    assert set(prose_texts("eval")) & set(served_eval)
    with pytest.raises(InvalidArgumentError, match="split"):
        chat_conversations("train")


@pytest.mark.slow
def test_calibrate_together_reaches_the_target_with_one_coefficient(smollm):
    from rank1fast.corpus import prose_texts
    from rank1fast.verify import calibrate_scale, steering_kl

    rng = np.random.default_rng(1)
    vecs = {f"resid_post.{i}": rng.normal(size=576) for i in (6, 10, 14)}
    texts = prose_texts("eval")[:3]
    scales = calibrate_scale(
        smollm, vecs, texts, target_kl=0.4, tolerance=0.05, max_length=48, together=True
    )
    assert len(set(scales.values())) == 1
    c = scales["resid_post.6"]
    from rank1fast.verify import _SteeringProbe

    kl = _SteeringProbe(smollm, texts, 48, 4).kl(vecs, c, together=True)["resid_post.6"]
    assert abs(np.log(kl / 0.4)) < 0.06
    # Each site alone moves the model less than all of them together.
    alone = steering_kl(smollm, vecs, texts, scale=c, max_length=48)
    assert max(alone.values()) < kl
