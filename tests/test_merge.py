"""merge_adapter: a PEFT LoRA adapter merged into a copy of a safetensors checkpoint by the Rust
core, checked against PEFT's own ``merge_and_unload``: on the default model (saved as a
sharded safetensors checkpoint, float32 and bfloat16) and on a tiny random Llama (embeddings,
rsLoRA, rank/alpha patterns); untouched bytes, errors, and nothing left behind on failure."""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import pytest
import rank1fast
from rank1fast.errors import DumpError, InvalidArgumentError, PathNotFoundError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TEXT = "The quick brown fox jumps over the lazy dog, and then it reads the documentation."
O_PROJ = "model.layers.3.self_attn.o_proj"


# --------------------------------------------------------------------------- helpers


def _header(path: Path) -> tuple[bytes, dict]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        head = f.read(n)
    return head, json.loads(head)


def _tensor_bytes(path: Path) -> dict[str, memoryview]:
    head, meta = _header(path)
    data = memoryview(path.read_bytes())[8 + len(head) :]
    return {
        k: data[v["data_offsets"][0] : v["data_offsets"][1]]
        for k, v in meta.items()
        if k != "__metadata__"
    }


def _save(model, path: Path, shard: str) -> Path:
    """``save_pretrained`` as safetensors; a GGUF-loaded model (marked quantized, so not
    serializable) is saved through a clean model sharing its tensors."""
    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    with torch.device("meta"):
        clean = transformers.AutoModelForCausalLM.from_config(cfg, dtype=model.dtype)
    clean.load_state_dict(model.state_dict(), assign=True)
    clean.tie_weights()
    clean.save_pretrained(path, safe_serialization=True, max_shard_size=shard)
    return path


