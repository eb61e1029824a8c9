"""Downstream corrections (rank1fast.corrections): the regression against numpy, the adapter
they make against PEFT's own arithmetic, and the fidelity they buy on the real default model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import rank1fast
from rank1fast.corrections import (
    Correction,
    _Batches,
    _resume,
    _run,
    _solve,
    _Stats,
    correctable,
    fit_corrections,
    residual_writers,
)
from rank1fast.errors import AdapterError, InvalidArgumentError

pytestmark = pytest.mark.usefixtures("all_cores")


def _stats(x: np.ndarray, d: np.ndarray, folds: int = 5) -> _Stats:
    f = np.arange(len(x)) % folds
    return _Stats(
        np.stack([x[f == k].T @ x[f == k] for k in range(folds)]),
        np.stack([x[f == k].T @ d[f == k] for k in range(folds)]),
        np.array([float((d[f == k] ** 2).sum()) for k in range(folds)]),
        np.bincount(f, minlength=folds),
    )


def test_solve_recovers_a_low_rank_map_in_module_units():
    rng = np.random.default_rng(0)
    n, d_in, d = 4000, 24, 10
    x = rng.normal(size=(n, d_in)) + 3.0  # a constant direction, as real inputs have
    w = rng.normal(size=(d, 2)) @ rng.normal(size=(2, d_in))  # rank 2
    diff = -(x @ w.T) + 0.01 * rng.normal(size=(n, d))
    c = _solve(_stats(x, diff), ("m", 2.0), rank=2)
    assert c is not None and c.rank == 2 and c.module == "m"
    # gain 2: the residual gets 2 x the module output, so U A = W / 2.
    np.testing.assert_allclose(2.0 * c.u @ c.a, w, atol=2e-3 * np.abs(w).max())
    assert c.rms_after < 0.02 * c.rms_before
    # Against numpy's least squares on the same rows (full rank, no ridge).
    ls = np.linalg.lstsq(x, -diff, rcond=None)[0].T
    np.testing.assert_allclose(2.0 * c.u @ c.a, ls, atol=2e-3 * np.abs(w).max())


def test_solve_keeps_nothing_when_the_difference_is_noise():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3000, 16))
    assert _solve(_stats(x, rng.normal(size=(3000, 6))), ("m", 1.0), rank=4) is None


def test_residual_writers_and_what_is_correctable(smollm):
    writers = residual_writers(smollm[0])
    assert len(writers) == 60
    assert writers[:3] == [
        ("model.layers.0.self_attn.o_proj", 1.0),
        ("model.layers.0.mlp.down_proj", 1.0),
        ("model.layers.1.self_attn.o_proj", 1.0),
    ]
    assert correctable(smollm[0], {"resid_post.3": 0}) is None
    assert "resid_mid/resid_post" in correctable(smollm[0], {"model.layers.3.mlp.up_proj": 0})


def test_fit_corrections_refuses_bad_arguments(smollm):
    for kwargs, msg in [({"after": 0}, "after"), ({"rank": True}, "rank"), ({"folds": 1}, "folds")]:
        with pytest.raises(InvalidArgumentError, match=msg):
            fit_corrections(smollm, {"resid_post.3": np.ones(576)}, 1.0, {}, ["x"], **kwargs)
    for texts in ([], ["a b c", "d e"]):
        with pytest.raises(InvalidArgumentError, match="at least 5 fit texts"):
            fit_corrections(smollm, {"resid_post.3": np.ones(576)}, 1.0, {}, texts)
    for tokens in (0, -1, True, 2.5):
        with pytest.raises(InvalidArgumentError, match="tokens must be"):
            fit_corrections(
                smollm, {"resid_post.3": np.ones(576)}, 1.0, {}, ["x"] * 5, tokens=tokens
            )
    # The last layer's resid_post has no writer after it: nothing to correct, no pass run.
    assert fit_corrections(smollm, {"resid_post.29": np.ones(576)}, 1.0, {}, ["x"] * 5) == []


@pytest.mark.parametrize("sites", [["resid_post.3"], ["resid_mid.3", "resid_post.6"]])
def test_resumed_adapter_runs_match_the_models_own_forward(smollm, prose, sites):
    # The adapter runs resume from each batch's entry into the first site's layer, calling the
    # decoder layers directly; the model's own forward from the embeddings is the reference.
    import torch

    net, tok = smollm
    writers = residual_writers(net)
    index = {m: i for i, (m, _) in enumerate(writers)}
    rng = np.random.default_rng(0)
    site_at = {
        index[rank1fast.models.site_carrier(net, s).module]: rng.normal(size=576) for s in sites
    }
    first = min(site_at)

    def terms(j: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        d_in, d_out = rank1fast.models.module_dims(rank1fast.models.get_module(net, writers[j][0]))
        return torch.randn(k, d_in) * 0.05, torch.randn(d_out, k)

    # adapter terms on the site's module and on the next writers
    lora_t = {writers[j][0]: terms(j, 1 + j - first) for j in (first, first + 1, first + 2)}
    for inputs, keep, _ in _Batches(net, tok, prose[:6], None, 48, 3):
        _, _, point = _run(net, inputs, keep, writers, first, set(), None, site_at, until=first + 5)
        for w in (first + 1, first + 2, first + 5):
            summed, x, point = _resume(net, point, keep, writers, first, w, lora_t)
            sums, x_ref, _ = _run(net, inputs, keep, writers, first, {w}, lora_t, site_at)
            assert point.layer == w // 2
            np.testing.assert_allclose(summed.numpy(), sums[w].numpy(), rtol=1e-5, atol=1e-4)
            np.testing.assert_allclose(x.numpy(), x_ref.numpy(), rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def report(smollm, prose):
    return rank1fast.collect(
        smollm, prose[:20], ["resid_post.3"], statistics=True, max_tokens=1500, progress=False
    )


def test_corrected_adapter_is_what_peft_applies(smollm, report, tmp_path):
    peft = pytest.importorskip("peft")
    import torch

    rng = np.random.default_rng(2)
    v = rng.normal(size=576)
    own = "model.layers.3.mlp.down_proj"  # the site's module gets extra terms too
    new = "model.layers.4.self_attn.o_proj"
    fixes = [
        Correction(own, rng.normal(size=(2, 1536)), rng.normal(size=(576, 2)), 0.1, 100, 1, 0.5),
        Correction(new, rng.normal(size=(3, 576)), rng.normal(size=(576, 3)), 0.1, 100, 1, 0.5),
    ]
    out = rank1fast.write_adapter(
        report,
        {"resid_post.3": v},
        tmp_path / "a",
        scale=2.0,
        corrections=fixes,
        target="vllm",
        pin_sink=False,  # b is then the report's direction
    )
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == [own, new]
    assert config["r"] == config["lora_alpha"] == 8  # 1 + 2 terms on `own`, 3 on `new` -> vllm 8
    info = rank1fast.adapter.read_adapter_info(out)
    assert set(info["corrections"]) == {own, new} and info["corrections"][new]["rank"] == 3
    assert not [p for p in rank1fast.serving.check(out, "vllm") if p.severity == "error"]
    # explain reads the site's module as steering and names the corrected modules.
    ex = rank1fast.explain(out, report, tokens=False)
    assert ex.corrections == [own, new] and ex.unmatched == [new]
    # the steering term and the two correction terms; the rest is vLLM's rank padding
    comps = ex["resid_post.3"].components
    assert [c.index for c in comps if c.energy_share > 0] == [0, 1, 2] and len(comps) == 8
    assert "downstream corrections" in str(ex) and ex.to_json()["corrections"] == [own, new]

    model, _ = smollm
    b = report["resid_post.3"].direction.vector
    wrapped = peft.PeftModel.from_pretrained(model, out)
    try:
        for module, extra, d_in in ((own, fixes[0], 1536), (new, fixes[1], 576)):
            layer = wrapped.get_submodule("base_model.model." + module)
            x = torch.as_tensor(rng.normal(size=(7, d_in)) + 1.0, dtype=torch.float32)
            with torch.no_grad():
                delta = (layer(x) - layer.base_layer(x)).double().numpy()
            want = (x.double().numpy() @ extra.a.T) @ extra.u.T
            if module == own:
                want += np.outer(x.double().numpy() @ b, 2.0 * v)
            scale = np.abs(want).max()
            np.testing.assert_allclose(delta, want, atol=2e-5 * scale, rtol=1e-4)
    finally:
        wrapped.unload()


def test_corrections_are_checked(report, tmp_path):
    v = {"resid_post.3": np.ones(576)}
    m = "model.layers.4.self_attn.o_proj"
    bad = [
        (Correction(m, np.ones((2, 576)), np.ones((576, 3)), 0, 1, 1, 1), r"not \[r, d_in\]"),
        (Correction(m, np.full((1, 576), np.nan), np.ones((576, 1)), 0, 1, 1, 1), "NaN"),
        (
            Correction(
                "model.layers.3.mlp.down_proj", np.ones((1, 5)), np.ones((576, 1)), 0, 1, 1, 1
            ),
            "sizes 5 x 576",
        ),
    ]
    for c, msg in bad:
        with pytest.raises(AdapterError, match=msg):
            rank1fast.write_adapter(report, v, tmp_path / "x", corrections=[c])
    with pytest.raises(AdapterError, match="least-squares"):
        rank1fast.write_adapter(
            report, v, tmp_path / "x", method="one-hot", corrections=[bad[0][0]]
        )
    assert not (tmp_path / "x").exists()


def test_write_corrected_checks_before_the_fit(smollm, report, tmp_path):
    from rank1fast.corrections import write_corrected

    v = {"resid_post.3": np.ones(576)}
    ad = rank1fast.write_adapter(report, v, tmp_path / "a", scale=4.0)
    texts = ["some text"] * 5
    with pytest.raises(InvalidArgumentError, match="written with scale 4.0, not 1.0"):
        write_corrected(smollm, report, v, ad, tmp_path / "b", texts, scale=1.0)
    with pytest.raises(AdapterError, match="already exists"):
        write_corrected(smollm, report, v, ad, ad, texts)
    with pytest.raises(InvalidArgumentError, match="correction_rank must be"):
        write_corrected(smollm, report, v, ad, tmp_path / "b", texts, correction_rank=0)
    assert not (tmp_path / "b").exists()
