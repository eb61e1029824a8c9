"""Serving profiles: rank padding, ``check`` on hand-built good and bad adapters (directories
and archives), adapters written for each server passing its check and loading in PEFT with
the logits of rank 1, and ``write_adapters`` against ``write_adapter``."""

from __future__ import annotations

import copy
import json
import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import rank1fast
from rank1fast import serving
from rank1fast.adapter import CONFIG_FILE, WEIGHTS_FILE, read_adapter_info
from rank1fast.errors import AdapterError, InvalidArgumentError, PathNotFoundError
from synth import write_dump, write_safetensors

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"
GOOD_CONFIG = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "r": 8,
    "lora_alpha": 16,
    "target_modules": ["q_proj", "v_proj"],
    "bias": "none",
    "modules_to_save": None,
    "use_dora": False,
    "model_type": "llama",
}


def lora_tensors(modules=(Q, V), r=8, d_in=16, d_out=16):
    out = {}
    for m in modules:
        out[f"base_model.model.{m}.lora_A.weight"] = ("float32", (r, d_in))
        out[f"base_model.model.{m}.lora_B.weight"] = ("float32", (d_out, r))
    return out


def make_adapter(path: Path, config=None, tensors=None, **config_changes) -> Path:
    """A PEFT adapter directory built by hand (zeros for data), as another tool might."""
    path.mkdir(parents=True, exist_ok=True)
    doc = dict(GOOD_CONFIG if config is None else config, **config_changes)
    (path / CONFIG_FILE).write_text(json.dumps(doc))
    specs = lora_tensors() if tensors is None else tensors
    write_safetensors(
        path / WEIGHTS_FILE,
        {k: (dt, shape, bytes(4 * int(np.prod(shape)))) for k, (dt, shape) in specs.items()},
    )
    return path


def rules(problems, severity="error"):
    return sorted({p.rule for p in problems if p.severity == severity})


# --------------------------------------------------------------------------- profiles


@pytest.mark.parametrize(
    "profile,requested,written",
    [
        ("peft", 1, 1),
        ("peft", 3, 3),
        ("vllm", 1, 1),
        ("vllm", 2, 8),
        ("vllm", 17, 32),
        ("vllm", 300, 320),
        ("vllm", 512, 512),
        ("fireworks", 1, 4),
        ("fireworks", 64, 64),
        ("cloudflare", 1, 1),
        ("cloudflare", 8, 8),
        ("together", 5, 5),
    ],
)
def test_rank_is_padded_to_the_smallest_the_server_takes(profile, requested, written):
    assert serving.get_profile(profile).pad_rank(requested) == written


@pytest.mark.parametrize("profile,rank", [("vllm", 513), ("fireworks", 65), ("cloudflare", 9)])
def test_a_rank_the_server_cannot_take_is_refused(profile, rank):
    with pytest.raises(InvalidArgumentError, match="takes"):
        serving.get_profile(profile).pad_rank(rank)


def test_unknown_profile():
    with pytest.raises(InvalidArgumentError, match="choose one of peft, vllm"):
        serving.get_profile("tgi")


# --------------------------------------------------------------------------- check: by hand


def test_a_good_adapter_passes_every_profile(tmp_path):
    ad = make_adapter(tmp_path / "good")
    for name in serving.PROFILES:
        assert serving.check(ad, name) == [], name


