"""End to end on the real default model and real PEFT: collect, analyze, contrastive vectors,
adapters for resid_mid and resid_post at layers 5, 15 and 25, verified against hook steering.

The targets (issue 4): where hook steering moves the next-token distribution by at least 0.3
nats, the least-squares adapter's KL(hook||adapter) is at most 1 % of KL(hook||base) at
resid_mid sites and 5 % at resid_post sites, and at least 5x below the one-hot adapter's.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import rank1fast
from rank1fast.errors import AdapterError
from rank1fast.verify import EVAL_OFFSET, EVAL_STRIDE, Fidelity, calibrate_scale, steering_kl

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("all_cores")]
pytest.importorskip("peft")

LAYERS = (5, 15, 25)
SITES = [f"{kind}.{layer}" for kind in ("resid_mid", "resid_post") for layer in LAYERS]
#: Collected tokens: the smallest count that met every target with margin (see the report).
TOKENS = 12_000
TARGET = {"resid_mid": 0.01, "resid_post": 0.05}
#: Collection uses the evaluation's context length (96): b fits early positions worst and
#: 256-token training contexts under-weight them (resid_mid.5: 1.07 % fitted on 256-token
#: contexts, 0.73 % on 96-token ones; every site below its target with the latter).


@pytest.fixture(scope="module")
def pipeline(smollm, tmp_path_factory):
    from rank1fast.corpus import default_corpus
    from rank1fast.demo import steering_pairs

    root = tmp_path_factory.mktemp("verify")
    docs = [d for i, d in enumerate(default_corpus()) if i % EVAL_STRIDE != EVAL_OFFSET]
    train = docs[::4] + docs[1::4]
    dump = rank1fast.collect(
        smollm, train, SITES, root / "dump", max_tokens=TOKENS, max_length=96, progress=False
    )
    report = rank1fast.analyze(dump.path, skip_positions=1, progress=False)
    positive, negative = steering_pairs()
    raw = rank1fast.vectors.contrastive(smollm, positive, negative, SITES)
    texts = default_corpus()[EVAL_OFFSET::EVAL_STRIDE][:8]
    # Scale each site to 0.33 nats (within 5 %) of steering on the evaluation texts: just
    # above the 0.3 of the targets (KL(hook||adapter)/KL(hook||base) grows with the strength).
    scales = calibrate_scale(smollm, raw, texts, target_kl=0.33, tolerance=0.05, max_length=96)
    vecs = {s: scales[s] * raw[s] for s in SITES}
    adapter = rank1fast.write_adapter(report, vecs, root / "adapter")
    fidelity = rank1fast.verify(
        smollm, adapter, vecs, texts, onehot=report, max_length=96, progress=False
    )
    print(fidelity)
    return {
        "report": report,
        "vecs": vecs,
        "adapter": adapter,
        "fidelity": fidelity,
        "texts": texts,
        "root": root,
    }


def test_fidelity_targets(pipeline):
    fid: Fidelity = pipeline["fidelity"]
    assert [s.site for s in fid.sites] == [*SITES, "all"]
    checked = 0
    for s in fid.sites[:-1]:
        if s.steering_kl_mean < 0.3:
            continue
        checked += 1
        ls, oh = s.adapters["least-squares"], s.adapters["one-hot"]
        target = TARGET[s.site.split(".")[0]]
        assert ls.ratio <= target, f"{s.site}: {ls.ratio:.4f} > {target}"
        assert 5 * ls.kl_mean <= oh.kl_mean, (
            f"{s.site}: one-hot only {oh.kl_mean / ls.kl_mean:.1f}x"
        )
        assert ls.output_error < oh.output_error
    # The calibration steers every site strongly enough to count.
    assert checked == len(SITES)


def test_fidelity_table_and_json(pipeline):
    fid = pipeline["fidelity"]
    text = str(fid)
    assert "resid_post.25" in text and "one-hot" in text and "least-squares" in text
    doc = json.loads(json.dumps(fid.to_json()))
    assert doc["tokens"] == fid.tokens > 500
    site = next(s for s in doc["sites"] if s["site"] == "resid_mid.15")
    assert site["adapters"]["least-squares"]["ratio"] == pytest.approx(
        fid["resid_mid.15"].adapters["least-squares"].ratio
    )
    assert site["modules"] == ["model.layers.15.self_attn.o_proj"]
    # KL by token position: bins 0, 1, 2-3, ... whose token-weighted means are the totals.
    s = fid["resid_mid.15"]
    assert s.position_bins[:3] == [[0, 0], [1, 1], [2, 3]]
    n = np.array(s.tokens_by_position, dtype=float)
    assert n.sum() == fid.tokens and n[0] == fid.texts
    kl = np.nan_to_num(np.array(s.steering_kl_by_position))
    assert (kl * n).sum() / n.sum() == pytest.approx(s.steering_kl_mean, rel=1e-9)
    a = s.adapters["least-squares"]
    got = (np.nan_to_num(np.array(a.kl_by_position)) * n).sum() / n.sum()
    assert got == pytest.approx(a.kl_mean, rel=1e-9)
    assert len(s.ratio_by_position("least-squares")) == len(n)
    back = rank1fast.Fidelity.from_json(doc)["resid_mid.15"]
    assert back.tokens_by_position == s.tokens_by_position
    assert back.adapters["least-squares"].kl_by_position == pytest.approx(a.kl_by_position)


def test_verify_leaves_the_model_as_it_was(pipeline, smollm):
    import torch

    model, tokenizer = smollm
    assert "peft_config" not in model.__dict__
    assert type(model.model.layers[5].self_attn.o_proj) is torch.nn.Linear


def test_peft_loads_without_missing_or_unexpected_keys(pipeline, smollm):
    import copy

    from peft import PeftModel

    model, _ = smollm
    base = copy.deepcopy(model)
    peft_model = PeftModel.from_pretrained(base, os.fspath(pipeline["adapter"]))
    result = peft_model.load_adapter(os.fspath(pipeline["adapter"]), adapter_name="second")
    assert result.missing_keys == [] and result.unexpected_keys == []


def test_rank_8_and_bf16_through_peft(pipeline, smollm):
    import copy

    import torch
    from peft import PeftModel

    model, tokenizer = smollm
    report, vecs, root = pipeline["report"], pipeline["vecs"], pipeline["root"]
    enc = tokenizer(
        pipeline["texts"][:2], return_tensors="pt", padding=True, truncation=True, max_length=48
    )
    logits = {}
    for name, kwargs in {"r1": {}, "r8": {"rank": 8}, "bf16": {"dtype": "bfloat16"}}.items():
        path = rank1fast.write_adapter(report, vecs, root / name, **kwargs)
        peft_model = PeftModel.from_pretrained(copy.deepcopy(model), os.fspath(path))
        with torch.no_grad():
            logits[name] = peft_model(**enc).logits
    with torch.no_grad():
        base = model(**enc).logits
    assert (logits["r1"] - base).abs().max() > 1.0
    torch.testing.assert_close(logits["r8"], logits["r1"], rtol=1e-4, atol=1e-4)
    # bfloat16 factors: the steering survives the cast (same effect within bf16 precision).
    assert (logits["bf16"] - logits["r1"]).abs().max() < 0.05 * (logits["r1"] - base).abs().max()


def test_scale_mismatch_and_missing_site(pipeline, smollm):
    vecs = pipeline["vecs"]
    with pytest.raises(AdapterError, match="scale"):
        rank1fast.verify(smollm, pipeline["adapter"], vecs, pipeline["texts"][:1], scale=2.0)
    with pytest.raises(AdapterError, match="no LoRA on resid_mid.3"):
        rank1fast.verify(
            smollm, pipeline["adapter"], {"resid_mid.3": vecs["resid_mid.5"]}, pipeline["texts"][:1]
        )


def test_steering_kl_agrees_with_verify(pipeline, smollm):
    site = "resid_mid.15"
    fid = pipeline["fidelity"]
    kl = steering_kl(smollm, {site: pipeline["vecs"][site]}, pipeline["texts"], max_length=96)
    assert kl[site] == pytest.approx(fid[site].steering_kl_mean, rel=1e-6)
    assert np.isfinite(kl[site])
