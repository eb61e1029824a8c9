"""write_adapter: the PEFT adapter directory, its tensors (written by the Rust core), its errors,
and loading it with PEFT itself on a real (tiny, random) Llama."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import rank1fast
from rank1fast.adapter import CONFIG_FILE, INFO_FILE, WEIGHTS_FILE, read_adapter_info
from rank1fast.errors import AdapterError
from synth import write_dump

safetensors_numpy = pytest.importorskip("safetensors.numpy")


@pytest.fixture(scope="module")
def synth_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("dump")
    write_dump(root, {"resid_mid.1": 12, "resid_post.1": 20}, docs=[40] * 12, dtype="float32")
    return rank1fast.analyze(root, progress=False)


def _load(adapter):
    from safetensors import safe_open

    out = {}
    with safe_open(os.fspath(adapter / WEIGHTS_FILE), framework="pt") as f:
        for k in f.keys():  # noqa: SIM118
            out[k] = f.get_tensor(k).float().numpy().astype(np.float64)
    return out


def test_files_and_tensors(synth_report, tmp_path):
    rng = np.random.default_rng(0)
    v1, v2 = rng.normal(size=7), rng.normal(size=7)
    out = rank1fast.write_adapter(
        synth_report,
        {"resid_mid.1": v1, "resid_post.1": v2},
        tmp_path / "ad",
        scale=3.0,
        base_model="my/model",
        pin_sink=False,
    )
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, INFO_FILE])
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 1 and config["lora_alpha"] == 1 and config["bias"] == "none"
    assert config["base_model_name_or_path"] == "my/model"
    # Sites map to their modules through the dump's manifest.
    assert config["target_modules"] == ["layers.0.proj", "layers.1.proj"]
    t = _load(out)
    assert set(t) == {
        "base_model.model.layers.0.proj.lora_A.weight",
        "base_model.model.layers.0.proj.lora_B.weight",
        "base_model.model.layers.1.proj.lora_A.weight",
        "base_model.model.layers.1.proj.lora_B.weight",
    }
    for module, site, v in (
        ("layers.0.proj", "resid_mid.1", v1),
        ("layers.1.proj", "resid_post.1", v2),
    ):
        a = t[f"base_model.model.{module}.lora_A.weight"]
        b = t[f"base_model.model.{module}.lora_B.weight"]
        direction = synth_report[site].direction.vector
        assert a.shape == (1, direction.size) and b.shape == (v.size, 1)
        np.testing.assert_allclose(
            b @ a,
            3.0 * np.outer(v, direction),
            rtol=1e-5,
            atol=1e-6 * np.abs(np.outer(v, direction)).max(),
        )
        # A is a positive multiple of bᵀ, and the two factors have equal norms.
        np.testing.assert_allclose(
            a[0] / np.linalg.norm(a), direction / np.linalg.norm(direction), rtol=1e-5, atol=1e-7
        )
        assert np.linalg.norm(a) == pytest.approx(np.linalg.norm(b), rel=1e-5)
    info = read_adapter_info(out)
    assert info["scale"] == 3.0 and info["method"] == "least-squares"
    assert info["sites"]["resid_mid.1"]["module"] == "layers.0.proj"
    assert info["sites"]["resid_post.1"]["d_in"] == 20


def test_sites_named_by_module_path_need_no_manifest(tmp_path):
    from synth import activations

    x = activations(600, 10, massive_cv=0.1)
    np.save(tmp_path / "model.layers.3.mlp.down_proj.npy", x)
    np.save(tmp_path / "resid_mid.3.npy", x)
    report = rank1fast.analyze(tmp_path, progress=False)
    out = rank1fast.write_adapter(
        report, {"model.layers.3.mlp.down_proj": np.ones(4)}, tmp_path / "ad"
    )
    assert json.loads((out / CONFIG_FILE).read_text())["target_modules"] == [
        "model.layers.3.mlp.down_proj"
    ]
    with pytest.raises(AdapterError, match="does not say which module"):
        rank1fast.write_adapter(report, {"resid_mid.3": np.ones(4)}, tmp_path / "ad2")


@pytest.mark.parametrize("dtype,tol", [("float16", 2e-3), ("bfloat16", 1.6e-2)])
def test_half_dtypes_keep_the_product(synth_report, tmp_path, dtype, tol):
    v = np.linspace(-30, 30, 5)
    out = rank1fast.write_adapter(
        synth_report, {"resid_mid.1": v}, tmp_path / dtype, dtype=dtype, rank=8, pin_sink=False
    )
    t = _load(out)
    a = t["base_model.model.layers.0.proj.lora_A.weight"]
    b = t["base_model.model.layers.0.proj.lora_B.weight"]
    assert a.shape == (8, 12) and b.shape == (5, 8)
    assert not a[1:].any() and not b[:, 1:].any()
    want = np.outer(v, synth_report["resid_mid.1"].direction.vector)
    assert np.abs(b @ a - want).max() <= tol * np.abs(want).max()


def test_one_hot_method(synth_report, tmp_path):
    out = rank1fast.write_adapter(
        synth_report, {"resid_mid.1": np.ones(3)}, tmp_path / "oh", method="one-hot"
    )
    a = _load(out)["base_model.model.layers.0.proj.lora_A.weight"][0]
    (j,) = synth_report["resid_mid.1"].onehot.dims
    assert np.flatnonzero(a).tolist() == [j]
    assert read_adapter_info(out)["method"] == "one-hot"


def test_pin_sink_makes_the_first_position_exact(synth_report, tmp_path, monkeypatch):
    import rank1fast.adapter as adapter_module

    # The mean input at position 0, from the dump, independently of the analysis.
    full = rank1fast.analyze(
        synth_report.source, skip_positions=0, second_moments=False, progress=False
    )["resid_mid.1"]
    s = synth_report["resid_mid.1"]
    mu0 = (full.count * full.mean - s.count * s.mean) / (full.count - s.count)

    def b_dot_mu0(out):
        t = _load(out)
        a = t["base_model.model.layers.0.proj.lora_A.weight"][0]
        b = t["base_model.model.layers.0.proj.lora_B.weight"][:, 0]
        return float(b[0] * a @ mu0)  # the vector is all ones: B[0] undoes the balancing

    monkeypatch.setattr(adapter_module, "SINK_PIN_MAX_COST", float("inf"))
    out = rank1fast.write_adapter(synth_report, {"resid_mid.1": np.ones(4)}, tmp_path / "pin")
    sink = read_adapter_info(out)["sites"]["resid_mid.1"]["sink"]
    assert sink["pinned"] is True
    assert b_dot_mu0(out) == pytest.approx(1.0, rel=1e-4)
    assert abs(sink["b_dot_sink"] - 1.0) > 1e-3  # it was not exact before
    assert sink["rms_error_pinned"] >= sink["rms_error"] - 1e-9  # the constraint costs a bit
    assert sink["rms_error"] == pytest.approx(s.direction.error, rel=0.5)

    # Too expensive: the unconstrained direction is kept.
    monkeypatch.setattr(adapter_module, "SINK_PIN_MAX_COST", 1.0)
    out = rank1fast.write_adapter(synth_report, {"resid_mid.1": np.ones(4)}, tmp_path / "nopin")
    assert read_adapter_info(out)["sites"]["resid_mid.1"]["sink"]["pinned"] is False
    assert b_dot_mu0(out) == pytest.approx(sink["b_dot_sink"], rel=1e-4)


def test_errors(synth_report, tmp_path):
    ok = {"resid_mid.1": np.ones(4)}
    with pytest.raises(AdapterError, match="not in the report"):
        rank1fast.write_adapter(synth_report, {"resid_mid.9": np.ones(4)}, tmp_path / "a")
    with pytest.raises(AdapterError, match="1-D"):
        rank1fast.write_adapter(synth_report, {"resid_mid.1": np.ones((2, 2))}, tmp_path / "a")
    with pytest.raises(AdapterError, match="residual-stream sites need vectors of one size"):
        rank1fast.write_adapter(
            synth_report, {"resid_mid.1": np.ones(4), "resid_post.1": np.ones(5)}, tmp_path / "a"
        )
    with pytest.raises(AdapterError, match="rank"):
        rank1fast.write_adapter(synth_report, ok, tmp_path / "a", rank=0)
    with pytest.raises(AdapterError, match="method"):
        rank1fast.write_adapter(synth_report, ok, tmp_path / "a", method="pca")
    with pytest.raises(AdapterError, match="dtype"):
        rank1fast.write_adapter(synth_report, ok, tmp_path / "a", dtype="int8")
    assert not (tmp_path / "a").exists()

    # Existing output: refused, then replaced with overwrite=True.
    out = rank1fast.write_adapter(synth_report, ok, tmp_path / "a")
    with pytest.raises(AdapterError, match="already exists"):
        rank1fast.write_adapter(synth_report, ok, out)
    rank1fast.write_adapter(synth_report, {"resid_mid.1": np.ones(6)}, out, overwrite=True)
    assert read_adapter_info(out)["sites"]["resid_mid.1"]["d_out"] == 6
    # A directory that is not an adapter is never replaced.
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(AdapterError, match="not an adapter"):
        rank1fast.write_adapter(synth_report, ok, tmp_path / "precious", overwrite=True)
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_failure_in_the_rust_writer_leaves_nothing(synth_report, tmp_path):
    # 1e30 overflows float16: the Rust core refuses after the config was written to the temp dir.
    with pytest.raises(AdapterError, match="overflows float16"):
        rank1fast.write_adapter(
            synth_report, {"resid_mid.1": np.full(3, 1e30)}, tmp_path / "h", dtype="float16"
        )
    assert list(tmp_path.iterdir()) == []


def test_vector_size_checked_against_the_manifest(tmp_path, tiny_llama, tokenizer):
    pytest.importorskip("torch")
    dump = rank1fast.collect(
        (tiny_llama, tokenizer),
        ["Some words here."] * 4,
        "resid_mid.0",
        tmp_path / "dump",
        progress=False,
    )
    report = rank1fast.analyze(dump.path, progress=False)
    with pytest.raises(AdapterError, match="has 63 values but the module's output has 64"):
        rank1fast.write_adapter(report, {"resid_mid.0": np.ones(63)}, tmp_path / "a")


# --------------------------------------------------------------------------- through PEFT


@pytest.fixture(scope="module")
def tiny_setup(tiny_llama, tokenizer, prose, tmp_path_factory):
    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("tiny")
    dump = rank1fast.collect(
        (tiny_llama, tokenizer),
        prose[:24],
        "resid_mid.1,resid_post.2",
        root / "dump",
        max_tokens=3000,
        max_length=128,
        progress=False,
    )
    report = rank1fast.analyze(dump.path, progress=False)
    rng = np.random.default_rng(5)
    vecs = {"resid_mid.1": rng.normal(size=64), "resid_post.2": rng.normal(size=64)}
    return report, vecs, root


def _peft(model, path, name="default"):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(model), os.fspath(path), adapter_name=name)


def test_peft_loads_every_key_and_adds_scale_v_bx(tiny_setup, tiny_llama, tokenizer):
    import torch
    from peft import get_peft_model_state_dict

    report, vecs, root = tiny_setup
    out = rank1fast.write_adapter(report, vecs, root / "ad", scale=2.0, pin_sink=False)
    peft_model = _peft(tiny_llama, out)
    result = peft_model.load_adapter(os.fspath(out), adapter_name="again")
    assert result.missing_keys == [] and result.unexpected_keys == []
    stored = set(_load(out))
    assert set(get_peft_model_state_dict(peft_model, adapter_name="default")) == stored

    # Through PEFT the module's output grows by exactly 2·v·(b·x), b from the report.
    module = peft_model.base_model.model.model.layers[1].self_attn.o_proj
    seen = {}
    module.register_forward_hook(lambda m, i, o: seen.update(x=i[0], out=o))
    enc = tokenizer(["The quick brown fox jumps over the lazy dog."], return_tensors="pt")
    with torch.no_grad():
        peft_model(**enc)
        base_out = module.base_layer(seen["x"])
    b = torch.as_tensor(report["resid_mid.1"].direction.vector)
    want = 2.0 * (seen["x"].double() @ b)[..., None] * torch.as_tensor(vecs["resid_mid.1"])
    np.testing.assert_allclose(
        (seen["out"] - base_out).double().numpy(), want.numpy(), rtol=1e-4, atol=1e-5
    )


def test_rank_8_gives_the_same_logits_as_rank_1(tiny_setup, tiny_llama, tokenizer):
    import torch

    report, vecs, root = tiny_setup
    r1 = rank1fast.write_adapter(report, vecs, root / "r1", scale=4.0)
    r8 = rank1fast.write_adapter(report, vecs, root / "r8", scale=4.0, rank=8)
    assert json.loads((r8 / CONFIG_FILE).read_text())["r"] == 8
    enc = tokenizer(["Ranks beyond the first are zero."], return_tensors="pt")
    with torch.no_grad():
        base = tiny_llama(**enc).logits
        l1 = _peft(tiny_llama, r1)(**enc).logits
        l8 = _peft(tiny_llama, r8)(**enc).logits
    assert (l1 - base).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(l8, l1, rtol=1e-5, atol=1e-5)


def test_cli_write_and_vector_show(synth_report, tmp_path, capsys):
    from rank1fast.cli import main

    report_file = synth_report.save(tmp_path / "report.npz")
    vec_file = rank1fast.vectors.save({"resid_mid.1": np.arange(5.0)}, tmp_path / "v.safetensors")
    assert main(["vector", "show", str(vec_file)]) == 0
    assert "resid_mid.1  size 5" in capsys.readouterr().out
    args = ["write", str(report_file), str(vec_file), "-o", str(tmp_path / "ad"), "--rank", "4"]
    assert main(args) == 0
    assert "layers.0.proj" in capsys.readouterr().out
    assert json.loads((tmp_path / "ad" / CONFIG_FILE).read_text())["r"] == 4
    # The saved report still names its dump, so the sink was considered.
    assert isinstance(
        read_adapter_info(tmp_path / "ad")["sites"]["resid_mid.1"]["sink"]["pinned"], bool
    )
    assert main(args) == 1  # exists: a clean error, exit status 1
    assert "already exists" in capsys.readouterr().err
