"""rank1fast.explain: LoRA adapters read as steering, against numpy float64 references.

The fast tests use synthetic dumps (tests/synth.py) and hand-written PEFT adapter files; the
slow ones run the default model: collect a dump (with token ids), explain an adapter from
write_adapter (its vector comes back), random rank-4 LoRAs (the fraction equals numpy's over
the dump's rows), a LoRA orthogonal to the mean input, and a rank-1 LoRA trained for a few
steps with PEFT, whose vector is compared with the adapter through verify.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import rank1fast
from rank1fast.errors import AdapterError, InvalidArgumentError, PathNotFoundError
from rank1fast.explain import explain, lora_to_vectors
from synth import write_dump


def write_lora(
    path: Path,
    loras: dict[str, tuple[np.ndarray, np.ndarray]],
    alpha: float | None = None,
    **config: object,
) -> Path:
    """A PEFT LoRA directory by hand: ``{module: (A [r, d_in], B [d_out, r])}``."""
    from safetensors.numpy import save_file

    path.mkdir(parents=True)
    r = next(iter(loras.values()))[0].shape[0]
    doc = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": r if alpha is None else alpha,
        "target_modules": list(loras),
        "bias": "none",
        "task_type": "CAUSAL_LM",
        **config,
    }
    (path / "adapter_config.json").write_text(json.dumps(doc))
    tensors = {}
    for module, (a, b) in loras.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.asarray(a, dtype=np.float32)
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.asarray(b, dtype=np.float32)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def numpy_fraction(x: np.ndarray, dw: np.ndarray) -> tuple[float, np.ndarray]:
    """``‖mean(ΔW x)‖² / mean(‖ΔW x‖²)`` and ``mean(ΔW x)`` over the rows of ``x``, float64."""
    y = x @ dw.T
    mean = y.mean(axis=0)
    return float(mean @ mean / np.mean(np.sum(y * y, axis=1))), mean


def lora_to_a(adapter: Path) -> np.ndarray:
    """Row 0 of the first lora_A of a PEFT adapter, float64."""
    from safetensors.numpy import load_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    return next(v for k, v in tensors.items() if "lora_A" in k)[0].astype(np.float64)


def stored(a: np.ndarray) -> np.ndarray:
    """What the adapter file holds (float32), as float64."""
    return np.asarray(a, dtype=np.float32).astype(np.float64)


# --------------------------------------------------------------------------- synthetic


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain-synth")
    truth = write_dump(root / "dump", {"s0": 48, "s1": 32}, [40, 25, 60, 33, 50, 41], seed=3)
    return root, truth


def test_fraction_vector_and_components_match_numpy(synth, tmp_path):
    root, truth = synth
    x = truth["s0"]["x"][truth["s0"]["position"] >= 1]
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 48)) / 7, rng.normal(size=(32, 4))
    lora = write_lora(tmp_path / "lora", {"layers.0.proj": (a, b)}, alpha=8.0)  # scaling 2
    ex = explain(lora, root / "dump", tokens=False)
    s = ex["s0"]
    assert (s.module, s.rank, s.scaling, s.count) == ("layers.0.proj", 4, 2.0, len(x))
    dw = 2.0 * stored(b) @ stored(a)
    fraction, mean = numpy_fraction(x, dw)
    assert s.constant_fraction == pytest.approx(fraction, abs=1e-6)
    np.testing.assert_allclose(s.vector, mean, rtol=1e-6, atol=1e-9 * np.abs(mean).max())
    y = x @ dw.T
    assert s.rms_norm == pytest.approx(math.sqrt(np.mean(np.sum(y * y, axis=1))), rel=1e-6)
    for k, c in enumerate(s.components):
        ax = x @ stored(a)[k]
        assert c.mean == pytest.approx(ax.mean(), rel=1e-6)
        assert c.std == pytest.approx(ax.std(), rel=1e-5)
        assert c.constant_share == pytest.approx(ax.mean() ** 2 / np.mean(ax**2), rel=1e-6)
        part = 2.0 * np.outer(ax, stored(b)[:, k])
        energy = np.mean(np.sum(part * part, axis=1)) / np.mean(np.sum(y * y, axis=1))
        assert c.energy_share == pytest.approx(energy, rel=1e-6)
    assert ex.unmatched == []


def test_rslora_and_rank_pattern_scaling(synth, tmp_path):
    root, truth = synth
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, 48)), rng.normal(size=(32, 4))
    plain = write_lora(tmp_path / "plain", {"layers.0.proj": (a, b)}, alpha=4.0)
    rs = write_lora(tmp_path / "rs", {"layers.0.proj": (a, b)}, alpha=4.0, use_rslora=True)
    pattern = write_lora(
        tmp_path / "pattern", {"layers.0.proj": (a, b)}, alpha=4.0, alpha_pattern={"proj": 12.0}
    )
    v = {
        name: lora_to_vectors(p, root / "dump")["s0"]
        for name, p in (("plain", plain), ("rs", rs), ("pattern", pattern))
    }
    np.testing.assert_allclose(v["rs"], 2.0 * v["plain"], rtol=1e-12)  # 4/sqrt(4) vs 4/4
    np.testing.assert_allclose(v["pattern"], 3.0 * v["plain"], rtol=1e-12)


def test_orthogonal_to_the_mean_input_is_not_steering(synth, tmp_path):
    root, truth = synth
    x = truth["s1"]["x"][truth["s1"]["position"] >= 1]
    mu = x.mean(axis=0)
    rng = np.random.default_rng(2)
    r = rng.normal(size=(3, 32))
    a = r - np.outer(r @ mu, mu) / (mu @ mu)
    lora = write_lora(tmp_path / "orth", {"layers.1.proj": (a, rng.normal(size=(48, 3)))})
    ex = explain(lora, root / "dump", tokens=False)
    assert ex["s1"].constant_fraction <= 0.05
    fraction, _ = numpy_fraction(x, stored(rng.normal(size=(48, 3))) @ stored(a))
    assert fraction <= 0.05


def test_token_pass_without_token_ids(synth, tmp_path):
    pytest.importorskip("torch")
    root, truth = synth
    t = truth["s0"]
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(2, 48)), rng.normal(size=(32, 2))
    lora = write_lora(tmp_path / "lora", {"layers.0.proj": (a, b)})
    with pytest.warns(UserWarning, match="without token ids"):
        ex = explain(lora, root / "dump", top=3)
    counted = t["position"] >= 1
    for k, c in enumerate(ex["s0"].components):
        ax = t["x"] @ stored(a)[k]
        tok = c.tokens
        assert tok.count == counted.sum()
        order = np.argsort(-ax[counted])
        assert [x.value for x in tok.top] == pytest.approx(ax[counted][order[:3]].tolist())
        assert [x.value for x in tok.bottom] == pytest.approx(ax[counted][order[::-1][:3]].tolist())
        best = np.flatnonzero(counted)[order[0]]
        assert (tok.top[0].document, tok.top[0].position) == (
            t["document"][best],
            t["position"][best],
        )
        assert tok.top[0].token is None and tok.top[0].text is None
        n, mean, _sd = tok.by_position.T
        np.testing.assert_array_equal(n, np.bincount(t["position"]))
        p1 = t["position"] == 1
        assert mean[1] == pytest.approx(ax[p1].mean())
        assert tok.histogram[0].sum() == counted.sum()


def test_report_source_and_site_selection(synth, tmp_path):
    root, _ = synth
    rng = np.random.default_rng(5)
    lora = write_lora(
        tmp_path / "two",
        {
            "layers.0.proj": (rng.normal(size=(1, 48)), rng.normal(size=(32, 1))),
            "layers.1.proj": (rng.normal(size=(1, 32)), rng.normal(size=(48, 1))),
            "layers.9.proj": (rng.normal(size=(1, 8)), rng.normal(size=(8, 1))),
        },
    )
    report = rank1fast.analyze(root / "dump", progress=False)
    report.save(tmp_path / "report.npz")
    ex = explain(lora, report, tokens=False)
    assert [s.site for s in ex.sites] == ["s0", "s1"]
    assert ex.unmatched == ["layers.9.proj"]
    with pytest.warns(UserWarning, match="without token ids"):
        from_npz = explain(lora, tmp_path / "report.npz", sites=["s1"])
    assert [s.site for s in from_npz.sites] == ["s1"]
    # The saved report names its dump: the token pass reads it.
    assert all(c.tokens.count == report["s1"].count for c in from_npz["s1"].components)
    assert from_npz["s1"].constant_fraction == pytest.approx(ex["s1"].constant_fraction)
    # A report without a dump of its own (merged) reads the tokens from dump=.
    merged = rank1fast.merge([report])
    assert merged.source is None
    assert all(c.tokens is None for c in explain(lora, merged)["s0"].components)
    with pytest.warns(UserWarning, match="without token ids"):
        given = explain(lora, merged, dump=root / "dump", top=2)
    assert len(given["s0"].components[0].tokens.top) == 2
    with pytest.raises(rank1fast.DumpError, match="not a dump directory"):
        explain(lora, merged, dump=tmp_path)
    with pytest.raises(InvalidArgumentError, match="no token pass"):
        ex.plot(tmp_path / "plots")
    text = str(ex)
    assert "constant fraction" in text and "layers.9.proj" in text
    doc = json.loads(json.dumps(ex.to_json()))
    assert doc["sites"][0]["constant_fraction"] == pytest.approx(ex["s0"].constant_fraction)


def test_bad_inputs(synth, tmp_path):
    root, _ = synth
    rng = np.random.default_rng(6)
    ok = (rng.normal(size=(1, 48)), rng.normal(size=(32, 1)))
    with pytest.raises(PathNotFoundError):
        explain(tmp_path / "nope", root / "dump")
    lora = write_lora(tmp_path / "lora", {"layers.0.proj": ok})
    with pytest.raises(PathNotFoundError):
        explain(lora, tmp_path / "no-dump")
    elsewhere = write_lora(tmp_path / "elsewhere", {"layers.7.proj": ok})
    with pytest.raises(InvalidArgumentError, match="none of its modules"):
        explain(elsewhere, root / "dump")
    with pytest.raises(InvalidArgumentError, match="not in"):
        explain(lora, root / "dump", sites=["s7"])
    dora = write_lora(tmp_path / "dora", {"layers.0.proj": ok}, use_dora=True)
    with pytest.raises(AdapterError, match="DoRA"):
        explain(dora, root / "dump")
    wide = write_lora(
        tmp_path / "wide", {"layers.0.proj": (rng.normal(size=(1, 50)), rng.normal(size=(32, 1)))}
    )
    with pytest.raises(AdapterError, match="50 inputs"):
        explain(wide, root / "dump")
    no_moments = rank1fast.analyze(root / "dump", second_moments=False, progress=False)
    with pytest.raises(InvalidArgumentError, match="second moments"):
        explain(lora, no_moments)
    with pytest.raises(AdapterError):
        explain(root / "dump" / "manifest.json", root / "dump")


# --------------------------------------------------------------------------- default model

SITES = ["resid_mid.15", "resid_post.15"]
O_PROJ = "model.layers.15.self_attn.o_proj"
DOWN_PROJ = "model.layers.15.mlp.down_proj"
TOKENS = 4000


@pytest.fixture(scope="module")
def real(smollm, tmp_path_factory):
    pytest.importorskip("peft")
    from rank1fast.corpus import default_corpus
    from rank1fast.verify import EVAL_OFFSET, EVAL_STRIDE

    root = tmp_path_factory.mktemp("explain")
    docs = [d for i, d in enumerate(default_corpus()) if i % EVAL_STRIDE != EVAL_OFFSET]
    dump = rank1fast.collect(
        smollm, docs, SITES, root / "dump", max_tokens=TOKENS, max_length=96, progress=False
    )
    report = rank1fast.analyze(dump.path, progress=False)
    position = dump.read("position").numpy()
    rows = {s: dump.read(s).double().numpy()[position >= 1] for s in SITES}
    texts = default_corpus()[EVAL_OFFSET::EVAL_STRIDE][:4]
    return {
        "root": root,
        "dump": dump,
        "report": report,
        "rows": rows,
        "docs": docs,
        "texts": texts,
    }


@pytest.mark.slow
def test_collect_records_token_ids(real, tokenizer):
    dump = real["dump"]
    token = dump.read("token")
    assert str(token.dtype) == "torch.int32" and token.shape[0] == dump.tokens
    first = tokenizer(real["docs"][0], truncation=True, max_length=96)["input_ids"]
    assert token[: len(first)].tolist() == first
    # The Rust reader skips the 1-D int tensor in a bare shard too (position is metadata).
    shard = rank1fast.analyze(dump.shards[0], second_moments=False, progress=False)
    assert sorted(shard.sites) == sorted(SITES)
    assert (
        real["report"]["resid_mid.15"].count == dump.tokens - real["report"]["resid_mid.15"].skipped
    )


@pytest.mark.slow
def test_write_adapter_vector_comes_back(real, smollm, tokenizer):
    rng = np.random.default_rng(0)
    vecs = {s: rng.normal(size=576) for s in SITES}
    adapter = rank1fast.write_adapter(real["report"], vecs, real["root"] / "written", scale=3.0)
    ex = explain(adapter, real["dump"].path, top=3, tokenizer=tokenizer)
    print(ex)
    for s in SITES:
        got, want = ex[s].vector, 3.0 * vecs[s]
        cos = got @ want / (np.linalg.norm(got) * np.linalg.norm(want))
        assert cos >= 0.99
        assert np.linalg.norm(got) / np.linalg.norm(want) == pytest.approx(1.0, abs=0.02)
        assert ex[s].constant_fraction >= 0.9
        assert ex[s].components[0].cosine_direction >= 0.99  # b, pinned at the sink
    # Hook steering with the recovered vectors reproduces the adapter.
    mid = {"resid_mid.15": ex["resid_mid.15"].vector}
    shares = rank1fast.vector_share(smollm, adapter, mid, real["texts"], max_length=64)
    print({k: (v.share, v.adapter_kl) for k, v in shares.items()})
    assert shares["resid_mid.15"].adapter_kl > 0.05
    assert shares["resid_mid.15"].share >= 0.95


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_rank4_fraction_matches_numpy(real, tmp_path, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(4, 576)) / 24, rng.normal(size=(576, 4)) / 24
    lora = write_lora(tmp_path / "lora", {O_PROJ: (a, b)}, alpha=8.0)
    ex = explain(lora, real["report"], tokens=False)
    fraction, mean = numpy_fraction(real["rows"]["resid_mid.15"], 2.0 * stored(b) @ stored(a))
    print(
        f"seed {seed}: random rank-4 LoRA on {O_PROJ}: constant fraction "
        f"{ex['resid_mid.15'].constant_fraction:.4f} (numpy {fraction:.4f})"
    )
    assert abs(ex["resid_mid.15"].constant_fraction - fraction) <= 0.02
    assert ex["resid_mid.15"].constant_fraction == pytest.approx(fraction, rel=1e-4)
    np.testing.assert_allclose(ex["resid_mid.15"].vector, mean, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_orthogonal_lora_on_the_real_model(real, tmp_path):
    x = real["rows"]["resid_mid.15"]
    mu = x.mean(axis=0)
    rng = np.random.default_rng(7)
    r = rng.normal(size=(4, 576)) / 24
    a = r - np.outer(r @ mu, mu) / (mu @ mu)
    lora = write_lora(tmp_path / "orth", {O_PROJ: (a, rng.normal(size=(576, 4)) / 24)})
    ex = explain(lora, real["report"], tokens=False)
    print(f"orthogonal rank-4 LoRA: constant fraction {ex['resid_mid.15'].constant_fraction:.2e}")
    assert ex["resid_mid.15"].constant_fraction <= 0.05


@pytest.mark.slow
def test_tokens_in_context(real, tmp_path, tokenizer):
    dump = real["dump"]
    x = dump.read("resid_post.15").double().numpy()
    position, token = dump.read("position").numpy(), dump.read("token").numpy()
    rng = np.random.default_rng(8)
    a, b = rng.normal(size=(1, 1536)) / 40, rng.normal(size=(576, 1)) / 24
    lora = write_lora(tmp_path / "lora", {DOWN_PROJ: (a, b)})
    ex = explain(lora, dump.path, top=4, context=5, tokenizer=tokenizer)
    tok = ex["resid_post.15"].components[0].tokens
    ax = x @ stored(a)[0]
    counted = np.flatnonzero(position >= 1)
    best = counted[np.argmax(ax[counted])]
    assert tok.top[0].value == pytest.approx(ax[best], rel=1e-9)
    assert tok.top[0].token == token[best]
    assert "[[" + tokenizer.decode([int(token[best])]).replace("\n", "⏎") + "]]" in tok.top[0].text
    assert all(t.position >= 1 for t in tok.top + tok.bottom)
    assert "[[" in str(ex)


@pytest.mark.slow
def test_old_dump_without_token_ids(real, tmp_path):
    from safetensors.torch import load_file, save_file

    old = tmp_path / "old"
    shutil.copytree(real["dump"].path, old)
    for shard in sorted(old.glob("shard-*.safetensors")):
        tensors = load_file(shard)
        del tensors["token"]
        save_file(tensors, shard, metadata={"format": "pt"})
    report = rank1fast.analyze(old, progress=False)
    assert report["resid_mid.15"].count == real["report"]["resid_mid.15"].count
    rng = np.random.default_rng(9)
    lora = write_lora(
        tmp_path / "lora", {O_PROJ: (rng.normal(size=(2, 576)), rng.normal(size=(576, 2)))}
    )
    with pytest.warns(UserWarning, match="without token ids"):
        ex = explain(lora, old, top=2)
    new = explain(lora, real["report"], tokens=False)
    assert ex["resid_mid.15"].constant_fraction == pytest.approx(
        new["resid_mid.15"].constant_fraction, rel=1e-12
    )
    assert ex["resid_mid.15"].components[0].tokens.top[0].text is None


@pytest.mark.slow
def test_gguf_lora_reads_the_same(real, tmp_path):
    from rank1fast.llamacpp import lora_to_gguf

    rng = np.random.default_rng(10)
    lora = write_lora(
        tmp_path / "lora",
        {DOWN_PROJ: (rng.normal(size=(2, 1536)) / 40, rng.normal(size=(576, 2)) / 24)},
        alpha=6.0,
    )
    gguf = lora_to_gguf(lora, tmp_path / "lora.gguf")
    a = explain(lora, real["report"], tokens=False)["resid_post.15"]
    b = explain(gguf, real["report"], tokens=False)["resid_post.15"]
    assert b.constant_fraction == pytest.approx(a.constant_fraction, rel=1e-6)
    np.testing.assert_allclose(b.vector, a.vector, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_cli_json_export_and_plot(real, tmp_path, capsys):
    from rank1fast.cli import main

    rng = np.random.default_rng(11)
    lora = write_lora(
        tmp_path / "lora",
        {DOWN_PROJ: (rng.normal(size=(2, 1536)) / 40, rng.normal(size=(576, 2)) / 24)},
    )
    dump = str(real["dump"].path)
    out = tmp_path / "ex.json"
    rc = main(
        [
            "explain",
            str(lora),
            dump,
            "--json",
            str(out),
            "--export",
            str(tmp_path / "v.safetensors"),
            "--top",
            "3",
            "-q",
        ]
    )
    assert rc == 0
    doc = json.loads(out.read_text())
    assert (
        doc["skip_positions"] == 1 and len(doc["sites"][0]["components"][0]["tokens"]["top"]) == 3
    )
    want = lora_to_vectors(lora, dump)["resid_post.15"]
    got = rank1fast.vectors.load(tmp_path / "v.safetensors")["resid_post.15"]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    assert (
        main(
            ["explain", str(lora), dump, "--no-tokens", "--export", str(tmp_path / "cv.gguf"), "-q"]
        )
        == 0
    )
    cv = rank1fast.vectors.load(tmp_path / "cv.gguf")
    np.testing.assert_allclose(cv["resid_post.15"], want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    # resid_mid has no control-vector form.
    mid = write_lora(
        tmp_path / "mid", {O_PROJ: (rng.normal(size=(1, 576)), rng.normal(size=(576, 1)))}
    )
    assert (
        main(
            ["explain", str(mid), dump, "--no-tokens", "--export", str(tmp_path / "mid.gguf"), "-q"]
        )
        == 1
    )
    assert not (tmp_path / "mid.gguf").exists()
    # A --json path in a missing folder: the CLI's error line, not a traceback.
    missing = str(tmp_path / "no" / "such" / "ex.json")
    assert main(["explain", str(lora), dump, "--no-tokens", "--json", missing, "-q"]) == 1
    assert "No such file or directory" in capsys.readouterr().err
    pytest.importorskip("matplotlib")
    plots = str(tmp_path / "plots")
    assert main(["explain", str(lora), dump, "--plot", plots, "--top", "0", "-q"]) == 0
    png = tmp_path / "plots" / "resid_post.15.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.slow
def test_trained_rank1_lora(real, smollm, tokenizer, tmp_path):
    """A rank-1 LoRA on o_proj of layer 15, trained a few steps with PEFT: what part of it is a
    steering vector, and how much of its effect that vector reproduces through hook steering."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    from rank1fast.demo import steering_pairs

    model, tok = smollm
    torch.manual_seed(0)
    peft_model = get_peft_model(
        copy.deepcopy(model),
        LoraConfig(r=1, lora_alpha=1, target_modules=[O_PROJ], lora_dropout=0.0),
    )
    init = tmp_path / "init"
    peft_model.save_pretrained(init)  # B = 0: no output yet, but A's figures are defined
    positive, _ = steering_pairs()
    batch = tok(list(positive[:8]), return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    losses = []
    for _ in range(12):
        loss = peft_model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"training loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < losses[0]
    trained = tmp_path / "trained"
    peft_model.save_pretrained(trained)
    del peft_model

    ex = explain(trained, real["dump"].path, top=5, tokenizer=tokenizer)
    print(ex)
    s = ex["resid_mid.15"]
    before = explain(init, real["report"], tokens=False)["resid_mid.15"]
    assert math.isnan(before.constant_fraction)  # lora_B starts at zero
    a0 = lora_to_a(init)
    a1 = lora_to_a(trained)
    print(
        f"lora_A: cosine(initial, trained) {a0 @ a1 / np.linalg.norm(a0) / np.linalg.norm(a1):.3f};"
        f" constant share {before.components[0].constant_share:.3f} at initialisation, "
        f"{s.components[0].constant_share:.3f} trained"
    )
    assert s.rank == 1 and 0.0 <= s.constant_fraction <= 1.0
    vecs = lora_to_vectors(trained, real["dump"].path)
    np.testing.assert_array_equal(vecs["resid_mid.15"], s.vector)
    shares = rank1fast.vector_share(smollm, trained, vecs, real["texts"], max_length=64)
    share = shares["resid_mid.15"]
    print(
        f"trained rank-1 LoRA: constant fraction {s.constant_fraction:.3f}; "
        f"KL(base||adapter) {share.adapter_kl:.4f}, KL(hook||adapter) {share.residual_kl:.4f}: "
        f"the vector carries {100 * share.share:.1f}% of the adapter's effect"
    )
    assert share.adapter_kl > 0 and math.isfinite(share.share)