def _load(path: Path, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _peft_adapter(base_dir: Path, out: Path, dtype=torch.float32, **lora) -> Path:
    """A PEFT LoRA adapter with random (non-zero) A and B, saved by PEFT itself."""
    torch.manual_seed(0)
    model = peft.get_peft_model(
        _load(base_dir, dtype), peft.LoraConfig(init_lora_weights=False, **lora)
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(0.3)  # keep the update small, like a real adapter
            elif "modules_to_save" in name:
                p.mul_(1.5)  # a "trained" copy
    model.save_pretrained(out, safe_serialization=True)
    return out


def _peft_merged(base_dir: Path, adapter: Path, dtype=torch.float32):
    model = peft.PeftModel.from_pretrained(_load(base_dir, dtype), adapter)
    return model.merge_and_unload().eval()


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _leftovers(out: Path) -> list[str]:
    if not out.parent.is_dir():
        return []
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _targets(adapter: Path) -> set[str]:
    names = _tensor_bytes(adapter / "adapter_model.safetensors")
    return {
        k.removeprefix("base_model.model.").split(".lora_")[0] + ".weight"
        for k in names
        if ".lora_A" in k or ".lora_embedding_A" in k
    }


def _check_untouched(src: Path, dst: Path, targets: set[str]) -> None:
    """Same files; every shard has the same header and bytes except in the merged tensors."""
    src_files = sorted(p.relative_to(src) for p in src.rglob("*") if p.is_file())
    assert sorted(p.relative_to(dst) for p in dst.rglob("*") if p.is_file()) == src_files
    changed = set()
    for rel in src_files:
        a, b = src / rel, dst / rel
        if rel.suffix != ".safetensors":
            assert a.read_bytes() == b.read_bytes(), rel
            continue
        assert _header(a)[0] == _header(b)[0], rel
        ta, tb = _tensor_bytes(a), _tensor_bytes(b)
        for name in ta:
            if name in targets:
                assert ta[name] != tb[name], f"{name} was not merged"
                changed.add(name)
            else:
                assert ta[name] == tb[name], f"{name} changed"
    assert changed == targets


# --------------------------------------------------------------------------- default model

SMOLLM_TARGETS = [O_PROJ, "model.layers.15.mlp.down_proj", "model.layers.29.self_attn.q_proj"]


@pytest.fixture(scope="module")
def ckpt(smollm, tmp_path_factory):
    """The default model as a float32 safetensors checkpoint in 3 shards, and its tokenizer."""
    model, tok = smollm
    path = _save(model, tmp_path_factory.mktemp("smollm") / "f32", "200MB")
    tok.save_pretrained(path)
    assert len(list(path.glob("*.safetensors"))) >= 2
    return path


@pytest.fixture(scope="module")
def smollm_adapter(ckpt, tmp_path_factory):
    return _peft_adapter(
        ckpt,
        tmp_path_factory.mktemp("adapters") / "smollm",
        r=4,
        lora_alpha=8,
        target_modules=SMOLLM_TARGETS,
    )


@pytest.fixture(scope="module")
def ids(smollm):
    return smollm[1](TEXT, return_tensors="pt").input_ids


@pytest.mark.slow
def test_matches_peft_merge_and_unload_float32(smollm, ckpt, smollm_adapter, ids, tmp_path):
    calls = []
    out = rank1fast.merge_adapter(
        ckpt, smollm_adapter, tmp_path / "merged", progress=lambda d, t: calls.append((d, t))
    )
    assert out == tmp_path / "merged" and not _leftovers(out)
    assert calls and calls[-1][0] == calls[-1][1] > 500e6
    _check_untouched(ckpt, out, {m + ".weight" for m in SMOLLM_TARGETS})

    merged, ref = _load(out), _peft_merged(ckpt, smollm_adapter)
    ref_state = ref.state_dict()
    for name in SMOLLM_TARGETS:
        w = merged.state_dict()[name + ".weight"]
        torch.testing.assert_close(w, ref_state[name + ".weight"], rtol=0, atol=1e-6)
    got, want, base = _logits(merged, ids), _logits(ref, ids), _logits(smollm[0], ids)
    assert (want - base).abs().max() > 0.1  # the adapter does something
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_matches_peft_in_bfloat16(ckpt, smollm_adapter, ids, tmp_path):
    bf16 = _save(_load(ckpt, torch.bfloat16), tmp_path / "bf16", "100MB")
    out = rank1fast.merge_adapter(bf16, smollm_adapter, tmp_path / "merged", progress=False)
    _check_untouched(bf16, out, {m + ".weight" for m in SMOLLM_TARGETS})
    merged, ref = _load(out, torch.bfloat16), _peft_merged(bf16, smollm_adapter, torch.bfloat16)
    for name in SMOLLM_TARGETS:
        w, r = merged.state_dict()[name + ".weight"], ref.state_dict()[name + ".weight"]
        assert w.dtype == torch.bfloat16
        # Within one bfloat16 step (PEFT may round the update before adding it).
        torch.testing.assert_close(w.float(), r.float(), rtol=2**-7, atol=1e-6)
    got, want = _logits(merged, ids), _logits(ref, ids)
    assert (got - want).abs().max() < 0.05 * want.abs().max()


@pytest.mark.slow
def test_interrupt_and_missing_target_leave_nothing(ckpt, smollm_adapter, tmp_path):
    out = tmp_path / "merged"

    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rank1fast.merge_adapter(ckpt, smollm_adapter, out, progress=interrupt)
    assert not out.exists() and not _leftovers(out)

    # An adapter made for a deeper model: its layer 40 is not in the checkpoint.
    bad = tmp_path / "bad"
    bad.mkdir()
    config = (smollm_adapter / "adapter_config.json").read_text()
    (bad / "adapter_config.json").write_text(config.replace("layers.29.", "layers.40."))
    from safetensors.torch import load_file, save_file

    tensors = load_file(smollm_adapter / "adapter_model.safetensors")
    tensors = {k.replace("layers.29.", "layers.40."): v for k, v in tensors.items()}
    save_file(tensors, bad / "adapter_model.safetensors")
    with pytest.raises(InvalidArgumentError, match=r"has no tensor model\.layers\.40\."):
        rank1fast.merge_adapter(ckpt, bad, out, progress=False)
    assert not out.exists() and not _leftovers(out)


# --------------------------------------------------------------------------- tiny Llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer Llama with random weights and untied embeddings, in several shards."""
    torch.manual_seed(1)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    model.save_pretrained(path, safe_serialization=True, max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


def test_embeddings_modules_to_save_rslora_and_patterns_match_peft(tiny, tmp_path):
    adapter = _peft_adapter(
        tiny,
        tmp_path / "adapter",
        r=4,
        lora_alpha=6,
        target_modules=["embed_tokens", "o_proj", "up_proj"],
        modules_to_save=["lm_head"],
        rank_pattern={"model.layers.1.mlp.up_proj": 2},
        alpha_pattern={r"layers\.0\.self_attn\.o_proj": 3},
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["alpha_pattern"]
    for rslora in (False, True):
        config["use_rslora"] = rslora
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        out = rank1fast.merge_adapter(tiny, adapter, tmp_path / f"m{rslora}", progress=False)
        targets = _targets(adapter) | {"lm_head.weight"}
        assert "model.embed_tokens.weight" in targets and len(targets) == 6
        _check_untouched(tiny, out, targets)
        got, want = _load(out).state_dict(), _peft_merged(tiny, adapter).state_dict()
        for name in targets:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)
        ids = torch.arange(20).unsqueeze(0)
        torch.testing.assert_close(
            _logits(_load(out), ids), _logits(_peft_merged(tiny, adapter), ids), rtol=0, atol=1e-5
        )


def test_write_adapter_output_merges(tiny, tmp_path):
    """An adapter as rank1fast writes it (rank 8, one real rank) merges like any other."""
    import numpy as np
    from synth import activations

    site = "model.layers.1.self_attn.o_proj"
    np.save(tmp_path / f"{site}.npy", activations(800, 32, massive_cv=0.1))
    report = rank1fast.analyze(tmp_path / f"{site}.npy", progress=False)
    vec = np.linspace(-1, 1, 32)
    adapter = rank1fast.write_adapter(report, {site: vec}, tmp_path / "ad", rank=8, scale=0.5)
    out = rank1fast.merge_adapter(tiny, adapter, tmp_path / "merged", progress=False)
    got = _load(out).state_dict()[site + ".weight"]
    base = _load(tiny).state_dict()[site + ".weight"]
    direction = report[site].direction.vector
    want = base.double() + 0.5 * torch.outer(torch.tensor(vec), torch.tensor(direction))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def _adapter_like(src: Path, dst: Path, config: dict | None = None, **extra) -> Path:
    """A copy of an adapter with its config changed and extra tensors added."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    doc = json.loads((src / "adapter_config.json").read_text())
    doc.update(config or {})
    (dst / "adapter_config.json").write_text(json.dumps(doc))
    tensors = load_file(src / "adapter_model.safetensors")
    tensors.update(extra)
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst


def test_errors(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = _peft_adapter(tiny, tmp_path / "ok", r=2, target_modules=["o_proj"])
    out = tmp_path / "out" / "merged"
    a_key = f"base_model.model.{O_PROJ.replace('3', '1')}.lora_A.weight"
    cases = [
        (DumpError, "DoRA", {"use_dora": True}, {}),
        (
            DumpError,
            "DoRA",
            {},
            {a_key.replace("lora_A.weight", "lora_magnitude_vector"): torch.ones(32)},
        ),
        (DumpError, "lora_bias", {"lora_bias": True}, {}),
        (
            DumpError,
            "LoRA bias",
            {},
            {a_key.replace("lora_A.weight", "lora_B.bias"): torch.ones(32)},
        ),
        (
            DumpError,
            "not a LoRA factor",
            {},
            {"base_model.model.score.weight": torch.ones(96, 32)},
        ),
        (DumpError, "only LoRA", {"peft_type": "IA3"}, {}),
        (InvalidArgumentError, "should be \\[32, 16\\]", {}, {a_key: torch.ones(2, 16)}),
    ]
    for i, (cls, match, config, extra) in enumerate(cases):
        bad = _adapter_like(adapter, tmp_path / f"bad{i}", config, **extra)
        with pytest.raises(cls, match=match):
            rank1fast.merge_adapter(tiny, bad, out, progress=False)
        assert not out.exists() and not _leftovers(out)

    # An unsupported weight dtype (an int8 "quantized" copy of the target).
    q = tmp_path / "int8"
    q.mkdir()
    for p in tiny.iterdir():
        if p.suffix == ".safetensors":
            t = load_file(p)
            key = f"{O_PROJ.replace('3', '1')}.weight"
            if key in t:
                t[key] = t[key].to(torch.int8)
            save_file(t, q / p.name, metadata={"format": "pt"})
        else:
            (q / p.name).write_bytes(p.read_bytes())
    with pytest.raises(DumpError, match="unsupported dtype int8"):
        rank1fast.merge_adapter(q, adapter, out, progress=False)
    with pytest.raises(PathNotFoundError):
        rank1fast.merge_adapter(tiny, tmp_path / "nope", out, progress=False)
    # The output exists: refused unless overwrite.
    rank1fast.merge_adapter(tiny, adapter, out, progress=False)
    with pytest.raises(InvalidArgumentError, match="already exists"):
        rank1fast.merge_adapter(tiny, adapter, out, progress=False)
    (out / "stale").write_text("x")
    rank1fast.merge_adapter(tiny, adapter, out, overwrite=True, progress=False)
    assert not (out / "stale").exists() and not _leftovers(out)
    with pytest.raises(InvalidArgumentError, match="contain each other"):
        rank1fast.merge_adapter(tiny, adapter, tiny / "inside", progress=False)


def test_cli(tiny, tmp_path, capsys):
    from rank1fast.cli import main

    adapter = _peft_adapter(tiny, tmp_path / "ad", r=1, target_modules=["down_proj"])
    out = tmp_path / "merged"
    assert main(["merge", str(tiny), str(adapter), str(out)]) == 0
    text = capsys.readouterr().out
    assert "model.layers.0.mlp.down_proj.weight" in text and "wrote 2 merged tensors" in text
    assert main(["merge", str(tiny), str(adapter), str(out), "-q"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["merge", str(tiny), str(adapter), str(out), "-q", "--overwrite"]) == 0
    # rank1fast.merge stays the function that merges reports.
    from rank1fast.report import merge

    assert rank1fast.merge is merge
    assert rank1fast.merge_adapter.__module__ == "rank1fast.merging"
