"""rank1fast.convert end to end on the real default model and real PEFT, on chat.

On vectors and layers of the tests' own (formal vs casual contrastive prompts, not the demo's
cheerful/gloomy ones; other layers than the benchmark's), held-out chat conversations, issue
18's targets:

- one site at about 0.5 nats: KL(hook||adapter) at most 0.5 % of KL(hook||base) at resid_mid
  and 2.5 % at resid_post (measured on a Sapphire Rapids, downstream corrections fitted on 40k
  tokens per writer: resid_mid.10 0.44 %, resid_post.10 1.53 %, resid_post.20 0.57 %; on 20k
  tokens 0.52 %, 1.64 %, 0.61 %; without corrections 0.98 %, 2.37 %, 1.23 %);
- many layers (10 resid_post sites, unit directions x one coefficient), corrections on 10k
  tokens per writer to keep CI short: at about 1 nat in total at most 1.5 % (measured 1.26 %;
  before the corrections 3.17 %), at about 3 nats at most 3.5 % (measured 0.99 % at 3.13
  nats, one-hot 34.5 %);
- the one-hot adapter at least 10x worse, and the adapter's
  top-1 agreement with greedy hook-steered continuations above the unsteered model's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import rank1fast
from rank1fast.errors import AdapterError, InvalidArgumentError
from rank1fast.verify import Fidelity, calibrate_scale

pytestmark = pytest.mark.slow
pytest.importorskip("peft")

FORMAL = [
    "I am writing to inform you that the meeting has been rescheduled.",
    "Kindly find attached the requested documents for your review.",
    "We would be grateful if you could confirm your attendance.",
    "Please accept our sincere apologies for any inconvenience caused.",
    "The committee has carefully considered your application.",
    "I would like to request further information regarding the position.",
    "Should you require any assistance, do not hesitate to contact us.",
    "We hereby acknowledge receipt of your correspondence.",
]
CASUAL = [
    "hey just so u know the meeting got moved lol",
    "here's the stuff you wanted, check it out",
    "let me know if you're coming, k?",
    "oops sorry about that, my bad!",
    "yeah so we looked at your thing and it's cool",
    "can you tell me more about the job? thx",
    "ping me if you need anything",
    "got your message, cool cool",
]
TOKENS = 20_000
EVAL = 16


pytestmark = pytest.mark.usefixtures("all_cores")


@pytest.fixture(scope="module")
def formal(smollm):
    sites = ["resid_mid.10", "resid_post.10", "resid_post.20"] + [
        f"resid_post.{i}" for i in range(3, 22, 2)
    ]
    return rank1fast.vectors.contrastive(smollm, FORMAL, CASUAL, sorted(set(sites)))


@pytest.fixture(scope="module")
def held(smollm):
    from rank1fast.corpus import served_corpus

    return served_corpus(smollm[1], "eval")[:EVAL]


def _convert(smollm, vecs, out, held, **kwargs):
    path = rank1fast.convert(
        smollm,
        vecs,
        out,
        tokens=TOKENS,
        **kwargs,
        eval_texts=held,
        max_length=192,
        generate=16,
        progress=False,
        log=None,
    )
    info = rank1fast.adapter.read_adapter_info(path)
    fid = Fidelity.from_json(info["convert"]["fidelity"])
    print(fid)
    # Where the verified adapter is now, not the work folder it was verified in.
    assert fid.adapters == {"least-squares": str(path), "one-hot": "(not kept)"}
    return path, info, fid


@pytest.mark.parametrize(
    "site,target", [("resid_mid.10", 0.005), ("resid_post.10", 0.025), ("resid_post.20", 0.025)]
)
def test_one_site_on_chat(smollm, formal, held, tmp_path, site, target):
    scale = calibrate_scale(smollm, {site: formal[site]}, held[:6], target_kl=0.5, max_length=192)
    vecs = {site: scale[site] * formal[site]}
    path, info, fid = _convert(smollm, vecs, tmp_path / "a", held)
    row = fid[site]
    assert 0.3 < row.steering_kl_mean < 0.8
    ls, onehot = row.adapters["least-squares"], row.adapters["one-hot"]
    assert ls.ratio <= target, fid
    assert onehot.ratio >= 10 * ls.ratio, fid
    # The generation check ran: the adapter follows the steered continuations at least as
    # well as the unsteered model does.
    assert row.generated_tokens > 100
    assert ls.top1_agreement >= row.base_top1_agreement
    fit = info["convert"]["fit"]
    assert fit["under_steering"] and fit["tokens"] >= TOKENS - 1
    # Downstream corrections were fitted and kept on the two writers after the site's module.
    kept = info["convert"]["corrections"]["modules"]
    layer = int(site.split(".")[1])
    after = {
        f"model.layers.{layer + 1}.self_attn.o_proj",
        f"model.layers.{layer + 1}.mlp.down_proj",
    }
    if site.startswith("resid_mid"):
        after = {
            f"model.layers.{layer}.mlp.down_proj",
            f"model.layers.{layer + 1}.self_attn.o_proj",
        }
    assert kept and set(kept) <= after, kept
    assert all(c["rms_after"] < c["rms_before"] for c in kept.values())
    assert info["scale"] == 1.0 and info["sites"][site]["vector_norm"] == pytest.approx(
        float(np.linalg.norm(vecs[site]))
    )


@pytest.mark.parametrize("nats,target", [(1.0, 0.015), (3.0, 0.035)])
def test_many_layers_on_chat(smollm, formal, held, tmp_path, nats, target):
    sites = [f"resid_post.{i}" for i in range(3, 22, 2)]
    unit = {s: formal[s] / np.linalg.norm(formal[s]) for s in sites}
    coef = calibrate_scale(
        smollm, unit, held[:6], target_kl=nats, max_length=192, together=True, tolerance=0.05
    )[sites[0]]
    # 20 corrected writers: 10k tokens each keeps the test within CI's budget.
    vecs = {s: coef * v for s, v in unit.items()}
    _, _, fid = _convert(smollm, vecs, tmp_path / "a", held, correction_tokens=10_000)
    row = fid["all"]
    assert 0.7 * nats < row.steering_kl_mean < 1.4 * nats
    ls, onehot = row.adapters["least-squares"], row.adapters["one-hot"]
    assert ls.ratio <= target, fid
    assert onehot.ratio >= 10 * ls.ratio, fid
    assert ls.top1_agreement > row.base_top1_agreement


def test_convert_refuses_before_the_fit(smollm, tmp_path, monkeypatch, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file.txt").write_text("x")
    v = {"resid_post.3": np.ones(576)}
    with pytest.raises(AdapterError, match="taken is a non-empty directory that is not an adapter"):
        rank1fast.convert(smollm, v, tmp_path / "taken", log=None, progress=False)
    with pytest.raises(InvalidArgumentError, match="576"):
        rank1fast.convert(smollm, {"resid_post.3": np.ones(5)}, tmp_path / "x", log=None)
    with pytest.raises(InvalidArgumentError, match="unknown serving profile"):
        rank1fast.convert(smollm, v, tmp_path / "y", target="nope", log=None)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(AdapterError, match="afile is not a directory"):
        rank1fast.convert(smollm, v, tmp_path / "afile" / "sub", log=None)
    for kwargs, message in [
        ({"rank": 0}, "rank must be a positive integer"),
        ({"scale": {"resid_post.3": 2.0}}, "scale must be a finite number"),
        ({"scale": float("nan")}, "scale must be a finite number"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"tokens": 0}, "tokens must be at least 1"),
        ({"eval_texts": []}, "eval_texts holds no texts"),
        ({"scale": 0}, "scale 0 steers nothing"),
    ]:
        with pytest.raises(InvalidArgumentError, match=message):
            rank1fast.convert(smollm, v, tmp_path / "n" / "x", log=None, **kwargs)
    with pytest.raises(InvalidArgumentError, match="resid_post.3: the vector is all zeros"):
        rank1fast.convert(smollm, {"resid_post.3": np.zeros(576)}, tmp_path / "z", log=None)
    with pytest.raises(InvalidArgumentError, match="got list"):
        rank1fast.convert(smollm, [np.ones(576)], tmp_path / "z", log=None)
    with pytest.raises(InvalidArgumentError, match="resid_post.3: the vector is not numbers"):
        rank1fast.convert(smollm, {"resid_post.3": "abc"}, tmp_path / "z", log=None)
    # A folder it cannot write in (a read-only file system; root passes chmod): before the fit.
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: str(p) != str(tmp_path) and real_access(p, mode)
    )
    with pytest.raises(AdapterError, match=f"cannot write in {tmp_path}"):
        rank1fast.convert(smollm, v, tmp_path / "ro", log=None)
    monkeypatch.undo()
    with pytest.raises(AdapterError, match="afile exists and is not a directory; refusing"):
        rank1fast.convert(smollm, v, tmp_path / "afile", log=None)
    with pytest.raises(InvalidArgumentError, match="loaded model"):
        with rank1fast.steering(None, v):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "taken"]
    from rank1fast.cli import main

    rank1fast.vectors.save(v, tmp_path / "v.safetensors")
    args = ["convert", str(tmp_path / "v.safetensors"), "-o", str(tmp_path / "c"), "--no-verify"]
    assert main([*args, "--generate", "5"]) == 1  # refused before the model loads
    assert "--no-verify skips" in capsys.readouterr().err


def test_convert_names_sites_canonically_and_the_default_model_by_its_hub_id(smollm, tmp_path):
    # A loaded default model is recognised (not its package folder); resid_post.-1 is layer 29.
    path = rank1fast.convert(
        smollm,
        {"resid_post.-1": np.ones(576)},
        tmp_path / "new" / "a",
        tokens=300,
        verify=False,
        log=None,
        progress=False,
    )
    info = rank1fast.adapter.read_adapter_info(path)
    assert list(info["sites"]) == ["resid_post.29"]
    assert info["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_convert_cli_writes_a_peft_adapter(smollm, tmp_path, held):
    from rank1fast.cli import main

    vec = tmp_path / "v.safetensors"
    rank1fast.vectors.save({"resid_mid.12": 3.0 * np.ones(576) / 24}, vec)
    corpus = tmp_path / "chat.jsonl"
    from rank1fast.corpus import chat_conversations

    corpus.write_text(
        "".join(json.dumps({"messages": c}) + "\n" for c in chat_conversations("fit")[:40])
    )
    out = tmp_path / "lora"
    code = main(
        [
            "convert",
            str(vec),
            "-o",
            str(out),
            "--corpus",
            str(corpus),
            "--tokens",
            "3000",
            "--no-verify",
            "--for",
            "vllm",
            "--corrections",
            "0",
            "--quiet",
        ]
    )
    assert code == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.12.self_attn.o_proj"]
    assert config["r"] == 1
    info = rank1fast.adapter.read_adapter_info(out)
    assert info["convert"]["fit"]["corpus"] == str(corpus)
    assert "fidelity" not in info["convert"] and "corrections" not in info["convert"]
    assert not [p for p in rank1fast.serving.check(out, "vllm") if p.severity == "error"]


def test_cli_convert_on_sigterm_leaves_nothing_behind(tmp_path, held):
    """A convert stopped by SIGTERM (kill, timeout, a scheduler) mid-verify removes its work
    folder and the folders it made, as a failure does."""
    vec = tmp_path / "v.safetensors"
    rank1fast.vectors.save({"resid_mid.12": 3.0 * np.ones(576) / 24}, vec)
    ev = tmp_path / "ev.txt"
    ev.write_text("\n\n".join(held[:8]) + "\n")
    out = tmp_path / "new" / "lora"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = ["convert", str(vec), "-o", str(out), "--tokens", "300", "--eval-texts", str(ev)]
    args += ["--generate", "8", "--corrections", "0", "--max-length", "64", "-q"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "rank1fast", *args], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 300
        while not list(out.parent.glob(".lora.convert-*")):  # the fit is done, verify runs
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the work folder never appeared"
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    assert "terminated" in proc.stderr.read()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ev.txt", "v.safetensors"]
