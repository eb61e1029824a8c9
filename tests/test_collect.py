"""rank1fast.collect: dumps against plain forward hooks, resume, refusal, sites, corpus, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import rank1fast  # noqa: E402
from rank1fast import Dump, DumpError, PathNotFoundError, SiteError  # noqa: E402
from rank1fast.corpus import default_corpus, read_texts  # noqa: E402
from rank1fast.models import get_module, num_layers, resolve_sites  # noqa: E402

SITES = "resid_mid.3,resid_post.3"  # o_proj and down_proj of layer 3


def reference(model, tokenizer, texts, paths, *, batch_size, max_length, outputs=False):
    """What plain forward (pre-)hooks see over the documented batching, real tokens only.

    Documents are taken ``batch_size`` at a time, tokenized with the tokenizer's own padding
    (right side, to the longest of the batch); documents with no token are left out of the
    batch. Returns ``{name: tensor}`` for the sites (and outputs), ``position``, ``document``,
    and the number of padding positions the batches held.
    """
    seen: dict[str, list] = {}
    hooks = []
    for name, path in paths.items():
        module = get_module(model, path)

        def pre(mod, args, name=name):
            seen.setdefault(name, []).append(args[0].detach().clone())

        hooks.append(module.register_forward_pre_hook(pre))
        if outputs:

            def post(mod, args, out, name=name):
                seen.setdefault(name + ".output", []).append(out.detach().clone())

            hooks.append(module.register_forward_hook(post))
    result: dict[str, list] = {"position": [], "document": []}
    padding = 0
    try:
        for start in range(0, len(texts), batch_size):
            docs = [
                (start + i, t)
                for i, t in enumerate(texts[start : start + batch_size])
                if tokenizer(t, truncation=True, max_length=max_length)["input_ids"]
            ]
            if not docs:
                continue
            enc = tokenizer(
                [t for _, t in docs],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            mask = enc["attention_mask"].bool()
            padding += int((~mask).sum())
            seen.clear()
            with torch.no_grad():
                model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            for name, xs in seen.items():
                assert len(xs) == 1
                result.setdefault(name, []).append(xs[0][mask])
            lengths = mask.sum(1).tolist()
            result["position"] += [torch.arange(n, dtype=torch.int32) for n in lengths]
            indices = [d for d, _ in docs]
            result["document"] += [
                torch.full((n,), d, dtype=torch.int64)
                for d, n in zip(indices, lengths, strict=True)
            ]
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in result.items()}, padding


def read_all(dump: Dump) -> dict:
    names = [*dump.sites, *dump.outputs.values(), "position", "document"]
    return {n: dump.read(n) for n in names}


def assert_same_dump(a: Dump, b: Dump) -> None:
    ta, tb = read_all(a), read_all(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name
    assert [s["tokens"] for s in a.manifest["shards"]] == [
        s["tokens"] for s in b.manifest["shards"]
    ]
    for key in ("tokens", "documents", "corpus_sha256", "sites", "outputs", "complete"):
        assert a.manifest.get(key) == b.manifest.get(key), key


class Interrupt(Exception):
    pass


def interrupt_after(calls: int):
    state = {"n": 0}

    def progress(done, total):
        state["n"] += 1
        if state["n"] == calls:
            raise Interrupt

    return progress


# --------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_dump_equals_forward_pre_hook(smollm, prose, tmp_path):
    model, tokenizer = smollm
    texts = list(prose[:11])
    texts[2] = ""  # a document without a token: skipped, its index never appears
    texts[5] = texts[5][:80]  # a short one, so the batches carry padding
    dump = rank1fast.collect(
        smollm,
        texts,
        SITES,
        tmp_path / "d",
        batch_size=4,
        max_length=96,
        storage_dtype="float32",
        outputs=True,
        progress=False,
    )
    assert dump.sites == {
        "resid_mid.3": "model.layers.3.self_attn.o_proj",
        "resid_post.3": "model.layers.3.mlp.down_proj",
    }
    assert dump.outputs == {s: f"{s}.output" for s in dump.sites}
    ref, padding = reference(
        model, tokenizer, texts, dump.sites, batch_size=4, max_length=96, outputs=True
    )
    assert padding > 0  # the batches did hold padding, and none of it was recorded
    got = read_all(dump)
    assert got.keys() == ref.keys()
    for name in ref:
        assert got[name].dtype == ref[name].dtype, name
        assert torch.equal(got[name], ref[name]), name
    assert dump.tokens == len(ref["position"]) == got["resid_mid.3"].shape[0]
    assert 2 not in got["document"].tolist()
    assert sorted(set(got["document"].tolist())) == [i for i in range(11) if i != 2]
    assert got["position"].max() == 95  # truncated to max_length
    assert got["resid_mid.3"].shape[1] == 576 and got["resid_post.3"].shape[1] == 1536
    assert got["resid_post.3.output"].shape[1] == 576

    # bfloat16 storage holds the same values rounded once.
    bf = rank1fast.collect(
        smollm, texts, SITES, tmp_path / "bf", batch_size=4, max_length=96, progress=False
    )
    for name in dump.sites:
        x = bf.read(name)
        assert x.dtype == torch.bfloat16
        assert torch.equal(x, ref[name].to(torch.bfloat16)), name
    manifest = json.loads((bf.path / "manifest.json").read_text())
    assert manifest["format"] == "rank1fast.dump" and manifest["version"] == 1
    assert manifest["sites"]["resid_mid.3"] == {
        "module": "model.layers.3.self_attn.o_proj",
        "dim": 576,
        "out_dim": 576,
        "dtype": "bfloat16",
    }
    assert manifest["tokens"] == sum(s["tokens"] for s in manifest["shards"]) == bf.tokens
    assert manifest["model"]["type"] == "llama" and manifest["model"]["layers"] == 30


@pytest.mark.slow
def test_interrupted_then_resumed_equals_uninterrupted(smollm, prose, tmp_path):
    texts = prose[:24]
    kw = dict(batch_size=4, max_length=48, shard_tokens=300, outputs=True, progress=False)
    whole = rank1fast.collect(smollm, texts, SITES, tmp_path / "whole", **kw)
    assert len(whole.shards) >= 3

    part = tmp_path / "part"
    with pytest.raises(Interrupt):
        rank1fast.collect(smollm, texts, SITES, part, **{**kw, "progress": interrupt_after(4)})
    cut = Dump.open(part)
    assert not cut.complete and 0 < cut.tokens < whole.tokens
    assert cut.documents % 4 == 0 and len(cut.shards) >= 1
    (part / "shard-00042.safetensors.tmp").write_bytes(b"half-written")  # as after kill -9
    resumed = rank1fast.collect(smollm, texts, SITES, part, **kw)
    assert_same_dump(resumed, whole)
    assert not list(part.glob("*.tmp"))

    # Rerunning a finished call is a no-op.
    mtime = (part / "manifest.json").stat().st_mtime_ns
    again = rank1fast.collect(smollm, texts, SITES, part, **kw)
    assert again.tokens == whole.tokens
    assert (part / "manifest.json").stat().st_mtime_ns == mtime

    # A run stopped at max_tokens, then asked for everything, equals the whole run too.
    grow = tmp_path / "grow"
    first = rank1fast.collect(smollm, texts, SITES, grow, max_tokens=500, **kw)
    assert first.tokens == 500 and first.complete
    assert_same_dump(rank1fast.collect(smollm, texts, SITES, grow, **kw), whole)


@pytest.mark.slow
def test_analyze_reads_the_dump(smollm, prose, tmp_path):
    dump = rank1fast.collect(
        smollm,
        prose[:12],
        SITES,
        tmp_path / "d",
        batch_size=6,
        max_length=128,
        outputs=True,
        progress=False,
    )
    report = rank1fast.analyze(dump.path)
    assert [s.name for s in report] == list(dump.sites)  # outputs are not sites
    first_tokens = int((dump.read("position") == 0).sum())
    for site in report:
        assert site.count == dump.tokens - first_tokens  # position 0 skipped by default
    direct = dump.analyze(skip_positions=0, second_moments=False)
    assert direct["resid_mid.3"].count == dump.tokens


# --------------------------------------------------------------------------- tiny models


def test_max_tokens_and_max_length(tiny_llama, tokenizer, prose, tmp_path):
    dump = rank1fast.collect(
        (tiny_llama, tokenizer),
        prose[:30],
        "resid_mid.1",
        tmp_path / "d",
        max_tokens=333,
        max_length=16,
        batch_size=3,
        progress=False,
    )
    assert dump.tokens == 333 and dump.complete
    assert dump.manifest["stopped"] == "max_tokens"
    pos = dump.read("position")
    assert pos.shape == (333,) and int(pos.max()) == 15
    assert dump.read("resid_mid.1").shape == (333, 64)


def test_progress_callback_counts_tokens(tiny_llama, tokenizer, prose, tmp_path):
    calls = []
    dump = rank1fast.collect(
        (tiny_llama, tokenizer),
        prose[:10],
        "resid_post.0",
        tmp_path / "d",
        batch_size=4,
        max_length=32,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls[-1] == (dump.tokens, 0)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_refuses_other_model_sites_settings_corpus(tiny_llama, tokenizer, prose, tmp_path):
    out = tmp_path / "d"
    kw = dict(batch_size=4, max_length=32, progress=False)
    rank1fast.collect((tiny_llama, tokenizer), prose[:8], "resid_mid.1", out, **kw)
    with pytest.raises(DumpError, match="other sites"):
        rank1fast.collect((tiny_llama, tokenizer), prose[:8], "resid_mid.2", out, **kw)
    with pytest.raises(DumpError, match="batch_size"):
        rank1fast.collect(
            (tiny_llama, tokenizer), prose[:8], "resid_mid.1", out, **{**kw, "batch_size": 2}
        )
    other = transformers.LlamaForCausalLM(tiny_llama.config).eval()
    with pytest.raises(DumpError, match="another model"):
        rank1fast.collect((other, tokenizer), prose[:8], "resid_mid.1", out, **kw)
    with pytest.raises(DumpError, match="more than max_tokens"):
        rank1fast.collect(
            (tiny_llama, tokenizer), prose[:8], "resid_mid.1", out, max_tokens=10, **kw
        )

    # An interrupted dump resumed on another corpus is refused, not appended to.
    part = tmp_path / "part"
    with pytest.raises(Interrupt):
        rank1fast.collect(
            (tiny_llama, tokenizer),
            prose[:16],
            "resid_mid.1",
            part,
            **{**kw, "progress": interrupt_after(2)},
            shard_tokens=50,
        )
    assert Dump.open(part).documents > 0
    with pytest.raises(DumpError, match="differ"):
        rank1fast.collect(
            (tiny_llama, tokenizer), prose[16:32], "resid_mid.1", part, **kw, shard_tokens=50
        )

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(DumpError, match="not empty"):
        rank1fast.collect((tiny_llama, tokenizer), prose[:8], "resid_mid.1", junk, **kw)
    with pytest.raises(PathNotFoundError):
        Dump.open(junk)


def test_killed_collection_resumes(tiny_llama_dir, tiny_llama, tokenizer, prose, tmp_path):
    """kill -9 in the middle of a run (a real process), then the same call completes it."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(prose[:40]) + "\n")
    kw = dict(batch_size=2, max_length=24, shard_tokens=40, storage_dtype="float32")
    out = tmp_path / "killed"
    script = textwrap.dedent(
        f"""
        import time, rank1fast
        def slow(done, total):
            time.sleep(0.3)
        rank1fast.collect({str(tiny_llama_dir)!r}, {str(corpus)!r}, "resid_post.2",
                          {str(out)!r}, device="cpu", progress=slow, **{kw!r})
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            manifest = out / "manifest.json"
            if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the collection ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    killed = Dump.open(out)
    assert not killed.complete and killed.tokens > 0
    resumed = rank1fast.collect(
        tiny_llama_dir, corpus, "resid_post.2", out, device="cpu", progress=False, **kw
    )
    whole = rank1fast.collect(
        tiny_llama_dir,
        corpus,
        "resid_post.2",
        tmp_path / "whole",
        device="cpu",
        progress=False,
        **kw,
    )
    for name in ("position", "document"):
        assert torch.equal(resumed.read(name), whole.read(name))
    torch.testing.assert_close(resumed.read("resid_post.2"), whole.read("resid_post.2"))
    assert resumed.manifest["shards"] == whole.manifest["shards"]


def test_raw_module_path_on_an_encoder(tokenizer, tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=128,
    )
    bert = transformers.BertModel(config).eval()
    with pytest.raises(SiteError, match="encoder.layer"):
        resolve_sites(bert, "resid_mid.0")  # no resid_* table for BERT: lists the modules
    texts = ["A short one.", "A somewhat longer document about steering vectors and LoRA."]
    texts += ["Padding must never be recorded, whatever the model."] * 3
    site = "encoder.layer.1.output.dense"
    dump = rank1fast.collect(
        (bert, tokenizer),
        texts,
        [site],
        tmp_path / "bert",
        batch_size=3,
        storage_dtype="float32",
        outputs=True,
        progress=False,
    )
    assert dump.sites == {site: site}
    ref, padding = reference(
        bert, tokenizer, texts, {site: site}, batch_size=3, max_length=512, outputs=True
    )
    assert padding > 0
    assert torch.equal(dump.read(site), ref[site])
    assert torch.equal(dump.read(site + ".output"), ref[site + ".output"])
    assert torch.equal(dump.read("document"), ref["document"])


def test_gpt2_conv1d_sites(tokenizer, tmp_path):
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=len(tokenizer))
    ).eval()
    dump = rank1fast.collect(
        (gpt2, tokenizer),
        ["one two three four", "five six"],
        "resid_post.1,resid_mid.0",
        tmp_path / "g",
        storage_dtype="float32",
        progress=False,
    )
    assert dump.sites == {
        "resid_post.1": "transformer.h.1.mlp.c_proj",
        "resid_mid.0": "transformer.h.0.attn.c_proj",
    }
    assert dump.manifest["sites"]["resid_post.1"]["dim"] == 128  # Conv1D weight is [in, out]
    assert dump.read("resid_post.1").shape == (dump.tokens, 128)


def test_module_run_twice_is_refused(tokenizer, tmp_path):
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(len(tokenizer), 8)
            self.mix = torch.nn.Linear(8, 8)

        def forward(self, input_ids, attention_mask):
            return self.mix(self.mix(self.embed(input_ids)))

    with pytest.raises(SiteError, match="more than once"):
        rank1fast.collect(
            (Twice(), tokenizer), ["some text"], "mix", tmp_path / "t", progress=False
        )


def test_cli_collect(tiny_llama_dir, prose, tmp_path, capsys):
    from rank1fast.cli import main

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in prose[:6]))
    out = tmp_path / "cli"
    argv = [
        "collect",
        str(tiny_llama_dir),
        "--corpus",
        str(corpus),
        "--sites",
        "resid_mid.0-1",
        "--tokens",
        "200",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--storage-dtype",
        "float16",
        "--outputs",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "200 tokens" in printed and "rank1fast analyze" in printed
    dump = Dump.open(out)
    assert dump.tokens == 200 and list(dump.sites) == ["resid_mid.0", "resid_mid.1"]
    assert dump.read("resid_mid.1.output").dtype == torch.float16
    assert (
        main(
            [
                "collect",
                "--sites",
                "resid_mid.9",
                "--out",
                str(out),
                "--quiet",
                str(tiny_llama_dir),
                "--corpus",
                str(corpus),
            ]
        )
        == 1
    )
    assert "out of range" in capsys.readouterr().err


# --------------------------------------------------------------------------- sites


def _small(**extra):
    return dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
        **extra,
    )


FAMILIES = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**_small())),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**_small())),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_small())),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**_small(head_dim=16))),
    "gemma": lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(**_small(head_dim=16))),
    "gemma2": lambda: transformers.Gemma2ForCausalLM(
        transformers.Gemma2Config(**_small(head_dim=16))
    ),
    "gemma3": lambda: transformers.Gemma3ForCausalLM(
        transformers.Gemma3TextConfig(**_small(head_dim=16))
    ),
    "phi3": lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(**_small(pad_token_id=0))),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sites_llama_like_families(family):
    model = FAMILIES[family]()
    assert num_layers(model) == 3
    sites = resolve_sites(model, "resid_mid.0-1, resid_post.-1")
    assert sites == {
        "resid_mid.0": "model.layers.0.self_attn.o_proj",
        "resid_mid.1": "model.layers.1.self_attn.o_proj",
        "resid_post.2": "model.layers.2.mlp.down_proj",
    }
    for path in sites.values():
        assert isinstance(get_module(model, path), torch.nn.Linear)


def test_sites_gpt2_neox_and_all():
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64)
    )
    assert resolve_sites(gpt2, ["all"]) == {
        "resid_mid.0": "transformer.h.0.attn.c_proj",
        "resid_post.0": "transformer.h.0.mlp.c_proj",
        "resid_mid.1": "transformer.h.1.attn.c_proj",
        "resid_post.1": "transformer.h.1.mlp.c_proj",
    }
    # Pythia's parallel residual: attention and MLP both read the block's input, so there is
    # no residual stream between them; the sequential variant has one.
    neox = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**_small()))
    assert resolve_sites(neox, "resid_post.0") == {
        "resid_post.0": "gpt_neox.layers.0.mlp.dense_4h_to_h"
    }
    with pytest.raises(SiteError, match="in parallel"):
        resolve_sites(neox, "resid_mid.2")
    sequential = transformers.GPTNeoXForCausalLM(
        transformers.GPTNeoXConfig(**_small(use_parallel_residual=False))
    )
    assert resolve_sites(sequential, "resid_mid.2,resid_post.0") == {
        "resid_mid.2": "gpt_neox.layers.2.attention.dense",
        "resid_post.0": "gpt_neox.layers.0.mlp.dense_4h_to_h",
    }


def test_site_errors_and_peft_paths():
    model = FAMILIES["llama"]()
    with pytest.raises(SiteError, match="out of range"):
        resolve_sites(model, "resid_mid.3")
    with pytest.raises(SiteError, match="out of range"):
        resolve_sites(model, "resid_post.1-7")
    with pytest.raises(SiteError, match=r"not a linear module.*mlp\.down_proj"):
        resolve_sites(model, "model.layers.0.mlp")
    with pytest.raises(SiteError, match=r"no module 'model\.layers\.9\.mlp'.*o_proj \(x3\)"):
        resolve_sites(model, "model.layers.9.mlp")
    with pytest.raises(SiteError, match="resid_mid.L"):
        resolve_sites(model, "resid_mid")
    assert resolve_sites(model, "lm_head") == {"lm_head": "lm_head"}

    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=1, target_modules=["o_proj"]))
    sites = resolve_sites(wrapped, "resid_mid.1,base_model.model.model.layers.2.mlp.down_proj")
    assert sites == {
        "resid_mid.1": "model.layers.1.self_attn.o_proj",
        "model.layers.2.mlp.down_proj": "model.layers.2.mlp.down_proj",
    }
    lora = get_module(wrapped, "model.layers.1.self_attn.o_proj")
    assert lora is get_module(wrapped, "base_model.model.model.layers.1.self_attn.o_proj")
    assert isinstance(lora.base_layer, torch.nn.Linear)


# --------------------------------------------------------------------------- corpus


def test_default_corpus_size(tokenizer):
    docs = default_corpus()
    assert docs == default_corpus() and len(set(docs)) == len(docs)
    lengths = [len(ids) for ids in tokenizer(docs)["input_ids"]]
    assert sum(lengths) >= 200_000
    assert max(lengths) <= 512  # never truncated at the default max_length
    words = " ".join(docs[:50]).split()
    assert sum(w.isalpha() for w in words) > 0.7 * len(words)  # prose, not code


def test_read_texts_formats(tmp_path):
    import gzip

    txt = tmp_path / "c.txt"
    txt.write_text("first line\nsame document\n\n\n  \nsecond\n\nthird\n")
    assert list(read_texts(txt)) == ["first line\nsame document", "second", "third"]
    gz = tmp_path / "c.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write('{"text": "a"}\n\n{"text": "b", "id": 2}\n')
    assert list(read_texts(gz)) == ["a", "b"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(rank1fast.CorpusError, match=r"bad\.jsonl:2"):
        list(read_texts(bad))
    with pytest.raises(PathNotFoundError):
        read_texts(tmp_path / "missing.txt")
    csv = tmp_path / "c.csv"
    csv.write_text("text\n")
    with pytest.raises(rank1fast.InvalidArgumentError, match="unknown corpus file type"):
        read_texts(csv)
    assert list(read_texts(["x", "y"])) == ["x", "y"]
    assert next(read_texts(None)) == default_corpus()[0]


def test_quiet_collect_of_the_default_model_prints_no_loading_bars(tmp_path, capsys):
    """`--quiet` silences transformers' GGUF dequantization and weight-loading bars too."""
    from rank1fast.cli import main

    out = tmp_path / "d"
    assert (
        main(["collect", "--sites", "resid_mid.1", "--tokens", "40", "--out", str(out), "--quiet"])
        == 0
    )
    captured = capsys.readouterr()
    assert "GGUF" not in captured.err and "Loading weights" not in captured.err, captured.err[-500:]
    assert Dump.open(out).tokens == 40
    # Not quiet: transformers' own switch is back on.
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