# (what to change, {profile: rules it must flag}); profiles not named must accept it.
CASES = {
    "rank too large": (
        dict(r=1024, tensors=lora_tensors(r=1024)),
        {"vllm": ["rank"], "fireworks": ["rank"], "cloudflare": ["rank"]},
    ),
    "rank too small for fireworks": (
        dict(r=2, tensors=lora_tensors(r=2)),
        {"fireworks": ["rank"]},
    ),
    "rank above 8": (dict(r=16, tensors=lora_tensors(r=16)), {"cloudflare": ["rank"]}),
    "rank_pattern above vLLM's": (
        dict(rank_pattern={"v_proj": 1024}, tensors=lora_tensors([Q]) | lora_tensors([V], r=1024)),
        {"vllm": ["rank"], "fireworks": ["rank"], "cloudflare": ["rank"]},
    ),
    "bias": (dict(bias="all"), {"vllm": ["bias"]}),
    "lora bias": (
        dict(
            lora_bias=True,
            tensors=lora_tensors() | {f"base_model.model.{Q}.lora_B.bias": ("float32", (16,))},
        ),
        {"vllm": ["bias"]},
    ),
    "modules_to_save": (
        dict(
            modules_to_save=["lm_head"],
            tensors=lora_tensors() | {"base_model.model.lm_head.weight": ("float32", (4, 16))},
        ),
        {"vllm": ["modules_to_save", "tensor_names"]},
    ),
    "dora": (
        dict(
            use_dora=True,
            tensors=lora_tensors()
            | {f"base_model.model.{Q}.lora_magnitude_vector": ("float32", (16,))},
        ),
        {"vllm": ["dora"]},
    ),
    "gpt-2 modules": (
        dict(target_modules=["c_attn"], tensors=lora_tensors(["transformer.h.0.attn.c_attn"])),
        {"vllm": ["target_modules"], "fireworks": ["target_modules"]},
    ),
    "target_modules as a pattern": (
        dict(target_modules=r".*\.(q_proj|v_proj)"),
        {"fireworks": ["target_modules"]},
    ),
    "no lora_alpha, no target_modules": (
        dict(
            config={
                k: v for k, v in GOOD_CONFIG.items() if k not in ("lora_alpha", "target_modules")
            }
        ),
        {"vllm": ["config"], "fireworks": ["config"]},
    ),
    "not LoRA": (
        dict(peft_type="IA3"),
        {p: ["config"] for p in serving.PROFILES},
    ),
    "r not an integer": (
        dict(r="8"),
        {p: ["config"] for p in serving.PROFILES},
    ),
    "weights of another rank than r": (
        dict(tensors=lora_tensors(r=4)),
        {p: ["shapes"] for p in serving.PROFILES},
    ),
    "A and B disagree": (
        dict(
            tensors=lora_tensors([Q])
            | {f"base_model.model.{Q}.lora_B.weight": ("float32", (16, 4))}
        ),
        {p: ["shapes"] for p in serving.PROFILES},
    ),
    "lora_B missing": (
        dict(tensors={f"base_model.model.{Q}.lora_A.weight": ("float32", (8, 16))}),
        {p: ["shapes"] for p in serving.PROFILES},
    ),
    "no LoRA tensors": (
        dict(tensors={"something": ("float32", (2,))}),
        {p: ["shapes"] for p in serving.PROFILES} | {"vllm": ["shapes", "tensor_names"]},
    ),
    "no model_type": (
        dict(config={k: v for k, v in GOOD_CONFIG.items() if k != "model_type"}),
        {"cloudflare": ["model_type"]},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_check_flags_each_rule_and_only_where_it_applies(tmp_path, case):
    changes, expect = CASES[case]
    changes = dict(changes)
    ad = make_adapter(
        tmp_path / "ad",
        config=changes.pop("config", None),
        tensors=changes.pop("tensors", None),
        **changes,
    )
    for name in serving.PROFILES:
        problems = serving.check(ad, name)
        assert rules(problems) == sorted(expect.get(name, [])), (name, [str(p) for p in problems])
        for p in problems:
            assert p.message and p.severity in ("error", "warning")


def test_vllm_warns_about_its_default_max_rank(tmp_path):
    ad = make_adapter(tmp_path / "ad", r=32, tensors=lora_tensors(r=32))
    (problem,) = serving.check(ad, "vllm")
    assert problem.severity == "warning" and problem.rule == "rank"
    assert "--max-lora-rank 32" in problem.message


def test_file_layout_and_size_rules(tmp_path):
    # Cloudflare: each file under 100 MB (a sparse file costs no disk).
    ad = make_adapter(tmp_path / "big")
    with open(ad / "training_args.bin", "wb") as f:
        f.truncate(100_000_000)
    problems = serving.check(ad, "cloudflare")
    assert rules(problems) == ["file_size"] and problems[0].file == "training_args.bin"
    assert serving.check(ad, "peft") == []

    # Together: nothing nested.
    ad = make_adapter(tmp_path / "nested")
    (ad / "checkpoint-10").mkdir()
    (ad / "checkpoint-10" / "optimizer.pt").write_bytes(b"x")
    assert rules(serving.check(ad, "together")) == ["layout"]
    assert serving.check(ad, "vllm") == []

    # The PEFT files one level down: every server misses them.
    outer = tmp_path / "outer"
    make_adapter(outer / "adapter")
    for name in serving.PROFILES:
        problems = serving.check(outer, name)
        assert rules(problems) == ["layout"], name
        assert "adapter/" in problems[0].message


def test_missing_and_garbled_files_are_problems_not_crashes(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert rules(serving.check(empty, "peft")) == ["files"]
    assert len(serving.check(empty, "peft")) == 2  # no config, no weights

    ad = make_adapter(tmp_path / "noconfig")
    (ad / CONFIG_FILE).unlink()
    assert rules(serving.check(ad, "vllm")) == ["files"]

    ad = make_adapter(tmp_path / "badjson")
    (ad / CONFIG_FILE).write_text("{'r': 8,")
    assert rules(serving.check(ad, "peft")) == ["config"]
    (ad / CONFIG_FILE).write_text("[8]")
    assert rules(serving.check(ad, "peft")) == ["config"]

    ad = make_adapter(tmp_path / "garbled")
    (ad / WEIGHTS_FILE).write_bytes(b"\xff" * 64)
    assert rules(serving.check(ad, "peft")) == ["weights"]
    (ad / WEIGHTS_FILE).write_bytes(b"\x02")
    assert rules(serving.check(ad, "peft")) == ["weights"]

    ad = make_adapter(tmp_path / "truncated")
    data = (ad / WEIGHTS_FILE).read_bytes()
    (ad / WEIGHTS_FILE).write_bytes(data[:-100])
    (problem,) = serving.check(ad, "peft")
    assert problem.rule == "weights" and "truncated" in problem.message

    not_an_adapter = tmp_path / "notes.txt"
    not_an_adapter.write_text("hello")
    assert rules(serving.check(not_an_adapter, "peft")) == ["files"]
    with pytest.raises(PathNotFoundError):
        serving.check(tmp_path / "nowhere", "peft")


def test_bin_weights_only_where_the_server_reads_them(tmp_path):
    torch = pytest.importorskip("torch")
    ad = make_adapter(tmp_path / "bin")
    (ad / WEIGHTS_FILE).unlink()
    torch.save(
        {k: torch.zeros(shape) for k, (_, shape) in lora_tensors().items()},
        ad / "adapter_model.bin",
    )
    assert serving.check(ad, "peft") == [] and serving.check(ad, "vllm") == []
    for name in ("cloudflare", "together"):
        (problem,) = serving.check(ad, name)
        assert problem.rule == "files" and "adapter_model.safetensors" in problem.message
    # Shapes are read from the pickle too.
    torch.save({k: torch.zeros(2, 2) for k in lora_tensors()}, ad / "adapter_model.bin")
    assert rules(serving.check(ad, "peft")) == ["shapes"]


def test_archives(tmp_path):
    ad = make_adapter(tmp_path / "ad")
    # Files at the root of the archive (tar -C ad .): what Together wants.
    flat = tmp_path / "flat.tar.gz"
    with tarfile.open(flat, "w:gz") as tf:
        tf.add(ad, arcname=".")
    assert serving.check(flat, "together") == []
    # The usual mistake: the archive holds the directory.
    nested = tmp_path / "nested.zip"
    with zipfile.ZipFile(nested, "w") as zf:
        for f in ad.iterdir():
            zf.write(f, f"ad/{f.name}")
    problems = serving.check(nested, "together")
    assert rules(problems) == ["layout"] and "archive" in problems[0].message
    # Header and shapes are read from inside the archive.
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr(CONFIG_FILE, json.dumps(dict(GOOD_CONFIG, r=4)))
        zf.write(ad / WEIGHTS_FILE, WEIGHTS_FILE)
    assert rules(serving.check(bad, "vllm")) == ["shapes"]


# --------------------------------------------------------------------------- writing for a server


@pytest.fixture(scope="module")
def llama_report(tmp_path_factory):
    """A synthetic dump whose sites sit on Llama modules (o_proj, down_proj)."""
    root = tmp_path_factory.mktemp("dump")
    write_dump(root, {"resid_mid.1": 12, "resid_post.1": 20}, docs=[40] * 12, dtype="float32")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["model"] = {"name": "synthetic", "type": "llama"}
    manifest["sites"]["resid_mid.1"]["module"] = "model.layers.1.self_attn.o_proj"
    manifest["sites"]["resid_post.1"]["module"] = "model.layers.1.mlp.down_proj"
    (root / "manifest.json").write_text(json.dumps(manifest))
    return rank1fast.analyze(root, progress=False)


def _tensors(adapter):
    from safetensors.numpy import load_file

    return load_file(os.fspath(adapter / WEIGHTS_FILE))


@pytest.mark.parametrize("profile", list(serving.PROFILES))
def test_adapters_written_for_a_server_pass_its_check(llama_report, tmp_path, profile):
    vecs = {"resid_mid.1": np.arange(7.0), "resid_post.1": -np.ones(7)}
    out = rank1fast.write_adapter(llama_report, vecs, tmp_path / "ad", target=profile)
    assert serving.check(out, profile) == []
    want = serving.get_profile(profile).pad_rank(1)
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["r"] == config["lora_alpha"] == want
    info = read_adapter_info(out)
    assert info["target"] == profile and info["rank"] == want and info["requested_rank"] == 1
    for name, t in _tensors(out).items():
        assert want in t.shape
        extra = t[1:] if ".lora_A." in name else t[:, 1:]
        assert not extra.any()  # padded ranks are zero


def test_writer_refuses_what_the_server_would_reject(llama_report, tmp_path):
    vecs = {"resid_mid.1": np.ones(7)}
    with pytest.raises(InvalidArgumentError, match="rank 9: Cloudflare Workers AI takes r <= 8"):
        rank1fast.write_adapter(llama_report, vecs, tmp_path / "a", rank=9, target="cloudflare")
    with pytest.raises(InvalidArgumentError, match="rank 65"):
        rank1fast.write_adapter(llama_report, vecs, tmp_path / "a", rank=65, target="fireworks")
    # A module vLLM does not adapt (GPT-2's c_proj).
    gpt2 = copy.copy(llama_report)
    gpt2.modules = {"resid_mid.1": "transformer.h.1.attn.c_proj"}
    with pytest.raises(InvalidArgumentError, match=r"(?s)vLLM would reject.*c_proj"):
        rank1fast.write_adapter(gpt2, vecs, tmp_path / "a", target="vllm")
    # Workers AI needs the model family: from the dump's model, else from base_model's name.
    unknown = copy.copy(llama_report)
    unknown.source = None  # no manifest to tell the family
    with pytest.raises(InvalidArgumentError, match="model_type"):
        rank1fast.write_adapter(
            unknown, vecs, tmp_path / "a", target="cloudflare", base_model="Qwen/Qwen2-7B"
        )
    assert not (tmp_path / "a").exists()
    out = rank1fast.write_adapter(
        unknown,
        vecs,
        tmp_path / "a",
        target="cloudflare",
        base_model="mistralai/Mistral-7B-Instruct-v0.2",
    )
    assert json.loads((out / CONFIG_FILE).read_text())["model_type"] == "mistral"
    with pytest.raises(InvalidArgumentError, match="unknown serving profile"):
        rank1fast.write_adapter(llama_report, vecs, tmp_path / "b", target="sglang")


def test_cli_write_for_and_check(llama_report, tmp_path, capsys):
    from rank1fast.cli import main

    report_file = llama_report.save(tmp_path / "report.npz")
    vec_file = rank1fast.vectors.save({"resid_mid.1": np.arange(7.0)}, tmp_path / "v.safetensors")
    ad = tmp_path / "fw"
    assert (
        main(["write", str(report_file), str(vec_file), "-o", str(ad), "--for", "fireworks"]) == 0
    )
    assert "r = 4" in capsys.readouterr().out
    assert json.loads((ad / CONFIG_FILE).read_text())["r"] == 4

    assert main(["check", str(ad), "--for", "fireworks", "--for", "vllm"]) == 0
    out = capsys.readouterr().out
    assert "fireworks (Fireworks): OK" in out and "vllm (vLLM): OK" in out

    bad = make_adapter(tmp_path / "bad", r=1024, tensors=lora_tensors(r=1024), bias="all")
    assert main(["check", str(bad), "--for", "vllm"]) == 1
    out = capsys.readouterr().out
    assert "2 problems" in out and "rank" in out and "bias" in out
    assert main(["check", str(bad), "--for", "all", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and set(doc["profiles"]) == set(serving.PROFILES)
    assert doc["profiles"]["peft"] == {"ok": True, "problems": []}
    assert {p["rule"] for p in doc["profiles"]["vllm"]["problems"]} == {"rank", "bias"}
    assert main(["check", str(tmp_path / "nowhere")]) == 1
    assert "no such adapter" in capsys.readouterr().err


# --------------------------------------------------------------------------- write_adapters


def _files(adapter):
    return {p.name: p.read_bytes() for p in sorted(adapter.iterdir())}


@pytest.mark.parametrize("target", ["peft", "vllm"])
def test_write_adapters_is_write_adapter_per_adapter(llama_report, tmp_path, target):
    rng = np.random.default_rng(1)
    adapters = {
        "a": {"resid_mid.1": rng.normal(size=7)},
        "b": {"resid_mid.1": rng.normal(size=7), "resid_post.1": rng.normal(size=7)},
        "c d": {"resid_post.1": rng.normal(size=7)},
    }
    options = dict(scale=2.5, rank=2, dtype="bfloat16", target=target, base_model="x/y")
    outs = rank1fast.write_adapters(llama_report, adapters, tmp_path / "many", **options)
    assert list(outs) == list(adapters)
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == ["a", "b", "c d"]
    for name, vecs in adapters.items():
        one = rank1fast.write_adapter(llama_report, vecs, tmp_path / "one" / name, **options)
        assert outs[name] == tmp_path / "many" / name
        assert _files(outs[name]) == _files(one)
        assert serving.check(outs[name], target) == []


def test_write_adapters_does_shared_work_once(llama_report, tmp_path, monkeypatch):
    import rank1fast.adapter as adapter_module

    calls = []
    real_pin = adapter_module._pin
    monkeypatch.setattr(adapter_module, "_pin", lambda *a: calls.append(1) or real_pin(*a))
    adapter_module._PINNED.clear()
    adapters = {f"s{i}": {"resid_mid.1": np.full(7, float(i + 1))} for i in range(20)}
    rank1fast.write_adapters(llama_report, adapters, tmp_path / "many")
    assert len(calls) == 1  # the d x d solve of the sink pinning
    for i in (0, 19):
        info = read_adapter_info(tmp_path / "many" / f"s{i}")
        assert info["sites"]["resid_mid.1"]["vector_norm"] == pytest.approx((i + 1) * np.sqrt(7))
        assert info["sites"]["resid_mid.1"]["sink"]["b_dot_sink"] != 0
    # Later calls on the same report share it too.
    rank1fast.write_adapter(llama_report, adapters["s0"], tmp_path / "one")
    assert len(calls) == 1


def test_write_adapters_all_or_nothing(llama_report, tmp_path):
    root = tmp_path / "many"
    good = {"resid_mid.1": np.ones(7)}
    with pytest.raises(AdapterError, match="adapter 'bad'.*1-D"):
        rank1fast.write_adapters(
            llama_report, {"ok": good, "bad": {"resid_mid.1": np.ones((2, 2))}}, root
        )
    assert not root.exists() or list(root.iterdir()) == []
    # A failure inside the Rust writer (float16 overflow) after others were staged.
    adapters = {f"ok{i}": good for i in range(6)} | {"huge": {"resid_mid.1": np.full(7, 1e30)}}
    with pytest.raises(AdapterError, match="huge.*overflows float16"):
        rank1fast.write_adapters(llama_report, adapters, root, dtype="float16", threads=3)
    assert list(root.iterdir()) == []
    for name in ("", ".hidden", "a/b", ".."):
        with pytest.raises(AdapterError, match="one directory name"):
            rank1fast.write_adapters(llama_report, {name: good}, root)
    with pytest.raises(AdapterError, match="no adapters"):
        rank1fast.write_adapters(llama_report, {}, root)
    with pytest.raises(AdapterError, match="threads"):
        rank1fast.write_adapters(llama_report, {"a": good}, root, threads=0)

    # Existing adapters: refused up front, replaced with overwrite=True.
    rank1fast.write_adapters(llama_report, {"a": good}, root)
    with pytest.raises(AdapterError, match="already exists"):
        rank1fast.write_adapters(llama_report, {"b": good, "a": good}, root)
    assert sorted(p.name for p in root.iterdir()) == ["a"]
    rank1fast.write_adapters(
        llama_report, {"a": {"resid_mid.1": np.ones(9)}, "b": good}, root, overwrite=True
    )
    assert read_adapter_info(root / "a")["sites"]["resid_mid.1"]["d_out"] == 9
    assert sorted(p.name for p in root.iterdir()) == ["a", "b"]
    shutil.rmtree(root)


# --------------------------------------------------------------------------- through PEFT


@pytest.fixture(scope="module")
def tiny_report(tiny_llama, tokenizer, prose, tmp_path_factory):
    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("tiny-serving")
    dump = rank1fast.collect(
        (tiny_llama, tokenizer),
        prose[:12],
        "resid_mid.1,resid_post.2",
        root / "dump",
        max_tokens=1500,
        max_length=128,
        progress=False,
    )
    return rank1fast.analyze(dump.path, progress=False), root


def test_profile_adapters_load_in_peft_with_the_logits_of_rank_1(
    tiny_report, tiny_llama, tokenizer
):
    import torch
    from peft import PeftModel

    report, root = tiny_report
    rng = np.random.default_rng(3)
    vecs = {"resid_mid.1": rng.normal(size=64), "resid_post.2": rng.normal(size=64)}
    enc = tokenizer(["Padded ranks are zero, so nothing changes."], return_tensors="pt")

    def logits(path):
        model = PeftModel.from_pretrained(copy.deepcopy(tiny_llama), os.fspath(path))
        with torch.no_grad():
            return model(**enc).logits

    reference = logits(rank1fast.write_adapter(report, vecs, root / "r1", scale=4.0))
    with torch.no_grad():
        assert (reference - tiny_llama(**enc).logits).abs().max() > 1e-3
    for profile, rank in [("vllm", 2), ("fireworks", 1), ("cloudflare", 3), ("together", 1)]:
        out = rank1fast.write_adapter(
            report, vecs, root / profile, scale=4.0, rank=rank, target=profile
        )
        assert serving.check(out, profile) == []
        torch.testing.assert_close(logits(out), reference, rtol=1e-5, atol=1e-5)
